//! Connecting to a cluster, and I/O contexts on its pools (objects read
//! and written whole: the engine's small records).

use std::ffi::c_char;
use std::ptr;
use std::sync::Arc;

use crate::{api, check, cstring, ffi, libraries, owned, CephError, Result};
use std::fmt;
use std::path::Path;
use std::time::Duration;

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

impl Connect<'_> {
    /// Configures a client not yet connected: its config file (`read`),
    /// then each option (`set`); `timeouts`: the options the library has
    /// for `op_timeout` besides the mount timeout.
    pub(crate) fn apply(
        &self,
        read: impl FnOnce(&Path) -> Result<()>,
        set: impl Fn(&str, &str) -> Result<()>,
        timeouts: &[&str],
    ) -> Result<()> {
        if let Some(conf) = self.conf {
            read(conf)?;
        }
        if let Some(mon) = self.mon_host {
            set("mon_host", mon)?;
        }
        if let Some(key) = self.key {
            set("key", key)?;
        }
        if let Some(keyring) = self.keyring {
            set("keyring", &keyring.to_string_lossy())?;
        }
        if self.op_timeout > 0 {
            let t = self.op_timeout.to_string();
            for option in timeouts.iter().chain(&["client_mount_timeout"]) {
                set(option, &t)?;
            }
        }
        // Our logs are ours: the library's own go nowhere unless
        // configured.
        set("log_to_stderr", "false")?;
        set("err_to_stderr", "false")
    }
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

pub(crate) struct ClusterHandle(ffi::Rados);

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
pub(crate) fn own_clients() -> std::sync::MutexGuard<'static, std::collections::HashSet<String>> {
    static OWN: std::sync::LazyLock<std::sync::Mutex<std::collections::HashSet<String>>> =
        std::sync::LazyLock::new(Default::default);
    OWN.lock().unwrap_or_else(|p| p.into_inner())
}

/// The nonces of an address list (`[v2:1.2.3.4:0/123,v1:…/123]`).
pub(crate) fn nonces(address: &str) -> Vec<String> {
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
    pub(crate) handle: Arc<ClusterHandle>,
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
        let read = |conf: &Path| -> Result<()> {
            let c = cstring("config path", &conf.to_string_lossy())?;
            // SAFETY: as above.
            check(|| format!("reading {}", conf.display()), unsafe {
                (api.rados_conf_read_file)(handle.0, c.as_ptr())
            })
            .map(drop)
        };
        // Not rados_mon_op_timeout: it also bounds manager commands, and a
        // timed-out manager command crashes Pacific's librados when its
        // reply comes (see `mgr_command`). Callers bound their waits.
        how.apply(read, set, &["rados_osd_op_timeout"])?;
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
        self.command("monitor", api().rados_mon_command, json)
    }

    /// A manager command (JSON), as `ceph fs subvolume …` sends them;
    /// answers its output. The manager's modules answer errors with an
    /// errno and a message, which the error carries.
    ///
    /// Never timed out by librados (see [`Connect::apply`]): Pacific's
    /// librados gives up waiting for a manager command after
    /// `rados_mon_op_timeout` but leaves the command's reply buffers (the
    /// C call's own locals) registered, and the late reply is then written
    /// into freed memory: the process crashes. Seen here when a subvolume
    /// removal waited on the capabilities of a killed client for longer
    /// than the timeout.
    pub fn mgr_command(&self, json: &str) -> Result<String> {
        self.command("manager", api().rados_mgr_command, json)
    }

    fn command(&self, whose: &str, call: ffi::CommandFn, json: &str) -> Result<String> {
        let api = api();
        let c = cstring("command", json)?;
        let mut cmd = [c.as_ptr()];
        let (mut out, mut out_len, mut status, mut status_len) =
            (ptr::null_mut(), 0, ptr::null_mut(), 0);
        // SAFETY: one command string; librados allocates the outputs, freed below.
        let ret = unsafe {
            call(
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
        check(|| format!("{whose} command {json}: {status}"), ret)?;
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
pub(crate) struct IoHandle(pub(crate) ffi::IoCtx, #[allow(dead_code)] Arc<ClusterHandle>);

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

/// One key of an object's omap and its value.
pub type OmapEntry = (String, Vec<u8>);

/// An I/O context on one pool.
#[derive(Clone)]
pub struct Pool {
    pub(crate) io: Arc<IoHandle>,
    pub(crate) name: String,
}

impl Pool {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn io(&self) -> ffi::IoCtx {
        self.io.0
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

    /// Sets keys of an object's omap (creating the object), atomically.
    pub fn omap_set(&self, oid: &str, entries: &[(&str, &[u8])]) -> Result<()> {
        let c = cstring("object", oid)?;
        let keys =
            entries.iter().map(|(k, _)| cstring("omap key", k)).collect::<Result<Vec<_>>>()?;
        let key_ptrs: Vec<*const c_char> = keys.iter().map(|k| k.as_ptr()).collect();
        let vals: Vec<*const c_char> = entries.iter().map(|(_, v)| v.as_ptr().cast()).collect();
        let lens: Vec<usize> = entries.iter().map(|(_, v)| v.len()).collect();
        let api = api();
        // SAFETY: a new write op, released below; keys, values and lengths
        // outlive it and have `entries.len()` elements each.
        unsafe {
            let op = (api.rados_create_write_op)();
            (api.rados_write_op_omap_set)(
                op,
                key_ptrs.as_ptr(),
                vals.as_ptr(),
                lens.as_ptr(),
                entries.len(),
            );
            let ret = (api.rados_write_op_operate)(op, self.io(), c.as_ptr(), ptr::null_mut(), 0);
            (api.rados_release_write_op)(op);
            check(|| format!("setting omap keys of {oid} in {}", self.name), ret).map(drop)
        }
    }

    /// Removes keys of an object's omap; a missing object is fine.
    pub fn omap_remove(&self, oid: &str, keys: &[&str]) -> Result<()> {
        let c = cstring("object", oid)?;
        let keys = keys.iter().map(|k| cstring("omap key", k)).collect::<Result<Vec<_>>>()?;
        let key_ptrs: Vec<*const c_char> = keys.iter().map(|k| k.as_ptr()).collect();
        let api = api();
        // SAFETY: as in omap_set.
        let ret = unsafe {
            let op = (api.rados_create_write_op)();
            (api.rados_write_op_omap_rm_keys)(op, key_ptrs.as_ptr(), key_ptrs.len());
            let ret = (api.rados_write_op_operate)(op, self.io(), c.as_ptr(), ptr::null_mut(), 0);
            (api.rados_release_write_op)(op);
            ret
        };
        if ret == -libc::ENOENT {
            return Ok(());
        }
        check(|| format!("removing omap keys of {oid} in {}", self.name), ret).map(drop)
    }

    /// Up to `max` omap entries of an object after key `after` (sorted),
    /// only keys starting with `prefix`; and whether more follow. A
    /// missing object has none.
    pub fn omap_page(
        &self,
        oid: &str,
        after: &str,
        prefix: &str,
        max: u64,
    ) -> Result<(Vec<OmapEntry>, bool)> {
        let c = cstring("object", oid)?;
        let after = cstring("omap key", after)?;
        let prefix = cstring("omap key", prefix)?;
        let api = api();
        let mut out = vec![];
        let (mut more, mut prval) = (0u8, 0);
        // SAFETY: a new read op, released below; the iterator is read
        // only after the op ran and ended before the op is released; the
        // key and value buffers it hands out are copied before the next
        // step.
        let ret = unsafe {
            let op = (api.rados_create_read_op)();
            let mut iter: ffi::OmapIter = ptr::null_mut();
            (api.rados_read_op_omap_get_vals2)(
                op,
                after.as_ptr(),
                prefix.as_ptr(),
                max,
                &mut iter,
                &mut more,
                &mut prval,
            );
            let ret = (api.rados_read_op_operate)(op, self.io(), c.as_ptr(), 0);
            if ret == 0 && prval == 0 {
                loop {
                    let (mut k, mut v, mut len) = (ptr::null_mut(), ptr::null_mut(), 0usize);
                    if (api.rados_omap_get_next)(iter, &mut k, &mut v, &mut len) < 0 || k.is_null()
                    {
                        break;
                    }
                    let key = owned(k);
                    let val = match v.is_null() {
                        true => vec![],
                        false => std::slice::from_raw_parts(v.cast::<u8>(), len).to_vec(),
                    };
                    out.push((key, val));
                }
            }
            if !iter.is_null() {
                (api.rados_omap_get_end)(iter);
            }
            (api.rados_release_read_op)(op);
            if ret == 0 {
                prval
            } else {
                ret
            }
        };
        if ret == -libc::ENOENT {
            return Ok((vec![], false));
        }
        check(|| format!("reading omap of {oid} in {}", self.name), ret)?;
        Ok((out, more != 0))
    }

    /// One omap value of an object (None: no such key or object).
    pub fn omap_get(&self, oid: &str, key: &str) -> Result<Option<Vec<u8>>> {
        // Keys sort, so the first key with this prefix is the key itself
        // when it exists.
        let (found, _) = self.omap_page(oid, "", key, 1)?;
        Ok(found.into_iter().find(|(k, _)| k == key).map(|(_, v)| v))
    }
}
