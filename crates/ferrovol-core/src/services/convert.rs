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

/// The volume as CSI has it: the engine's context is what its node half
/// needs and nothing else (Kubernetes copies it into the PV); what else a
/// volume is travels as [`fact`]s.
pub fn volume(v: &Volume) -> csi::Volume {
    let volume_context: HashMap<String, String> =
        v.context.iter().map(|(k, val)| (k.clone(), val.clone())).collect();
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

/// What a volume is beyond the CSI message, for the facts header.
pub fn fact(v: &Volume) -> csi::facts::VolumeFact {
    let (block, fs_type) = match &v.access {
        crate::engine::AccessType::Block => (true, String::new()),
        crate::engine::AccessType::Mount { fs_type } => (false, fs_type.clone()),
    };
    csi::facts::VolumeFact {
        volume_id: v.id.clone(),
        name: v.name.clone(),
        created_unix_nanos: v
            .created
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i64),
        block,
        fs_type,
        parameters: v.parameters.iter().map(|(k, val)| (k.clone(), val.clone())).collect(),
    }
}

/// The facts header of these volumes, as many as fit in
/// [`csi::facts::BUDGET`] (HTTP/2 peers refuse large header blocks: a
/// listing page of thousands has the facts of its first volumes only, and
/// a client that wants them all asks for smaller pages).
pub fn facts<'a>(volumes: impl IntoIterator<Item = &'a Volume>) -> tonic::metadata::MetadataMap {
    let mut kept = Vec::new();
    let mut size = 0;
    for v in volumes {
        let f = fact(v);
        // A repeated field's tag and length, and base64 expansion.
        size += (prost::Message::encoded_len(&f) + 4) * 4 / 3;
        if size > csi::facts::BUDGET {
            break;
        }
        kept.push(f);
    }
    csi::facts::to_metadata(kept)
}

#[cfg(test)]
mod facts_tests {
    use super::*;

    /// A listing page of thousands carries the facts that fit one header
    /// (a header block past the peer's limit reset the whole stream), and
    /// what it carries decodes.
    #[test]
    fn a_large_page_carries_the_facts_that_fit() {
        let volumes: Vec<Volume> = (0..4096)
            .map(|i| Volume {
                id: format!("vol-{i:032x}@node-with-a-longish-name"),
                name: format!("pvc-{i:08}-0000-4000-8000-000000000000"),
                capacity: 1 << 30,
                source: None,
                access: crate::engine::AccessType::Mount { fs_type: "xfs".into() },
                parameters: [("provisioning".to_string(), "thin".to_string())].into(),
                context: Default::default(),
                accessible: vec![],
                published_nodes: vec![],
                created: std::time::SystemTime::now(),
            })
            .collect();
        let map = facts(&volumes);
        let sent = map.get_bin(csi::facts::HEADER).unwrap().as_encoded_bytes().len();
        assert!(sent <= csi::facts::BUDGET, "{sent} bytes");
        let back = csi::facts::from_metadata(&map);
        assert!(back.len() >= csi::facts::PAGE as usize, "{} facts", back.len());
        assert_eq!(back[&volumes[0].id].name, volumes[0].name);
        assert_eq!(facts(&volumes[..3]).len(), 1);
        assert_eq!(csi::facts::from_metadata(&facts(&volumes[..3])).len(), 3);
    }
}
