//! Answers as a table, JSON or YAML.

use std::time::Duration;

use ferrovol_csi as csi;
use serde_json::{json, Value};

use super::*;

/// A volume, with what ferrovol says of it beyond CSI (its name and
/// creation time, from the facts header); other drivers' show `-`.
pub(crate) fn volume_json(v: &csi::Volume, fact: Option<&csi::facts::VolumeFact>) -> Value {
    use csi::volume_content_source::Type;
    let source = v.content_source.as_ref().and_then(|s| s.r#type.as_ref()).map(|t| match t {
        Type::Snapshot(s) => json!({ "snapshot_id": s.snapshot_id }),
        Type::Volume(s) => json!({ "volume_id": s.volume_id }),
    });
    let created = fact.filter(|f| f.created_unix_nanos > 0).map(|f| {
        crate::units::rfc3339(
            std::time::UNIX_EPOCH + Duration::from_nanos(f.created_unix_nanos as u64),
        )
    });
    json!({
        "volume_id": v.volume_id,
        "name": fact.map(|f| &f.name),
        "capacity_bytes": v.capacity_bytes,
        "created": created,
        "content_source": source,
        "accessible_topology": v.accessible_topology.iter().map(|t| &t.segments).collect::<Vec<_>>(),
        "volume_context": v.volume_context,
    })
}

pub(crate) fn time_json(t: &Option<prost_types::Timestamp>) -> Value {
    let Some(t) = t else { return Value::Null };
    let at = std::time::UNIX_EPOCH
        + Duration::from_secs(t.seconds.max(0) as u64)
        + Duration::from_nanos(t.nanos.max(0) as u64);
    json!(crate::units::rfc3339(at))
}

pub(crate) fn snapshot_json(s: &csi::Snapshot) -> Value {
    json!({
        "snapshot_id": s.snapshot_id,
        "source_volume_id": s.source_volume_id,
        "size_bytes": s.size_bytes,
        "ready_to_use": s.ready_to_use,
        "creation_time": time_json(&s.creation_time),
        "group_snapshot_id": s.group_snapshot_id,
    })
}

pub(crate) fn group_json(g: &csi::VolumeGroupSnapshot) -> Value {
    json!({
        "group_snapshot_id": g.group_snapshot_id,
        "ready_to_use": g.ready_to_use,
        "creation_time": time_json(&g.creation_time),
        "snapshots": g.snapshots.iter().map(snapshot_json).collect::<Vec<_>>(),
    })
}

/// What a command answers: the value (printed as is for JSON and YAML), and
/// for lists the table's columns. Each column is a header and how to show
/// one row's cell.
pub(crate) struct Answer {
    pub(crate) value: Value,
    pub(crate) columns: Vec<(&'static str, Cell)>,
}

#[derive(Clone, Copy)]
pub(crate) enum Cell {
    /// A field shown as it is.
    Text(&'static str),
    /// A byte count: human units unless --bytes.
    Size(&'static str),
    /// An RFC 3339 time shown as an age.
    Age(&'static str),
    /// The volume condition of a list entry.
    Condition,
}

impl From<Value> for Answer {
    fn from(value: Value) -> Answer {
        Answer { value, columns: Vec::new() }
    }
}

pub(crate) fn cell(row: &Value, how: Cell, bytes: bool, now: std::time::SystemTime) -> String {
    let text = |v: &Value| match v {
        Value::String(s) if !s.is_empty() => s.clone(),
        Value::String(_) | Value::Null => "-".into(),
        other => other.to_string(),
    };
    match how {
        Cell::Text(k) => text(&row[k]),
        Cell::Size(k) => match row[k].as_u64() {
            Some(n) if !bytes => crate::units::human_size(n),
            _ => text(&row[k]),
        },
        Cell::Age(k) => row[k]
            .as_str()
            .and_then(|t| humantime::parse_rfc3339(t).ok())
            .map_or_else(|| "-".into(), |t| crate::units::age(t, now)),
        Cell::Condition => match (&row["condition"]["abnormal"], &row["condition"]["message"]) {
            (Value::Bool(true), m) => format!("abnormal: {}", text(m)),
            (Value::Bool(false), _) => "healthy".into(),
            _ => "-".into(),
        },
    }
}

/// Renders an answer: JSON and YAML as they are; a table with a header (also
/// when empty) for lists; `key: value` lines for one object.
pub(crate) fn render(output: Output, answer: &Answer, bytes: bool) -> String {
    let value = &answer.value;
    match output {
        Output::Json => format!("{}\n", serde_json::to_string_pretty(value).unwrap_or_default()),
        Output::Yaml => yaml(value, 0),
        Output::Table => match value {
            Value::Array(rows) if !answer.columns.is_empty() => {
                let now = std::time::SystemTime::now();
                let cells: Vec<Vec<String>> = rows
                    .iter()
                    .map(|r| {
                        answer.columns.iter().map(|(_, how)| cell(r, *how, bytes, now)).collect()
                    })
                    .collect();
                let headers: Vec<String> =
                    answer.columns.iter().map(|(h, _)| h.to_string()).collect();
                let widths: Vec<usize> = (0..headers.len())
                    .map(|i| {
                        cells
                            .iter()
                            .map(|r| r[i].len())
                            .chain([headers[i].len()])
                            .max()
                            .unwrap_or(0)
                    })
                    .collect();
                let line = |cells: &[String]| {
                    let padded: Vec<String> =
                        cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
                    format!("{}\n", padded.join("  ").trim_end())
                };
                std::iter::once(&headers).chain(&cells).map(|r| line(r)).collect()
            }
            Value::Object(map) => map
                .iter()
                .map(|(k, v)| match v {
                    Value::String(s) => format!("{k}: {s}\n"),
                    other => format!("{k}: {other}\n"),
                })
                .collect(),
            other => format!("{other}\n"),
        },
    }
}

/// Writes the answer. A reader that stops early (`| head -1`) is not an
/// error: it has what it wanted, as with any Unix tool.
pub(crate) fn write_stdout(text: &str) -> Result<(), CtlError> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(CtlError::new(exit::FAILED, format!("writing the answer: {e}")))
        }
        _ => Ok(()),
    }
}
