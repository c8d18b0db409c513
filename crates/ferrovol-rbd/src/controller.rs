//! The controller half: images, snapshots, clones, groups, publish records.
//!
//! Each call is one blocking sequence of librbd calls, ordered so that a
//! crash at any point leaves something the retry adopts:
//! - CreateVolume makes the image under the name the request name gives,
//!   then writes its attributes, the request name last. An image without
//!   that name is half made: a retry finishes it.
//! - A snapshot's name is recorded (object `ferrovol.snapshot.<hash>`: the
//!   image id) before the snapshot is taken, so a second request with the
//!   same name and another source is ALREADY_EXISTS.
//! - A group's members are recorded (`ferrovol.group.<hash>`) before the
//!   RBD group is made.
//!
//! Deleting a volume whose snapshots live on hides its image
//! (`csi-deleted-<id>`: snapshots stay restorable by name); one whose only
//! snapshots are held by clones goes to the RBD trash. Either is removed
//! for good by the call that frees its last snapshot (deleting the
//! snapshot, or the last clone, or flattening it).

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use ferrovol_core::engine::{
    self, AccessMode, AccessType, Capacity, Condition, ContentSource, ControllerEngine,
    EngineStats, ExpansionSite, Features, GroupSnapshot, NewVolume, Page, Publish, Range, Secrets,
    Snapshot, SnapshotFilter, Topology, Volume,
};
use ferrovol_host::ceph::{self, CephError, Image, ImageOptions, Pool, SnapNamespace};

use crate::connect::Connections;
use crate::error::{self, Result};
use crate::ids::{self, GroupId, SnapshotId, VolumeId};
use crate::params::{self, Parameters};
use crate::{blocking, ceph_error};

/// Image metadata keys (our attributes live with the image).
const META_NAME: &str = "ferrovol.name";
const META_VOLUME: &str = "ferrovol.volume";
const META_SOURCE: &str = "ferrovol.source";
const META_DEPTH: &str = "ferrovol.depth";
const META_ACCESS: &str = "ferrovol.access";
const META_CONTEXT: &str = "ferrovol.context";

/// Sizes are whole MiB (librbd takes any byte size; the kernel's block
/// layer and every filesystem are happier with round ones).
pub const GRANULARITY: u64 = 1 << 20;
const MAXIMUM_VOLUME: u64 = 1 << 50;

/// Settings of the controller half.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Pools that listings, metrics and capacity cover.
    pub pools: Vec<String>,
    /// A clone chain longer than this is flattened in the background.
    pub max_clone_depth: u32,
}

pub struct RbdEngine {
    conn: Connections,
    settings: Settings,
    /// Images being flattened now (one flatten per image).
    flattening: Arc<Mutex<HashSet<String>>>,
}

impl RbdEngine {
    pub fn new(conn: Connections, settings: Settings) -> RbdEngine {
        RbdEngine { conn, settings, flattening: Arc::default() }
    }

    async fn pool(&self, name: &str, secrets: &Secrets) -> Result<Pool> {
        self.conn.pool(name, secrets).await
    }

    /// A pool named by an ID: a missing pool means a missing object.
    async fn pool_of(&self, name: &str, secrets: &Secrets) -> Result<Option<Pool>> {
        match self.pool(name, secrets).await {
            Ok(p) => Ok(Some(p)),
            Err(error::Error::NotFound(_)) => Ok(None),
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
                img.set_metadata(META_DEPTH, "0").map_err(ceph_error)?;
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
    Features { publish: true, expansion: ExpansionSite::Controller, mount_modes, block_modes }
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

/// Where a new volume's data comes from, resolved.
enum Origin {
    Empty,
    /// A user snapshot: cloned copy-on-write.
    Snapshot {
        parent: Pool,
        parent_name: String,
        snap: String,
        size: u64,
        depth: u32,
    },
    /// A group member: cloned by snapshot id where librbd can, else copied.
    Member {
        parent: Pool,
        parent_id: String,
        parent_name: String,
        snap_id: u64,
        size: u64,
    },
    /// Another volume: cloned through a transient snapshot.
    Volume {
        parent: Pool,
        parent_name: String,
        size: u64,
        depth: u32,
    },
}

impl Origin {
    fn size(&self) -> u64 {
        match self {
            Origin::Empty => 0,
            Origin::Snapshot { size, .. }
            | Origin::Member { size, .. }
            | Origin::Volume { size, .. } => *size,
        }
    }
}

fn not_found_or(e: CephError, what: impl FnOnce() -> String) -> error::Error {
    if e.is(libc::ENOENT) {
        error::not_found(what())
    } else {
        ceph_error(e)
    }
}

fn depth_of(img: &Image) -> u32 {
    img.metadata(META_DEPTH).ok().flatten().and_then(|d| d.parse().ok()).unwrap_or(0)
}

/// The user snapshot of this name on an image, if it exists.
fn find_snap(img: &Image, name: &str) -> Result<Option<ceph::Snap>> {
    Ok(img.snaps().map_err(ceph_error)?.into_iter().find(|s| s.name == name))
}

/// The image's snapshot that belongs to a group snapshot.
fn find_member(img: &Image, group: &GroupId) -> Result<Option<ceph::Snap>> {
    for s in img.snaps().map_err(ceph_error)? {
        if let SnapNamespace::Group { group: g, snap } =
            img.snap_namespace(s.id).map_err(ceph_error)?
        {
            if g == group.group_name() && snap == group.snap_name() {
                return Ok(Some(s));
            }
        }
    }
    Ok(None)
}

/// Which nodes a volume is published to, and how: an object of its own
/// rather than image metadata, because changing an image's metadata goes
/// through its exclusive lock's owner, and the owner of a volume being
/// moved is often a dead node (the change would wait out its watch).
fn publish_record(image: &str) -> String {
    format!("ferrovol.published.{image}")
}

fn published(pool: &Pool, image: &str) -> Result<BTreeMap<String, String>> {
    match pool
        .read_object(&publish_record(image))
        .map_err(ceph_error)?
        .map(|b| String::from_utf8_lossy(&b).into_owned())
    {
        None => Ok(BTreeMap::new()),
        Some(json) => serde_json::from_str(&json)
            .map_err(|e| error::internal(format!("the image's publish record is unreadable: {e}"))),
    }
}

fn mode_name(mode: AccessMode, read_only: bool) -> String {
    format!("{}{}", mode.as_str_name(), if read_only { ",ro" } else { "" })
}

/// Describes a committed volume (None: the image is half made).
fn describe(pool: &Pool, image: &str) -> Result<Option<Volume>> {
    let img = pool.open_read_only(image).map_err(|e| {
        not_found_or(e, || format!("volume {}:{image} does not exist", pool.name()))
    })?;
    let Some(name) = img.metadata(META_NAME).map_err(ceph_error)? else {
        return Ok(None);
    };
    let id = VolumeId { pool: pool.name().into(), image: image.into() }.render();
    let source = img.metadata(META_SOURCE).map_err(ceph_error)?.and_then(|s| {
        if let Some(rest) = s.strip_prefix("snapshot:") {
            Some(ContentSource::Snapshot(rest.into()))
        } else {
            s.strip_prefix("volume:").map(|rest| ContentSource::Volume(rest.into()))
        }
    });
    let access = match img.metadata(META_ACCESS).map_err(ceph_error)?.as_deref() {
        Some("block") => AccessType::Block,
        Some(other) => {
            AccessType::Mount { fs_type: other.strip_prefix("mount:").unwrap_or("").into() }
        }
        None => AccessType::Mount { fs_type: String::new() },
    };
    let context = match img.metadata(META_CONTEXT).map_err(ceph_error)? {
        Some(json) => serde_json::from_str(&json).unwrap_or_default(),
        None => BTreeMap::new(),
    };
    Ok(Some(Volume {
        id,
        name,
        capacity: img.size().map_err(ceph_error)?,
        source,
        access,
        parameters: BTreeMap::new(),
        context,
        accessible: vec![],
        published_nodes: published(pool, image)?.into_keys().collect(),
        created: img.created().map_err(ceph_error)?,
    }))
}

/// Removes, for good, an image nobody needs any more (a hidden or trashed
/// image without snapshots), and then its parent if that frees it too.
fn settle(pool: &Pool, image_id: &str) -> Result<()> {
    let mut id = image_id.to_string();
    loop {
        let img = match pool.open_by_id_read_only(&id) {
            Ok(i) => i,
            Err(e) if e.is(libc::ENOENT) => return Ok(()),
            Err(e) => return Err(ceph_error(e)),
        };
        let name = img.name().map_err(ceph_error)?;
        let snaps = img.snaps().map_err(ceph_error)?;
        let mut only_trash = true;
        for s in &snaps {
            if img.snap_namespace(s.id).map_err(ceph_error)? != SnapNamespace::Trash {
                only_trash = false;
            }
        }
        let parent = img.parent().map_err(ceph_error)?;
        drop(img);
        let in_trash = pool.trash_list().map_err(ceph_error)?.iter().any(|t| t.id == id);
        let removed = if in_trash {
            snaps.is_empty() && ignore_busy(pool.trash_remove(&id))?
        } else if name.starts_with(ids::DELETED_PREFIX) {
            if snaps.is_empty() {
                ignore_busy(pool.remove_image(&name))?
            } else {
                if only_trash {
                    ignore_busy(pool.trash_move(&name))?;
                }
                false
            }
        } else {
            false
        };
        match parent {
            Some(p) if removed && p.pool == pool.name() => id = p.image_id,
            _ => return Ok(()),
        }
    }
}

/// Whether a clean-up step happened; one that must wait (still open,
/// still has snapshots, already gone) is not an error.
fn ignore_busy(r: ceph::Result<()>) -> Result<bool> {
    match r {
        Ok(()) => Ok(true),
        Err(e) if e.is(libc::EBUSY) || e.is(libc::ENOTEMPTY) || e.is(libc::ENOENT) => Ok(false),
        Err(e) => Err(ceph_error(e)),
    }
}

fn snapshot_of(
    pool: &Pool,
    img: &Image,
    id: &SnapshotId,
    snap: &ceph::Snap,
    group: Option<&GroupId>,
) -> Result<Snapshot> {
    let source = img.metadata(META_VOLUME).map_err(ceph_error)?.unwrap_or_else(|| {
        VolumeId { pool: pool.name().into(), image: img.name().unwrap_or_default() }.render()
    });
    Ok(Snapshot {
        id: id.render(),
        name: String::new(),
        source_volume: source,
        size: snap.size,
        created: img.snap_created(snap.id).map_err(ceph_error)?,
        ready: true,
        group_id: group.map(GroupId::render),
    })
}

/// Every snapshot of ours on one image (user snapshots and group members).
fn image_snapshots(pool: &Pool, image_id: &str) -> Result<Vec<Snapshot>> {
    let img = match pool.open_by_id_read_only(image_id) {
        Ok(i) => i,
        Err(e) if e.is(libc::ENOENT) => return Ok(vec![]),
        Err(e) => return Err(ceph_error(e)),
    };
    let mut out = vec![];
    for s in img.snaps().map_err(ceph_error)? {
        match img.snap_namespace(s.id).map_err(ceph_error)? {
            SnapNamespace::User => {
                if let Some(hash) = s.name.strip_prefix(ids::SNAP_PREFIX) {
                    let id = SnapshotId {
                        pool: pool.name().into(),
                        image_id: image_id.into(),
                        hash: hash.into(),
                        member: false,
                    };
                    if SnapshotId::parse(&id.render()).is_some() {
                        out.push(snapshot_of(pool, &img, &id, &s, None)?);
                    }
                }
            }
            SnapNamespace::Group { group, snap } => {
                if let Some(hash) = group.strip_prefix(ids::GROUP_PREFIX).filter(|h| *h == snap) {
                    let gid = GroupId { pool: pool.name().into(), hash: hash.into() };
                    let id = SnapshotId {
                        pool: pool.name().into(),
                        image_id: image_id.into(),
                        hash: hash.into(),
                        member: true,
                    };
                    if GroupId::parse(&gid.render()).is_some() {
                        out.push(snapshot_of(pool, &img, &id, &s, Some(&gid))?);
                    }
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

/// A group's record: its members' volume IDs and image ids, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
struct GroupRecord {
    members: Vec<(String, String)>,
}

impl GroupRecord {
    fn encode(&self) -> Vec<u8> {
        let list: Vec<serde_json::Value> = self
            .members
            .iter()
            .map(|(v, i)| serde_json::json!({"volume": v, "image": i}))
            .collect();
        serde_json::Value::Array(list).to_string().into_bytes()
    }

    fn decode(bytes: &[u8]) -> Result<GroupRecord> {
        let bad = || error::internal("a group snapshot record is unreadable");
        let v: serde_json::Value = serde_json::from_slice(bytes).map_err(|_| bad())?;
        let members = v
            .as_array()
            .ok_or_else(bad)?
            .iter()
            .map(|m| Some((m["volume"].as_str()?.to_string(), m["image"].as_str()?.to_string())))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(bad)?;
        Ok(GroupRecord { members })
    }

    fn volumes(&self) -> Vec<&str> {
        self.members.iter().map(|(v, _)| v.as_str()).collect()
    }
}

fn read_group(pool: &Pool, gid: &GroupId) -> Result<Option<GroupRecord>> {
    pool.read_object(&gid.record())
        .map_err(ceph_error)?
        .map(|b| GroupRecord::decode(&b))
        .transpose()
}

fn group_of(pool: &Pool, gid: &GroupId, record: &GroupRecord) -> Result<GroupSnapshot> {
    let mut snapshots = Vec::with_capacity(record.members.len());
    let mut created = SystemTime::UNIX_EPOCH;
    for (volume, image_id) in &record.members {
        let img = pool.open_by_id_read_only(image_id).map_err(|e| {
            not_found_or(e, || {
                format!("group snapshot {}: member image of {volume} is gone", gid.render())
            })
        })?;
        let snap = find_member(&img, gid)?.ok_or_else(|| {
            error::not_found(format!("group snapshot {} does not exist", gid.render()))
        })?;
        let id = SnapshotId {
            pool: pool.name().into(),
            image_id: image_id.clone(),
            hash: gid.hash.clone(),
            member: true,
        };
        let s = snapshot_of(pool, &img, &id, &snap, Some(gid))?;
        created = created.max(s.created);
        snapshots.push(s);
    }
    Ok(GroupSnapshot { id: gid.render(), name: String::new(), snapshots, created, ready: true })
}

fn merge(ranges: &mut Vec<Range>, off: u64, len: u64) {
    if let Some(last) = ranges.last_mut() {
        if last.0 + last.1 == off {
            last.1 += len;
            return;
        }
    }
    ranges.push((off, len));
}

/// Opens an image at one of its snapshots for reading.
fn open_at(pool: &Pool, id: &SnapshotId) -> Result<(Image, ceph::Snap)> {
    let text = || format!("snapshot {} does not exist", id.render());
    let missing = || error::not_found(text());
    let img = pool.open_by_id_read_only(&id.image_id).map_err(|e| not_found_or(e, text))?;
    let snap = if id.member {
        find_member(&img, &GroupId { pool: id.pool.clone(), hash: id.hash.clone() })?
    } else {
        find_snap(&img, &id.snap_name())?
    }
    .ok_or_else(missing)?;
    img.set_snap_id(snap.id).map_err(ceph_error)?;
    Ok((img, snap))
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
        let pool = self.pool(&p.pool, &req.secrets).await.map_err(|e| match e {
            error::Error::NotFound(m) => error::invalid(format!("{m} (the StorageClass names it)")),
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
            blocking(move || create(&pool2, &image2, &req, &p, origin, size)).await?;
        if depth > max_depth {
            self.flatten_later(pool, image);
        }
        Ok(volume)
    }

    async fn delete_volume(&self, id: &str, secrets: &Secrets) -> Result<()> {
        let Some(v) = VolumeId::parse(id) else { return Ok(()) };
        let Some(pool) = self.pool_of(&v.pool, secrets).await? else { return Ok(()) };
        blocking(move || delete(&pool, &v.image)).await
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
                Err(error::Error::NotFound(m)) => Ok(Condition::Abnormal(m)),
                Err(e) => Err(e),
            });
        }
        Ok(out)
    }

    async fn list_volumes(&self, token: Option<&str>, max: usize) -> Result<Page<Volume>> {
        let start = match token {
            None => None,
            Some(t) => Some(
                VolumeId::parse(t).filter(|v| self.settings.pools.contains(&v.pool)).ok_or_else(
                    || error::aborted("starting_token is not one this driver issued"),
                )?,
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
                        Ok(None) | Err(error::Error::NotFound(_)) => {}
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
        let next = if items.len() > max {
            items.truncate(max);
            items.last().map(|v| v.id.clone())
        } else {
            None
        };
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
    ) -> Result<u64> {
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
    }

    async fn publish(&self, request: &Publish) -> Result<engine::Context> {
        let id = request.volume_id.clone();
        let missing = || error::not_found(format!("volume {id} does not exist"));
        let v = VolumeId::parse(&id).ok_or_else(missing)?;
        let pool = self.pool_of(&v.pool, &request.secrets).await?.ok_or_else(missing)?;
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
                    return Err(error::already_exists(format!(
                        "volume {id} is published to {node} as {have}, not {wanted}"
                    )));
                }
            } else {
                let others: Vec<&String> = records.keys().collect();
                let exclusive_there = records.values().any(|m| {
                    AccessMode::from_str_name(m.trim_end_matches(",ro")).is_some_and(is_single_node)
                });
                if !others.is_empty() && (is_single_node(mode) || exclusive_there) {
                    return Err(error::failed_precondition(format!(
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
            return Err(error::failed_precondition(format!(
                "snapshot {id} is a member of group snapshot {group}: delete the group snapshot"
            )));
        }
        let Some(pool) = self.pool_of(&s.pool, secrets).await? else { return Ok(()) };
        blocking(move || {
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
        .await
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
                Err(error::Error::NotFound(_)) => vec![],
                Err(e) => return Err(e),
            }
        } else if let Some(source) = &filter.source_volume {
            match VolumeId::parse(source) {
                None => vec![],
                Some(v) => match self.pool_of(&v.pool, &Secrets::default()).await? {
                    None => vec![],
                    Some(pool) => {
                        blocking(move || {
                            let id = match pool.open_read_only(&v.image) {
                                Ok(img) => img.id().map_err(ceph_error)?,
                                Err(e) if e.is(libc::ENOENT) => return Ok(vec![]),
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
                        let mut snaps = vec![];
                        for (id, n) in pool.list_images().map_err(ceph_error)? {
                            if is_volume_name(&n) || n.starts_with(ids::DELETED_PREFIX) {
                                snaps.extend(image_snapshots(&pool, &id)?);
                            }
                        }
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
                return Err(error::aborted("starting_token is not one this driver issued"));
            }
            all.drain(..pos.unwrap_or(all.len()));
        }
        let next = if all.len() > max {
            all.truncate(max);
            all.last().map(|s| s.id.clone())
        } else {
            None
        };
        Ok(Page { items: all, next })
    }

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
        blocking(move || {
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
        .await
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

    async fn allocated_ranges(&self, snapshot_id: &str) -> Result<(u64, Vec<Range>)> {
        let missing = || error::not_found(format!("snapshot {snapshot_id} does not exist"));
        let s = SnapshotId::parse(snapshot_id).ok_or_else(missing)?;
        let pool = self.pool_of(&s.pool, &Secrets::default()).await?.ok_or_else(missing)?;
        blocking(move || {
            let (img, snap) = open_at(&pool, &s)?;
            let mut ranges = vec![];
            img.diff(None, snap.size, &mut |off, len, exists| {
                if exists {
                    merge(&mut ranges, off, len)
                }
            })
            .map_err(ceph_error)?;
            Ok((snap.size, ranges))
        })
        .await
    }

    async fn changed_ranges(&self, base: &str, target: &str) -> Result<(u64, Vec<Range>)> {
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
            return Err(error::failed_precondition(format!(
                "snapshot {base} is a group snapshot member: librbd diffs only from user \
                 snapshots, so changed blocks cannot be listed from it (use a volume snapshot \
                 as the base, or list the target's allocated blocks)"
            )));
        }
        let pool = self
            .pool_of(&t.pool, &Secrets::default())
            .await?
            .ok_or_else(|| error::not_found(format!("snapshot {target} does not exist")))?;
        blocking(move || {
            let img = pool.open_by_id_read_only(&b.image_id).map_err(|e| {
                not_found_or(e, || format!("snapshot {} does not exist", b.render()))
            })?;
            if find_snap(&img, &b.snap_name())?.is_none() {
                return Err(error::not_found(format!("snapshot {} does not exist", b.render())));
            }
            drop(img);
            let (img, snap) = open_at(&pool, &t)?;
            let mut ranges = vec![];
            img.diff(Some(&b.snap_name()), snap.size, &mut |off, len, _| {
                merge(&mut ranges, off, len)
            })
            .map_err(ceph_error)?;
            Ok((snap.size, ranges))
        })
        .await
    }
}

/// Any image name of ours that is a volume (a prefix and 32 hex digits).
fn is_volume_name(name: &str) -> bool {
    !name.starts_with(ids::DELETED_PREFIX)
        && name.len() > 32
        && name.is_char_boundary(name.len() - 32)
        && ids::is_volume_image(name, &name[..name.len() - 32])
}

/// Records a name as taken by `value` (an object created exclusively),
/// or checks that it already is.
fn claim(pool: &Pool, oid: &str, value: &[u8], taken: impl Fn() -> String) -> Result<()> {
    loop {
        match pool.read_object(oid).map_err(ceph_error)? {
            Some(v) if v == value => return Ok(()),
            Some(_) => return Err(error::already_exists(taken())),
            None => match pool.create_object(oid, value) {
                Ok(()) => return Ok(()),
                // Someone claimed it between the read and the create.
                Err(e) if e.is(libc::EEXIST) => continue,
                Err(e) => return Err(ceph_error(e)),
            },
        }
    }
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
                    let parent_name = img.name().map_err(ceph_error)?;
                    Ok(if s.member {
                        Origin::Member {
                            parent_id: s.image_id.clone(),
                            parent_name,
                            snap_id: snap.id,
                            size: snap.size,
                            parent,
                        }
                    } else {
                        let depth = depth_of(&img);
                        Origin::Snapshot {
                            parent_name,
                            snap: s.snap_name(),
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
            let out =
                cluster.mon_command(r#"{"prefix":"df","format":"json"}"#).map_err(ceph_error)?;
            let v: serde_json::Value = serde_json::from_str(&out)
                .map_err(|e| error::internal(format!("ceph df answered {e}")))?;
            let total = v["stats"]["total_bytes"].as_u64().unwrap_or(0);
            if total == 0 {
                return Err(error::unavailable(
                    "the cluster's capacity is unknown: no ceph-mgr reports usage yet",
                ));
            }
            let avail = pool
                .and_then(|p| {
                    v["pools"].as_array()?.iter().find(|e| e["name"] == p.as_str())?["stats"]
                        ["max_avail"]
                        .as_u64()
                })
                .unwrap_or_else(|| v["stats"]["total_avail_bytes"].as_u64().unwrap_or(0));
            Ok((total, avail))
        })
        .await
    }
}

fn source_record(source: Option<&ContentSource>) -> String {
    match source {
        None => String::new(),
        Some(ContentSource::Snapshot(s)) => format!("snapshot:{s}"),
        Some(ContentSource::Volume(v)) => format!("volume:{v}"),
    }
}

/// The blocking body of CreateVolume: adopt, make or finish the image.
fn create(
    pool: &Pool,
    image: &str,
    req: &NewVolume,
    p: &Parameters,
    origin: Origin,
    size: u64,
) -> Result<(Volume, u32)> {
    let id = VolumeId { pool: pool.name().into(), image: image.into() }.render();
    let source = source_record(req.source.as_ref());
    // A committed image of this name answers the request if it fits it.
    match pool.open_read_only(image) {
        Ok(img) => {
            if let Some(name) = img.metadata(META_NAME).map_err(ceph_error)? {
                let existing_source =
                    img.metadata(META_SOURCE).map_err(ceph_error)?.unwrap_or_default();
                let capacity = img.size().map_err(ceph_error)?;
                let fits = capacity >= req.required_bytes
                    && (req.limit_bytes == 0 || capacity <= req.limit_bytes);
                if name != req.name || existing_source != source || !fits {
                    return Err(error::already_exists(format!(
                        "volume {} exists with a different size or source",
                        req.name
                    )));
                }
                drop(img);
                let volume = describe(pool, image)?
                    .ok_or_else(|| error::internal("a committed volume lost its name"))?;
                return Ok((volume, 0));
            }
        }
        Err(e) if e.is(libc::ENOENT) => {}
        Err(e) => return Err(ceph_error(e)),
    }
    let options = ImageOptions { features: p.features, data_pool: p.data_pool.clone() };
    let made = |r: ceph::Result<()>| match r {
        // A half-made image from an earlier attempt: finish it.
        Err(e) if e.is(libc::EEXIST) => Ok(()),
        r => r.map_err(ceph_error),
    };
    let depth = match &origin {
        Origin::Empty => {
            made(pool.create_image(image, size, &options))?;
            0
        }
        Origin::Snapshot { parent, parent_name, snap, depth, .. } => {
            made(parent.clone_image(parent_name, snap, pool, image, &options))?;
            depth + 1
        }
        Origin::Volume { parent, parent_name, depth, .. } => {
            let snap = format!("{}{}", ids::CLONE_SNAP_PREFIX, ids::hash(&req.name));
            if pool.open_read_only(image).is_err() {
                let src = parent.open(parent_name).map_err(|e| {
                    not_found_or(e, || format!("source volume {parent_name} does not exist"))
                })?;
                match src.snap_create(&snap) {
                    Err(e) if !e.is(libc::EEXIST) => return Err(ceph_error(e)),
                    _ => {}
                }
                drop(src);
                made(parent.clone_image(parent_name, &snap, pool, image, &options))?;
            }
            // The clone keeps what it needs (format 2 moves the snapshot to
            // the trash namespace until the clone stands alone).
            if let Ok(src) = parent.open(parent_name) {
                match src.snap_remove(&snap) {
                    Err(e) if !e.is(libc::ENOENT) => return Err(ceph_error(e)),
                    _ => {}
                }
            }
            depth + 1
        }
        Origin::Member { parent, parent_id, parent_name, snap_id, .. } => {
            match parent.clone_image_by_snap_id(parent_name, *snap_id, pool, image, &options) {
                Some(r) => {
                    made(r)?;
                    1
                }
                None => {
                    // Before Squid a group member cannot be cloned: copy it.
                    if pool.open_read_only(image).is_err() {
                        let src = parent.open_by_id_read_only(parent_id).map_err(ceph_error)?;
                        src.set_snap_id(*snap_id).map_err(ceph_error)?;
                        let started = Instant::now();
                        made(src.copy_to(pool, image, &options))?;
                        tracing::info!(
                            image,
                            bytes = src.size().unwrap_or(0),
                            ms = started.elapsed().as_millis() as u64,
                            "restored a group snapshot member by a full copy (librbd before \
                             Squid cannot clone it)"
                        );
                    }
                    0
                }
            }
        }
    };
    let img = pool.open(image).map_err(ceph_error)?;
    if img.size().map_err(ceph_error)? < size {
        img.resize(size).map_err(ceph_error)?;
    }
    let access = match &req.access {
        AccessType::Block => "block".to_string(),
        AccessType::Mount { fs_type } => format!("mount:{fs_type}"),
    };
    let mut context = BTreeMap::from([
        ("pool".to_string(), p.pool.clone()),
        ("imageName".to_string(), image.to_string()),
        ("imageFeatures".to_string(), p.feature_names.clone()),
    ]);
    if let Some(c) = &p.cluster_id {
        context.insert("clusterID".into(), c.clone());
    }
    if let Some(m) = &p.mounter {
        context.insert("mounter".into(), m.clone());
    }
    for (k, v) in [
        (META_DEPTH, depth.to_string()),
        (META_SOURCE, source),
        (META_ACCESS, access),
        (META_VOLUME, id.clone()),
        (META_CONTEXT, serde_json::to_string(&context).expect("a map of strings")),
        // Last: the name commits the volume.
        (META_NAME, req.name.clone()),
    ] {
        img.set_metadata(k, &v).map_err(ceph_error)?;
    }
    drop(img);
    let volume = describe(pool, image)?
        .ok_or_else(|| error::internal("a committed volume lost its name"))?;
    Ok((volume, depth))
}

/// The blocking body of DeleteVolume.
fn delete(pool: &Pool, image: &str) -> Result<()> {
    let record = publish_record(image);
    let parent = match pool.open_read_only(image) {
        Ok(img) => img.parent().map_err(ceph_error)?,
        Err(e) if e.is(libc::ENOENT) => return pool.remove_object(&record).map_err(ceph_error),
        Err(e) => return Err(ceph_error(e)),
    };
    match pool.remove_image(image) {
        Ok(()) => {}
        Err(e) if e.is(libc::ENOENT) => return pool.remove_object(&record).map_err(ceph_error),
        Err(e) if e.is(libc::EBUSY) => {
            return Err(error::failed_precondition(format!(
                "volume {}:{image} is still open on a node (it has watchers): unstage it first",
                pool.name()
            )))
        }
        Err(e) if e.is(libc::ENOTEMPTY) => {
            hide(pool, image)?;
            return pool.remove_object(&record).map_err(ceph_error);
        }
        Err(e) => return Err(ceph_error(e)),
    }
    pool.remove_object(&record).map_err(ceph_error)?;
    if let Some(p) = parent.filter(|p| p.pool == pool.name()) {
        settle(pool, &p.image_id)?;
    }
    Ok(())
}

/// A deleted volume whose snapshots live on: its image leaves the volume
/// namespace (hidden by name, or to the trash when only clones need it).
fn hide(pool: &Pool, image: &str) -> Result<()> {
    let img = pool.open_read_only(image).map_err(ceph_error)?;
    if !img.watchers().map_err(ceph_error)?.is_empty() {
        return Err(error::failed_precondition(format!(
            "volume {}:{image} is still open on a node (it has watchers): unstage it first",
            pool.name()
        )));
    }
    let id = img.id().map_err(ceph_error)?;
    let mut user_visible = false;
    for s in img.snaps().map_err(ceph_error)? {
        if img.snap_namespace(s.id).map_err(ceph_error)? != SnapNamespace::Trash {
            user_visible = true;
        }
    }
    drop(img);
    if user_visible {
        pool.rename_image(image, &format!("{}{id}", ids::DELETED_PREFIX)).map_err(ceph_error)
    } else {
        pool.trash_move(image).map_err(ceph_error)
    }
}

/// The blocking body of CreateVolumeGroupSnapshot.
fn create_group(
    pool: &Pool,
    gid: &GroupId,
    name: &str,
    volumes: &[VolumeId],
) -> Result<(GroupSnapshot, Duration)> {
    let mut members = vec![];
    let mut images = vec![];
    for v in volumes {
        let img = pool
            .open_read_only(&v.image)
            .map_err(|e| not_found_or(e, || format!("volume {} does not exist", v.render())))?;
        let mapped = !img.watchers().map_err(ceph_error)?.is_empty();
        if mapped && img.features().map_err(ceph_error)? & ceph::FEATURE_EXCLUSIVE_LOCK == 0 {
            return Err(error::failed_precondition(format!(
                "volume {} is in use and lacks the exclusive-lock feature, so its writers \
                 cannot be paused for the group's instant (imageFeatures: layering,exclusive-lock)",
                v.render()
            )));
        }
        let id = img.id().map_err(ceph_error)?;
        members.push((v.render(), id.clone()));
        images.push((v.image.clone(), id, img.group().map_err(ceph_error)?));
    }
    let mut record = GroupRecord { members };
    record.members.sort();
    match read_group(pool, gid)? {
        Some(existing) if existing.volumes() != record.volumes() => {
            return Err(error::already_exists(format!(
                "group snapshot {name:?} exists with other volumes"
            )))
        }
        Some(_) => {}
        None => claim(pool, &gid.record(), &record.encode(), || {
            format!("group snapshot {name:?} exists with other volumes")
        })?,
    }
    let group = gid.group_name();
    let snaps = pool.group_snaps(&group);
    let done = match &snaps {
        Ok(list) => list.iter().any(|s| s.name == gid.snap_name() && s.complete),
        Err(e) if e.is(libc::ENOENT) => false,
        Err(e) => return Err(ceph_error(e.clone())),
    };
    let mut window = Duration::ZERO;
    if !done {
        match pool.group_create(&group) {
            Err(e) if !e.is(libc::EEXIST) => return Err(ceph_error(e)),
            _ => {}
        }
        if snaps.is_ok_and(|l| l.iter().any(|s| s.name == gid.snap_name())) {
            // An incomplete snapshot from a crashed attempt: take it anew.
            pool.group_snap_remove(&group, gid.snap_name()).map_err(ceph_error)?;
        }
        for (image, id, current) in &images {
            match current {
                Some((_, g)) if *g == group => continue,
                // An image belongs to one group at a time; an earlier group
                // snapshot's group only needs it while snapshotting.
                Some((_, g)) => match pool.group_remove_image(g, pool, id) {
                    Err(e) if !e.is(libc::ENOENT) => return Err(ceph_error(e)),
                    _ => {}
                },
                None => {}
            }
            match pool.group_add(&group, pool, image) {
                Err(e) if !e.is(libc::EEXIST) => return Err(ceph_error(e)),
                _ => {}
            }
        }
        let started = Instant::now();
        pool.group_snap_create(&group, gid.snap_name()).map_err(ceph_error)?;
        window = started.elapsed();
    }
    // Members leave the group so they can join another group's snapshot;
    // their snapshots stay, and the group snapshot still removes them.
    for (_, id, _) in &images {
        match pool.group_remove_image(&group, pool, id) {
            Err(e) if !e.is(libc::ENOENT) => return Err(ceph_error(e)),
            _ => {}
        }
    }
    Ok((group_of(pool, gid, &record)?, window))
}
