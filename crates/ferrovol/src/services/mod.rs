//! The CSI gRPC services. Each one turns wire requests into calls on the
//! storage engine, through [`crate::rpc::handle`] so that every call is
//! traced the same way.

pub mod controller;
pub mod convert;
pub mod group_controller;
pub mod identity;
pub mod node;
pub mod snapshot_metadata;
pub mod validate;

use std::path::PathBuf;
use std::sync::Arc;

use crate::cli::Mode;
use crate::engine::Engine;
use crate::locks::OpLocks;

/// How a volume is held on this node, for quiescing it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    /// Not attached here: nobody writes to it through this node.
    Idle,
    /// Its filesystem is mounted here (first mount point).
    Filesystem(std::path::PathBuf),
    /// Attached as a raw block device only: nothing we can quiesce.
    RawBlock,
}

/// The device a volume is attached as on this node, if any, and every mount
/// of it (filesystem mounts and bind mounts of the device node), from the
/// kernel's mount table.
pub async fn volume_mounts(
    engine: &dyn Engine,
    volume_id: &str,
) -> crate::error::Result<(Option<std::path::PathBuf>, Vec<crate::node::mountinfo::MountEntry>)> {
    use crate::error::Error;
    let Some(device) = engine.attached_device(volume_id).await? else { return Ok((None, vec![])) };
    let dev = device.clone();
    let mounts = tokio::task::spawn_blocking(move || {
        let all = crate::node::mountinfo::read().map_err(|e| Error::io("reading mountinfo", e))?;
        let of = crate::node::mountinfo::mounts_of_device(&all, &dev)
            .map_err(|e| Error::io(format!("inspecting {}", dev.display()), e))?;
        Ok::<_, Error>(of.into_iter().cloned().collect())
    })
    .await
    .map_err(|e| crate::error::internal(e.to_string()))??;
    Ok((Some(device), mounts))
}

/// Finds how the volume is held on this node.
pub async fn holder(engine: &dyn Engine, volume_id: &str) -> crate::error::Result<Holder> {
    let (device, mounts) = volume_mounts(engine, volume_id).await?;
    Ok(match mounts.iter().find(|m| !matches!(m.fs_type.as_str(), "devtmpfs" | "tmpfs")) {
        Some(fs) => Holder::Filesystem(fs.mount_point.clone()),
        None if device.is_none() || mounts.is_empty() => Holder::Idle,
        None => Holder::RawBlock,
    })
}

/// Flushes every filesystem in `mounts` at once, while writers still run:
/// the freezes that follow then have almost nothing left to write, which
/// keeps the frozen window short.
pub fn presync(mounts: &[std::path::PathBuf]) {
    std::thread::scope(|s| {
        for m in mounts {
            s.spawn(move || {
                if let Ok(f) = std::fs::File::open(m) {
                    crate::node::freeze::prepare(&f);
                }
            });
        }
    });
}

/// Freezes every filesystem in `mounts`; the guards thaw them when dropped
/// (on success, error or panic alike). The freezes run side by side: each
/// one waits out kernel grace periods (tens of milliseconds when the
/// filesystem was not frozen recently), and in parallel the group pays
/// that once instead of once per member.
pub fn freeze_all(
    mounts: &[std::path::PathBuf],
) -> crate::error::Result<Vec<crate::node::freeze::Frozen>> {
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = mounts
            .iter()
            .map(|m| s.spawn(move || crate::node::freeze::Frozen::freeze(m)))
            .collect();
        handles.into_iter().map(|h| h.join()).collect()
    });
    // Collecting into a Result drops (thaws) whatever did freeze if any
    // member failed.
    results
        .into_iter()
        .zip(mounts)
        .map(|(r, m)| match r {
            Ok(Ok(frozen)) => Ok(frozen),
            Ok(Err(e)) => Err(crate::error::failed_precondition(format!(
                "cannot freeze {}: {e}",
                m.display()
            ))),
            Err(_) => Err(crate::error::internal(format!("freezing {} panicked", m.display()))),
        })
        .collect()
}

/// What every service needs to know about this driver instance.
pub struct Driver {
    pub name: String,
    pub node_id: String,
    pub mode: Mode,
    pub state_dir: PathBuf,
    /// Keeps writing to the state dir in the background, for Probe.
    pub state_writes: Arc<crate::fsutil::WriteMonitor>,
    pub engine: Arc<dyn Engine>,
    /// Shared by all services: a node operation and a controller operation
    /// on the same volume exclude each other too.
    pub locks: OpLocks,
}
