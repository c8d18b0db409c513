//! Mapping an RBD image to a block device on this node.
//!
//! - `krbd`: the kernel's RBD driver (`rbd map`); the production default.
//! - `nbd`: `rbd-nbd`, a user-space librbd behind the kernel's NBD driver.
//! - `fuse`: `rbd-fuse` shows the image as a file, attached with a loop
//!   device (direct I/O); for kernels with neither rbd nor nbd.
//!
//! A helper process (rbd-fuse; rbd-nbd forks its own) runs in its own
//! session and outlives a restart of the driver, which finds it again from
//! the kernel: the fuse mount and the loop device bound to its file, under
//! `<state>/rbd/<pool>/<image>`. Unmapping stops it.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferrovol_host::offload::{self, QUICK};
use ferrovol_host::{exec, loopdev};

use crate::error::{self, Error, Result};
use crate::ids::VolumeId;
pub use ferrovol_cephclient::helper::{self, fuse_mounted, io, write_keyfile, Auth};

/// How long a helper may take to show its image, or to exit once unmapped.
const TOOL_TIMEOUT: Duration = Duration::from_secs(60);

/// One way of making an image a block device on this node. Each finds
/// its own mappings again from the kernel and the volume's directory under
/// `<state>/rbd` (made by every map: the record that this driver mapped
/// it), so a restarted driver knows them without a database.
#[tonic::async_trait]
pub trait Mapper: Send + Sync {
    fn name(&self) -> &'static str;

    /// Whether this node can map with it now (what `auto` tries).
    fn available(&self) -> std::result::Result<(), String>;

    /// The device it mapped the volume as here, if it did. Quick: sysfs
    /// and the state dir (never a stat inside a helper's mount).
    fn find(&self, state: &Path, v: &VolumeId) -> Result<Option<PathBuf>>;

    /// Maps the image; answers its device.
    async fn map(&self, state: &Path, v: &VolumeId, auth: &Auth) -> Result<PathBuf>;

    /// Undoes its own mapping of the volume; not mapped by it is fine. A
    /// device still open is FAILED_PRECONDITION and nothing is undone
    /// halfway.
    async fn unmap(&self, state: &Path, v: &VolumeId) -> Result<()>;

    /// Makes `device` show the image's new size (`size` bytes); the
    /// kernel's own drivers follow by themselves.
    async fn refresh(&self, device: &Path, size: u64) -> Result<()> {
        let _ = (device, size);
        Ok(())
    }

    /// What is wrong with its mapping of the volume, if anything (a helper
    /// that stopped). Quick, as `find`.
    fn trouble(&self, state: &Path, v: &VolumeId) -> Option<String> {
        let _ = (state, v);
        None
    }
}

/// `rbd map`: the kernel's RBD driver; the production default.
pub struct Krbd;
/// `rbd-nbd`: a user-space librbd behind the kernel's NBD driver.
pub struct Nbd;
/// `rbd-fuse` and a loop device over its file: for kernels with neither.
pub struct Fuse;

/// Every mapper, in the order `auto` tries them.
pub static MAPPERS: [&dyn Mapper; 3] = [&Krbd, &Nbd, &Fuse];

/// A mapper by the name a StorageClass's `mounter` or `--rbd-mapper` gives.
pub fn by_name(name: &str) -> Option<&'static dyn Mapper> {
    MAPPERS.iter().copied().find(|m| m.name() == name)
}

fn have(p: &str) -> bool {
    Path::new(p).exists()
}

fn tool(t: &str) -> bool {
    helper::installed(t)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Choice {
    /// The first of krbd, nbd, fuse that works here.
    Auto,
    Krbd,
    Nbd,
    Fuse,
}

/// Picks the mapper `--rbd-mapper` names (auto: the first available).
pub fn choose(choice: Choice) -> Result<&'static dyn Mapper> {
    let order: Vec<&'static dyn Mapper> = match choice {
        Choice::Auto => MAPPERS.to_vec(),
        Choice::Krbd => vec![&Krbd],
        Choice::Nbd => vec![&Nbd],
        Choice::Fuse => vec![&Fuse],
    };
    let mut why = vec![];
    for m in order {
        match m.available() {
            Ok(()) => return Ok(m),
            Err(e) => why.push(format!("{}: {e}", m.name())),
        }
    }
    Err(error::precondition(format!("no RBD mapper works on this node ({})", why.join("; "))))
}

/// Where a volume's fuse mapping lives.
pub fn fuse_dir(state: &Path, v: &VolumeId) -> PathBuf {
    state.join("rbd").join(&v.pool).join(&v.image)
}

fn fuse_file(state: &Path, v: &VolumeId) -> PathBuf {
    fuse_dir(state, v).join("mnt").join(&v.image)
}

/// The device a volume is mapped as on this node, by any mapper, and which.
pub fn find(state: &Path, v: &VolumeId) -> Result<Option<(&'static dyn Mapper, PathBuf)>> {
    for m in [&Fuse as &'static dyn Mapper, &Krbd, &Nbd] {
        if let Some(device) = m.find(state, v)? {
            return Ok(Some((m, device)));
        }
    }
    Ok(None)
}

/// The nbd device rbd-nbd mapped the image as, while it is connected (the
/// device is recorded at map time: the kernel's nbd knows no image names).
fn nbd_find(state: &Path, v: &VolumeId) -> Option<PathBuf> {
    let device = std::fs::read_to_string(fuse_dir(state, v).join("nbd-device")).ok()?;
    let device = PathBuf::from(device.trim());
    let name = device.file_name()?.to_string_lossy().into_owned();
    // A connected nbd device has the pid of the process serving it.
    Path::new("/sys/block").join(name).join("pid").exists().then_some(device)
}

/// Where the kernel's RBD driver lists its mapped images.
const KRBD_DEVICES: &str = "/sys/bus/rbd/devices";

/// Every device this node has mapped for the engine: those of the volumes
/// with a directory under `<state>/rbd` (made by every map, whatever the
/// mapper), never another driver's mappings the kernel lists beside ours.
pub fn all(state: &Path) -> Result<Vec<PathBuf>> {
    all_in(state, Path::new(KRBD_DEVICES))
}

fn all_in(state: &Path, krbd_devices: &Path) -> Result<Vec<PathBuf>> {
    let root = state.join("rbd");
    let loops = loopdev::list().map_err(io("reading loop devices"))?;
    let mut out = vec![];
    for pool in std::fs::read_dir(&root).into_iter().flatten().flatten() {
        for image in std::fs::read_dir(pool.path()).into_iter().flatten().flatten() {
            let v = VolumeId {
                pool: pool.file_name().to_string_lossy().into_owned(),
                image: image.file_name().to_string_lossy().into_owned(),
            };
            let file = fuse_file(state, &v);
            out.extend(loops.iter().filter(|a| a.backing == file).map(|a| a.device.clone()));
            out.extend(krbd_find_in(krbd_devices, &v)?);
            out.extend(nbd_find(state, &v));
        }
    }
    Ok(out)
}

fn krbd_find(v: &VolumeId) -> Result<Option<PathBuf>> {
    krbd_find_in(Path::new(KRBD_DEVICES), v)
}

fn krbd_find_in(krbd_devices: &Path, v: &VolumeId) -> Result<Option<PathBuf>> {
    let Ok(entries) = std::fs::read_dir(krbd_devices) else { return Ok(None) };
    for e in entries.flatten() {
        let read = |f: &str| {
            std::fs::read_to_string(e.path().join(f)).unwrap_or_default().trim().to_string()
        };
        if read("pool") == v.pool && read("name") == v.image && read("current_snap") == "-" {
            return Ok(Some(PathBuf::from(format!("/dev/rbd{}", e.file_name().to_string_lossy()))));
        }
    }
    Ok(None)
}

/// `rbd map` or `rbd-nbd map`, with the volume's directory made first (the
/// record that this driver mapped it) and the key written for the tool.
async fn map_with_tool(tool: &str, state: &Path, v: &VolumeId, auth: &Auth) -> Result<PathBuf> {
    let dir = fuse_dir(state, v);
    let (d, a) = (dir.clone(), auth.clone());
    let keyfile = offload::run("preparing the mapping", QUICK, move || {
        std::fs::create_dir_all(&d).map_err(io(format!("creating {}", d.display())))?;
        write_keyfile(&d, &a)
    })
    .await?;
    let mut args: Vec<OsString> = vec!["map".into(), format!("{}/{}", v.pool, v.image).into()];
    args.extend(auth.args(keyfile.as_deref()));
    let out = exec::run(tool, &args, TOOL_TIMEOUT).await;
    if let Some(k) = keyfile {
        let _ = offload::run("removing the key", QUICK, move || Ok(std::fs::remove_file(k))).await;
    }
    Ok(PathBuf::from(out?.stdout.trim()))
}

#[tonic::async_trait]
impl Mapper for Krbd {
    fn name(&self) -> &'static str {
        "krbd"
    }

    fn available(&self) -> std::result::Result<(), String> {
        match () {
            _ if !have("/sys/bus/rbd") => Err("the kernel has no rbd driver (/sys/bus/rbd)".into()),
            _ if !tool("rbd") => Err("rbd is not installed (ceph-common)".into()),
            _ => Ok(()),
        }
    }

    fn find(&self, state: &Path, v: &VolumeId) -> Result<Option<PathBuf>> {
        let _ = state;
        krbd_find(v)
    }

    async fn map(&self, state: &Path, v: &VolumeId, auth: &Auth) -> Result<PathBuf> {
        map_with_tool("rbd", state, v, auth).await
    }

    async fn unmap(&self, _state: &Path, v: &VolumeId) -> Result<()> {
        let vol = v.clone();
        let found = offload::run("finding the mapping", QUICK, move || krbd_find(&vol)).await?;
        match found {
            Some(d) => unmap_device("rbd", d).await,
            None => Ok(()),
        }
    }
}

#[tonic::async_trait]
impl Mapper for Nbd {
    fn name(&self) -> &'static str {
        "nbd"
    }

    fn available(&self) -> std::result::Result<(), String> {
        match () {
            _ if !have("/sys/module/nbd") => Err("the kernel has no nbd driver".into()),
            _ if !tool("rbd-nbd") => Err("rbd-nbd is not installed".into()),
            _ => Ok(()),
        }
    }

    fn find(&self, state: &Path, v: &VolumeId) -> Result<Option<PathBuf>> {
        Ok(nbd_find(state, v))
    }

    /// The kernel's nbd knows no image names: the device is recorded.
    async fn map(&self, state: &Path, v: &VolumeId, auth: &Auth) -> Result<PathBuf> {
        let device = map_with_tool("rbd-nbd", state, v, auth).await?;
        let (dir, dev) = (fuse_dir(state, v), device.clone());
        offload::run("recording the nbd device", QUICK, move || {
            std::fs::write(dir.join("nbd-device"), dev.as_os_str().as_encoded_bytes())
                .map_err(io("recording the nbd device"))
        })
        .await?;
        Ok(device)
    }

    async fn unmap(&self, state: &Path, v: &VolumeId) -> Result<()> {
        let (st, vol) = (state.to_path_buf(), v.clone());
        let found =
            offload::run("finding the mapping", QUICK, move || Ok(nbd_find(&st, &vol))).await?;
        match found {
            Some(d) => unmap_device("rbd-nbd", d).await,
            None => Ok(()),
        }
    }
}

/// `rbd unmap` / `rbd-nbd unmap`; a device still open is the caller's to
/// close first.
async fn unmap_device(tool: &str, device: PathBuf) -> Result<()> {
    let shown = device.display().to_string();
    exec::run(tool, ["unmap".into(), device.into_os_string()], TOOL_TIMEOUT).await.map_err(
        |e| {
            error::precondition(format!(
                "unmapping {shown} failed (still open? retry once it is closed): {}",
                e.message()
            ))
        },
    )?;
    Ok(())
}

async fn map_fuse(state: &Path, v: &VolumeId, auth: &Auth) -> Result<PathBuf> {
    let dir = fuse_dir(state, v);
    let mnt = dir.join("mnt");
    let file = fuse_file(state, v);
    let (m, d, a) = (mnt.clone(), dir.clone(), auth.clone());
    let prepared = offload::run("preparing the rbd-fuse mount", QUICK, move || {
        if fuse_mounted(&m)? {
            return Ok(None);
        }
        std::fs::create_dir_all(&m).map_err(io(format!("creating {}", m.display())))?;
        write_keyfile(&d, &a).map(Some)
    })
    .await?;
    if let Some(keyfile) = prepared {
        let mut args = auth.args(keyfile.as_deref());
        args.extend([
            "-f".into(),
            "-p".into(),
            v.pool.clone().into(),
            "-r".into(),
            v.image.clone().into(),
            mnt.clone().into(),
        ]);
        let start = helper::Start {
            program: "rbd-fuse",
            args,
            dir: &dir,
            what: format!("{}/{}", v.pool, v.image),
        };
        let (m, f) = (mnt.clone(), file.clone());
        // Whether the helper shows the image yet: a stat inside its mount,
        // which blocks while the helper does (run off the executor, bounded).
        helper::start(start, &mnt, move || Ok(fuse_mounted(&m)? && f.exists())).await?;
    }
    if let Some(a) = loopdev::find(&file).map_err(io("reading loop devices"))?.into_iter().next() {
        return Ok(a.device);
    }
    let f = file.clone();
    crate::blocking(move || {
        loopdev::attach(&f, false, loopdev::VOLUME_BLOCK_SIZE)
            .map_err(|e| e.into_error(format!("attaching {}", f.display())))
    })
    .await
}

/// Unmaps, whatever mapped it, and removes the volume's directory; an
/// unmapped volume is fine. A device still open is FAILED_PRECONDITION and
/// nothing is undone halfway.
pub async fn unmap(state: &Path, v: &VolumeId) -> Result<()> {
    for m in MAPPERS {
        m.unmap(state, v).await?;
    }
    let dir = fuse_dir(state, v);
    offload::run("removing the mapping's directory", QUICK, move || {
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(Error::io(format!("removing {}", dir.display()), e))
            }
            _ => Ok(()),
        }
    })
    .await
}

#[tonic::async_trait]
impl Mapper for Fuse {
    fn name(&self) -> &'static str {
        "fuse"
    }

    fn available(&self) -> std::result::Result<(), String> {
        match () {
            _ if !have("/dev/fuse") => Err("the kernel has no fuse (/dev/fuse)".into()),
            _ if !tool("rbd-fuse") => Err("rbd-fuse is not installed".into()),
            _ => Ok(()),
        }
    }

    /// The loop device bound to the helper's file (sysfs names it; no stat
    /// inside the helper's mount).
    fn find(&self, state: &Path, v: &VolumeId) -> Result<Option<PathBuf>> {
        if !fuse_dir(state, v).exists() {
            return Ok(None);
        }
        let file = fuse_file(state, v);
        Ok(loopdev::find(&file)
            .map_err(io("reading loop devices"))?
            .into_iter()
            .next()
            .map(|a| a.device))
    }

    async fn map(&self, state: &Path, v: &VolumeId, auth: &Auth) -> Result<PathBuf> {
        map_fuse(state, v, auth).await
    }

    /// The loop device first (waiting until the kernel has let the file
    /// go), then the helper, by unmounting its file system.
    async fn unmap(&self, state: &Path, v: &VolumeId) -> Result<()> {
        let dir = fuse_dir(state, v);
        let file = fuse_file(state, v);
        let (d, f) = (dir.clone(), file.clone());
        let (mapped, loops) = offload::run("finding the mapping", QUICK, move || {
            Ok((d.exists(), loopdev::find(&f).map_err(io("reading loop devices"))?))
        })
        .await?;
        if !mapped {
            return Ok(());
        }
        for a in loops {
            let device = a.device.clone();
            let backing = file.clone();
            crate::blocking(move || {
                loopdev::detach(&device).map_err(io(format!("detaching {}", device.display())))?;
                let deadline = Instant::now() + Duration::from_secs(2);
                while loopdev::find(&backing)
                    .map_err(io("reading loop devices"))?
                    .iter()
                    .any(|b| b.device == device)
                {
                    if Instant::now() > deadline {
                        return Err(error::precondition(format!(
                            "{} stays bound to the image: another process holds it open; retry \
                             once it is closed",
                            device.display()
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                Ok(())
            })
            .await?;
        }
        helper::stop_serving(&dir, "rbd-fuse", &dir.join("mnt")).await?;
        Ok(())
    }

    /// rbd-fuse learns of the new size from librbd, and the kernel from
    /// rbd-fuse when its cached attributes expire: the loop device is
    /// refreshed once the file shows it.
    async fn refresh(&self, device: &Path, size: u64) -> Result<()> {
        let device = device.to_path_buf();
        crate::blocking(move || {
            let backing = loopdev::list()
                .map_err(io("reading loop devices"))?
                .into_iter()
                .find(|a| a.device == device)
                .map(|a| a.backing);
            if let Some(file) = backing {
                let deadline = Instant::now() + FUSE_SIZE_WAIT;
                while std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0) < size
                    && Instant::now() < deadline
                {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            loopdev::refresh_capacity(&device)
                .map_err(io(format!("refreshing the size of {}", device.display())))
        })
        .await
    }

    fn trouble(&self, state: &Path, v: &VolumeId) -> Option<String> {
        (fuse_helper_alive(state, v) == Some(false)).then(|| {
            "its rbd-fuse helper has stopped: I/O to it fails until the volume is unstaged and \
             staged again"
                .to_string()
        })
    }
}

/// How long a grown image may take to show its size through rbd-fuse (the
/// kernel re-reads a FUSE file's attributes about once a second).
const FUSE_SIZE_WAIT: Duration = Duration::from_secs(10);

/// Whether a fuse mapping's helper still serves it (None: not a fuse
/// mapping).
pub fn fuse_helper_alive(state: &Path, v: &VolumeId) -> Option<bool> {
    let dir = fuse_dir(state, v);
    helper::helper_alive(&dir, "rbd-fuse", &dir.join("mnt"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel lists every RBD mapping on the node, another driver's
    /// (ceph-csi's, an admin's `rbd map`) beside ours: start-up thaws and
    /// metrics must see only the volumes this driver mapped.
    #[test]
    fn all_lists_only_the_mappings_this_driver_made() {
        let state = tempfile::tempdir().unwrap();
        let sysfs = tempfile::tempdir().unwrap();
        let mapping = |n: &str, pool: &str, image: &str| {
            let d = sysfs.path().join(n);
            std::fs::create_dir_all(&d).unwrap();
            for (f, v) in [("pool", pool), ("name", image), ("current_snap", "-")] {
                std::fs::write(d.join(f), format!("{v}\n")).unwrap();
            }
        };
        mapping("0", "rbd", "csi-vol-ours");
        mapping("1", "rbd", "csi-vol-ceph-csi-s");
        mapping("2", "other", "an-admin-s");
        let ours = VolumeId { pool: "rbd".into(), image: "csi-vol-ours".into() };
        std::fs::create_dir_all(fuse_dir(state.path(), &ours)).unwrap();

        let all = all_in(state.path(), sysfs.path()).unwrap();
        assert_eq!(all, vec![PathBuf::from("/dev/rbd0")]);
        assert_eq!(
            krbd_find_in(sysfs.path(), &ours).unwrap(),
            Some(PathBuf::from("/dev/rbd0")),
            "a volume's own mapping is still found"
        );
    }
}
