//! `ferrovol pool init`: a pool on its own filesystem in an image file: a
//! reflink-capable one (xfs, btrfs) for hosts whose own filesystem cannot
//! share blocks, or ext4 to fence the pool's space off from the host's.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{self, Error, Result};
use crate::exec;
use crate::loopdev;

const MKFS_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PoolFs {
    Xfs,
    Btrfs,
    /// No block sharing (snapshots are copies), but a fixed size of its own.
    Ext4,
}

impl PoolFs {
    pub fn name(self) -> &'static str {
        match self {
            PoolFs::Xfs => "xfs",
            PoolFs::Btrfs => "btrfs",
            PoolFs::Ext4 => "ext4",
        }
    }
}

/// What `init` made; `device` is the loop device the image is mounted from.
#[derive(Debug, Clone)]
pub struct PoolImage {
    pub image: PathBuf,
    pub device: PathBuf,
    pub mountpoint: PathBuf,
    pub fs: PoolFs,
}

/// What `pool init` found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A new image, formatted and mounted.
    Created,
    /// The same pool was already mounted there: nothing to do.
    AlreadyMounted,
    /// The image existed (a reboot without the fstab line): mounted again.
    Remounted,
}

/// `pool init` as an operator runs it: idempotent. Makes the pool as
/// [`init`] does, or finds that the image exists and is the same pool
/// (size and filesystem) and mounts it if it is not mounted; a different
/// pool under the same names is refused. `preallocate` reserves the image's
/// space on the host at once (refused when the host has not that much
/// free); otherwise the image is sparse. Answers the pool, what was done,
/// and a warning when a sparse image may outgrow the host.
pub async fn ensure(
    dir: &Path,
    image: &Path,
    size: u64,
    fs: PoolFs,
    preallocate: bool,
) -> Result<(PoolImage, Outcome, Option<String>)> {
    if image.exists() {
        let (pool, outcome) = existing(dir, image, size, fs).await?;
        return Ok((pool, outcome, None));
    }
    let parent = image.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let st = rustix::fs::statvfs(parent)
        .map_err(|e| Error::io(format!("statvfs {}", parent.display()), e.into()))?;
    let host_free = st.f_bavail * st.f_frsize;
    let mut warning = None;
    if size > host_free {
        let say = format!(
            "{} holds {} free, less than the pool's {}",
            parent.display(),
            crate::units::human_size(host_free),
            crate::units::human_size(size)
        );
        if preallocate {
            return Err(error::exhausted(say));
        }
        warning = Some(format!("{say}: the sparse image can fill the host's disk"));
    }
    let pool = init_with(dir, image, size, fs, preallocate).await?;
    Ok((pool, Outcome::Created, warning))
}

/// An image that exists: the same pool, mounted or mountable, or an error
/// saying how it differs.
async fn existing(dir: &Path, image: &Path, size: u64, fs: PoolFs) -> Result<(PoolImage, Outcome)> {
    let image = std::fs::canonicalize(image)
        .map_err(|e| Error::io(format!("resolving {}", image.display()), e))?;
    let actual = std::fs::metadata(&image)
        .map_err(|e| Error::io(format!("examining {}", image.display()), e))?
        .len();
    if actual != size {
        return Err(error::precondition(format!(
            "{} exists with {} bytes, not the {size} asked for: a different pool (pool init \
             never resizes or replaces an image)",
            image.display(),
            actual
        )));
    }
    let found = match crate::host_node::fs::probe(&image).await? {
        crate::host_node::fs::Content::Filesystem(t) => t,
        crate::host_node::fs::Content::Blank => "nothing".into(),
        crate::host_node::fs::Content::Unknown(what) => what,
    };
    if found != fs.name() {
        return Err(error::precondition(format!(
            "{} holds {found}, not {}: a different pool",
            image.display(),
            fs.name()
        )));
    }
    let backing =
        loopdev::find(&image).map_err(|e| Error::io("reading loop devices", e))?.into_iter().next();
    let mounts =
        crate::host_node::mountinfo::read().map_err(|e| Error::io("reading the mount table", e))?;
    let dir_real = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    if let Some(m) = crate::host_node::mountinfo::at(&mounts, &dir_real) {
        return match &backing {
            Some(b) if Path::new(&m.source) == b.device => Ok((
                PoolImage { image, device: b.device.clone(), mountpoint: dir_real, fs },
                Outcome::AlreadyMounted,
            )),
            _ => Err(error::precondition(format!(
                "{} is a mount of {}, not of {}",
                dir_real.display(),
                m.source,
                image.display()
            ))),
        };
    }
    if let Some(b) = backing {
        return Err(error::precondition(format!(
            "{} is attached as {} but not mounted at {}: mounted elsewhere?",
            image.display(),
            b.device.display(),
            dir_real.display()
        )));
    }
    crate::private::create_dir_all(dir)
        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    require_empty(dir)?;
    let device = mount_image(&image, dir, fs)?;
    Ok((PoolImage { image, device, mountpoint: dir.to_path_buf(), fs }, Outcome::Remounted))
}

fn require_empty(dir: &Path) -> Result<()> {
    if std::fs::read_dir(dir)
        .map_err(|e| Error::io(format!("reading {}", dir.display()), e))?
        .next()
        .is_some()
    {
        return Err(error::precondition(format!(
            "{} is not empty; a pool is mounted on an empty directory",
            dir.display()
        )));
    }
    Ok(())
}

/// Attaches an image and mounts it at `dir`; nothing stays attached on
/// failure.
fn mount_image(image: &Path, dir: &Path, fs: PoolFs) -> Result<PathBuf> {
    // Block size 0: the image was formatted as a file, with whatever
    // sector size mkfs chose; let the kernel match it.
    let device = loopdev::attach(image, false, 0)
        .map_err(|e| e.into_error(format!("attaching {}", image.display())))?;
    if let Err(e) =
        rustix::mount::mount(&device, dir, fs.name(), rustix::mount::MountFlags::empty(), None)
    {
        let _ = loopdev::detach(&device);
        return Err(error::internal(format!(
            "mounting {} on {}: {e}",
            device.display(),
            dir.display()
        )));
    }
    Ok(device)
}

/// Takes a pool made by `pool init` down: refuses while any volume of it
/// is attached or anything is mounted inside it, then unmounts it and
/// detaches its loop device. The image and its data stay. Answers the
/// image's path.
pub fn teardown(dir: &Path) -> Result<PathBuf> {
    let dir = std::fs::canonicalize(dir)
        .map_err(|e| Error::io(format!("resolving {}", dir.display()), e))?;
    let mounts =
        crate::host_node::mountinfo::read().map_err(|e| Error::io("reading the mount table", e))?;
    let Some(mount) = crate::host_node::mountinfo::at(&mounts, &dir) else {
        return Err(error::not_found(format!("no pool is mounted at {}", dir.display())));
    };
    let loops = loopdev::list().map_err(|e| Error::io("reading loop devices", e))?;
    let Some(pool) = loops.iter().find(|l| Path::new(&mount.source) == l.device) else {
        return Err(error::precondition(format!(
            "{} is a mount of {}, not a pool image made by pool init",
            dir.display(),
            mount.source
        )));
    };
    let attached: Vec<String> = loops
        .iter()
        .filter(|l| l.backing.starts_with(&dir))
        .map(|l| format!("{} ({})", l.device.display(), l.backing.display()))
        .collect();
    if !attached.is_empty() {
        return Err(error::precondition(format!(
            "volumes of {} are attached: {}; unstage them first",
            dir.display(),
            attached.join(", ")
        )));
    }
    let inside: Vec<String> = mounts
        .iter()
        .filter(|m| m.mount_point != dir && m.mount_point.starts_with(&dir))
        .map(|m| m.mount_point.display().to_string())
        .collect();
    if !inside.is_empty() {
        return Err(error::precondition(format!(
            "something is mounted inside {}: {}",
            dir.display(),
            inside.join(", ")
        )));
    }
    rustix::mount::unmount(&dir, rustix::mount::UnmountFlags::empty()).map_err(|e| {
        if e == rustix::io::Errno::BUSY {
            error::precondition(format!(
                "{} is in use: is a driver still running on it? Stop it first",
                dir.display()
            ))
        } else {
            error::internal(format!("unmounting {}: {e}", dir.display()))
        }
    })?;
    loopdev::detach(&pool.device)
        .map_err(|e| Error::io(format!("detaching {}", pool.device.display()), e))?;
    Ok(pool.backing.clone())
}

/// Creates a sparse image of `size` bytes, formats it with `fs` (reflink on),
/// and mounts it at `dir` through a loop device.
pub async fn init(dir: &Path, image: &Path, size: u64, fs: PoolFs) -> Result<PoolImage> {
    init_with(dir, image, size, fs, false).await
}

async fn init_with(
    dir: &Path,
    image: &Path,
    size: u64,
    fs: PoolFs,
    preallocate: bool,
) -> Result<PoolImage> {
    if size < 512 << 20 {
        return Err(error::invalid("a pool image needs at least 512 MiB"));
    }
    crate::private::create_dir_all(dir)
        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    require_empty(dir)?;
    if image.exists() {
        return Err(error::exists(format!("{} already exists", image.display())));
    }
    // The image holds every volume's data: root's alone.
    let file = crate::private::options()
        .write(true)
        .create_new(true)
        .open(image)
        .map_err(|e| Error::io(format!("creating {}", image.display()), e))?;
    let sized = if preallocate {
        rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, size)
            .map_err(|e| Error::io(format!("preallocating {}", image.display()), e.into()))
    } else {
        file.set_len(size).map_err(|e| Error::io(format!("sizing {}", image.display()), e))
    };
    drop(file);
    if let Err(e) = sized {
        let _ = std::fs::remove_file(image);
        return Err(e);
    }

    let made = async {
        let img = image.as_os_str();
        let q = OsStr::new("-q");
        match fs {
            PoolFs::Xfs => {
                let reflink = [q, OsStr::new("-m"), OsStr::new("reflink=1"), img];
                exec::run("mkfs.xfs", reflink, MKFS_TIMEOUT).await?
            }
            PoolFs::Btrfs => exec::run("mkfs.btrfs", [q, img], MKFS_TIMEOUT).await?,
            // No blocks reserved for root: the driver runs as root, and the
            // pool's free space must be what statvfs says it is.
            PoolFs::Ext4 => {
                exec::run("mkfs.ext4", [q, OsStr::new("-m"), OsStr::new("0"), img], MKFS_TIMEOUT)
                    .await?
            }
        };
        mount_image(image, dir, fs)
    }
    .await;
    // The new pool's identity, so a driver that serves it knows it from an
    // empty mount point later (engine::local::identity).
    // The new filesystem's root (mkfs makes it 0755) is the pool: root's
    // alone, as every directory in it.
    let made =
        made.and_then(|device| match crate::private::tighten(dir, crate::private::DIR_MODE) {
            Ok(()) => Ok(device),
            Err(e) => {
                let _ = rustix::mount::unmount(dir, rustix::mount::UnmountFlags::DETACH);
                let _ = loopdev::detach(&device);
                Err(Error::io(format!("making {} private", dir.display()), e))
            }
        });
    let made = match made {
        Ok(device) => match crate::identity::stamp(dir) {
            Ok(_) => Ok(device),
            Err(e) => {
                let _ = rustix::mount::unmount(dir, rustix::mount::UnmountFlags::DETACH);
                let _ = loopdev::detach(&device);
                Err(e)
            }
        },
        Err(e) => Err(e),
    };
    match made {
        Ok(device) => {
            Ok(PoolImage { image: image.to_path_buf(), device, mountpoint: dir.to_path_buf(), fs })
        }
        Err(e) => {
            let _ = std::fs::remove_file(image);
            Err(e)
        }
    }
}

/// Unmounts a pool made by `init` and detaches its loop device (the image
/// file and its data stay).
pub fn unmount(pool: &PoolImage) -> Result<()> {
    rustix::mount::unmount(&pool.mountpoint, rustix::mount::UnmountFlags::empty())
        .map_err(|e| error::internal(format!("unmounting {}: {e}", pool.mountpoint.display())))?;
    loopdev::detach(&pool.device)
        .map_err(|e| Error::io(format!("detaching {}", pool.device.display()), e))
}

/// Unmounts and detaches a pool for good, even while something still uses
/// it: a busy mount is detached lazily and the loop device set to go with
/// it, so the kernel frees both once the last user leaves.
pub fn release(pool: &PoolImage) {
    if unmount(pool).is_err() {
        let _ = rustix::mount::unmount(&pool.mountpoint, rustix::mount::UnmountFlags::DETACH);
        let _ = loopdev::detach(&pool.device);
    }
}
