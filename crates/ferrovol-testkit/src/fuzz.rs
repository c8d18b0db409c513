//! Entry points for fuzzing the layers hostile input meets first: ID and path
//! checks, and whole requests decoded from arbitrary bytes and served by the
//! real services on a scratch pool. The `fuzz/` targets (cargo fuzz) and the
//! property tests both call these, so what CI fuzzes is what the suite tests.
//!
//! Each entry point panics when an invariant breaks; that is the finding.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use ferrovol_csi as csi;
use prost::Message;
use tonic::{Code, Request};

use ferrovol_core::locks::OpLocks;
use ferrovol_core::services::controller::ControllerService;
use ferrovol_core::services::group_controller::GroupControllerService;
use ferrovol_core::services::node::{NodeConfig, NodeService};
use ferrovol_core::services::snapshot_metadata::SnapshotMetadataService;
use ferrovol_core::services::{validate, Driver};
use ferrovol_local::ids::{self, Kind};
use ferrovol_local::LocalEngine;

/// Checks the ID and path rules on one string: whatever they accept must be
/// unable to name anything outside the pool or the kubelet directory.
pub fn ids_and_paths(kubelet_dir: &Path, data: &[u8]) {
    let s = String::from_utf8_lossy(data);
    for kind in [Kind::Volume, Kind::Snapshot, Kind::Group] {
        if ids::is_valid(kind, &s) {
            assert!(s.len() <= validate::MAX_STRING, "{s:?}");
            let dir = Path::new("/pool/volumes");
            let file = dir.join(format!("{s}.img"));
            assert_eq!(file.parent(), Some(dir), "id {s:?} escapes its directory");
            assert!(!s.contains(['/', '\0', '%', '\\']), "id {s:?}");
        }
    }
    if validate::name(&s, "name").is_ok() {
        assert!(!s.is_empty() && s.len() <= validate::MAX_STRING);
        assert!(!s.chars().any(|c| c.is_control() && !matches!(c, '\t' | '\n' | '\r')));
    }
    for raw in [s.to_string(), format!("{}/{s}", kubelet_dir.display())] {
        let Ok(path) = validate::kubelet_path(&raw, "path", kubelet_dir) else { continue };
        assert!(path.starts_with(kubelet_dir), "{raw:?} accepted outside the kubelet dir");
        assert!(
            !path.components().any(|c| matches!(c, Component::ParentDir | Component::CurDir)),
            "{raw:?} accepted unnormalized"
        );
        let existing = path.ancestors().find(|p| p.exists()).expect("/ exists");
        let resolved = existing.canonicalize().expect("an existing path resolves");
        assert!(resolved.starts_with(kubelet_dir), "{raw:?} resolves to {resolved:?}");
    }
}

/// A driver served in-process on a scratch pool and kubelet directory,
/// removed on drop.
pub struct Harness {
    root: PathBuf,
    pub kubelet_dir: PathBuf,
    runtime: tokio::runtime::Runtime,
    controller: ControllerService,
    group: GroupControllerService,
    metadata: SnapshotMetadataService,
    node: NodeService,
}

/// The scratch directory's own entries; anything else appearing in it was
/// written outside the pool and the kubelet directory.
const SCRATCH_ENTRIES: [&str; 3] = ["kubelet", "pool", "state"];

impl Harness {
    /// A harness under `root`, which must not exist yet. The kubelet dir
    /// holds a symlink to `/` and one to the pool, as traps.
    pub fn new(root: &Path) -> Harness {
        let kubelet_dir = root.join("kubelet");
        std::fs::create_dir_all(kubelet_dir.join("pods")).expect("creating the scratch dirs");
        std::fs::create_dir_all(root.join("state")).expect("creating the scratch dirs");
        let _ = std::os::unix::fs::symlink("/", kubelet_dir.join("pods/escape"));
        let _ = std::os::unix::fs::symlink(root.join("pool"), kubelet_dir.join("pods/pool"));
        let kubelet_dir = kubelet_dir.canonicalize().expect("resolving the kubelet dir");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let engine = Arc::new(
            runtime
                .block_on(LocalEngine::open(&root.join("pool"), &root.join("state"), "fuzz-node"))
                .expect("opening the scratch pool"),
        );
        let driver = Arc::new(Driver {
            name: "fuzz.ferrovol.io".into(),
            node_id: "fuzz-node".into(),
            mode: ferrovol_core::cli::Mode::All,
            state_dir: root.join("state"),
            state_writes: Some(ferrovol_host::fsutil::WriteMonitor::spawn(&root.join("state"))),
            controller: Some(engine.clone()),
            node: Some(Arc::new(ferrovol_block::BlockStaging::new(engine, &root.join("state")))),
            locks: OpLocks::new(),
        });
        let config = NodeConfig { kubelet_dir: kubelet_dir.clone(), max_volumes_per_node: 0 };
        Harness {
            root: root.to_path_buf(),
            controller: ControllerService::new(driver.clone()),
            group: GroupControllerService::new(driver.clone()),
            metadata: SnapshotMetadataService::new(driver.clone()),
            node: NodeService::new(driver, config),
            kubelet_dir,
            runtime,
        }
    }

    /// Decodes `data` (first byte: which RPC) as a request and serves it.
    /// Answers the status code, or None when the bytes are no such request.
    pub fn request(&self, data: &[u8]) -> Option<Code> {
        let (&which, body) = data.split_first()?;
        let code = self.runtime.block_on(self.serve(which, body))?;
        assert!(
            !matches!(code, Code::Unknown | Code::Internal | Code::Cancelled),
            "hostile input produced {code:?}"
        );
        self.assert_nothing_outside();
        Some(code)
    }

    async fn serve(&self, which: u8, body: &[u8]) -> Option<Code> {
        use csi::controller_server::Controller;
        use csi::group_controller_server::GroupController;
        use csi::node_server::Node;
        use csi::snapshot_metadata_server::SnapshotMetadata;

        fn decode<M: Message + Default>(body: &[u8]) -> Option<Request<M>> {
            M::decode(body).ok().map(Request::new)
        }
        fn code<T>(r: Result<T, tonic::Status>) -> Code {
            r.map(|_| Code::Ok).unwrap_or_else(|s| s.code())
        }
        let (c, g, m, n) = (&self.controller, &self.group, &self.metadata, &self.node);
        Some(match which % 19 {
            0 => code(c.create_volume(decode(body)?).await),
            1 => code(c.delete_volume(decode(body)?).await),
            2 => code(c.validate_volume_capabilities(decode(body)?).await),
            3 => code(c.list_volumes(decode(body)?).await),
            4 => code(c.get_capacity(decode(body)?).await),
            5 => code(c.create_snapshot(decode(body)?).await),
            6 => code(c.delete_snapshot(decode(body)?).await),
            7 => code(c.list_snapshots(decode(body)?).await),
            8 => code(c.controller_get_volume(decode(body)?).await),
            9 => code(c.controller_modify_volume(decode(body)?).await),
            10 => code(g.create_volume_group_snapshot(decode(body)?).await),
            11 => code(g.delete_volume_group_snapshot(decode(body)?).await),
            12 => code(g.get_volume_group_snapshot(decode(body)?).await),
            13 => code(m.get_metadata_allocated(decode(body)?).await),
            14 => code(m.get_metadata_delta(decode(body)?).await),
            15 => code(n.node_stage_volume(decode(body)?).await),
            16 => code(n.node_publish_volume(decode(body)?).await),
            17 => code(n.node_unpublish_volume(decode(body)?).await),
            _ => code(n.node_get_volume_stats(decode(body)?).await),
        })
    }

    fn assert_nothing_outside(&self) {
        let entries = std::fs::read_dir(&self.root).expect("listing the scratch dir");
        for e in entries {
            let name = e.expect("listing the scratch dir").file_name();
            let name = name.to_string_lossy();
            assert!(SCRATCH_ENTRIES.contains(&name.as_ref()), "{name:?} written outside the pool");
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}
