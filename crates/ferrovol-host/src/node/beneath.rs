//! Paths the CO hands the node service, used in one step with their check.
//!
//! A path is checked by resolving it, once, from a descriptor of the
//! kubelet directory with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
//! RESOLVE_NO_MAGICLINKS)`: no component may be a symlink, and nothing can
//! lead outside. Everything after works on the descriptor that answered —
//! a mount lands on `/proc/self/fd/N` (the object the descriptor holds, not
//! whatever the path names by then), a bind mount is made detached and
//! moved onto the descriptor (`open_tree` + `mount_setattr` +
//! `move_mount`), an unmount names the mount through its descriptor — so a
//! component swapped for a symlink between the check and the use cannot
//! redirect anything outside the kubelet directory.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use rustix::fs::{Mode, OFlags, ResolveFlags, CWD};
use rustix::io::Errno;
use rustix::mount::{MountAttrFlags, MoveMountFlags, OpenTreeFlags};

use crate::error::{self, Error, Result};

/// A resolved path: the descriptor (O_PATH) and the path it was asked as
/// (for messages only; never used again to reach the object).
pub struct Resolved {
    pub fd: OwnedFd,
    pub path: PathBuf,
}

impl Resolved {
    /// The descriptor as a path the kernel follows to its object.
    pub fn proc_path(&self) -> PathBuf {
        proc_path(&self.fd)
    }
}

/// The kubelet directory, open: every path is resolved beneath it.
pub struct Beneath {
    root: OwnedFd,
    root_path: PathBuf,
}

const RESOLVE: ResolveFlags =
    ResolveFlags::BENEATH.union(ResolveFlags::NO_SYMLINKS).union(ResolveFlags::NO_MAGICLINKS);

/// A descriptor as a path the kernel follows to its object (its magic
/// link in /proc).
fn proc_path(fd: &impl AsRawFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// A client's path as a message repeats it (bounded).
fn shown(path: &Path) -> String {
    error::bounded(&path.to_string_lossy()).into_owned()
}

fn escape(path: &Path, e: Errno) -> Error {
    let shown = shown(path);
    match e {
        // A symlink in the way: never followed (the node service uses no
        // path through one), whatever it points at.
        Errno::LOOP => error::precondition(format!(
            "{shown} has a symlink in its way; symlinks under the kubelet directory are never \
             followed"
        )),
        // A path that would leave the kubelet directory.
        Errno::XDEV => error::invalid(format!("{shown} leads outside the kubelet directory")),
        Errno::NOENT => error::not_found(format!("{shown} does not exist")),
        Errno::NOTDIR => error::precondition(format!("a component of {shown} is not a directory")),
        e => Error::io(format!("resolving {shown}"), e.into()),
    }
}

impl Beneath {
    /// Opens the (resolved) kubelet directory.
    pub fn open(root: &Path) -> Result<Beneath> {
        let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
        let fd = rustix::fs::open(root, flags, Mode::empty())
            .map_err(|e| Error::io(format!("opening {}", root.display()), e.into()))?;
        Ok(Beneath { root: fd, root_path: root.to_path_buf() })
    }

    /// `path` relative to the root; the caller checked it lies beneath.
    fn relative<'a>(&self, path: &'a Path) -> Result<&'a Path> {
        path.strip_prefix(&self.root_path).ok().filter(|r| !r.as_os_str().is_empty()).ok_or_else(
            || {
                error::invalid(format!(
                    "{} is not inside the kubelet directory {}",
                    shown(path),
                    self.root_path.display()
                ))
            },
        )
    }

    fn resolve_at(
        &self,
        dir: &impl AsFd,
        rel: &Path,
        flags: OFlags,
    ) -> rustix::io::Result<OwnedFd> {
        rustix::fs::openat2(dir, rel, flags | OFlags::CLOEXEC, Mode::empty(), RESOLVE)
    }

    /// The object at `path` (O_PATH), or None where nothing is.
    pub fn existing(&self, path: &Path) -> Result<Option<Resolved>> {
        let rel = self.relative(path)?;
        match self.resolve_at(&self.root, rel, OFlags::PATH | OFlags::NOFOLLOW) {
            Ok(fd) => Ok(Some(Resolved { fd, path: path.to_path_buf() })),
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(escape(path, e)),
        }
    }

    /// The directory at `path`, made (with its missing parents, each
    /// beneath the root) when it is not there.
    pub fn dir(&self, path: &Path) -> Result<Resolved> {
        let rel = self.relative(path)?;
        let mut at = self
            .resolve_at(&self.root, Path::new("."), OFlags::PATH | OFlags::DIRECTORY)
            .map_err(|e| escape(path, e))?;
        for c in rel.components() {
            let Component::Normal(name) = c else {
                return Err(error::invalid(format!("{} is not normalized", shown(path))));
            };
            match rustix::fs::mkdirat(&at, name, Mode::from_raw_mode(0o750)) {
                Ok(()) | Err(Errno::EXIST) => {}
                Err(e) => return Err(escape(path, e)),
            }
            at = self
                .resolve_at(&at, Path::new(name), OFlags::PATH | OFlags::DIRECTORY)
                .map_err(|e| escape(path, e))?;
        }
        Ok(Resolved { fd: at, path: path.to_path_buf() })
    }

    /// The regular file at `path`, made when missing (its parent too): what
    /// a device is bind-mounted onto. Never a symlink, never elsewhere.
    pub fn file(&self, path: &Path) -> Result<Resolved> {
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(error::invalid(format!("{} names no file", path.display())));
        };
        let dir = self.dir(parent)?;
        let flags = OFlags::CREATE | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        match rustix::fs::openat2(&dir.fd, name, flags, Mode::from_raw_mode(0o640), RESOLVE) {
            Ok(_) => {}
            Err(Errno::ISDIR) => {
                return Err(error::precondition(format!(
                    "{} is a directory where a device's file must be",
                    shown(path)
                )))
            }
            Err(e) => return Err(escape(path, e)),
        }
        let fd = self
            .resolve_at(&dir.fd, Path::new(name), OFlags::PATH | OFlags::NOFOLLOW)
            .map_err(|e| escape(path, e))?;
        Ok(Resolved { fd, path: path.to_path_buf() })
    }
}

impl Beneath {
    /// The directory holding `path` (resolved) and the last component.
    fn parent_of<'a>(&self, path: &'a Path) -> Result<Option<(OwnedFd, &'a std::ffi::OsStr)>> {
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(error::invalid(format!("{} names nothing", path.display())));
        };
        let flags = OFlags::PATH | OFlags::DIRECTORY;
        let dir = if parent == self.root_path {
            self.resolve_at(&self.root, Path::new("."), flags)
        } else {
            self.resolve_at(&self.root, self.relative(parent)?, flags)
        };
        match dir {
            Ok(fd) => Ok(Some((fd, name))),
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(escape(path, e)),
        }
    }

    /// Removes the file or empty directory at `path` (a symlink there is
    /// removed, never followed); gone is fine. A directory with files in it
    /// is somebody else's: FAILED_PRECONDITION.
    pub fn remove(&self, path: &Path) -> Result<()> {
        let Some((dir, name)) = self.parent_of(path)? else { return Ok(()) };
        let st = match rustix::fs::statat(&dir, name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::NOENT) => return Ok(()),
            Err(e) => return Err(escape(path, e)),
        };
        let is_dir =
            rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Directory;
        let flags =
            if is_dir { rustix::fs::AtFlags::REMOVEDIR } else { rustix::fs::AtFlags::empty() };
        match rustix::fs::unlinkat(&dir, name, flags) {
            Ok(()) | Err(Errno::NOENT) => Ok(()),
            Err(Errno::NOTEMPTY) => Err(error::precondition(format!(
                "{} is a directory with files in it and no volume mounted; not removing it",
                shown(path)
            ))),
            Err(e) => Err(escape(path, e)),
        }
    }
}

/// Mounts a filesystem onto the resolved target: `mount(2)` follows the
/// descriptor's magic link to the very directory that was checked.
pub fn mount_onto(
    device: &Path,
    target: &Resolved,
    fs_type: &str,
    flags: rustix::mount::MountFlags,
    data: Option<&std::ffi::CStr>,
) -> rustix::io::Result<()> {
    rustix::mount::mount(device, target.proc_path(), fs_type, flags, data)
}

/// `mount_setattr(2)` on a detached tree (rustix has no wrapper).
fn set_attributes(tree: &OwnedFd, attrs: MountAttrFlags) -> rustix::io::Result<()> {
    #[repr(C)]
    struct MountAttr {
        attr_set: u64,
        attr_clr: u64,
        propagation: u64,
        userns_fd: u64,
    }
    // An access-time mode replaces the inherited one: the kernel wants the
    // whole access-time field cleared for it (else EINVAL).
    let atime = MountAttrFlags::MOUNT_ATTR_NOATIME
        | MountAttrFlags::MOUNT_ATTR_RELATIME
        | MountAttrFlags::MOUNT_ATTR_STRICTATIME;
    let attr_clr = match attrs.intersects(atime) {
        true => MountAttrFlags::MOUNT_ATTR__ATIME.bits() as u64,
        false => 0,
    };
    let attr = MountAttr { attr_set: attrs.bits() as u64, attr_clr, propagation: 0, userns_fd: 0 };
    // SAFETY: the descriptor is open, the empty path is a NUL-terminated
    // string, and `attr` is a `struct mount_attr` of the size passed, alive
    // for the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    match ret {
        0 => Ok(()),
        _ => Err(Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(Errno::INVAL)),
    }
}

/// Bind-mounts `source` onto the resolved target with `attrs` set before
/// it appears (a detached copy of `source`, its attributes set, moved onto
/// the target's descriptor): no moment with the wrong flags, no path
/// looked up again.
pub fn bind_onto(
    source: &impl AsFd,
    target: &Resolved,
    attrs: MountAttrFlags,
) -> rustix::io::Result<()> {
    let tree = rustix::mount::open_tree(
        source,
        "",
        OpenTreeFlags::OPEN_TREE_CLONE
            | OpenTreeFlags::OPEN_TREE_CLOEXEC
            | OpenTreeFlags::AT_EMPTY_PATH,
    )?;
    if !attrs.is_empty() {
        set_attributes(&tree, attrs)?;
    }
    rustix::mount::move_mount(
        &tree,
        "",
        &target.fd,
        "",
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH,
    )
}

/// Opens any path (a device node outside the kubelet directory) for
/// [`bind_onto`].
pub fn open_source(path: &Path) -> Result<OwnedFd> {
    rustix::fs::openat(CWD, path, OFlags::PATH | OFlags::CLOEXEC, Mode::empty())
        .map_err(|e| Error::io(format!("opening {}", path.display()), e.into()))
}

impl Beneath {
    /// Unmounts the topmost mount at `path`, named through a descriptor of
    /// its parent (resolved beneath the root; the last component is never
    /// followed). A descriptor of the mount itself would keep it busy.
    /// Nothing mounted there (or nothing there) is `Ok(false)`.
    pub fn unmount(&self, path: &Path) -> Result<bool> {
        let Some((dir, name)) = self.parent_of(path)? else { return Ok(false) };
        let mut at = proc_path(&dir);
        at.push(name);
        // EBUSY can be a moment's: a process forked meanwhile (a helper
        // this driver starts for another volume) holds a copy of every
        // descriptor, a publish's own into this mount among them, until it
        // execs and its close-on-exec ones go. Tried again for up to about
        // 2.5 s; past that, the mount is in use, which the caller can retry.
        let mut pause = std::time::Duration::from_millis(5);
        for _ in 0..9 {
            match rustix::mount::unmount(&at, rustix::mount::UnmountFlags::NOFOLLOW) {
                Ok(()) => return Ok(true),
                Err(Errno::INVAL | Errno::NOENT) => return Ok(false),
                Err(Errno::BUSY) => std::thread::sleep(pause),
                Err(e) => return Err(error::internal(format!("unmounting {}: {e}", shown(path)))),
            }
            pause *= 2;
        }
        Err(error::busy(format!(
            "{} is in use (a process has a file or its working directory in it); retry once \
             it is closed",
            shown(path)
        )))
    }
}
