//! The controller half: volumes as subvolumes, their size as a quota.
//!
//! Each Ceph call is a manager command (the volumes module) or a monitor
//! command, run off the executor through the shared counted call. A create
//! claims the request name first (a small object in the home file system's
//! metadata pool), then makes the group and the subvolume, then writes our
//! record into the subvolume's metadata, last: a retry after any step
//! finds what was made and finishes it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferrovol_ceph::{CephError, Cluster, NewSubvolume, Pool, Subvolumes};
use ferrovol_core::engine::{
    self, AccessType, Capacity, Condition, ContentSource, ControllerEngine, EngineStats, Expanded,
    Features, GroupSnapshots, NewVolume, Page, Secrets, Snapshots, Topology, Volume,
};

use crate::backed;
use crate::connect::Connections;
use crate::copies::{Copies, Outcome, Spec};
use crate::error::{self, Error, Kind, Result};
use crate::ids::{self, BackedId, SnapshotId, VolumeId};
use crate::params::{self, Parameters};
use crate::snapshots;
use crate::{blocking, ceph_error};

/// Quotas are whole MiB.
pub const GRANULARITY: u64 = 1 << 20;
pub const MAXIMUM_VOLUME: u64 = 1 << 50;

/// The subvolume metadata key our record lives in.
const META: &str = "ferrovol";

pub struct Settings {
    /// The file systems listings, capacity and metrics cover, the home
    /// (where request names are claimed) first. Volumes on others work all
    /// the same.
    pub filesystems: Vec<String>,
    /// How long a restore's CreateVolume waits for the copy before it
    /// answers ABORTED.
    pub restore_wait: Duration,
    /// Who copies restores and clones.
    pub copier: Copier,
    /// How long a copy nobody asks about runs before it is abandoned and
    /// removed.
    pub abandon_after: Duration,
}

/// Who copies a snapshot's data into a restore or a clone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Copier {
    /// ferrovol itself, through libcephfs (parallel, keeps hard links and
    /// extended attributes, resumes, abandons).
    Ferrovol,
    /// The Ceph manager's cloner (`ceph fs subvolume snapshot clone`).
    Manager,
}

/// The omap object in the home pool indexing copies under way (key: the
/// new volume's ID, value: its [`Marker`]): whoever sweeps reads one
/// object, not every subvolume.
const COPIES: &str = "ferrovol.cephfs.copies";

/// A copy under way, as the index records it: where from, when someone
/// last asked for it, and after how long without asking it is abandoned
/// (its copier's rule, which whoever sweeps applies).
struct Marker {
    from: String,
    source: String,
    asked: u64,
    abandon: u64,
}

impl Marker {
    fn encode(&self) -> String {
        serde_json::json!({
            "from": self.from, "source": self.source, "asked": self.asked, "abandon": self.abandon,
        })
        .to_string()
    }

    fn decode(text: &str) -> Marker {
        let v: serde_json::Value = serde_json::from_str(text).unwrap_or_default();
        let s = |k: &str| v[k].as_str().unwrap_or_default().to_string();
        Marker {
            from: s("from"),
            source: s("source"),
            asked: v["asked"].as_u64().unwrap_or(0),
            abandon: v["abandon"].as_u64().unwrap_or(ABANDON_AFTER.as_secs()),
        }
    }

    fn stale(&self) -> bool {
        now().saturating_sub(self.asked) > self.abandon
    }

    /// Whether it is time to record a new ask (a quarter of the abandon
    /// time, so a sweeper never takes a copy still wanted).
    fn due(&self) -> bool {
        now().saturating_sub(self.asked) >= (self.abandon / 4).max(1)
    }
}

pub struct CephFsEngine {
    pub(crate) conn: Connections,
    settings: Settings,
    /// The home file system's metadata pool, found on first use.
    home: tokio::sync::OnceCell<String>,
    /// Copies under way (restores and clones, with our own copier).
    pub(crate) copies: Arc<Copies>,
}

/// What we know of a volume beyond its subvolume: written once, last.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Record {
    pub(crate) name: String,
    pub(crate) volume: String,
    pub(crate) params: String,
    pub(crate) parameters: BTreeMap<String, String>,
    pub(crate) context: BTreeMap<String, String>,
    pub(crate) created: u64,
    /// The snapshot it was restored from or the volume it was cloned
    /// from (empty: none).
    pub(crate) source: String,
    /// A volume backed by a snapshot: its size, and the volume the
    /// snapshot was taken of (to remove the snapshot with its last user
    /// once the CO deleted it). Both empty for a subvolume.
    pub(crate) size: u64,
    pub(crate) origin: String,
}

impl Record {
    pub(crate) fn encode(&self) -> String {
        serde_json::json!({
            "name": self.name,
            "volume": self.volume,
            "params": self.params,
            "parameters": self.parameters,
            "context": self.context,
            "created": self.created,
            "source": self.source,
            "size": self.size,
            "origin": self.origin,
        })
        .to_string()
    }

    pub(crate) fn decode(text: &str) -> Option<Record> {
        let v: serde_json::Value = serde_json::from_str(text).ok()?;
        let map = |k: &str| -> BTreeMap<String, String> {
            v[k].as_object()
                .map(|m| {
                    m.iter()
                        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                        .collect()
                })
                .unwrap_or_default()
        };
        Some(Record {
            name: v["name"].as_str()?.to_string(),
            volume: v["volume"].as_str()?.to_string(),
            params: v["params"].as_str().unwrap_or_default().to_string(),
            parameters: map("parameters"),
            context: map("context"),
            created: v["created"].as_u64().unwrap_or(0),
            source: v["source"].as_str().unwrap_or_default().to_string(),
            size: v["size"].as_u64().unwrap_or(0),
            origin: v["origin"].as_str().unwrap_or_default().to_string(),
        })
    }
}

/// A file system as the monitors describe it.
struct FileSystem {
    metadata_pool: String,
    data_pools: Vec<String>,
}

fn file_system(cluster: &Cluster, fs: &str) -> Result<Option<FileSystem>> {
    let out = cluster.mon_command(r#"{"prefix":"fs ls","format":"json"}"#).map_err(ceph_error)?;
    let v: serde_json::Value =
        serde_json::from_str(&out).map_err(|e| error::internal(format!("`fs ls` answered {e}")))?;
    let found = v.as_array().into_iter().flatten().find(|f| f["name"] == fs);
    Ok(found.map(|f| FileSystem {
        metadata_pool: f["metadata_pool"].as_str().unwrap_or_default().to_string(),
        data_pools: f["data_pools"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p.as_str().map(str::to_string))
            .collect(),
    }))
}

/// A manager failure about the subvolume `what` names.
fn missing_or(e: CephError, what: impl FnOnce() -> String) -> Error {
    match e.errno {
        libc::ENOENT => error::not_found(what()),
        _ => ceph_error(e),
    }
}

/// A failure about an object a request's *parameters* named (a file
/// system, a pool): the class's mistake.
fn named_by_class(e: CephError, what: impl FnOnce() -> String) -> Error {
    match e.errno {
        libc::ENOENT | libc::EINVAL => error::invalid(format!("{}: {e}", what())),
        _ => ceph_error(e),
    }
}

pub(crate) fn claim_oid(name: &str) -> String {
    format!("ferrovol.cephfs.name.{}", ids::hash(name))
}

/// The claim of the name a volume was made for: its subvolume ends with
/// the same hash, so it is found without the volume's record (a restore
/// deleted mid-copy has none yet).
fn claim_oid_of(v: &VolumeId) -> String {
    let hash = &v.subvolume[v.subvolume.len().saturating_sub(32)..];
    format!("ferrovol.cephfs.name.{hash}")
}

/// A volume context: the pairs with a value.
pub(crate) fn context_of<'a>(
    pairs: impl IntoIterator<Item = (&'a str, String)>,
) -> BTreeMap<String, String> {
    pairs.into_iter().filter(|(_, v)| !v.is_empty()).map(|(k, v)| (k.to_string(), v)).collect()
}

/// Now, in seconds since the epoch (records' creation times).
pub(crate) fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

fn seconds(t: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(t)
}

/// Our record of a subvolume: None when it has none (not ours, or half
/// made); NOT_FOUND when the subvolume does not exist.
fn record(sv: &Subvolumes, v: &VolumeId) -> Result<Option<Record>> {
    let text = sv
        .metadata(&v.group, &v.subvolume, META)
        .map_err(|e| missing_or(e, || format!("volume {} does not exist", v.id())))?;
    Ok(text.as_deref().and_then(Record::decode).filter(|r| r.volume == v.id()))
}

/// A volume a listing may show: a subvolume not yet described, or a view
/// of a snapshot (described by its index entry).
enum Candidate {
    Sub(Subvolumes, VolumeId),
    View(Volume),
}

/// The volume a subvolume holds, as the CO sees it.
pub(crate) fn describe(sv: &Subvolumes, v: &VolumeId) -> Result<Volume> {
    let id = v.id();
    let gone = || format!("volume {id} does not exist");
    let Some(r) = record(sv, v)? else { return Err(error::not_found(gone())) };
    let info = sv.info(&v.group, &v.subvolume).map_err(|e| missing_or(e, gone))?;
    if info.state == "snapshot-retained" {
        return Err(error::not_found(gone()));
    }
    Ok(volume_of(r, info.bytes_quota.unwrap_or(0)))
}

/// The volume a record describes, as the CO sees it.
pub(crate) fn volume_of(r: Record, capacity: u64) -> Volume {
    Volume {
        id: r.volume,
        name: r.name,
        capacity,
        source: match r.source {
            s if s.is_empty() => None,
            s if VolumeId::parse(&s).is_some() => Some(ContentSource::Volume(s)),
            s => Some(ContentSource::Snapshot(s)),
        },
        access: AccessType::Mount { fs_type: crate::FS_TYPE.into() },
        parameters: r.parameters,
        context: r.context,
        accessible: vec![],
        published_nodes: vec![],
        created: seconds(r.created),
    }
}

impl CephFsEngine {
    pub fn open(conn: Connections, settings: Settings) -> Result<CephFsEngine> {
        let Some(home) = settings.filesystems.first() else {
            return Err(error::invalid("the CephFS engine needs at least one file system"));
        };
        ids::check_id_part("file system", home)?;
        let copies = Copies::new(settings.abandon_after);
        Ok(CephFsEngine { conn, settings, home: tokio::sync::OnceCell::new(), copies })
    }

    fn home_fs(&self) -> &str {
        &self.settings.filesystems[0]
    }

    pub(crate) fn filesystems(&self) -> &[String] {
        &self.settings.filesystems
    }

    /// The pool request names are claimed in (the driver's own client).
    pub(crate) async fn home_pool(&self, secrets: &Secrets) -> Result<Pool> {
        let name = self
            .home
            .get_or_try_init(|| async {
                let cluster = self.conn.default_cluster().await?;
                let fs = self.home_fs().to_string();
                blocking(move || match file_system(&cluster, &fs)? {
                    Some(f) => Ok(f.metadata_pool),
                    None => Err(error::precondition(format!(
                        "the home file system {fs} (--cephfs-filesystems) does not exist"
                    ))),
                })
                .await
            })
            .await?
            .clone();
        self.conn.pool(&name, secrets).await
    }

    pub(crate) async fn subvolumes(&self, fs: &str, secrets: &Secrets) -> Result<Subvolumes> {
        let cluster = self.conn.cluster(secrets).await?;
        Ok(Subvolumes::new(cluster, fs))
    }

    /// Answers the volume `name` already is, or makes it.
    async fn create(&self, req: &NewVolume, p: &Parameters) -> Result<Volume> {
        let v = VolumeId::new(&p.fs, &p.group, &p.prefix, &req.name);
        let id = v.id();
        let home = self.home_pool(&req.secrets).await?;
        let sv = self.subvolumes(&p.fs, &req.secrets).await?;
        let copy = match &req.source {
            None => None,
            Some(ContentSource::Snapshot(snapshot)) => {
                let gone = || {
                    error::not_found(format!(
                        "snapshot {} does not exist",
                        error::bounded(snapshot)
                    ))
                };
                let s = SnapshotId::parse(snapshot).ok_or_else(gone)?;
                if s.fs != p.fs {
                    return Err(error::invalid(format!(
                        "snapshot {snapshot} is on file system {}: a restore stays on its \
                         snapshot's file system, not {}",
                        s.fs, p.fs
                    )));
                }
                let (h, cluster, wanted) = (home.clone(), sv.cluster().clone(), s.clone());
                let claim =
                    blocking(move || snapshots::find(&h, &cluster, &wanted).map(|(_, c)| c))
                        .await?;
                let from = VolumeId::parse(&claim.source).ok_or_else(|| {
                    error::internal(format!("a snapshot claim names {:?}", claim.source))
                })?;
                Some(Copy {
                    from,
                    snap: s.snap(),
                    root: claim.root.clone(),
                    source: s.id(),
                    size: claim.size,
                    clone: false,
                    member: !claim.group.is_empty(),
                })
            }
            Some(ContentSource::Volume(volume)) => {
                if BackedId::parse(volume).is_some() {
                    return Err(error::invalid(format!(
                        "volume {volume} is a read-only view of a snapshot (backingSnapshot): \
                         restore that snapshot instead of cloning the view"
                    )));
                }
                let gone = || {
                    error::not_found(format!("volume {} does not exist", error::bounded(volume)))
                };
                let from = VolumeId::parse(volume).ok_or_else(gone)?;
                if from.fs != p.fs {
                    return Err(error::invalid(format!(
                        "volume {volume} is on file system {}: a clone stays on its source's \
                         file system, not {}",
                        from.fs, p.fs
                    )));
                }
                let (s2, f) = (sv.clone(), from.clone());
                let size = blocking(move || describe(&s2, &f)).await?.capacity;
                let snap = ids::clone_snap(&v);
                Some(Copy {
                    from,
                    snap,
                    root: String::new(),
                    source: volume.clone(),
                    size,
                    clone: true,
                    member: false,
                })
            }
        };
        let source_size = copy.as_ref().map_or(0, |c| c.size);
        let size = engine::choose_size(
            req.required_bytes,
            req.limit_bytes,
            source_size,
            GRANULARITY,
            MAXIMUM_VOLUME,
        )?;
        let source = copy.as_ref().map(|c| c.source.clone()).unwrap_or_default();
        let restore_wait = self.settings.restore_wait;
        // A group member is no subvolume snapshot, so the manager's cloner
        // cannot copy it: ours does, whichever copier is chosen.
        let own = match (&copy, self.settings.copier) {
            (Some(c), copier) if c.member || copier == Copier::Ferrovol => {
                Some((self.conn.fs_login(&req.secrets)?, self.copies.clone()))
            }
            _ => None,
        };
        let (name, fingerprint) = (req.name.clone(), p.fingerprint());
        let (required, limit) = (req.required_bytes, req.limit_bytes);
        let (pool, parameters) = (p.pool.clone(), req.parameters.clone());
        let mounter = p.mounter.map(|m| m.name().to_string());
        let extra = [
            ("clusterID", p.cluster_id.clone()),
            ("fuseMountOptions", p.fuse_options.clone()),
            ("kernelMountOptions", p.kernel_options.clone()),
            ("mounter", mounter.unwrap_or_default()),
        ];
        blocking(move || {
            let oid = claim_oid(&name);
            // The claim is written before anything is made and removed
            // after everything is gone: a name not claimed for this ID has
            // no volume to find (one manager call saved per new volume).
            let exists = match check_claim(&home, &sv, &name, &id)? {
                false => None,
                true => match record(&sv, &v) {
                    Ok(r) => Some(r),
                    Err(e) if e.kind() == Kind::NotFound => None,
                    // A restore still copying: its record comes once it is
                    // done.
                    Err(e) if e.kind() == Kind::Unavailable && copy.is_some() => Some(None),
                    Err(e) => return Err(e),
                },
            };
            if let Some(Some(r)) = &exists {
                if r.params != fingerprint || r.name != name || r.source != source {
                    return Err(error::exists(format!(
                        "volume {name:?} exists with other parameters"
                    )));
                }
                let had = describe(&sv, &v)?;
                if had.capacity < required || (limit > 0 && had.capacity > limit) {
                    return Err(error::exists(format!(
                        "volume {name:?} exists with {} bytes, outside the range asked",
                        had.capacity
                    )));
                }
                home.write_object(&oid, id.as_bytes()).map_err(ceph_error)?;
                return Ok(had);
            }
            home.write_object(&oid, id.as_bytes()).map_err(ceph_error)?;
            let fs = sv.fs().to_string();
            let make_group = || {
                sv.create_group(&v.group).map_err(|e| {
                    named_by_class(e, || format!("file system {fs:?} (fsName) cannot hold groups"))
                })
            };
            match &copy {
                None => {
                    let new = NewSubvolume { size, pool_layout: pool.as_deref(), mode: None };
                    let made = |e| {
                        named_by_class(e, || {
                            format!("making a subvolume in {fs}/{} (pool {pool:?})", v.group)
                        })
                    };
                    // The group is made when the manager says it is
                    // missing, not asked for every volume.
                    match sv.create(&v.group, &v.subvolume, &new) {
                        Err(e) if e.is(libc::ENOENT) => {
                            make_group()?;
                            sv.create(&v.group, &v.subvolume, &new).map_err(made)?;
                        }
                        other => other.map_err(made)?,
                    }
                }
                Some(c) => {
                    make_group()?;
                    match &own {
                        Some((login, copies)) => {
                            let new =
                                NewSubvolume { size, pool_layout: pool.as_deref(), mode: None };
                            own_copy(&sv, &home, c, &v, &new, restore_wait, login, copies)?
                        }
                        None => copy_into(&sv, &home, c, &v, pool.as_deref(), restore_wait)?,
                    }
                    sv.resize(&v.group, &v.subvolume, size, false).map_err(ceph_error)?;
                }
            }
            let root = sv.path(&v.group, &v.subvolume).map_err(ceph_error)?;
            let context = context_of(
                [
                    ("fsName", fs.clone()),
                    ("subvolumeGroup", v.group.clone()),
                    ("subvolumeName", v.subvolume.clone()),
                    ("rootPath", root),
                ]
                .into_iter()
                .chain(extra),
            );
            let r = Record {
                name: name.clone(),
                volume: id.clone(),
                params: fingerprint,
                parameters,
                context,
                created: now(),
                source: source.clone(),
                size: 0,
                origin: String::new(),
            };
            sv.set_metadata(&v.group, &v.subvolume, META, &r.encode()).map_err(ceph_error)?;
            if own.is_some() {
                // Done: nothing left to sweep.
                home.omap_remove(COPIES, &[&id]).map_err(ceph_error)?;
            }
            // What was just made, as made: its quota is `size`.
            Ok(volume_of(r, size))
        })
        .await
    }
}

/// How long a restore's CreateVolume waits for the manager's copy before
/// it answers ABORTED (the provisioner retries, and a retry waits again):
/// a copy of a large snapshot must never hold a call for minutes.
pub const RESTORE_WAIT: Duration = Duration::from_secs(20);

/// How long a DeleteVolume waits for a copy into its volume to stop (a
/// copy looks at its stop flag between 16 MiB ranges).
const COPY_STOP_WAIT: Duration = Duration::from_secs(20);

/// How long a copy nobody asks about runs before it is abandoned: the
/// provisioner retries an ABORTED CreateVolume within seconds to minutes
/// (its backoff caps at 5 minutes), so twice that.
pub const ABANDON_AFTER: Duration = Duration::from_secs(600);

/// What a new volume is copied from: a snapshot of subvolume `from`, ours
/// (a restore) or taken for the copy (a clone: removed once it is done).
struct Copy {
    from: VolumeId,
    snap: String,
    /// Where the snapshot's data is, when its claim recorded it.
    root: String,
    /// The request's source ID (a snapshot's or a volume's).
    source: String,
    size: u64,
    clone: bool,
    /// The snapshot is a member of a group snapshot.
    member: bool,
}

/// Whether a copy under way reads from `root` or below it (a snapshot's
/// data, or a group snapshot's directory).
pub(crate) fn copying_from(home: &Pool, root: &str) -> Result<bool> {
    if root.is_empty() {
        return Ok(false);
    }
    let below = format!("{root}/");
    Ok(crate::index(home, COPIES)?.iter().any(|(_, m)| {
        let from = Marker::decode(&String::from_utf8_lossy(m)).from;
        from == root || from.starts_with(&below)
    }))
}

/// The object that records the source of a clone's own snapshot while the
/// clone is being made, so that whatever ends the clone (done, or the new
/// volume deleted mid-copy) removes that snapshot.
fn clone_oid_of(v: &VolumeId) -> String {
    let hash = &v.subvolume[v.subvolume.len().saturating_sub(32)..];
    format!("ferrovol.cephfs.clone.{hash}")
}

/// A clone's own snapshot of its source, taken once: the object naming
/// its source is written first, so a snapshot taken for the copy is never
/// left behind unknown.
fn take_clone_snapshot(sv: &Subvolumes, home: &Pool, c: &Copy, v: &VolumeId) -> Result<()> {
    if !c.clone {
        return Ok(());
    }
    home.write_object(&clone_oid_of(v), c.from.id().as_bytes()).map_err(ceph_error)?;
    match sv.snapshot(&c.from.group, &c.from.subvolume, &c.snap) {
        Err(e) if e.is(libc::EEXIST) => Ok(()),
        other => other.map_err(|e| missing_or(e, || format!("volume {} does not exist", c.source))),
    }
}

/// Copies `c` into the new subvolume `v` with the manager's cloner (a full
/// copy), or finds the copy a previous call started; waits for it at most
/// `wait` ([`RESTORE_WAIT`] unless the flag says).
fn copy_into(
    sv: &Subvolumes,
    home: &Pool,
    c: &Copy,
    v: &VolumeId,
    pool: Option<&str>,
    wait: Duration,
) -> Result<()> {
    let started = match sv.clone_state(&v.group, &v.subvolume) {
        Ok(_) => true,
        Err(e) if e.is(libc::ENOENT) => false,
        Err(e) => return Err(ceph_error(e)),
    };
    if !started {
        take_clone_snapshot(sv, home, c, v)?;
        match sv.clone_snapshot(
            &c.from.group,
            &c.from.subvolume,
            &c.snap,
            &v.group,
            &v.subvolume,
            pool,
        ) {
            Err(e) if e.is(libc::EEXIST) => {}
            other => other.map_err(|e| {
                named_by_class(e, || format!("copying {} (pool {pool:?})", c.source))
            })?,
        }
    }
    let deadline = std::time::Instant::now() + wait;
    loop {
        let state = sv.clone_state(&v.group, &v.subvolume).map_err(ceph_error)?;
        match state.as_str() {
            "complete" => return drop_clone_snapshot(sv, home, v),
            "failed" | "canceled" => {
                // Gone, so that a retry starts the copy again.
                let _ = sv.remove(&v.group, &v.subvolume, false);
                return Err(error::unavailable(format!(
                    "the copy of {} {state}; a retry starts it again",
                    c.source
                )));
            }
            _ if std::time::Instant::now() > deadline => {
                return Err(error::busy(format!(
                    "copying {}: the copy is {state}; a retry answers once it is done",
                    c.source
                )))
            }
            // The manager says nothing when a copy ends: its state is
            // polled.
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Where a snapshot's data is: recorded in its claim, else beside its
/// subvolume's data path.
fn snapshot_data(sv: &Subvolumes, c: &Copy) -> Result<String> {
    snapshots::data_path(sv.cluster(), &c.root, &c.from, &c.snap, || {
        error::not_found(format!("the volume {} was taken of is gone", c.source))
    })
}

/// Copies `c` into the new subvolume `v` with ferrovol's own copier (see
/// `copy.rs`, `copies.rs`): makes the subvolume and marks it as a copy
/// under way, starts the copy or finds the one running, and waits for it
/// at most `wait`.
#[allow(clippy::too_many_arguments)]
fn own_copy(
    sv: &Subvolumes,
    home: &Pool,
    c: &Copy,
    v: &VolumeId,
    new: &NewSubvolume<'_>,
    wait: Duration,
    login: &ferrovol_cephclient::connect::Login,
    copies: &Arc<Copies>,
) -> Result<()> {
    let id = v.id();
    let made = match sv.info(&v.group, &v.subvolume) {
        Ok(_) => true,
        Err(e) if e.is(libc::ENOENT) => false,
        Err(e) => return Err(ceph_error(e)),
    };
    if !made {
        take_clone_snapshot(sv, home, c, v)?;
        let fs = sv.fs().to_string();
        sv.create(&v.group, &v.subvolume, new)
            .map_err(|e| named_by_class(e, || format!("making a subvolume in {fs}/{}", v.group)))?;
    }
    let from = snapshot_data(sv, c)?;
    let to = sv.path(&v.group, &v.subvolume).map_err(ceph_error)?;
    // Someone asks for it: recorded (now and then) for whoever sweeps.
    let old = home.omap_get(COPIES, &id).map_err(ceph_error)?;
    let old = old.map(|m| Marker::decode(&String::from_utf8_lossy(&m)));
    if old.as_ref().is_none_or(Marker::due) {
        let marker = Marker {
            from: from.clone(),
            source: c.source.clone(),
            asked: now(),
            abandon: copies.abandon_after().as_secs(),
        };
        home.omap_set(COPIES, &[(&id, marker.encode().as_bytes())]).map_err(ceph_error)?;
    }
    if made && !copies.is_running(&id) {
        tracing::info!(volume = id, "resuming the copy from {from}");
    }
    let job = copies.ensure(&id, || Spec {
        login: login.clone(),
        fs: sv.fs().to_string(),
        from,
        to,
        cleanup: abandoned_copy_cleanup(sv, home, v),
    });
    match job.wait(wait) {
        Some(Outcome::Done) => {
            copies.forget(&id);
            drop_clone_snapshot(sv, home, v)
        }
        Some(Outcome::Failed(why)) => {
            copies.forget(&id);
            // Gone, so that a retry starts the copy again.
            let _ = sv.remove(&v.group, &v.subvolume, false);
            Err(error::unavailable(format!(
                "the copy of {} failed ({why}); a retry starts it again",
                c.source
            )))
        }
        Some(Outcome::Stopped) => {
            copies.forget(&id);
            Err(error::busy(format!(
                "the copy of {} was stopped; a retry starts it again",
                c.source
            )))
        }
        None => Err(error::busy(format!(
            "copying {}: {} done; a retry answers once it is complete",
            c.source,
            job.progress.describe()
        ))),
    }
}

/// What removes an abandoned copy: its subvolume, the clone's snapshot and
/// the name's claim.
fn abandoned_copy_cleanup(sv: &Subvolumes, home: &Pool, v: &VolumeId) -> Box<dyn FnOnce() + Send> {
    let (sv, home, v) = (sv.clone(), home.clone(), v.clone());
    Box::new(move || {
        if let Err(e) = sv.remove(&v.group, &v.subvolume, true) {
            tracing::warn!(volume = v.id(), "removing an abandoned copy: {e}");
        }
        if let Err(e) = drop_clone_snapshot(&sv, &home, &v) {
            tracing::warn!(volume = v.id(), "removing an abandoned clone's snapshot: {e:?}");
        }
        let _ = release_claim(&home, &claim_oid_of(&v), &v.id());
        let _ = home.omap_remove(COPIES, &[&v.id()]);
    })
}

/// Removes the snapshot a clone `v` was copied from, if it had one of its
/// own (its source may be kept by Ceph for it: it is purged with it).
fn drop_clone_snapshot(sv: &Subvolumes, home: &Pool, v: &VolumeId) -> Result<()> {
    let oid = clone_oid_of(v);
    let Some(from) = home.read_object(&oid).map_err(ceph_error)? else { return Ok(()) };
    if let Some(from) = VolumeId::parse(&String::from_utf8_lossy(&from)) {
        let other = Subvolumes::new(sv.cluster().clone(), &from.fs);
        match other.remove_snapshot(&from.group, &from.subvolume, &ids::clone_snap(v)) {
            Err(e) if e.is(libc::ENOENT) => {}
            Err(e) if e.is(libc::EAGAIN) => {
                return Err(error::busy(format!(
                    "the snapshot {} was cloned from is still being copied; retry",
                    v.id()
                )))
            }
            other => other.map_err(ceph_error)?,
        }
    }
    match home.remove_object(&oid) {
        Err(e) if e.is(libc::ENOENT) => Ok(()),
        other => other.map_err(ceph_error),
    }
}

/// Every subvolume of a file system, in every group (a group gone
/// meanwhile is skipped). Ours or not: callers look at each.
pub(crate) fn every_subvolume(sv: &Subvolumes) -> Result<Vec<VolumeId>> {
    let groups = match sv.groups() {
        Err(e) if e.is(libc::ENOENT) => return Ok(vec![]),
        other => other.map_err(ceph_error)?,
    };
    let mut all = vec![];
    for group in groups {
        let names = match sv.list(&group) {
            Err(e) if e.is(libc::ENOENT) => continue,
            other => other.map_err(ceph_error)?,
        };
        let fs = sv.fs();
        all.extend(names.into_iter().map(|subvolume| VolumeId {
            fs: fs.to_string(),
            group: group.clone(),
            subvolume,
        }));
    }
    Ok(all)
}

/// One name, one volume: a claim of `name` for another volume that still
/// exists is ALREADY_EXISTS; one whose volume is gone is taken over.
/// Answers whether the name is claimed for `id` already.
pub(crate) fn check_claim(home: &Pool, sv: &Subvolumes, name: &str, id: &str) -> Result<bool> {
    let Some(other) = home.read_object(&claim_oid(name)).map_err(ceph_error)? else {
        return Ok(false);
    };
    let other = String::from_utf8_lossy(&other).into_owned();
    if other != id && claimed_volume_exists(home, sv, &other)? {
        return Err(error::exists(format!(
            "volume name {name:?} is taken by {other}, made with other parameters"
        )));
    }
    Ok(other == id)
}

/// Releases the claim of a volume's name if it still names this volume.
pub(crate) fn release_claim(home: &Pool, oid: &str, id: &str) -> Result<()> {
    let mine = home.read_object(oid).map_err(ceph_error)?.as_deref() == Some(id.as_bytes());
    if mine {
        match home.remove_object(oid) {
            Err(e) if e.is(libc::ENOENT) => {}
            other => other.map_err(ceph_error)?,
        }
    }
    Ok(())
}

/// Whether the volume a claim names still exists (a claim left by a
/// delete cut short names nothing).
fn claimed_volume_exists(home: &Pool, sv: &Subvolumes, id: &str) -> Result<bool> {
    if let Some(b) = BackedId::parse(id) {
        return Ok(backed::record(home, &b)?.is_some());
    }
    let Some(v) = VolumeId::parse(id) else { return Ok(false) };
    let other = Subvolumes::new(sv.cluster().clone(), &v.fs);
    match record(&other, &v) {
        Ok(r) => Ok(r.is_some()),
        Err(e) if e.kind() == Kind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

#[tonic::async_trait]
impl ControllerEngine for CephFsEngine {
    fn kind(&self) -> &'static str {
        "cephfs"
    }

    fn features(&self) -> Features {
        crate::features()
    }

    fn manifest(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("engine".to_string(), "cephfs".to_string()),
            ("filesystems".to_string(), self.settings.filesystems.join(",")),
        ])
    }

    fn has_topology(&self) -> bool {
        false
    }

    async fn close(&self) -> Result<()> {
        let limit = Duration::from_secs(self.conn.config().op_timeout);
        crate::close_connections(&self.conn, limit).await;
        Ok(())
    }

    async fn health(&self) -> Result<()> {
        let cluster = self.conn.default_cluster().await?;
        blocking(move || cluster.stat().map(drop).map_err(ceph_error)).await
    }

    async fn stats(&self) -> Result<EngineStats> {
        let mut stats = EngineStats::default();
        // First: the copies' figures as of the scrape, not after the
        // listing's manager calls.
        (stats.copies_running, stats.copies_done_bytes, stats.copies_size_bytes) =
            self.copies.totals();
        let mut token = None;
        loop {
            let page = self.list_volumes(token.as_deref(), 1000).await?;
            stats.volumes += page.items.len() as u64;
            stats.provisioned_bytes += page.items.iter().map(|v| v.capacity).sum::<u64>();
            match page.next {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        let home = self.home_pool(&Secrets::default()).await?;
        stats.groups = blocking(move || crate::groups::count(&home)).await?;
        if let Ok((total, avail)) = self.space(self.home_fs(), None).await {
            stats.storage_capacity_bytes = total;
            stats.storage_used_bytes = total.saturating_sub(avail);
        }
        Ok(stats)
    }

    fn validate_parameters(&self, parameters: &BTreeMap<String, String>) -> Result<()> {
        params::parse(parameters).map(drop)
    }

    async fn create_volume(&self, req: NewVolume) -> Result<Volume> {
        let p = params::parse(&req.parameters)?;
        if req.access == AccessType::Block {
            return Err(error::invalid(
                "CephFS volumes are file systems: raw block access is not offered",
            ));
        }
        if p.backing_snapshot {
            return self.create_backed(&req, &p).await;
        }
        self.create(&req, &p).await
    }

    async fn delete_volume(&self, id: &str, secrets: &Secrets) -> Result<()> {
        if let Some(b) = BackedId::parse(id) {
            return self.delete_backed(&b, secrets).await;
        }
        // An ID we never minted names nothing: deleted already.
        let Some(v) = VolumeId::parse(id) else { return Ok(()) };
        let sv = self.subvolumes(&v.fs, secrets).await?;
        let home = self.home_pool(secrets).await?;
        // A copy into it still running is stopped first.
        let (copies, key) = (self.copies.clone(), id.to_string());
        if !blocking(move || Ok(copies.stop(&key, COPY_STOP_WAIT))).await? {
            return Err(error::busy(format!("the copy into {id} is still stopping; retry")));
        }
        let id = id.to_string();
        let manager = self.settings.copier == Copier::Manager;
        blocking(move || {
            // A restore the manager's cloner still copies is cancelled
            // first (ours was stopped above).
            if manager {
                match record(&sv, &v) {
                    Err(e) if e.kind() == Kind::Unavailable => {
                        let _ = sv.cancel_clone(&v.group, &v.subvolume);
                    }
                    Err(e) if e.kind() != Kind::NotFound => return Err(e),
                    _ => {}
                }
            }
            // Snapshots outlive their volume: Ceph keeps a subvolume with
            // snapshots as `snapshot-retained` (no data path, no record)
            // and purges it with its last snapshot.
            match sv.remove(&v.group, &v.subvolume, true) {
                // A restore still copying (never a volume yet): its copy
                // is cancelled and what it made removed.
                Err(e) if e.is(libc::EAGAIN) => {
                    let _ = sv.cancel_clone(&v.group, &v.subvolume);
                    sv.remove_cancelled_clone(&v.group, &v.subvolume).map_err(ceph_error)?
                }
                other => other.map_err(ceph_error)?,
            }
            drop_clone_snapshot(&sv, &home, &v)?;
            home.omap_remove(COPIES, &[&id]).map_err(ceph_error)?;
            release_claim(&home, &claim_oid_of(&v), &id)
        })
        .await
    }

    async fn volume(&self, id: &str) -> Result<Volume> {
        let gone = || error::not_found(format!("volume {} does not exist", error::bounded(id)));
        if let Some(b) = BackedId::parse(id) {
            let home = self.home_pool(&Secrets::default()).await?;
            return blocking(move || backed::describe(&home, &b)).await;
        }
        let v = VolumeId::parse(id).ok_or_else(gone)?;
        let sv = self.subvolumes(&v.fs, &Secrets::default()).await?;
        blocking(move || describe(&sv, &v)).await
    }

    async fn volume_conditions(&self, ids: &[String]) -> Result<Vec<Result<Condition>>> {
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(b) = BackedId::parse(id) {
                let home = self.home_pool(&Secrets::default()).await?;
                let cluster = self.conn.default_cluster().await?;
                out.push(blocking(move || backed::condition(&home, &cluster, &b)).await);
                continue;
            }
            let Some(v) = VolumeId::parse(id) else {
                out.push(Err(error::not_found(format!(
                    "volume {} does not exist",
                    error::bounded(id)
                ))));
                continue;
            };
            let sv = self.subvolumes(&v.fs, &Secrets::default()).await?;
            let id = id.clone();
            out.push(
                blocking(move || {
                    let info = sv
                        .info(&v.group, &v.subvolume)
                        .map_err(|e| missing_or(e, || format!("volume {id} does not exist")))?;
                    Ok(match info.state.as_str() {
                        "complete" => Condition::Healthy,
                        other => Condition::Abnormal(format!("the subvolume is {other}")),
                    })
                })
                .await,
            );
        }
        Ok(out)
    }

    /// Every subvolume with our record in the covered file systems, by ID.
    async fn list_volumes(&self, token: Option<&str>, max: usize) -> Result<Page<Volume>> {
        if token.is_some_and(|t| ids::fs_of_volume(t).is_none()) {
            return Err(error::busy("starting_token is not one this driver issued"));
        }
        // Every candidate's ID is cheap (one listing per subvolume group,
        // one index read for the views); describing a subvolume costs two
        // manager calls. So only the page's candidates are described, in
        // ID order, from after the token: a listing of N volumes costs N
        // descriptions in all, not N per page.
        let mut candidates: Vec<(String, Candidate)> = vec![];
        for fs in &self.settings.filesystems {
            let sv = self.subvolumes(fs, &Secrets::default()).await?;
            let listed = blocking({
                let sv = sv.clone();
                move || every_subvolume(&sv)
            })
            .await?;
            candidates.extend(listed.into_iter().map(|v| (v.id(), Candidate::Sub(sv.clone(), v))));
        }
        let home = self.home_pool(&Secrets::default()).await?;
        let views = blocking(move || backed::all(&home)).await?;
        candidates.extend(views.into_iter().map(|v| (v.id.clone(), Candidate::View(v))));
        candidates.retain(|(id, _)| token.is_none_or(|t| id.as_str() > t));
        candidates.sort_by(|a, b| a.0.cmp(&b.0));
        let want = max.max(1);
        let mut page = blocking(move || {
            let mut page = Vec::with_capacity(want + 1);
            // One past the page: whether another page follows.
            for (_, c) in candidates {
                if page.len() > want {
                    break;
                }
                match c {
                    Candidate::View(v) => page.push(v),
                    Candidate::Sub(sv, v) => match describe(&sv, &v) {
                        Ok(vol) => page.push(vol),
                        // Not ours, half made, gone meanwhile, or a
                        // restore still copying.
                        Err(e) if matches!(e.kind(), Kind::NotFound | Kind::Unavailable) => {}
                        Err(e) => return Err(e),
                    },
                }
            }
            Ok(page)
        })
        .await?;
        let next = engine::next_token(&mut page, want, |v| v.id.clone());
        Ok(Page { items: page, next })
    }

    async fn capacity(
        &self,
        parameters: &BTreeMap<String, String>,
        _topology: Option<&Topology>,
    ) -> Result<Capacity> {
        let (fs, pool) = match parameters.is_empty() {
            true => (self.home_fs().to_string(), None),
            false => {
                let p = params::parse(parameters)?;
                (p.fs, p.pool)
            }
        };
        let (_, available) = self.space(&fs, pool.as_deref()).await?;
        Ok(Capacity {
            available,
            maximum_volume_size: MAXIMUM_VOLUME,
            minimum_volume_size: GRANULARITY,
        })
    }

    fn groups(&self) -> Option<&dyn GroupSnapshots> {
        Some(self)
    }

    fn snapshots(&self) -> Option<&dyn Snapshots> {
        Some(self)
    }

    async fn expand_volume(
        &self,
        id: &str,
        required: u64,
        limit: u64,
        secrets: &Secrets,
    ) -> Result<Expanded> {
        let gone = || error::not_found(format!("volume {} does not exist", error::bounded(id)));
        if let Some(b) = BackedId::parse(id) {
            let home = self.home_pool(secrets).await?;
            let v = blocking(move || backed::describe(&home, &b)).await?;
            return Err(error::precondition(format!(
                "volume {} is a read-only view of a snapshot (backingSnapshot): it cannot \
                 grow; restore the snapshot without backingSnapshot for a volume that can",
                v.id
            )));
        }
        let v = VolumeId::parse(id).ok_or_else(gone)?;
        let sv = self.subvolumes(&v.fs, secrets).await?;
        blocking(move || {
            let now = describe(&sv, &v)?.capacity;
            if now >= required && now > 0 {
                return Ok(Expanded { capacity: now, node_expansion_required: false });
            }
            let size = engine::choose_size(required, limit, now, GRANULARITY, MAXIMUM_VOLUME)?;
            sv.resize(&v.group, &v.subvolume, size, true).map_err(ceph_error)?;
            Ok(Expanded { capacity: size, node_expansion_required: false })
        })
        .await
    }
}

impl CephFsEngine {
    /// Removes the copies nobody asks about any more, whoever started
    /// them (this process before a restart, another replica): subvolumes
    /// marked as copies under way whose marker was last renewed longer ago
    /// than its copier's abandon time. A copy still wanted is renewed by
    /// the provisioner's retries, whichever replica serves them, and a
    /// restarted driver resumes it on the next retry. Answers how many
    /// went.
    pub async fn sweep_copies(&self) -> Result<usize> {
        if self.settings.copier != Copier::Ferrovol {
            return Ok(0);
        }
        let home = self.home_pool(&Secrets::default()).await?;
        let cluster = self.conn.default_cluster().await?;
        let copies = self.copies.clone();
        blocking(move || {
            let mut swept = 0;
            for (id, value) in crate::index(&home, COPIES)? {
                let marker = Marker::decode(&String::from_utf8_lossy(&value));
                let Some(v) = VolumeId::parse(&id) else { continue };
                if !marker.stale() || copies.is_running(&id) {
                    continue;
                }
                tracing::warn!(
                    volume = id,
                    "a copy nobody asked about for {} s is abandoned and removed",
                    now().saturating_sub(marker.asked)
                );
                let sv = Subvolumes::new(cluster.clone(), &v.fs);
                abandoned_copy_cleanup(&sv, &home, &v)();
                swept += 1;
            }
            Ok(swept)
        })
        .await
    }

    /// Total bytes of the cluster and what the file system's data pool
    /// (`pool`, else its first) can still take.
    async fn space(&self, fs: &str, pool: Option<&str>) -> Result<(u64, u64)> {
        let cluster = self.conn.default_cluster().await?;
        let (fs, pool) = (fs.to_string(), pool.map(str::to_string));
        blocking(move || {
            let pool = match pool {
                Some(p) => p,
                None => file_system(&cluster, &fs)?
                    .and_then(|f| f.data_pools.into_iter().next())
                    .ok_or_else(|| {
                    error::invalid(format!("file system {fs:?} does not exist"))
                })?,
            };
            let space = ferrovol_cephclient::space(&cluster)?;
            let avail = space
                .available(Some(&pool))
                .ok_or_else(|| error::invalid(format!("data pool {pool:?} does not exist")))?;
            Ok((space.total, avail))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let r = Record {
            name: "pvc-1".into(),
            volume: "cephfs:a:csi:csi-vol-x".into(),
            params: "fsName=a".into(),
            parameters: BTreeMap::from([("fsName".into(), "a".into())]),
            context: BTreeMap::from([("rootPath".into(), "/volumes/csi/x/uuid".into())]),
            created: 1_700_000_000,
            source: "cephfs-snap:a:0123456789abcdef0123456789abcdef".into(),
            size: 1 << 30,
            origin: "cephfs:a:csi:csi-vol-y".into(),
        };
        assert_eq!(Record::decode(&r.encode()), Some(r));
        assert_eq!(Record::decode("not json"), None);
    }
}
