//! The CephFS engine: shared file system volumes (every access mode,
//! ReadWriteMany across nodes) on a Ceph file system. A volume is a CephFS
//! subvolume made through the manager's volumes module (so `ceph fs
//! subvolume ls`, the dashboard and ceph-csi see it), its size a quota the
//! pod sees at once; the node mounts it with ceph-fuse in a directory of
//! the driver's own and binds that onto the staging path.
//!
//! Nothing is kept outside Ceph: a subvolume's name derives from the
//! request name, our attributes live in the subvolume's own metadata
//! (written last: a subvolume without them is half made, and the retry
//! finishes it), and a request name is claimed by a small object in the
//! home file system's metadata pool, so a second request with the same name
//! and another file system or group is ALREADY_EXISTS. See
//! docs/architecture.md.

#![forbid(unsafe_code)]

mod backed;
pub mod bench;
pub mod controller;
mod copies;
pub mod copy;
pub mod demo;
mod groups;
pub mod ids;
pub mod node;
pub mod params;
mod snapshots;

pub use ferrovol_cephclient::{blocking, ceph_error, close_connections, connect};
pub use ferrovol_error as error;

/// The CSI driver name the CephFS engine serves by default.
pub const DRIVER_NAME: &str = "cephfs.csi.ferrovol.io";

/// The `fs_type` of the engine's volumes (the default: an empty one).
pub const FS_TYPE: &str = "cephfs";

/// Every entry of an omap index object in the home pool (none when it
/// does not exist), read a page at a time.
pub(crate) fn index(
    home: &ferrovol_ceph::Pool,
    oid: &str,
) -> error::Result<Vec<(String, Vec<u8>)>> {
    const PAGE: u64 = 512;
    let mut out: Vec<(String, Vec<u8>)> = vec![];
    loop {
        let after = out.last().map(|(k, _)| k.clone()).unwrap_or_default();
        let (page, more) = home.omap_page(oid, &after, "", PAGE).map_err(ceph_error)?;
        out.extend(page);
        if !more {
            return Ok(out);
        }
    }
}

/// What both halves answer.
pub fn features() -> ferrovol_core::engine::Features {
    use ferrovol_core::engine::{AccessMode, ExpansionSite, Features, Filesystem};
    let mut mount_modes = Features::single_node_modes();
    mount_modes.extend([
        AccessMode::MultiNodeReaderOnly,
        AccessMode::MultiNodeSingleWriter,
        AccessMode::MultiNodeMultiWriter,
    ]);
    Features {
        // The size is a quota: the controller raises it and every client
        // sees it at once; the node has nothing to grow.
        expansion: ExpansionSite::Controller,
        node_expansion: false,
        // A copy of a snapshot taken for it (ferrovol's copier, or the
        // manager's cloner).
        clones: true,
        filesystems: vec![Filesystem { name: FS_TYPE, minimum_size: 0 }],
        mount_modes,
        // A file system, not a device.
        block_modes: vec![],
    }
}
