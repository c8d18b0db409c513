//! RBD images: made, cloned, listed, opened; an open image's size,
//! snapshots, parents, metadata, diffs, watchers and locks.

use std::ffi::{c_char, c_int, c_void};
use std::ptr;
use std::sync::Arc;

use crate::{api, check, cstring, ffi, owned, Result};
use std::time::SystemTime;

use crate::rados::{nonces, own_clients, IoHandle, Pool};
use crate::to_time;

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

impl Pool {
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

    /// Whether a watcher's address (as [`Image::watchers`] lists them) is
    /// one of this process's own clients (whichever credentials it
    /// connected with: the purger's, a request's): addresses end in
    /// `/<nonce>`, unique per client.
    pub fn is_own_watcher(&self, watcher: &str) -> bool {
        let theirs = nonces(watcher);
        let own = own_clients();
        !theirs.is_empty() && theirs.iter().all(|n| own.contains(n))
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

    /// Calls `each(offset, length, exists)` for every extent in
    /// [offset, offset + len) that differs from `from` (a user snapshot;
    /// None: from nothing, so every allocated extent), reading at the
    /// image's current snapshot, parents included. `each` answers whether to
    /// go on; once it answers false the walk ends with ECANCELED.
    pub fn diff(
        &self,
        from: Option<&str>,
        offset: u64,
        len: u64,
        each: &mut dyn FnMut(u64, u64, bool) -> bool,
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
            let f = unsafe { &mut *(arg as *mut &mut dyn FnMut(u64, u64, bool) -> bool) };
            // A callback that wants no more ends the walk (librbd returns
            // the callback's error).
            match f(off, len as u64, exists != 0) {
                true => 0,
                false => -libc::ECANCELED,
            }
        }
        let from = from.map(|s| cstring("snapshot", s)).transpose()?;
        let mut each = each;
        // SAFETY: the callback's argument outlives the call.
        check(|| "diffing".into(), unsafe {
            (api().rbd_diff_iterate2)(
                self.h,
                from.as_ref().map_or(ptr::null(), |c| c.as_ptr()),
                offset,
                len,
                1,
                0,
                trampoline,
                (&mut each) as *mut &mut dyn FnMut(u64, u64, bool) -> bool as *mut c_void,
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
