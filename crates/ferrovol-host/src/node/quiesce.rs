//! Quiescing the filesystems of attached devices for a snapshot's instant:
//! found from the kernel's mount table, flushed while writers still run,
//! frozen side by side, thawed by guards on every path. Engine-agnostic:
//! a node half hands in the devices its volumes are attached as.

use std::collections::BTreeMap;
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
    let mut of: Vec<MountEntry> = Vec::new();
    // The device's own mounts, then those of its read-only publish devices
    // (each a publish of the same volume).
    for dev in
        std::iter::once(device.to_path_buf()).chain(crate::node::read_only::among(&all, device))
    {
        let found = mountinfo::mounts_of_device(&all, &dev)
            .map_err(|e| Error::io(format!("inspecting {}", dev.display()), e))?;
        of.extend(found.into_iter().cloned());
    }
    Ok(of)
}

/// The first mount among `mounts` that is a filesystem (not a bind of the
/// device node onto devtmpfs or tmpfs).
pub fn filesystem_mount(mounts: &[MountEntry]) -> Option<&MountEntry> {
    mounts.iter().find(|m| !matches!(m.fs_type.as_str(), "devtmpfs" | "tmpfs"))
}

/// Finds what to freeze for volumes attached as `devices` (volume ID, its
/// device here if attached), flushes it, and answers the freeze. A volume
/// not attached here has no writer through this node; one attached only as
/// a raw block device cannot be quiesced, which `strict` refuses. A
/// filesystem a [`Held`] freeze holds is already still: it is pinned (kept
/// frozen until this freeze ends) rather than frozen again.
pub async fn prepare(devices: Vec<(String, Option<PathBuf>)>, strict: bool) -> Result<Quiesce> {
    let (mut mounts, already) = flushed_mounts(devices, strict).await?;
    mounts.extend(already);
    Ok(Box::new(move || freeze_or_pin(&mounts, false)))
}

/// Like [`prepare`] (strict), for one node's part of a group snapshot
/// spread over several nodes: every filesystem must be one the group's
/// [`Held`] freeze holds, at the instant of the clones too. A freeze that
/// ended before (its link dropped, its limit passed) is ABORTED, so the
/// part is never taken at an instant of its own.
pub async fn prepare_within_hold(devices: Vec<(String, Option<PathBuf>)>) -> Result<Quiesce> {
    let (fresh, already) = flushed_mounts(devices, true).await?;
    if let Some(m) = fresh.first() {
        return Err(not_held(m));
    }
    Ok(Box::new(move || freeze_or_pin(&already, true)))
}

fn not_held(mount: &Path) -> Error {
    error::busy(format!(
        "{} is not frozen by the group snapshot's freeze across nodes (it ended): retry",
        mount.display()
    ))
}

/// The filesystem mounts of `devices`, flushed while writers still run;
/// those a [`Held`] freeze holds are already still, and answered apart
/// (flushing a frozen filesystem could wait for its thaw).
async fn flushed_mounts(
    devices: Vec<(String, Option<PathBuf>)>,
    strict: bool,
) -> Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    tokio::task::spawn_blocking(move || {
        let mut mounts = Vec::new();
        for (id, device) in devices {
            let Some(device) = device else { continue };
            let of = mounts_of(&device)?;
            match filesystem_mount(&of) {
                Some(fs) => mounts.push(fs.mount_point.clone()),
                None if strict && !of.is_empty() => {
                    return Err(error::precondition(format!(
                        "volume {id} is attached as a raw block device and cannot be quiesced; \
                         a group snapshot would not be consistent"
                    )))
                }
                // Raw block or idle: crash-consistent, as a power cut would
                // leave it.
                None => {}
            }
        }
        let (already, mounts): (Vec<PathBuf>, Vec<PathBuf>) = {
            let held = held();
            mounts.into_iter().partition(|m| held.get(m).is_some_and(|e| !e.released))
        };
        presync(&mounts);
        Ok((mounts, already))
    })
    .await
    .map_err(|e| error::internal(e.to_string()))?
}

/// A filesystem frozen by a [`Held`] freeze in this process.
struct HeldMount {
    /// Kept for its drop, which thaws.
    _frozen: Frozen,
    /// Snapshots cloning under this freeze right now.
    pins: usize,
    /// The [`Held`] freeze ended: thawed when the last pin goes.
    released: bool,
}

static HELD: std::sync::Mutex<BTreeMap<PathBuf, HeldMount>> =
    std::sync::Mutex::new(BTreeMap::new());

fn held() -> std::sync::MutexGuard<'static, BTreeMap<PathBuf, HeldMount>> {
    // A panic elsewhere cannot leave the map half-written: recover it.
    HELD.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Held filesystems a snapshot clones under: they stay frozen until it is
/// dropped, even if their [`Held`] freeze ends meanwhile.
struct Pins(Vec<PathBuf>);

impl Drop for Pins {
    fn drop(&mut self) {
        let mut held = held();
        for m in &self.0 {
            let done = held.get_mut(m).is_some_and(|e| {
                e.pins -= 1;
                e.pins == 0 && e.released
            });
            if done {
                // Dropping the freeze thaws it.
                held.remove(m);
            }
        }
    }
}

/// Pins what a [`Held`] freeze holds and freezes the rest (`within_hold`:
/// refuses the rest instead).
fn freeze_or_pin(mounts: &[PathBuf], within_hold: bool) -> Result<Box<dyn Send>> {
    let (pins, rest) = {
        let mut held = held();
        let mut pins = Pins(Vec::new());
        let mut rest = Vec::new();
        for m in mounts {
            match held.get_mut(m) {
                Some(e) if !e.released => {
                    e.pins += 1;
                    pins.0.push(m.clone());
                }
                _ => rest.push(m.clone()),
            }
        }
        (pins, rest)
    };
    if let (true, Some(m)) = (within_hold, rest.first()) {
        return Err(not_held(m));
    }
    let frozen = freeze_all(&rest)?;
    Ok(Box::new((pins, frozen)))
}

/// A freeze that outlives the call that made it: the first phase of a
/// group snapshot whose members live on several nodes (every node freezes,
/// then every node clones, then every node thaws). While it is held, the
/// snapshots taken here pin its filesystems instead of freezing them;
/// dropping it thaws them once no snapshot is cloning under it.
pub struct Held {
    mounts: Vec<PathBuf>,
    pub frozen_at: std::time::Instant,
}

impl Held {
    /// Flushes and freezes the filesystems of `devices` as [`prepare`]
    /// would; a filesystem another held freeze already holds is ABORTED
    /// (two group snapshots of one volume at once: the later one retries).
    pub async fn freeze(devices: Vec<(String, Option<PathBuf>)>, strict: bool) -> Result<Held> {
        let (mut mounts, already) = flushed_mounts(devices, strict).await?;
        mounts.sort();
        mounts.dedup();
        tokio::task::spawn_blocking(move || {
            let mut held = held();
            if let Some(m) = already.iter().chain(&mounts).find(|m| held.contains_key(*m)) {
                return Err(error::busy(format!(
                    "{} is frozen for another group snapshot",
                    m.display()
                )));
            }
            for (m, frozen) in mounts.iter().zip(freeze_all(&mounts)?) {
                held.insert(m.clone(), HeldMount { _frozen: frozen, pins: 0, released: false });
            }
            Ok(Held { mounts, frozen_at: std::time::Instant::now() })
        })
        .await
        .map_err(|e| error::internal(e.to_string()))?
    }

    pub fn mounts(&self) -> &[PathBuf] {
        &self.mounts
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut held = held();
        for m in &self.mounts {
            let idle = held.get_mut(m).is_some_and(|e| {
                e.released = true;
                e.pins == 0
            });
            if idle {
                held.remove(m);
            }
        }
    }
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
            Ok(Err(e)) => Err(error::precondition(format!("cannot freeze {}: {e}", m.display()))),
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
