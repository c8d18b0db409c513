//! The pool's RBD trash: images deleted while their snapshots live on.

use crate::rados::Pool;
use crate::{api, check, cstring, ffi, owned, Result};

/// An entry of the pool's RBD trash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrashEntry {
    pub id: String,
    pub name: String,
}

impl Pool {
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
}
