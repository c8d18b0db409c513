//! Storage engines: what a volume *is* lives behind two traits.
//!
//! The CSI services validate requests, take operation locks and translate to
//! and from the wire; an engine stores bytes. An engine has two halves,
//! because Kubernetes runs them in two places:
//! - a [`ControllerEngine`] (the Controller, GroupController and
//!   SnapshotMetadata services: volumes, snapshots, groups, capacity,
//!   expansion, publish to a node, listings, changed blocks), which may run
//!   in a Deployment far from any volume;
//! - a [`NodeAttacher`] (the Node service): makes a volume a block device on
//!   this node from what the CO hands the node (volume ID, volume context,
//!   publish context, secrets) and nothing else, and quiesces staged
//!   filesystems when its controller half asks.
//!
//! Nothing here may assume files, paths or one node: IDs are opaque strings
//! the engine mints and validates, topology is whatever segments the engine
//! says its volumes live in, and an engine says in [`Features`] what it can
//! do (access modes, whether it needs ControllerPublish, where growing
//! happens). The local engine implements both halves; see
//! docs/architecture.md for adding another.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::SystemTime;

pub use ferrovol_csi::volume_capability::access_mode::Mode as AccessMode;

use crate::error::Result;

/// Topology segments (key → value), as CSI's `Topology`.
pub type Topology = BTreeMap<String, String>;

/// Opaque string maps the engine hands the CO and gets back (volume and
/// publish context).
pub type Context = BTreeMap<String, String>;

/// The secrets a request carried. They reach the engine and nothing else:
/// `Debug` shows only how many there are, so no log line can hold one.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secrets(BTreeMap<String, String>);

impl Secrets {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for Secrets {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        Secrets(iter.into_iter().map(|(k, v)| (k.into(), v.into())).collect())
    }
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secrets({} redacted)", self.0.len())
    }
}

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

/// Where a new volume must (requisite) or should (preferred) be accessible
/// from, as the CO asked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TopologyRequirement {
    pub requisite: Vec<Topology>,
    pub preferred: Vec<Topology>,
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
    /// None: anywhere the engine likes.
    pub accessibility: Option<TopologyRequirement>,
    pub secrets: Secrets,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Volume {
    pub id: String,
    pub name: String,
    pub capacity: u64,
    pub source: Option<ContentSource>,
    pub access: AccessType,
    pub parameters: BTreeMap<String, String>,
    /// What the node half needs besides the ID (handed back by the CO on
    /// every node call for this volume).
    pub context: Context,
    /// Where the volume can be used from (empty: anywhere).
    pub accessible: Vec<Topology>,
    /// Nodes it is published to, for engines that need ControllerPublish.
    pub published_nodes: Vec<String>,
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

/// What [`NodeAttacher::prepare_quiesce`] answers: the freeze itself, whose
/// guard thaws on drop.
pub use ferrovol_host::node::quiesce::Quiesce;

/// A quiesce that holds nothing: for volumes nobody writes to through a
/// node, or storage that orders writes itself.
pub fn no_quiesce() -> Quiesce {
    Box::new(|| Ok(Box::new(()) as Box<dyn Send>))
}

/// Figures for metrics, read fresh from the controller half's records.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub volumes: u64,
    pub snapshots: u64,
    pub groups: u64,
    /// The backing storage's size and use (a pool, a Ceph pool).
    pub storage_capacity_bytes: u64,
    pub storage_used_bytes: u64,
    pub provisioned_bytes: u64,
    /// Engine-specific facts exported as an info metric (the local engine:
    /// its copy method).
    pub facts: BTreeMap<String, String>,
}

/// A byte range of a volume or snapshot: (offset, length).
pub type Range = (u64, u64);

/// Whether a volume that shows no filesystem signature was ever written:
/// only one provably never written may be formatted (data without a
/// signature — a database's raw device, headerless encrypted data — looks
/// blank to `blkid`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Written {
    /// Nothing was ever written: formatting loses nothing.
    Never,
    /// Data is there, or may be: why, for the refusal.
    Maybe(String),
}

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
    /// Everything happens on the node (NodeExpandVolume, through
    /// [`NodeAttacher::grow`]): the storage lives there.
    Node,
}

/// What an engine can do; the services advertise exactly this and refuse
/// the rest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Features {
    pub expansion: ExpansionSite,
    /// Access modes of filesystem volumes.
    pub mount_modes: Vec<AccessMode>,
    /// Access modes of raw block volumes.
    pub block_modes: Vec<AccessMode>,
}

impl Features {
    pub fn modes(&self, access: &AccessType) -> &[AccessMode] {
        match access {
            AccessType::Mount { .. } => &self.mount_modes,
            AccessType::Block => &self.block_modes,
        }
    }

    /// The modes an engine whose volumes live on one node supports.
    pub fn single_node_modes() -> Vec<AccessMode> {
        vec![
            AccessMode::SingleNodeWriter,
            AccessMode::SingleNodeReaderOnly,
            AccessMode::SingleNodeSingleWriter,
            AccessMode::SingleNodeMultiWriter,
        ]
    }
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

/// Trims a listing fetched with one item more than `max` (so it is known
/// whether more follow) and answers the token that resumes after it.
pub fn next_token<T>(items: &mut Vec<T>, max: usize, id: impl Fn(&T) -> String) -> Option<String> {
    if items.len() > max {
        items.truncate(max);
        items.last().map(id)
    } else {
        None
    }
}

/// A ControllerPublishVolume, validated.
#[derive(Clone, Debug)]
pub struct Publish {
    pub volume_id: String,
    pub node_id: String,
    pub mode: AccessMode,
    pub access: AccessType,
    pub read_only: bool,
    pub volume_context: Context,
    pub secrets: Secrets,
}

/// What a node call knows about the volume it acts on: all a node half may
/// use (no controller records).
#[derive(Clone, Debug)]
pub struct Attach {
    pub volume_id: String,
    pub volume_context: Context,
    pub publish_context: Context,
    pub secrets: Secrets,
    pub read_only: bool,
}

/// The controller half of an engine.
#[tonic::async_trait]
pub trait ControllerEngine: Send + Sync + 'static {
    /// Short engine name for manifests and logs ("local", "rbd").
    fn kind(&self) -> &'static str;

    fn features(&self) -> Features;

    /// Facts about the engine for GetPluginInfo's manifest.
    fn manifest(&self) -> BTreeMap<String, String>;

    /// Whether the engine's volumes are constrained by topology at all
    /// (VOLUME_ACCESSIBILITY_CONSTRAINTS).
    fn has_topology(&self) -> bool;

    /// Checks that the engine can do its work now (Probe).
    async fn health(&self) -> Result<()>;

    /// Counts and sizes for metrics.
    async fn stats(&self) -> Result<EngineStats>;

    /// A graceful stop: makes every change answered so far durable, so the
    /// next start has nothing to finish. Called once, after the last call.
    async fn close(&self) -> Result<()> {
        Ok(())
    }

    /// Rejects parameters this engine does not understand.
    fn validate_parameters(&self, parameters: &BTreeMap<String, String>) -> Result<()>;

    /// Creates a volume, or answers the one already created under this name
    /// when the request is compatible (ALREADY_EXISTS when it is not). A
    /// requisite topology the engine cannot serve is RESOURCE_EXHAUSTED.
    async fn create_volume(&self, request: NewVolume) -> Result<Volume>;

    /// Deletes a volume; a volume that does not exist is already deleted.
    async fn delete_volume(&self, id: &str, secrets: &Secrets) -> Result<()>;

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

    /// What can be created now with these (engine) parameters, in this
    /// topology segment (None: anywhere); a segment the engine does not
    /// serve has no capacity.
    async fn capacity(
        &self,
        parameters: &BTreeMap<String, String>,
        topology: Option<&Topology>,
    ) -> Result<Capacity>;

    /// Grows a volume to at least `required` bytes (never shrinks); answers
    /// the new capacity and whether the node has a step to take.
    async fn expand_volume(
        &self,
        id: &str,
        required: u64,
        limit: u64,
        secrets: &Secrets,
    ) -> Result<Expanded>;

    /// The optional parts: each present exactly when the engine offers it,
    /// and the services advertise (capabilities, services) exactly the
    /// parts present; an absent part's calls are UNIMPLEMENTED.
    fn publishing(&self) -> Option<&dyn Publishing> {
        None
    }

    fn snapshots(&self) -> Option<&dyn Snapshots> {
        None
    }

    fn groups(&self) -> Option<&dyn GroupSnapshots> {
        None
    }

    fn changed_blocks(&self) -> Option<&dyn ChangedBlocks> {
        None
    }
}

/// What a ControllerExpandVolume did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expanded {
    pub capacity: u64,
    /// The node must take a step too (grow a filesystem, refresh a device
    /// that does not follow its volume's size by itself).
    pub node_expansion_required: bool,
}

/// Controller attach: volumes published to a node before the node can use
/// them (CSIDriver `attachRequired: true`).
#[tonic::async_trait]
pub trait Publishing: Send + Sync {
    /// Makes the volume reachable from a node; answers the publish context
    /// the node half gets.
    async fn publish(&self, request: &Publish) -> Result<Context>;

    /// Undoes `publish` for one node (None: every node); unpublished is
    /// fine.
    async fn unpublish(
        &self,
        volume_id: &str,
        node_id: Option<&str>,
        secrets: &Secrets,
    ) -> Result<()>;
}

/// Snapshots of single volumes, and volumes restored from them.
#[tonic::async_trait]
pub trait Snapshots: Send + Sync {
    /// Takes a snapshot, or answers the one with this name when it has the
    /// same source (ALREADY_EXISTS when not). The engine quiesces the
    /// source (through its node half) for the instant of the copy only.
    async fn create_snapshot(
        &self,
        name: &str,
        source_volume: &str,
        secrets: &Secrets,
    ) -> Result<Snapshot>;

    async fn delete_snapshot(&self, id: &str, secrets: &Secrets) -> Result<()>;

    async fn snapshot(&self, id: &str) -> Result<Snapshot>;

    async fn list_snapshots(
        &self,
        filter: &SnapshotFilter,
        token: Option<&str>,
        max: usize,
    ) -> Result<Page<Snapshot>>;
}

/// Snapshots of several volumes at one instant (the GroupController).
#[tonic::async_trait]
pub trait GroupSnapshots: Send + Sync {
    /// Snapshots every volume at one instant. Idempotent by name (same
    /// members: the same group; other members: ALREADY_EXISTS). A failure
    /// leaves no member behind. Answers the group and how long the members
    /// were quiesced.
    async fn create_group_snapshot(
        &self,
        name: &str,
        volumes: &[String],
        secrets: &Secrets,
    ) -> Result<(GroupSnapshot, std::time::Duration)>;

    /// Deletes a group and its members; an unknown group is already deleted.
    async fn delete_group_snapshot(&self, id: &str, secrets: &Secrets) -> Result<()>;

    async fn group_snapshot(&self, id: &str) -> Result<GroupSnapshot>;
}

/// Allocated and changed blocks of snapshots (the SnapshotMetadata
/// service).
#[tonic::async_trait]
pub trait ChangedBlocks: Send + Sync {
    /// The snapshot's size and its allocated ranges, in order.
    async fn allocated_ranges(&self, snapshot_id: &str) -> Result<(u64, Vec<Range>)>;

    /// The target snapshot's size and the ranges that differ from `base`
    /// (both snapshots of one volume), in order. May over-report (a range
    /// written with the same bytes), never under-report.
    async fn changed_ranges(&self, base: &str, target: &str) -> Result<(u64, Vec<Range>)>;
}

/// The node half of an engine: everything it does, it does from what the
/// node call carries ([`Attach`]) and what the kernel shows.
#[tonic::async_trait]
pub trait NodeAttacher: Send + Sync + 'static {
    fn kind(&self) -> &'static str;

    fn features(&self) -> Features;

    /// This node's topology segments (NodeGetInfo).
    fn topology(&self) -> Topology;

    /// Checks that volumes can be attached here now (Probe).
    async fn health(&self) -> Result<()>;

    /// NOT_FOUND unless the volume is one this node can reach (the ID is
    /// well formed and, where the engine can tell, the volume exists).
    async fn check_known(&self, volume_id: &str) -> Result<()>;

    /// Makes the volume a block device on this node; answers its path.
    /// Attaching an attached volume answers the same device.
    async fn attach(&self, request: &Attach) -> Result<PathBuf>;

    /// Undoes `attach`; detaching a detached volume succeeds.
    async fn detach(&self, volume_id: &str) -> Result<()>;

    /// The device the volume is attached as on this node, if it is.
    async fn device(&self, volume_id: &str) -> Result<Option<PathBuf>>;

    /// Every device of this engine's volumes attached on this node.
    async fn all_attached(&self) -> Result<Vec<PathBuf>>;

    /// Makes the attached device show the volume's current size after an
    /// expansion (some devices follow on their own; others must be told).
    /// `size` is the capacity the volume was grown to (0: unknown), for
    /// devices that learn of it late.
    async fn refresh(&self, volume_id: &str, size: u64) -> Result<()>;

    /// The volume's health as this node sees it.
    async fn condition(&self, volume_id: &str) -> Result<Condition>;

    /// At start-up, before serving: detaches what a stage killed between
    /// attaching and mounting left attached (a device of ours that nothing
    /// mounts, which only an unstage at some path would release); answers
    /// the volumes released.
    async fn release_unused(&self) -> Result<Vec<String>> {
        Ok(Vec::new())
    }

    /// A graceful stop, after the last call: lets go of what the node half
    /// holds (connections to a cluster) while the process is still whole.
    async fn close(&self) -> Result<()> {
        Ok(())
    }

    /// Whether the attached volume (`device`) was ever written, asked when
    /// it shows no filesystem signature, before formatting it. An engine
    /// that cannot tell answers `Maybe`, and such a volume is never
    /// formatted.
    async fn written(&self, request: &Attach, device: &std::path::Path) -> Result<Written> {
        let _ = (request, device);
        Ok(Written::Maybe(format!("the {} engine cannot tell whether it was written", self.kind())))
    }

    /// Grows the volume's storage, for engines whose expansion happens on
    /// the node ([`ExpansionSite::Node`]); answers the new capacity.
    async fn grow(&self, volume_id: &str, required: u64, limit: u64) -> Result<u64> {
        let _ = (volume_id, required, limit);
        Err(crate::error::unimplemented(format!(
            "the {} engine grows volumes in the controller (ControllerExpandVolume)",
            self.kind()
        )))
    }

    /// Finds what must be frozen for the volumes' snapshot on this node and
    /// flushes it (outside the window); answers the freeze itself. `strict`
    /// (group snapshots): a member that cannot be quiesced (raw block in
    /// use) is FAILED_PRECONDITION rather than taken crash-consistent.
    async fn prepare_quiesce(&self, volume_ids: &[String], strict: bool) -> Result<Quiesce>;
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
