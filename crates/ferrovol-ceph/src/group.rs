//! RBD groups and their snapshots (crash-consistent across members).

use std::ffi::{c_char, c_int};

use crate::rados::Pool;
use crate::{api, check, cstring, ffi, owned, Result};

/// A group snapshot's name and whether it was completed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupSnap {
    pub name: String,
    pub complete: bool,
}

impl Pool {
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
}
