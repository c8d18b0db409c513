//! Read-only raw block publishes.
//!
//! A read-only bind mount of a device node stops nothing: `ro` is a flag of
//! the mount, and a device opened through it writes to the device all the
//! same. So a read-only publish gets a device of its own that refuses
//! writes: a read-only loop device over the volume's device, one per
//! publish, so read-write publishes of the same volume on this node keep
//! writing. It is found again from the kernel alone (sysfs names its backing
//! device), so nothing needs remembering across a restart.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::loopdev;
use crate::node::mountinfo::MountEntry;

/// A new read-only device showing `device`'s bytes, with its logical block
/// size (a filesystem or database on it sees the geometry it was made on).
pub fn attach(device: &Path) -> Result<PathBuf> {
    let block = logical_block_size(device)?;
    loopdev::attach(device, true, block).map_err(|e| e.into_error("a read-only publish device"))
}

/// The read-only publish devices over `device` that `mounts` (binds of
/// device nodes) show: a look at each bound loop device's backing, never a
/// walk of every loop device.
pub fn among(mounts: &[MountEntry], device: &Path) -> Vec<PathBuf> {
    mounts
        .iter()
        .filter(|m| matches!(m.fs_type.as_str(), "devtmpfs" | "tmpfs"))
        .filter_map(|m| {
            m.root.strip_prefix('/').filter(|n| n.starts_with("loop") && !n.contains('/'))
        })
        .filter(|name| {
            std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file"))
                .is_ok_and(|b| Path::new(b.trim_end_matches('\n')) == device)
        })
        .map(|name| PathBuf::from(format!("/dev/{name}")))
        .collect()
}

/// The read-only publish devices made over `device`, mounted or not (a
/// walk of every loop device: for what a crash left unmounted).
pub fn over(device: &Path) -> Result<Vec<PathBuf>> {
    let all = loopdev::list().map_err(|e| Error::io("listing loop devices", e))?;
    Ok(all.into_iter().filter(|a| a.backing == device).map(|a| a.device).collect())
}

/// Lets go of a read-only publish device; gone already is fine.
pub fn detach(ro_device: &Path) -> Result<()> {
    match loopdev::detach(ro_device) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(Error::io(format!("detaching {}", ro_device.display()), e))
        }
        _ => Ok(()),
    }
}

fn logical_block_size(device: &Path) -> Result<u32> {
    use std::os::fd::AsRawFd;
    // <linux/fs.h>: BLKSSZGET is _IO(0x12, 104) and writes an int.
    const BLKSSZGET: libc::Ioctl = rustix::ioctl::opcode::none(0x12, 104) as libc::Ioctl;
    let f = std::fs::File::open(device)
        .map_err(|e| Error::io(format!("opening {}", device.display()), e))?;
    let mut size: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer we own.
    if unsafe { libc::ioctl(f.as_raw_fd(), BLKSSZGET, &mut size as *mut libc::c_int) } < 0 {
        let e = std::io::Error::last_os_error();
        return Err(Error::io(format!("reading the block size of {}", device.display()), e));
    }
    Ok(size as u32)
}
