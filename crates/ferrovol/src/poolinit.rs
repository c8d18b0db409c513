//! `ferrovol pool init`: a pool on its own filesystem in an image file: a
//! reflink-capable one (xfs, btrfs) for hosts whose own filesystem cannot
//! share blocks, or ext4 to fence the pool's space off from the host's.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::engine::local::loopdev;
use crate::error::{self, Error, Result};
use crate::exec;

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

/// Creates a sparse image of `size` bytes, formats it with `fs` (reflink on),
/// and mounts it at `dir` through a loop device.
pub async fn init(dir: &Path, image: &Path, size: u64, fs: PoolFs) -> Result<PoolImage> {
    if size < 512 << 20 {
        return Err(error::invalid("a pool image needs at least 512 MiB"));
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    if std::fs::read_dir(dir)
        .map_err(|e| Error::io(format!("reading {}", dir.display()), e))?
        .next()
        .is_some()
    {
        return Err(error::failed_precondition(format!(
            "{} is not empty; a pool is mounted on an empty directory",
            dir.display()
        )));
    }
    if image.exists() {
        return Err(error::already_exists(format!("{} already exists", image.display())));
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(image)
        .map_err(|e| Error::io(format!("creating {}", image.display()), e))?;
    file.set_len(size).map_err(|e| Error::io(format!("sizing {}", image.display()), e))?;
    drop(file);

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
    .await;
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
