//! Volumes as images: making, adopting, describing and deleting them.
//!
//! A volume's image is named by its request (prefix + hash), and carries
//! our attributes in one metadata key written last: an image without it is
//! half made, and the retry finishes it.
//!
//! DeleteVolume moves the image to the RBD trash (one cheap call) and the
//! engine's purger removes it for good at once in the background: removing
//! an image's data takes librbd 40–80 ms however little it holds, and is
//! nobody's to wait for. An image whose snapshots live on stays in the
//! trash until the last of them is deleted (see [`settle`]); a restore from
//! such a snapshot brings the image back under a hidden name
//! (`csi-deleted-<id>`), since librbd clones only from images it can name.

use std::collections::BTreeMap;
use std::time::{Instant, SystemTime};

use ferrovol_ceph::{self as ceph, CephError, Image, ImageOptions, Pool, SnapNamespace};
use ferrovol_core::engine::{AccessType, ContentSource, NewVolume, Volume};

use crate::ceph_error;
use crate::error::{self, Result};
use crate::ids::{self, VolumeId};
use crate::params::Parameters;

/// The one image metadata key our attributes live in.
const META: &str = "ferrovol";

/// Sizes are whole MiB (librbd takes any byte size; the kernel's block
/// layer and every filesystem are happier with round ones).
pub const GRANULARITY: u64 = 1 << 20;

pub const MAXIMUM_VOLUME: u64 = 1 << 50;

/// What we know of a volume beyond its image: written once, last.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Attributes {
    /// The CO's request name (commits the volume).
    pub name: String,
    pub volume_id: String,
    /// `snapshot:<id>`, `volume:<id>` or empty.
    pub source: String,
    /// Clones between this image and an image that stands alone.
    pub depth: u32,
    /// `block` or `mount:<fs>`.
    pub access: String,
    pub context: BTreeMap<String, String>,
    /// The class's parameters ([`crate::params::Parameters::fingerprint`]);
    /// empty on images made before it was kept.
    pub params: String,
}

impl Attributes {
    fn encode(&self) -> String {
        serde_json::json!({
            "name": self.name,
            "volume": self.volume_id,
            "source": self.source,
            "depth": self.depth,
            "access": self.access,
            "context": self.context,
            "params": self.params,
        })
        .to_string()
    }

    fn decode(text: &str) -> Option<Attributes> {
        let v: serde_json::Value = serde_json::from_str(text).ok()?;
        Some(Attributes {
            name: v["name"].as_str()?.to_string(),
            volume_id: v["volume"].as_str()?.to_string(),
            source: v["source"].as_str().unwrap_or_default().to_string(),
            depth: v["depth"].as_u64().unwrap_or(0) as u32,
            access: v["access"].as_str().unwrap_or_default().to_string(),
            context: v["context"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                        .collect()
                })
                .unwrap_or_default(),
            params: v["params"].as_str().unwrap_or_default().to_string(),
        })
    }

    pub fn read(img: &Image) -> Result<Option<Attributes>> {
        Ok(img.metadata(META).map_err(ceph_error)?.as_deref().and_then(Attributes::decode))
    }

    fn source(&self) -> Option<ContentSource> {
        if let Some(rest) = self.source.strip_prefix("snapshot:") {
            Some(ContentSource::Snapshot(rest.into()))
        } else {
            self.source.strip_prefix("volume:").map(|rest| ContentSource::Volume(rest.into()))
        }
    }

    fn volume(&self, capacity: u64, created: SystemTime, published_nodes: Vec<String>) -> Volume {
        let access = match self.access.strip_prefix("mount:") {
            _ if self.access == "block" => AccessType::Block,
            Some(fs) => AccessType::Mount { fs_type: fs.into() },
            None => AccessType::Mount { fs_type: String::new() },
        };
        Volume {
            id: self.volume_id.clone(),
            name: self.name.clone(),
            capacity,
            source: self.source(),
            access,
            parameters: BTreeMap::new(),
            context: self.context.clone(),
            accessible: vec![],
            published_nodes,
            created,
        }
    }
}

/// Where a new volume's data comes from, resolved.
pub enum Origin {
    Empty,
    /// A user snapshot: cloned copy-on-write.
    Snapshot {
        parent: Pool,
        parent_id: String,
        /// The parent's name when the snapshot was found (a deleted
        /// volume's image is in the trash, and has none to clone from).
        parent_name: String,
        snap: String,
        size: u64,
        depth: u32,
    },
    /// A group member: cloned by snapshot id where librbd can, else copied.
    Member {
        parent: Pool,
        parent_id: String,
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
    pub fn size(&self) -> u64 {
        match self {
            Origin::Empty => 0,
            Origin::Snapshot { size, .. }
            | Origin::Member { size, .. }
            | Origin::Volume { size, .. } => *size,
        }
    }
}

pub fn not_found_or(e: CephError, what: impl FnOnce() -> String) -> error::Error {
    if e.is(libc::ENOENT) {
        error::not_found(what())
    } else {
        ceph_error(e)
    }
}

pub fn depth_of(img: &Image) -> u32 {
    Attributes::read(img).ok().flatten().map_or(0, |a| a.depth)
}

/// Which nodes a volume is published to, and how: an object of its own
/// rather than image metadata, because changing an image's metadata goes
/// through its exclusive lock's owner, and the owner of a volume being
/// moved is often a dead node (the change would wait out its watch).
pub fn publish_record(image: &str) -> String {
    format!("ferrovol.published.{image}")
}

pub fn published(pool: &Pool, image: &str) -> Result<BTreeMap<String, String>> {
    match pool.read_object(&publish_record(image)).map_err(ceph_error)? {
        None => Ok(BTreeMap::new()),
        Some(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
            error::internal(format!("the publish record of {image} is unreadable: {e}"))
        }),
    }
}

/// Describes a committed volume (None: the image is half made).
pub fn describe(pool: &Pool, image: &str) -> Result<Option<Volume>> {
    let img = pool.open_read_only(image).map_err(|e| {
        not_found_or(e, || format!("volume {}:{image} does not exist", pool.name()))
    })?;
    let Some(attrs) = Attributes::read(&img)? else { return Ok(None) };
    let (capacity, created) = (img.size().map_err(ceph_error)?, img.created().map_err(ceph_error)?);
    drop(img);
    Ok(Some(attrs.volume(capacity, created, published(pool, image)?.into_keys().collect())))
}

/// Any image name of ours that is a volume (a prefix and 32 hex digits).
pub fn is_volume_name(name: &str) -> bool {
    !name.starts_with(ids::DELETED_PREFIX)
        && name.len() > 32
        && name.is_char_boundary(name.len() - 32)
        && ids::is_volume_image(name, &name[..name.len() - 32])
}

fn source_record(source: Option<&ContentSource>) -> String {
    match source {
        None => String::new(),
        Some(ContentSource::Snapshot(s)) => format!("snapshot:{s}"),
        Some(ContentSource::Volume(v)) => format!("volume:{v}"),
    }
}

/// The name a (possibly trashed) parent can be cloned from: a trashed
/// image comes back into the directory under a hidden name.
fn nameable(pool: &Pool, image_id: &str) -> Result<String> {
    let name = pool.open_by_id_read_only(image_id).and_then(|i| i.name()).map_err(ceph_error)?;
    if pool.open_read_only(&name).and_then(|i| i.id()).ok().as_deref() == Some(image_id) {
        return Ok(name);
    }
    let hidden = format!("{}{image_id}", ids::DELETED_PREFIX);
    match pool.trash_restore(image_id, &hidden) {
        Ok(()) => Ok(hidden),
        // Another restore brought it back first.
        Err(_) if pool.open_read_only(&hidden).is_ok() => Ok(hidden),
        Err(e) => Err(ceph_error(e)),
    }
}

/// Makes the image from its origin; false when an image of this name
/// already exists (a retry, or a crash after the make).
fn make(
    pool: &Pool,
    image: &str,
    req: &NewVolume,
    origin: &Origin,
    options: &ImageOptions,
    size: u64,
) -> Result<(bool, u32)> {
    let made = |r: ceph::Result<()>| match r {
        Ok(()) => Ok(true),
        Err(e) if e.is(libc::EEXIST) => Ok(false),
        Err(e) => Err(ceph_error(e)),
    };
    Ok(match origin {
        Origin::Empty => (made(pool.create_image(image, size, options))?, 0),
        Origin::Snapshot { parent, parent_id, parent_name, snap, depth, .. } => {
            let clone = |name: &str| parent.clone_image(name, snap, pool, image, options);
            let r = match clone(parent_name) {
                // Not in the directory: the volume was deleted (its image
                // waits in the trash for its snapshots to go).
                Err(e) if e.is(libc::ENOENT) => clone(&nameable(parent, parent_id)?),
                r => r,
            };
            (made(r)?, depth + 1)
        }
        Origin::Volume { parent, parent_name, depth, .. } => {
            let snap = format!("{}{}", ids::CLONE_SNAP_PREFIX, ids::hash(&req.name));
            let src = parent.open(parent_name).map_err(|e| {
                not_found_or(e, || format!("source volume {parent_name} does not exist"))
            })?;
            let made = match pool.open_read_only(image) {
                Ok(_) => false,
                Err(_) => {
                    match src.snap_create(&snap) {
                        Err(e) if !e.is(libc::EEXIST) => return Err(ceph_error(e)),
                        _ => {}
                    }
                    made(parent.clone_image(parent_name, &snap, pool, image, options))?
                }
            };
            // The clone keeps what it needs (format 2 moves the snapshot to
            // the trash namespace until the clone stands alone).
            match src.snap_remove(&snap) {
                Err(e) if !e.is(libc::ENOENT) => return Err(ceph_error(e)),
                _ => {}
            }
            (made, depth + 1)
        }
        Origin::Member { parent, parent_id, snap_id, .. } => {
            let parent_name = nameable(parent, parent_id)?;
            match parent.clone_image_by_snap_id(&parent_name, *snap_id, pool, image, options) {
                Some(r) => (made(r)?, 1),
                None => {
                    // Before Squid a group member cannot be cloned: copy it.
                    let src = parent.open_by_id_read_only(parent_id).map_err(ceph_error)?;
                    src.set_snap_id(*snap_id).map_err(ceph_error)?;
                    let started = Instant::now();
                    let fresh = made(src.copy_to(pool, image, options))?;
                    tracing::info!(
                        image,
                        ms = started.elapsed().as_millis() as u64,
                        "restored a group snapshot member by a full copy (librbd before Squid \
                         cannot clone it)"
                    );
                    (fresh, 0)
                }
            }
        }
    })
}

/// The blocking body of CreateVolume: make, adopt or finish the image.
/// Answers the volume and its clone depth.
pub fn create(
    pool: &Pool,
    image: &str,
    req: &NewVolume,
    p: &Parameters,
    origin: Origin,
    size: u64,
) -> Result<(Volume, u32)> {
    let id = VolumeId { pool: pool.name().into(), image: image.into() }.render();
    let source = source_record(req.source.as_ref());
    let options = ImageOptions { features: p.features, data_pool: p.data_pool.clone() };
    let (fresh, depth) = make(pool, image, req, &origin, &options, size)?;
    if !fresh {
        // An image of this name exists: a committed one answers the request
        // if it fits it; a half-made one is finished below.
        let img = pool.open_read_only(image).map_err(ceph_error)?;
        if let Some(attrs) = Attributes::read(&img)? {
            let capacity = img.size().map_err(ceph_error)?;
            let fits = capacity >= req.required_bytes
                && (req.limit_bytes == 0 || capacity <= req.limit_bytes);
            if attrs.name != req.name || attrs.source != source || !fits {
                return Err(error::exists(format!(
                    "volume {} exists with a different size or source",
                    req.name
                )));
            }
            if !attrs.params.is_empty() && attrs.params != p.fingerprint() {
                return Err(error::exists(format!(
                    "volume {} exists with other parameters ({}; asked: {})",
                    req.name,
                    attrs.params,
                    p.fingerprint()
                )));
            }
            let created = img.created().map_err(ceph_error)?;
            drop(img);
            let nodes = published(pool, image)?.into_keys().collect();
            return Ok((attrs.volume(capacity, created, nodes), 0));
        }
    }
    let img = pool.open(image).map_err(ceph_error)?;
    let capacity = match img.size().map_err(ceph_error)? {
        s if s < size => {
            img.resize(size).map_err(ceph_error)?;
            size
        }
        s => s,
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
    let attrs = Attributes {
        name: req.name.clone(),
        volume_id: id,
        source,
        depth,
        access: match &req.access {
            AccessType::Block => "block".into(),
            AccessType::Mount { fs_type } => format!("mount:{fs_type}"),
        },
        context,
        params: p.fingerprint(),
    };
    img.set_metadata(META, &attrs.encode()).map_err(ceph_error)?;
    let created = img.created().map_err(ceph_error)?;
    Ok((attrs.volume(capacity, created, vec![]), depth))
}

/// Records a new clone depth (after a flatten).
pub fn set_depth(img: &Image, depth: u32) -> Result<()> {
    if let Some(mut attrs) = Attributes::read(img)? {
        attrs.depth = depth;
        img.set_metadata(META, &attrs.encode()).map_err(ceph_error)?;
    }
    Ok(())
}

/// The blocking body of DeleteVolume: to the trash, for the purger.
pub fn delete(pool: &Pool, image: &str) -> Result<()> {
    let in_use = || {
        error::precondition(format!(
            "volume {}:{image} is still open on a node (it has watchers): unstage it first",
            pool.name()
        ))
    };
    // librbd moves an open image to the trash without a word: ask first.
    // This driver's own client opens images for moments (the purger
    // detaching a clone from its parent, a flatten): not a user.
    let open = match pool.open_read_only(image) {
        Ok(img) => img.watchers().map_err(ceph_error)?.iter().any(|w| !pool.is_own_watcher(w)),
        Err(e) if e.is(libc::ENOENT) => false,
        Err(e) => return Err(ceph_error(e)),
    };
    if open {
        return Err(in_use());
    }
    match pool.trash_move(image) {
        Ok(()) => {}
        Err(e) if e.is(libc::ENOENT) => {}
        Err(e) if e.is(libc::EBUSY) => return Err(in_use()),
        Err(e) => return Err(ceph_error(e)),
    }
    pool.remove_object(&publish_record(image)).map_err(ceph_error)
}

/// Whether a clean-up step happened; one that must wait (still open,
/// still has snapshots, already gone) is not an error.
pub fn ignore_busy(r: ceph::Result<()>) -> Result<bool> {
    match r {
        Ok(()) => Ok(true),
        Err(e) if e.is(libc::EBUSY) || e.is(libc::ENOTEMPTY) || e.is(libc::ENOENT) => Ok(false),
        Err(e) => Err(ceph_error(e)),
    }
}

/// Removes, for good, an image nobody needs any more (a trashed or hidden
/// image without snapshots), and then its parent if that frees it too.
pub fn settle(pool: &Pool, image_id: &str) -> Result<()> {
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
