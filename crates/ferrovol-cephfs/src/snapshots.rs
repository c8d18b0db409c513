//! Snapshots are subvolume snapshots: O(1), the MDS marks the subtree.
//! A snapshot's ID carries only its file system and the hash of its name
//! (so it stays within 128 bytes); the name is claimed in the home pool by
//! an object that records the rest: the CO's name, the source volume, when
//! it was taken and the source's size then. A snapshot exists while its
//! claim and its subvolume snapshot both do.
//!
//! A volume deleted with snapshots is kept by Ceph as `snapshot-retained`
//! (no data path, no metadata: no longer a volume) until its last snapshot
//! goes, and Ceph then purges it. Restores are made in the controller
//! (see `controller.rs`); read-only views of a snapshot in `backed.rs`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferrovol_ceph::{Cluster, Pool, Subvolumes};
use ferrovol_core::engine::{self, Page, Secrets, Snapshot, SnapshotFilter, Snapshots};

use crate::controller::{self, describe, every_subvolume, CephFsEngine};
use crate::error::{self, Error, Kind, Result};
use crate::ids::{BackedId, SnapshotId, VolumeId};
use crate::{backed, groups};
use crate::{blocking, ceph_error};

pub(crate) fn claim_oid(s: &SnapshotId) -> String {
    format!("ferrovol.cephfs.snap.{}", s.hash)
}

/// What a snapshot's claim records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Claim {
    pub name: String,
    pub source: String,
    pub created: u64,
    pub size: u64,
    /// Where the snapshot's data is in its file system (empty in claims
    /// written before it was recorded).
    pub root: String,
    /// The group snapshot it is a member of (an ID; empty: none).
    pub group: String,
}

impl Claim {
    pub(crate) fn encode(&self) -> String {
        serde_json::json!({
            "name": self.name,
            "source": self.source,
            "created": self.created,
            "size": self.size,
            "root": self.root,
            "group": self.group,
        })
        .to_string()
    }

    fn decode(bytes: &[u8]) -> Option<Claim> {
        let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
        Some(Claim {
            name: v["name"].as_str()?.to_string(),
            source: v["source"].as_str()?.to_string(),
            created: v["created"].as_u64()?,
            size: v["size"].as_u64()?,
            root: v["root"].as_str().unwrap_or_default().to_string(),
            group: v["group"].as_str().unwrap_or_default().to_string(),
        })
    }

    /// The source volume's place (a claim we wrote always names one).
    fn source(&self) -> Result<VolumeId> {
        VolumeId::parse(&self.source)
            .ok_or_else(|| error::internal(format!("a snapshot claim names {:?}", self.source)))
    }
}

/// Where snapshot `snap` of the subvolume whose data is at `path` keeps
/// that data: the subvolume's directory (the path's parent) has the
/// snapshots, each holding the data directory by the same name.
pub(crate) fn root_of(path: &str, snap: &str) -> Option<String> {
    let (dir, data) = path.rsplit_once('/').filter(|(d, n)| !d.is_empty() && !n.is_empty())?;
    Some(format!("{dir}/.snap/{snap}/{data}"))
}

/// Where snapshot `snap` of subvolume `from` keeps its data: `recorded`
/// (its claim's record) when there is one, else beside the subvolume's
/// data path; `gone` is the error when the subvolume has no path any more.
pub(crate) fn data_path(
    cluster: &Cluster,
    recorded: &str,
    from: &VolumeId,
    snap: &str,
    gone: impl FnOnce() -> Error,
) -> Result<String> {
    if !recorded.is_empty() {
        return Ok(recorded.to_string());
    }
    let sv = Subvolumes::new(cluster.clone(), &from.fs);
    let path = sv.path(&from.group, &from.subvolume).map_err(|e| match e.errno {
        libc::ENOENT => gone(),
        _ => ceph_error(e),
    })?;
    root_of(&path, snap)
        .ok_or_else(|| error::internal(format!("the subvolume path {path:?} has no parent")))
}

/// Removes a subvolume snapshot the CO deleted while volumes backed by it
/// still used it, once the last of them goes (`origin`: the volume it was
/// taken of).
pub(crate) fn remove_kept(cluster: &Cluster, s: &SnapshotId, origin: &str) -> Result<()> {
    let Some(v) = VolumeId::parse(origin) else { return Ok(()) };
    let sv = Subvolumes::new(cluster.clone(), &v.fs);
    match sv.remove_snapshot(&v.group, &v.subvolume, &s.snap()) {
        Err(e) if e.is(libc::ENOENT) => Ok(()),
        other => other.map_err(ceph_error),
    }
}

pub(crate) fn claim_of(home: &Pool, s: &SnapshotId) -> Result<Option<Claim>> {
    Ok(home.read_object(&claim_oid(s)).map_err(ceph_error)?.as_deref().and_then(Claim::decode))
}

/// Whether the subvolume snapshot stands (its subvolume gone, or retained
/// without it: no); a group member's, whether its group's does.
fn taken(home: &Pool, cluster: &Cluster, s: &SnapshotId, c: &Claim) -> Result<bool> {
    if !c.group.is_empty() {
        return groups::is_taken(home, &c.group);
    }
    let v = c.source()?;
    let sv = Subvolumes::new(cluster.clone(), &v.fs);
    match sv.snapshots(&v.group, &v.subvolume) {
        Ok(names) => Ok(names.contains(&s.snap())),
        Err(e) if e.is(libc::ENOENT) => Ok(false),
        Err(e) => Err(ceph_error(e)),
    }
}

pub(crate) fn snapshot_of(s: &SnapshotId, c: &Claim) -> Snapshot {
    Snapshot {
        id: s.id(),
        name: c.name.clone(),
        source_volume: c.source.clone(),
        size: c.size,
        created: UNIX_EPOCH + Duration::from_secs(c.created),
        ready: true,
        group_id: (!c.group.is_empty()).then(|| c.group.clone()),
    }
}

/// The snapshot and its claim; NOT_FOUND unless both it and its claim
/// exist.
pub(crate) fn find(home: &Pool, cluster: &Cluster, s: &SnapshotId) -> Result<(Snapshot, Claim)> {
    let gone = || error::not_found(format!("snapshot {} does not exist", s.id()));
    let c = claim_of(home, s)?.ok_or_else(gone)?;
    if !taken(home, cluster, s, &c)? {
        return Err(gone());
    }
    Ok((snapshot_of(s, &c), c))
}

/// Every snapshot of ours of one subvolume.
fn of_subvolume(home: &Pool, sv: &Subvolumes, v: &VolumeId) -> Result<Vec<Snapshot>> {
    let names = match sv.snapshots(&v.group, &v.subvolume) {
        Ok(n) => n,
        Err(e) if e.is(libc::ENOENT) => return Ok(vec![]),
        Err(e) => return Err(ceph_error(e)),
    };
    let mut out = vec![];
    for snap in names {
        let Some(s) = SnapshotId::of_snap(&v.fs, &snap) else { continue };
        match claim_of(home, &s)? {
            Some(c) if c.source == v.id() => out.push(snapshot_of(&s, &c)),
            _ => {} // not ours, or a claim taken over
        }
    }
    Ok(out)
}

#[tonic::async_trait]
impl Snapshots for CephFsEngine {
    async fn create_snapshot(
        &self,
        name: &str,
        source_volume: &str,
        secrets: &Secrets,
    ) -> Result<Snapshot> {
        let missing = || error::not_found(format!("source volume {source_volume} does not exist"));
        if BackedId::parse(source_volume).is_some() {
            return Err(error::invalid(format!(
                "volume {source_volume} is a read-only view of a snapshot (backingSnapshot): \
                 that snapshot is its data already"
            )));
        }
        let v = VolumeId::parse(source_volume).ok_or_else(missing)?;
        let s = SnapshotId::new(&v.fs, name);
        let home = self.home_pool(secrets).await?;
        let sv = self.subvolumes(&v.fs, secrets).await?;
        let (name, source) = (name.to_string(), source_volume.to_string());
        blocking(move || {
            let volume = describe(&sv, &v)?;
            let oid = claim_oid(&s);
            let claim = match claim_of(&home, &s)? {
                Some(c) if !c.group.is_empty() => {
                    return Err(error::exists(format!(
                        "snapshot name {name:?} is taken by a member of group snapshot {}",
                        c.group
                    )))
                }
                Some(c) if c.source == source => c,
                Some(c) if taken(&home, sv.cluster(), &s, &c)? => {
                    return Err(error::exists(format!(
                        "snapshot name {name:?} is taken by a snapshot of {}",
                        c.source
                    )))
                }
                // Unclaimed, or claimed by a snapshot that is gone.
                _ => {
                    let users = backed::users(&home, &s.id())?;
                    if users > 0 {
                        // A snapshot of this name was deleted but is kept
                        // for the volumes that show it: never handed out
                        // again as a new one.
                        return Err(error::busy(format!(
                            "a deleted snapshot named {name:?} is still shown by {users} \
                             volume(s) backed by it; retry once they are deleted"
                        )));
                    }
                    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
                    let path = sv.path(&v.group, &v.subvolume).map_err(ceph_error)?;
                    let c = Claim {
                        name: name.clone(),
                        source: source.clone(),
                        created: now.as_secs(),
                        size: volume.capacity,
                        root: root_of(&path, &s.snap()).unwrap_or_default(),
                        group: String::new(),
                    };
                    home.write_object(&oid, c.encode().as_bytes()).map_err(ceph_error)?;
                    c
                }
            };
            if !taken(&home, sv.cluster(), &s, &claim)? {
                match sv.snapshot(&v.group, &v.subvolume, &s.snap()) {
                    Err(e) if e.is(libc::EEXIST) => {}
                    other => other.map_err(ceph_error)?,
                }
            }
            Ok(snapshot_of(&s, &claim))
        })
        .await
    }

    async fn delete_snapshot(&self, id: &str, secrets: &Secrets) -> Result<()> {
        // An ID we never minted names nothing: deleted already.
        let Some(s) = SnapshotId::parse(id) else { return Ok(()) };
        let home = self.home_pool(secrets).await?;
        let cluster = self.conn.cluster(secrets).await?;
        let id = id.to_string();
        blocking(move || {
            let Some(c) = claim_of(&home, &s)? else { return Ok(()) };
            if !c.group.is_empty() {
                // As the other engines answer a member deleted alone (its
                // data is the group's snapshot, which goes with the group):
                // the caller must delete the group; FAILED_PRECONDITION
                // would be retried.
                return Err(error::invalid(format!(
                    "snapshot {id} is part of group snapshot {}: delete the group snapshot",
                    c.group
                )));
            }
            if controller::copying_from(&home, &c.root)? {
                return Err(error::busy(format!(
                    "snapshot {id} is still being copied into a restore; retry once it is done"
                )));
            }
            if backed::users(&home, &id)? > 0 {
                // Volumes still show it: the CO's snapshot goes now, the
                // data with the last of them (see backed.rs).
                return match home.remove_object(&claim_oid(&s)) {
                    Err(e) if e.is(libc::ENOENT) => Ok(()),
                    other => other.map_err(ceph_error),
                };
            }
            let v = c.source()?;
            let sv = Subvolumes::new(cluster, &v.fs);
            // The last snapshot of a deleted (retained) volume takes the
            // volume with it: Ceph purges it.
            match sv.remove_snapshot(&v.group, &v.subvolume, &s.snap()) {
                Err(e) if e.is(libc::EAGAIN) => {
                    return Err(error::busy(format!(
                        "snapshot {id} is still being copied into a restore; retry once it is \
                         done"
                    )))
                }
                other => other.map_err(ceph_error)?,
            }
            match home.remove_object(&claim_oid(&s)) {
                Err(e) if e.is(libc::ENOENT) => Ok(()),
                other => other.map_err(ceph_error),
            }
        })
        .await
    }

    async fn snapshot(&self, id: &str) -> Result<Snapshot> {
        let gone = || error::not_found(format!("snapshot {} does not exist", error::bounded(id)));
        let s = SnapshotId::parse(id).ok_or_else(gone)?;
        let home = self.home_pool(&Secrets::default()).await?;
        let cluster = self.conn.default_cluster().await?;
        blocking(move || find(&home, &cluster, &s).map(|(snap, _)| snap)).await
    }

    async fn list_snapshots(
        &self,
        filter: &SnapshotFilter,
        token: Option<&str>,
        max: usize,
    ) -> Result<Page<Snapshot>> {
        let home = self.home_pool(&Secrets::default()).await?;
        let cluster = self.conn.default_cluster().await?;
        let filesystems = self.filesystems().to_vec();
        let filter = filter.clone();
        let mut all = blocking(move || {
            if let Some(id) = &filter.snapshot_id {
                let Some(s) = SnapshotId::parse(id) else { return Ok(vec![]) };
                return match find(&home, &cluster, &s) {
                    Ok((snap, _)) => Ok(vec![snap]
                        .into_iter()
                        .filter(|x| {
                            filter.source_volume.as_ref().is_none_or(|v| *v == x.source_volume)
                        })
                        .collect()),
                    Err(e) if e.kind() == Kind::NotFound => Ok(vec![]),
                    Err(e) => Err(e),
                };
            }
            if let Some(source) = &filter.source_volume {
                let Some(v) = VolumeId::parse(source) else { return Ok(vec![]) };
                let sv = Subvolumes::new(cluster.clone(), &v.fs);
                let mut all = of_subvolume(&home, &sv, &v)?;
                all.extend(groups::members(&home, Some(source))?);
                return Ok(all);
            }
            let mut all = groups::members(&home, None)?;
            for fs in filesystems {
                let sv = Subvolumes::new(cluster.clone(), &fs);
                for v in every_subvolume(&sv)? {
                    all.extend(of_subvolume(&home, &sv, &v)?);
                }
            }
            Ok(all)
        })
        .await?;
        all.sort_by(|a, b| a.id.cmp(&b.id));
        if let Some(t) = token {
            if SnapshotId::parse(t).is_none() {
                return Err(error::busy("starting_token is not one this driver issued"));
            }
            all.retain(|s| s.id.as_str() > t);
        }
        let next = engine::next_token(&mut all, max.max(1), |s| s.id.clone());
        Ok(Page { items: all, next })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_keeps_its_data_beside_the_subvolume_s() {
        assert_eq!(
            root_of("/volumes/csi/csi-vol-1/0a1b", "csi-snap-9").as_deref(),
            Some("/volumes/csi/csi-vol-1/.snap/csi-snap-9/0a1b")
        );
        assert_eq!(root_of("/x", "s"), None);
        assert_eq!(root_of("", "s"), None);
    }
}
