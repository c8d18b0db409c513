//! The local engine: a volume is a sparse file in a pool directory on this
//! node, a snapshot is a read-only file beside it, and both are made by
//! reflink (O(metadata)) where the pool's filesystem can share blocks.
//!
//! Every change follows the journal's discipline: reserve the name and ID,
//! touch files, then commit the record `Ready` (or roll back on failure).
//! Callers serialize operations per name and per ID (the services' operation
//! locks); the engine relies on that, and on nothing else, for exclusion.

#![forbid(unsafe_code)]

pub mod failpoint;
pub mod identity;
pub mod ids;
pub mod journal;
pub mod node;
pub mod pool;
pub mod poolinit;
pub mod private;
pub mod recovery;
pub mod seed;

pub use ferrovol_csi::{error, units};
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
            return Err(error::failed_precondition(format!(
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
                return Err(error::failed_precondition(format!(
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
            Err(e) => Err(error::failed_precondition(format!(
                "{} {id}: backing file {} is missing or unreadable: {e}",
                kind.noun(),
                path.display()
            ))),
        }
    }
}

#[tonic::async_trait]
impl ControllerEngine for LocalEngine {
    fn kind(&self) -> &'static str {
        "local"
    }

    fn features(&self) -> Features {
        node::features()
    }

    fn manifest(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("engine".to_string(), "local".to_string()),
            ("cow_method".to_string(), self.method.as_str().to_string()),
            ("pool".to_string(), self.pool.root().display().to_string()),
        ])
    }

    fn has_topology(&self) -> bool {
        true
    }

    /// Inline, no blocking-pool hop: every check is a syscall answered from
    /// kernel memory (stat, statvfs, a journal page in the cache); the one
    /// that touches the device runs in the background monitor.
    async fn health(&self) -> Result<()> {
        self.pool.verify()?;
        crate::fsutil::check_not_read_only(self.pool.root())?;
        self.pool_writes.status()?;
        self.journal.get::<VolumeRecord>("health-check").map(|_| ())
    }

    async fn stats(&self) -> Result<ferrovol_core::engine::EngineStats> {
        let ready = |s: State| s == State::Ready;
        let volumes = self.journal.scan::<VolumeRecord>(None, usize::MAX, |r| ready(r.state()))?;
        let snapshots =
            self.journal.scan::<SnapshotRecord>(None, usize::MAX, |r| ready(r.state()))?;
        let groups = self.journal.scan::<GroupRecord>(None, usize::MAX, |r| ready(r.state()))?;
        let (_, total) = self.pool.space()?;
        let used = self.pool.used()?;
        Ok(ferrovol_core::engine::EngineStats {
            volumes: volumes.len() as u64,
            snapshots: snapshots.len() as u64,
            groups: groups.len() as u64,
            storage_capacity_bytes: total,
            storage_used_bytes: used,
            provisioned_bytes: volumes.iter().map(|v| v.capacity).sum(),
            facts: BTreeMap::from([("cow_method".to_string(), self.method.as_str().to_string())]),
        })
    }

    fn validate_parameters(&self, parameters: &BTreeMap<String, String>) -> Result<()> {
        check_parameters(parameters)
    }

    /// Lazy journal changes (a delete's removal, a growth's size) become
    /// durable here rather than being left for recovery to redo.
    async fn close(&self) -> Result<()> {
        self.journal.sync().await
    }

    async fn create_volume(&self, req: NewVolume) -> Result<Volume> {
        self.validate_parameters(&req.parameters)?;
        let ours = self.node.topology();
        if let Some(reqs) = &req.accessibility {
            if !reqs.requisite.is_empty() && !reqs.requisite.iter().any(|t| serves(&ours, t)) {
                return Err(self.elsewhere(&req.source, &reqs.requisite));
            }
        }
        let thick = is_thick(&req.parameters);
        let source = self.resolve_source(&req.source)?;
        let (available, total) = self.pool.space()?;
        let source_size = source.as_ref().map_or(0, |(_, size)| *size);
        let capacity =
            choose_size(req.required_bytes, req.limit_bytes, source_size, GRANULARITY, total)?;

        if let Some(existing) = self.journal.by_name::<VolumeRecord>(&req.name)? {
            if existing.state() == State::Ready {
                return compatible_volume(existing, &req);
            }
            self.discard(Kind::Volume, &existing).await?;
        }
        if capacity > largest_volume(available, thick) {
            return Err(error::exhausted(format!(
                "pool has {available} bytes free, a {} volume of {capacity} bytes does not fit",
                if thick { "thick" } else { "thin" }
            )));
        }

        let (source_snapshot, source_volume) = match &req.source {
            Some(ContentSource::Snapshot(id)) => (id.clone(), String::new()),
            Some(ContentSource::Volume(id)) => (String::new(), id.clone()),
            None => (String::new(), String::new()),
        };
        let (block, fs_type) = match &req.access {
            AccessType::Block => (true, String::new()),
            AccessType::Mount { fs_type } => (false, fs_type.clone()),
        };
        let mut record = VolumeRecord {
            id: ids::mint(Kind::Volume, &self.tag),
            name: req.name.clone(),
            state: State::Creating as i32,
            capacity,
            source_snapshot,
            source_volume,
            block,
            fs_type,
            parameters: req.parameters.clone(),
            topology: ours,
            created_unix_nanos: now_nanos(),
        };
        // An empty thin volume holds no data yet: recovery can make its file
        // again from the record (`recovery::recreatable`), so it takes the
        // short path: file first, then one durable commit that neither
        // waits for the file's directory entry nor follows a reservation.
        if recovery::recreatable(&record) {
            return self.create_empty_thin(record).await;
        }
        if let Reservation::Existing(_) = self.journal.reserve(&record).await? {
            return Err(error::aborted(format!("volume {:?} is being created", req.name)));
        }

        let path = self.pool.staging_path(Kind::Volume, &record.id)?;
        let method = self.method;
        let made = blocking(move || {
            failpoint::hit("create-volume-after-reserve");
            match source {
                None => pool::create_empty(&path, capacity, thick)?,
                Some((src, _)) => {
                    pool::clone_file(&src, &path, capacity, method)?;
                    if thick {
                        pool::grow(&path, capacity, true)?;
                    }
                }
            }
            failpoint::hit("create-volume-before-commit");
            Ok(())
        })
        .await;
        if let Err(e) = made {
            self.discard(Kind::Volume, &record).await?;
            return Err(e);
        }
        self.commit_created(Kind::Volume, &mut record).await?;
        Ok(to_volume(&record))
    }

    async fn delete_volume(&self, id: &str, _secrets: &Secrets) -> Result<()> {
        if !ids::is_valid(Kind::Volume, id) {
            return Ok(()); // cannot exist, so it is already deleted
        }
        let Some(record) = self.journal.get::<VolumeRecord>(id)? else {
            return Ok(());
        };
        if let Some(device) = self.node.device(id).await? {
            return Err(error::failed_precondition(format!(
                "volume {id} is attached as {} on this node (still staged or published)",
                device.display()
            )));
        }
        self.delete_file_and_record(Kind::Volume, &record).await
    }

    async fn volume(&self, id: &str) -> Result<Volume> {
        self.ready_volume(id).map(|r| to_volume(&r))
    }

    async fn volume_conditions(&self, ids: &[String]) -> Result<Vec<Result<Condition>>> {
        let volumes: Vec<Result<(VolumeRecord, PathBuf)>> = ids
            .iter()
            .map(|id| Ok((self.ready_volume(id)?, self.pool.path(Kind::Volume, id)?)))
            .collect();
        let pool = self.pool.clone();
        blocking(move || {
            let (available, _) = pool.space()?;
            // The attached ones' devices, from one listing.
            let attached: std::collections::HashMap<PathBuf, PathBuf> = loopdev::list()
                .unwrap_or_default()
                .into_iter()
                .map(|a| (a.backing, a.device))
                .collect();
            Ok(volumes
                .into_iter()
                .map(|v| {
                    v.map(|(record, path)| {
                        let device = attached.get(&path).map(PathBuf::as_path);
                        condition_of(&record, &path, available, &pool, device)
                    })
                })
                .collect())
        })
        .await
    }

    async fn list_volumes(&self, token: Option<&str>, max: usize) -> Result<Page<Volume>> {
        if token.is_some_and(|t| !ids::is_valid(Kind::Volume, t)) {
            return Err(error::aborted("starting_token is not one this driver issued"));
        }
        let mut records = self
            .journal
            .scan::<VolumeRecord>(token, max.saturating_add(1), |r| r.state() == State::Ready)?;
        let next = ferrovol_core::engine::next_token(&mut records, max, |r| r.id.clone());
        Ok(Page { items: records.iter().map(to_volume).collect(), next })
    }

    async fn capacity(
        &self,
        parameters: &BTreeMap<String, String>,
        topology: Option<&Topology>,
    ) -> Result<Capacity> {
        if topology.is_some_and(|t| !serves(&self.node.topology(), t)) {
            // Another node's segment: nothing can be created there from here.
            return Ok(Capacity {
                available: 0,
                maximum_volume_size: 0,
                minimum_volume_size: GRANULARITY,
            });
        }
        // The largest volume CreateVolume accepts now (kube-scheduler
        // prefers this figure to the available capacity when it is set).
        let (available, _) = self.pool.space()?;
        Ok(Capacity {
            available: available / GRANULARITY * GRANULARITY,
            maximum_volume_size: largest_volume(available, is_thick(parameters)),
            minimum_volume_size: GRANULARITY,
        })
    }

    async fn expand_volume(
        &self,
        id: &str,
        required: u64,
        limit: u64,
        _secrets: &Secrets,
    ) -> Result<Expanded> {
        let grown = |capacity| Expanded { capacity, node_expansion_required: true };
        let mut record = self.ready_volume(id)?;
        let wanted = pool::round_up(required)
            .ok_or_else(|| error::out_of_range(format!("{required} bytes is too large")))?;
        if wanted <= record.capacity {
            return Ok(grown(record.capacity)); // never shrink; already big enough
        }
        if limit > 0 && wanted > limit {
            return Err(error::out_of_range(format!(
                "{required} bytes rounded to {wanted} exceeds the limit of {limit}"
            )));
        }
        let (available, total) = self.pool.space()?;
        if wanted > total {
            return Err(error::out_of_range(format!(
                "{wanted} bytes is more than the whole pool ({total} bytes)"
            )));
        }
        let thick = is_thick(&record.parameters);
        let grow_by = wanted - record.capacity;
        if thick && grow_by > available {
            return Err(error::exhausted(format!(
                "pool has {available} bytes free, growing needs {grow_by}"
            )));
        }
        // A thin volume's new space costs nothing yet, but the filesystem
        // writes metadata into it as it grows (ext4 zeroes new inode tables
        // afterwards): on a pool without room for that, the writes fail
        // inside the filesystem, later, where nobody is asking.
        let headroom = grow_by / 50 + (16 << 20);
        if !thick && available < headroom {
            return Err(error::exhausted(format!(
                "pool has {available} bytes free; growing a thin volume by {grow_by} bytes \
                 needs about {headroom} for the filesystem's new metadata"
            )));
        }
        let path = self.pool.path(Kind::Volume, id)?;
        // The file's new size is made durable (`grow` syncs it): the file
        // is the truth, and recovery brings a record that lags it up to
        // date, so the record's own update need not wait for the disk.
        blocking(move || pool::grow(&path, wanted, thick)).await?;
        record.capacity = wanted;
        self.journal.put_lazily(&record).await?;
        Ok(grown(wanted))
    }

    fn snapshots(&self) -> Option<&dyn Snapshots> {
        Some(self)
    }

    fn groups(&self) -> Option<&dyn GroupSnapshots> {
        Some(self)
    }

    fn changed_blocks(&self) -> Option<&dyn ChangedBlocks> {
        Some(self)
    }
}

#[tonic::async_trait]
impl Snapshots for LocalEngine {
    async fn create_snapshot(
        &self,
        name: &str,
        source_volume: &str,
        _secrets: &Secrets,
    ) -> Result<Snapshot> {
        if let Some(existing) = self.journal.by_name::<SnapshotRecord>(name)? {
            if existing.state() == State::Ready {
                if existing.source_volume != source_volume {
                    return Err(error::already_exists(format!(
                        "snapshot {name:?} exists for volume {}, not {source_volume}",
                        existing.source_volume
                    )));
                }
                return Ok(to_snapshot(&existing));
            }
            self.discard(Kind::Snapshot, &existing).await?;
        }
        let volume = self.ready_volume(source_volume)?;
        let src = self.existing_file(Kind::Volume, source_volume)?;
        // A filesystem staged on this node is flushed now (the pod's dirty
        // data, outside the window), then frozen for the instant of the
        // copy-on-write clone only; the guard thaws it on every path. Raw
        // block or idle: crash-consistent, as a power cut would leave it.
        let quiesce = self
            .node
            .prepare_quiesce(&[source_volume.to_string()], false)
            .await
            .map_err(|e| self.explained_by_full_pool(e))?;
        let mut record = SnapshotRecord {
            id: ids::mint(Kind::Snapshot, &self.tag),
            name: name.to_string(),
            state: State::Creating as i32,
            source_volume: source_volume.to_string(),
            size: volume.capacity,
            created_unix_nanos: now_nanos(),
            group_id: String::new(),
        };
        if let Reservation::Existing(_) = self.journal.reserve(&record).await? {
            return Err(error::aborted(format!("snapshot {name:?} is being created")));
        }
        let dst = self.pool.staging_path(Kind::Snapshot, &record.id)?;
        let (method, size) = (self.method, volume.capacity);
        let made = blocking(move || {
            failpoint::hit("create-snapshot-after-reserve");
            // The window: the clone alone.
            let started = std::time::Instant::now();
            let hold = quiesce()?;
            failpoint::hit("create-snapshot-frozen");
            let cloned = pool::clone_file(&src, &dst, size, method);
            drop(hold);
            tracing::debug!(
                window_ms = started.elapsed().as_secs_f64() * 1000.0,
                "snapshot window"
            );
            cloned?;
            pool::seal(&dst)?;
            failpoint::hit("create-snapshot-before-commit");
            Ok(())
        })
        .await;
        if let Err(e) = made {
            self.discard(Kind::Snapshot, &record).await?;
            return Err(self.explained_by_full_pool(e));
        }
        self.commit_created(Kind::Snapshot, &mut record).await?;
        Ok(to_snapshot(&record))
    }

    async fn delete_snapshot(&self, id: &str, _secrets: &Secrets) -> Result<()> {
        if !ids::is_valid(Kind::Snapshot, id) {
            return Ok(());
        }
        let Some(record) = self.journal.get::<SnapshotRecord>(id)? else {
            return Ok(());
        };
        if !record.group_id.is_empty() && record.state() == State::Ready {
            // The spec's code for a member deleted alone: the caller must
            // stop and delete the group (FAILED_PRECONDITION is retried).
            return Err(error::invalid(format!(
                "snapshot {id} is part of group snapshot {}; delete the group instead",
                record.group_id
            )));
        }
        self.delete_file_and_record(Kind::Snapshot, &record).await
    }

    async fn snapshot(&self, id: &str) -> Result<Snapshot> {
        self.ready_snapshot(id).map(|r| to_snapshot(&r))
    }

    async fn list_snapshots(
        &self,
        filter: &SnapshotFilter,
        token: Option<&str>,
        max: usize,
    ) -> Result<Page<Snapshot>> {
        let source_matches = |r: &SnapshotRecord| {
            filter.source_volume.as_ref().is_none_or(|v| &r.source_volume == v)
        };
        if let Some(id) = &filter.snapshot_id {
            // A filter by ID answers that snapshot or nothing, never an error.
            let found = self.ready_snapshot(id).ok().filter(source_matches);
            return Ok(Page { items: found.iter().map(to_snapshot).collect(), next: None });
        }
        if token.is_some_and(|t| !ids::is_valid(Kind::Snapshot, t)) {
            return Err(error::aborted("starting_token is not one this driver issued"));
        }
        let mut records =
            self.journal.scan::<SnapshotRecord>(token, max.saturating_add(1), |r| {
                r.state() == State::Ready && source_matches(r)
            })?;
        let next = ferrovol_core::engine::next_token(&mut records, max, |r| r.id.clone());
        Ok(Page { items: records.iter().map(to_snapshot).collect(), next })
    }
}

#[tonic::async_trait]
impl GroupSnapshots for LocalEngine {
    async fn create_group_snapshot(
        &self,
        name: &str,
        volumes: &[String],
        _secrets: &Secrets,
    ) -> Result<(GroupSnapshot, Duration)> {
        if let Some(existing) = self.journal.by_name::<GroupRecord>(name)? {
            if existing.state() == State::Ready {
                let mut want: Vec<&String> = volumes.iter().collect();
                let mut have: Vec<&String> = existing.source_volumes.iter().collect();
                want.sort();
                have.sort();
                if want != have {
                    return Err(error::already_exists(format!(
                        "group snapshot {name:?} exists with other volumes"
                    )));
                }
                return Ok((self.group_view(&existing)?, Duration::ZERO));
            }
            self.discard_group(&existing).await?;
        }
        let sources = volumes.iter().map(|v| self.ready_volume(v)).collect::<Result<Vec<_>>>()?;
        // A group the relay spreads over several nodes has one ID on all of
        // them, which it passes as the name of each node's part.
        let shared = ids::is_shared_group(name);
        let group_id = match shared {
            true => name.to_string(),
            false => ids::mint(Kind::Group, &self.tag),
        };
        let created = now_nanos();
        let mut members: Vec<SnapshotRecord> = sources
            .iter()
            .map(|v| SnapshotRecord {
                id: ids::mint(Kind::Snapshot, &self.tag),
                // Internal names: unique, and never a name a CO could pick.
                name: format!("{group_id}/{}", v.id),
                state: State::Creating as i32,
                source_volume: v.id.clone(),
                size: v.capacity,
                created_unix_nanos: created,
                group_id: group_id.clone(),
            })
            .collect();
        let mut group = GroupRecord {
            id: group_id,
            name: name.to_string(),
            state: State::Creating as i32,
            source_volumes: volumes.to_vec(),
            snapshot_ids: members.iter().map(|m| m.id.clone()).collect(),
            created_unix_nanos: created,
        };
        if let Reservation::Existing(_) = self.journal.reserve(&group).await? {
            return Err(error::aborted(format!("group snapshot {name:?} is being created")));
        }
        for m in &members {
            self.journal.reserve(m).await?;
        }
        // Every member mounted here is flushed now and frozen together for
        // the clones; a member in use as a raw block device cannot be
        // quiesced, and a torn group is refused rather than answered.
        // A part of a group spread over nodes is taken under the relay's
        // freeze, never at an instant of its own.
        let quiesce = match shared {
            true => self.node.prepare_quiesce_within_hold(volumes).await,
            false => self.node.prepare_quiesce(volumes, true).await,
        };
        let quiesce = match quiesce {
            Ok(q) => q,
            Err(e) => {
                self.discard_group(&group).await?;
                return Err(e);
            }
        };

        let mut copies = Vec::with_capacity(members.len());
        for m in &members {
            copies.push((
                self.pool.path(Kind::Volume, &m.source_volume)?,
                self.pool.staging_path(Kind::Snapshot, &m.id)?,
                m.size,
            ));
        }
        let method = self.method;
        let made = blocking(move || {
            failpoint::hit("create-group-before-clone");
            // The window: quiesce, clone every member, release. Nothing
            // else (no journal write, no allocation of note) happens inside.
            // It is measured from the first freeze, so it is what the
            // earliest-frozen member's writers wait at most.
            let started = std::time::Instant::now();
            let hold = quiesce()?;
            let quiesced = started.elapsed();
            for (src, dst, size) in &copies {
                pool::clone_file(src, dst, *size, method)?;
            }
            let window = started.elapsed();
            drop(hold);
            tracing::debug!(
                quiesce_ms = quiesced.as_secs_f64() * 1000.0,
                clone_ms = (window - quiesced).as_secs_f64() * 1000.0,
                "group snapshot window"
            );
            for (_, dst, _) in &copies {
                pool::seal(dst)?;
            }
            failpoint::hit("create-group-before-commit");
            Ok(window)
        })
        .await;
        let window = match made {
            Ok(w) => w,
            Err(e) => {
                self.discard_group(&group).await?;
                return Err(e);
            }
        };
        // Members first, then the group: recovery discards the members of a
        // group that never became Ready.
        for m in &mut members {
            if let Err(e) = self.commit_created(Kind::Snapshot, m).await {
                let _ = self.discard_group(&group).await;
                return Err(e);
            }
        }
        group.set_state(State::Ready);
        if let Err(e) = self.journal.put(&group).await {
            let _ = self.discard_group(&group).await;
            return Err(e);
        }
        Ok((self.group_view(&group)?, window))
    }

    async fn delete_group_snapshot(&self, id: &str, _secrets: &Secrets) -> Result<()> {
        if !ids::is_valid(Kind::Group, id) {
            return Ok(());
        }
        let Some(mut group) = self.journal.get::<GroupRecord>(id)? else { return Ok(()) };
        group.set_state(State::Deleting);
        self.journal.put(&group).await?;
        for sid in &group.snapshot_ids {
            if let Some(member) = self.journal.get::<SnapshotRecord>(sid)? {
                self.delete_file_and_record(Kind::Snapshot, &member).await?;
            }
        }
        self.journal.remove(&group).await
    }

    async fn group_snapshot(&self, id: &str) -> Result<GroupSnapshot> {
        let group = self.ready_group(id)?;
        self.group_view(&group)
    }
}

#[tonic::async_trait]
impl ChangedBlocks for LocalEngine {
    /// Window by window (`extents::WINDOW`), so a large sparse snapshot's
    /// ranges are never all held at once.
    async fn allocated(
        &self,
        snapshot_id: &str,
        from: u64,
        _secrets: &Secrets,
    ) -> Result<(u64, Ranges)> {
        let snap = self.ready_snapshot(snapshot_id)?;
        let path = self.pool.path(Kind::Snapshot, snapshot_id)?;
        // Opened now: a snapshot deleted while its ranges are read stays
        // readable through the descriptor.
        let f = blocking(move || {
            std::fs::File::open(&path)
                .map_err(|e| Error::io(format!("opening {}", path.display()), e))
        })
        .await?;
        let size = snap.size;
        let rx = offload::produce(RANGE_BATCHES_IN_FLIGHT, move |send| {
            let walked = extents::allocated_windows(&f, from, size, &mut |r| send(Ok(r)));
            if let Err(e) = walked {
                send(Err(Error::io("mapping a snapshot", e)));
            }
        });
        Ok((size, ranges_from(rx)))
    }

    async fn changed(
        &self,
        base: &str,
        target: &str,
        from: u64,
        _secrets: &Secrets,
    ) -> Result<(u64, Ranges)> {
        let (b, t) = (self.ready_snapshot(base)?, self.ready_snapshot(target)?);
        if b.source_volume != t.source_volume {
            return Err(error::invalid(format!(
                "snapshots {base} and {target} are of different volumes"
            )));
        }
        let (bp, tp) =
            (self.pool.path(Kind::Snapshot, base)?, self.pool.path(Kind::Snapshot, target)?);
        let shares = self.method == CowMethod::Reflink;
        let (bf, tf) = blocking(move || {
            let open = |p: &Path| {
                std::fs::File::open(p).map_err(|e| Error::io(format!("opening {}", p.display()), e))
            };
            Ok((open(&bp)?, open(&tp)?))
        })
        .await?;
        let size = t.size;
        let rx = offload::produce(RANGE_BATCHES_IN_FLIGHT, move |send| {
            let walked =
                extents::changed_windows(&bf, &tf, from, size, shares, &mut |r| send(Ok(r)));
            if let Err(e) = walked {
                send(Err(Error::io("comparing snapshots", e)));
            }
        });
        Ok((size, ranges_from(rx)))
    }
}

/// In one process (`--mode all`) the engine is its own node half too: the
/// same attachments, and node-side growth, which needs the journal.
#[tonic::async_trait]
impl Attacher for LocalEngine {
    fn kind(&self) -> &'static str {
        "local"
    }

    fn features(&self) -> Features {
        node::features()
    }

    fn topology(&self) -> Topology {
        self.node.topology()
    }

    async fn health(&self) -> Result<()> {
        self.node.health().await
    }

    async fn check_known(&self, volume_id: &str) -> Result<()> {
        self.ready_volume(volume_id).map(drop)
    }

    async fn attach(&self, request: &Attach) -> Result<PathBuf> {
        self.ready_volume(&request.volume_id)?;
        self.node.attach(request).await
    }

    async fn detach(&self, volume_id: &str) -> Result<()> {
        self.node.detach(volume_id).await
    }

    async fn device(&self, volume_id: &str) -> Result<Option<PathBuf>> {
        self.node.device(volume_id).await
    }

    async fn all_attached(&self) -> Result<Vec<PathBuf>> {
        self.node.all_attached().await
    }

    async fn refresh(&self, volume_id: &str, size: u64) -> Result<()> {
        self.node.refresh(volume_id, size).await
    }

    /// The journal's view (the record's size and provisioning), which
    /// knows more than the file alone.
    async fn condition(&self, volume_id: &str) -> Result<Condition> {
        self.volume_condition(volume_id).await
    }

    async fn grow(&self, volume_id: &str, required: u64, limit: u64) -> Result<u64> {
        let grown = self.expand_volume(volume_id, required, limit, &Secrets::default()).await?;
        Ok(grown.capacity)
    }

    async fn written(&self, request: &Attach, device: &Path) -> Result<Written> {
        self.node.written(request, device).await
    }

    async fn release_unused(&self) -> Result<Vec<String>> {
        self.node.release_unused().await
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
            Error::FailedPrecondition(m) | Error::Internal(m) if full => {
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
                    Ok(_) => {
                        Err(error::aborted(format!("volume {:?} is being created", record.name)))
                    }
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
        Some(what) => Err(error::already_exists(format!(
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
        Some(first) => Err(error::failed_precondition(format!(
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
