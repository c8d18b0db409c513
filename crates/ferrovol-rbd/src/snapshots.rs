//! Snapshots of one image: finding them, describing them, reading them.

use ferrovol_ceph::{self as ceph, Image, Pool, SnapNamespace};
use ferrovol_core::engine::{Range, Snapshot};

use crate::ceph_error;
use crate::error::{self, Result};
use crate::ids::{self, GroupId, SnapshotId, VolumeId};
use crate::volumes::{not_found_or, Attributes};

/// The user snapshot of this name on an image, if it exists.
pub fn find_snap(img: &Image, name: &str) -> Result<Option<ceph::Snap>> {
    Ok(img.snaps().map_err(ceph_error)?.into_iter().find(|s| s.name == name))
}

/// The image's snapshot that belongs to a group snapshot.
pub fn find_member(img: &Image, group: &GroupId) -> Result<Option<ceph::Snap>> {
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

pub fn snapshot_of(
    pool: &Pool,
    img: &Image,
    id: &SnapshotId,
    snap: &ceph::Snap,
    group: Option<&GroupId>,
) -> Result<Snapshot> {
    let source = Attributes::read(img)?.map(|a| a.volume_id).unwrap_or_else(|| {
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
pub fn image_snapshots(pool: &Pool, image_id: &str) -> Result<Vec<Snapshot>> {
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

pub fn merge(ranges: &mut Vec<Range>, off: u64, len: u64) {
    if let Some(last) = ranges.last_mut() {
        if last.0 + last.1 == off {
            last.1 += len;
            return;
        }
    }
    ranges.push((off, len));
}

/// Opens an image at one of its snapshots for reading.
pub fn open_at(pool: &Pool, id: &SnapshotId) -> Result<(Image, ceph::Snap)> {
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
