//! Storage engines: what a volume *is* lives behind this trait.
//!
//! The CSI services validate requests, take operation locks and translate to
//! and from the wire; an engine stores bytes. The local engine (volumes are
//! files in a pool directory) is the first implementation; a Ceph RBD engine
//! is the second, so nothing here may assume files, paths or one node:
//! - IDs are opaque strings the engine mints and validates;
//! - topology is whatever segments the engine says its volumes live in;
//! - a volume reaches a node through `attach`/`detach`, which hand back a
//!   block device (a loop device here, a mapped RBD image there);
//! - an engine says where expansion happens (controller or node).

pub mod ids;
pub mod local;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::SystemTime;

use crate::error::Result;

/// Where a volume's data comes from when it is created.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ContentSource {
    Snapshot(String),
    Volume(String),
}

/// How the volume will be consumed: decided by the CO per publish, recorded
/// at creation for the first consumer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AccessType {
    Mount { fs_type: String },
    Block,
}

/// A request for a new volume, already validated by the services.
#[derive(Clone, Debug)]
pub struct NewVolume {
    pub name: String,
    /// Smallest acceptable size in bytes (0: the engine's default).
    pub required_bytes: u64,
    /// Largest acceptable size in bytes (0: no limit).
    pub limit_bytes: u64,
    pub access: AccessType,
    /// Engine parameters (the CO's own `csi.storage.k8s.io/` keys removed).
    pub parameters: BTreeMap<String, String>,
    pub source: Option<ContentSource>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Volume {
    pub id: String,
    pub name: String,
    pub capacity: u64,
    pub source: Option<ContentSource>,
    pub access: AccessType,
    pub parameters: BTreeMap<String, String>,
    pub topology: BTreeMap<String, String>,
    pub created: SystemTime,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    pub id: String,
    pub name: String,
    pub source_volume: String,
    pub size: u64,
    pub created: SystemTime,
    pub ready: bool,
    /// Set when the snapshot is a member of a group snapshot.
    pub group_id: Option<String>,
}

/// A crash-consistent snapshot of several volumes at one instant.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupSnapshot {
    pub id: String,
    pub name: String,
    pub snapshots: Vec<Snapshot>,
    pub created: SystemTime,
    pub ready: bool,
}

/// Quiesces the group's members (freezes their filesystems) and answers a
/// guard that releases them when dropped. The engine calls it after every
/// slow preparation and right before the first copy-on-write clone, and
/// drops the guard right after the last, so the window is as short as the
/// clones themselves.
pub type Quiesce = Box<dyn FnOnce() -> Result<Box<dyn Send>> + Send>;

/// Figures for metrics, read fresh from the engine's own records.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub volumes: u64,
    pub snapshots: u64,
    pub groups: u64,
    pub pool_capacity_bytes: u64,
    pub pool_used_bytes: u64,
    pub provisioned_bytes: u64,
    /// Block devices of volumes attached on this node.
    pub attached: Vec<PathBuf>,
    /// How copies are made ("reflink", "copy"; empty if not applicable).
    pub cow_method: String,
}

/// A byte range of a volume or snapshot: (offset, length).
pub type Range = (u64, u64);

/// Health of one volume as the engine sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Condition {
    Healthy,
    Abnormal(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    /// Bytes a new volume can get right now.
    pub available: u64,
    /// The largest volume this engine could ever hold.
    pub maximum_volume_size: u64,
    /// The smallest volume it makes (its size granularity).
    pub minimum_volume_size: u64,
}

/// Where growing a volume happens for this engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpansionSite {
    /// The controller grows the volume (ControllerExpandVolume), the node
    /// then grows the filesystem.
    Controller,
    /// Everything happens on the node (NodeExpandVolume): the storage lives
    /// there.
    Node,
}

/// Which snapshots a listing wants.
#[derive(Clone, Debug, Default)]
pub struct SnapshotFilter {
    pub snapshot_id: Option<String>,
    pub source_volume: Option<String>,
}

/// One page of a listing and the token for the next (None: the end).
#[derive(Clone, Debug)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next: Option<String>,
}

#[tonic::async_trait]
pub trait Engine: Send + Sync + 'static {
    /// Short engine name for manifests and logs ("local", "rbd").
    fn kind(&self) -> &'static str;

    /// Facts about the engine for GetPluginInfo's manifest.
    fn manifest(&self) -> BTreeMap<String, String>;

    /// Topology segments of the volumes this engine creates from here.
    fn topology(&self) -> BTreeMap<String, String>;

    /// Whether volumes can be used from several nodes at once.
    fn multi_node(&self) -> bool;

    fn expansion_site(&self) -> ExpansionSite;

    /// Checks that the engine can do its work now (Probe); `node` when this
    /// process also attaches volumes to this node.
    async fn health(&self, node: bool) -> Result<()>;

    /// Counts and sizes for metrics.
    async fn stats(&self) -> Result<EngineStats>;

    /// Rejects parameters this engine does not understand.
    fn validate_parameters(&self, parameters: &BTreeMap<String, String>) -> Result<()>;

    /// Creates a volume, or answers the one already created under this name
    /// when the request is compatible (ALREADY_EXISTS when it is not).
    async fn create_volume(&self, request: NewVolume) -> Result<Volume>;

    /// Deletes a volume; a volume that does not exist is already deleted.
    async fn delete_volume(&self, id: &str) -> Result<()>;

    /// A volume by id: NOT_FOUND when unknown or malformed.
    async fn volume(&self, id: &str) -> Result<Volume>;

    async fn volume_condition(&self, id: &str) -> Result<Condition> {
        let mut one = self.volume_conditions(&[id.to_string()]).await?;
        one.pop().expect("one condition per id")
    }

    /// Conditions of many volumes at once (a ListVolumes page), one per id
    /// in order: engines can check them together rather than one by one.
    async fn volume_conditions(&self, ids: &[String]) -> Result<Vec<Result<Condition>>>;

    async fn list_volumes(&self, token: Option<&str>, max: usize) -> Result<Page<Volume>>;

    /// What can be created now with these (engine) parameters.
    async fn capacity(&self, parameters: &BTreeMap<String, String>) -> Result<Capacity>;

    /// Grows a volume to at least `required` bytes (never shrinks); answers
    /// the new capacity.
    async fn expand_volume(&self, id: &str, required: u64, limit: u64) -> Result<u64>;

    /// Takes a snapshot, or answers the one with this name when it has the
    /// same source (ALREADY_EXISTS when not).
    /// Snapshots a volume; `quiesce` as for group snapshots: called right
    /// before the copy-on-write clone, its guard dropped right after, never
    /// across a journal write.
    async fn create_snapshot(
        &self,
        name: &str,
        source_volume: &str,
        quiesce: Quiesce,
    ) -> Result<Snapshot>;

    async fn delete_snapshot(&self, id: &str) -> Result<()>;

    async fn snapshot(&self, id: &str) -> Result<Snapshot>;

    async fn list_snapshots(
        &self,
        filter: &SnapshotFilter,
        token: Option<&str>,
        max: usize,
    ) -> Result<Page<Snapshot>>;

    /// Snapshots every volume at one instant: `quiesce` runs after the
    /// members are reserved and before the first clone; its guard is dropped
    /// after the last. Idempotent by name (same members: the same group;
    /// other members: ALREADY_EXISTS). A failure leaves no member behind.
    /// Answers the group and how long the members were quiesced.
    async fn create_group_snapshot(
        &self,
        name: &str,
        volumes: &[String],
        quiesce: Quiesce,
    ) -> Result<(GroupSnapshot, std::time::Duration)>;

    /// Deletes a group and its members; an unknown group is already deleted.
    async fn delete_group_snapshot(&self, id: &str) -> Result<()>;

    async fn group_snapshot(&self, id: &str) -> Result<GroupSnapshot>;

    /// The snapshot's size and its allocated ranges, in order.
    async fn allocated_ranges(&self, snapshot_id: &str) -> Result<(u64, Vec<Range>)>;

    /// The target snapshot's size and the ranges that differ from `base`
    /// (both snapshots of one volume), in order. May over-report (a range
    /// written with the same bytes), never under-report.
    async fn changed_ranges(&self, base: &str, target: &str) -> Result<(u64, Vec<Range>)>;

    /// Makes the volume a block device on this node; answers its path.
    /// Attaching an attached volume answers the same device.
    async fn attach(&self, id: &str) -> Result<PathBuf>;

    /// Undoes `attach`; detaching a detached volume succeeds.
    async fn detach(&self, id: &str) -> Result<()>;

    /// The device the volume is attached as on this node, if it is.
    async fn attached_device(&self, id: &str) -> Result<Option<PathBuf>>;

    /// Every device of this engine's volumes attached on this node.
    async fn all_attached(&self) -> Result<Vec<PathBuf>>;

    /// Makes the attached device show the volume's current size after an
    /// expansion (some devices follow on their own; others must be told).
    async fn refresh_device(&self, id: &str) -> Result<()>;
}

/// Size of a volume created without a capacity range.
pub const DEFAULT_VOLUME_SIZE: u64 = 1 << 30;

/// Picks a volume size for a CSI capacity range: at least `required` and the
/// source's size, at most `limit` (0: none), in multiples of `granularity`,
/// never more than `maximum` (what the engine could ever hold).
pub fn choose_size(
    required: u64,
    limit: u64,
    source: u64,
    granularity: u64,
    maximum: u64,
) -> Result<u64> {
    use crate::error::out_of_range;
    let floor = required.max(source);
    let size = if floor > 0 {
        floor
            .checked_add(granularity - 1)
            .map(|b| b / granularity * granularity)
            .ok_or_else(|| out_of_range(format!("{floor} bytes is too large")))?
    } else if limit > 0 {
        DEFAULT_VOLUME_SIZE.min(limit) / granularity * granularity
    } else {
        DEFAULT_VOLUME_SIZE
    };
    if size == 0 {
        return Err(out_of_range(format!(
            "limit of {limit} bytes is below the smallest volume ({granularity} bytes)"
        )));
    }
    if limit > 0 && size > limit {
        return Err(out_of_range(if source > limit {
            format!("the source is {source} bytes, more than the limit of {limit}")
        } else {
            format!("{size} bytes (rounded to {granularity}) exceeds the limit of {limit}")
        }));
    }
    if size > maximum {
        return Err(out_of_range(format!(
            "{size} bytes is more than this engine can ever hold ({maximum} bytes)"
        )));
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    const G: u64 = 4096;
    const MAX: u64 = 1 << 40;

    #[test]
    fn sizes_follow_the_capacity_range() {
        assert_eq!(choose_size(0, 0, 0, G, MAX).unwrap(), DEFAULT_VOLUME_SIZE);
        assert_eq!(choose_size(1, 0, 0, G, MAX).unwrap(), G);
        assert_eq!(choose_size(5000, 0, 0, G, MAX).unwrap(), 2 * G);
        assert_eq!(choose_size(0, 10 * G + 1, 0, G, MAX).unwrap(), 10 * G);
        assert_eq!(choose_size(G, G, 0, G, MAX).unwrap(), G);
        // A source larger than the request grows the result.
        assert_eq!(choose_size(G, 0, 3 * G, G, MAX).unwrap(), 3 * G);
    }

    #[test]
    fn impossible_sizes_are_out_of_range() {
        for (req, lim, src) in [(0, 100, 0), (5000, 6000, 0), (0, 2 * G, 3 * G), (MAX + 1, 0, 0)] {
            let e = choose_size(req, lim, src, G, MAX).unwrap_err();
            assert_eq!(e.code(), Code::OutOfRange, "{req} {lim} {src}: {e}");
        }
        assert_eq!(choose_size(u64::MAX, 0, 0, G, u64::MAX).unwrap_err().code(), Code::OutOfRange);
    }
}
