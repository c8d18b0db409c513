//! Engine types to and from CSI wire types.

use std::collections::{BTreeMap, HashMap};
use std::time::{SystemTime, UNIX_EPOCH};

use ferrovol_csi as csi;
use ferrovol_csi::volume_content_source::{SnapshotSource, Type as SourceType, VolumeSource};

use crate::engine::{Condition, ContentSource, Snapshot, Volume};
use crate::error::Result;
use crate::services::validate;

pub fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }
}

pub fn topology(segments: &BTreeMap<String, String>) -> csi::Topology {
    csi::Topology { segments: segments.iter().map(|(k, v)| (k.clone(), v.clone())).collect() }
}

pub fn content_source_to_wire(s: &ContentSource) -> csi::VolumeContentSource {
    csi::VolumeContentSource {
        r#type: Some(match s {
            ContentSource::Snapshot(id) => {
                SourceType::Snapshot(SnapshotSource { snapshot_id: id.clone() })
            }
            ContentSource::Volume(id) => SourceType::Volume(VolumeSource { volume_id: id.clone() }),
        }),
    }
}

/// A requested content source; an empty oneof or ID is INVALID_ARGUMENT.
pub fn content_source_from_wire(
    s: Option<&csi::VolumeContentSource>,
) -> Result<Option<ContentSource>> {
    let Some(s) = s else { return Ok(None) };
    match &s.r#type {
        None => Err(crate::error::invalid("volume_content_source names no snapshot or volume")),
        Some(SourceType::Snapshot(x)) => {
            validate::id(&x.snapshot_id, "volume_content_source.snapshot.snapshot_id")?;
            Ok(Some(ContentSource::Snapshot(x.snapshot_id.clone())))
        }
        Some(SourceType::Volume(x)) => {
            validate::id(&x.volume_id, "volume_content_source.volume.volume_id")?;
            Ok(Some(ContentSource::Volume(x.volume_id.clone())))
        }
    }
}

pub fn volume(v: &Volume) -> csi::Volume {
    // The engine's context (what its node half needs), then the name and
    // creation time, for people and tools listing volumes (`ferrovol ctl
    // volume list`); the node side does not need those.
    let mut volume_context: HashMap<String, String> =
        v.context.iter().map(|(k, val)| (k.clone(), val.clone())).collect();
    volume_context.insert(csi::context::NAME.to_string(), v.name.clone());
    volume_context.insert(csi::context::CREATED.to_string(), crate::units::rfc3339(v.created));
    csi::Volume {
        capacity_bytes: v.capacity as i64,
        volume_id: v.id.clone(),
        volume_context,
        content_source: v.source.as_ref().map(content_source_to_wire),
        accessible_topology: v.accessible.iter().map(topology).collect(),
    }
}

pub fn snapshot(s: &Snapshot) -> csi::Snapshot {
    csi::Snapshot {
        size_bytes: s.size as i64,
        snapshot_id: s.id.clone(),
        source_volume_id: s.source_volume.clone(),
        creation_time: Some(timestamp(s.created)),
        ready_to_use: s.ready,
        group_snapshot_id: s.group_id.clone().unwrap_or_default(),
    }
}

pub fn condition(c: &Condition) -> csi::VolumeCondition {
    match c {
        Condition::Healthy => csi::VolumeCondition { abnormal: false, message: "healthy".into() },
        Condition::Abnormal(m) => csi::VolumeCondition { abnormal: true, message: m.clone() },
    }
}
