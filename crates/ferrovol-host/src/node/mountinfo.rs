//! `/proc/self/mountinfo`: the kernel's truth about what is mounted where.

use std::io;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub major: u32,
    pub minor: u32,
    /// The path inside the source filesystem that is mounted (bind mounts of
    /// a device node show up as e.g. `/loop3` inside devtmpfs).
    pub root: String,
    pub mount_point: PathBuf,
    /// Per-mount options (`rw`, `ro`, `nosuid`, …).
    pub options: String,
    pub fs_type: String,
    pub source: String,
    /// Superblock options: `ro` here while the mount says `rw` means the
    /// filesystem was forced read-only (usually after I/O errors).
    pub super_options: String,
}

impl MountEntry {
    pub fn has_option(&self, opt: &str) -> bool {
        self.options.split(',').any(|o| o == opt)
    }

    pub fn super_read_only(&self) -> bool {
        self.super_options.split(',').any(|o| o == "ro")
    }
}

/// The mount table, in mount order (later entries are stacked on top).
pub fn read() -> io::Result<Vec<MountEntry>> {
    Ok(parse(&std::fs::read_to_string("/proc/self/mountinfo")?))
}

pub fn parse(text: &str) -> Vec<MountEntry> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<MountEntry> {
    // id parent major:minor root mount-point options [optional…] - type source super
    let (left, right) = line.split_once(" - ")?;
    let l: Vec<&str> = left.split(' ').collect();
    let r: Vec<&str> = right.splitn(3, ' ').collect();
    if l.len() < 6 || r.len() < 3 {
        return None;
    }
    let (major, minor) = l[2].split_once(':')?;
    Some(MountEntry {
        major: major.parse().ok()?,
        minor: minor.parse().ok()?,
        root: unescape(l[3]),
        mount_point: PathBuf::from(unescape(l[4])),
        options: l[5].to_string(),
        fs_type: r[0].to_string(),
        source: unescape(r[1]),
        super_options: r[2].to_string(),
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The topmost mount at exactly `path`, if any.
pub fn at<'a>(mounts: &'a [MountEntry], path: &Path) -> Option<&'a MountEntry> {
    mounts.iter().rev().find(|m| m.mount_point == path)
}

/// (major, minor) of a block device node.
pub fn device_numbers(device: &Path) -> io::Result<(u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    let rdev = std::fs::metadata(device)?.rdev();
    Ok((rustix::fs::major(rdev), rustix::fs::minor(rdev)))
}

/// Every mount of a block device: filesystem mounts of it, and bind mounts
/// of its device node (raw block staging and publishing).
pub fn mounts_of_device<'a>(
    mounts: &'a [MountEntry],
    device: &Path,
) -> io::Result<Vec<&'a MountEntry>> {
    let (major, minor) = device_numbers(device)?;
    let node_name = format!("/{}", device.file_name().and_then(|n| n.to_str()).unwrap_or_default());
    Ok(mounts
        .iter()
        .filter(|m| {
            (m.major == major && m.minor == minor)
                || (m.root == node_name && matches!(m.fs_type.as_str(), "devtmpfs" | "tmpfs"))
        })
        .collect())
}

/// The mount table, failing as the services answer (for callers whose
/// errors are RPC answers).
pub fn table() -> crate::error::Result<Vec<MountEntry>> {
    read().map_err(|e| crate::error::Error::io("reading /proc/self/mountinfo", e))
}

/// Whether `device` is what is mounted at `path`, by the table `mounts`.
pub fn device_at(mounts: &[MountEntry], device: &Path, path: &Path) -> crate::error::Result<bool> {
    let ours = mounts_of_device(mounts, device)
        .map_err(|e| crate::error::Error::io(format!("inspecting {}", device.display()), e))?;
    Ok(ours.iter().any(|m| m.mount_point == path))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
24 27 0:6 / /dev rw,relatime - devtmpfs devtmpfs rw,size=1k,mode=755
310 27 7:3 / /var/lib/kubelet/st\\040aging rw,relatime shared:1 - ext4 /dev/loop3 rw
311 27 7:3 / /var/lib/kubelet/pods/p/vol rw,relatime - ext4 /dev/loop3 ro,errors=remount-ro
312 27 0:6 /loop4 /var/lib/kubelet/pods/p/dev ro,nosuid - devtmpfs devtmpfs rw,size=1k
";

    #[test]
    fn parses_fields_and_escapes() {
        let m = parse(SAMPLE);
        assert_eq!(m.len(), 4);
        assert_eq!(m[1].mount_point, PathBuf::from("/var/lib/kubelet/st aging"));
        assert_eq!((m[1].major, m[1].minor), (7, 3));
        assert_eq!(m[1].source, "/dev/loop3");
        assert_eq!(m[1].fs_type, "ext4");
        assert!(!m[1].super_read_only());
        assert!(m[2].super_read_only(), "forced read-only superblock");
        assert_eq!(m[3].root, "/loop4");
        assert!(m[3].has_option("ro"));
        assert!(at(&m, Path::new("/var/lib/kubelet/pods/p/vol")).is_some());
        assert!(at(&m, Path::new("/nope")).is_none());
    }

    #[test]
    fn garbage_lines_are_skipped() {
        assert!(parse("not a mountinfo line\n\n1 2 x").is_empty());
    }
}
