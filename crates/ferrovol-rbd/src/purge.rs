//! The purger: removes deleted volumes' images from the RBD trash for good,
//! in the background, as soon as they are deleted (no mgr and no trash
//! schedule needed). DeleteVolume only moves an image to the trash and
//! wakes the purger for its pool; at start-up every listed pool is swept
//! once, so a purge a restart interrupted is finished.
//!
//! An image that still has snapshots (its volume's snapshots outlive it,
//! or clones hold it) cannot be removed yet: it is left, and the call that
//! frees its last snapshot removes it ([`crate::volumes::settle`]).

use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, Mutex};

use ferrovol_ceph::Pool;
use tokio::sync::Notify;

use crate::volumes::{is_volume_name, settle};
use crate::{blocking, ceph_error, ids};

/// Removals run at once (each is mostly waiting on OSDs).
const WORKERS: usize = 4;

#[derive(Default)]
struct State {
    /// Pools with something to purge.
    pending: BTreeSet<String>,
    pools: std::collections::HashMap<String, Pool>,
    /// Trashed images that still have snapshots: not retried on every
    /// wake (settle removes them when their last snapshot goes).
    waiting: HashSet<String>,
}

#[derive(Clone)]
pub struct Purger {
    state: Arc<Mutex<State>>,
    wake: Arc<Notify>,
    task: Arc<Mutex<Option<tokio::task::JoinHandle<()>>>>,
    /// The purger works as the driver's own client (never with the
    /// credentials of whichever request woke it, which may be revoked, and
    /// whose watch a user's delete would take for another user).
    conn: crate::connect::Connections,
}

impl Purger {
    /// Starts the purger's task (on the current runtime).
    pub fn start(conn: crate::connect::Connections) -> Purger {
        let p = Purger { state: Arc::default(), wake: Arc::default(), task: Arc::default(), conn };
        let task = tokio::spawn(p.clone().run());
        *p.task.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(task);
        p
    }

    /// Stops the purger (a stop of the driver) and lets go of its pools;
    /// a removal it started finishes on the blocking pool, and the next
    /// start's sweep purges what is left.
    pub fn stop(&self) {
        if let Some(task) = self.task.lock().unwrap_or_else(|p| p.into_inner()).take() {
            task.abort();
        }
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.pools.clear();
        s.pending.clear();
    }

    /// A snapshot went: trashed images that waited for their snapshots
    /// (or were busy when the snapshot's own call tried them) are tried
    /// again, all of them, at once.
    pub fn retry(&self, pool: &Pool) {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner).waiting.clear();
        self.wake(pool);
    }

    /// Something in this pool's trash may be purged now.
    pub fn wake(&self, pool: &Pool) {
        let mut s = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        s.pools.entry(pool.name().to_string()).or_insert_with(|| pool.clone());
        s.pending.insert(pool.name().to_string());
        drop(s);
        self.wake.notify_one();
    }

    async fn run(self) {
        loop {
            let next = {
                let mut s = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let name = s.pending.pop_first();
                name.and_then(|n| s.pools.get(&n).cloned())
            };
            let Some(waker) = next else {
                self.wake.notified().await;
                continue;
            };
            // The driver's own client where it reaches the pool; else the
            // client of the request that woke us.
            let own = self.conn.pool(waker.name(), &Default::default()).await;
            let pool = own.unwrap_or(waker);
            if let Err(e) = self.sweep(&pool).await {
                tracing::warn!(pool = pool.name(), error = %e, "purging deleted images failed; the next delete retries");
            }
        }
    }

    async fn sweep(&self, pool: &Pool) -> crate::error::Result<()> {
        let p = pool.clone();
        let entries = blocking(move || p.trash_list().map_err(ceph_error)).await?;
        let waiting =
            self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner).waiting.clone();
        let ours: Vec<String> = entries
            .into_iter()
            .filter(|e| is_volume_name(&e.name) || e.name.starts_with(ids::DELETED_PREFIX))
            .map(|e| e.id)
            .filter(|id| !waiting.contains(id))
            .collect();
        for chunk in ours.chunks(WORKERS) {
            let mut tasks = Vec::with_capacity(chunk.len());
            for id in chunk {
                let (p, id) = (pool.clone(), id.clone());
                tasks.push(blocking(move || purge_one(&p, &id).map(|removed| (id, removed))));
            }
            for t in tasks {
                match t.await {
                    Ok((_, true)) => {}
                    Ok((id, false)) => {
                        self.state
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .waiting
                            .insert(id);
                    }
                    Err(e) => {
                        tracing::warn!(pool = pool.name(), error = %e, "purging a deleted image failed")
                    }
                }
            }
        }
        Ok(())
    }
}

/// Removes one trashed image and then frees its parent chain; false when
/// it must wait (it has snapshots, or is open somewhere).
fn purge_one(pool: &Pool, id: &str) -> crate::error::Result<bool> {
    let parent = match pool.open_by_id_read_only(id) {
        Ok(img) => img.parent().map_err(ceph_error)?,
        // A removal cut short leaves a trash entry whose image no longer
        // opens: the entry itself is removed below, never left.
        Err(e) if e.is(libc::ENOENT) => None,
        Err(e) => return Err(ceph_error(e)),
    };
    match pool.trash_remove(id) {
        Ok(()) => {}
        Err(e) if e.is(libc::ENOENT) => return Ok(true),
        Err(e) if e.is(libc::ENOTEMPTY) || e.is(libc::EBUSY) => return Ok(false),
        Err(e) => return Err(ceph_error(e)),
    }
    if let Some(p) = parent.filter(|p| p.pool == pool.name()) {
        settle(pool, &p.image_id)?;
    }
    Ok(true)
}
