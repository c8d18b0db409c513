//! The Ceph RBD engine: volumes are RBD images, snapshots are RBD
//! snapshots, restores and clones are copy-on-write clones (format 2), and
//! group snapshots are RBD group snapshots. The controller half
//! ([`controller::RbdEngine`]) runs anywhere that reaches the monitors; the
//! node half ([`node::RbdNode`]) maps images as block devices with krbd,
//! rbd-nbd or rbd-fuse and a loop device.
//!
//! Nothing is kept outside Ceph: image names derive from request names,
//! attributes live in image metadata, and the two facts a name cannot give
//! (which image a snapshot name belongs to, a group's members) are small
//! objects in the pool. See docs/architecture.md.

#![forbid(unsafe_code)]

pub mod bench;
pub mod controller;
mod groups;
pub mod ids;
pub mod mapper;
mod names;
pub mod node;
pub mod params;
mod purge;
mod snapshots;
mod volumes;

pub use ferrovol_error as error;

// Connections, errno meanings and counted calls are shared with the
// CephFS engine.
pub use ferrovol_cephclient::{blocking, ceph_error, close_connections, connect, settle_calls};
pub(crate) use ferrovol_cephclient::{claim, Counted};

/// The CSI driver name the RBD engine serves by default.
pub const DRIVER_NAME: &str = "rbd.csi.ferrovol.io";
