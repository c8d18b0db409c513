//! The engine's IDs say where their subvolume is, so any controller
//! replica and any node finds it without a database: a volume is
//! `cephfs:<fs>:<group>:<subvolume>`, its subvolume named by the class's
//! prefix and the UUIDv5 of the CO's request name (32 hex digits). Names
//! are `[A-Za-z0-9._-]`: file systems and groups at most 32 characters
//! (they are in the ID), pools and cluster IDs 48, prefixes 16, so `:`
//! separates and every ID stays within CSI's 128 bytes.

use crate::error::{self, Result};

pub const VOLUME: &str = "cephfs";
pub const SNAPSHOT: &str = "cephfs-snap";
/// A read-only volume that is a view of a snapshot (`backingSnapshot`).
pub const BACKED: &str = "cephfs-ro";
pub const GROUP: &str = "cephfs-group";
/// Subvolume snapshots we take (ceph-csi's prefix).
pub const SNAP_PREFIX: &str = "csi-snap-";

const NAME_MAX: usize = 48;
/// File systems and groups: part of every volume ID.
const ID_PART_MAX: usize = 32;
const PREFIX_MAX: usize = 16;

/// 32 hex digits naming a CO request name.
pub fn hash(name: &str) -> String {
    uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, name.as_bytes()).simple().to_string()
}

fn is_plain(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && !s.starts_with('.')
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// A pool name or cluster ID from a parameter.
pub fn check_name<'a>(what: &str, s: &'a str) -> Result<&'a str> {
    check_plain(what, s, NAME_MAX)
}

/// A file system or group name from a parameter or flag (part of IDs).
pub fn check_id_part<'a>(what: &str, s: &'a str) -> Result<&'a str> {
    check_plain(what, s, ID_PART_MAX)
}

fn check_plain<'a>(what: &str, s: &'a str, max: usize) -> Result<&'a str> {
    match is_plain(s, max) {
        true => Ok(s),
        false => Err(error::invalid(format!(
            "{what} {:?} must be 1 to {max} characters of [A-Za-z0-9._-], not starting with a \
             dot",
            error::bounded(s)
        ))),
    }
}

pub fn check_prefix(s: &str) -> Result<&str> {
    match is_plain(s, PREFIX_MAX) {
        true => Ok(s),
        false => Err(error::invalid(format!(
            "volumeNamePrefix {:?} must be 1 to {PREFIX_MAX} characters of [A-Za-z0-9._-]",
            error::bounded(s)
        ))),
    }
}

/// Where a volume lives.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct VolumeId {
    pub fs: String,
    pub group: String,
    pub subvolume: String,
}

impl VolumeId {
    pub fn new(fs: &str, group: &str, prefix: &str, name: &str) -> VolumeId {
        VolumeId {
            fs: fs.into(),
            group: group.into(),
            subvolume: format!("{prefix}{}", hash(name)),
        }
    }

    /// None for anything this engine did not mint.
    pub fn parse(id: &str) -> Option<VolumeId> {
        let mut parts = id.split(':');
        let (kind, fs, group, subvolume) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let ok = kind == VOLUME
            && parts.next().is_none()
            && is_plain(fs, ID_PART_MAX)
            && is_plain(group, ID_PART_MAX)
            && is_plain(subvolume, PREFIX_MAX + 32);
        ok.then(|| VolumeId { fs: fs.into(), group: group.into(), subvolume: subvolume.into() })
    }

    pub fn id(&self) -> String {
        format!("{VOLUME}:{}:{}:{}", self.fs, self.group, self.subvolume)
    }
}

/// A volume backed by a snapshot: no subvolume of its own, so its ID says
/// only its file system and the hash of its request name; its record is
/// in the home pool's index of such volumes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BackedId {
    pub fs: String,
    pub hash: String,
}

impl BackedId {
    pub fn new(fs: &str, name: &str) -> BackedId {
        BackedId { fs: fs.into(), hash: hash(name) }
    }

    pub fn parse(id: &str) -> Option<BackedId> {
        let mut parts = id.split(':');
        let (kind, fs, hash) = (parts.next()?, parts.next()?, parts.next()?);
        let ok =
            kind == BACKED && parts.next().is_none() && is_plain(fs, ID_PART_MAX) && is_hash(hash);
        ok.then(|| BackedId { fs: fs.into(), hash: hash.into() })
    }

    pub fn id(&self) -> String {
        format!("{BACKED}:{}:{}", self.fs, self.hash)
    }
}

/// The file system of any volume ID this engine minted.
pub fn fs_of_volume(id: &str) -> Option<String> {
    VolumeId::parse(id).map(|v| v.fs).or_else(|| BackedId::parse(id).map(|b| b.fs))
}

/// The snapshot a clone's copy is made from, taken of its source (named
/// for the clone, so a retry finds it; not ours to list).
pub fn clone_snap(target: &VolumeId) -> String {
    let hash = &target.subvolume[target.subvolume.len().saturating_sub(32)..];
    format!("csi-clone-{hash}")
}

/// Where a snapshot is: its file system and the hash of its name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SnapshotId {
    pub fs: String,
    pub hash: String,
}

impl SnapshotId {
    pub fn new(fs: &str, name: &str) -> SnapshotId {
        SnapshotId { fs: fs.into(), hash: hash(name) }
    }

    /// The snapshot of a subvolume named `snap` (None: not one of ours).
    pub fn of_snap(fs: &str, snap: &str) -> Option<SnapshotId> {
        let hash = snap.strip_prefix(SNAP_PREFIX).filter(|h| is_hash(h))?;
        Some(SnapshotId { fs: fs.into(), hash: hash.into() })
    }

    pub fn parse(id: &str) -> Option<SnapshotId> {
        let mut parts = id.split(':');
        let (kind, fs, hash) = (parts.next()?, parts.next()?, parts.next()?);
        let ok = kind == SNAPSHOT
            && parts.next().is_none()
            && is_plain(fs, ID_PART_MAX)
            && is_hash(hash);
        ok.then(|| SnapshotId { fs: fs.into(), hash: hash.into() })
    }

    pub fn id(&self) -> String {
        format!("{SNAPSHOT}:{}:{}", self.fs, self.hash)
    }

    /// The subvolume snapshot's name.
    pub fn snap(&self) -> String {
        format!("{SNAP_PREFIX}{}", self.hash)
    }
}

/// Where a group snapshot is: its file system and the hash of its name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct GroupId {
    pub fs: String,
    pub hash: String,
}

impl GroupId {
    pub fn new(fs: &str, name: &str) -> GroupId {
        GroupId { fs: fs.into(), hash: hash(name) }
    }

    pub fn parse(id: &str) -> Option<GroupId> {
        let mut parts = id.split(':');
        let (kind, fs, hash) = (parts.next()?, parts.next()?, parts.next()?);
        let ok =
            kind == GROUP && parts.next().is_none() && is_plain(fs, ID_PART_MAX) && is_hash(hash);
        ok.then(|| GroupId { fs: fs.into(), hash: hash.into() })
    }

    pub fn id(&self) -> String {
        format!("{GROUP}:{}:{}", self.fs, self.hash)
    }

    /// The snapshot of the members' subvolume group directory.
    pub fn snap(&self) -> String {
        format!("csi-group-{}", self.hash)
    }

    /// The snapshot of member `volume` (an ID): named by the group and
    /// the volume, so a retry finds the same one.
    pub fn member(&self, volume: &str) -> SnapshotId {
        SnapshotId::new(&self.fs, &format!("{}/{volume}", self.id()))
    }
}

fn is_hash(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_strangers_are_refused() {
        let v = VolumeId::new("myfs", "csi", "csi-vol-", "pvc-1");
        assert_eq!(VolumeId::parse(&v.id()), Some(v.clone()));
        assert_eq!(v.subvolume.len(), "csi-vol-".len() + 32);
        let longest = VolumeId::new(&"f".repeat(32), &"g".repeat(32), &"p".repeat(16), "x");
        assert!(longest.id().len() <= 128, "{}", longest.id().len());
        for bad in
            ["", "cephfs:a:b", "rbd:a:b:c", "cephfs:a:b:c:d", "cephfs:..:b:c", "cephfs:a:b/c:d"]
        {
            assert_eq!(VolumeId::parse(bad), None, "{bad}");
        }
        let s = SnapshotId::new("myfs", "snap-1");
        assert_eq!(SnapshotId::parse(&s.id()), Some(s.clone()));
        assert_eq!(SnapshotId::of_snap("myfs", &s.snap()), Some(s.clone()));
        for bad in ["cephfs-snap:a", "cephfs-snap:a:XYZ", "cephfs:a:b:c", "cephfs-snap:a:b:c"] {
            assert_eq!(SnapshotId::parse(bad), None, "{bad}");
        }
        assert_eq!(SnapshotId::of_snap("a", "manual-snap"), None);
        let g = GroupId::new("myfs", "group-1");
        assert_eq!(GroupId::parse(&g.id()), Some(g.clone()));
        assert_ne!(g.member(&v.id()), g.member("cephfs:myfs:csi:csi-vol-other"));
        for bad in [&s.id(), "cephfs-group:a", "cephfs-group:a:XYZ", "cephfs-group:a:b:c"] {
            assert_eq!(GroupId::parse(bad), None, "{bad}");
        }
        let b = BackedId::new("myfs", "pvc-2");
        assert_eq!(BackedId::parse(&b.id()), Some(b.clone()));
        assert_eq!(fs_of_volume(&b.id()).as_deref(), Some("myfs"));
        assert_eq!(fs_of_volume(&v.id()).as_deref(), Some("myfs"));
        assert_eq!(VolumeId::parse(&b.id()), None);
        for bad in [&s.id(), "cephfs-ro:a", "cephfs-ro:a:b", "cephfs-ro:a:XYZ:c"] {
            assert_eq!(BackedId::parse(bad), None, "{bad}");
            assert_eq!(fs_of_volume(bad), None, "{bad}");
        }
    }
}
