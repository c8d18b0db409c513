//! The controller half: images, snapshots, clones, groups, publish records.
//!
//! Each call is one blocking sequence of librbd calls, ordered so that a
//! crash at any point leaves something the retry adopts:
//! - CreateVolume makes the image under the name the request name gives,
//!   then writes its attributes, the request name among them, last. An
//!   image without them is half made: a retry finishes it
//!   ([`crate::volumes`]).
//! - A snapshot's name is recorded (object `ferrovol.snapshot.<hash>`: the
//!   image id) before the snapshot is taken, so a second request with the
//!   same name and another source is ALREADY_EXISTS.
//! - A group's members are recorded (`ferrovol.group.<hash>`) before the
//!   RBD group is made ([`crate::groups`]).
//! - DeleteVolume moves the image to the RBD trash; the purger
//!   ([`crate::purge`]) removes it for good in the background, or, while
//!   snapshots or clones still need it, the call that frees it last.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferrovol_ceph::{self as ceph, Pool};
use ferrovol_core::engine::{
    self, ranges_from, AccessMode, Capacity, ChangedBlocks, Condition, ContentSource,
    ControllerEngine, EngineStats, Expanded, ExpansionSite, Features, GroupSnapshot,
    GroupSnapshots, NewVolume, Page, Publish, Publishing, Range, Ranges, Secrets, Snapshot,
    SnapshotFilter, Snapshots, Topology, Volume, RANGE_BATCHES_IN_FLIGHT,
};
use ferrovol_host::offload;

use crate::connect::Connections;
use crate::error::{self, Kind, Result};
use crate::groups::{create_group, group_of, read_group};
use crate::ids::{self, GroupId, SnapshotId, VolumeId};
use crate::purge::Purger;
use crate::snapshots::{find_snap, image_snapshots, merge, open_at, snapshot_of};
use crate::volumes::{
    self, depth_of, describe, is_volume_name, not_found_or, publish_record, published, settle,
    Origin, GRANULARITY, MAXIMUM_VOLUME,
};
use crate::{blocking, ceph_error, claim};
use crate::{names, params};

/// Settings of the controller half.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Pools that listings, metrics and capacity cover.
    pub pools: Vec<String>,
    /// A clone chain longer than this is flattened in the background.
    pub max_clone_depth: u32,
    /// The attach limit the nodes advertise (`--max-volumes-per-node`, the
    /// same on the controller); 0: none.
    pub max_volumes_per_node: i64,
}

pub struct RbdEngine {
    conn: Connections,
    settings: Settings,
    /// Images being flattened now (one flatten per image).
    flattening: Arc<Mutex<HashSet<String>>>,
    purger: Purger,
}

impl RbdEngine {
    /// The engine, and its purger's task (so: within a Tokio runtime). The
    /// purger sweeps every listed pool's trash once at start.
    pub async fn open(conn: Connections, settings: Settings) -> RbdEngine {
        let engine = RbdEngine {
            purger: Purger::start(conn.clone()),
            conn,
            settings,
            flattening: Arc::default(),
        };
        for name in &engine.settings.pools {
            if let Ok(Some(pool)) = engine.pool_of(name, &Secrets::default()).await {
                engine.purger.wake(&pool);
            }
        }
        engine
    }

    async fn pool(&self, name: &str, secrets: &Secrets) -> Result<Pool> {
        self.conn.pool(name, secrets).await
    }

    /// RESOURCE_EXHAUSTED when `node` holds as many volumes as it may
    /// (the spec's code for a node at its attach limit); a volume already
    /// published there does not count twice.
    async fn check_attach_limit(&self, node: &str, volume: &VolumeId) -> Result<()> {
        let limit = self.settings.max_volumes_per_node;
        if limit <= 0 {
            return Ok(());
        }
        let mut held = 0usize;
        for name in &self.settings.pools {
            let Some(pool) = self.pool_of(name, &Secrets::default()).await? else { continue };
            let (node, volume) = (node.to_string(), volume.clone());
            held += blocking(move || {
                let mut n = 0;
                for (_, image) in pool.list_images().map_err(ceph_error)? {
                    let here = published(&pool, &image)?.contains_key(&node);
                    if here && (pool.name() != volume.pool || image != volume.image) {
                        n += 1;
                    }
                }
                Ok(n)
            })
            .await?;
        }
        if held as i64 >= limit {
            return Err(error::exhausted(format!(
                "node {node} holds {held} volumes, its limit (--max-volumes-per-node {limit})"
            )));
        }
        Ok(())
    }

    /// The pool where request names are claimed: the first listed, opened
    /// with the driver's own client (None when it does not exist).
    async fn home(&self) -> Result<Option<Pool>> {
        match self.settings.pools.first() {
            Some(name) => self.pool_of(name, &Secrets::default()).await,
            None => Ok(None),
        }
    }

    /// Claims a request name for the one volume it may name ([`names`]).
    async fn claim_name(&self, name: &str, volume_id: &str) -> Result<()> {
        let Some(home) = self.home().await? else { return Ok(()) };
        let (h, n) = (home.clone(), name.to_string());
        let current = blocking(move || names::claimed(&h, &n)).await?;
        match current {
            Some(c) if c == volume_id => return Ok(()),
            Some(other) if self.image_exists(&other).await? => {
                return Err(error::exists(format!(
                    "volume {:?} exists as {other}, made with other parameters (another pool or \
                     volumeNamePrefix)",
                    ferrovol_error::bounded(name)
                )));
            }
            // Unclaimed, or claimed for a volume that is gone.
            _ => {}
        }
        let (n, id) = (name.to_string(), volume_id.to_string());
        blocking(move || names::claim(&home, &n, &id)).await
    }

    /// Whether the image a volume ID names still exists (a deleted one is
    /// in the trash, under no name).
    async fn image_exists(&self, volume_id: &str) -> Result<bool> {
        let Some(v) = VolumeId::parse(volume_id) else { return Ok(false) };
        let Some(pool) = self.pool_of(&v.pool, &Secrets::default()).await? else {
            return Ok(false);
        };
        blocking(move || match pool.open_read_only(&v.image) {
            Ok(_) => Ok(true),
            Err(e) if e.is(libc::ENOENT) => Ok(false),
            Err(e) => Err(ceph_error(e)),
        })
        .await
    }

    /// CreateVolume once its name is claimed.
    async fn create_claimed(
        &self,
        req: NewVolume,
        p: params::Parameters,
        image: String,
    ) -> Result<Volume> {
        // A source whose background flatten runs is changing its parent
        // links under us (its clone answered NOT_FOUND): the spec's
        // "operation pending", retried by the provisioner.
        if let Some(ContentSource::Volume(id)) = &req.source {
            let flattening = VolumeId::parse(id)
                .is_some_and(|v| self.flattening.lock().expect("flatten set").contains(&v.image));
            if flattening {
                return Err(error::busy(format!(
                    "source volume {id} is being flattened (its clone chain grew too long); retry"
                )));
            }
        }
        let pool = self.pool(&p.pool, &req.secrets).await.map_err(|e| match e {
            e if e.is(Kind::NotFound) => {
                error::invalid(format!("{} (the StorageClass names it)", e.message()))
            }
            e => e,
        })?;
        let origin = self.origin(req.source.as_ref(), &req.secrets).await?;
        let size = engine::choose_size(
            req.required_bytes,
            req.limit_bytes,
            origin.size(),
            GRANULARITY,
            MAXIMUM_VOLUME,
        )?;
        let max_depth = self.settings.max_clone_depth;
        let (pool2, image2) = (pool.clone(), image.clone());
        let (volume, depth) =
            blocking(move || volumes::create(&pool2, &image2, &req, &p, origin, size)).await?;
        if depth > max_depth {
            self.flatten_later(pool, image);
        }
        Ok(volume)
    }

    /// A pool named by an ID: a missing pool means a missing object.
    async fn pool_of(&self, name: &str, secrets: &Secrets) -> Result<Option<Pool>> {
        match self.pool(name, secrets).await {
            Ok(p) => Ok(Some(p)),
            Err(e) if e.is(Kind::NotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn flatten_later(&self, pool: Pool, image: String) {
        if !self.flattening.lock().expect("flatten set").insert(image.clone()) {
            return;
        }
        let set = self.flattening.clone();
        tokio::spawn(async move {
            let name = image.clone();
            let p = pool.clone();
            let result = blocking(move || {
                let img = p.open(&name).map_err(ceph_error)?;
                let parent = img.parent().map_err(ceph_error)?;
                img.flatten().map_err(ceph_error)?;
                volumes::set_depth(&img, 0)?;
                drop(img);
                if let Some(parent) = parent.filter(|pp| pp.pool == p.name()) {
                    settle(&p, &parent.image_id)?;
                }
                Ok(())
            })
            .await;
            match result {
                Ok(()) => {
                    tracing::info!(image = %image, "clone flattened (its chain was too long)")
                }
                Err(e) => {
                    tracing::warn!(image = %image, error = %e, "flattening a clone failed; the next clone from it retries")
                }
            }
            set.lock().expect("flatten set").remove(&image);
        });
    }
}

pub fn features() -> Features {
    let mut mount_modes = Features::single_node_modes();
    mount_modes.push(AccessMode::MultiNodeReaderOnly);
    let mut block_modes = mount_modes.clone();
    block_modes.extend([AccessMode::MultiNodeSingleWriter, AccessMode::MultiNodeMultiWriter]);
    Features {
        expansion: ExpansionSite::Controller,
        // A filesystem grows on the node, and so does a device that does
        // not follow its image's size by itself (rbd-fuse's loop device).
        node_expansion: true,
        clones: true,
        filesystems: ferrovol_block::filesystems(),
        mount_modes,
        block_modes,
    }
}

fn is_single_node(mode: AccessMode) -> bool {
    matches!(
        mode,
        AccessMode::SingleNodeWriter
            | AccessMode::SingleNodeReaderOnly
            | AccessMode::SingleNodeSingleWriter
            | AccessMode::SingleNodeMultiWriter
    )
}

fn mode_name(mode: AccessMode, read_only: bool) -> String {
    format!("{}{}", mode.as_str_name(), if read_only { ",ro" } else { "" })
}

#[tonic::async_trait]
impl ControllerEngine for RbdEngine {
    fn kind(&self) -> &'static str {
        "rbd"
    }

    fn features(&self) -> Features {
        features()
    }

    fn manifest(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::from([("engine".to_string(), "rbd".to_string())]);
        if let Ok(libs) = ceph::libraries() {
            let (a, b, c) = libs.rbd_version;
            m.insert("librbd".into(), format!("{a}.{b}.{c}"));
            m.insert("clone-by-snapshot-id".into(), libs.has_clone_by_snap_id().to_string());
        }
        m
    }

    fn has_topology(&self) -> bool {
        false
    }

    async fn close(&self) -> Result<()> {
        self.purger.stop();
        let limit = std::time::Duration::from_secs(self.conn.config().op_timeout);
        crate::close_connections(&self.conn, limit).await;
        Ok(())
    }

    async fn health(&self) -> Result<()> {
        let cluster = self.conn.default_cluster().await?;
        blocking(move || cluster.stat().map(drop).map_err(ceph_error)).await
    }

    async fn stats(&self) -> Result<EngineStats> {
        let mut stats = EngineStats::default();
        for name in &self.settings.pools {
            let Some(pool) = self.pool_of(name, &Secrets::default()).await? else { continue };
            let images = blocking(move || pool.list_images().map_err(ceph_error)).await?;
            stats.volumes += images.iter().filter(|(_, n)| is_volume_name(n)).count() as u64;
        }
        if let Ok((total, avail)) =
            self.pool_space(self.settings.pools.first().map(String::as_str)).await
        {
            stats.storage_capacity_bytes = total;
            stats.storage_used_bytes = total.saturating_sub(avail);
        }
        stats.facts.insert("pools".into(), self.settings.pools.join(","));
        Ok(stats)
    }

    fn validate_parameters(&self, parameters: &BTreeMap<String, String>) -> Result<()> {
        params::parse(parameters).map(drop)
    }

    async fn create_volume(&self, req: NewVolume) -> Result<Volume> {
        let p = params::parse(&req.parameters)?;
        let image = format!("{}{}", p.image_prefix, ids::hash(&req.name));
        let volume_id = VolumeId { pool: p.pool.clone(), image: image.clone() }.render();
        self.claim_name(&req.name, &volume_id).await?;
        let name = req.name.clone();
        let made = self.create_claimed(req, p, image).await;
        if made.is_err() && !self.image_exists(&volume_id).await.unwrap_or(true) {
            // Nothing was made under the name: it is free again.
            if let Some(home) = self.home().await? {
                let _ = blocking(move || names::release(&home, &name, &volume_id)).await;
            }
        }
        made
    }

    async fn delete_volume(&self, id: &str, secrets: &Secrets) -> Result<()> {
        let Some(v) = VolumeId::parse(id) else { return Ok(()) };
        let Some(pool) = self.pool_of(&v.pool, secrets).await? else { return Ok(()) };
        let (p, image) = (pool.clone(), v.image.clone());
        let name = blocking(move || {
            let name = match p.open_read_only(&image) {
                Ok(img) => volumes::Attributes::read(&img)?.map(|a| a.name),
                Err(e) if e.is(libc::ENOENT) => None,
                Err(e) => return Err(ceph_error(e)),
            };
            volumes::delete(&p, &image)?;
            Ok(name)
        })
        .await?;
        self.purger.wake(&pool);
        if let (Some(name), Some(home)) = (name, self.home().await?) {
            let id = id.to_string();
            blocking(move || names::release(&home, &name, &id)).await?;
        }
        Ok(())
    }

    async fn volume(&self, id: &str) -> Result<Volume> {
        let missing = || error::not_found(format!("volume {id} does not exist"));
        let v = VolumeId::parse(id).ok_or_else(missing)?;
        let pool = self.pool_of(&v.pool, &Secrets::default()).await?.ok_or_else(missing)?;
        blocking(move || describe(&pool, &v.image)).await?.ok_or_else(missing)
    }

    async fn volume_conditions(&self, ids: &[String]) -> Result<Vec<Result<Condition>>> {
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            out.push(match self.volume(id).await {
                Ok(_) => Ok(Condition::Healthy),
                Err(e) if e.is(Kind::NotFound) => Ok(Condition::Abnormal(e.into_message())),
                Err(e) => Err(e),
            });
        }
        Ok(out)
    }

    async fn list_volumes(&self, token: Option<&str>, max: usize) -> Result<Page<Volume>> {
        let start = match token {
            None => None,
            Some(t) => Some(
                VolumeId::parse(t)
                    .filter(|v| self.settings.pools.contains(&v.pool))
                    .ok_or_else(|| error::busy("starting_token is not one this driver issued"))?,
            ),
        };
        let mut items = vec![];
        let mut pools = self.settings.pools.clone();
        pools.sort();
        for name in pools {
            if start.as_ref().is_some_and(|s| name < s.pool) {
                continue;
            }
            let Some(pool) = self.pool_of(&name, &Secrets::default()).await? else { continue };
            let after = start.as_ref().filter(|s| s.pool == name).map(|s| s.image.clone());
            let want = max.saturating_sub(items.len()).saturating_add(1);
            let page = blocking(move || {
                let mut names: Vec<String> = pool
                    .list_images()
                    .map_err(ceph_error)?
                    .into_iter()
                    .map(|(_, n)| n)
                    .filter(|n| is_volume_name(n))
                    .collect();
                names.sort();
                let mut out = vec![];
                for n in names.into_iter().filter(|n| after.as_ref().is_none_or(|a| n > a)) {
                    if out.len() >= want {
                        break;
                    }
                    match describe(&pool, &n) {
                        Ok(Some(v)) => out.push(v),
                        // Half made, or deleted meanwhile: not a volume.
                        Ok(None) => {}
                        Err(e) if e.is(Kind::NotFound) => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(out)
            })
            .await?;
            items.extend(page);
            if items.len() > max {
                break;
            }
        }
        let next = engine::next_token(&mut items, max, |v| v.id.clone());
        Ok(Page { items, next })
    }

    async fn capacity(
        &self,
        parameters: &BTreeMap<String, String>,
        _topology: Option<&Topology>,
    ) -> Result<Capacity> {
        let pool = match parameters.get("pool") {
            Some(_) => Some(params::parse(parameters)?.pool),
            None => self.settings.pools.first().cloned(),
        };
        let (_, available) = self.pool_space(pool.as_deref()).await?;
        Ok(Capacity {
            available,
            maximum_volume_size: MAXIMUM_VOLUME,
            minimum_volume_size: GRANULARITY,
        })
    }

    async fn expand_volume(
        &self,
        id: &str,
        required: u64,
        limit: u64,
        secrets: &Secrets,
    ) -> Result<Expanded> {
        let missing = || error::not_found(format!("volume {id} does not exist"));
        let v = VolumeId::parse(id).ok_or_else(missing)?;
        let pool = self.pool_of(&v.pool, secrets).await?.ok_or_else(missing)?;
        let id = id.to_string();
        blocking(move || {
            let img = pool
                .open(&v.image)
                .map_err(|e| not_found_or(e, || format!("volume {id} does not exist")))?;
            let current = img.size().map_err(ceph_error)?;
            if current >= required {
                return Ok(current);
            }
            let size = engine::choose_size(required, limit, current, GRANULARITY, MAXIMUM_VOLUME)?;
            img.resize(size).map_err(ceph_error)?;
            Ok(size)
        })
        .await
        // Always the node's turn too, raw block included: a filesystem
        // grows there, and so does a device that does not follow its
        // image's size by itself (a loop device over rbd-fuse, nbd); the
        // node's step is a no-op where there is nothing to do.
        .map(|capacity| Expanded { capacity, node_expansion_required: true })
    }

    fn publishing(&self) -> Option<&dyn Publishing> {
        Some(self)
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
impl Publishing for RbdEngine {
    async fn publish(&self, request: &Publish) -> Result<engine::Context> {
        let id = request.volume_id.clone();
        let missing = || error::not_found(format!("volume {id} does not exist"));
        let v = VolumeId::parse(&id).ok_or_else(missing)?;
        let pool = self.pool_of(&v.pool, &request.secrets).await?.ok_or_else(missing)?;
        self.check_attach_limit(&request.node_id, &v).await?;
        let (node, mode, ro) = (request.node_id.clone(), request.mode, request.read_only);
        blocking(move || {
            // The volume must exist (a cheap open: no watch, no lock).
            drop(
                pool.open_read_only(&v.image)
                    .map_err(|e| not_found_or(e, || format!("volume {id} does not exist")))?,
            );
            let mut records = published(&pool, &v.image)?;
            let wanted = mode_name(mode, ro);
            if let Some(have) = records.get(&node) {
                if *have != wanted {
                    return Err(error::exists(format!(
                        "volume {id} is published to {node} as {have}, not {wanted}"
                    )));
                }
            } else {
                let others: Vec<&String> = records.keys().collect();
                let exclusive_there = records.values().any(|m| {
                    AccessMode::from_str_name(m.trim_end_matches(",ro")).is_some_and(is_single_node)
                });
                if !others.is_empty() && (is_single_node(mode) || exclusive_there) {
                    return Err(error::precondition(format!(
                        "volume {id} is published to {} with a single-node access mode; \
                         unpublish it there first",
                        others.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
                    )));
                }
                records.insert(node, wanted);
                let json = serde_json::to_string(&records).expect("a map of strings");
                pool.write_object(&publish_record(&v.image), json.as_bytes())
                    .map_err(ceph_error)?;
            }
            Ok(BTreeMap::from([("exclusive".to_string(), is_single_node(mode).to_string())]))
        })
        .await
    }

    async fn unpublish(
        &self,
        volume_id: &str,
        node_id: Option<&str>,
        secrets: &Secrets,
    ) -> Result<()> {
        let Some(v) = VolumeId::parse(volume_id) else { return Ok(()) };
        let Some(pool) = self.pool_of(&v.pool, secrets).await? else { return Ok(()) };
        let node = node_id.map(str::to_string);
        blocking(move || {
            let mut records = published(&pool, &v.image)?;
            let before = records.len();
            match &node {
                Some(n) => drop(records.remove(n)),
                None => records.clear(),
            }
            let oid = publish_record(&v.image);
            if records.is_empty() {
                pool.remove_object(&oid).map_err(ceph_error)
            } else if records.len() != before {
                let json = serde_json::to_string(&records).expect("a map of strings");
                pool.write_object(&oid, json.as_bytes()).map_err(ceph_error)
            } else {
                Ok(())
            }
        })
        .await
    }
}

#[tonic::async_trait]
impl Snapshots for RbdEngine {
    async fn create_snapshot(
        &self,
        name: &str,
        source_volume: &str,
        secrets: &Secrets,
    ) -> Result<Snapshot> {
        let missing = || error::not_found(format!("source volume {source_volume} does not exist"));
        let v = VolumeId::parse(source_volume).ok_or_else(missing)?;
        let pool = self.pool_of(&v.pool, secrets).await?.ok_or_else(missing)?;
        let (hash, source, name) = (ids::hash(name), source_volume.to_string(), name.to_string());
        blocking(move || {
            let img = pool.open(&v.image).map_err(|e| {
                not_found_or(e, || format!("source volume {source} does not exist"))
            })?;
            let image_id = img.id().map_err(ceph_error)?;
            claim(&pool, &ids::snapshot_record(&hash), image_id.as_bytes(), || {
                format!("snapshot name {name:?} is taken by a snapshot of another volume")
            })?;
            let id = SnapshotId { pool: pool.name().into(), image_id, hash, member: false };
            let snap_name = id.snap_name();
            if find_snap(&img, &snap_name)?.is_none() {
                match img.snap_create(&snap_name) {
                    Err(e) if !e.is(libc::EEXIST) => return Err(ceph_error(e)),
                    _ => {}
                }
            }
            let snap = find_snap(&img, &snap_name)?
                .ok_or_else(|| error::internal("a snapshot just made is missing"))?;
            snapshot_of(&pool, &img, &id, &snap, None)
        })
        .await
    }

    async fn delete_snapshot(&self, id: &str, secrets: &Secrets) -> Result<()> {
        let Some(s) = SnapshotId::parse(id) else { return Ok(()) };
        if s.member {
            let group = GroupId { pool: s.pool.clone(), hash: s.hash.clone() }.render();
            // The spec's code for a member deleted alone: the caller must
            // stop and delete the group (FAILED_PRECONDITION is retried).
            return Err(error::invalid(format!(
                "snapshot {id} is part of group snapshot {group}: delete the group snapshot"
            )));
        }
        let Some(pool) = self.pool_of(&s.pool, secrets).await? else { return Ok(()) };
        let swept = pool.clone();
        let done = blocking(move || {
            match pool.open_by_id(&s.image_id) {
                Ok(img) => {
                    match img.snap_remove(&s.snap_name()) {
                        Err(e) if !e.is(libc::ENOENT) => return Err(ceph_error(e)),
                        _ => {}
                    }
                    drop(img);
                    settle(&pool, &s.image_id)?;
                }
                Err(e) if e.is(libc::ENOENT) => {}
                Err(e) => return Err(ceph_error(e)),
            }
            pool.remove_object(&ids::snapshot_record(&s.hash)).map_err(ceph_error)
        })
        .await;
        // Trashed images that waited for this snapshot go now.
        self.purger.retry(&swept);
        done
    }

    async fn snapshot(&self, id: &str) -> Result<Snapshot> {
        let missing = || error::not_found(format!("snapshot {id} does not exist"));
        let s = SnapshotId::parse(id).ok_or_else(missing)?;
        let pool = self.pool_of(&s.pool, &Secrets::default()).await?.ok_or_else(missing)?;
        blocking(move || {
            let (img, snap) = open_at(&pool, &s)?;
            let group = s.member.then(|| GroupId { pool: s.pool.clone(), hash: s.hash.clone() });
            snapshot_of(&pool, &img, &s, &snap, group.as_ref())
        })
        .await
    }

    async fn list_snapshots(
        &self,
        filter: &SnapshotFilter,
        token: Option<&str>,
        max: usize,
    ) -> Result<Page<Snapshot>> {
        let mut all = if let Some(id) = &filter.snapshot_id {
            match self.snapshot(id).await {
                Ok(s) => vec![s],
                Err(e) if e.is(Kind::NotFound) => vec![],
                Err(e) => return Err(e),
            }
        } else if let Some(source) = &filter.source_volume {
            match VolumeId::parse(source) {
                None => vec![],
                Some(v) => match self.pool_of(&v.pool, &Secrets::default()).await? {
                    None => vec![],
                    Some(pool) => {
                        let source_id = source.clone();
                        blocking(move || {
                            let id = match pool.open_read_only(&v.image) {
                                Ok(img) => img.id().map_err(ceph_error)?,
                                // A deleted volume whose snapshots outlive
                                // it: its image waits in the trash, or is
                                // back under a hidden name; the unfiltered
                                // listing shows those, and so must this.
                                Err(e) if e.is(libc::ENOENT) => {
                                    let images = pool.list_images().map_err(ceph_error)?;
                                    let mut snaps = deleted_volumes_snapshots(&pool, &images)?;
                                    snaps.retain(|s| s.source_volume == source_id);
                                    return Ok(snaps);
                                }
                                Err(e) => return Err(ceph_error(e)),
                            };
                            image_snapshots(&pool, &id)
                        })
                        .await?
                    }
                },
            }
        } else {
            let mut out = vec![];
            for name in &self.settings.pools {
                let Some(pool) = self.pool_of(name, &Secrets::default()).await? else { continue };
                out.extend(
                    blocking(move || {
                        // Deleted volumes' images (in the trash, or back
                        // under a hidden name) keep their snapshots too.
                        let images = pool.list_images().map_err(ceph_error)?;
                        let mut snaps = vec![];
                        for (id, n) in &images {
                            if is_volume_name(n) {
                                snaps.extend(image_snapshots(&pool, id)?);
                            }
                        }
                        snaps.extend(deleted_volumes_snapshots(&pool, &images)?);
                        Ok(snaps)
                    })
                    .await?,
                );
            }
            out
        };
        all.sort_by(|a, b| a.id.cmp(&b.id));
        if let Some(t) = token {
            let pos = all.iter().position(|s| s.id.as_str() > t);
            if SnapshotId::parse(t).is_none() {
                return Err(error::busy("starting_token is not one this driver issued"));
            }
            all.drain(..pos.unwrap_or(all.len()));
        }
        let next = engine::next_token(&mut all, max, |s| s.id.clone());
        Ok(Page { items: all, next })
    }
}

#[tonic::async_trait]
impl GroupSnapshots for RbdEngine {
    async fn create_group_snapshot(
        &self,
        name: &str,
        volumes: &[String],
        secrets: &Secrets,
    ) -> Result<(GroupSnapshot, Duration)> {
        let mut parsed = vec![];
        for v in volumes {
            parsed.push(
                VolumeId::parse(v)
                    .ok_or_else(|| error::not_found(format!("volume {v} does not exist")))?,
            );
        }
        let pool_name = parsed
            .first()
            .map(|v| v.pool.clone())
            .ok_or_else(|| error::invalid("a group snapshot needs volumes"))?;
        if parsed.iter().any(|v| v.pool != pool_name) {
            return Err(error::invalid("the volumes of one group snapshot must live in one pool"));
        }
        let pool = self
            .pool_of(&pool_name, secrets)
            .await?
            .ok_or_else(|| error::not_found(format!("pool {pool_name} does not exist")))?;
        let gid = GroupId { pool: pool_name, hash: ids::hash(name) };
        let name = name.to_string();
        blocking(move || create_group(&pool, &gid, &name, &parsed)).await
    }

    async fn delete_group_snapshot(&self, id: &str, secrets: &Secrets) -> Result<()> {
        let Some(gid) = GroupId::parse(id) else { return Ok(()) };
        let Some(pool) = self.pool_of(&gid.pool, secrets).await? else { return Ok(()) };
        let swept = pool.clone();
        let done = blocking(move || {
            let record = read_group(&pool, &gid)?;
            let group = gid.group_name();
            for step in [pool.group_snap_remove(&group, gid.snap_name()), pool.group_remove(&group)]
            {
                match step {
                    Err(e) if !e.is(libc::ENOENT) => return Err(ceph_error(e)),
                    _ => {}
                }
            }
            pool.remove_object(&gid.record()).map_err(ceph_error)?;
            for (_, image_id) in record.map(|r| r.members).unwrap_or_default() {
                settle(&pool, &image_id)?;
            }
            Ok(())
        })
        .await;
        // Trashed members that waited for this group go now.
        self.purger.retry(&swept);
        done
    }

    async fn group_snapshot(&self, id: &str) -> Result<GroupSnapshot> {
        let missing = || error::not_found(format!("group snapshot {id} does not exist"));
        let gid = GroupId::parse(id).ok_or_else(missing)?;
        let pool = self.pool_of(&gid.pool, &Secrets::default()).await?.ok_or_else(missing)?;
        let id = id.to_string();
        blocking(move || {
            let record = read_group(&pool, &gid)?
                .ok_or_else(|| error::not_found(format!("group snapshot {id} does not exist")))?;
            group_of(&pool, &gid, &record)
        })
        .await
    }
}

#[tonic::async_trait]
impl ChangedBlocks for RbdEngine {
    async fn allocated(
        &self,
        snapshot_id: &str,
        from: u64,
        secrets: &Secrets,
    ) -> Result<(u64, Ranges)> {
        let missing = || error::not_found(format!("snapshot {snapshot_id} does not exist"));
        let s = SnapshotId::parse(snapshot_id).ok_or_else(missing)?;
        let pool = self.pool_of(&s.pool, secrets).await?.ok_or_else(missing)?;
        let (img, size) = blocking(move || {
            let (img, snap) = open_at(&pool, &s)?;
            Ok((img, snap.size))
        })
        .await?;
        Ok((size, diff_stream(img, None, from, size, true)))
    }

    async fn changed(
        &self,
        base: &str,
        target: &str,
        from: u64,
        secrets: &Secrets,
    ) -> Result<(u64, Ranges)> {
        let b = SnapshotId::parse(base)
            .ok_or_else(|| error::not_found(format!("snapshot {base} does not exist")))?;
        let t = SnapshotId::parse(target)
            .ok_or_else(|| error::not_found(format!("snapshot {target} does not exist")))?;
        if b.pool != t.pool || b.image_id != t.image_id {
            return Err(error::invalid(format!(
                "snapshots {base} and {target} are of different volumes"
            )));
        }
        if b.member {
            return Err(error::precondition(format!(
                "snapshot {base} is a group snapshot member: librbd diffs only from user \
                 snapshots, so changed blocks cannot be listed from it (use a volume snapshot \
                 as the base, or list the target's allocated blocks)"
            )));
        }
        let pool = self
            .pool_of(&t.pool, secrets)
            .await?
            .ok_or_else(|| error::not_found(format!("snapshot {target} does not exist")))?;
        let base_snap = b.snap_name();
        let (img, size) = blocking(move || {
            let img = pool.open_by_id_read_only(&b.image_id).map_err(|e| {
                not_found_or(e, || format!("snapshot {} does not exist", b.render()))
            })?;
            if find_snap(&img, &b.snap_name())?.is_none() {
                return Err(error::not_found(format!("snapshot {} does not exist", b.render())));
            }
            drop(img);
            let (img, snap) = open_at(&pool, &t)?;
            Ok((img, snap.size))
        })
        .await?;
        Ok((size, diff_stream(img, Some(base_snap), from, size, false)))
    }
}

/// Ranges per batch of a diff stream.
const DIFF_BATCH: usize = 4096;

/// `rbd_diff_iterate2` of an open image (at its snapshot) from `from`, as a
/// stream of batches: the callback hands each full batch to the reader and
/// waits while the reader is behind, so a multi-TiB image's extents are
/// never all held; a reader that goes away ends the walk. `existing_only`:
/// only extents that hold data (allocated), rather than every extent that
/// differs (changed, discards included). The walk is a counted Ceph call,
/// so a stop waits for it before closing the connection.
fn diff_stream(
    img: ceph::Image,
    base: Option<String>,
    from: u64,
    size: u64,
    existing_only: bool,
) -> Ranges {
    let counted = crate::Counted::new();
    let rx = offload::produce(RANGE_BATCHES_IN_FLIGHT, move |send| {
        let _counted = counted;
        let mut batch: Vec<Range> = Vec::new();
        let mut reading = true;
        let walked =
            img.diff(base.as_deref(), from, size.saturating_sub(from), &mut |off, len, exists| {
                if exists || !existing_only {
                    merge(&mut batch, off, len);
                    if batch.len() >= DIFF_BATCH {
                        reading = send(Ok(std::mem::take(&mut batch)));
                    }
                }
                reading
            });
        match walked {
            Err(_) if !reading => {} // the reader went away
            Err(e) => {
                send(Err(ceph_error(e)));
            }
            Ok(()) if !batch.is_empty() => {
                send(Ok(batch));
            }
            Ok(()) => {}
        }
    });
    ranges_from(rx)
}

impl RbdEngine {
    async fn origin(&self, source: Option<&ContentSource>, secrets: &Secrets) -> Result<Origin> {
        match source {
            None => Ok(Origin::Empty),
            Some(ContentSource::Snapshot(id)) => {
                let missing = || error::not_found(format!("snapshot {id} does not exist"));
                let s = SnapshotId::parse(id).ok_or_else(missing)?;
                let parent = self.pool_of(&s.pool, secrets).await?.ok_or_else(missing)?;
                blocking(move || {
                    let (img, snap) = open_at(&parent, &s)?;
                    let parent_id = s.image_id.clone();
                    Ok(if s.member {
                        Origin::Member { parent_id, snap_id: snap.id, size: snap.size, parent }
                    } else {
                        let depth = depth_of(&img);
                        let parent_name = img.name().map_err(ceph_error)?;
                        let snap_name = s.snap_name();
                        Origin::Snapshot {
                            parent_id,
                            parent_name,
                            snap: snap_name,
                            size: snap.size,
                            depth,
                            parent,
                        }
                    })
                })
                .await
            }
            Some(ContentSource::Volume(id)) => {
                let missing = || error::not_found(format!("source volume {id} does not exist"));
                let v = VolumeId::parse(id).ok_or_else(missing)?;
                let parent = self.pool_of(&v.pool, secrets).await?.ok_or_else(missing)?;
                let id = id.clone();
                blocking(move || {
                    let img = parent.open_read_only(&v.image).map_err(|e| {
                        not_found_or(e, || format!("source volume {id} does not exist"))
                    })?;
                    let (size, depth) = (img.size().map_err(ceph_error)?, depth_of(&img));
                    Ok(Origin::Volume { parent_name: v.image, size, depth, parent })
                })
                .await
            }
        }
    }

    /// Total and available bytes of a pool (UNAVAILABLE while no ceph-mgr
    /// reports usage: the monitors then answer zeros, which mean unknown,
    /// not full).
    async fn pool_space(&self, pool: Option<&str>) -> Result<(u64, u64)> {
        let cluster = self.conn.default_cluster().await?;
        let pool = pool.map(str::to_string);
        blocking(move || {
            let space = ferrovol_cephclient::space(&cluster)?;
            let avail = space.available(pool.as_deref()).unwrap_or(space.total_available);
            Ok((space.total, avail))
        })
        .await
    }
}

/// The snapshots of deleted volumes whose images wait in the trash, or are
/// back under a hidden name among `images` (the pool's listing, which the
/// caller already holds): they outlive their volume.
fn deleted_volumes_snapshots(pool: &Pool, images: &[(String, String)]) -> Result<Vec<Snapshot>> {
    let hidden = images.iter().filter(|(_, n)| n.starts_with(ids::DELETED_PREFIX)).cloned();
    let trashed = pool.trash_list().map_err(ceph_error)?.into_iter().map(|t| (t.id, t.name));
    let mut snaps = vec![];
    for (id, n) in hidden.chain(trashed) {
        if is_volume_name(&n) || n.starts_with(ids::DELETED_PREFIX) {
            snaps.extend(image_snapshots(pool, &id)?);
        }
    }
    Ok(snaps)
}
