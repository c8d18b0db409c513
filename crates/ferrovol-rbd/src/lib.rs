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

pub mod connect;
pub mod controller;
mod groups;
pub mod ids;
pub mod mapper;
pub mod node;
pub mod params;
mod purge;
mod snapshots;
mod volumes;

pub use ferrovol_csi::error;

use error::{Error, Result};
use ferrovol_host::ceph::CephError;

/// The CSI driver name the RBD engine serves by default.
pub const DRIVER_NAME: &str = "rbd.csi.ferrovol.io";

/// What a librados/librbd failure means to the caller, in one place.
pub fn ceph_error(e: CephError) -> Error {
    let msg = e.to_string();
    match e.errno {
        libc::ENOENT => Error::NotFound(msg),
        libc::EEXIST => Error::AlreadyExists(msg),
        libc::EBUSY | libc::ENOTEMPTY | libc::EXDEV => Error::FailedPrecondition(msg),
        libc::EACCES | libc::EPERM => Error::FailedPrecondition(format!(
            "{msg} (the cluster refused these credentials or their caps)"
        )),
        libc::ENOSPC | libc::EDQUOT => Error::ResourceExhausted(msg),
        libc::EINVAL => Error::InvalidArgument(msg),
        libc::ERANGE | libc::EFBIG => Error::OutOfRange(msg),
        libc::ETIMEDOUT
        | libc::ECONNREFUSED
        | libc::ENOTCONN
        | libc::ESHUTDOWN
        | libc::EHOSTUNREACH
        | libc::EROFS
        | libc::EAGAIN => Error::Unavailable(msg),
        _ => Error::Internal(msg),
    }
}

/// Records a name as taken by `value` (a small object created
/// exclusively), or checks that it already is: ALREADY_EXISTS when another
/// value took it.
pub(crate) fn claim(
    pool: &ferrovol_host::ceph::Pool,
    oid: &str,
    value: &[u8],
    taken: impl Fn() -> String,
) -> Result<()> {
    loop {
        match pool.read_object(oid).map_err(ceph_error)? {
            Some(v) if v == value => return Ok(()),
            Some(_) => return Err(error::already_exists(taken())),
            None => match pool.create_object(oid, value) {
                Ok(()) => return Ok(()),
                // Someone claimed it between the read and the create.
                Err(e) if e.is(libc::EEXIST) => continue,
                Err(e) => return Err(ceph_error(e)),
            },
        }
    }
}

/// Runs a blocking librbd sequence off the async executor.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| error::internal(format!("a blocking Ceph call failed: {e}")))?
}
