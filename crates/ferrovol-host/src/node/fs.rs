//! Filesystems on block devices: detect, format (only when blank), mount,
//! bind, grow. External tools run through [`crate::exec`] with timeouts.

use std::ffi::OsStr;
use std::path::Path;
use std::time::Duration;

use rustix::mount::MountFlags;

use super::beneath::{self, Resolved};

use crate::error::{self, Result};
use crate::exec;

const MKFS_TIMEOUT: Duration = Duration::from_secs(300);
const GROW_TIMEOUT: Duration = Duration::from_secs(300);
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);

/// What is on a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// No signature at all: safe to format.
    Blank,
    /// A filesystem of this type.
    Filesystem(String),
    /// Some other signature (partition table, LUKS, RAID member…): data we
    /// do not understand, never to be formatted over.
    Unknown(String),
}

/// Looks for any signature on the device (`blkid -p`, which reads the device
/// itself rather than a cache).
pub async fn probe(device: &Path) -> Result<Content> {
    let (code, out) = exec::run_status(
        "blkid",
        ["-p".as_ref(), "-o".as_ref(), "export".as_ref(), device.as_os_str()],
        PROBE_TIMEOUT,
    )
    .await?;
    match code {
        0 => {
            let field = |key: &str| {
                out.stdout.lines().find_map(|l| l.strip_prefix(key).map(str::to_string))
            };
            Ok(match field("TYPE=") {
                Some(t) => Content::Filesystem(t),
                None => Content::Unknown(out.stdout.trim().replace('\n', " ")),
            })
        }
        2 => Ok(Content::Blank),
        _ => Err(error::internal(format!(
            "blkid could not probe {} (exit {code}): {}",
            device.display(),
            out.stderr.trim()
        ))),
    }
}

/// Formats a blank device. Options favour speed on a fresh sparse file: no
/// discard (nothing to discard), lazy ext4 inode tables, no reserved blocks.
pub async fn mkfs(device: &Path, fs_type: &str) -> Result<()> {
    let dev = device.as_os_str();
    match fs_type {
        "ext4" => {
            // 4 KiB blocks whatever the size: small ext4 filesystems default to
            // 1 KiB blocks, which a 4 KiB-sector device cannot mount.
            let opts = [
                "-q",
                "-F",
                "-b",
                "4096",
                "-m",
                "0",
                "-E",
                "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
            ];
            exec::run("mkfs.ext4", opts.iter().map(|s| s.as_ref()).chain([dev]), MKFS_TIMEOUT)
                .await?
        }
        // -f: the caller formats only devices it knows hold no data (blank,
        // or left half-formatted by a format of ours that was interrupted).
        "xfs" => {
            exec::run(
                "mkfs.xfs",
                ["-q", "-f", "-K"].map(OsStr::new).into_iter().chain([dev]),
                MKFS_TIMEOUT,
            )
            .await?
        }
        "btrfs" => {
            exec::run(
                "mkfs.btrfs",
                ["-q", "-f", "-K"].map(OsStr::new).into_iter().chain([dev]),
                MKFS_TIMEOUT,
            )
            .await?
        }
        other => return Err(error::invalid(format!("cannot format {other:?}"))),
    };
    Ok(())
}

/// Whether this process holds a capability (by number, see capabilities(7)).
pub fn has_capability(cap: u32) -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|eff| eff & (1 << cap) != 0)
}

pub const CAP_SYS_ADMIN: u32 = 21;
pub const CAP_SYS_RESOURCE: u32 = 24;

/// Grows a mounted filesystem to fill its (already larger) device.
pub async fn grow(fs_type: &str, device: &Path, mount_point: &Path) -> Result<()> {
    match fs_type {
        "ext4" | "ext3" | "ext2" => {
            // The kernel's online ext4 resize demands CAP_SYS_RESOURCE; say
            // so instead of relaying resize2fs's bare "Permission denied".
            if !has_capability(CAP_SYS_RESOURCE) {
                return Err(error::precondition(
                    "growing a mounted ext4 filesystem needs CAP_SYS_RESOURCE, which this process \
                     lacks (grant it to the ferrovol container); the volume itself has grown",
                ));
            }
            exec::run("resize2fs", [device.as_os_str()], GROW_TIMEOUT).await?
        }
        "xfs" => exec::run("xfs_growfs", [mount_point.as_os_str()], GROW_TIMEOUT).await?,
        "btrfs" => {
            let args =
                ["filesystem".as_ref(), "resize".as_ref(), "max".as_ref(), mount_point.as_os_str()];
            exec::run("btrfs", args, GROW_TIMEOUT).await?
        }
        other => return Err(error::invalid(format!("cannot grow a {other} filesystem"))),
    };
    Ok(())
}

/// The size of the ext2/3/4 filesystem on `device`, from its superblock
/// (block count × block size); None when it holds no such filesystem.
pub fn ext4_size(device: &Path) -> Option<u64> {
    use std::os::unix::fs::FileExt;
    let mut sb = [0u8; 1024];
    std::fs::File::open(device).ok()?.read_exact_at(&mut sb, 1024).ok()?;
    let u32_at = |o: usize| u32::from_le_bytes(sb[o..o + 4].try_into().expect("4 bytes"));
    if u16::from_le_bytes([sb[0x38], sb[0x39]]) != 0xEF53 {
        return None;
    }
    let lo = u32_at(0x04) as u64;
    // INCOMPAT_64BIT: the block count's high half is used.
    let hi = if u32_at(0x60) & 0x80 != 0 { u32_at(0x150) as u64 } else { 0 };
    let block = 1024u64 << u32_at(0x18).min(16);
    Some((hi << 32 | lo) * block)
}

/// Whether the ext4 on `device` is smaller than the device by more than
/// mkfs may leave unused (a last partial block group too small to keep).
pub fn ext4_smaller_than_device(device: &Path) -> bool {
    match (ext4_size(device), block_device_size(device)) {
        (Some(fs), Ok(dev)) => fs + (1 << 20) < dev,
        _ => false,
    }
}

/// Grows an unmounted ext4 filesystem to its device: what a stage does for a
/// volume that grew while the filesystem could not (online ext4 growth
/// needs CAP_SYS_RESOURCE; offline growth does not). Answers whether it
/// grew.
pub async fn grow_unmounted_ext4(device: &Path) -> Result<bool> {
    if !ext4_smaller_than_device(device) {
        return Ok(false);
    }
    // resize2fs wants a freshly checked filesystem; -p repairs only what is
    // safe to repair unattended.
    let (code, out) = exec::run_status(
        "e2fsck",
        ["-f".as_ref(), "-p".as_ref(), device.as_os_str()],
        GROW_TIMEOUT,
    )
    .await?;
    // 0: clean; 1: errors corrected. Anything else needs a person.
    if code > 1 {
        return Err(error::precondition(format!(
            "e2fsck found problems it cannot fix unattended on {} (exit {code}): {}",
            device.display(),
            out.stdout.trim()
        )));
    }
    exec::run("resize2fs", [device.as_os_str()], GROW_TIMEOUT).await?;
    Ok(true)
}

/// Mount options from a CSI capability: the generic ones become flags, the
/// rest is passed to the filesystem.
pub fn split_mount_flags(flags: &[String]) -> (MountFlags, String) {
    let mut bits = MountFlags::empty();
    let mut data = Vec::new();
    for opt in flags.iter().flat_map(|f| f.split(',')).map(str::trim).filter(|o| !o.is_empty()) {
        match opt {
            "ro" => bits |= MountFlags::RDONLY,
            "rw" | "defaults" | "bind" => {}
            "nosuid" => bits |= MountFlags::NOSUID,
            "nodev" => bits |= MountFlags::NODEV,
            "noexec" => bits |= MountFlags::NOEXEC,
            "sync" => bits |= MountFlags::SYNCHRONOUS,
            "dirsync" => bits |= MountFlags::DIRSYNC,
            "noatime" => bits |= MountFlags::NOATIME,
            "nodiratime" => bits |= MountFlags::NODIRATIME,
            "relatime" => bits |= MountFlags::RELATIME,
            "strictatime" => bits |= MountFlags::STRICTATIME,
            other => data.push(other),
        }
    }
    (bits, data.join(","))
}

/// Mounts a volume's filesystem, always `nodev,nosuid` (a pod's volume
/// must not bring device nodes or setuid binaries onto the node, as the
/// kubelet expects). XFS gets `nouuid`: restores and clones carry their
/// source's UUID, and XFS would otherwise refuse to mount both on one node.
pub fn mount(
    device: &Path,
    target: &Resolved,
    fs_type: &str,
    flags: &[String],
    read_only: bool,
) -> Result<()> {
    let (mut bits, mut data) = split_mount_flags(flags);
    bits |= POD_VOLUME;
    if read_only {
        bits |= MountFlags::RDONLY;
    }
    if fs_type == "xfs" && !data.split(',').any(|o| o == "nouuid") {
        data = if data.is_empty() { "nouuid".into() } else { format!("{data},nouuid") };
    }
    let data =
        std::ffi::CString::new(data).map_err(|_| error::invalid("mount flags contain NUL"))?;
    let data = (!data.as_bytes().is_empty()).then_some(data.as_c_str());
    beneath::mount_onto(device, target, fs_type, bits, data).map_err(|e| {
        let what =
            format!("mounting {} ({fs_type}) on {}: {e}", device.display(), target.path.display());
        match e {
            // Something holds the device right now (a mount still finishing
            // from before a restart): worth a retry, not a failure.
            rustix::io::Errno::BUSY => error::busy(format!("{what}; the device is in use, retry")),
            _ => error::internal(what),
        }
    })
}

/// What every filesystem a pod gets is mounted with.
pub const POD_VOLUME: MountFlags = MountFlags::NODEV.union(MountFlags::NOSUID);

/// Bind-mounts `source` (an open descriptor; `shown` names it in errors)
/// on the resolved `target`, with read-only and the generic flags set
/// before the mount appears.
pub fn bind(
    source: &impl std::os::fd::AsFd,
    shown: &Path,
    target: &Resolved,
    flags: &[String],
    read_only: bool,
) -> Result<()> {
    let (mut bits, _) = split_mount_flags(flags);
    if read_only {
        bits |= MountFlags::RDONLY;
    }
    beneath::bind_onto(source, target, attributes(bits)).map_err(|e| {
        error::internal(format!(
            "bind-mounting {} on {}: {e}",
            shown.display(),
            target.path.display()
        ))
    })
}

/// A bind mount's own flags as `mount_setattr` attributes (the superblock
/// flags, sync and dirsync, belong to the filesystem's own mount).
fn attributes(bits: MountFlags) -> rustix::mount::MountAttrFlags {
    use rustix::mount::MountAttrFlags as A;
    let pairs = [
        (MountFlags::RDONLY, A::MOUNT_ATTR_RDONLY),
        (MountFlags::NOSUID, A::MOUNT_ATTR_NOSUID),
        (MountFlags::NODEV, A::MOUNT_ATTR_NODEV),
        (MountFlags::NOEXEC, A::MOUNT_ATTR_NOEXEC),
        (MountFlags::NOATIME, A::MOUNT_ATTR_NOATIME),
        (MountFlags::NODIRATIME, A::MOUNT_ATTR_NODIRATIME),
        (MountFlags::RELATIME, A::MOUNT_ATTR_RELATIME),
        (MountFlags::STRICTATIME, A::MOUNT_ATTR_STRICTATIME),
    ];
    pairs.iter().filter(|(m, _)| bits.contains(*m)).fold(A::empty(), |acc, (_, a)| acc | *a)
}

/// Size in bytes of a block device (or a bind mount of its node).
pub fn block_device_size(device: &Path) -> Result<u64> {
    use std::os::fd::AsRawFd;
    // <linux/fs.h>
    const BLKGETSIZE64: libc::Ioctl =
        rustix::ioctl::opcode::read::<libc::size_t>(0x12, 114) as libc::Ioctl;
    let f = std::fs::File::open(device)
        .map_err(|e| crate::error::Error::io(format!("opening {}", device.display()), e))?;
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer we own.
    if unsafe { libc::ioctl(f.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) } < 0 {
        let e = std::io::Error::last_os_error();
        return Err(crate::error::Error::io(format!("sizing {}", device.display()), e));
    }
    Ok(size)
}

/// Unmounts a mount of the driver's own (its state directory: never a path
/// a client named); not mounted is fine.
pub fn unmount_own(target: &Path) -> Result<()> {
    match rustix::mount::unmount(target, rustix::mount::UnmountFlags::NOFOLLOW) {
        Ok(()) | Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(e) => Err(error::internal(format!("unmounting {}: {e}", target.display()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generic_flags_become_bits_the_rest_data() {
        let (bits, data) = split_mount_flags(&[
            "noatime,discard".into(),
            "nosuid".into(),
            "ro".into(),
            "commit=30".into(),
        ]);
        assert!(bits.contains(MountFlags::NOATIME | MountFlags::NOSUID | MountFlags::RDONLY));
        assert_eq!(data, "discard,commit=30");
    }
}
