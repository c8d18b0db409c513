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
//! are spawned through [`crate::exec`], which execs at once.

mod ffi;

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::fmt;
use std::path::Path;
use std::ptr;
use std::sync::{Arc, OnceLock};
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

fn check(op: impl FnOnce() -> String, ret: c_int) -> Result<c_int> {
    if ret < 0 {
        Err(CephError::new(op(), ret))
    } else {
        Ok(ret)
    }
}

fn cstring(what: &str, s: &str) -> Result<CString> {
    CString::new(s)
        .map_err(|_| CephError { op: format!("{what} {s:?} holds a NUL"), errno: libc::EINVAL })
}

/// Copies a C string the library owns (NULL: empty).
///
/// # Safety
/// `p` is NULL or points at a NUL-terminated string valid for the call.
unsafe fn owned(p: *const c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        CStr::from_ptr(p).to_string_lossy().into_owned()
    }
}

fn to_time(ts: libc::timespec) -> SystemTime {
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

fn api() -> &'static ffi::Api {
    // Every handle is made after a successful load.
    &libraries().expect("libraries loaded before any handle").api
}

/// How to reach and authenticate to the cluster.
#[derive(Clone, Default)]
pub struct Connect<'a> {
    /// A ceph.conf (monitors, options); None: librados' default search.
    pub conf: Option<&'a Path>,
    /// The client id without "client." (None: admin).
    pub user: Option<&'a str>,
    /// The base64 key itself (from a CSI secret)...
    pub key: Option<&'a str>,
    /// ...or a keyring file.
    pub keyring: Option<&'a Path>,
    /// Monitors, when not in the conf.
    pub mon_host: Option<&'a str>,
    /// Seconds a monitor or OSD call may take before it fails (ETIMEDOUT).
    pub op_timeout: u64,
}

impl fmt::Debug for Connect<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connect")
            .field("conf", &self.conf)
            .field("user", &self.user)
            .field("key", &self.key.map(|_| "(redacted)"))
            .field("keyring", &self.keyring)
            .finish()
    }
}

struct ClusterHandle(ffi::Rados);

// SAFETY: librados cluster handles may be used from any thread at once.
unsafe impl Send for ClusterHandle {}
// SAFETY: as above.
unsafe impl Sync for ClusterHandle {}

impl Drop for ClusterHandle {
    fn drop(&mut self) {
        // SAFETY: the handle was created by rados_create2 and is shut down
        // once, after every pool and image made from it (they hold an Arc).
        unsafe { (api().rados_shutdown)(self.0) }
    }
}

/// The nonces of every client this process connected (a client's watch is
/// never a user of the image).
fn own_clients() -> std::sync::MutexGuard<'static, std::collections::HashSet<String>> {
    static OWN: std::sync::LazyLock<std::sync::Mutex<std::collections::HashSet<String>>> =
        std::sync::LazyLock::new(Default::default);
    OWN.lock().unwrap_or_else(|p| p.into_inner())
}

/// The nonces of an address list (`[v2:1.2.3.4:0/123,v1:…/123]`).
fn nonces(address: &str) -> Vec<String> {
    address
        .split(',')
        .filter_map(|a| a.rsplit('/').next())
        .map(|n| n.trim_end_matches([']', ',']).to_string())
        .filter(|n| !n.is_empty())
        .collect()
}

/// One connected client.
#[derive(Clone)]
pub struct Cluster {
    handle: Arc<ClusterHandle>,
}

impl Cluster {
    /// Whether this is the connection's last holder: dropping it shuts the
    /// connection down (`rados_shutdown`), after its pools and images.
    pub fn is_last(&self) -> bool {
        Arc::strong_count(&self.handle) == 1
    }

    pub fn connect(how: &Connect<'_>) -> Result<Cluster> {
        libraries().map_err(|e| CephError { op: e, errno: libc::ENOENT })?;
        let api = api();
        let name = format!("client.{}", how.user.unwrap_or("admin"));
        let cname = cstring("client name", &name)?;
        let mut h: ffi::Rados = ptr::null_mut();
        // SAFETY: `h` receives a new handle; the strings are NUL-terminated.
        check(|| "creating the client".into(), unsafe {
            (api.rados_create2)(&mut h, c"ceph".as_ptr(), cname.as_ptr(), 0)
        })?;
        let handle = ClusterHandle(h);
        let set = |k: &str, v: &str| -> Result<()> {
            let (ck, cv) = (cstring("option", k)?, cstring("value", v)?);
            // SAFETY: the handle is not yet connected; strings are valid.
            check(|| format!("setting {k}"), unsafe {
                (api.rados_conf_set)(handle.0, ck.as_ptr(), cv.as_ptr())
            })
            .map(drop)
        };
        if let Some(conf) = how.conf {
            let c = cstring("config path", &conf.to_string_lossy())?;
            // SAFETY: as above.
            check(|| format!("reading {}", conf.display()), unsafe {
                (api.rados_conf_read_file)(handle.0, c.as_ptr())
            })?;
        }
        if let Some(mon) = how.mon_host {
            set("mon_host", mon)?;
        }
        if let Some(key) = how.key {
            set("key", key)?;
        }
        if let Some(keyring) = how.keyring {
            set("keyring", &keyring.to_string_lossy())?;
        }
        if how.op_timeout > 0 {
            let t = how.op_timeout.to_string();
            set("rados_mon_op_timeout", &t)?;
            set("rados_osd_op_timeout", &t)?;
            set("client_mount_timeout", &t)?;
        }
        // Our logs are ours: librados' own go nowhere unless configured.
        set("log_to_stderr", "false")?;
        set("err_to_stderr", "false")?;
        // SAFETY: a configured, unconnected handle.
        check(|| format!("connecting to the cluster as {name}"), unsafe {
            (api.rados_connect)(handle.0)
        })?;
        let cluster = Cluster { handle: Arc::new(handle) };
        if let Ok(address) = cluster.address() {
            own_clients().extend(nonces(&address));
        }
        Ok(cluster)
    }

    /// An I/O context on a pool: ENOENT when the pool does not exist.
    pub fn pool(&self, name: &str) -> Result<Pool> {
        let c = cstring("pool", name)?;
        let mut io: ffi::IoCtx = ptr::null_mut();
        // SAFETY: a connected handle; `io` receives a new context.
        check(|| format!("opening pool {name}"), unsafe {
            (api().rados_ioctx_create)(self.handle.0, c.as_ptr(), &mut io)
        })?;
        Ok(Pool { io: Arc::new(IoHandle(io, self.handle.clone())), name: name.to_string() })
    }

    /// Raw cluster-wide (kb, kb_used, kb_avail); zeros when no mgr reports.
    pub fn stat(&self) -> Result<(u64, u64, u64)> {
        let mut s = ffi::ClusterStat { kb: 0, kb_used: 0, kb_avail: 0, num_objects: 0 };
        // SAFETY: writes the struct.
        check(|| "reading cluster usage".into(), unsafe {
            (api().rados_cluster_stat)(self.handle.0, &mut s)
        })?;
        Ok((s.kb, s.kb_used, s.kb_avail))
    }

    /// A monitor command (JSON); answers its output.
    pub fn mon_command(&self, json: &str) -> Result<String> {
        let api = api();
        let c = cstring("command", json)?;
        let mut cmd = [c.as_ptr()];
        let (mut out, mut out_len, mut status, mut status_len) =
            (ptr::null_mut(), 0, ptr::null_mut(), 0);
        // SAFETY: one command string; librados allocates the outputs, freed below.
        let ret = unsafe {
            (api.rados_mon_command)(
                self.handle.0,
                cmd.as_mut_ptr(),
                1,
                ptr::null(),
                0,
                &mut out,
                &mut out_len,
                &mut status,
                &mut status_len,
            )
        };
        // SAFETY: buffers of the given lengths, or NULL.
        let take = |p: *mut c_char, len: usize| unsafe {
            if p.is_null() {
                return String::new();
            }
            let s = String::from_utf8_lossy(std::slice::from_raw_parts(p as *const u8, len))
                .into_owned();
            (api.rados_buffer_free)(p);
            s
        };
        let (out, status) = (take(out, out_len), take(status, status_len));
        check(|| format!("monitor command {json}: {status}"), ret)?;
        Ok(out)
    }

    /// This client's address as other clients see it (in lock owners).
    pub fn address(&self) -> Result<String> {
        let mut p = ptr::null_mut();
        // SAFETY: librados allocates the string; freed below.
        check(|| "reading this client's address".into(), unsafe {
            (api().rados_getaddrs)(self.handle.0, &mut p)
        })?;
        // SAFETY: a NUL-terminated string from librados.
        let s = unsafe { owned(p) };
        // SAFETY: as above.
        unsafe { (api().rados_buffer_free)(p) };
        Ok(s)
    }

    /// Fences a client: the OSDs refuse its I/O from now on.
    pub fn blocklist(&self, address: &str, expire: Duration) -> Result<()> {
        let c = cstring("address", address)?;
        let mut buf = c.into_bytes_with_nul();
        // SAFETY: a NUL-terminated, mutable copy of the address.
        check(|| format!("blocklisting {address}"), unsafe {
            (api().rados_blocklist_add)(
                self.handle.0,
                buf.as_mut_ptr().cast(),
                expire.as_secs() as u32,
            )
        })
        .map(drop)
    }
}

/// An I/O context, and its cluster, held so the cluster is shut down only
/// after the context is destroyed.
struct IoHandle(ffi::IoCtx, #[allow(dead_code)] Arc<ClusterHandle>);

// SAFETY: librados I/O contexts may be used from any thread at once.
unsafe impl Send for IoHandle {}
// SAFETY: as above.
unsafe impl Sync for IoHandle {}

impl Drop for IoHandle {
    fn drop(&mut self) {
        // SAFETY: destroyed once, before its cluster (held by the Arc).
        unsafe { (api().rados_ioctx_destroy)(self.0) }
    }
}

/// Options for a new image.
#[derive(Clone, Debug, Default)]
pub struct ImageOptions {
    pub features: u64,
    pub data_pool: Option<String>,
}

struct OptionsHandle(ffi::Options);

impl OptionsHandle {
    fn new(o: &ImageOptions, clone: bool) -> Result<OptionsHandle> {
        let api = api();
        let mut h = ptr::null_mut();
        // SAFETY: allocates an options object, destroyed on drop.
        unsafe { (api.rbd_image_options_create)(&mut h) };
        let opts = OptionsHandle(h);
        // SAFETY: a live options object and valid option numbers.
        unsafe {
            check(
                || "image format".into(),
                (api.rbd_image_options_set_uint64)(h, ffi::OPTION_FORMAT, 2),
            )?;
            check(
                || "image features".into(),
                (api.rbd_image_options_set_uint64)(h, ffi::OPTION_FEATURES, o.features),
            )?;
        }
        if clone {
            // SAFETY: as above.
            check(|| "clone format".into(), unsafe {
                (api.rbd_image_options_set_uint64)(h, ffi::OPTION_CLONE_FORMAT, 2)
            })?;
        }
        if let Some(dp) = &o.data_pool {
            let c = cstring("data pool", dp)?;
            // SAFETY: as above; the string is copied by librbd.
            check(|| "data pool".into(), unsafe {
                (api.rbd_image_options_set_string)(h, ffi::OPTION_DATA_POOL, c.as_ptr())
            })?;
        }
        Ok(opts)
    }
}

impl Drop for OptionsHandle {
    fn drop(&mut self) {
        // SAFETY: created by rbd_image_options_create, destroyed once.
        unsafe { (api().rbd_image_options_destroy)(self.0) }
    }
}

/// An entry of the pool's RBD trash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrashEntry {
    pub id: String,
    pub name: String,
}

/// A group snapshot's name and whether it was completed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupSnap {
    pub name: String,
    pub complete: bool,
}

/// An I/O context on one pool.
#[derive(Clone)]
pub struct Pool {
    io: Arc<IoHandle>,
    name: String,
}

impl Pool {
    pub fn name(&self) -> &str {
        &self.name
    }

    fn io(&self) -> ffi::IoCtx {
        self.io.0
    }

    pub fn create_image(&self, name: &str, size: u64, options: &ImageOptions) -> Result<()> {
        let c = cstring("image", name)?;
        let opts = OptionsHandle::new(options, false)?;
        // SAFETY: a live pool, valid string and options.
        check(|| format!("creating image {}/{name}", self.name), unsafe {
            (api().rbd_create4)(self.io(), c.as_ptr(), size, opts.0)
        })
        .map(drop)
    }

    /// A copy-on-write clone (format 2: the snapshot needs no protection)
    /// of `parent@snap` (a user snapshot) into `child` in `target`.
    pub fn clone_image(
        &self,
        parent: &str,
        snap: &str,
        target: &Pool,
        child: &str,
        options: &ImageOptions,
    ) -> Result<()> {
        let (p, s, c) =
            (cstring("image", parent)?, cstring("snapshot", snap)?, cstring("image", child)?);
        let opts = OptionsHandle::new(options, true)?;
        // SAFETY: live pools, valid strings and options.
        check(
            || format!("cloning {}/{parent}@{snap} to {}/{child}", self.name, target.name),
            unsafe {
                (api().rbd_clone3)(
                    self.io(),
                    p.as_ptr(),
                    s.as_ptr(),
                    target.io(),
                    c.as_ptr(),
                    opts.0,
                )
            },
        )
        .map(drop)
    }

    /// A clone from a snapshot by id (any namespace, so group members too):
    /// None when the library has no `rbd_clone4` (before Squid).
    pub fn clone_image_by_snap_id(
        &self,
        parent: &str,
        snap_id: u64,
        target: &Pool,
        child: &str,
        options: &ImageOptions,
    ) -> Option<Result<()>> {
        let f = api().rbd_clone4?;
        Some((|| {
            let (p, c) = (cstring("image", parent)?, cstring("image", child)?);
            let opts = OptionsHandle::new(options, true)?;
            // SAFETY: live pools, valid strings and options.
            check(
                || format!("cloning {}/{parent}@{snap_id} to {}/{child}", self.name, target.name),
                unsafe { f(self.io(), p.as_ptr(), snap_id, target.io(), c.as_ptr(), opts.0) },
            )
            .map(drop)
        })())
    }

    /// Removes an image: EBUSY while a client has it open (watchers),
    /// ENOTEMPTY while it has snapshots (including ones its clones hold).
    pub fn remove_image(&self, name: &str) -> Result<()> {
        let c = cstring("image", name)?;
        // SAFETY: a live pool and valid string.
        check(|| format!("removing image {}/{name}", self.name), unsafe {
            (api().rbd_remove)(self.io(), c.as_ptr())
        })
        .map(drop)
    }

    pub fn rename_image(&self, from: &str, to: &str) -> Result<()> {
        let (f, t) = (cstring("image", from)?, cstring("image", to)?);
        // SAFETY: a live pool and valid strings.
        check(|| format!("renaming {}/{from} to {to}", self.name), unsafe {
            (api().rbd_rename)(self.io(), f.as_ptr(), t.as_ptr())
        })
        .map(drop)
    }

    pub fn trash_move(&self, name: &str) -> Result<()> {
        let c = cstring("image", name)?;
        // SAFETY: as above.
        check(|| format!("moving {}/{name} to the trash", self.name), unsafe {
            (api().rbd_trash_move)(self.io(), c.as_ptr(), 0)
        })
        .map(drop)
    }

    pub fn trash_list(&self) -> Result<Vec<TrashEntry>> {
        let api = api();
        let mut cap = 32usize;
        loop {
            let mut entries: Vec<ffi::TrashInfo> = Vec::with_capacity(cap);
            let mut n = cap;
            // SAFETY: room for `cap` entries; librbd fills `n` of them.
            let ret = unsafe { (api.rbd_trash_list)(self.io(), entries.as_mut_ptr(), &mut n) };
            if ret == -libc::ERANGE {
                cap = n.max(cap * 2);
                continue;
            }
            check(|| format!("listing the trash of {}", self.name), ret)?;
            let count = ret as usize;
            // SAFETY: librbd initialised `count` entries.
            unsafe { entries.set_len(count) };
            // SAFETY: valid strings in initialised entries.
            let out = entries
                .iter()
                .map(|e| unsafe { TrashEntry { id: owned(e.id), name: owned(e.name) } })
                .collect();
            // SAFETY: releases what rbd_trash_list allocated.
            unsafe { (api.rbd_trash_list_cleanup)(entries.as_mut_ptr(), count) };
            return Ok(out);
        }
    }

    /// Removes a trashed image for good: ENOTEMPTY while it has snapshots.
    /// (Forced past its deferment time: ours are moved with none, and the
    /// time is kept in whole seconds, so "now" can still be too early.)
    pub fn trash_remove(&self, id: &str) -> Result<()> {
        let c = cstring("image id", id)?;
        // SAFETY: a live pool and valid string.
        check(|| format!("purging image {id} from the trash of {}", self.name), unsafe {
            (api().rbd_trash_remove)(self.io(), c.as_ptr(), true)
        })
        .map(drop)
    }

    /// Whether a watcher's address (as [`Image::watchers`] lists them) is
    /// one of this process's own clients (whichever credentials it
    /// connected with: the purger's, a request's): addresses end in
    /// `/<nonce>`, unique per client.
    pub fn is_own_watcher(&self, watcher: &str) -> bool {
        let theirs = nonces(watcher);
        let own = own_clients();
        !theirs.is_empty() && theirs.iter().all(|n| own.contains(n))
    }

    /// Brings a trashed image back into the pool's directory as `name`.
    pub fn trash_restore(&self, id: &str, name: &str) -> Result<()> {
        let (i, n) = (cstring("image id", id)?, cstring("image", name)?);
        // SAFETY: a live pool and valid strings.
        check(
            || format!("restoring image {id} from the trash of {} as {name}", self.name),
            unsafe { (api().rbd_trash_restore)(self.io(), i.as_ptr(), n.as_ptr()) },
        )
        .map(drop)
    }

    /// Every image of the pool: (id, name).
    pub fn list_images(&self) -> Result<Vec<(String, String)>> {
        let api = api();
        let mut cap = 64usize;
        loop {
            let mut specs: Vec<ffi::ImageSpec> = Vec::with_capacity(cap);
            let mut n = cap;
            // SAFETY: room for `cap` specs; librbd fills `n`.
            let ret = unsafe { (api.rbd_list2)(self.io(), specs.as_mut_ptr(), &mut n) };
            if ret == -libc::ERANGE {
                cap = n.max(cap * 2);
                continue;
            }
            check(|| format!("listing images of {}", self.name), ret)?;
            // SAFETY: librbd initialised `n` specs.
            unsafe { specs.set_len(n) };
            // SAFETY: valid strings.
            let out = specs.iter().map(|s| unsafe { (owned(s.id), owned(s.name)) }).collect();
            // SAFETY: releases what rbd_list2 allocated.
            unsafe { (api.rbd_image_spec_list_cleanup)(specs.as_mut_ptr(), n) };
            return Ok(out);
        }
    }

    fn open_with(
        &self,
        what: &str,
        key: &str,
        f: unsafe extern "C" fn(ffi::IoCtx, *const c_char, *mut ffi::Image, *const c_char) -> c_int,
    ) -> Result<Image> {
        let c = cstring("image", key)?;
        let mut h = ptr::null_mut();
        // SAFETY: a live pool and valid string; `h` receives the image.
        check(|| format!("opening {what} {}/{key}", self.name), unsafe {
            f(self.io(), c.as_ptr(), &mut h, ptr::null())
        })?;
        Ok(Image { h, _io: self.io.clone() })
    }

    /// Opens an image for writing (registers a watch on its header).
    pub fn open(&self, name: &str) -> Result<Image> {
        self.open_with("image", name, api().rbd_open)
    }

    pub fn open_read_only(&self, name: &str) -> Result<Image> {
        self.open_with("image", name, api().rbd_open_read_only)
    }

    /// By image id: also finds an image in the trash.
    pub fn open_by_id(&self, id: &str) -> Result<Image> {
        self.open_with("image id", id, api().rbd_open_by_id)
    }

    pub fn open_by_id_read_only(&self, id: &str) -> Result<Image> {
        self.open_with("image id", id, api().rbd_open_by_id_read_only)
    }

    /// Reads a small object whole (None: it does not exist).
    pub fn read_object(&self, oid: &str) -> Result<Option<Vec<u8>>> {
        let c = cstring("object", oid)?;
        let mut buf = vec![0u8; 64 * 1024];
        // SAFETY: a buffer of the given length.
        let ret = unsafe {
            (api().rados_read)(self.io(), c.as_ptr(), buf.as_mut_ptr().cast(), buf.len(), 0)
        };
        if ret == -libc::ENOENT {
            return Ok(None);
        }
        let n = check(|| format!("reading object {oid} in {}", self.name), ret)? as usize;
        buf.truncate(n);
        Ok(Some(buf))
    }

    /// Creates an object with this content unless it exists (EEXIST).
    pub fn create_object(&self, oid: &str, data: &[u8]) -> Result<()> {
        self.write_op(oid, data, true)
    }

    /// Replaces an object's content (creating it if need be), atomically.
    pub fn write_object(&self, oid: &str, data: &[u8]) -> Result<()> {
        self.write_op(oid, data, false)
    }

    fn write_op(&self, oid: &str, data: &[u8], exclusive: bool) -> Result<()> {
        let api = api();
        let c = cstring("object", oid)?;
        // SAFETY: a new write op, released below; the buffers outlive it.
        unsafe {
            let op = (api.rados_create_write_op)();
            if exclusive {
                (api.rados_write_op_create)(op, ffi::CREATE_EXCLUSIVE, ptr::null());
            }
            (api.rados_write_op_write_full)(op, data.as_ptr().cast(), data.len());
            let ret = (api.rados_write_op_operate)(op, self.io(), c.as_ptr(), ptr::null_mut(), 0);
            (api.rados_release_write_op)(op);
            check(|| format!("writing object {oid} in {}", self.name), ret).map(drop)
        }
    }

    /// Removes an object; a missing one is fine.
    pub fn remove_object(&self, oid: &str) -> Result<()> {
        let c = cstring("object", oid)?;
        // SAFETY: a live pool and valid string.
        let ret = unsafe { (api().rados_remove)(self.io(), c.as_ptr()) };
        if ret == -libc::ENOENT {
            return Ok(());
        }
        check(|| format!("removing object {oid} in {}", self.name), ret).map(drop)
    }

    fn group_call(
        &self,
        what: &str,
        group: &str,
        f: unsafe extern "C" fn(ffi::IoCtx, *const c_char) -> c_int,
    ) -> Result<()> {
        let g = cstring("group", group)?;
        // SAFETY: a live pool and valid string.
        check(|| format!("{what} group {}/{group}", self.name), unsafe { f(self.io(), g.as_ptr()) })
            .map(drop)
    }

    pub fn group_create(&self, group: &str) -> Result<()> {
        self.group_call("creating", group, api().rbd_group_create)
    }

    pub fn group_remove(&self, group: &str) -> Result<()> {
        self.group_call("removing", group, api().rbd_group_remove)
    }

    pub fn group_add(&self, group: &str, image_pool: &Pool, image: &str) -> Result<()> {
        let (g, i) = (cstring("group", group)?, cstring("image", image)?);
        // SAFETY: live pools and valid strings.
        check(|| format!("adding {}/{image} to group {group}", image_pool.name), unsafe {
            (api().rbd_group_image_add)(self.io(), g.as_ptr(), image_pool.io(), i.as_ptr())
        })
        .map(drop)
    }

    pub fn group_remove_image(&self, group: &str, image_pool: &Pool, image_id: &str) -> Result<()> {
        let (g, i) = (cstring("group", group)?, cstring("image id", image_id)?);
        // SAFETY: live pools and valid strings.
        check(|| format!("removing image {image_id} from group {group}"), unsafe {
            (api().rbd_group_image_remove_by_id)(self.io(), g.as_ptr(), image_pool.io(), i.as_ptr())
        })
        .map(drop)
    }

    /// Snapshots every image of the group at one instant (writers paused
    /// through their exclusive locks).
    pub fn group_snap_create(&self, group: &str, snap: &str) -> Result<()> {
        let (g, s) = (cstring("group", group)?, cstring("snapshot", snap)?);
        // SAFETY: a live pool and valid strings.
        check(|| format!("snapshotting group {}/{group}", self.name), unsafe {
            (api().rbd_group_snap_create)(self.io(), g.as_ptr(), s.as_ptr())
        })
        .map(drop)
    }

    pub fn group_snap_remove(&self, group: &str, snap: &str) -> Result<()> {
        let (g, s) = (cstring("group", group)?, cstring("snapshot", snap)?);
        // SAFETY: as above.
        check(|| format!("removing snapshot {snap} of group {}/{group}", self.name), unsafe {
            (api().rbd_group_snap_remove)(self.io(), g.as_ptr(), s.as_ptr())
        })
        .map(drop)
    }

    pub fn group_snaps(&self, group: &str) -> Result<Vec<GroupSnap>> {
        let api = api();
        let g = cstring("group", group)?;
        let mut cap = 8usize;
        loop {
            let mut snaps: Vec<ffi::GroupSnapInfo> = Vec::with_capacity(cap);
            let mut n = cap;
            // SAFETY: room for `cap` entries of the declared size.
            let ret = unsafe {
                (api.rbd_group_snap_list)(
                    self.io(),
                    g.as_ptr(),
                    snaps.as_mut_ptr(),
                    size_of::<ffi::GroupSnapInfo>(),
                    &mut n,
                )
            };
            if ret == -libc::ERANGE {
                cap = n.max(cap * 2);
                continue;
            }
            check(|| format!("listing snapshots of group {}/{group}", self.name), ret)?;
            // SAFETY: librbd initialised `n` entries.
            unsafe { snaps.set_len(n) };
            let out = snaps
                .iter()
                // SAFETY: valid strings.
                .map(|s| GroupSnap {
                    name: unsafe { owned(s.name) },
                    complete: s.state == ffi::GROUP_SNAP_STATE_COMPLETE,
                })
                .collect();
            // SAFETY: releases what the list allocated.
            unsafe {
                (api.rbd_group_snap_list_cleanup)(
                    snaps.as_mut_ptr(),
                    size_of::<ffi::GroupSnapInfo>(),
                    n,
                )
            };
            return Ok(out);
        }
    }
}

/// Which namespace a snapshot lives in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SnapNamespace {
    /// Made by `rbd_snap_create`: found by name.
    User,
    /// A member of a group snapshot.
    Group {
        group: String,
        snap: String,
    },
    /// Removed while clones still depend on it (clone format 2).
    Trash,
    Other(i32),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snap {
    pub id: u64,
    pub size: u64,
    pub name: String,
}

/// The image a clone was made from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parent {
    pub pool: String,
    pub image_id: String,
    pub image_name: String,
    pub snap_id: u64,
    pub in_trash: bool,
}

/// One open image.
pub struct Image {
    h: ffi::Image,
    _io: Arc<IoHandle>,
}

// SAFETY: an open image may move between threads; `&mut`/`&` use from one
// thread at a time is guaranteed by Image not being Sync.
unsafe impl Send for Image {}

impl Drop for Image {
    fn drop(&mut self) {
        // SAFETY: opened once, closed once.
        unsafe { (api().rbd_close)(self.h) };
    }
}

impl Image {
    pub fn size(&self) -> Result<u64> {
        // SAFETY: zeroed POD, written by librbd.
        let mut info: ffi::ImageInfo = unsafe { std::mem::zeroed() };
        // SAFETY: an open image and a struct of the declared size.
        check(|| "reading image size".into(), unsafe {
            (api().rbd_stat)(self.h, &mut info, size_of::<ffi::ImageInfo>())
        })?;
        Ok(info.size)
    }

    pub fn id(&self) -> Result<String> {
        let mut buf = [0 as c_char; 64];
        // SAFETY: a buffer of the given length.
        check(|| "reading image id".into(), unsafe {
            (api().rbd_get_id)(self.h, buf.as_mut_ptr(), buf.len())
        })?;
        // SAFETY: NUL-terminated by librbd.
        Ok(unsafe { owned(buf.as_ptr()) })
    }

    pub fn name(&self) -> Result<String> {
        let mut buf = vec![0 as c_char; 128];
        let mut len = buf.len();
        // SAFETY: a buffer of the given length.
        check(|| "reading image name".into(), unsafe {
            (api().rbd_get_name)(self.h, buf.as_mut_ptr(), &mut len)
        })?;
        // SAFETY: NUL-terminated by librbd.
        Ok(unsafe { owned(buf.as_ptr()) })
    }

    pub fn features(&self) -> Result<u64> {
        let mut f = 0;
        // SAFETY: writes one u64.
        check(|| "reading image features".into(), unsafe {
            (api().rbd_get_features)(self.h, &mut f)
        })?;
        Ok(f)
    }

    pub fn created(&self) -> Result<SystemTime> {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: writes one timespec.
        check(|| "reading image creation time".into(), unsafe {
            (api().rbd_get_create_timestamp)(self.h, &mut ts)
        })?;
        Ok(to_time(ts))
    }

    /// The clone's parent, None for an image that is not a clone.
    pub fn parent(&self) -> Result<Option<Parent>> {
        let api = api();
        // SAFETY: zeroed POD out-parameters, released by the cleanups.
        let (mut image, mut snap): (ffi::LinkedImageSpec, ffi::SnapSpec) =
            unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
        // SAFETY: an open image and two out-parameters.
        let ret = unsafe { (api.rbd_get_parent)(self.h, &mut image, &mut snap) };
        if ret == -libc::ENOENT {
            return Ok(None);
        }
        check(|| "reading the parent".into(), ret)?;
        // SAFETY: librbd filled both specs.
        let parent = unsafe {
            Parent {
                pool: owned(image.pool_name),
                image_id: owned(image.image_id),
                image_name: owned(image.image_name),
                snap_id: snap.id,
                in_trash: image.trash,
            }
        };
        // SAFETY: releases the strings librbd allocated.
        unsafe {
            (api.rbd_linked_image_spec_cleanup)(&mut image);
            (api.rbd_snap_spec_cleanup)(&mut snap);
        }
        Ok(Some(parent))
    }

    /// The group the image belongs to: (pool id, name), None for none.
    pub fn group(&self) -> Result<Option<(i64, String)>> {
        let api = api();
        let mut info = ffi::GroupInfo { name: ptr::null_mut(), pool: -1 };
        // SAFETY: an out-parameter of the declared size.
        check(|| "reading the image's group".into(), unsafe {
            (api.rbd_get_group)(self.h, &mut info, size_of::<ffi::GroupInfo>())
        })?;
        // SAFETY: a valid string or NULL.
        let name = unsafe { owned(info.name) };
        // SAFETY: releases what rbd_get_group allocated.
        unsafe { (api.rbd_group_info_cleanup)(&mut info, size_of::<ffi::GroupInfo>()) };
        Ok((info.pool >= 0 && !name.is_empty()).then_some((info.pool, name)))
    }

    pub fn resize(&self, size: u64) -> Result<()> {
        // SAFETY: no progress callback.
        check(|| format!("resizing to {size} bytes"), unsafe {
            (api().rbd_resize2)(self.h, size, false, ptr::null(), ptr::null_mut())
        })
        .map(drop)
    }

    /// Copies every block up from the parent, so the clone stands alone.
    pub fn flatten(&self) -> Result<()> {
        // SAFETY: an open image.
        check(|| "flattening".into(), unsafe { (api().rbd_flatten)(self.h) }).map(drop)
    }

    /// Copies the image as it is at its current snapshot (see
    /// [`Image::set_snap_id`]) into a new image: a full copy.
    pub fn copy_to(&self, target: &Pool, name: &str, options: &ImageOptions) -> Result<()> {
        let c = cstring("image", name)?;
        let opts = OptionsHandle::new(options, false)?;
        // SAFETY: an open image, a live pool, valid string and options.
        check(|| format!("copying to {}/{name}", target.name), unsafe {
            (api().rbd_copy3)(self.h, target.io(), c.as_ptr(), opts.0)
        })
        .map(drop)
    }

    pub fn metadata(&self, key: &str) -> Result<Option<String>> {
        let k = cstring("key", key)?;
        let mut buf = vec![0 as c_char; 4096];
        loop {
            let mut len = buf.len();
            // SAFETY: a buffer of the given length.
            let ret =
                unsafe { (api().rbd_metadata_get)(self.h, k.as_ptr(), buf.as_mut_ptr(), &mut len) };
            match ret {
                r if r == -libc::ENOENT => return Ok(None),
                r if r == -libc::ERANGE => buf.resize(len.max(buf.len() * 2), 0),
                r => {
                    check(|| format!("reading metadata {key}"), r)?;
                    // SAFETY: NUL-terminated by librbd.
                    return Ok(Some(unsafe { owned(buf.as_ptr()) }));
                }
            }
        }
    }

    pub fn set_metadata(&self, key: &str, value: &str) -> Result<()> {
        let (k, v) = (cstring("key", key)?, cstring("value", value)?);
        // SAFETY: valid strings.
        check(|| format!("writing metadata {key}"), unsafe {
            (api().rbd_metadata_set)(self.h, k.as_ptr(), v.as_ptr())
        })
        .map(drop)
    }

    /// Every snapshot the image has, in any namespace.
    pub fn snaps(&self) -> Result<Vec<Snap>> {
        let api = api();
        let mut cap = 16;
        loop {
            // rbd_snap_list writes `max` entries plus a terminating one.
            let mut snaps: Vec<ffi::SnapInfo> = Vec::with_capacity(cap as usize + 1);
            let mut max: c_int = cap;
            // SAFETY: room for `cap` + 1 entries.
            let ret = unsafe { (api.rbd_snap_list)(self.h, snaps.as_mut_ptr(), &mut max) };
            if ret == -libc::ERANGE {
                cap = max.max(cap * 2);
                continue;
            }
            let n = check(|| "listing snapshots".into(), ret)? as usize;
            // SAFETY: librbd initialised `n` entries (and the terminator).
            unsafe { snaps.set_len(n + 1) };
            // SAFETY: valid strings.
            let out = snaps[..n]
                .iter()
                .map(|s| Snap { id: s.id, size: s.size, name: unsafe { owned(s.name) } })
                .collect();
            // SAFETY: releases the names rbd_snap_list allocated.
            unsafe { (api.rbd_snap_list_end)(snaps.as_mut_ptr()) };
            return Ok(out);
        }
    }

    pub fn snap_create(&self, name: &str) -> Result<()> {
        let c = cstring("snapshot", name)?;
        // SAFETY: a valid string.
        check(|| format!("creating snapshot {name}"), unsafe {
            (api().rbd_snap_create)(self.h, c.as_ptr())
        })
        .map(drop)
    }

    /// Removes a user snapshot; one its clones still use moves to the
    /// trash namespace and goes when they do.
    pub fn snap_remove(&self, name: &str) -> Result<()> {
        let c = cstring("snapshot", name)?;
        // SAFETY: a valid string.
        check(|| format!("removing snapshot {name}"), unsafe {
            (api().rbd_snap_remove)(self.h, c.as_ptr())
        })
        .map(drop)
    }

    /// Reads from now on come from this user snapshot.
    pub fn set_snap(&self, name: &str) -> Result<()> {
        let c = cstring("snapshot", name)?;
        // SAFETY: a valid string.
        check(|| format!("reading at snapshot {name}"), unsafe {
            (api().rbd_snap_set)(self.h, c.as_ptr())
        })
        .map(drop)
    }

    /// Reads from now on come from this snapshot (any namespace).
    pub fn set_snap_id(&self, id: u64) -> Result<()> {
        // SAFETY: an open image.
        check(|| format!("reading at snapshot id {id}"), unsafe {
            (api().rbd_snap_set_by_id)(self.h, id)
        })
        .map(drop)
    }

    pub fn snap_created(&self, id: u64) -> Result<SystemTime> {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: writes one timespec.
        check(|| "reading snapshot time".into(), unsafe {
            (api().rbd_snap_get_timestamp)(self.h, id, &mut ts)
        })?;
        Ok(to_time(ts))
    }

    pub fn snap_namespace(&self, id: u64) -> Result<SnapNamespace> {
        let api = api();
        let mut kind: c_int = -1;
        // SAFETY: writes one enum value.
        check(|| "reading snapshot namespace".into(), unsafe {
            (api.rbd_snap_get_namespace_type)(self.h, id, &mut kind)
        })?;
        Ok(match kind {
            ffi::SNAP_NAMESPACE_USER => SnapNamespace::User,
            ffi::SNAP_NAMESPACE_TRASH => SnapNamespace::Trash,
            ffi::SNAP_NAMESPACE_GROUP => {
                let mut ns = ffi::SnapGroupNamespace {
                    group_pool: -1,
                    group_name: ptr::null_mut(),
                    group_snap_name: ptr::null_mut(),
                };
                let size = size_of::<ffi::SnapGroupNamespace>();
                // SAFETY: an out-parameter of the declared size.
                check(|| "reading snapshot group".into(), unsafe {
                    (api.rbd_snap_get_group_namespace)(self.h, id, &mut ns, size)
                })?;
                // SAFETY: valid strings.
                let out = unsafe {
                    SnapNamespace::Group {
                        group: owned(ns.group_name),
                        snap: owned(ns.group_snap_name),
                    }
                };
                // SAFETY: releases what librbd allocated.
                unsafe { (api.rbd_snap_group_namespace_cleanup)(&mut ns, size) };
                out
            }
            other => SnapNamespace::Other(other),
        })
    }

    /// Calls `each(offset, length, exists)` for every extent that differs
    /// from `from` (a user snapshot; None: from nothing, so every allocated
    /// extent), reading at the image's current snapshot, parents included.
    pub fn diff(
        &self,
        from: Option<&str>,
        len: u64,
        each: &mut dyn FnMut(u64, u64, bool),
    ) -> Result<()> {
        unsafe extern "C" fn trampoline(
            off: u64,
            len: usize,
            exists: c_int,
            arg: *mut c_void,
        ) -> c_int {
            // SAFETY: `arg` is the `&mut &mut dyn FnMut` passed below, alive
            // for the call; librbd calls back on the calling thread's behalf
            // and never concurrently.
            let f = unsafe { &mut *(arg as *mut &mut dyn FnMut(u64, u64, bool)) };
            f(off, len as u64, exists != 0);
            0
        }
        let from = from.map(|s| cstring("snapshot", s)).transpose()?;
        let mut each = each;
        // SAFETY: the callback's argument outlives the call.
        check(|| "diffing".into(), unsafe {
            (api().rbd_diff_iterate2)(
                self.h,
                from.as_ref().map_or(ptr::null(), |c| c.as_ptr()),
                0,
                len,
                1,
                0,
                trampoline,
                (&mut each) as *mut &mut dyn FnMut(u64, u64, bool) as *mut c_void,
            )
        })
        .map(drop)
    }

    /// Addresses of the clients that have the image open.
    pub fn watchers(&self) -> Result<Vec<String>> {
        let api = api();
        let mut cap = 8usize;
        loop {
            let mut w: Vec<ffi::Watcher> = Vec::with_capacity(cap);
            let mut n = cap;
            // SAFETY: room for `cap` entries.
            let ret = unsafe { (api.rbd_watchers_list)(self.h, w.as_mut_ptr(), &mut n) };
            if ret == -libc::ERANGE {
                cap = n.max(cap * 2);
                continue;
            }
            check(|| "listing watchers".into(), ret)?;
            // SAFETY: librbd initialised `n` entries.
            unsafe { w.set_len(n) };
            // SAFETY: valid strings.
            let out = w.iter().map(|x| unsafe { owned(x.addr) }).collect();
            // SAFETY: releases what the list allocated.
            unsafe { (api.rbd_watchers_list_cleanup)(w.as_mut_ptr(), n) };
            return Ok(out);
        }
    }

    /// Who holds the exclusive lock (client addresses with cookies).
    pub fn lock_owners(&self) -> Result<Vec<String>> {
        let api = api();
        let mut owners: [*mut c_char; 8] = [ptr::null_mut(); 8];
        let mut n = owners.len();
        let mut mode: c_int = 0;
        // SAFETY: room for 8 owners (an exclusive lock has at most one).
        let ret =
            unsafe { (api.rbd_lock_get_owners)(self.h, &mut mode, owners.as_mut_ptr(), &mut n) };
        if ret == -libc::ENOENT {
            return Ok(vec![]);
        }
        check(|| "reading lock owners".into(), ret)?;
        // SAFETY: `n` valid strings.
        let out = owners[..n].iter().map(|p| unsafe { owned(*p) }).collect();
        // SAFETY: releases what librbd allocated.
        unsafe { (api.rbd_lock_get_owners_cleanup)(owners.as_mut_ptr(), n) };
        Ok(out)
    }

    pub fn lock_break(&self, owner: &str) -> Result<()> {
        let c = cstring("owner", owner)?;
        // SAFETY: a valid string.
        check(|| format!("breaking the lock of {owner}"), unsafe {
            (api().rbd_lock_break)(self.h, ffi::LOCK_MODE_EXCLUSIVE, c.as_ptr())
        })
        .map(drop)
    }
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
