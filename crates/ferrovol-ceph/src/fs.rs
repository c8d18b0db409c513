//! A CephFS client (libcephfs, loaded at run time apart from librados and
//! librbd: only the CephFS engine's copies need it). Paths are absolute in
//! the file system; every call is the client's own (thread-safe on one
//! mount), and nothing here follows a symlink.

use std::ffi::{c_char, c_int, CStr};
use std::path::Path;
use std::ptr;
use std::sync::OnceLock;
use std::time::SystemTime;

use libloading::Library;

use crate::ffi::{self, FsApi};
use crate::{check, cstring, rados::Connect, to_time, CephError, Result};

/// `AT_SYMLINK_NOFOLLOW`: the link itself, never its target.
pub const NOFOLLOW: c_int = libc::AT_SYMLINK_NOFOLLOW;

struct Loaded {
    api: FsApi,
    _lib: Library,
}

static LOADED: OnceLock<std::result::Result<Loaded, String>> = OnceLock::new();

fn load() -> std::result::Result<Loaded, String> {
    // SAFETY: loading Ceph's own client library runs its initialisers,
    // which only set up its globals.
    let lib = unsafe { Library::new("libcephfs.so.2") }
        .map_err(|e| format!("cannot load libcephfs.so.2 (install the libcephfs2 package): {e}"))?;
    // SAFETY: the library is libcephfs, whose functions have the declared
    // signatures; it stays loaded inside `Loaded`.
    let api = unsafe { FsApi::load(&lib)? };
    Ok(Loaded { api, _lib: lib })
}

/// Whether libcephfs can be loaded (the reason when not).
pub fn available() -> std::result::Result<(), String> {
    LOADED.get_or_init(load).as_ref().map(drop).map_err(Clone::clone)
}

fn api() -> &'static FsApi {
    // Every mount is made after a successful load.
    &LOADED.get().and_then(|l| l.as_ref().ok()).expect("libcephfs loaded before a mount").api
}

/// A mounted client of one file system (its root).
pub struct FsMount {
    m: ffi::FsMount,
}

// SAFETY: a libcephfs mount may be used from any thread at once (the
// client serialises inside).
unsafe impl Send for FsMount {}
// SAFETY: as above.
unsafe impl Sync for FsMount {}

impl Drop for FsMount {
    fn drop(&mut self) {
        // SAFETY: created by ceph_create, released once, after which the
        // pointer is never used again.
        unsafe {
            (api().ceph_unmount)(self.m);
            (api().ceph_release)(self.m);
        }
    }
}

/// What `lstat` tells of an entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stat {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub ino: u64,
    pub nlink: u32,
    pub rdev: u64,
    pub atime: SystemTime,
    pub mtime: SystemTime,
}

impl Stat {
    pub fn kind(&self) -> u32 {
        self.mode & libc::S_IFMT
    }
}

fn c(path: &str) -> Result<std::ffi::CString> {
    cstring("path", path)
}

fn timespec(t: SystemTime) -> libc::timespec {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    libc::timespec { tv_sec: d.as_secs() as libc::time_t, tv_nsec: d.subsec_nanos() as i64 }
}

impl FsMount {
    /// Connects as `how` says and mounts file system `fs` at its root.
    pub fn mount(how: &Connect<'_>, fs: &str) -> Result<FsMount> {
        available().map_err(|e| CephError { op: e, errno: libc::ENOENT })?;
        let api = api();
        let user = cstring("client id", how.user.unwrap_or("admin"))?;
        let mut m: ffi::FsMount = ptr::null_mut();
        // SAFETY: `m` receives a new handle; the id is NUL-terminated.
        check(|| "creating a CephFS client".into(), unsafe {
            (api.ceph_create)(&mut m, user.as_ptr())
        })?;
        let mount = FsMount { m };
        let set = |k: &str, v: &str| -> Result<()> {
            let (ck, cv) = (cstring("option", k)?, cstring("value", v)?);
            // SAFETY: an unmounted handle; valid strings.
            check(|| format!("setting {k}"), unsafe {
                (api.ceph_conf_set)(mount.m, ck.as_ptr(), cv.as_ptr())
            })
            .map(drop)
        };
        let read = |conf: &Path| -> Result<()> {
            let p = cstring("config path", &conf.to_string_lossy())?;
            // SAFETY: as above.
            check(|| format!("reading {}", conf.display()), unsafe {
                (api.ceph_conf_read_file)(mount.m, p.as_ptr())
            })
            .map(drop)
        };
        how.apply(read, set, &[])?;
        // A copier's client writes each byte once: a small write-back
        // cache is enough (libcephfs' default of 200 MiB is the driver's
        // memory for nothing).
        set("client_oc_size", &(32u64 << 20).to_string())?;
        let name = cstring("file system", fs)?;
        // SAFETY: an unmounted, configured handle.
        check(|| format!("choosing file system {fs}"), unsafe {
            (api.ceph_select_filesystem)(mount.m, name.as_ptr())
        })?;
        // SAFETY: as above.
        check(|| format!("mounting file system {fs}"), unsafe {
            (api.ceph_mount)(mount.m, c"/".as_ptr())
        })?;
        Ok(mount)
    }

    /// The entry at `path` itself (a symlink is not followed).
    pub fn lstat(&self, path: &str) -> Result<Stat> {
        let p = c(path)?;
        // SAFETY: a zeroed plain C struct the call fills.
        let mut st: ffi::Statx = unsafe { std::mem::zeroed() };
        // SAFETY: a mounted handle, a valid path and struct.
        check(|| format!("looking at {path}"), unsafe {
            (api().ceph_statx)(self.m, p.as_ptr(), &mut st, ffi::STATX_BASIC_STATS, NOFOLLOW as u32)
        })?;
        Ok(Stat {
            mode: u32::from(st.stx_mode),
            uid: st.stx_uid,
            gid: st.stx_gid,
            size: st.stx_size,
            ino: st.stx_ino,
            nlink: st.stx_nlink,
            rdev: st.stx_rdev,
            atime: to_time(st.stx_atime),
            mtime: to_time(st.stx_mtime),
        })
    }

    /// The names in a directory (without `.` and `..`).
    pub fn read_dir(&self, path: &str) -> Result<Vec<String>> {
        let p = c(path)?;
        let api = api();
        let mut dir: ffi::FsDir = ptr::null_mut();
        // SAFETY: a mounted handle; `dir` receives a new listing.
        check(|| format!("listing {path}"), unsafe {
            (api.ceph_opendir)(self.m, p.as_ptr(), &mut dir)
        })?;
        let mut names = vec![];
        loop {
            // SAFETY: an open listing; the entry is valid until the next
            // call, and its name is copied before it.
            let e = unsafe { (api.ceph_readdir)(self.m, dir) };
            if e.is_null() {
                break;
            }
            // SAFETY: d_name is NUL-terminated within the entry.
            let name =
                unsafe { CStr::from_ptr((*e).d_name.as_ptr()) }.to_string_lossy().into_owned();
            if name != "." && name != ".." {
                names.push(name);
            }
        }
        // SAFETY: closed once.
        unsafe { (api.ceph_closedir)(self.m, dir) };
        Ok(names)
    }

    /// Opens a file (`flags` as open(2); O_NOFOLLOW is always added).
    pub fn open(&self, path: &str, flags: c_int, mode: u32) -> Result<FsFile<'_>> {
        let p = c(path)?;
        // SAFETY: a mounted handle and a valid path.
        let fd = check(|| format!("opening {path}"), unsafe {
            (api().ceph_open)(self.m, p.as_ptr(), flags | libc::O_NOFOLLOW | libc::O_CLOEXEC, mode)
        })?;
        Ok(FsFile { mount: self, fd })
    }

    pub fn mkdir(&self, path: &str, mode: u32) -> Result<()> {
        let p = c(path)?;
        // SAFETY: as above.
        check(|| format!("making {path}"), unsafe { (api().ceph_mkdir)(self.m, p.as_ptr(), mode) })
            .map(drop)
    }

    pub fn rmdir(&self, path: &str) -> Result<()> {
        let p = c(path)?;
        // SAFETY: as above.
        check(|| format!("removing {path}"), unsafe { (api().ceph_rmdir)(self.m, p.as_ptr()) })
            .map(drop)
    }

    pub fn unlink(&self, path: &str) -> Result<()> {
        let p = c(path)?;
        // SAFETY: as above.
        check(|| format!("removing {path}"), unsafe { (api().ceph_unlink)(self.m, p.as_ptr()) })
            .map(drop)
    }

    /// Makes symlink `path` pointing at `target` (any bytes but NUL).
    pub fn symlink(&self, target: &[u8], path: &str) -> Result<()> {
        let t = std::ffi::CString::new(target).map_err(|_| CephError {
            op: format!("the target of {path} holds a NUL"),
            errno: libc::EINVAL,
        })?;
        let p = c(path)?;
        // SAFETY: as above.
        check(|| format!("making symlink {path}"), unsafe {
            (api().ceph_symlink)(self.m, t.as_ptr(), p.as_ptr())
        })
        .map(drop)
    }

    pub fn readlink(&self, path: &str) -> Result<Vec<u8>> {
        let p = c(path)?;
        let mut buf = vec![0u8; libc::PATH_MAX as usize];
        // SAFETY: a buffer of the given length.
        let n = check(|| format!("reading symlink {path}"), unsafe {
            (api().ceph_readlink)(self.m, p.as_ptr(), buf.as_mut_ptr().cast(), buf.len() as i64)
        })?;
        buf.truncate(n as usize);
        Ok(buf)
    }

    /// Makes `path` another name of `existing`.
    pub fn link(&self, existing: &str, path: &str) -> Result<()> {
        let (e, p) = (c(existing)?, c(path)?);
        // SAFETY: as above.
        check(|| format!("linking {path}"), unsafe {
            (api().ceph_link)(self.m, e.as_ptr(), p.as_ptr())
        })
        .map(drop)
    }

    /// Makes a fifo, socket or device node.
    pub fn mknod(&self, path: &str, mode: u32, rdev: u64) -> Result<()> {
        let p = c(path)?;
        // SAFETY: as above.
        check(|| format!("making {path}"), unsafe {
            (api().ceph_mknod)(self.m, p.as_ptr(), mode, rdev as libc::dev_t)
        })
        .map(drop)
    }

    /// Sets owner, mode (not on symlinks) and times of the entry itself.
    pub fn set_attributes(&self, path: &str, st: &Stat) -> Result<()> {
        let p = c(path)?;
        // SAFETY: a zeroed plain C struct.
        let mut x: ffi::Statx = unsafe { std::mem::zeroed() };
        x.stx_uid = st.uid;
        x.stx_gid = st.gid;
        x.stx_mode = (st.mode & 0o7777) as u16;
        x.stx_atime = timespec(st.atime);
        x.stx_mtime = timespec(st.mtime);
        let mut mask =
            ffi::SETATTR_UID | ffi::SETATTR_GID | ffi::SETATTR_ATIME | ffi::SETATTR_MTIME;
        if st.kind() != libc::S_IFLNK {
            mask |= ffi::SETATTR_MODE;
        }
        // SAFETY: as above.
        check(|| format!("setting the attributes of {path}"), unsafe {
            (api().ceph_setattrx)(self.m, p.as_ptr(), &mut x, mask, NOFOLLOW)
        })
        .map(drop)
    }

    /// The extended attributes of the entry itself, CephFS's own virtual
    /// ones (`ceph.*`) left out.
    pub fn xattrs(&self, path: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let p = c(path)?;
        let api = api();
        let mut names = vec![0u8; 64 * 1024];
        // SAFETY: a buffer of the given length.
        let n = check(|| format!("listing the attributes of {path}"), unsafe {
            (api.ceph_llistxattr)(self.m, p.as_ptr(), names.as_mut_ptr().cast(), names.len())
        })?;
        let mut out = vec![];
        for name in names[..n as usize].split(|b| *b == 0).filter(|n| !n.is_empty()) {
            let name = String::from_utf8_lossy(name).into_owned();
            if name.starts_with("ceph.") {
                continue;
            }
            let cname = cstring("attribute", &name)?;
            let mut value = vec![0u8; 64 * 1024];
            // SAFETY: a buffer of the given length.
            let len = unsafe {
                (api.ceph_lgetxattr)(
                    self.m,
                    p.as_ptr(),
                    cname.as_ptr(),
                    value.as_mut_ptr().cast(),
                    value.len(),
                )
            };
            if len == -libc::ENODATA {
                continue; // removed meanwhile
            }
            let len = check(|| format!("reading attribute {name} of {path}"), len)?;
            value.truncate(len as usize);
            out.push((name, value));
        }
        Ok(out)
    }

    pub fn set_xattr(&self, path: &str, name: &str, value: &[u8]) -> Result<()> {
        let (p, n) = (c(path)?, cstring("attribute", name)?);
        // SAFETY: a value of the given length.
        check(|| format!("setting attribute {name} of {path}"), unsafe {
            (api().ceph_lsetxattr)(
                self.m,
                p.as_ptr(),
                n.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        })
        .map(drop)
    }

    /// Everything written so far is durable.
    pub fn sync(&self) -> Result<()> {
        // SAFETY: a mounted handle.
        check(|| "syncing the file system".into(), unsafe { (api().ceph_sync_fs)(self.m) })
            .map(drop)
    }
}

/// An open file of a mount, closed on drop.
pub struct FsFile<'a> {
    mount: &'a FsMount,
    fd: c_int,
}

impl Drop for FsFile<'_> {
    fn drop(&mut self) {
        // SAFETY: an open descriptor of this mount, closed once.
        unsafe { (api().ceph_close)(self.mount.m, self.fd) };
    }
}

impl FsFile<'_> {
    /// Reads at `offset` into `buf`; 0 at the end.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        // SAFETY: a buffer of the given length.
        let n = check(|| "reading".into(), unsafe {
            (api().ceph_read)(
                self.mount.m,
                self.fd,
                buf.as_mut_ptr().cast::<c_char>(),
                buf.len() as i64,
                offset as i64,
            )
        })?;
        Ok(n as usize)
    }

    /// Writes all of `buf` at `offset`.
    pub fn write_all_at(&self, mut buf: &[u8], mut offset: u64) -> Result<()> {
        while !buf.is_empty() {
            // SAFETY: a buffer of the given length.
            let n = check(|| "writing".into(), unsafe {
                (api().ceph_write)(
                    self.mount.m,
                    self.fd,
                    buf.as_ptr().cast::<c_char>(),
                    buf.len() as i64,
                    offset as i64,
                )
            })? as usize;
            if n == 0 {
                return Err(CephError { op: "writing: nothing written".into(), errno: libc::EIO });
            }
            buf = &buf[n..];
            offset += n as u64;
        }
        Ok(())
    }

    pub fn truncate(&self, size: u64) -> Result<()> {
        // SAFETY: an open descriptor.
        check(|| "setting the size".into(), unsafe {
            (api().ceph_ftruncate)(self.mount.m, self.fd, size as i64)
        })
        .map(drop)
    }

    pub fn sync(&self) -> Result<()> {
        // SAFETY: an open descriptor.
        check(|| "syncing".into(), unsafe { (api().ceph_fsync)(self.mount.m, self.fd, 0) })
            .map(drop)
    }
}

/// Joins a name onto a path of the file system.
pub fn join(dir: &str, name: &str) -> String {
    match dir.ends_with('/') {
        true => format!("{dir}{name}"),
        false => format!("{dir}/{name}"),
    }
}
