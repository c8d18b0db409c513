//! The C entry points of librados and librbd we call, loaded at run time.
//!
//! Only the functions the RBD engine uses are here, with the C types of
//! Pacific's headers (librados 2, librbd 1.16), which later releases keep.
//! Functions newer than Pacific are optional: `None` when the loaded
//! library lacks them.

use std::ffi::{c_char, c_int, c_void};

use libloading::Library;

pub type Rados = *mut c_void;
pub type IoCtx = *mut c_void;
pub type Image = *mut c_void;
pub type Options = *mut c_void;
pub type WriteOp = *mut c_void;
pub type ReadOp = *mut c_void;
pub type OmapIter = *mut c_void;

#[repr(C)]
pub struct ClusterStat {
    pub kb: u64,
    pub kb_used: u64,
    pub kb_avail: u64,
    pub num_objects: u64,
}

#[repr(C)]
pub struct ImageSpec {
    pub id: *mut c_char,
    pub name: *mut c_char,
}

#[repr(C)]
pub struct SnapInfo {
    pub id: u64,
    pub size: u64,
    pub name: *const c_char,
}

#[repr(C)]
pub struct ImageInfo {
    pub size: u64,
    pub obj_size: u64,
    pub num_objs: u64,
    pub order: c_int,
    pub block_name_prefix: [c_char; 24],
    pub parent_pool: i64,
    pub parent_name: [c_char; 96],
}

#[repr(C)]
pub struct TrashInfo {
    pub id: *mut c_char,
    pub name: *mut c_char,
    pub source: c_int,
    pub deletion_time: libc::time_t,
    pub deferment_end_time: libc::time_t,
}

#[repr(C)]
pub struct GroupInfo {
    pub name: *mut c_char,
    pub pool: i64,
}

#[repr(C)]
pub struct GroupSnapInfo {
    pub name: *mut c_char,
    pub state: c_int,
}

#[repr(C)]
pub struct SnapGroupNamespace {
    pub group_pool: i64,
    pub group_name: *mut c_char,
    pub group_snap_name: *mut c_char,
}

#[repr(C)]
pub struct LinkedImageSpec {
    pub pool_id: i64,
    pub pool_name: *mut c_char,
    pub pool_namespace: *mut c_char,
    pub image_id: *mut c_char,
    pub image_name: *mut c_char,
    pub trash: bool,
}

#[repr(C)]
pub struct SnapSpec {
    pub id: u64,
    pub namespace_type: c_int,
    pub name: *mut c_char,
}

#[repr(C)]
pub struct Watcher {
    pub addr: *mut c_char,
    pub id: i64,
    pub cookie: u64,
}

pub type DiffCallback = unsafe extern "C" fn(u64, usize, c_int, *mut c_void) -> c_int;

/// `rados_mon_command` and `rados_mgr_command`: one command (JSON strings),
/// an input buffer, and the output and status buffers librados allocates.
pub type CommandFn = unsafe extern "C" fn(
    Rados,
    *mut *const c_char,
    usize,
    *const c_char,
    usize,
    *mut *mut c_char,
    *mut usize,
    *mut *mut c_char,
    *mut usize,
) -> c_int;

/// Declares the function table: each field is a C function pointer looked
/// up by its own name; `opt` fields may be missing from older libraries.
macro_rules! api {
    (struct $api:ident; $( $lib:ident : { $( $(#[$opt:ident])? fn $name:ident ( $($arg:ty),* ) $(-> $ret:ty)? ; )* } )*) => {
        pub struct $api {
            $( $( pub $name: api!(@field $($opt)? unsafe extern "C" fn($($arg),*) $(-> $ret)?), )* )*
        }

        impl $api {
            /// Looks every function up.
            ///
            /// # Safety
            /// The libraries must be the Ceph libraries named, whose
            /// functions have the signatures declared here; the pointers
            /// are valid while the libraries stay loaded.
            pub unsafe fn load($($lib: &Library),*) -> Result<$api, String> {
                Ok($api {
                    $( $( $name: api!(@get $($opt)? $lib, $name), )* )*
                })
            }
        }
    };
    (@field opt $t:ty) => { Option<$t> };
    (@field $t:ty) => { $t };
    (@get opt $lib:ident, $name:ident) => {
        $lib.get(concat!(stringify!($name), "\0").as_bytes()).ok().map(|s: libloading::Symbol<_>| *s)
    };
    (@get $lib:ident, $name:ident) => {
        *$lib
            .get(concat!(stringify!($name), "\0").as_bytes())
            .map_err(|e| format!("{} is missing from the loaded library: {e}", stringify!($name)))?
    };
}

api! {
    struct Api;
    rados: {
        fn rados_version(*mut c_int, *mut c_int, *mut c_int);
        fn rados_create2(*mut Rados, *const c_char, *const c_char, u64) -> c_int;
        fn rados_conf_read_file(Rados, *const c_char) -> c_int;
        fn rados_conf_set(Rados, *const c_char, *const c_char) -> c_int;
        fn rados_connect(Rados) -> c_int;
        fn rados_shutdown(Rados);
        fn rados_cluster_stat(Rados, *mut ClusterStat) -> c_int;
        fn rados_getaddrs(Rados, *mut *mut c_char) -> c_int;
        fn rados_blocklist_add(Rados, *mut c_char, u32) -> c_int;
        fn rados_mon_command(Rados, *mut *const c_char, usize, *const c_char, usize,
            *mut *mut c_char, *mut usize, *mut *mut c_char, *mut usize) -> c_int;
        fn rados_mgr_command(Rados, *mut *const c_char, usize, *const c_char, usize,
            *mut *mut c_char, *mut usize, *mut *mut c_char, *mut usize) -> c_int;
        fn rados_buffer_free(*mut c_char);
        fn rados_ioctx_create(Rados, *const c_char, *mut IoCtx) -> c_int;
        fn rados_ioctx_destroy(IoCtx);
        fn rados_read(IoCtx, *const c_char, *mut c_char, usize, u64) -> c_int;
        fn rados_remove(IoCtx, *const c_char) -> c_int;
        fn rados_create_write_op() -> WriteOp;
        fn rados_release_write_op(WriteOp);
        fn rados_write_op_create(WriteOp, c_int, *const c_char);
        fn rados_write_op_write_full(WriteOp, *const c_char, usize);
        fn rados_write_op_operate(WriteOp, IoCtx, *const c_char, *mut libc::time_t, c_int) -> c_int;
        fn rados_write_op_omap_set(WriteOp, *const *const c_char, *const *const c_char,
            *const usize, usize);
        fn rados_write_op_omap_rm_keys(WriteOp, *const *const c_char, usize);
        fn rados_create_read_op() -> ReadOp;
        fn rados_release_read_op(ReadOp);
        fn rados_read_op_omap_get_vals2(ReadOp, *const c_char, *const c_char, u64,
            *mut OmapIter, *mut u8, *mut c_int);
        fn rados_read_op_operate(ReadOp, IoCtx, *const c_char, c_int) -> c_int;
        fn rados_omap_get_next(OmapIter, *mut *mut c_char, *mut *mut c_char, *mut usize) -> c_int;
        fn rados_omap_get_end(OmapIter);
    }
    rbd: {
        fn rbd_version(*mut c_int, *mut c_int, *mut c_int);
        fn rbd_image_options_create(*mut Options);
        fn rbd_image_options_destroy(Options);
        fn rbd_image_options_set_string(Options, c_int, *const c_char) -> c_int;
        fn rbd_image_options_set_uint64(Options, c_int, u64) -> c_int;
        fn rbd_list2(IoCtx, *mut ImageSpec, *mut usize) -> c_int;
        fn rbd_image_spec_list_cleanup(*mut ImageSpec, usize);
        fn rbd_create4(IoCtx, *const c_char, u64, Options) -> c_int;
        fn rbd_clone3(IoCtx, *const c_char, *const c_char, IoCtx, *const c_char, Options) -> c_int;
        #[opt] fn rbd_clone4(IoCtx, *const c_char, u64, IoCtx, *const c_char, Options) -> c_int;
        fn rbd_remove(IoCtx, *const c_char) -> c_int;
        fn rbd_rename(IoCtx, *const c_char, *const c_char) -> c_int;
        fn rbd_trash_move(IoCtx, *const c_char, u64) -> c_int;
        fn rbd_trash_list(IoCtx, *mut TrashInfo, *mut usize) -> c_int;
        fn rbd_trash_list_cleanup(*mut TrashInfo, usize);
        fn rbd_trash_remove(IoCtx, *const c_char, bool) -> c_int;
        fn rbd_trash_restore(IoCtx, *const c_char, *const c_char) -> c_int;
        fn rbd_open(IoCtx, *const c_char, *mut Image, *const c_char) -> c_int;
        fn rbd_open_by_id(IoCtx, *const c_char, *mut Image, *const c_char) -> c_int;
        fn rbd_open_read_only(IoCtx, *const c_char, *mut Image, *const c_char) -> c_int;
        fn rbd_open_by_id_read_only(IoCtx, *const c_char, *mut Image, *const c_char) -> c_int;
        fn rbd_close(Image) -> c_int;
        fn rbd_stat(Image, *mut ImageInfo, usize) -> c_int;
        fn rbd_get_id(Image, *mut c_char, usize) -> c_int;
        fn rbd_get_name(Image, *mut c_char, *mut usize) -> c_int;
        fn rbd_get_features(Image, *mut u64) -> c_int;
        fn rbd_get_create_timestamp(Image, *mut libc::timespec) -> c_int;
        fn rbd_get_parent(Image, *mut LinkedImageSpec, *mut SnapSpec) -> c_int;
        fn rbd_linked_image_spec_cleanup(*mut LinkedImageSpec);
        fn rbd_snap_spec_cleanup(*mut SnapSpec);
        fn rbd_get_group(Image, *mut GroupInfo, usize) -> c_int;
        fn rbd_group_info_cleanup(*mut GroupInfo, usize) -> c_int;
        fn rbd_resize2(Image, u64, bool, *const c_void, *mut c_void) -> c_int;
        fn rbd_flatten(Image) -> c_int;
        fn rbd_copy3(Image, IoCtx, *const c_char, Options) -> c_int;
        fn rbd_metadata_get(Image, *const c_char, *mut c_char, *mut usize) -> c_int;
        fn rbd_metadata_set(Image, *const c_char, *const c_char) -> c_int;
        fn rbd_snap_list(Image, *mut SnapInfo, *mut c_int) -> c_int;
        fn rbd_snap_list_end(*mut SnapInfo);
        fn rbd_snap_create(Image, *const c_char) -> c_int;
        fn rbd_snap_remove(Image, *const c_char) -> c_int;
        fn rbd_snap_set(Image, *const c_char) -> c_int;
        fn rbd_snap_set_by_id(Image, u64) -> c_int;
        fn rbd_snap_get_timestamp(Image, u64, *mut libc::timespec) -> c_int;
        fn rbd_snap_get_namespace_type(Image, u64, *mut c_int) -> c_int;
        fn rbd_snap_get_group_namespace(Image, u64, *mut SnapGroupNamespace, usize) -> c_int;
        fn rbd_snap_group_namespace_cleanup(*mut SnapGroupNamespace, usize) -> c_int;
        fn rbd_diff_iterate2(Image, *const c_char, u64, u64, u8, u8, DiffCallback, *mut c_void) -> c_int;
        fn rbd_watchers_list(Image, *mut Watcher, *mut usize) -> c_int;
        fn rbd_watchers_list_cleanup(*mut Watcher, usize);
        fn rbd_lock_get_owners(Image, *mut c_int, *mut *mut c_char, *mut usize) -> c_int;
        fn rbd_lock_get_owners_cleanup(*mut *mut c_char, usize);
        fn rbd_lock_break(Image, c_int, *const c_char) -> c_int;
        fn rbd_group_create(IoCtx, *const c_char) -> c_int;
        fn rbd_group_remove(IoCtx, *const c_char) -> c_int;
        fn rbd_group_image_add(IoCtx, *const c_char, IoCtx, *const c_char) -> c_int;
        fn rbd_group_image_remove_by_id(IoCtx, *const c_char, IoCtx, *const c_char) -> c_int;
        fn rbd_group_snap_create(IoCtx, *const c_char, *const c_char) -> c_int;
        fn rbd_group_snap_remove(IoCtx, *const c_char, *const c_char) -> c_int;
        fn rbd_group_snap_list(IoCtx, *const c_char, *mut GroupSnapInfo, usize, *mut usize) -> c_int;
        fn rbd_group_snap_list_cleanup(*mut GroupSnapInfo, usize, usize) -> c_int;
    }
}

/// libcephfs (Ceph's file system client), loaded apart: only the CephFS
/// engine's copies need it.
pub type FsMount = *mut c_void;
pub type FsDir = *mut c_void;
/// What `ceph_readdir` hands out: glibc's 64-bit `struct dirent` (the
/// header refuses any other).
pub type Dirent = libc::dirent;

/// `struct ceph_statx` (ceph_ll_client.h).
#[repr(C)]
pub struct Statx {
    pub stx_mask: u32,
    pub stx_blksize: u32,
    pub stx_nlink: u32,
    pub stx_uid: u32,
    pub stx_gid: u32,
    pub stx_mode: u16,
    pub stx_ino: u64,
    pub stx_size: u64,
    pub stx_blocks: u64,
    pub stx_dev: libc::dev_t,
    pub stx_rdev: libc::dev_t,
    pub stx_atime: libc::timespec,
    pub stx_ctime: libc::timespec,
    pub stx_mtime: libc::timespec,
    pub stx_btime: libc::timespec,
    pub stx_version: u64,
}

api! {
    struct FsApi;
    cephfs: {
        fn ceph_version(*mut c_int, *mut c_int, *mut c_int) -> *const c_char;
        fn ceph_create(*mut FsMount, *const c_char) -> c_int;
        fn ceph_conf_read_file(FsMount, *const c_char) -> c_int;
        fn ceph_conf_set(FsMount, *const c_char, *const c_char) -> c_int;
        fn ceph_select_filesystem(FsMount, *const c_char) -> c_int;
        fn ceph_mount(FsMount, *const c_char) -> c_int;
        fn ceph_unmount(FsMount) -> c_int;
        fn ceph_release(FsMount) -> c_int;
        fn ceph_opendir(FsMount, *const c_char, *mut FsDir) -> c_int;
        fn ceph_readdir(FsMount, FsDir) -> *mut Dirent;
        fn ceph_closedir(FsMount, FsDir) -> c_int;
        fn ceph_statx(FsMount, *const c_char, *mut Statx, u32, u32) -> c_int;
        fn ceph_setattrx(FsMount, *const c_char, *mut Statx, c_int, c_int) -> c_int;
        fn ceph_open(FsMount, *const c_char, c_int, libc::mode_t) -> c_int;
        fn ceph_close(FsMount, c_int) -> c_int;
        fn ceph_read(FsMount, c_int, *mut c_char, i64, i64) -> c_int;
        fn ceph_write(FsMount, c_int, *const c_char, i64, i64) -> c_int;
        fn ceph_ftruncate(FsMount, c_int, i64) -> c_int;
        fn ceph_fsync(FsMount, c_int, c_int) -> c_int;
        fn ceph_mkdir(FsMount, *const c_char, libc::mode_t) -> c_int;
        fn ceph_rmdir(FsMount, *const c_char) -> c_int;
        fn ceph_unlink(FsMount, *const c_char) -> c_int;
        fn ceph_symlink(FsMount, *const c_char, *const c_char) -> c_int;
        fn ceph_readlink(FsMount, *const c_char, *mut c_char, i64) -> c_int;
        fn ceph_link(FsMount, *const c_char, *const c_char) -> c_int;
        fn ceph_mknod(FsMount, *const c_char, libc::mode_t, libc::dev_t) -> c_int;
        fn ceph_llistxattr(FsMount, *const c_char, *mut c_char, usize) -> c_int;
        fn ceph_lgetxattr(FsMount, *const c_char, *const c_char, *mut c_void, usize) -> c_int;
        fn ceph_lsetxattr(FsMount, *const c_char, *const c_char, *const c_void, usize, c_int) -> c_int;
        fn ceph_sync_fs(FsMount) -> c_int;
    }
}

pub const STATX_BASIC_STATS: u32 = 0x7ff;
pub const SETATTR_MODE: c_int = 1;
pub const SETATTR_UID: c_int = 1 << 1;
pub const SETATTR_GID: c_int = 1 << 2;
pub const SETATTR_MTIME: c_int = 1 << 3;
pub const SETATTR_ATIME: c_int = 1 << 4;

pub const OPTION_FORMAT: c_int = 0;
pub const OPTION_FEATURES: c_int = 1;
pub const OPTION_DATA_POOL: c_int = 10;
pub const OPTION_CLONE_FORMAT: c_int = 12;

pub const SNAP_NAMESPACE_USER: c_int = 0;
pub const SNAP_NAMESPACE_GROUP: c_int = 1;
pub const SNAP_NAMESPACE_TRASH: c_int = 2;

pub const GROUP_SNAP_STATE_COMPLETE: c_int = 1;

pub const LOCK_MODE_EXCLUSIVE: c_int = 0;

pub const CREATE_EXCLUSIVE: c_int = 1;
