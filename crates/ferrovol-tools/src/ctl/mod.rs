//! `ferrovol ctl`: a CSI client for humans and scripts, against any CSI
//! driver. Results go to stdout (table, JSON or YAML); errors print the gRPC
//! code and exit with a code per failure class; calls that take a while show
//! their progress on a terminal and stay quiet when piped.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use ferrovol_csi as csi;
use serde_json::{json, Value};
use tonic::transport::Channel;

use crate::endpoint::{self, Endpoint};

mod args;
mod errors;
mod render;
mod yaml;

pub use args::*;
pub use errors::*;
use render::*;
use yaml::yaml;

fn secrets(path: &Option<PathBuf>) -> Result<HashMap<String, String>, CtlError> {
    let Some(p) = path else { return Ok(HashMap::new()) };
    let text = std::fs::read_to_string(p)
        .map_err(|e| CtlError::new(exit::USAGE, format!("reading {}: {e}", p.display())))?;
    Ok(text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            l.split_once('=').map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        })
        .collect())
}

async fn channel(given: Option<&str>) -> Result<Channel, CtlError> {
    let ep = endpoint::resolve(given).map_err(|m| CtlError::new(exit::USAGE, m))?;
    endpoint::connect(&ep).await.map_err(|e| {
        let why = match &ep {
            Endpoint::Unix(path) => endpoint::diagnose(path),
            Endpoint::Tcp(_) => e.to_string(),
        };
        CtlError::new(exit::UNREACHABLE, format!("cannot reach {ep}: {why}"))
    })
}

fn request<T>(message: T, timeout: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.set_timeout(timeout);
    r
}

/// Awaits a call; on a terminal, shows how long it has been running once it
/// takes more than a moment (copies on non-reflink pools, restores).
async fn progress<T>(label: &str, call: impl std::future::Future<Output = T>) -> T {
    use std::io::{IsTerminal, Write};
    if !std::io::stderr().is_terminal() {
        return call.await;
    }
    tokio::pin!(call);
    let started = std::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.tick().await;
    let mut shown = false;
    loop {
        tokio::select! {
            out = &mut call => {
                if shown {
                    eprintln!("\r{label}: done in {:.1}s   ", started.elapsed().as_secs_f64());
                }
                return out;
            }
            _ = tick.tick() => {
                shown = true;
                eprint!("\r{label}: {:.1}s …", started.elapsed().as_secs_f64());
                let _ = std::io::stderr().flush();
            }
        }
    }
}

fn names<T>(
    types: impl Iterator<Item = i32>,
    name: fn(i32) -> Option<T>,
    text: fn(&T) -> &'static str,
) -> Vec<&'static str> {
    types.filter_map(name).map(|t| text(&t)).collect()
}

async fn info(ch: Channel, t: Duration) -> Result<Value, CtlError> {
    use csi::controller_service_capability::rpc::Type as C;
    use csi::group_controller_service_capability::rpc::Type as G;
    use csi::node_service_capability::rpc::Type as N;
    use csi::plugin_capability::{service::Type as S, volume_expansion::Type as E, Type as P};
    let mut id = csi::identity_client::IdentityClient::new(ch.clone());
    let plugin = id.get_plugin_info(request(csi::GetPluginInfoRequest {}, t)).await?.into_inner();
    let caps = id
        .get_plugin_capabilities(request(csi::GetPluginCapabilitiesRequest {}, t))
        .await?
        .into_inner();
    let plugin_caps: Vec<String> = caps
        .capabilities
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(P::Service(s)) => S::try_from(s.r#type).ok().map(|x| x.as_str_name().to_string()),
            Some(P::VolumeExpansion(e)) => {
                E::try_from(e.r#type).ok().map(|x| format!("VOLUME_EXPANSION_{}", x.as_str_name()))
            }
            None => None,
        })
        .collect();
    // Services a driver does not serve answer UNIMPLEMENTED: shown as absent.
    let absent = |r: Result<Vec<&'static str>, tonic::Status>| match r {
        Ok(v) => Ok(Some(v)),
        Err(s) if s.code() == tonic::Code::Unimplemented => Ok(None),
        Err(s) => Err(CtlError::from(s)),
    };
    let controller = absent(
        csi::controller_client::ControllerClient::new(ch.clone())
            .controller_get_capabilities(request(csi::ControllerGetCapabilitiesRequest {}, t))
            .await
            .map(|r| {
                let types = r.into_inner().capabilities.into_iter().filter_map(|c| {
                    c.r#type.map(|csi::controller_service_capability::Type::Rpc(r)| r.r#type)
                });
                names(types, |v| C::try_from(v).ok(), C::as_str_name)
            }),
    )?;
    let node = absent(
        csi::node_client::NodeClient::new(ch.clone())
            .node_get_capabilities(request(csi::NodeGetCapabilitiesRequest {}, t))
            .await
            .map(|r| {
                let types = r.into_inner().capabilities.into_iter().filter_map(|c| {
                    c.r#type.map(|csi::node_service_capability::Type::Rpc(r)| r.r#type)
                });
                names(types, |v| N::try_from(v).ok(), N::as_str_name)
            }),
    )?;
    let group = absent(
        csi::group_controller_client::GroupControllerClient::new(ch.clone())
            .group_controller_get_capabilities(request(
                csi::GroupControllerGetCapabilitiesRequest {},
                t,
            ))
            .await
            .map(|r| {
                let types = r.into_inner().capabilities.into_iter().filter_map(|c| {
                    c.r#type.map(|csi::group_controller_service_capability::Type::Rpc(r)| r.r#type)
                });
                names(types, |v| G::try_from(v).ok(), G::as_str_name)
            }),
    )?;
    let node_info = match csi::node_client::NodeClient::new(ch)
        .node_get_info(request(csi::NodeGetInfoRequest {}, t))
        .await
    {
        Ok(r) => {
            let r = r.into_inner();
            json!({
                "node_id": r.node_id,
                "max_volumes_per_node": r.max_volumes_per_node,
                "topology": r.accessible_topology.map(|t| t.segments),
            })
        }
        Err(s) if s.code() == tonic::Code::Unimplemented => Value::Null,
        Err(s) => return Err(s.into()),
    };
    Ok(json!({
        "name": plugin.name,
        "vendor_version": plugin.vendor_version,
        "manifest": plugin.manifest,
        "plugin_capabilities": plugin_caps,
        "controller_capabilities": controller,
        "node_capabilities": node,
        "group_controller_capabilities": group,
        "node": node_info,
    }))
}

pub async fn run(args: CtlArgs) -> Result<(), CtlError> {
    let ch = channel(args.endpoint.as_deref()).await?;
    let secrets = secrets(&args.secrets_file)?;
    let d = Deadlines { quick: args.timeout.unwrap_or(QUICK), long: args.timeout.unwrap_or(LONG) };
    let t = d.quick;
    let mut c = csi::controller_client::ControllerClient::new(ch.clone());
    let answer: Answer = match args.command {
        CtlCommand::Info => info(ch, t).await?.into(),
        CtlCommand::Probe => {
            let mut id = csi::identity_client::IdentityClient::new(ch);
            let r = id.probe(request(csi::ProbeRequest {}, t)).await?.into_inner();
            json!({ "ready": r.ready.unwrap_or(true) }).into()
        }
        CtlCommand::Capacity { cap, params, topology } => {
            let r = c
                .get_capacity(request(
                    csi::GetCapacityRequest {
                        volume_capabilities: vec![cap.wire()],
                        parameters: params.into_iter().collect(),
                        accessible_topology: (!topology.is_empty())
                            .then(|| csi::Topology { segments: topology.into_iter().collect() }),
                    },
                    t,
                ))
                .await?
                .into_inner();
            json!({
                "available_capacity": r.available_capacity,
                "maximum_volume_size": r.maximum_volume_size,
                "minimum_volume_size": r.minimum_volume_size,
            })
            .into()
        }
        CtlCommand::Volume(cmd) => volume(&mut c, cmd, secrets, d, args.output).await?,
        CtlCommand::Snapshot(cmd) => snapshot(&mut c, cmd, secrets, d, args.output).await?,
        CtlCommand::GroupSnapshot(cmd) => group(ch, cmd, secrets, d).await?.into(),
        CtlCommand::Node(cmd) => node(ch, cmd, secrets, d).await?.into(),
        CtlCommand::Metadata(cmd) => metadata(ch, cmd, secrets, t).await?.into(),
    };
    write_stdout(&render(args.output, &answer, args.bytes))
}

/// Whether a call's NOT_FOUND answer means "there is nothing": the driver
/// answered NOT_FOUND (true), it found the object (false). A driver that
/// cannot look objects up (UNIMPLEMENTED) is taken as "it may exist".
fn is_missing<T>(r: Result<T, tonic::Status>) -> Result<bool, CtlError> {
    match r {
        Ok(_) => Ok(false),
        Err(s) if s.code() == tonic::Code::NotFound => Ok(true),
        Err(s) if s.code() == tonic::Code::Unimplemented => Ok(false),
        Err(s) => Err(s.into()),
    }
}

/// What `delete` says when the object did not exist: DeleteVolume and
/// DeleteSnapshot succeed either way (they are idempotent), so ctl asks
/// first and says there was nothing to delete.
fn nothing_to_delete(kind: &str, id: &str, output: Output) -> Value {
    if output == Output::Table {
        eprintln!("ferrovol ctl: nothing to delete: no {kind} {id}");
    }
    json!({ "deleted": null, "not_found": id })
}

async fn volume(
    c: &mut csi::controller_client::ControllerClient<Channel>,
    cmd: VolumeCommand,
    secrets: HashMap<String, String>,
    d: Deadlines,
    output: Output,
) -> Result<Answer, CtlError> {
    let t = d.quick;
    Ok(match cmd {
        VolumeCommand::Create { name, size, cap, params, from_snapshot, from_volume, topology } => {
            use csi::volume_content_source::{SnapshotSource, Type, VolumeSource};
            let source = match (from_snapshot, from_volume) {
                (Some(id), _) => Some(Type::Snapshot(SnapshotSource { snapshot_id: id })),
                (_, Some(id)) => Some(Type::Volume(VolumeSource { volume_id: id })),
                _ => None,
            };
            let req = csi::CreateVolumeRequest {
                name,
                capacity_range: size
                    .map(|s| csi::CapacityRange { required_bytes: s as i64, limit_bytes: 0 }),
                volume_capabilities: vec![cap.wire()],
                parameters: params.into_iter().collect(),
                secrets,
                volume_content_source: source.map(|s| csi::VolumeContentSource { r#type: Some(s) }),
                accessibility_requirements: (!topology.is_empty()).then(|| {
                    csi::TopologyRequirement {
                        requisite: vec![csi::Topology { segments: topology.into_iter().collect() }],
                        preferred: vec![],
                    }
                }),
                ..Default::default()
            };
            let r = progress("creating volume", c.create_volume(request(req, d.long))).await?;
            let facts = csi::facts::from_metadata(r.metadata());
            let volume = r.into_inner().volume.unwrap_or_default();
            let mut v = volume_json(&volume, facts.get(&volume.volume_id));
            if size.is_none() {
                let chosen = v["capacity_bytes"].as_u64().unwrap_or(0);
                if output == Output::Table {
                    eprintln!(
                        "ferrovol ctl: no --size given: the driver's default size was used ({})",
                        crate::units::human_size(chosen)
                    );
                }
                v["default_size"] = json!(true);
            }
            v.into()
        }
        VolumeCommand::Delete { volume_id } => {
            let get = csi::ControllerGetVolumeRequest { volume_id: volume_id.clone() };
            if is_missing(c.controller_get_volume(request(get, t)).await)? {
                return Ok(nothing_to_delete("volume", &volume_id, output).into());
            }
            c.delete_volume(request(
                csi::DeleteVolumeRequest { volume_id: volume_id.clone(), secrets },
                t,
            ))
            .await?;
            json!({ "deleted": volume_id }).into()
        }
        VolumeCommand::Get { volume_id } => {
            let r = c
                .controller_get_volume(request(csi::ControllerGetVolumeRequest { volume_id }, t))
                .await?;
            let facts = csi::facts::from_metadata(r.metadata());
            let r = r.into_inner();
            let volume = r.volume.unwrap_or_default();
            let mut v = volume_json(&volume, facts.get(&volume.volume_id));
            if let Some(cond) = r.status.and_then(|s| s.volume_condition) {
                v["condition"] = json!({ "abnormal": cond.abnormal, "message": cond.message });
            }
            v.into()
        }
        VolumeCommand::List => {
            let mut all = Vec::new();
            let mut token = String::new();
            loop {
                // Pages whose facts (names, ages) fit one header.
                let req = csi::ListVolumesRequest {
                    max_entries: csi::facts::PAGE,
                    starting_token: token,
                };
                let page = c.list_volumes(request(req, t)).await?;
                let facts = csi::facts::from_metadata(page.metadata());
                let page = page.into_inner();
                for entry in &page.entries {
                    let Some(volume) = &entry.volume else { continue };
                    let mut v = volume_json(volume, facts.get(&volume.volume_id));
                    let status = entry.status.as_ref();
                    if let Some(cond) = status.and_then(|s| s.volume_condition.as_ref()) {
                        v["condition"] =
                            json!({ "abnormal": cond.abnormal, "message": cond.message });
                    }
                    all.push(v);
                }
                if page.next_token.is_empty() {
                    break;
                }
                token = page.next_token;
            }
            Answer {
                value: Value::Array(all),
                columns: vec![
                    ("ID", Cell::Text("volume_id")),
                    ("NAME", Cell::Text("name")),
                    ("SIZE", Cell::Size("capacity_bytes")),
                    ("CONDITION", Cell::Condition),
                    ("AGE", Cell::Age("created")),
                ],
            }
        }
        VolumeCommand::Expand { volume_id, size } => {
            let req = csi::ControllerExpandVolumeRequest {
                volume_id,
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: size as i64,
                    limit_bytes: 0,
                }),
                secrets,
                volume_capability: None,
            };
            let r = match c.controller_expand_volume(request(req, d.long)).await {
                Err(s) if s.code() == tonic::Code::Unimplemented => {
                    let mut e = CtlError::from(s);
                    e.message.push_str(
                        "\nthis driver grows volumes on the node, where they are staged: use \
                         `ferrovol ctl node expand VOLUME_ID --path STAGING_PATH --size SIZE`",
                    );
                    return Err(e);
                }
                r => r?.into_inner(),
            };
            json!({ "capacity_bytes": r.capacity_bytes, "node_expansion_required": r.node_expansion_required }).into()
        }
        VolumeCommand::Validate { volume_id, cap } => {
            let req = csi::ValidateVolumeCapabilitiesRequest {
                volume_id,
                volume_capabilities: vec![cap.wire()],
                secrets,
                ..Default::default()
            };
            let r = c.validate_volume_capabilities(request(req, t)).await?.into_inner();
            json!({ "confirmed": r.confirmed.is_some(), "message": r.message }).into()
        }
    })
}

async fn snapshot(
    c: &mut csi::controller_client::ControllerClient<Channel>,
    cmd: SnapshotCommand,
    secrets: HashMap<String, String>,
    d: Deadlines,
    output: Output,
) -> Result<Answer, CtlError> {
    let t = d.quick;
    Ok(match cmd {
        SnapshotCommand::Create { name, volume } => {
            let req = csi::CreateSnapshotRequest {
                source_volume_id: volume,
                name,
                secrets,
                ..Default::default()
            };
            let r = progress("creating snapshot", c.create_snapshot(request(req, d.long))).await?;
            snapshot_json(&r.into_inner().snapshot.unwrap_or_default()).into()
        }
        SnapshotCommand::Delete { snapshot_id } => {
            let get = csi::GetSnapshotRequest {
                snapshot_id: snapshot_id.clone(),
                secrets: secrets.clone(),
            };
            if is_missing(c.get_snapshot(request(get, t)).await)? {
                return Ok(nothing_to_delete("snapshot", &snapshot_id, output).into());
            }
            let req = csi::DeleteSnapshotRequest { snapshot_id: snapshot_id.clone(), secrets };
            c.delete_snapshot(request(req, t)).await?;
            json!({ "deleted": snapshot_id }).into()
        }
        SnapshotCommand::Get { snapshot_id } => {
            let r = c
                .get_snapshot(request(csi::GetSnapshotRequest { snapshot_id, secrets }, t))
                .await?;
            snapshot_json(&r.into_inner().snapshot.unwrap_or_default()).into()
        }
        SnapshotCommand::List { volume } => {
            let mut all = Vec::new();
            let mut token = String::new();
            loop {
                let req = csi::ListSnapshotsRequest {
                    starting_token: token,
                    source_volume_id: volume.clone().unwrap_or_default(),
                    secrets: secrets.clone(),
                    ..Default::default()
                };
                let page = c.list_snapshots(request(req, t)).await?.into_inner();
                all.extend(
                    page.entries.iter().filter_map(|e| e.snapshot.as_ref()).map(snapshot_json),
                );
                if page.next_token.is_empty() {
                    break;
                }
                token = page.next_token;
            }
            Answer {
                value: Value::Array(all),
                columns: vec![
                    ("ID", Cell::Text("snapshot_id")),
                    ("SOURCE VOLUME", Cell::Text("source_volume_id")),
                    ("SIZE", Cell::Size("size_bytes")),
                    ("READY", Cell::Text("ready_to_use")),
                    ("AGE", Cell::Age("creation_time")),
                    ("GROUP", Cell::Text("group_snapshot_id")),
                ],
            }
        }
    })
}

async fn group(
    ch: Channel,
    cmd: GroupCommand,
    secrets: HashMap<String, String>,
    d: Deadlines,
) -> Result<Value, CtlError> {
    let t = d.quick;
    let mut g = csi::group_controller_client::GroupControllerClient::new(ch);
    Ok(match cmd {
        GroupCommand::Create { name, volumes } => {
            let req = csi::CreateVolumeGroupSnapshotRequest {
                name,
                source_volume_ids: volumes,
                secrets,
                ..Default::default()
            };
            let r = progress(
                "creating group snapshot",
                g.create_volume_group_snapshot(request(req, d.long)),
            )
            .await?;
            group_json(&r.into_inner().group_snapshot.unwrap_or_default())
        }
        GroupCommand::Delete { group_snapshot_id } => {
            let req = csi::DeleteVolumeGroupSnapshotRequest {
                group_snapshot_id: group_snapshot_id.clone(),
                snapshot_ids: vec![],
                secrets,
            };
            g.delete_volume_group_snapshot(request(req, t)).await?;
            json!({ "deleted": group_snapshot_id })
        }
        GroupCommand::Get { group_snapshot_id } => {
            let req = csi::GetVolumeGroupSnapshotRequest {
                group_snapshot_id,
                snapshot_ids: vec![],
                secrets,
            };
            let r = g.get_volume_group_snapshot(request(req, t)).await?;
            group_json(&r.into_inner().group_snapshot.unwrap_or_default())
        }
    })
}

async fn node(
    ch: Channel,
    cmd: NodeCommand,
    secrets: HashMap<String, String>,
    d: Deadlines,
) -> Result<Value, CtlError> {
    let t = d.quick;
    let mut n = csi::node_client::NodeClient::new(ch);
    Ok(match cmd {
        NodeCommand::Stage { volume_id, staging, cap } => {
            let req = csi::NodeStageVolumeRequest {
                volume_id: volume_id.clone(),
                staging_target_path: staging.clone(),
                volume_capability: Some(cap.wire()),
                secrets,
                ..Default::default()
            };
            progress("staging", n.node_stage_volume(request(req, d.long))).await?;
            json!({ "staged": volume_id, "staging_target_path": staging })
        }
        NodeCommand::Publish { volume_id, staging, target, readonly, cap } => {
            let req = csi::NodePublishVolumeRequest {
                volume_id: volume_id.clone(),
                staging_target_path: staging,
                target_path: target.clone(),
                volume_capability: Some(cap.wire()),
                readonly,
                secrets,
                ..Default::default()
            };
            n.node_publish_volume(request(req, t)).await?;
            json!({ "published": volume_id, "target_path": target })
        }
        NodeCommand::Unpublish { volume_id, target } => {
            let req = csi::NodeUnpublishVolumeRequest {
                volume_id: volume_id.clone(),
                target_path: target,
            };
            n.node_unpublish_volume(request(req, t)).await?;
            json!({ "unpublished": volume_id })
        }
        NodeCommand::Unstage { volume_id, staging } => {
            let req = csi::NodeUnstageVolumeRequest {
                volume_id: volume_id.clone(),
                staging_target_path: staging,
            };
            n.node_unstage_volume(request(req, t)).await?;
            json!({ "unstaged": volume_id })
        }
        NodeCommand::Stats { volume_id, path } => {
            let req = csi::NodeGetVolumeStatsRequest {
                volume_id,
                volume_path: path,
                ..Default::default()
            };
            let r = n.node_get_volume_stats(request(req, t)).await?.into_inner();
            let usage: Vec<Value> = r
                .usage
                .iter()
                .map(|u| {
                    let unit = csi::volume_usage::Unit::try_from(u.unit).map(|x| x.as_str_name()).unwrap_or("UNKNOWN");
                    json!({ "unit": unit, "total": u.total, "used": u.used, "available": u.available })
                })
                .collect();
            let cond =
                r.volume_condition.map(|c| json!({ "abnormal": c.abnormal, "message": c.message }));
            json!({ "usage": usage, "condition": cond })
        }
        NodeCommand::Expand { volume_id, path, size } => {
            let req = csi::NodeExpandVolumeRequest {
                volume_id,
                volume_path: path,
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: size as i64,
                    limit_bytes: 0,
                }),
                secrets,
                ..Default::default()
            };
            let r = progress("expanding", n.node_expand_volume(request(req, d.long)))
                .await?
                .into_inner();
            json!({ "capacity_bytes": r.capacity_bytes })
        }
    })
}

async fn metadata(
    ch: Channel,
    cmd: MetadataCommand,
    secrets: HashMap<String, String>,
    t: Duration,
) -> Result<Value, CtlError> {
    let mut m = csi::snapshot_metadata_client::SnapshotMetadataClient::new(ch);
    let mut ranges = Vec::new();
    let mut capacity = 0;
    match cmd {
        MetadataCommand::Allocated { snapshot_id, start, max } => {
            let req = csi::GetMetadataAllocatedRequest {
                snapshot_id,
                starting_offset: start,
                max_results: max,
                secrets,
            };
            let mut stream = m.get_metadata_allocated(request(req, t)).await?.into_inner();
            while let Some(msg) = stream.message().await? {
                capacity = msg.volume_capacity_bytes;
                ranges
                    .extend(msg.block_metadata.into_iter().map(|b| (b.byte_offset, b.size_bytes)));
            }
        }
        MetadataCommand::Delta { base_snapshot_id, target_snapshot_id, start, max } => {
            let req = csi::GetMetadataDeltaRequest {
                base_snapshot_id,
                target_snapshot_id,
                starting_offset: start,
                max_results: max,
                secrets,
            };
            let mut stream = m.get_metadata_delta(request(req, t)).await?.into_inner();
            while let Some(msg) = stream.message().await? {
                capacity = msg.volume_capacity_bytes;
                ranges
                    .extend(msg.block_metadata.into_iter().map(|b| (b.byte_offset, b.size_bytes)));
            }
        }
    }
    let total: i64 = ranges.iter().map(|r| r.1).sum();
    Ok(json!({
        "volume_capacity_bytes": capacity,
        "ranges": ranges.iter().map(|(o, l)| json!({ "byte_offset": o, "size_bytes": l })).collect::<Vec<_>>(),
        "total_bytes": total,
    }))
}
