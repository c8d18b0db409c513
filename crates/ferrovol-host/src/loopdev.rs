//! Loop devices through the kernel's own interface: `/dev/loop-control` and
//! the loop ioctls, with sysfs as the source of truth for what is attached.
//!
//! Nothing is remembered in memory: which file backs which loop device is read
//! from `/sys/block/loopN/loop/backing_file` each time, so a restarted driver
//! sees exactly what the kernel has.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use rustix::ioctl::opcode;

// <linux/loop.h> numbers its ioctls 0x4C00 + n, which is `_IO('L', n)`:
// the argument, where there is one, is passed by value or pointer without
// the size in the opcode.
const LOOP_CLR_FD: libc::Ioctl = opcode::none(b'L', 0x01) as libc::Ioctl;
const LOOP_SET_CAPACITY: libc::Ioctl = opcode::none(b'L', 0x07) as libc::Ioctl;
const LOOP_CONFIGURE: libc::Ioctl = opcode::none(b'L', 0x0A) as libc::Ioctl;
const LOOP_CTL_GET_FREE: libc::Ioctl = opcode::none(b'L', 0x82) as libc::Ioctl;

const LO_FLAGS_DIRECT_IO: u32 = 16;
const LO_NAME_SIZE: usize = 64;
const LO_KEY_SIZE: usize = 32;

/// `struct loop_info64` from <linux/loop.h>.
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; LO_KEY_SIZE],
    lo_init: [u64; 2],
}

/// `struct loop_config` from <linux/loop.h>.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

// The kernel's sizes (x86_64 and aarch64 alike: no padding in either).
const _: () = assert!(std::mem::size_of::<LoopInfo64>() == 232);
const _: () = assert!(std::mem::size_of::<LoopConfig>() == 304);

fn ioctl_result(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// How many times to retry when another process grabs the free device we were
/// handed between GET_FREE and CONFIGURE.
const ATTACH_RETRIES: usize = 64;

/// Logical block size of volume loop devices. Fixed, because left to the
/// kernel it follows the backing file's direct-I/O alignment, which on XFS
/// changes once a file shares blocks (after a snapshot or clone): a
/// filesystem made with smaller blocks would then no longer mount.
pub const VOLUME_BLOCK_SIZE: u32 = 4096;

/// Attaches `backing` to a free loop device with direct I/O (no second copy
/// in the page cache); falls back to buffered I/O where the backing
/// filesystem refuses direct I/O. `block_size` 0 lets the kernel choose
/// (right for images made elsewhere). Returns the device path.
pub fn attach(backing: &Path, read_only: bool, block_size: u32) -> Result<PathBuf, AttachError> {
    let file = OpenOptions::new().read(true).write(!read_only).open(backing)?;
    let control = Control::open()?;
    let mut last_err = None;
    for _ in 0..ATTACH_RETRIES {
        let index = control.free_index()?;
        let dev_path = PathBuf::from(format!("/dev/loop{index}"));
        let dev = match OpenOptions::new().read(true).write(!read_only).open(&dev_path) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                last_err = Some(e);
                continue; // udev has not made the node yet; ask again
            }
            Err(e) => return Err(e.into()),
        };
        let mut flags = LO_FLAGS_DIRECT_IO;
        if read_only {
            flags |= 1; // LO_FLAGS_READ_ONLY
        }
        match configure(&dev, &file, flags, block_size) {
            Ok(()) => return Ok(dev_path),
            // Someone else configured this device first: try another.
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => last_err = Some(e),
            // The backing filesystem cannot do direct I/O with this block
            // size: buffered I/O still works.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                match configure(&dev, &file, flags & !LO_FLAGS_DIRECT_IO, block_size) {
                    Ok(()) => return Ok(dev_path),
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => last_err = Some(e),
                    Err(e) => return Err(e.into()),
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(AttachError::NoDevice(
        last_err.unwrap_or_else(|| io::Error::other("every free loop device was taken")),
    ))
}

/// Why an attach failed: no loop device could be had at all (the node is
/// out of them, or the loop driver is unusable), or the attach itself failed.
#[derive(Debug)]
pub enum AttachError {
    NoDevice(io::Error),
    Io(io::Error),
}

impl From<io::Error> for AttachError {
    fn from(e: io::Error) -> Self {
        AttachError::Io(e)
    }
}

impl AttachError {
    /// In CSI terms: no device is RESOURCE_EXHAUSTED, like any other
    /// resource the node has run out of.
    pub fn into_error(self, what: impl std::fmt::Display) -> crate::error::Error {
        match self {
            AttachError::NoDevice(e) => crate::error::exhausted(format!(
                "{what}: no loop device could be allocated: {e} \
                 (is the loop module loaded and /dev/loop-control usable?)"
            )),
            AttachError::Io(e) => crate::error::Error::io(what, e),
        }
    }
}

/// `/dev/loop-control`: where free loop devices come from.
struct Control(File);

impl Control {
    fn open() -> Result<Control, AttachError> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/loop-control")
            .map(Control)
            .map_err(AttachError::NoDevice)
    }

    fn free_index(&self) -> Result<libc::c_int, AttachError> {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns an index.
        ioctl_result(unsafe { libc::ioctl(self.0.as_raw_fd(), LOOP_CTL_GET_FREE) })
            .map_err(AttachError::NoDevice)
    }
}

/// Checks that a loop device could be had now, without taking one (the
/// kernel hands out the same free device until someone configures it).
pub fn check_available() -> Result<(), AttachError> {
    Control::open()?.free_index().map(drop)
}

fn configure(dev: &File, backing: &File, flags: u32, block_size: u32) -> io::Result<()> {
    // SAFETY: all-zero is a valid loop_config; we then set the fields we use.
    let mut cfg: LoopConfig = unsafe { std::mem::zeroed() };
    cfg.fd = backing.as_raw_fd() as u32;
    cfg.block_size = block_size;
    cfg.info.lo_flags = flags;
    // SAFETY: LOOP_CONFIGURE reads a loop_config we own for the whole call.
    ioctl_result(unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE, &cfg as *const LoopConfig) })
        .map(|_| ())
}

/// Detaches a loop device. Already detached is fine.
pub fn detach(device: &Path) -> io::Result<()> {
    let dev = OpenOptions::new().read(true).open(device)?;
    // SAFETY: LOOP_CLR_FD takes no argument.
    match ioctl_result(unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CLR_FD, 0) }) {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Makes the loop device pick up its backing file's new size.
pub fn refresh_capacity(device: &Path) -> io::Result<()> {
    let dev = OpenOptions::new().read(true).open(device)?;
    // SAFETY: LOOP_SET_CAPACITY takes no argument.
    ioctl_result(unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_SET_CAPACITY, 0) }).map(|_| ())
}

/// One attached loop device as sysfs reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attached {
    pub device: PathBuf,
    /// The backing path; `deleted` when the file was unlinked while attached.
    pub backing: PathBuf,
    pub deleted: bool,
}

/// Every attached loop device, from sysfs.
pub fn list() -> io::Result<Vec<Attached>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/sys/block")? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let Ok(raw) = std::fs::read_to_string(entry.path().join("loop/backing_file")) else {
            continue; // not attached
        };
        let raw = raw.trim_end_matches('\n');
        let (path, deleted) = match raw.strip_suffix(" (deleted)") {
            Some(p) => (p, true),
            None => (raw, false),
        };
        out.push(Attached {
            device: PathBuf::from(format!("/dev/{name}")),
            backing: PathBuf::from(path),
            deleted,
        });
    }
    out.sort_by(|a, b| a.device.cmp(&b.device));
    Ok(out)
}

/// The loop devices backed by `backing` (normally zero or one).
pub fn find(backing: &Path) -> io::Result<Vec<Attached>> {
    Ok(list()?.into_iter().filter(|a| a.backing == backing).collect())
}
