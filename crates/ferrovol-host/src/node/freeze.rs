//! FIFREEZE/FITHAW: a filesystem quiesced for the instant of a snapshot.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use rustix::ioctl::opcode;

// <linux/fs.h>
const FIFREEZE: libc::Ioctl = opcode::read_write::<libc::c_int>(b'X', 119) as libc::Ioctl;
const FITHAW: libc::Ioctl = opcode::read_write::<libc::c_int>(b'X', 120) as libc::Ioctl;

// <linux/ext4.h> (Linux 5.13+).
const EXT4_IOC_CHECKPOINT: libc::Ioctl = opcode::write::<u32>(b'f', 43) as libc::Ioctl;

/// Gets a filesystem ready to freeze fast: writes back dirty data, and for
/// ext4 checkpoints the journal too (its freeze would otherwise checkpoint
/// the whole journal while writers wait). Best effort: a failure only means
/// the freeze itself does the work.
pub fn prepare(dir: &File) {
    let _ = rustix::fs::syncfs(dir);
    let flags: u32 = 0;
    // SAFETY: EXT4_IOC_CHECKPOINT reads one u32 of flags; other filesystems
    // answer ENOTTY.
    unsafe { libc::ioctl(dir.as_raw_fd(), EXT4_IOC_CHECKPOINT, &flags as *const u32) };
}

/// A frozen filesystem; thawed when dropped, on every path (errors, panics,
/// cancelled futures), because a filesystem left frozen hangs every writer.
pub struct Frozen {
    dir: File,
    mount_point: PathBuf,
}

impl Frozen {
    /// Flushes and freezes the filesystem mounted at `mount_point`.
    pub fn freeze(mount_point: &Path) -> io::Result<Frozen> {
        let dir = File::open(mount_point)?;
        // SAFETY: FIFREEZE takes an int argument it ignores.
        if unsafe { libc::ioctl(dir.as_raw_fd(), FIFREEZE, 0) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Frozen { dir, mount_point: mount_point.to_path_buf() })
    }

    pub fn mount_point(&self) -> &Path {
        &self.mount_point
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        // SAFETY: FITHAW takes an int argument it ignores.
        if unsafe { libc::ioctl(self.dir.as_raw_fd(), FITHAW, 0) } < 0 {
            tracing::error!(
                mount = %self.mount_point.display(),
                error = %io::Error::last_os_error(),
                "could not thaw filesystem"
            );
        }
    }
}

/// Thaws the filesystem at `mount_point` if it is frozen: answers whether it
/// was. For start-up, after a driver died between a freeze and its thaw
/// (SIGKILL, OOM) and left a pod's filesystem frozen for ever.
pub fn thaw_if_frozen(mount_point: &Path) -> io::Result<bool> {
    let dir = File::open(mount_point)?;
    // SAFETY: FITHAW takes an int argument it ignores.
    if unsafe { libc::ioctl(dir.as_raw_fd(), FITHAW, 0) } == 0 {
        return Ok(true);
    }
    match io::Error::last_os_error() {
        // Not frozen.
        e if e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
        e => Err(e),
    }
}
