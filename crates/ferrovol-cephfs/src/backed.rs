//! Volumes backed by a snapshot (ceph-csi's `backingSnapshot: "true"`):
//! a read-only volume restored from a snapshot in O(1), with nothing
//! copied. The volume is the snapshot's directory itself
//! (`/volumes/<group>/<subvolume>/.snap/<snap>/<uuid>`), which the node
//! mounts read-only.
//!
//! Such a volume has no subvolume of its own, so its record is an entry of
//! one omap index object in the home pool (key: the volume ID), written
//! atomically. The snapshot it shows must outlive it: a DeleteSnapshot
//! while volumes still use the snapshot removes the CO's snapshot (its
//! claim) and keeps the subvolume snapshot, which the last of its users
//! removes when it is deleted. Kubernetes never deletes a snapshot while a
//! claim is being restored from it (the snapshotter's source protection),
//! so a create and that delete do not race.

use ferrovol_ceph::{Cluster, Pool, Subvolumes};
use ferrovol_core::engine::{
    self, AccessMode, Condition, ContentSource, NewVolume, Secrets, Volume,
};

use crate::controller::{self, check_claim, claim_oid, release_claim, CephFsEngine, Record};
use crate::error::{self, Kind, Result};
use crate::ids::{BackedId, SnapshotId, VolumeId};
use crate::params::Parameters;
use crate::snapshots::{self, Claim};
use crate::{blocking, ceph_error};

/// The omap object indexing the volumes backed by snapshots.
const INDEX: &str = "ferrovol.cephfs.backed";

/// The record of a backed volume; None when there is none.
pub(crate) fn record(home: &Pool, b: &BackedId) -> Result<Option<Record>> {
    let id = b.id();
    let found = home.omap_get(INDEX, &id).map_err(ceph_error)?;
    Ok(found.and_then(|v| Record::decode(&String::from_utf8_lossy(&v))).filter(|r| r.volume == id))
}

pub(crate) fn describe(home: &Pool, b: &BackedId) -> Result<Volume> {
    match record(home, b)? {
        Some(r) => {
            let size = r.size;
            Ok(controller::volume_of(r, size))
        }
        None => Err(error::not_found(format!("volume {} does not exist", b.id()))),
    }
}

/// Every backed volume's record.
fn records(home: &Pool) -> Result<Vec<Record>> {
    Ok(crate::index(home, INDEX)?
        .into_iter()
        .filter_map(|(_, v)| Record::decode(&String::from_utf8_lossy(&v)))
        .collect())
}

/// Every backed volume, as the CO sees it.
pub(crate) fn all(home: &Pool) -> Result<Vec<Volume>> {
    Ok(records(home)?
        .into_iter()
        .map(|r| {
            let size = r.size;
            controller::volume_of(r, size)
        })
        .collect())
}

/// How many backed volumes show snapshot `snapshot` (an ID).
pub(crate) fn users(home: &Pool, snapshot: &str) -> Result<usize> {
    Ok(records(home)?.iter().filter(|r| r.source == snapshot).count())
}

/// Healthy while the snapshot it shows stands.
pub(crate) fn condition(home: &Pool, cluster: &Cluster, b: &BackedId) -> Result<Condition> {
    let Some(r) = record(home, b)? else {
        return Err(error::not_found(format!("volume {} does not exist", b.id())));
    };
    Ok(match snapshot_stands(cluster, &r)? {
        true => Condition::Healthy,
        false => Condition::Abnormal("the snapshot this volume shows is gone".into()),
    })
}

/// Whether the subvolume snapshot a backed volume shows still exists.
fn snapshot_stands(cluster: &Cluster, r: &Record) -> Result<bool> {
    let (Some(s), Some(v)) = (SnapshotId::parse(&r.source), VolumeId::parse(&r.origin)) else {
        return Ok(false);
    };
    let sv = Subvolumes::new(cluster.clone(), &v.fs);
    match sv.snapshots(&v.group, &v.subvolume) {
        Ok(names) => Ok(names.contains(&s.snap())),
        Err(e) if e.is(libc::ENOENT) => Ok(false),
        Err(e) => Err(ceph_error(e)),
    }
}

/// Whether every access mode asked for only reads.
fn read_only(modes: &[AccessMode]) -> bool {
    modes
        .iter()
        .all(|m| matches!(m, AccessMode::SingleNodeReaderOnly | AccessMode::MultiNodeReaderOnly))
}

impl CephFsEngine {
    /// Answers the backed volume `name` already is, or makes it.
    pub(crate) async fn create_backed(&self, req: &NewVolume, p: &Parameters) -> Result<Volume> {
        let Some(ContentSource::Snapshot(snapshot)) = &req.source else {
            return Err(error::invalid(
                "backingSnapshot: \"true\" makes a read-only view of a snapshot: the request \
                 needs a snapshot as its source",
            ));
        };
        if !read_only(&req.modes) {
            return Err(error::invalid(
                "a volume backed by a snapshot (backingSnapshot) is read-only: ask for \
                 ReadOnlyMany (or a single-node reader mode), or restore without \
                 backingSnapshot for a writable copy",
            ));
        }
        let gone =
            || error::not_found(format!("snapshot {} does not exist", error::bounded(snapshot)));
        let s = SnapshotId::parse(snapshot).ok_or_else(gone)?;
        if s.fs != p.fs {
            return Err(error::invalid(format!(
                "snapshot {snapshot} is on file system {}, not {}: a volume backed by it is \
                 on its file system",
                s.fs, p.fs
            )));
        }
        let b = BackedId::new(&p.fs, &req.name);
        let home = self.home_pool(&req.secrets).await?;
        let sv = self.subvolumes(&p.fs, &req.secrets).await?;
        let (name, fingerprint) = (req.name.clone(), p.fingerprint());
        let (required, limit) = (req.required_bytes, req.limit_bytes);
        let parameters = req.parameters.clone();
        let extra = [
            ("clusterID", p.cluster_id.clone()),
            ("fuseMountOptions", p.fuse_options.clone()),
            ("mounter", p.mounter.map(|m| m.name().to_string()).unwrap_or_default()),
        ];
        blocking(move || {
            let id = b.id();
            check_claim(&home, &sv, &name, &id)?;
            let (_, claim) = snapshots::find(&home, sv.cluster(), &s)?;
            if !claim.group.is_empty() {
                // Its data is under the group's directory snapshot, which
                // a node would have to mount whole (every subvolume of the
                // group): a copy shows the member alone.
                return Err(error::invalid(format!(
                    "snapshot {} is a member of group snapshot {}: restore it without \
                     backingSnapshot (a copy)",
                    s.id(),
                    claim.group
                )));
            }
            if let Some(r) = record(&home, &b)? {
                if r.params != fingerprint || r.name != name || r.source != s.id() {
                    return Err(error::exists(format!(
                        "volume {name:?} exists with other parameters"
                    )));
                }
                if r.size < required || (limit > 0 && r.size > limit) {
                    return Err(error::exists(format!(
                        "volume {name:?} exists with {} bytes, outside the range asked",
                        r.size
                    )));
                }
                home.write_object(&claim_oid(&name), id.as_bytes()).map_err(ceph_error)?;
                return describe(&home, &b);
            }
            let size = engine::choose_size(
                required,
                limit,
                claim.size,
                controller::GRANULARITY,
                controller::MAXIMUM_VOLUME,
            )?;
            let root = snapshot_root(&sv, &s, &claim)?;
            let context = controller::context_of(
                [
                    ("fsName", sv.fs().to_string()),
                    ("rootPath", root),
                    ("backingSnapshotID", s.id()),
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
                created: controller::now(),
                source: s.id(),
                size,
                origin: claim.source.clone(),
            };
            home.write_object(&claim_oid(&name), id.as_bytes()).map_err(ceph_error)?;
            home.omap_set(INDEX, &[(&id, r.encode().as_bytes())]).map_err(ceph_error)?;
            describe(&home, &b)
        })
        .await
    }

    pub(crate) async fn delete_backed(&self, b: &BackedId, secrets: &Secrets) -> Result<()> {
        let home = self.home_pool(secrets).await?;
        let cluster = self.conn.cluster(secrets).await?;
        let b = b.clone();
        blocking(move || {
            let id = b.id();
            let Some(r) = record(&home, &b)? else { return Ok(()) };
            // The snapshot goes with its last user once the CO deleted it
            // (its claim is gone); before the entry, so that a retry after
            // a failure here still finds what to remove.
            if let Some(s) = SnapshotId::parse(&r.source) {
                let deleted = snapshots::find(&home, &cluster, &s)
                    .map(drop)
                    .err()
                    .is_some_and(|e| e.kind() == Kind::NotFound);
                if deleted && users(&home, &r.source)? <= 1 {
                    snapshots::remove_kept(&cluster, &s, &r.origin)?;
                }
            }
            home.omap_remove(INDEX, &[&id]).map_err(ceph_error)?;
            release_claim(&home, &claim_oid(&r.name), &id)
        })
        .await
    }
}

/// Where the snapshot's data is in its file system: recorded in its claim
/// when it was taken (a deleted source, kept for its snapshots, has no
/// path to ask for); else from the source subvolume's path.
fn snapshot_root(sv: &Subvolumes, s: &SnapshotId, claim: &Claim) -> Result<String> {
    let from = VolumeId::parse(&claim.source)
        .ok_or_else(|| error::internal(format!("a snapshot claim names {:?}", claim.source)))?;
    snapshots::data_path(sv.cluster(), &claim.root, &from, &s.snap(), || {
        error::precondition(format!(
            "the volume snapshot {} was taken of is deleted, and the snapshot does not record \
             where its data is: restore it without backingSnapshot",
            s.id()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_reader_modes_are_read_only() {
        assert!(read_only(&[AccessMode::MultiNodeReaderOnly]));
        assert!(read_only(&[AccessMode::SingleNodeReaderOnly, AccessMode::MultiNodeReaderOnly]));
        assert!(!read_only(&[AccessMode::MultiNodeReaderOnly, AccessMode::SingleNodeWriter]));
        assert!(!read_only(&[AccessMode::MultiNodeMultiWriter]));
    }
}
