//! Storage engines: what a volume *is* lives behind two traits.
//!
//! The CSI services validate requests, take operation locks and translate to
//! and from the wire; an engine stores bytes. An engine has two halves,
//! because Kubernetes runs them in two places:
//! - a [`ControllerEngine`] (the Controller service: volumes, capacity,
//!   expansion, listings), which may run in a Deployment far from any
//!   volume, and hands out the optional parts it has: [`Publishing`]
//!   (controller attach), [`Snapshots`], [`GroupSnapshots`] (the
//!   GroupController service), [`ChangedBlocks`] (the SnapshotMetadata
//!   service). The services advertise exactly the parts present;
//! - a [`NodeEngine`] (the Node service): stages a volume on this node from
//!   what the CO hands the node (volume ID, volume context, publish
//!   context, secrets) and nothing else. Block engines get it from the
//!   block staging library by writing an attacher (volume → device).
//!
//! Nothing here may assume files, paths, devices or one node: IDs are
//! opaque strings the engine mints and validates, topology is whatever
//! segments the engine says its volumes live in, and an engine says in
//! [`Features`] what it can do (access modes, where growing happens). See
//! docs/architecture.md for adding an engine.

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
    /// The access modes the CO asked for (one per capability), already
    /// checked against the engine's.
    pub modes: Vec<AccessMode>,
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
    /// Copies under way in the background (restores and clones that
    /// answer ABORTED until they are complete), the bytes they have copied
    /// and the bytes they copy in all (known once each scanned its
    /// source). Engines whose copies are instant leave them at zero.
    pub copies_running: u64,
    pub copies_done_bytes: u64,
    pub copies_size_bytes: u64,
    /// Engine-specific facts exported as an info metric (the local engine:
    /// its copy method).
    pub facts: BTreeMap<String, String>,
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
    /// Everything happens on the node (NodeExpandVolume, through
    /// [`NodeEngine::expand`]): the storage lives there.
    Node,
}

/// What an engine can do; the services advertise exactly this and refuse
/// the rest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Features {
    pub expansion: ExpansionSite,
    /// The node takes a step in every expansion (NodeExpandVolume: a
    /// filesystem or device to grow there); false for volumes whose new
    /// size the pod sees at once (a quota).
    pub node_expansion: bool,
    /// A new volume can be a copy of another (CLONE_VOLUME); restores from
    /// snapshots come with the [`Snapshots`] part.
    pub clones: bool,
    /// The filesystems a filesystem volume can hold, the default (an empty
    /// `fs_type`) first.
    pub filesystems: Vec<Filesystem>,
    /// Access modes of filesystem volumes.
    pub mount_modes: Vec<AccessMode>,
    /// Access modes of raw block volumes.
    pub block_modes: Vec<AccessMode>,
}

/// A filesystem an engine's volumes can hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Filesystem {
    /// Its `fs_type` name.
    pub name: &'static str,
    /// The smallest volume it can be made on (0: any).
    pub minimum_size: u64,
}

impl Features {
    /// The filesystem an `fs_type` names (empty: the default), if offered.
    pub fn filesystem(&self, fs_type: &str) -> Option<Filesystem> {
        match fs_type {
            "" => self.filesystems.first().copied(),
            name => self.filesystems.iter().find(|f| f.name == name).copied(),
        }
    }

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

    /// A volume and its condition (ControllerGetVolume). Engines that learn
    /// both in one question (the relay) answer them together.
    async fn volume_with_condition(&self, id: &str) -> Result<(Volume, Condition)> {
        let volume = self.volume(id).await?;
        Ok((volume, self.volume_condition(id).await?))
    }

    /// A ListVolumes page and each volume's condition, in order. Engines
    /// that learn the conditions with the listing (the relay) answer them
    /// together, rather than keep them for a second question.
    async fn list_volumes_with_conditions(
        &self,
        token: Option<&str>,
        max: usize,
    ) -> Result<(Page<Volume>, Vec<Result<Condition>>)> {
        let page = self.list_volumes(token, max).await?;
        let ids: Vec<String> = page.items.iter().map(|v| v.id.clone()).collect();
        let conditions = self.volume_conditions(&ids).await?;
        Ok((page, conditions))
    }

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

/// Ranges as an engine finds them: batches in order, never the whole list
/// at once (a multi-TiB volume has millions), ended by the first error.
pub type Ranges = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<Vec<Range>>> + Send>>;

/// Allocated and changed blocks of snapshots (the SnapshotMetadata
/// service).
#[tonic::async_trait]
pub trait ChangedBlocks: Send + Sync {
    /// The snapshot's size and its allocated ranges that end after `from`,
    /// in order. Errors about the request (an unknown snapshot) come
    /// before the stream; the stream's own end the data's.
    async fn allocated(
        &self,
        snapshot_id: &str,
        from: u64,
        secrets: &Secrets,
    ) -> Result<(u64, Ranges)>;

    /// The target snapshot's size and the ranges that differ from `base`
    /// (both snapshots of one volume) and end after `from`, in order. May
    /// over-report (a range written with the same bytes), never
    /// under-report.
    async fn changed(
        &self,
        base: &str,
        target: &str,
        from: u64,
        secrets: &Secrets,
    ) -> Result<(u64, Ranges)>;
}

/// The ranges a blocking producer sends (`ferrovol_host::offload::produce`),
/// as a stream.
pub fn ranges_from(rx: tokio::sync::mpsc::Receiver<Result<Vec<Range>>>) -> Ranges {
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// Batches of ranges a producer keeps in flight before it waits for the
/// reader.
pub const RANGE_BATCHES_IN_FLIGHT: usize = 2;

/// The ranges of a list already in memory, as a stream (for engines whose
/// ranges are few, and for tests).
pub fn ranges_of(ranges: Vec<Range>) -> Ranges {
    Box::pin(tokio_stream::iter(std::iter::once(Ok(ranges))))
}

/// The file a raw block volume's device is bind-mounted onto inside its
/// staging directory: the kernel-visible record that it is staged, the
/// same for every engine (publish, unpublish and unstage look there).
pub const BLOCK_STAGE_FILE: &str = "device";

/// A NodeStageVolume, validated: all a node engine stages from.
#[derive(Clone, Debug)]
pub struct Stage {
    pub volume: Attach,
    pub access: AccessType,
    /// The capability's mount flags, already checked against the allow-list.
    pub mount_flags: Vec<String>,
    /// Every path is resolved beneath this directory, once, as a descriptor
    /// (see `ferrovol_host::node::beneath`).
    pub kubelet_dir: PathBuf,
    /// The staging directory: a filesystem is mounted on it; a raw block
    /// volume's device is bound onto [`BLOCK_STAGE_FILE`] inside it.
    pub staging: PathBuf,
}

impl Stage {
    /// Where the stage's own mount is.
    pub fn target(&self) -> PathBuf {
        match self.access {
            AccessType::Block => self.staging.join(BLOCK_STAGE_FILE),
            AccessType::Mount { .. } => self.staging.clone(),
        }
    }
}

/// One mount in the kernel's table (a stage, a publish).
pub use ferrovol_host::node::mountinfo::MountEntry;

/// A volume as a node holds it ([`NodeEngine::view`]).
#[derive(Clone, Debug, Default)]
pub struct VolumeView {
    /// The block device a raw block publish binds (None: not attached, or
    /// an engine without devices).
    pub device: Option<PathBuf>,
    /// Its stage first, then its publishes.
    pub mounts: Vec<MountEntry>,
}

/// The node half of an engine: it stages volumes (makes them usable at a
/// staging path on this node) from what the node call carries ([`Stage`],
/// [`Attach`]) and what the kernel shows. The core node service keeps what
/// every engine shares: path and ID checks, ownership, operation locks,
/// publish and unpublish (bind mounts of the stage, read-only enforced),
/// unmounting, stats. A block engine is most easily written as an attacher
/// under the block staging library (`ferrovol-block`), which stages any
/// block device; a filesystem engine implements this trait itself.
#[tonic::async_trait]
pub trait NodeEngine: Send + Sync + 'static {
    fn kind(&self) -> &'static str;

    fn features(&self) -> Features;

    /// This node's topology segments (NodeGetInfo).
    fn topology(&self) -> Topology;

    /// Checks that volumes can be staged here now (Probe).
    async fn health(&self) -> Result<()>;

    /// NOT_FOUND unless the volume is one this node can reach (the ID is
    /// well formed and, where the engine can tell, the volume exists).
    async fn check_known(&self, volume_id: &str) -> Result<()>;

    /// Makes the volume usable at [`Stage::target`]. Staging a volume
    /// staged there already succeeds; another mount there is
    /// ALREADY_EXISTS. A failed first stage leaves nothing behind.
    async fn stage(&self, request: &Stage) -> Result<()>;

    /// Lets go of what stood behind a stage (a device, a helper), once the
    /// core has unmounted it; released already is fine.
    async fn release(&self, volume_id: &str) -> Result<()>;

    /// The volume as this node holds it now, found in one look: its block
    /// device, if any, and every mount of it (stage and publishes) from the
    /// kernel's mount table (empty: not staged here).
    async fn view(&self, volume_id: &str) -> Result<VolumeView>;

    /// The volume's health as this node sees it; `staged` is its stage
    /// mount.
    async fn condition(&self, volume_id: &str, staged: &MountEntry) -> Result<Condition>;

    /// NodeExpandVolume, for engines whose features say the node takes a
    /// step ([`Features::node_expansion`]): grows what this node holds of
    /// the volume (storage, device, filesystem) to at least `required`.
    /// `view` is the volume as [`NodeEngine::view`] found it, `path` the
    /// one asked about. Answers the
    /// capacity the node now sees.
    async fn expand(
        &self,
        volume_id: &str,
        path: &std::path::Path,
        view: &VolumeView,
        required: u64,
        limit: u64,
    ) -> Result<u64> {
        let _ = (volume_id, path, view, required, limit);
        Err(crate::error::unsupported(format!(
            "the {} engine grows volumes in the controller; the node has nothing to do",
            self.kind()
        )))
    }

    /// The mounts of every volume staged here, one list per volume, each
    /// with its stage first (metrics).
    async fn staged(&self) -> Result<Vec<Vec<MountEntry>>>;

    /// At start-up, before serving: settles what a previous run left (a
    /// filesystem left frozen, an attachment without its mount); answers
    /// what it did, one line each, for the log.
    async fn recover(&self) -> Result<Vec<String>> {
        Ok(Vec::new())
    }

    /// A graceful stop, after the last call: lets go of what the node half
    /// holds (connections to a cluster) while the process is still whole.
    async fn close(&self) -> Result<()> {
        Ok(())
    }
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
