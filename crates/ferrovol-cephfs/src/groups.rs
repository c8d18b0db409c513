//! Group snapshots without Squid's quiesce: one MDS snapshot of the
//! members' subvolume group directory (`/volumes/<group>/.snap/csi-group-
//! <hash>`), which the MDS takes atomically over the whole subtree, so
//! every member is captured at the same instant with no writer paused.
//! Pacific's manager refuses `fs subvolumegroup snapshot` (ENOSYS); the
//! directory snapshot is made through libcephfs, as a client's `mkdir` in
//! `.snap`.
//!
//! What it captures: every subvolume of that group at that instant, the
//! members and any other. What that costs: data the other subvolumes
//! overwrite or delete afterwards stays allocated until the group snapshot
//! is deleted (the members' own changes cost the same as with single
//! snapshots). A StorageClass with a `subvolumeGroup` of its own per
//! application keeps a group snapshot to that application's volumes.
//!
//! Members are therefore not subvolume snapshots: each has a claim like a
//! single snapshot's, naming its group and the place of its data inside
//! the group's snapshot, and restores copy from there with ferrovol's own
//! copier. The groups are entries of one omap index in the home pool; a
//! group is taken once its entry says so (written after the MDS snapshot).

use std::time::{Duration, Instant, UNIX_EPOCH};

use ferrovol_ceph::{Pool, Subvolumes};
use ferrovol_cephclient::connect::Login;
use ferrovol_core::engine::{GroupSnapshot, GroupSnapshots, Secrets};

use crate::controller::{self, describe, now, CephFsEngine};
use crate::copies::Copies;
use crate::error::{self, Result};
use crate::ids::{BackedId, GroupId, SnapshotId, VolumeId};
use crate::snapshots::{self, Claim};
use crate::{blocking, ceph_error};

/// The omap object indexing group snapshots (key: the name's hash).
const GROUPS: &str = "ferrovol.cephfs.groups";

/// A group snapshot's entry.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    name: String,
    /// The members' subvolume group directory, which is snapshotted.
    dir: String,
    /// The members' volume IDs, sorted.
    members: Vec<String>,
    created: u64,
    /// The MDS snapshot is taken (until then a retry takes it).
    taken: bool,
}

impl Entry {
    fn encode(&self) -> String {
        serde_json::json!({
            "name": self.name,
            "dir": self.dir,
            "members": self.members,
            "created": self.created,
            "taken": self.taken,
        })
        .to_string()
    }

    fn decode(bytes: &[u8]) -> Option<Entry> {
        let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
        Some(Entry {
            name: v["name"].as_str()?.to_string(),
            dir: v["dir"].as_str()?.to_string(),
            members: v["members"]
                .as_array()?
                .iter()
                .map(|m| m.as_str().map(str::to_string))
                .collect::<Option<_>>()?,
            created: v["created"].as_u64()?,
            taken: v["taken"].as_bool()?,
        })
    }

    fn snapshot_dir(&self, g: &GroupId) -> String {
        format!("{}/.snap/{}", self.dir, g.snap())
    }
}

fn entry(home: &Pool, g: &GroupId) -> Result<Option<Entry>> {
    Ok(home.omap_get(GROUPS, &g.hash).map_err(ceph_error)?.as_deref().and_then(Entry::decode))
}

fn save(home: &Pool, g: &GroupId, e: &Entry) -> Result<()> {
    home.omap_set(GROUPS, &[(&g.hash, e.encode().as_bytes())]).map_err(ceph_error)
}

/// Every taken group of the home pool's index.
fn taken(home: &Pool) -> Result<Vec<(GroupId, Entry)>> {
    Ok(crate::index(home, GROUPS)?
        .into_iter()
        .filter_map(|(hash, v)| {
            let e = Entry::decode(&v)?;
            let fs = e.members.first().and_then(|m| VolumeId::parse(m))?.fs;
            e.taken.then_some((GroupId { fs, hash }, e))
        })
        .collect())
}

/// Whether group snapshot `id` is taken (a member's snapshot stands).
pub(crate) fn is_taken(home: &Pool, id: &str) -> Result<bool> {
    let Some(g) = GroupId::parse(id) else { return Ok(false) };
    Ok(entry(home, &g)?.is_some_and(|e| e.taken))
}

pub(crate) fn count(home: &Pool) -> Result<u64> {
    Ok(taken(home)?.len() as u64)
}

/// The members of every taken group, or only those of volume `source`.
pub(crate) fn members(
    home: &Pool,
    source: Option<&str>,
) -> Result<Vec<ferrovol_core::engine::Snapshot>> {
    let mut out = vec![];
    for (g, e) in taken(home)? {
        for v in e.members.iter().filter(|v| source.is_none_or(|s| s == *v)) {
            let s = g.member(v);
            if let Some(c) = snapshots::claim_of(home, &s)? {
                out.push(snapshots::snapshot_of(&s, &c));
            }
        }
    }
    Ok(out)
}

fn group_of(home: &Pool, g: &GroupId, e: &Entry) -> Result<GroupSnapshot> {
    let mut members = Vec::with_capacity(e.members.len());
    for v in &e.members {
        let s = g.member(v);
        let c = snapshots::claim_of(home, &s)?.ok_or_else(|| {
            error::internal(format!("group snapshot {}: the claim of member {v} is gone", g.id()))
        })?;
        members.push(snapshots::snapshot_of(&s, &c));
    }
    Ok(GroupSnapshot {
        id: g.id(),
        name: e.name.clone(),
        snapshots: members,
        created: UNIX_EPOCH + Duration::from_secs(e.created),
        ready: true,
    })
}

/// The directory of the subvolume group holding the data at `path`
/// (`/volumes/<group>/<subvolume>/<uuid>`), and the path below it.
fn split_group(path: &str) -> Option<(&str, &str)> {
    let (subvolume_dir, _) = path.rsplit_once('/')?;
    let (group_dir, _) = subvolume_dir.rsplit_once('/')?;
    let rest = path.strip_prefix(group_dir)?.strip_prefix('/')?;
    (!group_dir.is_empty()).then_some((group_dir, rest))
}

/// The blocking body of CreateVolumeGroupSnapshot.
fn create(
    home: &Pool,
    sv: &Subvolumes,
    g: &GroupId,
    name: &str,
    volumes: &[VolumeId],
    client: impl FnOnce() -> Result<std::sync::Arc<ferrovol_ceph::fs::FsMount>>,
) -> Result<(GroupSnapshot, Duration)> {
    let gone = |v: &VolumeId| error::not_found(format!("volume {} does not exist", v.id()));
    let mut found = vec![];
    for v in volumes {
        let capacity = describe(sv, v)?.capacity;
        let path = sv.path(&v.group, &v.subvolume).map_err(|e| match e.errno {
            libc::ENOENT => gone(v),
            _ => ceph_error(e),
        })?;
        found.push((v.id(), path, capacity));
    }
    found.sort();
    let dir = split_group(&found[0].1)
        .ok_or_else(|| error::internal(format!("a subvolume's path {:?} is odd", found[0].1)))?
        .0
        .to_string();
    let wanted: Vec<String> = found.iter().map(|(v, _, _)| v.clone()).collect();
    let mut e = match entry(home, g)? {
        Some(e) if e.members != wanted => {
            return Err(error::exists(format!("group snapshot {name:?} exists with other volumes")))
        }
        Some(e) if e.taken => return Ok((group_of(home, g, &e)?, Duration::ZERO)),
        Some(e) => e,
        None => {
            let e = Entry {
                name: name.to_string(),
                dir: dir.clone(),
                members: wanted,
                created: now(),
                taken: false,
            };
            save(home, g, &e)?;
            e
        }
    };
    // This attempt takes the snapshot (seconds are what is recorded): the
    // entry and the members say when, written once.
    e.created = now();
    // The members' claims first: whatever happens next, the entry names
    // every object a delete must remove.
    for (v, path, capacity) in &found {
        let (_, rest) = split_group(path)
            .filter(|(d, _)| *d == e.dir)
            .ok_or_else(|| error::internal(format!("volume {v} moved out of {}", e.dir)))?;
        let claim = Claim {
            name: String::new(),
            source: v.clone(),
            created: e.created,
            size: *capacity,
            root: format!("{}/{rest}", e.snapshot_dir(g)),
            group: g.id(),
        };
        let s: SnapshotId = g.member(v);
        home.write_object(&snapshots::claim_oid(&s), claim.encode().as_bytes())
            .map_err(ceph_error)?;
    }
    let fs = client()?;
    let started = Instant::now();
    match fs.mkdir(&e.snapshot_dir(g), 0o755) {
        Err(x) if x.is(libc::EEXIST) => {}
        Err(x) if x.is(libc::EPERM) || x.is(libc::EACCES) => {
            return Err(error::precondition(format!(
                "the file system refused a snapshot of {} ({x}): the provisioner's Ceph user \
                 needs the 's' flag in its mds caps (allow rws), the file system must allow \
                 snapshots (ceph fs set <fs> allow_new_snaps true), and a Ceph release that \
                 refuses snapshots above subvolumes needs the quiesce API, which this driver \
                 does not use yet",
                e.dir
            )))
        }
        other => other.map_err(ceph_error)?,
    }
    let window = started.elapsed();
    e.taken = true;
    save(home, g, &e)?;
    Ok((group_of(home, g, &e)?, window))
}

/// The blocking body of DeleteVolumeGroupSnapshot.
fn delete(
    home: &Pool,
    g: &GroupId,
    client: impl FnOnce() -> Result<std::sync::Arc<ferrovol_ceph::fs::FsMount>>,
) -> Result<()> {
    let Some(e) = entry(home, g)? else { return Ok(()) };
    let dir = e.snapshot_dir(g);
    if controller::copying_from(home, &dir)? {
        return Err(error::busy(format!(
            "a member of group snapshot {} is still being copied into a restore; retry once it \
             is done",
            g.id()
        )));
    }
    match client()?.rmdir(&dir) {
        Err(x) if x.is(libc::ENOENT) => {}
        other => other.map_err(ceph_error)?,
    }
    for v in &e.members {
        match home.remove_object(&snapshots::claim_oid(&g.member(v))) {
            Err(x) if x.is(libc::ENOENT) => {}
            other => other.map_err(ceph_error)?,
        }
    }
    home.omap_remove(GROUPS, &[&g.hash]).map_err(ceph_error)
}

/// The file system client group snapshots are taken with: the copier's.
fn client_of(
    copies: std::sync::Arc<Copies>,
    login: Login,
    fs: String,
) -> impl FnOnce() -> Result<std::sync::Arc<ferrovol_ceph::fs::FsMount>> {
    move || {
        copies.client(&login, &fs).map_err(|why| {
            error::unavailable(format!("cannot reach file system {fs} as a client: {why}"))
        })
    }
}

#[tonic::async_trait]
impl GroupSnapshots for CephFsEngine {
    async fn create_group_snapshot(
        &self,
        name: &str,
        volumes: &[String],
        secrets: &Secrets,
    ) -> Result<(GroupSnapshot, Duration)> {
        let mut parsed = vec![];
        for v in volumes {
            if BackedId::parse(v).is_some() {
                return Err(error::invalid(format!(
                    "volume {v} is a read-only view of a snapshot (backingSnapshot): that \
                     snapshot is its data already"
                )));
            }
            let gone = || error::not_found(format!("volume {} does not exist", error::bounded(v)));
            parsed.push(VolumeId::parse(v).ok_or_else(gone)?);
        }
        let first =
            parsed.first().ok_or_else(|| error::invalid("a group snapshot needs volumes"))?;
        if let Some(other) = parsed.iter().find(|v| v.fs != first.fs || v.group != first.group) {
            return Err(error::invalid(format!(
                "volumes {} and {} are in different subvolume groups: a group snapshot is one \
                 snapshot of one group's directory, so its volumes must share a StorageClass's \
                 fsName and subvolumeGroup",
                first.id(),
                other.id()
            )));
        }
        let g = GroupId::new(&first.fs, name);
        let home = self.home_pool(secrets).await?;
        let sv = self.subvolumes(&first.fs, secrets).await?;
        let client = client_of(self.copies.clone(), self.conn.fs_login(secrets)?, first.fs.clone());
        let name = name.to_string();
        blocking(move || create(&home, &sv, &g, &name, &parsed, client)).await
    }

    async fn delete_group_snapshot(&self, id: &str, secrets: &Secrets) -> Result<()> {
        // An ID we never minted names nothing: deleted already.
        let Some(g) = GroupId::parse(id) else { return Ok(()) };
        let home = self.home_pool(secrets).await?;
        let client = client_of(self.copies.clone(), self.conn.fs_login(secrets)?, g.fs.clone());
        blocking(move || delete(&home, &g, client)).await
    }

    async fn group_snapshot(&self, id: &str) -> Result<GroupSnapshot> {
        let gone =
            || error::not_found(format!("group snapshot {} does not exist", error::bounded(id)));
        let g = GroupId::parse(id).ok_or_else(gone)?;
        let home = self.home_pool(&Secrets::default()).await?;
        let missing = gone();
        blocking(move || match entry(&home, &g)? {
            Some(e) if e.taken => group_of(&home, &g, &e),
            _ => Err(missing),
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_s_data_is_found_below_its_group_s_directory() {
        assert_eq!(
            split_group("/volumes/csi/csi-vol-1/0a1b"),
            Some(("/volumes/csi", "csi-vol-1/0a1b"))
        );
        assert_eq!(split_group("/x/y"), None);
        assert_eq!(split_group("x"), None);
    }

    #[test]
    fn entries_round_trip() {
        let e = Entry {
            name: "g".into(),
            dir: "/volumes/csi".into(),
            members: vec!["cephfs:f:csi:a".into(), "cephfs:f:csi:b".into()],
            created: 7,
            taken: true,
        };
        assert_eq!(Entry::decode(e.encode().as_bytes()), Some(e));
        assert_eq!(Entry::decode(b"{}"), None);
    }
}
