//! The engine's IDs: each says where its object lives, so any controller
//! replica and any node finds it without a database.
//!
//! - volume `rbd:<pool>:<image>`: the image's name is derived from the
//!   CO's request name, so a retried CreateVolume finds its image;
//! - snapshot `rbd-snap:<pool>:<image id>:<hash>`: a user snapshot
//!   `csi-snap-<hash>` of the image with that (stable) id, which survives
//!   the volume's deletion (the image is then hidden, see the engine);
//! - group snapshot `rbd-group:<pool>:<hash>`: RBD group `csi-group-<hash>`
//!   and its one snapshot `<hash>`;
//! - group member `rbd-member:<pool>:<image id>:<hash>`: that image's
//!   snapshot in the group's namespace.
//!
//! Hashes are the UUIDv5 of the CO's name, as 32 hex digits. Pool names
//! are limited to 48 characters of `[A-Za-z0-9._-]` (so `:` separates and
//! every ID stays under CSI's 128 bytes).

use crate::error::{self, Result};

pub const VOLUME: &str = "rbd";
pub const SNAPSHOT: &str = "rbd-snap";
pub const GROUP: &str = "rbd-group";
pub const MEMBER: &str = "rbd-member";

/// The default prefix of image names (ceph-csi's, whose images carry a
/// dashed UUID where ours carry 32 plain hex digits).
pub const DEFAULT_IMAGE_PREFIX: &str = "csi-vol-";
/// Images whose volume was deleted while its snapshots live on.
pub const DELETED_PREFIX: &str = "csi-deleted-";
pub const SNAP_PREFIX: &str = "csi-snap-";
/// The transient snapshot a volume-to-volume clone is made from.
pub const CLONE_SNAP_PREFIX: &str = "csi-clone-";
pub const GROUP_PREFIX: &str = "csi-group-";

/// 32 hex digits naming a CO request name.
pub fn hash(name: &str) -> String {
    uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, name.as_bytes()).simple().to_string()
}

fn is_hash(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// Pool names and image-name prefixes we accept.
pub fn is_plain_name(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

pub fn check_pool(pool: &str) -> Result<()> {
    if is_plain_name(pool, 48) {
        return Ok(());
    }
    Err(error::invalid(format!(
        "pool {pool:?}: pool names must be 1 to 48 characters of letters, digits, '.', '_' and '-'"
    )))
}

/// A volume: its pool and image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeId {
    pub pool: String,
    pub image: String,
}

impl VolumeId {
    pub fn parse(id: &str) -> Option<VolumeId> {
        let mut parts = id.split(':');
        let (Some(VOLUME), Some(pool), Some(image), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        (is_plain_name(pool, 48) && is_plain_name(image, 96))
            .then(|| VolumeId { pool: pool.into(), image: image.into() })
    }

    pub fn render(&self) -> String {
        format!("{VOLUME}:{}:{}", self.pool, self.image)
    }
}

/// A snapshot of one image: a user snapshot, or a group member.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotId {
    pub pool: String,
    pub image_id: String,
    pub hash: String,
    pub member: bool,
}

impl SnapshotId {
    pub fn parse(id: &str) -> Option<SnapshotId> {
        let mut parts = id.split(':');
        let (Some(kind), Some(pool), Some(image_id), Some(hash), None) =
            (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        let member = match kind {
            SNAPSHOT => false,
            MEMBER => true,
            _ => return None,
        };
        let ok = is_plain_name(pool, 48)
            && image_id.len() <= 24
            && !image_id.is_empty()
            && image_id.bytes().all(|b| b.is_ascii_alphanumeric())
            && is_hash(hash);
        ok.then(|| SnapshotId {
            pool: pool.into(),
            image_id: image_id.into(),
            hash: hash.into(),
            member,
        })
    }

    pub fn render(&self) -> String {
        let kind = if self.member { MEMBER } else { SNAPSHOT };
        format!("{kind}:{}:{}:{}", self.pool, self.image_id, self.hash)
    }

    /// The user snapshot's name on its image.
    pub fn snap_name(&self) -> String {
        format!("{SNAP_PREFIX}{}", self.hash)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupId {
    pub pool: String,
    pub hash: String,
}

impl GroupId {
    pub fn parse(id: &str) -> Option<GroupId> {
        let mut parts = id.split(':');
        let (Some(GROUP), Some(pool), Some(hash), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        (is_plain_name(pool, 48) && is_hash(hash))
            .then(|| GroupId { pool: pool.into(), hash: hash.into() })
    }

    pub fn render(&self) -> String {
        format!("{GROUP}:{}:{}", self.pool, self.hash)
    }

    pub fn group_name(&self) -> String {
        format!("{GROUP_PREFIX}{}", self.hash)
    }

    /// The group's one snapshot is named by the same hash.
    pub fn snap_name(&self) -> &str {
        &self.hash
    }

    /// The record of the group's members (a small object in the pool).
    pub fn record(&self) -> String {
        format!("ferrovol.group.{}", self.hash)
    }
}

/// The record naming which image a snapshot name belongs to.
pub fn snapshot_record(hash: &str) -> String {
    format!("ferrovol.snapshot.{hash}")
}

/// Whether an image name is one of our volumes (prefix + 32 hex).
pub fn is_volume_image(name: &str, prefix: &str) -> bool {
    name.strip_prefix(prefix).is_some_and(is_hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_stay_short() {
        let long_pool = "p".repeat(48);
        let v =
            VolumeId { pool: long_pool.clone(), image: format!("{}{}", "x".repeat(32), hash("a")) };
        assert_eq!(VolumeId::parse(&v.render()), Some(v.clone()));
        assert!(v.render().len() <= 128, "{}", v.render().len());
        let s = SnapshotId {
            pool: long_pool.clone(),
            image_id: "1".repeat(24),
            hash: hash("s"),
            member: true,
        };
        assert_eq!(SnapshotId::parse(&s.render()), Some(s.clone()));
        assert!(s.render().len() <= 128);
        let g = GroupId { pool: long_pool, hash: hash("g") };
        assert_eq!(GroupId::parse(&g.render()), Some(g));
    }

    #[test]
    fn malformed_ids_are_refused() {
        for bad in [
            "",
            "rbd:",
            "rbd:pool",
            "rbd:po:ol:img",
            "rbd:pool/x:img",
            "vol-1@n",
            "rbd-snap:pool:id:nothex",
            "rbd-snap:pool::0123456789abcdef0123456789abcdef",
            "rbd-group:pool:0123456789ABCDEF0123456789ABCDEF",
        ] {
            assert!(VolumeId::parse(bad).is_none(), "{bad}");
            assert!(SnapshotId::parse(bad).is_none(), "{bad}");
            assert!(GroupId::parse(bad).is_none(), "{bad}");
        }
        assert!(is_volume_image(&format!("csi-vol-{}", hash("n")), DEFAULT_IMAGE_PREFIX));
        assert!(!is_volume_image(
            "csi-vol-0b3f5c6e-1d2a-4b7e-9f00-123456789abc",
            DEFAULT_IMAGE_PREFIX
        ));
    }
}
