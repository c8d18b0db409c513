//! One conformance suite for every engine: the same behavioural checks,
//! spoken over gRPC as the sidecars and the kubelet speak them, run against
//! each engine in the tier it needs (the in-memory shapes, the local engine,
//! the local engine through the relay, RBD on the dev Ceph).
//!
//! The checks follow what the engine advertises: snapshots, clones,
//! controller attach, raw block and expansion are checked where offered,
//! and where not offered their calls must be refused with the spec's codes.
//! An engine joins by describing itself as a [`Subject`].

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use ferrovol_csi as csi;
use ferrovol_csi::controller_client::ControllerClient;
use ferrovol_csi::controller_service_capability::rpc::Type as Cap;
use ferrovol_csi::group_controller_client::GroupControllerClient;
use ferrovol_csi::identity_client::IdentityClient;
use ferrovol_csi::node_client::NodeClient;
use ferrovol_csi::node_service_capability::rpc::Type as NodeCap;
use ferrovol_csi::volume_capability::access_mode::Mode;
use ferrovol_csi::volume_capability::{AccessType, BlockVolume, MountVolume};
use tonic::transport::Channel;
use tonic::Code;

const MIB: i64 = 1 << 20;

/// An engine under test, as the CO sees it.
#[tonic::async_trait]
pub trait Subject: Send + Sync {
    /// For failure messages.
    fn name(&self) -> String;

    /// The controller plugin's socket.
    async fn controller(&self) -> Channel;

    /// The node plugin volumes are staged on, and its kubelet directory;
    /// None where node calls cannot run here (no root).
    async fn node(&self) -> Option<(Channel, PathBuf)>;

    /// A CreateVolume for this engine (its parameters, secrets, topology).
    fn create(
        &self,
        name: &str,
        bytes: i64,
        cap: csi::VolumeCapability,
    ) -> csi::CreateVolumeRequest;

    /// The size a volume of this engine needs to hold a filesystem.
    fn volume_size(&self) -> i64 {
        64 * MIB
    }

    /// The `fs_type` filesystem volumes ask for (empty: the engine's
    /// default).
    fn fs_type(&self) -> String {
        String::new()
    }

    /// The secrets each later call carries (as a StorageClass's secret
    /// references make the sidecars send them).
    fn secrets(&self) -> HashMap<String, String> {
        HashMap::new()
    }
}

/// Runs every check against `subject`; a failure names the subject and
/// the check.
pub async fn run(subject: &dyn Subject) {
    let name = subject.name();
    let mut k = Kit::new(subject).await;
    eprintln!("conformance[{name}]: {}", k.describe());
    k.advertised_parts_answer().await;
    k.volumes_are_idempotent_by_name().await;
    k.listings_page_through_every_volume().await;
    k.snapshots_restores_and_clones_where_offered().await;
    k.raw_block_where_offered().await;
    if k.node.is_some() {
        k.stage_publish_and_back().await;
        k.expansion_reaches_the_pod().await;
    }
    eprintln!("conformance[{name}]: passed");
}

struct Kit<'a> {
    subject: &'a dyn Subject,
    name: String,
    c: ControllerClient<Channel>,
    channel: Channel,
    node: Option<(NodeClient<Channel>, PathBuf)>,
    caps: Vec<Cap>,
    node_caps: Vec<NodeCap>,
    /// Plugin services advertised (GetPluginCapabilities).
    services: Vec<csi::plugin_capability::service::Type>,
    node_id: String,
    serial: u32,
}

fn cap_of(mode: Mode, block: bool, fs_type: String) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_mode: Some(csi::volume_capability::AccessMode { mode: mode as i32 }),
        access_type: Some(match block {
            true => AccessType::Block(BlockVolume {}),
            false => AccessType::Mount(MountVolume { fs_type, ..Default::default() }),
        }),
    }
}

fn from_snapshot(id: &str) -> csi::volume_content_source::Type {
    csi::volume_content_source::Type::Snapshot(csi::volume_content_source::SnapshotSource {
        snapshot_id: id.into(),
    })
}

impl<'a> Kit<'a> {
    async fn new(subject: &'a dyn Subject) -> Kit<'a> {
        let channel = subject.controller().await;
        let mut c = ControllerClient::new(channel.clone());
        let caps = c
            .controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {})
            .await
            .expect("ControllerGetCapabilities")
            .into_inner()
            .capabilities
            .iter()
            .filter_map(|c| match &c.r#type {
                Some(csi::controller_service_capability::Type::Rpc(r)) => {
                    Cap::try_from(r.r#type).ok()
                }
                None => None,
            })
            .collect();
        let services = IdentityClient::new(channel.clone())
            .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
            .await
            .expect("GetPluginCapabilities")
            .into_inner()
            .capabilities
            .iter()
            .filter_map(|c| match &c.r#type {
                Some(csi::plugin_capability::Type::Service(s)) => {
                    csi::plugin_capability::service::Type::try_from(s.r#type).ok()
                }
                _ => None,
            })
            .collect();
        let node = subject.node().await.map(|(ch, dir)| (NodeClient::new(ch), dir));
        let (mut node_caps, mut node_id) = (vec![], String::new());
        if let Some((n, _)) = &node {
            let mut n = n.clone();
            node_caps = n
                .node_get_capabilities(csi::NodeGetCapabilitiesRequest {})
                .await
                .expect("NodeGetCapabilities")
                .into_inner()
                .capabilities
                .iter()
                .filter_map(|c| match &c.r#type {
                    Some(csi::node_service_capability::Type::Rpc(r)) => {
                        NodeCap::try_from(r.r#type).ok()
                    }
                    _ => None,
                })
                .collect();
            node_id =
                n.node_get_info(csi::NodeGetInfoRequest {}).await.unwrap().into_inner().node_id;
        }
        Kit {
            subject,
            name: subject.name(),
            c,
            channel,
            node,
            caps,
            node_caps,
            services,
            node_id,
            serial: 0,
        }
    }

    fn cap(&self, mode: Mode, block: bool) -> csi::VolumeCapability {
        cap_of(mode, block, self.subject.fs_type())
    }

    fn describe(&self) -> String {
        format!(
            "controller {:?}; node {:?}; services {:?}",
            self.caps, self.node_caps, self.services
        )
    }

    /// A CreateVolume of a single-writer filesystem volume with content.
    fn create_from(
        &mut self,
        what: &str,
        source: csi::volume_content_source::Type,
    ) -> csi::CreateVolumeRequest {
        let name = self.fresh(what);
        let cap = self.cap(Mode::SingleNodeWriter, false);
        let mut request = self.subject.create(&name, self.subject.volume_size(), cap);
        request.volume_content_source = Some(csi::VolumeContentSource { r#type: Some(source) });
        request
    }

    /// A CreateVolume that copies (a restore, a clone), retried while it
    /// answers ABORTED as the provisioner retries it (an engine that copies
    /// in the background answers that while the copy runs), bounded.
    async fn create_copy(
        &mut self,
        r: csi::CreateVolumeRequest,
    ) -> Result<tonic::Response<csi::CreateVolumeResponse>, tonic::Status> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(180);
        loop {
            match self.c.create_volume(r.clone()).await {
                Err(e) if e.code() == Code::Aborted && std::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
                other => return other,
            }
        }
    }

    fn has(&self, c: Cap) -> bool {
        self.caps.contains(&c)
    }

    /// A request name of this run's own.
    fn fresh(&mut self, what: &str) -> String {
        self.serial += 1;
        format!("conf-{what}-{}", self.serial)
    }

    fn fail(&self, check: &str, what: impl std::fmt::Display) -> ! {
        panic!("conformance[{}] {check}: {what}", self.name)
    }

    async fn create(&mut self, what: &str, cap: csi::VolumeCapability) -> csi::Volume {
        let name = self.fresh(what);
        let r = self.subject.create(&name, self.subject.volume_size(), cap);
        match self.c.create_volume(r).await {
            Ok(v) => v.into_inner().volume.expect("a volume"),
            Err(e) => self.fail("create", format!("{name}: {e:?}")),
        }
    }

    async fn delete(&mut self, id: &str) {
        let r = csi::DeleteVolumeRequest { volume_id: id.into(), secrets: self.subject.secrets() };
        if let Err(e) = self.c.delete_volume(r).await {
            self.fail("delete", format!("{id}: {e:?}"));
        }
    }

    /// Every optional part is either advertised and answered, or neither:
    /// an absent part's calls are UNIMPLEMENTED.
    async fn advertised_parts_answer(&mut self) {
        use csi::plugin_capability::service::Type as Service;
        let check = "advertised parts answer";
        let snapshot = csi::CreateSnapshotRequest {
            name: "conf-probe".into(),
            source_volume_id: "conf-no-such-volume".into(),
            ..Default::default()
        };
        let answer = self.c.create_snapshot(snapshot).await;
        self.part_answers(
            "snapshots (CreateSnapshot)",
            self.has(Cap::CreateDeleteSnapshot),
            answer,
        );
        let publish = csi::ControllerPublishVolumeRequest {
            volume_id: "conf-no-such-volume".into(),
            node_id: "conf-node".into(),
            volume_capability: Some(self.cap(Mode::SingleNodeWriter, false)),
            ..Default::default()
        };
        let answer = self.c.controller_publish_volume(publish).await;
        self.part_answers(
            "attach (ControllerPublish)",
            self.has(Cap::PublishUnpublishVolume),
            answer,
        );
        let group = csi::GetVolumeGroupSnapshotRequest {
            group_snapshot_id: "conf-no-such-group".into(),
            ..Default::default()
        };
        let answer =
            GroupControllerClient::new(self.channel.clone()).get_volume_group_snapshot(group).await;
        match (self.services.contains(&Service::GroupControllerService), answer) {
            (true, Err(e)) if e.code() != Code::NotFound => {
                self.fail(check, format!("groups advertised, an unknown group is {e:?}"))
            }
            (false, Err(e)) if e.code() != Code::Unimplemented => {
                self.fail(check, format!("no groups advertised, yet {e:?}"))
            }
            (_, Ok(_)) => self.fail(check, "an unknown group snapshot was found"),
            _ => {}
        }
        let expands = self.node_caps.contains(&NodeCap::ExpandVolume);
        if let Some((n, _)) = &mut self.node {
            let r = csi::NodeExpandVolumeRequest {
                volume_id: "conf-no-such-volume".into(),
                volume_path: "/nowhere".into(),
                ..Default::default()
            };
            let answer = n.node_expand_volume(r).await;
            match (expands, answer) {
                (false, Err(e)) if e.code() != Code::Unimplemented => {
                    self.fail(check, format!("no node expansion advertised, yet {e:?}"))
                }
                (true, Err(e)) if e.code() == Code::Unimplemented => {
                    self.fail(check, format!("node expansion advertised, {e:?}"))
                }
                (_, Ok(_)) => self.fail(check, "an unknown volume was expanded"),
                _ => {}
            }
        }
    }

    /// A call on an unknown object of an optional part: UNIMPLEMENTED
    /// exactly when the part is not advertised, and never a success.
    fn part_answers<T: std::fmt::Debug>(
        &self,
        part: &str,
        advertised: bool,
        answer: Result<T, tonic::Status>,
    ) {
        let check = "advertised parts answer";
        match (advertised, answer) {
            (_, Ok(made)) => self.fail(check, format!("{part}: an unknown object gave {made:?}")),
            (true, Err(e)) if e.code() == Code::Unimplemented => {
                self.fail(check, format!("{part} advertised, yet {e:?}"))
            }
            (false, Err(e)) if e.code() != Code::Unimplemented => {
                self.fail(check, format!("{part} not advertised, yet {e:?}"))
            }
            _ => {}
        }
    }

    async fn volumes_are_idempotent_by_name(&mut self) {
        let check = "volumes are idempotent by name";
        let name = self.fresh("idem");
        let size = self.subject.volume_size();
        let r = self.subject.create(&name, size, self.cap(Mode::SingleNodeWriter, false));
        let first = self.c.create_volume(r.clone()).await.unwrap().into_inner().volume.unwrap();
        let again = self.c.create_volume(r).await.unwrap().into_inner().volume.unwrap();
        if again.volume_id != first.volume_id || again.capacity_bytes != first.capacity_bytes {
            self.fail(check, format!("a retry answered {again:?}, not {first:?}"));
        }
        if first.capacity_bytes < size {
            self.fail(check, format!("{} bytes, less than the {size} asked", first.capacity_bytes));
        }
        let bigger = self.subject.create(&name, 4 * size, self.cap(Mode::SingleNodeWriter, false));
        match self.c.create_volume(bigger).await {
            Err(e) if e.code() == Code::AlreadyExists => {}
            other => self.fail(check, format!("the same name, 4x the size: {other:?}")),
        }
        self.delete(&first.volume_id).await;
        self.delete(&first.volume_id).await;
        let validate = csi::ValidateVolumeCapabilitiesRequest {
            volume_id: first.volume_id.clone(),
            volume_capabilities: vec![self.cap(Mode::SingleNodeWriter, false)],
            ..Default::default()
        };
        match self.c.validate_volume_capabilities(validate).await {
            Err(e) if e.code() == Code::NotFound => {}
            other => self.fail(check, format!("a deleted volume validated: {other:?}")),
        }
        if self.has(Cap::GetVolume) {
            let get = csi::ControllerGetVolumeRequest { volume_id: first.volume_id.clone() };
            match self.c.controller_get_volume(get).await {
                Err(e) if e.code() == Code::NotFound => {}
                other => self.fail(check, format!("a deleted volume was got: {other:?}")),
            }
        }
    }

    async fn listings_page_through_every_volume(&mut self) {
        let check = "listings page";
        let mut made = Vec::new();
        for _ in 0..3 {
            made.push(self.create("list", self.cap(Mode::SingleNodeWriter, false)).await.volume_id);
        }
        let (mut seen, mut token) = (Vec::new(), String::new());
        for _ in 0..100 {
            let page = self
                .c
                .list_volumes(csi::ListVolumesRequest { max_entries: 1, starting_token: token })
                .await
                .unwrap_or_else(|e| self.fail(check, format!("{e:?}")))
                .into_inner();
            if page.entries.len() > 1 {
                self.fail(check, format!("{} entries on a page of 1", page.entries.len()));
            }
            seen.extend(page.entries.into_iter().map(|e| e.volume.unwrap().volume_id));
            token = page.next_token;
            if token.is_empty() {
                break;
            }
        }
        for id in &made {
            if seen.iter().filter(|s| *s == id).count() != 1 {
                self.fail(
                    check,
                    format!(
                        "{id} listed {} times in {seen:?}",
                        seen.iter().filter(|s| *s == id).count()
                    ),
                );
            }
        }
        let foreign = csi::ListVolumesRequest {
            max_entries: 1,
            starting_token: "conf-not-a-token-of-ours".into(),
        };
        match self.c.list_volumes(foreign).await {
            Err(e) if e.code() == Code::Aborted => {}
            other => self.fail(check, format!("a foreign token: {other:?}")),
        }
        for id in made {
            self.delete(&id).await;
        }
    }

    async fn snapshots_restores_and_clones_where_offered(&mut self) {
        let check = "snapshots, restores and clones";
        let source = self.create("snapsrc", self.cap(Mode::SingleNodeWriter, false)).await;
        if self.has(Cap::CreateDeleteSnapshot) {
            let name = self.fresh("snap");
            let r = csi::CreateSnapshotRequest {
                name: name.clone(),
                source_volume_id: source.volume_id.clone(),
                secrets: self.subject.secrets(),
                ..Default::default()
            };
            let snap =
                self.c.create_snapshot(r.clone()).await.unwrap().into_inner().snapshot.unwrap();
            let again = self.c.create_snapshot(r).await.unwrap().into_inner().snapshot.unwrap();
            if again.snapshot_id != snap.snapshot_id || snap.source_volume_id != source.volume_id {
                self.fail(check, format!("{again:?} after {snap:?}"));
            }
            let other = self.create("snapother", self.cap(Mode::SingleNodeWriter, false)).await;
            let clash = csi::CreateSnapshotRequest {
                name,
                source_volume_id: other.volume_id.clone(),
                secrets: self.subject.secrets(),
                ..Default::default()
            };
            match self.c.create_snapshot(clash).await {
                Err(e) if e.code() == Code::AlreadyExists => {}
                other => self.fail(check, format!("the same name, another source: {other:?}")),
            }
            let listed = self
                .c
                .list_snapshots(csi::ListSnapshotsRequest {
                    snapshot_id: snap.snapshot_id.clone(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .entries;
            if listed.len() != 1 {
                self.fail(check, format!("listing by id found {listed:?}"));
            }
            let restore = self.create_from("restore", from_snapshot(&snap.snapshot_id));
            let restored = self.create_copy(restore).await;
            let restored = restored.unwrap_or_else(|e| self.fail(check, format!("restore: {e:?}")));
            let restored = restored.into_inner().volume.unwrap();
            self.delete(&restored.volume_id).await;
            let delete = csi::DeleteSnapshotRequest {
                snapshot_id: snap.snapshot_id.clone(),
                secrets: self.subject.secrets(),
            };
            self.c.delete_snapshot(delete.clone()).await.unwrap();
            self.c.delete_snapshot(delete).await.expect("deleting again: OK");
            if self.has(Cap::GetSnapshot) {
                let get =
                    csi::GetSnapshotRequest { snapshot_id: snap.snapshot_id, ..Default::default() };
                match self.c.get_snapshot(get).await {
                    Err(e) if e.code() == Code::NotFound => {}
                    other => self.fail(check, format!("a deleted snapshot: {other:?}")),
                }
            }
            self.delete(&other.volume_id).await;
        } else {
            // Without snapshots, nothing restores from one.
            let restore = self.create_from("restore", from_snapshot("conf-snap"));
            match self.c.create_volume(restore).await {
                Err(e) if matches!(e.code(), Code::InvalidArgument | Code::NotFound) => {}
                other => self.fail(check, format!("a restore without snapshots: {other:?}")),
            }
        }
        if self.has(Cap::CloneVolume) {
            let clone = self.create_from(
                "clone",
                csi::volume_content_source::Type::Volume(
                    csi::volume_content_source::VolumeSource {
                        volume_id: source.volume_id.clone(),
                    },
                ),
            );
            let cloned = self.create_copy(clone).await;
            let cloned = cloned.unwrap_or_else(|e| self.fail(check, format!("clone: {e:?}")));
            self.delete(&cloned.into_inner().volume.unwrap().volume_id).await;
        } else {
            // Without CLONE_VOLUME, nothing is made from a volume.
            let clone = self.create_from(
                "clone",
                csi::volume_content_source::Type::Volume(
                    csi::volume_content_source::VolumeSource {
                        volume_id: source.volume_id.clone(),
                    },
                ),
            );
            match self.c.create_volume(clone).await {
                Err(e) if e.code() == Code::InvalidArgument => {}
                other => self.fail(check, format!("a clone without CLONE_VOLUME: {other:?}")),
            }
        }
        self.delete(&source.volume_id).await;
    }

    /// Raw block volumes exist where the engine offers them, and only
    /// there; published read-only, they refuse writes.
    async fn raw_block_where_offered(&mut self) {
        let check = "raw block";
        let name = self.fresh("block");
        let r = self.subject.create(
            &name,
            self.subject.volume_size(),
            self.cap(Mode::SingleNodeWriter, true),
        );
        let volume = match self.c.create_volume(r).await {
            Err(e) if e.code() == Code::InvalidArgument => {
                eprintln!("conformance[{}]: no raw block volumes ({})", self.name, e.message());
                return;
            }
            Err(e) => self.fail(check, format!("{e:?}")),
            Ok(v) => v.into_inner().volume.unwrap(),
        };
        if self.node.is_some() {
            let block = self.cap(Mode::SingleNodeWriter, true);
            let (staging, rw) = self.stage_and_publish(&volume, block.clone(), "blk", false).await;
            let ro = self.publish_at(&volume, &staging, block, "blk-ro", true).await;
            let refused = |e: &std::io::Error| {
                matches!(e.raw_os_error(), Some(libc::EROFS | libc::EPERM | libc::EACCES))
            };
            let wrote = std::fs::OpenOptions::new()
                .write(true)
                .open(&ro)
                .and_then(|dev| dev.write_at(&[0xCD; 4096], 0).and_then(|_| dev.sync_all()));
            match wrote {
                Err(e) if refused(&e) => {}
                other => {
                    self.fail(check, format!("a write through a read-only publish: {other:?}"))
                }
            }
            {
                let dev = std::fs::OpenOptions::new().write(true).open(&rw).unwrap();
                dev.write_at(&[0xAB; 4096], 0).unwrap();
                dev.sync_all().unwrap();
            }
            let mut back = [0u8; 4096];
            std::fs::File::open(&ro).unwrap().read_at(&mut back, 0).unwrap();
            if back != [0xAB; 4096] {
                self.fail(check, "the read-only publish does not show the writer's bytes");
            }
            self.unpublish(&volume.volume_id, &ro).await;
            self.unpublish(&volume.volume_id, &rw).await;
            self.unstage(&volume, &staging).await;
        }
        self.delete(&volume.volume_id).await;
    }

    fn paths(&self, pv: &str, pod: &str) -> (PathBuf, PathBuf) {
        let dir = &self.node.as_ref().unwrap().1;
        let staging = dir.join("plugins/kubernetes.io/csi/pv").join(pv).join("globalmount");
        let target_dir = dir.join("pods").join(pod).join("volumes/kubernetes.io~csi").join(pv);
        std::fs::create_dir_all(&staging).unwrap();
        std::fs::create_dir_all(&target_dir).unwrap();
        (staging, target_dir.join("mount"))
    }

    /// ControllerPublish (where the engine attaches), stage (twice), and a
    /// publish at a pod's target.
    async fn stage_and_publish(
        &mut self,
        volume: &csi::Volume,
        cap: csi::VolumeCapability,
        pv: &str,
        read_only: bool,
    ) -> (PathBuf, PathBuf) {
        let check = "stage";
        let pv = self.fresh(pv);
        let (staging, _) = self.paths(&pv, "none");
        let mut publish_context = HashMap::new();
        if self.has(Cap::PublishUnpublishVolume) {
            let r = csi::ControllerPublishVolumeRequest {
                volume_id: volume.volume_id.clone(),
                node_id: self.node_id.clone(),
                volume_capability: Some(cap.clone()),
                volume_context: volume.volume_context.clone(),
                secrets: self.subject.secrets(),
                ..Default::default()
            };
            publish_context =
                self.c.controller_publish_volume(r).await.unwrap().into_inner().publish_context;
        }
        let stage = csi::NodeStageVolumeRequest {
            volume_id: volume.volume_id.clone(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(cap.clone()),
            volume_context: volume.volume_context.clone(),
            publish_context,
            secrets: self.subject.secrets(),
        };
        let (n, _) = self.node.as_mut().unwrap();
        let first = n.node_stage_volume(stage.clone()).await;
        let again = n.node_stage_volume(stage).await;
        if let Err(e) = first.and(again) {
            self.fail(check, format!("{}: {e:?}", volume.volume_id));
        }
        let target = self.publish_at(volume, &staging, cap, &pv, read_only).await;
        (staging, target)
    }

    async fn publish_at(
        &mut self,
        volume: &csi::Volume,
        staging: &Path,
        cap: csi::VolumeCapability,
        pod: &str,
        read_only: bool,
    ) -> PathBuf {
        let pod = self.fresh(pod);
        let (_, target) = self.paths("pv", &pod);
        let r = csi::NodePublishVolumeRequest {
            volume_id: volume.volume_id.clone(),
            staging_target_path: staging.display().to_string(),
            target_path: target.display().to_string(),
            volume_capability: Some(cap),
            readonly: read_only,
            volume_context: volume.volume_context.clone(),
            ..Default::default()
        };
        let (n, _) = self.node.as_mut().unwrap();
        let first = n.node_publish_volume(r.clone()).await;
        let again = n.node_publish_volume(r).await;
        if let Err(e) = first.and(again) {
            self.fail("publish", format!("{} at {}: {e:?}", volume.volume_id, target.display()));
        }
        target
    }

    async fn unpublish(&mut self, volume_id: &str, target: &Path) {
        let r = csi::NodeUnpublishVolumeRequest {
            volume_id: volume_id.into(),
            target_path: target.display().to_string(),
        };
        let (n, _) = self.node.as_mut().unwrap();
        let first = n.node_unpublish_volume(r.clone()).await;
        let again = n.node_unpublish_volume(r).await;
        if let Err(e) = first.and(again) {
            self.fail("unpublish", format!("{volume_id}: {e:?}"));
        }
        if target.exists() {
            self.fail("unpublish", format!("{} is still there", target.display()));
        }
    }

    async fn unstage(&mut self, volume: &csi::Volume, staging: &Path) {
        let r = csi::NodeUnstageVolumeRequest {
            volume_id: volume.volume_id.clone(),
            staging_target_path: staging.display().to_string(),
        };
        let (n, dir) = self.node.as_mut().unwrap();
        let dir = dir.clone();
        let first = n.node_unstage_volume(r.clone()).await;
        let again = n.node_unstage_volume(r).await;
        if let Err(e) = first.and(again) {
            self.fail("unstage", format!("{}: {e:?}", volume.volume_id));
        }
        if self.has(Cap::PublishUnpublishVolume) {
            let r = csi::ControllerUnpublishVolumeRequest {
                volume_id: volume.volume_id.clone(),
                node_id: self.node_id.clone(),
                secrets: self.subject.secrets(),
            };
            self.c.controller_unpublish_volume(r).await.unwrap();
        }
        let left: Vec<_> = ferrovol_host::node::mountinfo::read()
            .unwrap()
            .into_iter()
            .filter(|m| m.mount_point.starts_with(&dir))
            .map(|m| m.mount_point)
            .collect();
        if !left.is_empty() {
            self.fail("unstage", format!("mounts left under the kubelet dir: {left:?}"));
        }
    }

    async fn stats(&mut self, volume_id: &str, path: &Path) -> csi::NodeGetVolumeStatsResponse {
        let r = csi::NodeGetVolumeStatsRequest {
            volume_id: volume_id.into(),
            volume_path: path.display().to_string(),
            ..Default::default()
        };
        let (n, _) = self.node.as_mut().unwrap();
        match n.node_get_volume_stats(r).await {
            Ok(s) => s.into_inner(),
            Err(e) => self.fail("stats", format!("{volume_id} at {}: {e:?}", path.display())),
        }
    }

    /// A filesystem volume through its whole node life: staged and
    /// published twice each, written, published read-only beside (writes
    /// refused, the writer's data seen), measured, and taken back.
    async fn stage_publish_and_back(&mut self) {
        let check = "stage, publish and back";
        let fs = self.cap(Mode::SingleNodeWriter, false);
        let volume = self.create("node", fs.clone()).await;
        let (staging, rw) = self.stage_and_publish(&volume, fs.clone(), "fs", false).await;
        std::fs::write(rw.join("data"), b"written by the pod").unwrap();
        let ro = self.publish_at(&volume, &staging, fs.clone(), "fs-ro", true).await;
        match std::fs::write(ro.join("other"), b"x") {
            Err(e) if e.raw_os_error() == Some(libc::EROFS) => {}
            other => self.fail(check, format!("a write to a read-only publish: {other:?}")),
        }
        if std::fs::read(ro.join("data")).ok().as_deref() != Some(b"written by the pod".as_ref()) {
            self.fail(check, "the read-only publish does not show the writer's file");
        }
        let stats = self.stats(&volume.volume_id, &rw).await;
        let bytes = stats.usage.iter().find(|u| u.unit == csi::volume_usage::Unit::Bytes as i32);
        match bytes {
            Some(u) if u.total > 0 && u.used >= 0 && u.available <= u.total => {}
            other => self.fail(check, format!("stats: {other:?} in {stats:?}")),
        }
        let r = csi::NodeUnstageVolumeRequest {
            volume_id: volume.volume_id.clone(),
            staging_target_path: staging.display().to_string(),
        };
        let (n, _) = self.node.as_mut().unwrap();
        match n.node_unstage_volume(r).await {
            Err(e) if e.code() == Code::FailedPrecondition => {}
            other => self.fail(check, format!("unstage while published: {other:?}")),
        }
        self.unpublish(&volume.volume_id, &ro).await;
        self.unpublish(&volume.volume_id, &rw).await;
        self.unstage(&volume, &staging).await;
        self.delete(&volume.volume_id).await;
    }

    /// Expansion as the capabilities direct (the controller, then the node
    /// where it asks; the node alone), after which the pod sees the size.
    async fn expansion_reaches_the_pod(&mut self) {
        let check = "expansion";
        let by_controller = self.has(Cap::ExpandVolume);
        let by_node = self.node_caps.contains(&NodeCap::ExpandVolume);
        if !by_controller && !by_node {
            return;
        }
        let fs = self.cap(Mode::SingleNodeWriter, false);
        let volume = self.create("grow", fs.clone()).await;
        let (staging, target) = self.stage_and_publish(&volume, fs.clone(), "grow", false).await;
        let before = self.stats(&volume.volume_id, &target).await.usage[0].total;
        let wanted = 2 * volume.capacity_bytes;
        let range = Some(csi::CapacityRange { required_bytes: wanted, limit_bytes: 0 });
        let mut node_step = !by_controller;
        if by_controller {
            let r = csi::ControllerExpandVolumeRequest {
                volume_id: volume.volume_id.clone(),
                capacity_range: range,
                volume_capability: Some(fs.clone()),
                secrets: self.subject.secrets(),
            };
            let grown = self.c.controller_expand_volume(r).await.unwrap().into_inner();
            if grown.capacity_bytes < wanted {
                self.fail(check, format!("{} bytes after asking {wanted}", grown.capacity_bytes));
            }
            if grown.node_expansion_required && !by_node {
                self.fail(check, "the node must take a step it does not advertise");
            }
            node_step = grown.node_expansion_required;
        }
        if node_step {
            let r = csi::NodeExpandVolumeRequest {
                volume_id: volume.volume_id.clone(),
                volume_path: target.display().to_string(),
                capacity_range: range,
                staging_target_path: staging.display().to_string(),
                volume_capability: Some(fs.clone()),
                ..Default::default()
            };
            let (n, _) = self.node.as_mut().unwrap();
            let grown = n.node_expand_volume(r).await;
            let grown = grown.unwrap_or_else(|e| self.fail(check, format!("node: {e:?}")));
            if grown.into_inner().capacity_bytes < wanted {
                self.fail(check, "the node answered less than asked");
            }
        }
        let after = self.stats(&volume.volume_id, &target).await.usage[0].total;
        // The filesystem's own overhead differs; growth by most of the
        // added size shows.
        if after < before + (wanted - volume.capacity_bytes) / 2 {
            self.fail(
                check,
                format!("the pod sees {after} bytes, {before} before growing to {wanted}"),
            );
        }
        self.unpublish(&volume.volume_id, &target).await;
        self.unstage(&volume, &staging).await;
        self.delete(&volume.volume_id).await;
    }
}
