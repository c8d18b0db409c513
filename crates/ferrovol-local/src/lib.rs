//! The local engine: a volume is a sparse file in a pool directory on this
//! node, a snapshot is a read-only file beside it, and both are made by
//! reflink (O(metadata)) where the pool's filesystem can share blocks.
//!
//! Every change follows the journal's discipline: reserve the name and ID,
//! touch files, then commit the record `Ready` (or roll back on failure).
//! Callers serialize operations per name and per ID (the services' operation
//! locks); the engine relies on that, and on nothing else, for exclusion.

#![forbid(unsafe_code)]

mod attacher;
mod blocks;
mod controller;
pub mod failpoint;
mod groups;
pub mod identity;
pub mod ids;
pub mod journal;
pub mod node;
pub mod pool;
pub mod poolinit;
pub mod private;
pub mod recovery;
pub mod seed;
mod snapshots;

pub use ferrovol_csi::units;
pub use ferrovol_error as error;
use ferrovol_host::node as host_node;
pub use ferrovol_host::{exec, extents, fsutil, loopdev};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::ids::Kind;
use crate::journal::{
    GroupRecord, Journal, Record, Reservation, SnapshotRecord, State, VolumeRecord,
};
use ferrovol_block::{Attacher, Written};
use ferrovol_core::engine::{
    choose_size, AccessType, Attach, Capacity, ChangedBlocks, Condition, ContentSource,
    ControllerEngine, Expanded, Features, GroupSnapshot, GroupSnapshots, NewVolume, Page, Secrets,
    Snapshot, SnapshotFilter, Snapshots, Topology, Volume,
};
use ferrovol_core::engine::{ranges_from, Ranges, RANGE_BATCHES_IN_FLIGHT};
use ferrovol_host::offload;
use pool::{CowMethod, Pool, GRANULARITY};

/// The topology key under which local volumes report the node they live on.
/// The same key is used by NodeGetInfo, StorageClasses and docs.
pub const TOPOLOGY_KEY: &str = "local.csi.ferrovol.io/node";

/// StorageClass parameter: `thin` (default, sparse) or `thick` (preallocated).
pub const PARAM_PROVISIONING: &str = "provisioning";

pub struct LocalEngine {
    pool: Pool,
    journal: Journal,
    method: CowMethod,
    /// Background writes to the pool, for health.
    pool_writes: std::sync::Arc<crate::fsutil::WriteMonitor>,
    /// The node half, in this process: the controller half asks it to
    /// quiesce a volume for its snapshot, and checks attachments before a
    /// delete (the storage is on this node).
    node: node::LocalNode,
    /// This node's tag in the IDs it mints ([`ids::node_tag`]).
    tag: String,
}

/// Rejects StorageClass parameters the local engine does not understand
/// (also for its relay, which answers ValidateVolumeCapabilities itself).
pub fn check_parameters(parameters: &BTreeMap<String, String>) -> Result<()> {
    for (k, v) in parameters {
        match k.as_str() {
            PARAM_PROVISIONING if v == "thin" || v == "thick" => {}
            PARAM_PROVISIONING => {
                return Err(error::invalid(format!(
                    "parameter {PARAM_PROVISIONING}={v:?}: expected \"thin\" or \"thick\""
                )))
            }
            _ => {
                return Err(error::invalid(format!(
                    "unknown parameter {k:?} (the local engine accepts: {PARAM_PROVISIONING})"
                )))
            }
        }
    }
    Ok(())
}

/// Runs blocking file work off the async executor, to its end: a copy or
/// a journal write is never abandoned while the operation lock it runs
/// under could be let go (see `ferrovol_host::offload`).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    ferrovol_host::offload::to_completion("pool work", f).await
}

fn now_nanos() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0)
}

fn from_nanos(n: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(n.max(0) as u64)
}

/// A volume's condition from its file and the pool's free space.
fn condition_of(
    record: &VolumeRecord,
    path: &Path,
    available: u64,
    pool: &Pool,
    device: Option<&Path>,
) -> Condition {
    match std::fs::File::open(path).and_then(|f| f.metadata()) {
        Err(e) => Condition::Abnormal(format!(
            "backing file {} is missing or unreadable: {e}",
            path.display()
        )),
        Ok(m) if m.len() < record.capacity => Condition::Abnormal(format!(
            "backing file {} is {} bytes, less than the volume's {} bytes",
            path.display(),
            m.len(),
            record.capacity
        )),
        // Writes into a thin volume's holes need pool space; the pod sees
        // I/O errors, and this says where they come from.
        Ok(_) if available < FULL_POOL_BYTES && !is_thick(&record.parameters) => {
            Condition::Abnormal(format!(
                "pool {} is full ({available} bytes free): writes to unallocated blocks of \
                 this thin-provisioned volume fail",
                pool.root().display()
            ))
        }
        // An online growth that could not grow the filesystem (ext4 without
        // CAP_SYS_RESOURCE): the volume grew, its filesystem lags until the
        // next stage.
        Ok(_) if device.is_some_and(host_node::fs::ext4_smaller_than_device) => {
            Condition::Abnormal(
                "the ext4 filesystem is smaller than its grown volume: it grows when the volume \
                 is next staged (or online, given CAP_SYS_RESOURCE)"
                    .into(),
            )
        }
        Ok(_) => Condition::Healthy,
    }
}

/// Below this much free space a pool counts as full for thin volumes.
const FULL_POOL_BYTES: u64 = 1 << 20;

fn is_thick(parameters: &BTreeMap<String, String>) -> bool {
    parameters.get(PARAM_PROVISIONING).is_some_and(|v| v == "thick")
}

fn to_volume(r: &VolumeRecord) -> Volume {
    let source = if !r.source_snapshot.is_empty() {
        Some(ContentSource::Snapshot(r.source_snapshot.clone()))
    } else if !r.source_volume.is_empty() {
        Some(ContentSource::Volume(r.source_volume.clone()))
    } else {
        None
    };
    Volume {
        id: r.id.clone(),
        name: r.name.clone(),
        capacity: r.capacity,
        source,
        access: if r.block {
            AccessType::Block
        } else {
            AccessType::Mount { fs_type: r.fs_type.clone() }
        },
        parameters: r.parameters.clone(),
        context: BTreeMap::new(),
        accessible: if r.topology.is_empty() { vec![] } else { vec![r.topology.clone()] },
        published_nodes: vec![],
        created: from_nanos(r.created_unix_nanos),
    }
}

fn to_snapshot(r: &SnapshotRecord) -> Snapshot {
    Snapshot {
        id: r.id.clone(),
        name: r.name.clone(),
        source_volume: r.source_volume.clone(),
        size: r.size,
        created: from_nanos(r.created_unix_nanos),
        ready: r.state() == State::Ready,
        group_id: (!r.group_id.is_empty()).then(|| r.group_id.clone()),
    }
}

impl LocalEngine {
    /// Opens the pool, detects copy-on-write support, and runs recovery so
    /// that every record is settled before the first request.
    pub async fn open(pool_dir: &Path, state_dir: &Path, node_id: &str) -> Result<LocalEngine> {
        // Before anything is created in the pool directory: is it the pool
        // this driver serves (and not an empty mount point)?
        let pool_id = match identity::settle(pool_dir, state_dir)? {
            identity::Settled::Known(id) => id,
            identity::Settled::Adopted { id, fresh } => {
                info!(pool = %pool_dir.display(), %id, fresh, "pool identity recorded");
                id
            }
        };
        let journal_was_there =
            std::fs::metadata(pool_dir.join(pool::JOURNAL)).is_ok_and(|m| m.len() > 0);
        let pool = Pool::open(pool_dir)?;
        if !journal_was_there {
            refuse_files_without_journal(&pool)?;
        }
        let journal = Journal::open_for_pool(&pool.journal_path(), &pool_id)?;
        let method = pool.probe_cow_method()?;
        if method == CowMethod::Copy {
            warn!(
                pool = %pool.root().display(),
                "pool filesystem has no reflink: snapshots and clones will copy data \
                 (use `ferrovol pool init` to make an XFS or btrfs pool)"
            );
        }
        let report = recovery::recover(&pool, &journal).await?;
        if !report.orphans.is_empty() && journal.is_empty()? {
            return Err(error::precondition(format!(
                "the journal {} holds no records, but the pool holds {} files no record owns \
                 (e.g. {}): was the journal replaced? Restore it from a backup; ferrovol will \
                 not serve a pool whose volumes it cannot account for",
                pool.journal_path().display(),
                report.orphans.len(),
                report.orphans[0].display()
            )));
        }
        if report.is_clean() {
            info!(pool = %pool.root().display(), cow = method.as_str(), "pool open");
        } else {
            warn!(pool = %pool.root().display(), cow = method.as_str(), %report, "pool open after recovery");
        }
        let pool_writes = crate::fsutil::WriteMonitor::spawn(pool.root());
        let node = node::LocalNode::new(pool.clone(), node_id);
        Ok(LocalEngine { pool, journal, method, pool_writes, node, tag: ids::node_tag(node_id) })
    }

    /// `ferrovol pool check`: what recovery would do (or, with `repair`,
    /// does) to this pool. Needs the journal, so not while a driver serves
    /// the pool.
    pub async fn check_pool(pool_dir: &Path, repair: bool) -> Result<recovery::Report> {
        // Read-only for real: a missing pool or journal is reported, never
        // made; without --repair the journal is opened only to read.
        let journal_path = pool_dir.join(pool::JOURNAL);
        if !std::fs::metadata(&journal_path).is_ok_and(|m| m.len() > 0) {
            let count = |d: &str| {
                std::fs::read_dir(pool_dir.join(d)).map(|entries| entries.count()).unwrap_or(0)
            };
            let (volumes, snapshots) = (count("volumes"), count("snapshots"));
            if volumes + snapshots > 0 {
                return Err(error::precondition(format!(
                    "the pool at {} holds {volumes} volume and {snapshots} snapshot files, but \
                     its journal ({}) is missing or empty: restore the journal from a backup \
                     (a driver refuses to serve this pool until then); nothing was created",
                    pool_dir.display(),
                    journal_path.display()
                )));
            }
            return Err(error::not_found(format!(
                "no ferrovol pool at {}: it has no journal ({}); nothing was created",
                pool_dir.display(),
                journal_path.display()
            )));
        }
        let pool = Pool::open_existing(pool_dir)?;
        let journal = match repair {
            true => Journal::open(&pool.journal_path())?,
            false => Journal::open_read_only(&pool.journal_path())?,
        };
        // A journal from another pool is refused, never "repaired" into
        // this one.
        if let (Some(theirs), Some(ours)) = (journal.pool()?, identity::pool_id(pool_dir)?) {
            if theirs != ours {
                return Err(journal::foreign(&pool.journal_path(), &theirs, &ours));
            }
        }
        match repair {
            true => recovery::recover(&pool, &journal).await,
            false => recovery::inspect(&pool, &journal).await,
        }
    }

    pub fn cow_method(&self) -> CowMethod {
        self.method
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// A `Ready` record by id; a malformed, unknown or unfinished one does
    /// not exist for the CO (NOT_FOUND).
    fn ready<R: Record>(&self, kind: Kind, id: &str) -> Result<R> {
        let missing = || error::not_found(format!("{} {id:?} does not exist", kind.noun()));
        if !ids::is_valid(kind, id) {
            return Err(missing());
        }
        match self.journal.get::<R>(id)? {
            Some(r) if r.state() == State::Ready => Ok(r),
            _ => Err(missing()),
        }
    }

    fn ready_volume(&self, id: &str) -> Result<VolumeRecord> {
        self.ready(Kind::Volume, id)
    }

    fn ready_snapshot(&self, id: &str) -> Result<SnapshotRecord> {
        self.ready(Kind::Snapshot, id)
    }

    /// The file to copy from and its size, for a content source.
    fn resolve_source(&self, source: &Option<ContentSource>) -> Result<Option<(PathBuf, u64)>> {
        Ok(match source {
            None => None,
            Some(ContentSource::Snapshot(id)) => {
                let s = self.ready_snapshot(id)?;
                Some((self.existing_file(Kind::Snapshot, id)?, s.size))
            }
            Some(ContentSource::Volume(id)) => {
                let v = self.ready_volume(id)?;
                Some((self.existing_file(Kind::Volume, id)?, v.capacity))
            }
        })
    }

    /// Removes what a failed or interrupted operation left under a name we
    /// now own (the caller holds the name's lock, so nobody else is working
    /// on it).
    async fn discard<R: Record>(&self, kind: Kind, record: &R) -> Result<()> {
        let staged = self.pool.staging_path(kind, record.id())?;
        let placed = self.pool.path(kind, record.id())?;
        blocking(move || {
            pool::remove(&staged)?;
            pool::remove(&placed)
        })
        .await?;
        let dirs = self.pool.staging_dir();
        self.journal.remove_after_sync(record, Some(&dirs)).await
    }

    /// The second half of every creation, once the file is complete in
    /// staging: the record becomes `Ready` durably (staging synced first, in
    /// the same group commit), then the file moves into place. A crash before
    /// the commit leaves a staged file recovery removes; after it, one
    /// recovery moves into place.
    async fn commit_created<R: Record>(&self, kind: Kind, record: &mut R) -> Result<()> {
        record.set_state(State::Ready);
        let staging = self.pool.staging_dir();
        let committed = match self.journal.put_after_sync(record, Some(&staging)).await {
            Ok(()) => {
                failpoint::hit("create-after-commit");
                let (pool, id) = (self.pool.clone(), record.id().to_string());
                blocking(move || pool.publish(kind, &id)).await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = committed {
            let _ = self.discard(kind, record).await;
            return Err(e);
        }
        Ok(())
    }

    /// Deletion in three steps, each safe to crash after:
    /// 1. the record says `Deleting`, durably (one device flush, and the
    ///    only one: from here the object is gone for the CO, and recovery
    ///    finishes the delete whatever else reached the disk);
    /// 2. the file goes (to the trash, then unlinked);
    /// 3. the record goes, lazily: it reaches the disk with the next durable
    ///    commit, and a crash before leaves the `Deleting` record, which
    ///    recovery finishes (removes the file wherever it is, then the
    ///    record).
    ///
    /// No directory sync is waited for: the order that matters (the record
    /// before the file) is the journal's own.
    async fn delete_file_and_record<R: Record>(&self, kind: Kind, record: &R) -> Result<()> {
        let mut deleting = record.clone();
        deleting.set_state(State::Deleting);
        self.journal.put(&deleting).await?;
        let (pool, id) = (self.pool.clone(), record.id().to_string());
        blocking(move || {
            let trashed = pool.move_to_trash(kind, &id)?;
            failpoint::hit("delete-after-trash");
            pool::remove(&trashed)
        })
        .await?;
        self.journal.remove_lazily(&deleting).await
    }

    /// An object's file, which must be there to be read (attach, snapshot,
    /// clone, restore): a file that vanished behind the driver's back is the
    /// object's condition, FAILED_PRECONDITION, not an internal error.
    fn existing_file(&self, kind: Kind, id: &str) -> Result<PathBuf> {
        let path = self.pool.path(kind, id)?;
        match std::fs::symlink_metadata(&path) {
            Ok(_) => Ok(path),
            Err(e) => Err(error::precondition(format!(
                "{} {id}: backing file {} is missing or unreadable: {e}",
                kind.noun(),
                path.display()
            ))),
        }
    }
}

/// Whether a requested topology segment set describes where `ours` is.
fn serves(ours: &Topology, theirs: &Topology) -> bool {
    theirs.iter().all(|(k, v)| ours.get(k) == Some(v))
}

/// Topology segments as an operator writes them: `key=value` joined by
/// commas, one segment per brace.
fn describe_topology(segments: &[Topology]) -> String {
    let each: Vec<String> = segments
        .iter()
        .map(|t| {
            let pairs: Vec<String> = t.iter().map(|(k, v)| format!("{k}={v}")).collect();
            format!("{{{}}}", pairs.join(","))
        })
        .collect();
    each.join(" or ")
}

impl LocalEngine {
    /// A failure a full pool explains (a freeze or flush that fails with
    /// an I/O error because the volume's writes cannot reach the pool) is
    /// RESOURCE_EXHAUSTED, as the spec's tables say for no space: the
    /// caller may retry once space is freed.
    fn explained_by_full_pool(&self, e: Error) -> Error {
        // The journal lets go of its space reserve when the pool fills (so
        // deletes still work): a pool that full is full.
        let nearly = journal::RESERVE_BYTES + FULL_POOL_BYTES;
        let full = self.pool.space().is_ok_and(|(available, _)| available <= nearly);
        match e {
            e if full && matches!(e.kind(), error::Kind::Precondition | error::Kind::Internal) => {
                let m = e.message();
                error::exhausted(format!("pool {} is full: {m}", self.pool.root().display()))
            }
            e => e,
        }
    }

    /// Why a volume cannot be made here for a request whose requisite
    /// topology leaves this node out. RESOURCE_EXHAUSTED, as the spec's
    /// table says (the provisioner then lets the scheduler pick again, and
    /// shows this message in the claim's events): it names what was asked
    /// for and, for a restore or clone, that the new volume can only live
    /// where its source does.
    fn elsewhere(&self, source: &Option<ContentSource>, requisite: &[Topology]) -> Error {
        let here = self.node.node_id();
        let asked = describe_topology(requisite);
        let source = match source {
            Some(ContentSource::Snapshot(id)) => Some(("snapshot", id)),
            Some(ContentSource::Volume(id)) => Some(("volume", id)),
            None => None,
        };
        error::exhausted(match source {
            Some((noun, id)) => format!(
                "{noun} {id} lives on node {here}, and a volume made from it lives there too \
                 (local restores and clones stay on their source's node), but the request \
                 allows only {asked}: schedule the pod on node {here}"
            ),
            None => format!("node {here} is not among the nodes the request allows: {asked}"),
        })
    }

    /// The short path of an empty thin volume: the sparse file in staging,
    /// one durable commit of the `Ready` record (a crash before it leaves a
    /// staged file no record claims, which recovery removes; one after it,
    /// a record whose file recovery moves into place or, if its entry never
    /// reached the disk, makes again), then the file into place.
    async fn create_empty_thin(&self, mut record: VolumeRecord) -> Result<Volume> {
        let path = self.pool.staging_path(Kind::Volume, &record.id)?;
        let capacity = record.capacity;
        blocking(move || {
            failpoint::hit("create-volume-after-reserve");
            pool::create_empty(&path, capacity, false)?;
            failpoint::hit("create-volume-before-commit");
            Ok(())
        })
        .await?;
        record.set_state(State::Ready);
        let inserted = self.journal.insert(&record, None).await;
        let (pool, id) = (self.pool.clone(), record.id.clone());
        match inserted {
            Ok(Reservation::Reserved) => {
                failpoint::hit("create-after-commit");
                blocking(move || pool.publish(Kind::Volume, &id)).await?;
                Ok(to_volume(&record))
            }
            outcome => {
                let staged = self.pool.staging_path(Kind::Volume, &record.id)?;
                blocking(move || pool::remove(&staged)).await?;
                match outcome {
                    // The services' name lock makes this a stale record of
                    // our own; never two volumes for one name.
                    Ok(_) => Err(error::busy(format!("volume {:?} is being created", record.name))),
                    Err(e) => Err(e),
                }
            }
        }
    }
}

impl LocalEngine {
    fn ready_group(&self, id: &str) -> Result<GroupRecord> {
        self.ready(Kind::Group, id)
    }

    fn group_view(&self, group: &GroupRecord) -> Result<GroupSnapshot> {
        let mut snapshots = Vec::with_capacity(group.snapshot_ids.len());
        for id in &group.snapshot_ids {
            let rec = self
                .journal
                .get::<SnapshotRecord>(id)?
                .ok_or_else(|| error::internal(format!("group {} lost member {id}", group.id)))?;
            snapshots.push(to_snapshot(&rec));
        }
        Ok(GroupSnapshot {
            id: group.id.clone(),
            name: group.name.clone(),
            ready: group.state() == State::Ready && snapshots.iter().all(|s| s.ready),
            snapshots,
            created: from_nanos(group.created_unix_nanos),
        })
    }

    /// Removes a group's members and then the group (any state).
    async fn discard_group(&self, group: &GroupRecord) -> Result<()> {
        for id in &group.snapshot_ids {
            if let Some(member) = self.journal.get::<SnapshotRecord>(id)? {
                self.discard(Kind::Snapshot, &member).await?;
            }
        }
        self.journal.remove(group).await
    }
}

/// The idempotency rule: a repeated CreateVolume gets the existing volume
/// when it would have been an acceptable answer to the new request.
fn compatible_volume(existing: VolumeRecord, req: &NewVolume) -> Result<Volume> {
    let volume = to_volume(&existing);
    let mismatch = if volume.source != req.source {
        Some("a different content source")
    } else if volume.parameters != req.parameters {
        Some("different parameters")
    } else if volume.capacity < req.required_bytes
        || (req.limit_bytes > 0 && volume.capacity > req.limit_bytes)
    {
        Some("a capacity outside the requested range")
    } else {
        None
    };
    match mismatch {
        None => Ok(volume),
        Some(what) => Err(error::exists(format!(
            "volume {:?} already exists as {} with {what}",
            req.name, existing.id
        ))),
    }
}

/// A journal that is missing (or empty) beside volume and snapshot files:
/// serving would answer "no volumes" for a pool full of them.
fn refuse_files_without_journal(pool: &Pool) -> Result<()> {
    let files: Vec<PathBuf> = [Kind::Volume, Kind::Snapshot]
        .into_iter()
        .map(|k| pool.files(k))
        .collect::<Result<Vec<_>>>()?
        .concat();
    match files.first() {
        None => Ok(()),
        Some(first) => Err(error::precondition(format!(
            "the journal {} is missing or empty, but the pool holds {} volume and snapshot \
             files (e.g. {}): restore the journal from a backup; ferrovol will not serve a pool \
             whose volumes it cannot account for (`ferrovol pool check` lists them)",
            pool.journal_path().display(),
            files.len(),
            first.display()
        ))),
    }
}

/// The largest volume that fits in `available` free bytes: all of it for a
/// thin volume (a sparse file allocates nothing yet); for a thick one, less
/// the filesystem's own metadata for so large an allocation (extent trees,
/// its journal), which fallocate needs too: 1/64 and 1 MiB held back (an
/// allocation of all the free space fails with ENOSPC on ext4).
fn largest_volume(available: u64, thick: bool) -> u64 {
    let usable = match thick {
        true => available.saturating_sub(available / 64 + (1 << 20)),
        false => available,
    };
    usable / GRANULARITY * GRANULARITY
}
