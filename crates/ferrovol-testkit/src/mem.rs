//! An in-memory engine, both halves, in the two shapes engines come in:
//! - [`Shape::NodeLocal`]: storage on the node (as the local engine): no
//!   ControllerPublish, growth on the node, single-node access modes;
//! - [`Shape::Attached`]: storage in a cluster (as Ceph RBD): volumes are
//!   published to a node by the controller, grow in the controller, and
//!   raw block volumes may be shared by several nodes;
//! - [`Shape::SharedFs`]: a shared filesystem (as CephFS): no block device
//!   at all, every access mode of filesystem volumes, growth in the
//!   controller alone (a quota the pod sees at once), and the core
//!   controller trait with none of the optional parts. Its node half
//!   ([`crate::memfs::MemFsNode`]) stages a tmpfs of the volume's size.
//!
//! For the fast service tier and for faults that cannot be produced for
//! real. It records every controller-half call, so a test can prove a
//! node-mode process never makes one, and logs each request it gets with
//! `Debug` (secrets included, as any engine might), so a test can prove
//! secrets stay redacted on the way.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use ferrovol_block::Attacher;
use ferrovol_core::engine::ranges_of;
use ferrovol_core::engine::{
    choose_size, AccessMode, Attach, Capacity, ChangedBlocks, Condition, ContentSource,
    ControllerEngine, EngineStats, Expanded, ExpansionSite, Features, GroupSnapshot,
    GroupSnapshots, NewVolume, Page, Publish, Publishing, Ranges, Secrets, Snapshot,
    SnapshotFilter, Snapshots, Topology, Volume,
};
use ferrovol_core::error::{self, Result};
use tokio::sync::Notify;

/// The topology key of the in-memory engine's volumes.
pub const TOPOLOGY_KEY: &str = "mem.csi.ferrovol.io/node";

/// A volume name that makes `create_volume` panic, and a parameter that
/// makes `capacity` panic: for the catch-panic path.
pub const PANIC: &str = "panic";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    NodeLocal,
    Attached,
    SharedFs,
}

#[derive(Default)]
struct State {
    volumes: BTreeMap<String, Volume>,
    snapshots: BTreeMap<String, Snapshot>,
    groups: BTreeMap<String, GroupSnapshot>,
    /// Volume → the nodes it is published to, and whether read-only.
    published: BTreeMap<String, BTreeMap<String, (AccessMode, bool)>>,
    attached: BTreeSet<String>,
}

pub struct MemEngine {
    pub(crate) shape: Shape,
    node_id: String,
    state: Mutex<State>,
    next_id: AtomicU64,
    /// Controller-half methods called, in order.
    controller_calls: Mutex<Vec<&'static str>>,
    /// While set, `create_volume` stops after `entered` until `release`.
    hold: AtomicBool,
    pub entered: Notify,
    pub release: Notify,
}

const CAPACITY: u64 = 1 << 40;
const GRANULARITY: u64 = 4096;

impl MemEngine {
    pub fn new(shape: Shape, node_id: &str) -> MemEngine {
        MemEngine {
            shape,
            node_id: node_id.to_string(),
            state: Mutex::default(),
            next_id: AtomicU64::new(1),
            controller_calls: Mutex::default(),
            hold: AtomicBool::new(false),
            entered: Notify::new(),
            release: Notify::new(),
        }
    }

    /// The controller-half methods called so far.
    pub fn controller_calls(&self) -> Vec<&'static str> {
        self.controller_calls.lock().unwrap().clone()
    }

    /// Makes the next `create_volume` calls wait for `release`.
    pub fn hold_creates(&self, on: bool) {
        self.hold.store(on, Ordering::SeqCst);
    }

    fn called(&self, method: &'static str) {
        self.controller_calls.lock().unwrap().push(method);
    }

    fn mint(&self, prefix: &str) -> String {
        format!("mem-{prefix}-{}", self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    fn topology_of(&self) -> Topology {
        BTreeMap::from([(TOPOLOGY_KEY.to_string(), self.node_id.clone())])
    }

    /// A volume's capacity (NOT_FOUND for an unknown one): what its node
    /// half needs of the shared state.
    pub fn volume_size(&self, id: &str) -> Result<u64> {
        let s = self.state.lock().unwrap();
        s.volumes.get(id).map(|v| v.capacity).ok_or_else(|| Self::missing("volume", id))
    }

    fn missing(what: &str, id: &str) -> error::Error {
        error::not_found(format!("{what} {id:?} does not exist"))
    }
}

/// Tokens this engine issues: the last ID of a page, marked as ours.
const TOKEN_PREFIX: &str = "mem-after:";

fn page<T: Clone>(items: Vec<(String, T)>, token: Option<&str>, max: usize) -> Result<Page<T>> {
    let token = match token {
        None => None,
        Some(t) => Some(
            t.strip_prefix(TOKEN_PREFIX)
                .ok_or_else(|| error::busy("starting_token is not one this driver issued"))?,
        ),
    };
    let mut rest: Vec<(String, T)> =
        items.into_iter().filter(|(id, _)| token.is_none_or(|t| id.as_str() > t)).collect();
    let next = if rest.len() > max {
        rest.truncate(max);
        rest.last().map(|(id, _)| format!("{TOKEN_PREFIX}{id}"))
    } else {
        None
    };
    Ok(Page { items: rest.into_iter().map(|(_, v)| v).collect(), next })
}

#[tonic::async_trait]
impl ControllerEngine for MemEngine {
    fn kind(&self) -> &'static str {
        "mem"
    }

    fn features(&self) -> Features {
        features(self.shape)
    }

    fn manifest(&self) -> BTreeMap<String, String> {
        BTreeMap::from([("engine".to_string(), "mem".to_string())])
    }

    fn has_topology(&self) -> bool {
        self.shape == Shape::NodeLocal
    }

    async fn health(&self) -> Result<()> {
        Ok(())
    }

    async fn stats(&self) -> Result<EngineStats> {
        self.called("stats");
        let s = self.state.lock().unwrap();
        Ok(EngineStats {
            volumes: s.volumes.len() as u64,
            snapshots: s.snapshots.len() as u64,
            groups: s.groups.len() as u64,
            storage_capacity_bytes: CAPACITY,
            provisioned_bytes: s.volumes.values().map(|v| v.capacity).sum(),
            ..Default::default()
        })
    }

    fn validate_parameters(&self, parameters: &BTreeMap<String, String>) -> Result<()> {
        match parameters.keys().find(|k| k.as_str() != "tier" && k.as_str() != PANIC) {
            Some(k) => Err(error::invalid(format!("unknown parameter {k:?} (mem accepts: tier)"))),
            None => Ok(()),
        }
    }

    async fn create_volume(&self, request: NewVolume) -> Result<Volume> {
        self.called("create_volume");
        tracing::debug!(?request, "mem: create_volume");
        if request.name == PANIC {
            panic!("the mem engine was asked to panic");
        }
        if self.hold.load(Ordering::SeqCst) {
            self.entered.notify_one();
            self.release.notified().await;
        }
        if let Some(reqs) = &request.accessibility {
            let ours = self.topology_of();
            if self.shape == Shape::NodeLocal
                && !reqs.requisite.is_empty()
                && !reqs.requisite.iter().any(|t| t.iter().all(|(k, v)| ours.get(k) == Some(v)))
            {
                return Err(error::exhausted("the requisite topology excludes this node"));
            }
        }
        let mut s = self.state.lock().unwrap();
        let source_size = match &request.source {
            None => 0,
            Some(ContentSource::Snapshot(id)) => {
                s.snapshots.get(id).ok_or_else(|| Self::missing("snapshot", id))?.size
            }
            Some(ContentSource::Volume(id)) => {
                s.volumes.get(id).ok_or_else(|| Self::missing("volume", id))?.capacity
            }
        };
        let capacity = choose_size(
            request.required_bytes,
            request.limit_bytes,
            source_size,
            GRANULARITY,
            CAPACITY,
        )?;
        if let Some(existing) = s.volumes.values().find(|v| v.name == request.name) {
            let fits = existing.capacity >= request.required_bytes
                && (request.limit_bytes == 0 || existing.capacity <= request.limit_bytes);
            if fits
                && existing.source == request.source
                && existing.parameters == request.parameters
            {
                return Ok(existing.clone());
            }
            return Err(error::exists(format!(
                "volume {:?} exists with other attributes",
                request.name
            )));
        }
        let volume = Volume {
            id: self.mint("vol"),
            name: request.name,
            capacity,
            source: request.source,
            access: request.access,
            parameters: request.parameters,
            context: BTreeMap::from([("mem.csi.ferrovol.io/pool".into(), "rbd-like".into())]),
            accessible: match self.shape {
                Shape::NodeLocal => vec![self.topology_of()],
                Shape::Attached | Shape::SharedFs => vec![],
            },
            published_nodes: vec![],
            created: SystemTime::now(),
        };
        s.volumes.insert(volume.id.clone(), volume.clone());
        Ok(volume)
    }

    async fn delete_volume(&self, id: &str, secrets: &Secrets) -> Result<()> {
        self.called("delete_volume");
        tracing::debug!(id, ?secrets, "mem: delete_volume");
        let mut s = self.state.lock().unwrap();
        if s.published.get(id).is_some_and(|p| !p.is_empty()) || s.attached.contains(id) {
            return Err(error::precondition(format!("volume {id} is in use")));
        }
        s.volumes.remove(id);
        Ok(())
    }

    async fn volume(&self, id: &str) -> Result<Volume> {
        self.called("volume");
        let s = self.state.lock().unwrap();
        let mut v = s.volumes.get(id).cloned().ok_or_else(|| Self::missing("volume", id))?;
        v.published_nodes =
            s.published.get(id).map(|p| p.keys().cloned().collect()).unwrap_or_default();
        Ok(v)
    }

    async fn volume_conditions(&self, ids: &[String]) -> Result<Vec<Result<Condition>>> {
        self.called("volume_conditions");
        let s = self.state.lock().unwrap();
        Ok(ids
            .iter()
            .map(|id| match s.volumes.contains_key(id) {
                true => Ok(Condition::Healthy),
                false => Err(Self::missing("volume", id)),
            })
            .collect())
    }

    async fn list_volumes(&self, token: Option<&str>, max: usize) -> Result<Page<Volume>> {
        self.called("list_volumes");
        let s = self.state.lock().unwrap();
        let items = s
            .volumes
            .iter()
            .map(|(id, v)| {
                let mut v = v.clone();
                v.published_nodes =
                    s.published.get(id).map(|p| p.keys().cloned().collect()).unwrap_or_default();
                (id.clone(), v)
            })
            .collect();
        page(items, token, max)
    }

    async fn capacity(
        &self,
        parameters: &BTreeMap<String, String>,
        topology: Option<&Topology>,
    ) -> Result<Capacity> {
        self.called("capacity");
        if parameters.contains_key(PANIC) {
            panic!("the mem engine was asked to panic");
        }
        let ours = self.topology_of();
        let served = self.shape == Shape::Attached
            || topology.is_none_or(|t| t.iter().all(|(k, v)| ours.get(k) == Some(v)));
        let available = if served { CAPACITY } else { 0 };
        Ok(Capacity { available, maximum_volume_size: available, minimum_volume_size: GRANULARITY })
    }

    async fn expand_volume(
        &self,
        id: &str,
        required: u64,
        limit: u64,
        secrets: &Secrets,
    ) -> Result<Expanded> {
        self.called("expand_volume");
        tracing::debug!(id, ?secrets, "mem: expand_volume");
        let mut s = self.state.lock().unwrap();
        let v = s.volumes.get_mut(id).ok_or_else(|| Self::missing("volume", id))?;
        let wanted = required.div_ceil(GRANULARITY) * GRANULARITY;
        if limit > 0 && wanted > limit {
            return Err(error::out_of_range("above the limit"));
        }
        v.capacity = v.capacity.max(wanted);
        let capacity = v.capacity;
        drop(s);
        if self.shape == Shape::SharedFs {
            // A quota: where the volume is staged, its new size shows at
            // once, with no step on the node.
            crate::memfs::resize(id, capacity)?;
        }
        Ok(Expanded { capacity, node_expansion_required: self.shape != Shape::SharedFs })
    }

    fn publishing(&self) -> Option<&dyn Publishing> {
        (self.shape == Shape::Attached).then_some(self as _)
    }

    fn snapshots(&self) -> Option<&dyn Snapshots> {
        (self.shape != Shape::SharedFs).then_some(self as _)
    }

    fn groups(&self) -> Option<&dyn GroupSnapshots> {
        (self.shape != Shape::SharedFs).then_some(self as _)
    }

    fn changed_blocks(&self) -> Option<&dyn ChangedBlocks> {
        (self.shape != Shape::SharedFs).then_some(self as _)
    }
}

#[tonic::async_trait]
impl Publishing for MemEngine {
    async fn publish(&self, request: &Publish) -> Result<ferrovol_core::engine::Context> {
        self.called("publish");
        tracing::debug!(?request, "mem: publish");
        if self.shape != Shape::Attached {
            return Err(error::unsupported("mem (node-local) has no publish step"));
        }
        if request.node_id.starts_with("unknown") {
            return Err(Self::missing("node", &request.node_id));
        }
        let mut s = self.state.lock().unwrap();
        if !s.volumes.contains_key(&request.volume_id) {
            return Err(Self::missing("volume", &request.volume_id));
        }
        let nodes = s.published.entry(request.volume_id.clone()).or_default();
        if let Some((mode, ro)) = nodes.get(&request.node_id) {
            if (*mode, *ro) != (request.mode, request.read_only) {
                return Err(error::exists("published to this node with another mode"));
            }
        }
        let shared = matches!(
            request.mode,
            AccessMode::MultiNodeMultiWriter
                | AccessMode::MultiNodeReaderOnly
                | AccessMode::MultiNodeSingleWriter
        );
        if !shared && nodes.keys().any(|n| n != &request.node_id) {
            return Err(error::precondition(format!(
                "volume {} is published to another node",
                request.volume_id
            )));
        }
        nodes.insert(request.node_id.clone(), (request.mode, request.read_only));
        Ok(BTreeMap::from([("mem.csi.ferrovol.io/device".into(), request.volume_id.clone())]))
    }

    async fn unpublish(
        &self,
        volume_id: &str,
        node_id: Option<&str>,
        secrets: &Secrets,
    ) -> Result<()> {
        self.called("unpublish");
        tracing::debug!(volume_id, ?secrets, "mem: unpublish");
        let mut s = self.state.lock().unwrap();
        if let Some(nodes) = s.published.get_mut(volume_id) {
            match node_id {
                Some(n) => {
                    nodes.remove(n);
                }
                None => nodes.clear(),
            }
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl Snapshots for MemEngine {
    async fn create_snapshot(
        &self,
        name: &str,
        source_volume: &str,
        secrets: &Secrets,
    ) -> Result<Snapshot> {
        self.called("create_snapshot");
        tracing::debug!(name, ?secrets, "mem: create_snapshot");
        let mut s = self.state.lock().unwrap();
        if let Some(existing) = s.snapshots.values().find(|x| x.name == name) {
            if existing.source_volume == source_volume {
                return Ok(existing.clone());
            }
            return Err(error::exists(format!("snapshot {name:?} has another source")));
        }
        let size = s
            .volumes
            .get(source_volume)
            .ok_or_else(|| Self::missing("volume", source_volume))?
            .capacity;
        let snap = Snapshot {
            id: self.mint("snap"),
            name: name.to_string(),
            source_volume: source_volume.to_string(),
            size,
            created: SystemTime::now(),
            ready: true,
            group_id: None,
        };
        s.snapshots.insert(snap.id.clone(), snap.clone());
        Ok(snap)
    }

    async fn delete_snapshot(&self, id: &str, _secrets: &Secrets) -> Result<()> {
        self.called("delete_snapshot");
        self.state.lock().unwrap().snapshots.remove(id);
        Ok(())
    }

    async fn snapshot(&self, id: &str) -> Result<Snapshot> {
        self.called("snapshot");
        let s = self.state.lock().unwrap();
        s.snapshots.get(id).cloned().ok_or_else(|| Self::missing("snapshot", id))
    }

    async fn list_snapshots(
        &self,
        filter: &SnapshotFilter,
        token: Option<&str>,
        max: usize,
    ) -> Result<Page<Snapshot>> {
        self.called("list_snapshots");
        let s = self.state.lock().unwrap();
        let items = s
            .snapshots
            .iter()
            .filter(|(id, x)| {
                filter.snapshot_id.as_ref().is_none_or(|f| f == *id)
                    && filter.source_volume.as_ref().is_none_or(|f| *f == x.source_volume)
            })
            .map(|(id, x)| (id.clone(), x.clone()))
            .collect();
        page(items, token, max)
    }
}

#[tonic::async_trait]
impl GroupSnapshots for MemEngine {
    async fn create_group_snapshot(
        &self,
        name: &str,
        volumes: &[String],
        _secrets: &Secrets,
    ) -> Result<(GroupSnapshot, Duration)> {
        self.called("create_group_snapshot");
        let mut s = self.state.lock().unwrap();
        if let Some(g) = s.groups.values().find(|g| g.name == name) {
            let mut have: Vec<&String> = g.snapshots.iter().map(|x| &x.source_volume).collect();
            let mut want: Vec<&String> = volumes.iter().collect();
            have.sort();
            want.sort();
            if have == want {
                return Ok((g.clone(), Duration::ZERO));
            }
            return Err(error::exists("group exists with other members"));
        }
        let group_id = self.mint("group");
        let mut members = Vec::new();
        for v in volumes {
            let size = s.volumes.get(v).ok_or_else(|| Self::missing("volume", v))?.capacity;
            members.push(Snapshot {
                id: self.mint("snap"),
                name: format!("{group_id}/{v}"),
                source_volume: v.clone(),
                size,
                created: SystemTime::now(),
                ready: true,
                group_id: Some(group_id.clone()),
            });
        }
        for m in &members {
            s.snapshots.insert(m.id.clone(), m.clone());
        }
        let g = GroupSnapshot {
            id: group_id,
            name: name.to_string(),
            snapshots: members,
            created: SystemTime::now(),
            ready: true,
        };
        s.groups.insert(g.id.clone(), g.clone());
        Ok((g, Duration::ZERO))
    }

    async fn delete_group_snapshot(&self, id: &str, _secrets: &Secrets) -> Result<()> {
        self.called("delete_group_snapshot");
        let mut s = self.state.lock().unwrap();
        if let Some(g) = s.groups.remove(id) {
            for m in g.snapshots {
                s.snapshots.remove(&m.id);
            }
        }
        Ok(())
    }

    async fn group_snapshot(&self, id: &str) -> Result<GroupSnapshot> {
        self.called("group_snapshot");
        let s = self.state.lock().unwrap();
        s.groups.get(id).cloned().ok_or_else(|| Self::missing("group snapshot", id))
    }
}

#[tonic::async_trait]
impl ChangedBlocks for MemEngine {
    async fn allocated(
        &self,
        snapshot_id: &str,
        _from: u64,
        _secrets: &Secrets,
    ) -> Result<(u64, Ranges)> {
        self.called("allocated_ranges");
        let size = self.snapshot(snapshot_id).await?.size;
        Ok((size, ranges_of(vec![(0, GRANULARITY)])))
    }

    async fn changed(
        &self,
        base: &str,
        target: &str,
        _from: u64,
        _secrets: &Secrets,
    ) -> Result<(u64, Ranges)> {
        self.called("changed_ranges");
        self.snapshot(base).await?;
        let size = self.snapshot(target).await?.size;
        Ok((size, ranges_of(vec![])))
    }
}

/// What each shape can do.
pub fn features(shape: Shape) -> Features {
    match shape {
        Shape::NodeLocal => Features {
            expansion: ExpansionSite::Node,
            node_expansion: true,
            clones: true,
            filesystems: ferrovol_block::filesystems(),
            mount_modes: Features::single_node_modes(),
            block_modes: Features::single_node_modes(),
        },
        Shape::Attached => {
            let mut block_modes = Features::single_node_modes();
            block_modes.extend([
                AccessMode::MultiNodeReaderOnly,
                AccessMode::MultiNodeSingleWriter,
                AccessMode::MultiNodeMultiWriter,
            ]);
            Features {
                expansion: ExpansionSite::Controller,
                node_expansion: true,
                clones: true,
                filesystems: ferrovol_block::filesystems(),
                mount_modes: Features::single_node_modes(),
                block_modes,
            }
        }
        Shape::SharedFs => {
            let mut mount_modes = Features::single_node_modes();
            mount_modes.extend([
                AccessMode::MultiNodeReaderOnly,
                AccessMode::MultiNodeSingleWriter,
                AccessMode::MultiNodeMultiWriter,
            ]);
            Features {
                expansion: ExpansionSite::Controller,
                node_expansion: false,
                clones: true,
                filesystems: vec![ferrovol_core::engine::Filesystem {
                    name: crate::memfs::FS_TYPE,
                    minimum_size: 0,
                }],
                mount_modes,
                block_modes: vec![],
            }
        }
    }
}

#[tonic::async_trait]
impl Attacher for MemEngine {
    fn kind(&self) -> &'static str {
        "mem"
    }

    fn features(&self) -> Features {
        features(self.shape)
    }

    fn topology(&self) -> Topology {
        match self.shape {
            Shape::NodeLocal => self.topology_of(),
            Shape::Attached | Shape::SharedFs => Topology::new(),
        }
    }

    async fn health(&self) -> Result<()> {
        Ok(())
    }

    /// From the ID and the shared state alone, never the controller half.
    async fn check_known(&self, volume_id: &str) -> Result<()> {
        match self.state.lock().unwrap().volumes.contains_key(volume_id) {
            true => Ok(()),
            false => Err(Self::missing("volume", volume_id)),
        }
    }

    async fn attach(&self, request: &Attach) -> Result<ferrovol_block::Attachment> {
        tracing::debug!(?request, "mem: attach");
        let fresh = self.state.lock().unwrap().attached.insert(request.volume_id.clone());
        Ok(ferrovol_block::Attachment { device: PathBuf::from("/dev/null"), fresh })
    }

    async fn detach(&self, volume_id: &str) -> Result<()> {
        self.state.lock().unwrap().attached.remove(volume_id);
        Ok(())
    }

    async fn device(&self, volume_id: &str) -> Result<Option<PathBuf>> {
        let attached = self.state.lock().unwrap().attached.contains(volume_id);
        Ok(attached.then(|| PathBuf::from("/dev/null")))
    }

    async fn all_attached(&self) -> Result<Vec<PathBuf>> {
        Ok(vec![])
    }

    async fn refresh(&self, _volume_id: &str, _size: u64) -> Result<()> {
        Ok(())
    }

    async fn condition(&self, _volume_id: &str) -> Result<Condition> {
        Ok(Condition::Healthy)
    }
}

impl std::fmt::Debug for MemEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MemEngine({:?})", self.shape)
    }
}
