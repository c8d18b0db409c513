//! Group snapshots: RBD groups, and the record of their members.

use std::time::{Duration, Instant, SystemTime};

use ferrovol_ceph::{self as ceph, Pool};
use ferrovol_core::engine::GroupSnapshot;

use crate::error::{self, Result};
use crate::ids::{GroupId, SnapshotId, VolumeId};
use crate::snapshots::{find_member, snapshot_of};
use crate::volumes::not_found_or;
use crate::{ceph_error, claim};

/// A group's record: its members' volume IDs and image ids, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupRecord {
    pub members: Vec<(String, String)>,
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

pub fn read_group(pool: &Pool, gid: &GroupId) -> Result<Option<GroupRecord>> {
    pool.read_object(&gid.record())
        .map_err(ceph_error)?
        .map(|b| GroupRecord::decode(&b))
        .transpose()
}

pub fn group_of(pool: &Pool, gid: &GroupId, record: &GroupRecord) -> Result<GroupSnapshot> {
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

/// The blocking body of CreateVolumeGroupSnapshot.
pub fn create_group(
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
        let mapped = img.watchers().map_err(ceph_error)?.iter().any(|w| !pool.is_own_watcher(w));
        if mapped && img.features().map_err(ceph_error)? & ceph::FEATURE_EXCLUSIVE_LOCK == 0 {
            return Err(error::precondition(format!(
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
            return Err(error::exists(format!("group snapshot {name:?} exists with other volumes")))
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
