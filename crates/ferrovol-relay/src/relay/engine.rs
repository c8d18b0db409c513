//! The relay's engine: the local engine's controller half, answered by the
//! node agent that holds each volume. The CSI services in front of it
//! validate, lock and convert exactly as for any engine; this only decides
//! which node a call goes to and asks it.
//!
//! Routing needs no database: every ID an agent mints carries its node's
//! tag (`vol-…@node`), CreateVolume goes where the accessibility
//! requirements say (the scheduler's choice under WaitForFirstConsumer),
//! and an ID minted before tags existed is found by asking the nodes once.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferrovol_core::engine::*;
use ferrovol_core::services::convert;
use ferrovol_csi as csi;
use ferrovol_error::{self as error, Result};
use ferrovol_local::ids::{self, Kind};
use ferrovol_local::TOPOLOGY_KEY;

use super::agents::{bounded, AgentLink, Agents};
use super::wire;

pub struct RelayEngine {
    pub(super) agents: Arc<Agents>,
    /// IDs minted before tags, and where they were found.
    legacy: Mutex<HashMap<String, String>>,
    /// The longest every node's members stay frozen for a group snapshot
    /// spread over nodes.
    pub(super) hold_limit: Duration,
    /// Test hook (`FERROVOL_RELAY_UNSAFE_NO_GROUP_FREEZE`, read only in a
    /// build with the `test-hooks` feature): no cross-node freeze, each
    /// node's part taken in turn as a relay without one would, so the
    /// consistency test can show that it fails then.
    pub(super) skip_freeze: bool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl RelayEngine {
    pub fn new(agents: Arc<Agents>, hold_limit: Duration) -> RelayEngine {
        RelayEngine {
            agents,
            legacy: Mutex::default(),
            hold_limit,
            skip_freeze: cfg!(feature = "test-hooks")
                && std::env::var_os("FERROVOL_RELAY_UNSAFE_NO_GROUP_FREEZE").is_some(),
        }
    }

    /// The agent holding `id`; None when no node has it (or the ID is not
    /// one of ours), UNAVAILABLE when its node is not connected.
    pub(super) async fn locate(&self, kind: Kind, id: &str) -> Result<Option<Arc<AgentLink>>> {
        if !ids::is_valid(kind, id) {
            return Ok(None);
        }
        if let Some(tag) = ids::tag_of(id) {
            if let Some(node) = self.agents.retired(tag) {
                // The operator's word: the object went with its node.
                tracing::warn!(node, id, "the object of a retired node is gone");
                return Ok(None);
            }
            return self.agents.by_tag(tag).map(Some);
        }
        if let Some(tag) = lock(&self.legacy).get(id).cloned() {
            return self.agents.by_tag(&tag).map(Some);
        }
        // Minted before IDs carried their node: ask every node, once.
        let links = self.agents.all()?;
        for link in links {
            if self.has(&link, kind, id).await? {
                lock(&self.legacy).insert(id.to_string(), link.tag.clone());
                return Ok(Some(link));
            }
        }
        Ok(None)
    }

    async fn require(&self, kind: Kind, id: &str) -> Result<Arc<AgentLink>> {
        self.locate(kind, id)
            .await?
            .ok_or_else(|| error::not_found(format!("{} {id} does not exist", kind.noun())))
    }

    /// Where a new volume without a content source goes: the first
    /// connected node among the preferred, then the requisite segments;
    /// with no requirements, the connected node the name hashes to
    /// (rendezvous hashing: the same name lands on the same node while the
    /// set of nodes stays the same, so a retry finds its volume).
    fn place(
        &self,
        name: &str,
        accessibility: Option<&TopologyRequirement>,
    ) -> Result<Arc<AgentLink>> {
        if let Some(r) = accessibility {
            let named: Vec<&String> = r
                .preferred
                .iter()
                .chain(&r.requisite)
                .filter_map(|t| t.get(TOPOLOGY_KEY))
                .collect();
            if let Some(link) = named.iter().find_map(|node| self.agents.by_node(node)) {
                return Ok(link);
            }
            if let Some(first) = named.first() {
                return Err(error::unavailable(format!(
                    "node {first} (and any other node the volume may live on) is not connected \
                     to this controller"
                )));
            }
        }
        let hash = |tag: &str| ids::fnv1a(name.bytes().chain([0]).chain(tag.bytes()));
        self.agents
            .connected()
            .into_iter()
            .max_by_key(|l| hash(&l.tag))
            .ok_or_else(|| error::unavailable("no node agent is connected to this controller"))
    }

    async fn get_volume(&self, link: &AgentLink, id: &str) -> Result<(Volume, Condition)> {
        let got =
            bounded(link.controller.clone().controller_get_volume(
                csi::ControllerGetVolumeRequest { volume_id: id.to_string() },
            ))
            .await
            .map_err(|s| link.failed(s))?;
        let facts = csi::facts::from_metadata(got.metadata());
        let got = got.into_inner();
        let condition =
            wire::condition(got.status.as_ref().and_then(|s| s.volume_condition.as_ref()));
        let volume = got
            .volume
            .ok_or_else(|| error::internal(format!("{} answered no volume", link.context())))?;
        let fact = facts.get(id);
        Ok((wire::volume(volume, fact)?, condition))
    }

    /// One page of a listing over every node, in tag order. The token is
    /// the node to go on with and that node's own token (`tag/token`);
    /// nodes before it are done, nodes after it not begun.
    async fn merged<T, F, Fut>(&self, token: Option<&str>, max: usize, page: F) -> Result<Page<T>>
    where
        F: Fn(Arc<AgentLink>, String, usize) -> Fut,
        Fut: Future<Output = Result<(Vec<T>, String)>>,
    {
        let links = self.agents.all()?;
        let (mut at, mut inner) = match token {
            None => (0, String::new()),
            Some(t) => {
                let (tag, inner) = t
                    .split_once('/')
                    .ok_or_else(|| error::busy("starting_token is not one this driver issued"))?;
                let at = links.iter().position(|l| l.tag == tag).ok_or_else(|| {
                    error::busy(format!(
                        "starting_token names a node ({tag}) this controller does not know"
                    ))
                })?;
                (at, inner.to_string())
            }
        };
        let mut items = Vec::new();
        while at < links.len() && items.len() < max {
            let want = if max == usize::MAX { usize::MAX } else { max - items.len() };
            let (got, next) = page(links[at].clone(), std::mem::take(&mut inner), want).await?;
            items.extend(got);
            if next.is_empty() {
                at += 1;
            } else {
                inner = next;
            }
        }
        let next = (at < links.len()).then(|| format!("{}/{inner}", links[at].tag));
        Ok(Page { items, next })
    }

    /// Whether the agent has this object (for IDs without a node tag).
    async fn has(&self, link: &Arc<AgentLink>, kind: Kind, id: &str) -> Result<bool> {
        let found = match kind {
            Kind::Volume => self.get_volume(link, id).await.map(|_| true),
            Kind::Snapshot => {
                let filter =
                    SnapshotFilter { snapshot_id: Some(id.to_string()), source_volume: None };
                Self::list_snapshots_on(link.clone(), &filter, String::new(), 1)
                    .await
                    .map(|(found, _)| !found.is_empty())
            }
            Kind::Group => {
                super::group::part_of(link.clone(), id.to_string()).await.map(|p| p.is_some())
            }
        };
        match found {
            Err(e) if e.code() == tonic::Code::NotFound => Ok(false),
            other => other,
        }
    }

    async fn list_snapshots_on(
        link: Arc<AgentLink>,
        filter: &SnapshotFilter,
        token: String,
        want: usize,
    ) -> Result<(Vec<Snapshot>, String)> {
        let got = bounded(link.controller.clone().list_snapshots(csi::ListSnapshotsRequest {
            max_entries: wire::max_entries(want),
            starting_token: token,
            source_volume_id: filter.source_volume.clone().unwrap_or_default(),
            snapshot_id: filter.snapshot_id.clone().unwrap_or_default(),
            secrets: HashMap::new(),
        }))
        .await
        .map_err(|s| link.failed(s))?
        .into_inner();
        let items =
            got.entries.into_iter().filter_map(|e| e.snapshot).map(wire::snapshot).collect();
        Ok((items, got.next_token))
    }
}

#[tonic::async_trait]
impl ControllerEngine for RelayEngine {
    fn kind(&self) -> &'static str {
        "local"
    }

    fn features(&self) -> Features {
        ferrovol_local::node::features()
    }

    fn manifest(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("engine".to_string(), "local".to_string()),
            ("relay".to_string(), "true".to_string()),
            ("agents".to_string(), self.agents.count().to_string()),
        ])
    }

    fn has_topology(&self) -> bool {
        true
    }

    /// The relay is healthy without agents (they may be starting); a call
    /// for a node that is away says so itself.
    async fn health(&self) -> Result<()> {
        Ok(())
    }

    async fn stats(&self) -> Result<EngineStats> {
        Ok(EngineStats {
            facts: BTreeMap::from([("agents".to_string(), self.agents.count().to_string())]),
            ..Default::default()
        })
    }

    fn validate_parameters(&self, parameters: &BTreeMap<String, String>) -> Result<()> {
        ferrovol_local::check_parameters(parameters)
    }

    async fn create_volume(&self, req: NewVolume) -> Result<Volume> {
        let link = match &req.source {
            Some(ContentSource::Snapshot(id)) => self.require(Kind::Snapshot, id).await?,
            Some(ContentSource::Volume(id)) => self.require(Kind::Volume, id).await?,
            None => self.place(&req.name, req.accessibility.as_ref())?,
        };
        let wire = csi::CreateVolumeRequest {
            name: req.name.clone(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: req.required_bytes as i64,
                limit_bytes: req.limit_bytes as i64,
            }),
            volume_capabilities: wire::capabilities(&req.access, &req.modes),
            parameters: wire::parameters(&req.parameters),
            secrets: wire::secrets(&req.secrets),
            volume_content_source: req.source.as_ref().map(convert::content_source_to_wire),
            accessibility_requirements: req.accessibility.as_ref().map(wire::requirement),
            mutable_parameters: HashMap::new(),
        };
        let made = link.controller.clone().create_volume(wire).await.map_err(|s| link.failed(s))?;
        let facts = csi::facts::from_metadata(made.metadata());
        let volume = made.into_inner().volume.ok_or_else(|| {
            error::internal(format!("{} created a volume but answered none", link.context()))
        })?;
        let fact = facts.get(&volume.volume_id);
        wire::volume(volume, fact)
    }

    async fn delete_volume(&self, id: &str, secrets: &Secrets) -> Result<()> {
        let Some(link) = self.locate(Kind::Volume, id).await? else { return Ok(()) };
        link.controller
            .clone()
            .delete_volume(csi::DeleteVolumeRequest {
                volume_id: id.to_string(),
                secrets: wire::secrets(secrets),
            })
            .await
            .map_err(|s| link.failed(s))?;
        Ok(())
    }

    async fn volume(&self, id: &str) -> Result<Volume> {
        Ok(self.volume_with_condition(id).await?.0)
    }

    /// ControllerGetVolume on the volume's node answers both.
    async fn volume_with_condition(&self, id: &str) -> Result<(Volume, Condition)> {
        let link = self.require(Kind::Volume, id).await?;
        self.get_volume(&link, id).await
    }

    async fn volume_conditions(&self, ids: &[String]) -> Result<Vec<Result<Condition>>> {
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            out.push(self.volume_with_condition(id).await.map(|(_, c)| c));
        }
        Ok(out)
    }

    async fn list_volumes(&self, token: Option<&str>, max: usize) -> Result<Page<Volume>> {
        Ok(self.list_volumes_with_conditions(token, max).await?.0)
    }

    /// The nodes' own listings carry each volume's condition: answered
    /// with the page, never kept for a later question.
    async fn list_volumes_with_conditions(
        &self,
        token: Option<&str>,
        max: usize,
    ) -> Result<(Page<Volume>, Vec<Result<Condition>>)> {
        let page = self
            .merged(token, max, |link, token, want| async move {
                let got = bounded(link.controller.clone().list_volumes(csi::ListVolumesRequest {
                    max_entries: wire::max_entries(want),
                    starting_token: token,
                }))
                .await
                .map_err(|s| link.failed(s))?;
                let facts = csi::facts::from_metadata(got.metadata());
                let got = got.into_inner();
                let mut items = Vec::with_capacity(got.entries.len());
                for e in got.entries {
                    let Some(v) = e.volume else { continue };
                    let condition = wire::condition(
                        e.status.as_ref().and_then(|s| s.volume_condition.as_ref()),
                    );
                    let fact = facts.get(&v.volume_id);
                    items.push((wire::volume(v, fact)?, Ok(condition)));
                }
                Ok((items, got.next_token))
            })
            .await?;
        let (items, conditions) = page.items.into_iter().unzip();
        Ok((Page { items, next: page.next }, conditions))
    }

    async fn capacity(
        &self,
        parameters: &BTreeMap<String, String>,
        topology: Option<&Topology>,
    ) -> Result<Capacity> {
        let ask = |link: Arc<AgentLink>, topology: Option<csi::Topology>| {
            let parameters = wire::parameters(parameters);
            async move {
                let got = bounded(link.controller.clone().get_capacity(csi::GetCapacityRequest {
                    volume_capabilities: vec![],
                    parameters,
                    accessible_topology: topology,
                }))
                .await
                .map_err(|s| link.failed(s))?
                .into_inner();
                Ok::<_, error::Error>(Capacity {
                    available: got.available_capacity.max(0) as u64,
                    maximum_volume_size: got.maximum_volume_size.unwrap_or(0).max(0) as u64,
                    minimum_volume_size: got.minimum_volume_size.unwrap_or(0).max(0) as u64,
                })
            }
        };
        let none = Capacity { available: 0, maximum_volume_size: 0, minimum_volume_size: 0 };
        match topology {
            Some(t) => {
                let Some(node) = t.get(TOPOLOGY_KEY) else { return Ok(none) };
                let link = self.agents.by_tag(&ids::node_tag(node))?;
                ask(link, Some(convert::topology(t))).await
            }
            // Anywhere: what all connected nodes have together, and the
            // largest volume any one of them could hold.
            None => {
                let mut total = none;
                for link in self.agents.connected() {
                    let c = ask(link, None).await?;
                    total.available += c.available;
                    total.maximum_volume_size =
                        total.maximum_volume_size.max(c.maximum_volume_size);
                    total.minimum_volume_size =
                        total.minimum_volume_size.max(c.minimum_volume_size);
                }
                Ok(total)
            }
        }
    }

    async fn expand_volume(&self, id: &str, _: u64, _: u64, _: &Secrets) -> Result<Expanded> {
        Err(error::unsupported(format!(
            "local volumes grow on their node (NodeExpandVolume), not through the controller ({id})"
        )))
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
impl Snapshots for RelayEngine {
    async fn create_snapshot(
        &self,
        name: &str,
        source_volume: &str,
        secrets: &Secrets,
    ) -> Result<Snapshot> {
        let link = self.require(Kind::Volume, source_volume).await?;
        let made = link
            .controller
            .clone()
            .create_snapshot(csi::CreateSnapshotRequest {
                source_volume_id: source_volume.to_string(),
                name: name.to_string(),
                secrets: wire::secrets(secrets),
                parameters: HashMap::new(),
            })
            .await
            .map_err(|s| link.failed(s))?;
        let snapshot = made.into_inner().snapshot.ok_or_else(|| {
            error::internal(format!("{} took a snapshot but answered none", link.context()))
        })?;
        Ok(wire::snapshot(snapshot))
    }

    async fn delete_snapshot(&self, id: &str, secrets: &Secrets) -> Result<()> {
        let Some(link) = self.locate(Kind::Snapshot, id).await? else { return Ok(()) };
        link.controller
            .clone()
            .delete_snapshot(csi::DeleteSnapshotRequest {
                snapshot_id: id.to_string(),
                secrets: wire::secrets(secrets),
            })
            .await
            .map_err(|s| link.failed(s))?;
        Ok(())
    }

    async fn snapshot(&self, id: &str) -> Result<Snapshot> {
        let link = self.require(Kind::Snapshot, id).await?;
        let filter = SnapshotFilter { snapshot_id: Some(id.to_string()), source_volume: None };
        let (mut found, _) = Self::list_snapshots_on(link, &filter, String::new(), 1).await?;
        found.pop().ok_or_else(|| error::not_found(format!("snapshot {id} does not exist")))
    }

    async fn list_snapshots(
        &self,
        filter: &SnapshotFilter,
        token: Option<&str>,
        max: usize,
    ) -> Result<Page<Snapshot>> {
        // A filter names the one node to ask (and its token is that node's).
        let routed = match (&filter.snapshot_id, &filter.source_volume) {
            (Some(id), _) => Some(self.locate(Kind::Snapshot, id).await?),
            (None, Some(volume)) => Some(self.locate(Kind::Volume, volume).await?),
            (None, None) => None,
        };
        match routed {
            Some(None) => Ok(Page { items: vec![], next: None }),
            Some(Some(link)) => {
                let token = token.unwrap_or_default().to_string();
                let (items, next) = Self::list_snapshots_on(link, filter, token, max).await?;
                Ok(Page { items, next: (!next.is_empty()).then_some(next) })
            }
            None => {
                self.merged(token, max, |link, token, want| {
                    Self::list_snapshots_on(link, filter, token, want)
                })
                .await
            }
        }
    }
}

#[tonic::async_trait]
impl GroupSnapshots for RelayEngine {
    async fn create_group_snapshot(
        &self,
        name: &str,
        volumes: &[String],
        secrets: &Secrets,
    ) -> Result<(GroupSnapshot, Duration)> {
        super::group::create(self, name, volumes, secrets).await
    }

    async fn delete_group_snapshot(&self, id: &str, secrets: &Secrets) -> Result<()> {
        super::group::delete(self, id, secrets).await
    }

    async fn group_snapshot(&self, id: &str) -> Result<GroupSnapshot> {
        super::group::get(self, id).await
    }
}

#[tonic::async_trait]
impl ChangedBlocks for RelayEngine {
    /// The node's own stream, relayed message by message (never gathered).
    async fn allocated(
        &self,
        snapshot_id: &str,
        from: u64,
        secrets: &Secrets,
    ) -> Result<(u64, Ranges)> {
        let link = self.require(Kind::Snapshot, snapshot_id).await?;
        let stream = link
            .metadata
            .clone()
            .get_metadata_allocated(csi::GetMetadataAllocatedRequest {
                snapshot_id: snapshot_id.to_string(),
                starting_offset: from as i64,
                max_results: 0,
                secrets: wire::secrets(secrets),
            })
            .await
            .map_err(|s| link.failed(s))?
            .into_inner();
        let parts =
            |m: csi::GetMetadataAllocatedResponse| (m.volume_capacity_bytes, m.block_metadata);
        relayed(self, link, stream, parts, snapshot_id).await
    }

    async fn changed(
        &self,
        base: &str,
        target: &str,
        from: u64,
        secrets: &Secrets,
    ) -> Result<(u64, Ranges)> {
        let link = self.require(Kind::Snapshot, target).await?;
        let stream = link
            .metadata
            .clone()
            .get_metadata_delta(csi::GetMetadataDeltaRequest {
                base_snapshot_id: base.to_string(),
                target_snapshot_id: target.to_string(),
                starting_offset: from as i64,
                max_results: 0,
                secrets: wire::secrets(secrets),
            })
            .await
            .map_err(|s| link.failed(s))?
            .into_inner();
        let parts = |m: csi::GetMetadataDeltaResponse| (m.volume_capacity_bytes, m.block_metadata);
        relayed(self, link, stream, parts, target).await
    }
}

/// A node's changed-blocks stream as ranges, relayed as it comes: the
/// first message (read now, so a refusal is the call's answer) gives the
/// size; a node with no ranges to send sends no message, and then the
/// snapshot's own size is asked.
async fn relayed<M: Send + 'static>(
    relay: &RelayEngine,
    link: Arc<AgentLink>,
    mut stream: tonic::Streaming<M>,
    parts: fn(M) -> (i64, Vec<csi::BlockMetadata>),
    snapshot_id: &str,
) -> Result<(u64, Ranges)> {
    use tokio_stream::StreamExt;
    let ranges = |blocks: Vec<csi::BlockMetadata>| -> Vec<Range> {
        blocks
            .into_iter()
            .map(|b| (b.byte_offset.max(0) as u64, b.size_bytes.max(0) as u64))
            .collect()
    };
    let Some(first) = stream.message().await.map_err(|s| link.failed(s))? else {
        let size = relay.snapshot(snapshot_id).await?.size;
        return Ok((size, ranges_of(vec![])));
    };
    let (capacity, blocks) = parts(first);
    let rest = stream.map(move |m| match m {
        Ok(m) => Ok(ranges(parts(m).1)),
        Err(s) => Err(link.failed(s)),
    });
    let all = tokio_stream::once(Ok(ranges(blocks))).chain(rest);
    Ok((capacity.max(0) as u64, Box::pin(all)))
}
