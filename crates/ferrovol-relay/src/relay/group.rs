//! Group snapshots through the relay. Members on one node: that node takes
//! the group as it always has (freeze, reflink, thaw). Members on several
//! nodes: one instant for all of them, in three phases —
//! 1. every node flushes and freezes its members, and holds them frozen;
//! 2. once all are frozen, every node takes its part of the group (its
//!    own freeze finds the filesystems already still and skips them);
//! 3. every node thaws.
//!
//! Every node's part carries the one group ID, so each member names the
//! same group. A hold is bounded on the agent (it thaws on its own when
//! the limit passes or the relay's connection drops), and the relay thaws
//! on every path. A part is only ever taken under its hold: the node
//! refuses (ABORTED) a part whose hold has ended, and keeps the hold's
//! filesystems frozen while a part clones under it (`quiesce::Held`'s
//! pins), even if the hold ends meanwhile. A failed attempt's parts are
//! removed; a retry that finds some parts but not all removes those and
//! takes the group anew, so no answer mixes two instants.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use ferrovol_core::engine::{GroupSnapshot, Secrets};
use ferrovol_csi as csi;
use ferrovol_error::{self as error, Error, Result};
use ferrovol_local::ids::{self, Kind};
use tokio::task::JoinSet;
use tracing::{info, warn};

use super::agents::{bounded, AgentLink};
use super::engine::RelayEngine;
use super::wire;
use crate::proto::{FreezeRequest, GroupPartRequest, ThawRequest};

/// Runs `call` on every link at once; answers in the links' order.
async fn on_each<T, F, Fut>(links: &[Arc<AgentLink>], call: F) -> Vec<Result<T>>
where
    T: Send + 'static,
    F: Fn(Arc<AgentLink>) -> Fut,
    Fut: std::future::Future<Output = Result<T>> + Send + 'static,
{
    let mut set = JoinSet::new();
    for (i, link) in links.iter().enumerate() {
        let fut = call(link.clone());
        set.spawn(async move { (i, fut.await) });
    }
    let mut out: Vec<Option<Result<T>>> = (0..links.len()).map(|_| None).collect();
    while let Some(done) = set.join_next().await {
        match done {
            Ok((i, r)) => out[i] = Some(r),
            Err(e) => warn!(error = %e, "a relayed call panicked"),
        }
    }
    out.into_iter()
        .map(|r| r.unwrap_or_else(|| Err(error::internal("a relayed call did not finish"))))
        .collect()
}

fn first_error<T>(results: &[Result<T>]) -> Option<Error> {
    results.iter().find_map(|r| r.as_ref().err().cloned())
}

async fn create_part(
    link: Arc<AgentLink>,
    name: String,
    volumes: Vec<String>,
    secrets: HashMap<String, String>,
) -> Result<GroupSnapshot> {
    let made = link
        .group
        .clone()
        .create_volume_group_snapshot(csi::CreateVolumeGroupSnapshotRequest {
            name: name.clone(),
            source_volume_ids: volumes,
            secrets,
            parameters: HashMap::new(),
        })
        .await
        .map_err(|s| link.failed(s))?
        .into_inner();
    let group = made.group_snapshot.ok_or_else(|| {
        error::internal(format!("{} took a group snapshot but answered none", link.context()))
    })?;
    Ok(wire::group(group, &name))
}

/// One node's part of a group spread over nodes, over the link: the
/// request says it is a part and under which freeze.
async fn part_under_hold(link: Arc<AgentLink>, part: GroupPartRequest) -> Result<GroupSnapshot> {
    let made = bounded(link.agent.clone().create_group_part(part))
        .await
        .map_err(|s| link.failed(s))?
        .into_inner();
    Ok(wire::group_part(made))
}

async fn delete_part(
    link: Arc<AgentLink>,
    id: String,
    secrets: HashMap<String, String>,
) -> Result<()> {
    link.group
        .clone()
        .delete_volume_group_snapshot(csi::DeleteVolumeGroupSnapshotRequest {
            group_snapshot_id: id,
            snapshot_ids: vec![],
            secrets,
        })
        .await
        .map_err(|s| link.failed(s))?;
    Ok(())
}

/// A node's part of a shared group, if it has it (ready).
pub(super) async fn part_of(link: Arc<AgentLink>, id: String) -> Result<Option<GroupSnapshot>> {
    let req = csi::GetVolumeGroupSnapshotRequest { group_snapshot_id: id, ..Default::default() };
    match bounded(link.group.clone().get_volume_group_snapshot(req)).await {
        Ok(r) => Ok(r.into_inner().group_snapshot.map(|g| wire::group(g, ""))),
        Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
        Err(s) => Err(link.failed(s)),
    }
}

type Parts = (Vec<Result<GroupSnapshot>>, Vec<Result<(bool, Duration)>>);

/// The three phases on `links`: all frozen, every part taken, all thawed.
/// Answers each node's part and its thaw (still held, and for how long).
async fn under_one_freeze(
    relay: &RelayEngine,
    links: &[Arc<AgentLink>],
    members: &HashMap<String, Vec<String>>,
    id: &str,
    secrets: &HashMap<String, String>,
) -> Result<Parts> {
    let hold_id = uuid::Uuid::new_v4().simple().to_string();
    let hold_ms = relay.hold_limit.as_millis().min(u32::MAX as u128) as u32;

    // Phase 1: everyone frozen (each node flushes first, writers running).
    let frozen = on_each(links, |link| {
        let req = FreezeRequest {
            hold_id: hold_id.clone(),
            volume_ids: members[&link.tag].clone(),
            hold_ms,
        };
        async move {
            bounded(link.agent.clone().freeze(req)).await.map_err(|s| link.failed(s))?;
            Ok(())
        }
    })
    .await;
    if let Some(e) = first_error(&frozen) {
        thaw(links, &hold_id).await;
        return Err(e);
    }

    // A test's pause point: every node frozen, no part begun (off the
    // async workers: a paused failpoint blocks its thread).
    let _ = ferrovol_host::offload::to_completion("a failpoint", || {
        ferrovol_local::failpoint::hit("relay-group-frozen");
        Ok(())
    })
    .await;

    // Phase 2: every part, under the one freeze (each node checks that its
    // members are still held when it clones, and keeps them so until done).
    let parts = on_each(links, |link| {
        let part = GroupPartRequest {
            group_id: id.to_string(),
            volume_ids: members[&link.tag].clone(),
            hold_id: hold_id.clone(),
            secrets: secrets.clone(),
        };
        part_under_hold(link.clone(), part)
    })
    .await;

    // Phase 3: everyone thawed, on every path.
    let thawed = thaw(links, &hold_id).await;
    Ok((parts, thawed))
}

pub async fn create(
    relay: &RelayEngine,
    name: &str,
    volumes: &[String],
    secrets: &Secrets,
) -> Result<(GroupSnapshot, Duration)> {
    let mut by_node: BTreeMap<String, (Arc<AgentLink>, Vec<String>)> = BTreeMap::new();
    for v in volumes {
        let link = relay
            .locate(Kind::Volume, v)
            .await?
            .ok_or_else(|| error::not_found(format!("volume {v} does not exist")))?;
        by_node.entry(link.tag.clone()).or_insert_with(|| (link, vec![])).1.push(v.clone());
    }
    let secrets = wire::secrets(secrets);
    if by_node.len() == 1 {
        let (link, members) = by_node.into_values().next().expect("one node");
        let started = std::time::Instant::now();
        let group = create_part(link, name.to_string(), members, secrets).await?;
        // The node measured its own window; the relay sees only the call.
        return Ok((GroupSnapshot { name: name.to_string(), ..group }, started.elapsed()));
    }

    let id = ids::shared_group(name);
    let links: Vec<Arc<AgentLink>> = by_node.values().map(|(l, _)| l.clone()).collect();
    let members: HashMap<String, Vec<String>> =
        by_node.iter().map(|(tag, (_, m))| (tag.clone(), m.clone())).collect();

    // A retry: every node has its part (all taken under one freeze, which
    // each part checked) is the group, answered again. Some but not all:
    // what is left of an attempt that failed; removed, then taken anew.
    let mut existing = Vec::with_capacity(links.len());
    for found in on_each(&links, |link| part_of(link, id.clone())).await {
        existing.push(found?);
    }
    if existing.iter().all(Option::is_some) {
        let parts = existing.into_iter().flatten().collect();
        let group = GroupSnapshot { name: name.to_string(), ..wire::merge_groups(&id, parts) };
        return Ok((group, Duration::ZERO));
    }
    let stale: Vec<Arc<AgentLink>> =
        links.iter().zip(&existing).filter(|(_, p)| p.is_some()).map(|(l, _)| l.clone()).collect();
    if !stale.is_empty() {
        warn!(group = %id, nodes = stale.len(), "removing the parts a failed attempt left");
        let removed = on_each(&stale, |link| delete_part(link, id.clone(), secrets.clone())).await;
        if let Some(e) = first_error(&removed) {
            return Err(e);
        }
    }

    let (parts, thawed) = if relay.skip_freeze {
        // What a relay without the shared freeze does: each node frozen,
        // cloned and thawed in turn, each at an instant of its own.
        let (mut parts, mut thawed) = (Vec::new(), Vec::new());
        for link in &links {
            let (p, t) =
                under_one_freeze(relay, std::slice::from_ref(link), &members, &id, &secrets)
                    .await?;
            parts.extend(p);
            thawed.extend(t);
        }
        (parts, thawed)
    } else {
        under_one_freeze(relay, &links, &members, &id, &secrets).await?
    };
    let window =
        thawed.iter().filter_map(|t| t.as_ref().ok()).map(|t| t.1).max().unwrap_or_default();
    let expired: Vec<&str> = links
        .iter()
        .zip(&thawed)
        .filter(|(_, t)| !matches!(t, Ok((true, _))))
        .map(|(l, _)| l.node_id.as_str())
        .collect();

    if !expired.is_empty() {
        // Each part held its members frozen while it cloned (or failed if
        // the freeze had ended first), so the parts are still one instant;
        // the window was longer than asked for.
        warn!(group = %id, nodes = ?expired, limit = ?relay.hold_limit,
              "the freeze ran out before the thaw");
    }
    if let Some(e) = first_error(&parts) {
        // No torn group is left behind: remove the parts that were made.
        let made: Vec<Arc<AgentLink>> =
            links.iter().zip(&parts).filter(|(_, p)| p.is_ok()).map(|(l, _)| l.clone()).collect();
        for r in on_each(&made, |link| delete_part(link, id.clone(), secrets.clone())).await {
            if let Err(cleanup) = r {
                warn!(group = %id, error = %cleanup, "could not remove a part of a failed group snapshot");
            }
        }
        return Err(e);
    }
    let parts: Vec<GroupSnapshot> = parts.into_iter().map(|p| p.expect("checked")).collect();
    let group = GroupSnapshot { name: name.to_string(), ..wire::merge_groups(&id, parts) };
    info!(
        group_snapshot_id = %id,
        nodes = links.len(),
        members = group.snapshots.len(),
        window_ms = window.as_secs_f64() * 1000.0,
        "group snapshot across nodes taken"
    );
    Ok((group, window))
}

/// Thaws `hold_id` everywhere; per node, whether it was still held and for
/// how long it had been.
async fn thaw(links: &[Arc<AgentLink>], hold_id: &str) -> Vec<Result<(bool, Duration)>> {
    let results = on_each(links, |link| {
        let req = ThawRequest { hold_id: hold_id.to_string() };
        async move {
            let t = bounded(link.agent.clone().thaw(req))
                .await
                .map_err(|s| link.failed(s))?
                .into_inner();
            Ok((t.held, Duration::from_micros(t.frozen_us)))
        }
    })
    .await;
    for (link, r) in links.iter().zip(&results) {
        if let Err(e) = r {
            // Its own limit (or the dropped link) thaws it.
            warn!(node = %link.node_id, error = %e, "could not thaw; the node thaws on its own");
        }
    }
    results
}

pub async fn delete(relay: &RelayEngine, id: &str, secrets: &Secrets) -> Result<()> {
    let secrets = wire::secrets(secrets);
    let links = if ids::is_shared_group(id) {
        relay.agents.all()?
    } else {
        match relay.locate(Kind::Group, id).await? {
            Some(link) => vec![link],
            None => return Ok(()),
        }
    };
    let done = on_each(&links, |link| delete_part(link, id.to_string(), secrets.clone())).await;
    first_error(&done).map_or(Ok(()), Err)
}

pub async fn get(relay: &RelayEngine, id: &str) -> Result<GroupSnapshot> {
    let not_found = || error::not_found(format!("group snapshot {id} does not exist"));
    let links = if ids::is_shared_group(id) {
        relay.agents.all()?
    } else {
        vec![relay.locate(Kind::Group, id).await?.ok_or_else(not_found)?]
    };
    let found = on_each(&links, |link| part_of(link, id.to_string())).await;
    let mut parts = Vec::new();
    for r in found {
        if let Some(part) = r? {
            parts.push(part);
        }
    }
    if parts.is_empty() {
        return Err(not_found());
    }
    Ok(wire::merge_groups(id, parts))
}
