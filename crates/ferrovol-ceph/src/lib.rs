//! A small typed, safe wrapper of librados and librbd, loaded at run time
//! (so building ferrovol needs no Ceph headers, and only `--engine rbd`
//! needs the libraries installed).
//!
//! Every call blocks (librbd's synchronous API); callers run them off the
//! async executor. A [`Cluster`] is one connected client and is shared by
//! threads (librados handles are thread-safe); a [`Pool`] is an I/O context
//! on one pool, also shared; an [`Image`] is one open image, used by one
//! thread at a time. Each keeps what it was made from alive, so the client
//! shuts down after its last pool and image are gone.
//!
//! Never fork after connecting except straight into exec: the child of a
//! connected client hangs on librados' threads. Helpers (rbd-fuse, rbd-nbd)
//! are spawned through `ferrovol_host::exec`, which execs at once.
//!
//! Layout: [`ffi`] (the C declarations, checked against Ceph's headers by
//! `tests/abi.rs`), `rados` (connections, pools, objects, monitor and
//! manager commands), `image`, `trash`, `group`, `subvolume` (CephFS
//! subvolumes through the manager's volumes module). With the host crate,
//! the only place with `unsafe` code: every block says why it is sound.

pub mod ffi;
pub mod fs;
mod group;
mod image;
mod rados;
mod subvolume;
mod trash;

pub use group::GroupSnap;
pub use image::{Image, ImageOptions, Parent, Snap, SnapNamespace};
pub use rados::{Cluster, Connect, Pool};
pub use subvolume::{NewSubvolume, SubvolumeInfo, Subvolumes};
pub use trash::TrashEntry;

use std::ffi::{c_char, c_int, CStr, CString};
use std::fmt;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use libloading::Library;

/// A failed librados/librbd call: what we were doing and the errno.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CephError {
    pub op: String,
    /// Positive errno (librados answers its negation).
    pub errno: i32,
}

impl CephError {
    fn new(op: impl Into<String>, ret: c_int) -> CephError {
        CephError { op: op.into(), errno: -ret }
    }

    pub fn is(&self, errno: i32) -> bool {
        self.errno == errno
    }
}

impl fmt::Display for CephError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = std::io::Error::from_raw_os_error(self.errno);
        write!(f, "{}: {text}", self.op)
    }
}

impl std::error::Error for CephError {}

pub type Result<T, E = CephError> = std::result::Result<T, E>;

pub(crate) fn check(op: impl FnOnce() -> String, ret: c_int) -> Result<c_int> {
    if ret < 0 {
        Err(CephError::new(op(), ret))
    } else {
        Ok(ret)
    }
}

pub(crate) fn cstring(what: &str, s: &str) -> Result<CString> {
    CString::new(s)
        .map_err(|_| CephError { op: format!("{what} {s:?} holds a NUL"), errno: libc::EINVAL })
}

/// Copies a C string the library owns (NULL: empty).
///
/// # Safety
/// `p` is NULL or points at a NUL-terminated string valid for the call.
pub(crate) unsafe fn owned(p: *const c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        CStr::from_ptr(p).to_string_lossy().into_owned()
    }
}

pub(crate) fn to_time(ts: libc::timespec) -> SystemTime {
    SystemTime::UNIX_EPOCH
        + Duration::new(ts.tv_sec.max(0) as u64, ts.tv_nsec.clamp(0, 999_999_999) as u32)
}

/// The loaded libraries and their function table.
pub struct Libraries {
    api: ffi::Api,
    /// librbd's version (1.16 is Pacific).
    pub rbd_version: (i32, i32, i32),
    pub rados_version: (i32, i32, i32),
    // Kept loaded for as long as the process runs: `api` points into them.
    _rados: Library,
    _rbd: Library,
}

impl Libraries {
    /// Whether librbd can clone from a snapshot by id (Squid's
    /// `rbd_clone4`), which is how group members are cloned.
    pub fn has_clone_by_snap_id(&self) -> bool {
        self.api.rbd_clone4.is_some()
    }
}

static LOADED: OnceLock<Result<Libraries, String>> = OnceLock::new();

/// Loads librados.so.2 and librbd.so.1 once; a missing library is an error
/// naming its Debian package.
pub fn libraries() -> Result<&'static Libraries, String> {
    LOADED.get_or_init(load).as_ref().map_err(Clone::clone)
}

fn load() -> Result<Libraries, String> {
    let open = |name: &str, package: &str| {
        // SAFETY: loading a shared library runs its initialisers; librados
        // and librbd are Ceph's own, whose initialisers only set up their
        // globals.
        unsafe { Library::new(name) }.map_err(|e| {
            format!("cannot load {name} (install the {package} package for the RBD engine): {e}")
        })
    };
    let rados = open("librados.so.2", "librados2")?;
    let rbd = open("librbd.so.1", "librbd1")?;
    // SAFETY: the libraries are librados and librbd, whose functions have
    // the declared C signatures; both stay loaded inside `Libraries`.
    let api = unsafe { ffi::Api::load(&rados, &rbd)? };
    let (mut a, mut b, mut c) = (0, 0, 0);
    // SAFETY: the version calls write three ints.
    unsafe { (api.rbd_version)(&mut a, &mut b, &mut c) };
    let rbd_version = (a, b, c);
    // SAFETY: as above.
    unsafe { (api.rados_version)(&mut a, &mut b, &mut c) };
    Ok(Libraries { api, rbd_version, rados_version: (a, b, c), _rados: rados, _rbd: rbd })
}

pub(crate) fn api() -> &'static ffi::Api {
    // Every handle is made after a successful load.
    &libraries().expect("libraries loaded before any handle").api
}

/// Image feature bits (librbd's features.h) by the names `rbd` uses.
pub fn feature_bit(name: &str) -> Option<u64> {
    Some(match name {
        "layering" => 1 << 0,
        "striping" => 1 << 1,
        "exclusive-lock" => 1 << 2,
        "object-map" => 1 << 3,
        "fast-diff" => 1 << 4,
        "deep-flatten" => 1 << 5,
        "journaling" => 1 << 6,
        "data-pool" => 1 << 7,
        _ => return None,
    })
}

/// The exclusive-lock feature bit (group snapshots pause writers by it).
pub const FEATURE_EXCLUSIVE_LOCK: u64 = 1 << 2;
