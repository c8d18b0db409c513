//! The node half of the in-memory engine's shared-filesystem shape: a
//! volume is staged as a tmpfs of its size (no block device anywhere), found
//! again in the kernel's mount table by its source name, and grown by the
//! controller with a remount (a quota the pod sees at once). It proves the
//! core serves a filesystem engine: publish, stats, read-only and
//! controller-only expansion with nothing but a [`NodeEngine`].

use std::path::Path;
use std::sync::Arc;

use ferrovol_core::engine::{
    Condition, Features, MountEntry, NodeEngine, Stage, Topology, VolumeView,
};
use ferrovol_core::error::{self, Error, Result};
use ferrovol_host::node::beneath::Beneath;
use ferrovol_host::node::{fs as nodefs, mountinfo};
use ferrovol_host::offload::{self, NODE_WORK, QUICK};

use crate::mem::MemEngine;

/// The `fs_type` of the shape's volumes.
pub const FS_TYPE: &str = "memfs";

/// The source name a volume's tmpfs is mounted with: how its mounts are
/// found again.
fn source(volume_id: &str) -> String {
    format!("memfs:{volume_id}")
}

pub struct MemFsNode {
    engine: Arc<MemEngine>,
}

impl MemFsNode {
    pub fn new(engine: Arc<MemEngine>) -> MemFsNode {
        MemFsNode { engine }
    }
}

fn mounts_of(volume_id: &str) -> Result<Vec<MountEntry>> {
    let all = mountinfo::read().map_err(|e| Error::io("reading the mount table", e))?;
    let name = source(volume_id);
    Ok(all.into_iter().filter(|m| m.fs_type == "tmpfs" && m.source == name).collect())
}

/// Sets the size of a staged volume's tmpfs (nothing to do where it is not
/// staged).
pub(crate) fn resize(volume_id: &str, bytes: u64) -> Result<()> {
    use rustix::mount::{mount_remount, MountFlags};
    let Some(stage) = mounts_of(volume_id)?.into_iter().next() else { return Ok(()) };
    mount_remount(
        &stage.mount_point,
        MountFlags::NODEV | MountFlags::NOSUID,
        format!("size={bytes}"),
    )
    .map_err(|e| error::internal(format!("resizing {}: {e}", stage.mount_point.display())))
}

#[tonic::async_trait]
impl NodeEngine for MemFsNode {
    fn kind(&self) -> &'static str {
        "mem"
    }

    fn features(&self) -> Features {
        crate::mem::features(crate::mem::Shape::SharedFs)
    }

    fn topology(&self) -> Topology {
        Topology::new()
    }

    async fn health(&self) -> Result<()> {
        Ok(())
    }

    async fn check_known(&self, volume_id: &str) -> Result<()> {
        self.engine.volume_size(volume_id).map(drop)
    }

    async fn stage(&self, request: &Stage) -> Result<()> {
        let id = request.volume.volume_id.clone();
        let size = self.engine.volume_size(&id)?;
        let (kubelet, staging) = (request.kubelet_dir.clone(), request.staging.clone());
        let mut flags = request.mount_flags.clone();
        flags.push(format!("size={size}"));
        let read_only = request.volume.read_only;
        offload::run("mounting", NODE_WORK, move || {
            if mounts_of(&id)?.iter().any(|m| m.mount_point == staging) {
                return Ok(()); // staged here already
            }
            let all = mountinfo::read().map_err(|e| Error::io("reading the mount table", e))?;
            if let Some(m) = mountinfo::at(&all, &staging) {
                return Err(error::exists(format!(
                    "staging path {} already holds another mount ({})",
                    staging.display(),
                    m.source
                )));
            }
            let onto = Beneath::open(&kubelet)?.dir(&staging)?;
            nodefs::mount(Path::new(&source(&id)), &onto, "tmpfs", &flags, read_only)
        })
        .await
    }

    /// A tmpfs holds nothing once unmounted.
    async fn release(&self, _volume_id: &str) -> Result<()> {
        Ok(())
    }

    async fn view(&self, volume_id: &str) -> Result<VolumeView> {
        let id = volume_id.to_string();
        let mounts = offload::run("reading the mount table", QUICK, move || mounts_of(&id)).await?;
        Ok(VolumeView { device: None, mounts })
    }

    async fn condition(&self, _volume_id: &str, _staged: &MountEntry) -> Result<Condition> {
        Ok(Condition::Healthy)
    }

    async fn staged(&self) -> Result<Vec<Vec<MountEntry>>> {
        offload::run("reading the mount table", QUICK, || {
            let all = mountinfo::read().map_err(|e| Error::io("reading the mount table", e))?;
            let mut by_volume: std::collections::BTreeMap<String, Vec<MountEntry>> =
                Default::default();
            for m in all.into_iter().filter(|m| m.fs_type == "tmpfs") {
                if m.source.starts_with("memfs:") {
                    by_volume.entry(m.source.clone()).or_default().push(m);
                }
            }
            Ok(by_volume.into_values().collect())
        })
        .await
    }
}
