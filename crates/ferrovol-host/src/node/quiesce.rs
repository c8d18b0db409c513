//! Quiescing the filesystems of attached devices for a snapshot's instant:
//! found from the kernel's mount table, flushed while writers still run,
//! frozen side by side, thawed by guards on every path. Engine-agnostic:
//! a node half hands in the devices its volumes are attached as.

use std::path::{Path, PathBuf};

use crate::error::{self, Error, Result};
use crate::node::freeze::Frozen;
use crate::node::mountinfo::{self, MountEntry};

/// Freezes what [`prepare`] found and answers a guard that thaws it when
/// dropped. The controller half calls it after every slow preparation and
/// right before the first copy-on-write clone, and drops the guard right
/// after the last, so the window is the clones alone.
pub type Quiesce = Box<dyn FnOnce() -> Result<Box<dyn Send>> + Send>;

/// Every mount of `device` (filesystem mounts and bind mounts of the device
/// node), from the kernel's mount table.
pub fn mounts_of(device: &Path) -> Result<Vec<MountEntry>> {
    let all = mountinfo::read().map_err(|e| Error::io("reading mountinfo", e))?;
    let of = mountinfo::mounts_of_device(&all, device)
        .map_err(|e| Error::io(format!("inspecting {}", device.display()), e))?;
    Ok(of.into_iter().cloned().collect())
}

/// The first mount among `mounts` that is a filesystem (not a bind of the
/// device node onto devtmpfs or tmpfs).
pub fn filesystem_mount(mounts: &[MountEntry]) -> Option<&MountEntry> {
    mounts.iter().find(|m| !matches!(m.fs_type.as_str(), "devtmpfs" | "tmpfs"))
}

/// Finds what to freeze for volumes attached as `devices` (volume ID, its
/// device here if attached), flushes it, and answers the freeze. A volume
/// not attached here has no writer through this node; one attached only as
/// a raw block device cannot be quiesced, which `strict` refuses.
pub async fn prepare(devices: Vec<(String, Option<PathBuf>)>, strict: bool) -> Result<Quiesce> {
    let mounts = tokio::task::spawn_blocking(move || {
        let mut mounts = Vec::new();
        for (id, device) in devices {
            let Some(device) = device else { continue };
            let of = mounts_of(&device)?;
            match filesystem_mount(&of) {
                Some(fs) => mounts.push(fs.mount_point.clone()),
                None if strict && !of.is_empty() => {
                    return Err(error::failed_precondition(format!(
                        "volume {id} is attached as a raw block device and cannot be quiesced; \
                         a group snapshot would not be consistent"
                    )))
                }
                // Raw block or idle: crash-consistent, as a power cut would
                // leave it.
                None => {}
            }
        }
        presync(&mounts);
        Ok(mounts)
    })
    .await
    .map_err(|e| error::internal(e.to_string()))??;
    Ok(Box::new(move || freeze_all(&mounts).map(|held| Box::new(held) as Box<dyn Send>)))
}

/// Flushes every filesystem in `mounts` at once, while writers still run:
/// the freezes that follow then have almost nothing left to write, which
/// keeps the frozen window short.
pub fn presync(mounts: &[PathBuf]) {
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
pub fn freeze_all(mounts: &[PathBuf]) -> Result<Vec<Frozen>> {
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = mounts.iter().map(|m| s.spawn(move || Frozen::freeze(m))).collect();
        handles.into_iter().map(|h| h.join()).collect()
    });
    // Collecting into a Result drops (thaws) whatever did freeze if any
    // member failed.
    results
        .into_iter()
        .zip(mounts)
        .map(|(r, m)| match r {
            Ok(Ok(frozen)) => Ok(frozen),
            Ok(Err(e)) => {
                Err(error::failed_precondition(format!("cannot freeze {}: {e}", m.display())))
            }
            Err(_) => Err(error::internal(format!("freezing {} panicked", m.display()))),
        })
        .collect()
}

/// A driver that died inside a snapshot's freeze window left that
/// filesystem frozen, and every writer in the pod hanging: thaws the
/// filesystem of every device given; answers the mounts it thawed.
pub fn thaw_left_frozen(devices: &[PathBuf]) -> Vec<PathBuf> {
    let Ok(mounts) = mountinfo::read() else { return Vec::new() };
    let mut thawed = Vec::new();
    for device in devices {
        let Ok(of) = mountinfo::mounts_of_device(&mounts, device) else { continue };
        let of: Vec<MountEntry> = of.into_iter().cloned().collect();
        // One filesystem mount per device suffices: its binds share the
        // superblock.
        if let Some(m) = filesystem_mount(&of) {
            match crate::node::freeze::thaw_if_frozen(&m.mount_point) {
                Ok(true) => thawed.push(m.mount_point.clone()),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(mount = %m.mount_point.display(), error = %e, "cannot thaw")
                }
            }
        }
    }
    thawed
}
