//! The CSI gRPC services. Each one turns wire requests into calls on the
//! storage engine, through [`crate::rpc::handle`] so that every call is
//! traced the same way.

pub mod controller;
pub mod convert;
pub mod identity;
pub mod node;
pub mod validate;

use std::path::PathBuf;
use std::sync::Arc;

use crate::cli::Mode;
use crate::engine::Engine;
use crate::locks::OpLocks;

/// Freezes the filesystem of a volume that is staged on this node, so that a
/// snapshot taken while the guard lives holds a clean filesystem. None when
/// the volume is not attached here, or attached only as a raw block device
/// (nothing to quiesce: the snapshot is crash-consistent).
pub async fn quiesce(
    engine: &dyn Engine,
    volume_id: &str,
) -> crate::error::Result<Option<crate::node::freeze::Frozen>> {
    use crate::error::{failed_precondition, Error};
    let Some(device) = engine.attached_device(volume_id).await? else { return Ok(None) };
    tokio::task::spawn_blocking(move || {
        let mounts =
            crate::node::mountinfo::read().map_err(|e| Error::io("reading mountinfo", e))?;
        let ours = crate::node::mountinfo::mounts_of_device(&mounts, &device)
            .map_err(|e| Error::io(format!("inspecting {}", device.display()), e))?;
        let Some(fs_mount) =
            ours.iter().find(|m| !matches!(m.fs_type.as_str(), "devtmpfs" | "tmpfs"))
        else {
            return Ok(None);
        };
        crate::node::freeze::Frozen::freeze(&fs_mount.mount_point).map(Some).map_err(|e| {
            failed_precondition(format!("cannot freeze {}: {e}", fs_mount.mount_point.display()))
        })
    })
    .await
    .map_err(|e| crate::error::internal(e.to_string()))?
}

/// What every service needs to know about this driver instance.
pub struct Driver {
    pub name: String,
    pub node_id: String,
    pub mode: Mode,
    pub state_dir: PathBuf,
    pub engine: Arc<dyn Engine>,
    /// Shared by all services: a node operation and a controller operation
    /// on the same volume exclude each other too.
    pub locks: OpLocks,
}
