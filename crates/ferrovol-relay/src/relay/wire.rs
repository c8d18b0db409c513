//! What the relay's engine asks agents, as CSI requests, and what they
//! answer, as engine types: the inverse of the services' own conversions.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferrovol_core::engine::{
    AccessMode, AccessType, Condition, GroupSnapshot, Secrets, Snapshot, Topology,
    TopologyRequirement, Volume,
};
use ferrovol_core::services::convert;
use ferrovol_csi as csi;
use ferrovol_error::Result;

pub fn secrets(s: &Secrets) -> HashMap<String, String> {
    s.keys().filter_map(|k| s.get(k).map(|v| (k.to_string(), v.to_string()))).collect()
}

pub fn parameters(p: &BTreeMap<String, String>) -> HashMap<String, String> {
    p.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// The capabilities a relayed CreateVolume carries: the CO's own access
/// modes, each with the volume's access type, so the node decides on what
/// the CO asked rather than on a stand-in.
pub fn capabilities(access: &AccessType, modes: &[AccessMode]) -> Vec<csi::VolumeCapability> {
    use csi::volume_capability::{
        AccessMode as Mode, AccessType as Wire, BlockVolume, MountVolume,
    };
    modes
        .iter()
        .map(|mode| csi::VolumeCapability {
            access_type: Some(match access {
                AccessType::Block => Wire::Block(BlockVolume {}),
                AccessType::Mount { fs_type } => Wire::Mount(MountVolume {
                    fs_type: fs_type.clone(),
                    mount_flags: vec![],
                    volume_mount_group: String::new(),
                }),
            }),
            access_mode: Some(Mode { mode: *mode as i32 }),
        })
        .collect()
}

pub fn requirement(r: &TopologyRequirement) -> csi::TopologyRequirement {
    csi::TopologyRequirement {
        requisite: r.requisite.iter().map(convert::topology).collect(),
        preferred: r.preferred.iter().map(convert::topology).collect(),
    }
}

fn time(t: Option<&prost_types::Timestamp>) -> SystemTime {
    t.map_or(UNIX_EPOCH, |t| {
        UNIX_EPOCH + Duration::new(t.seconds.max(0) as u64, t.nanos.max(0) as u32)
    })
}

fn topology(t: &csi::Topology) -> Topology {
    t.segments.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// A volume as an agent answered it: the CSI message, and what else the
/// volume is from the facts header the agent sent with it (its name,
/// creation time, access type and parameters), so the relay answers what
/// the node said without loss.
pub fn volume(v: csi::Volume, fact: Option<&csi::facts::VolumeFact>) -> Result<Volume> {
    let (name, created, access, parameters) = match fact {
        Some(f) => (
            f.name.clone(),
            UNIX_EPOCH + Duration::from_nanos(f.created_unix_nanos.max(0) as u64),
            match f.block {
                true => AccessType::Block,
                false => AccessType::Mount { fs_type: f.fs_type.clone() },
            },
            f.parameters.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        ),
        None => (
            String::new(),
            UNIX_EPOCH,
            AccessType::Mount { fs_type: String::new() },
            BTreeMap::new(),
        ),
    };
    Ok(Volume {
        id: v.volume_id,
        name,
        capacity: v.capacity_bytes.max(0) as u64,
        source: convert::content_source_from_wire(v.content_source.as_ref())?,
        access,
        parameters,
        context: v.volume_context.into_iter().collect(),
        accessible: v.accessible_topology.iter().map(topology).collect(),
        published_nodes: vec![],
        created,
    })
}

pub fn condition(c: Option<&csi::VolumeCondition>) -> Condition {
    match c {
        Some(c) if c.abnormal => Condition::Abnormal(c.message.clone()),
        _ => Condition::Healthy,
    }
}

pub fn snapshot(s: csi::Snapshot) -> Snapshot {
    Snapshot {
        created: time(s.creation_time.as_ref()),
        id: s.snapshot_id,
        name: String::new(),
        source_volume: s.source_volume_id,
        size: s.size_bytes.max(0) as u64,
        ready: s.ready_to_use,
        group_id: (!s.group_snapshot_id.is_empty()).then_some(s.group_snapshot_id),
    }
}

pub fn group(g: csi::VolumeGroupSnapshot, name: &str) -> GroupSnapshot {
    GroupSnapshot {
        created: time(g.creation_time.as_ref()),
        id: g.group_snapshot_id,
        name: name.to_string(),
        snapshots: g.snapshots.into_iter().map(snapshot).collect(),
        ready: g.ready_to_use,
    }
}

/// A node's part of a group spread over nodes, as the link answers it.
pub fn group_part(p: crate::proto::GroupPartReply) -> GroupSnapshot {
    let at = |nanos: i64| UNIX_EPOCH + Duration::from_nanos(nanos.max(0) as u64);
    GroupSnapshot {
        created: at(p.created_unix_nanos),
        snapshots: p
            .members
            .into_iter()
            .map(|m| Snapshot {
                id: m.snapshot_id,
                name: String::new(),
                source_volume: m.source_volume_id,
                size: m.size_bytes.max(0) as u64,
                created: at(m.created_unix_nanos),
                ready: m.ready,
                group_id: Some(p.group_id.clone()),
            })
            .collect(),
        id: p.group_id,
        name: String::new(),
        ready: p.ready,
    }
}

/// One group from its parts on several nodes: ready when every part is,
/// created when the earliest part was.
pub fn merge_groups(id: &str, parts: Vec<GroupSnapshot>) -> GroupSnapshot {
    let created = parts.iter().map(|p| p.created).min().unwrap_or(UNIX_EPOCH);
    let ready = parts.iter().all(|p| p.ready);
    let name = parts.first().map(|p| p.name.clone()).unwrap_or_default();
    let mut snapshots: Vec<Snapshot> = parts.into_iter().flat_map(|p| p.snapshots).collect();
    snapshots.sort_by(|a, b| a.id.cmp(&b.id));
    GroupSnapshot { id: id.to_string(), name, snapshots, created, ready }
}

/// An agent's max_entries for `want` more entries (0: no limit).
pub fn max_entries(want: usize) -> i32 {
    if want == usize::MAX {
        0
    } else {
        want.min(i32::MAX as usize) as i32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrovol_core::engine::ContentSource;

    /// What the services make of an agent's volume, and back, is that
    /// volume: the relay answers the CO what the node said.
    #[test]
    fn a_volume_survives_the_way_through_the_relay() {
        let created = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let v = Volume {
            id: "vol-0123456789abcdef0123456789abcdef@node-a".into(),
            name: "pvc-1".into(),
            capacity: 1 << 30,
            source: Some(ContentSource::Snapshot("snap-x@node-a".into())),
            access: AccessType::Mount { fs_type: "xfs".into() },
            parameters: BTreeMap::from([("provisioning".to_string(), "thick".to_string())]),
            context: BTreeMap::from([("k".to_string(), "v".to_string())]),
            accessible: vec![BTreeMap::from([(
                "local.csi.ferrovol.io/node".into(),
                "node-a".into(),
            )])],
            published_nodes: vec![],
            created,
        };
        let relayed = volume(convert::volume(&v), Some(&convert::fact(&v))).unwrap();
        assert_eq!(relayed, v);
        assert_eq!(convert::volume(&relayed), convert::volume(&v));
        // Nothing of ferrovol's own in what Kubernetes copies into the PV.
        assert_eq!(convert::volume(&v).volume_context, HashMap::from([("k".into(), "v".into())]));
    }

    #[test]
    fn group_parts_merge_into_one_group() {
        let part = |node: &str, secs: u64, ready: bool| GroupSnapshot {
            id: "xgroup-1".into(),
            name: "g".into(),
            snapshots: vec![Snapshot {
                id: format!("snap-{node}"),
                name: String::new(),
                source_volume: format!("vol-{node}"),
                size: 1,
                created: UNIX_EPOCH + Duration::from_secs(secs),
                ready,
                group_id: Some("xgroup-1".into()),
            }],
            created: UNIX_EPOCH + Duration::from_secs(secs),
            ready,
        };
        let g = merge_groups("xgroup-1", vec![part("b", 20, true), part("a", 10, true)]);
        assert_eq!(
            g.snapshots.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
            ["snap-a", "snap-b"]
        );
        assert_eq!(g.created, UNIX_EPOCH + Duration::from_secs(10));
        assert!(g.ready);
        assert!(!merge_groups("xgroup-1", vec![part("a", 1, true), part("b", 1, false)]).ready);
    }
}
