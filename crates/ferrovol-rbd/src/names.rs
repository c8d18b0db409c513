//! One place per request name. An image's name derives from the request
//! name *and* the class's pool and prefix, so a second CreateVolume with the
//! same name and another pool or prefix would make a second volume. The
//! name is claimed first in the driver's home pool (the first of
//! `--rbd-pools`, with the driver's own client), recording the volume it
//! names: a claim for another volume that still exists is ALREADY_EXISTS,
//! one whose volume is gone (a delete cut short) is taken over.

use ferrovol_ceph::Pool;

use crate::error::Result;
use crate::{ceph_error, ids};

fn oid(name: &str) -> String {
    format!("ferrovol.name.{}", ids::hash(name))
}

/// The volume `name` is claimed for, if any.
pub fn claimed(home: &Pool, name: &str) -> Result<Option<String>> {
    Ok(home
        .read_object(&oid(name))
        .map_err(ceph_error)?
        .map(|v| String::from_utf8_lossy(&v).into_owned()))
}

/// Claims `name` for `volume_id` (replacing a stale claim).
pub fn claim(home: &Pool, name: &str, volume_id: &str) -> Result<()> {
    home.write_object(&oid(name), volume_id.as_bytes()).map_err(ceph_error)
}

/// Lets go of `name`'s claim if it is `volume_id`'s.
pub fn release(home: &Pool, name: &str, volume_id: &str) -> Result<()> {
    if claimed(home, name)?.as_deref() == Some(volume_id) {
        match home.remove_object(&oid(name)) {
            Err(e) if e.is(libc::ENOENT) => {}
            other => other.map_err(ceph_error)?,
        }
    }
    Ok(())
}
