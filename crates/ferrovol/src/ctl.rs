//! `ferrovol ctl`: a CSI client for humans and scripts, against any CSI
//! driver. Results go to stdout (table, JSON or YAML); errors print the gRPC
//! code and exit with a code per failure class; calls that take a while show
//! their progress on a terminal and stay quiet when piped.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use ferrovol_csi as csi;
use ferrovol_csi::volume_capability::access_mode::Mode;
use serde_json::{json, Value};
use tonic::transport::Channel;

use crate::endpoint::{self, Endpoint};

#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The driver's CSI endpoint.
    #[arg(
        long,
        env = "CSI_ENDPOINT",
        global = true,
        default_value = "unix://./ferrovol-data/csi.sock"
    )]
    pub endpoint: String,
    /// Output format.
    #[arg(long, short, value_enum, global = true, default_value_t = Output::Table)]
    pub output: Output,
    /// Deadline for each call, e.g. 30s.
    #[arg(long, global = true, default_value = "60s", value_parser = crate::prober::parse_duration)]
    pub timeout: Duration,
    /// A file of `key=value` lines sent as the request's secrets.
    #[arg(long, global = true)]
    pub secrets_file: Option<PathBuf>,
    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
    Yaml,
}

#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// Plugin info, every capability, and node info in one view.
    Info,
    /// Probe.
    Probe,
    /// GetCapacity.
    Capacity {
        #[command(flatten)]
        cap: CapArgs,
        #[arg(long = "param", value_parser = key_value)]
        params: Vec<(String, String)>,
        /// Topology segment `key=value`, repeatable.
        #[arg(long = "topology", value_parser = key_value)]
        topology: Vec<(String, String)>,
    },
    /// Volumes.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Snapshots.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Group snapshots.
    #[command(subcommand)]
    GroupSnapshot(GroupCommand),
    /// Node calls, for exercising the node side by hand.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Changed-block tracking (SnapshotMetadata streams).
    #[command(subcommand)]
    Metadata(MetadataCommand),
}

/// A volume capability from the command line.
#[derive(Debug, Clone, Args)]
pub struct CapArgs {
    /// Filesystem for a mount volume (ext4, xfs, btrfs).
    #[arg(long)]
    pub fs: Option<String>,
    /// A raw block volume instead of a filesystem.
    #[arg(long, conflicts_with = "fs")]
    pub block: bool,
    #[arg(long, value_enum, default_value_t = AccessMode::SingleNodeWriter)]
    pub access_mode: AccessMode,
}

impl CapArgs {
    fn wire(&self) -> csi::VolumeCapability {
        use csi::volume_capability::{AccessMode as Wire, AccessType, BlockVolume, MountVolume};
        csi::VolumeCapability {
            access_mode: Some(Wire { mode: self.access_mode.wire() as i32 }),
            access_type: Some(if self.block {
                AccessType::Block(BlockVolume {})
            } else {
                AccessType::Mount(MountVolume {
                    fs_type: self.fs.clone().unwrap_or_default(),
                    ..Default::default()
                })
            }),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// CreateSnapshot of a volume.
    Create {
        name: String,
        #[arg(long)]
        volume: String,
    },
    /// DeleteSnapshot.
    Delete { snapshot_id: String },
    /// GetSnapshot.
    Get { snapshot_id: String },
    /// ListSnapshots (all pages), optionally of one volume.
    List {
        #[arg(long)]
        volume: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// CreateVolumeGroupSnapshot of several volumes at one instant.
    Create {
        name: String,
        #[arg(required = true)]
        volumes: Vec<String>,
    },
    /// DeleteVolumeGroupSnapshot.
    Delete { group_snapshot_id: String },
    /// GetVolumeGroupSnapshot.
    Get { group_snapshot_id: String },
}

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// NodeStageVolume.
    Stage {
        volume_id: String,
        #[arg(long)]
        staging: String,
        #[command(flatten)]
        cap: CapArgs,
    },
    /// NodePublishVolume.
    Publish {
        volume_id: String,
        #[arg(long)]
        staging: String,
        #[arg(long)]
        target: String,
        #[arg(long)]
        readonly: bool,
        #[command(flatten)]
        cap: CapArgs,
    },
    /// NodeUnpublishVolume.
    Unpublish {
        volume_id: String,
        #[arg(long)]
        target: String,
    },
    /// NodeUnstageVolume.
    Unstage {
        volume_id: String,
        #[arg(long)]
        staging: String,
    },
    /// NodeGetVolumeStats.
    Stats {
        volume_id: String,
        #[arg(long)]
        path: String,
    },
    /// NodeExpandVolume.
    Expand {
        volume_id: String,
        #[arg(long)]
        path: String,
        #[arg(long, value_parser = crate::poolinit::parse_size)]
        size: u64,
    },
}

#[derive(Debug, Subcommand)]
pub enum MetadataCommand {
    /// GetMetadataAllocated: the allocated ranges of a snapshot.
    Allocated {
        snapshot_id: String,
        #[arg(long, default_value_t = 0)]
        start: i64,
        #[arg(long, default_value_t = 0)]
        max: i32,
    },
    /// GetMetadataDelta: the ranges that changed between two snapshots.
    Delta {
        base_snapshot_id: String,
        target_snapshot_id: String,
        #[arg(long, default_value_t = 0)]
        start: i64,
        #[arg(long, default_value_t = 0)]
        max: i32,
    },
}

#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// CreateVolume.
    Create {
        name: String,
        /// Size, e.g. 1G, 512M.
        #[arg(long, value_parser = crate::poolinit::parse_size)]
        size: Option<u64>,
        #[command(flatten)]
        cap: CapArgs,
        /// StorageClass-style parameters, `key=value`, repeatable.
        #[arg(long = "param", value_parser = key_value)]
        params: Vec<(String, String)>,
        #[arg(long, conflicts_with = "from_volume")]
        from_snapshot: Option<String>,
        #[arg(long)]
        from_volume: Option<String>,
        /// Required topology segment `key=value`, repeatable.
        #[arg(long = "topology", value_parser = key_value)]
        topology: Vec<(String, String)>,
    },
    /// DeleteVolume.
    Delete { volume_id: String },
    /// ControllerGetVolume.
    Get { volume_id: String },
    /// ListVolumes (all pages).
    List,
    /// ControllerExpandVolume (drivers that grow volumes on the node answer
    /// UNIMPLEMENTED; use `ctl node expand`).
    Expand {
        volume_id: String,
        #[arg(long, value_parser = crate::poolinit::parse_size)]
        size: u64,
    },
    /// ValidateVolumeCapabilities.
    Validate {
        volume_id: String,
        #[command(flatten)]
        cap: CapArgs,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AccessMode {
    SingleNodeWriter,
    SingleNodeReaderOnly,
    SingleNodeSingleWriter,
    SingleNodeMultiWriter,
    MultiNodeReaderOnly,
    MultiNodeSingleWriter,
    MultiNodeMultiWriter,
}

impl AccessMode {
    fn wire(self) -> Mode {
        match self {
            AccessMode::SingleNodeWriter => Mode::SingleNodeWriter,
            AccessMode::SingleNodeReaderOnly => Mode::SingleNodeReaderOnly,
            AccessMode::SingleNodeSingleWriter => Mode::SingleNodeSingleWriter,
            AccessMode::SingleNodeMultiWriter => Mode::SingleNodeMultiWriter,
            AccessMode::MultiNodeReaderOnly => Mode::MultiNodeReaderOnly,
            AccessMode::MultiNodeSingleWriter => Mode::MultiNodeSingleWriter,
            AccessMode::MultiNodeMultiWriter => Mode::MultiNodeMultiWriter,
        }
    }
}

fn key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected key=value, got {s:?}"))
}

/// Exit codes by failure class, so scripts can branch without parsing text.
pub mod exit {
    pub const USAGE: u8 = 2;
    pub const UNREACHABLE: u8 = 3;
    pub const INVALID: u8 = 4;
    pub const NOT_FOUND: u8 = 5;
    pub const CONFLICT: u8 = 6;
    pub const RETRY: u8 = 7;
    pub const NO_SPACE: u8 = 8;
    pub const UNSUPPORTED: u8 = 9;
    pub const FAILED: u8 = 10;
}

/// A failed ctl run: what to print and the exit code.
#[derive(Debug)]
pub struct CtlError {
    pub message: String,
    pub code: u8,
}

impl From<tonic::Status> for CtlError {
    fn from(s: tonic::Status) -> CtlError {
        use tonic::Code::*;
        let code = match s.code() {
            InvalidArgument | OutOfRange => exit::INVALID,
            NotFound => exit::NOT_FOUND,
            AlreadyExists | FailedPrecondition => exit::CONFLICT,
            Aborted | Unavailable | DeadlineExceeded => exit::RETRY,
            ResourceExhausted => exit::NO_SPACE,
            Unimplemented => exit::UNSUPPORTED,
            _ => exit::FAILED,
        };
        CtlError { message: format!("{:?}: {}", s.code(), s.message()), code }
    }
}

fn secrets(path: &Option<PathBuf>) -> Result<HashMap<String, String>, CtlError> {
    let Some(p) = path else { return Ok(HashMap::new()) };
    let text = std::fs::read_to_string(p).map_err(|e| CtlError {
        message: format!("reading {}: {e}", p.display()),
        code: exit::USAGE,
    })?;
    Ok(text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            l.split_once('=').map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        })
        .collect())
}

fn volume_json(v: &csi::Volume) -> Value {
    use csi::volume_content_source::Type;
    let source = v.content_source.as_ref().and_then(|s| s.r#type.as_ref()).map(|t| match t {
        Type::Snapshot(s) => json!({ "snapshot_id": s.snapshot_id }),
        Type::Volume(s) => json!({ "volume_id": s.volume_id }),
    });
    json!({
        "volume_id": v.volume_id,
        "capacity_bytes": v.capacity_bytes,
        "content_source": source,
        "accessible_topology": v.accessible_topology.iter().map(|t| &t.segments).collect::<Vec<_>>(),
        "volume_context": v.volume_context,
    })
}

fn snapshot_json(s: &csi::Snapshot) -> Value {
    json!({
        "snapshot_id": s.snapshot_id,
        "source_volume_id": s.source_volume_id,
        "size_bytes": s.size_bytes,
        "ready_to_use": s.ready_to_use,
        "creation_time": s.creation_time.as_ref().map(|t| t.seconds),
        "group_snapshot_id": s.group_snapshot_id,
    })
}

fn group_json(g: &csi::VolumeGroupSnapshot) -> Value {
    json!({
        "group_snapshot_id": g.group_snapshot_id,
        "ready_to_use": g.ready_to_use,
        "creation_time": g.creation_time.as_ref().map(|t| t.seconds),
        "snapshots": g.snapshots.iter().map(snapshot_json).collect::<Vec<_>>(),
    })
}

/// Renders a result: JSON and YAML as they are; a table for lists of
/// objects, `key: value` lines for one object.
fn emit(output: Output, value: &Value) {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(value).unwrap_or_default()),
        Output::Yaml => print!("{}", yaml(value, 0)),
        Output::Table => match value {
            Value::Array(rows) if rows.iter().all(Value::is_object) => {
                let Some(first) = rows.first().and_then(Value::as_object) else { return };
                let cols: Vec<&String> = first
                    .keys()
                    .filter(|k| rows.iter().all(|r| !r[k.as_str()].is_object()))
                    .collect();
                let cell = |v: &Value| match v {
                    Value::String(s) => s.clone(),
                    Value::Null => "-".into(),
                    other => other.to_string(),
                };
                let widths: Vec<usize> = cols
                    .iter()
                    .map(|c| {
                        rows.iter()
                            .map(|r| cell(&r[c.as_str()]).len())
                            .max()
                            .unwrap_or(0)
                            .max(c.len())
                    })
                    .collect();
                let line = |cells: Vec<String>| {
                    cells
                        .iter()
                        .zip(&widths)
                        .map(|(c, w)| format!("{c:<w$}"))
                        .collect::<Vec<_>>()
                        .join("  ")
                };
                println!("{}", line(cols.iter().map(|c| c.to_uppercase()).collect()));
                for r in rows {
                    println!("{}", line(cols.iter().map(|c| cell(&r[c.as_str()])).collect()));
                }
            }
            Value::Object(map) => {
                for (k, v) in map {
                    match v {
                        Value::String(s) => println!("{k}: {s}"),
                        other => println!("{k}: {other}"),
                    }
                }
            }
            other => println!("{other}"),
        },
    }
}

/// A small YAML emitter for JSON values (block style, quoted strings).
fn yaml(v: &Value, indent: usize) -> String {
    let pad = " ".repeat(indent);
    match v {
        Value::Object(m) if m.is_empty() => "{}\n".into(),
        Value::Array(a) if a.is_empty() => "[]\n".into(),
        Value::Object(m) => m
            .iter()
            .map(|(k, v)| match v {
                Value::Object(c) if !c.is_empty() => format!("{pad}{k}:\n{}", yaml(v, indent + 2)),
                Value::Array(c) if !c.is_empty() => format!("{pad}{k}:\n{}", yaml(v, indent + 2)),
                _ => format!("{pad}{k}: {}", yaml(v, 0)),
            })
            .collect(),
        Value::Array(a) => a
            .iter()
            .map(|item| {
                let body = yaml(item, indent + 2);
                format!("{pad}- {}", body.trim_start())
            })
            .collect(),
        Value::String(s) => format!("{}\n", serde_json::to_string(s).unwrap_or_default()),
        other => format!("{other}\n"),
    }
}

async fn channel(endpoint: &str) -> Result<Channel, CtlError> {
    let ep =
        Endpoint::parse(endpoint).map_err(|message| CtlError { message, code: exit::USAGE })?;
    endpoint::connect(&ep).await.map_err(|e| CtlError {
        message: format!("cannot reach {ep}: {e}"),
        code: exit::UNREACHABLE,
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
    let ch = channel(&args.endpoint).await?;
    let secrets = secrets(&args.secrets_file)?;
    let t = args.timeout;
    let mut c = csi::controller_client::ControllerClient::new(ch.clone());
    let value = match args.command {
        CtlCommand::Info => info(ch, t).await?,
        CtlCommand::Probe => {
            let mut id = csi::identity_client::IdentityClient::new(ch);
            let r = id.probe(request(csi::ProbeRequest {}, t)).await?.into_inner();
            json!({ "ready": r.ready.unwrap_or(true) })
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
        }
        CtlCommand::Volume(cmd) => volume(&mut c, cmd, secrets, t).await?,
        CtlCommand::Snapshot(cmd) => snapshot(&mut c, cmd, secrets, t).await?,
        CtlCommand::GroupSnapshot(cmd) => group(ch, cmd, secrets, t).await?,
        CtlCommand::Node(cmd) => node(ch, cmd, secrets, t).await?,
        CtlCommand::Metadata(cmd) => metadata(ch, cmd, secrets, t).await?,
    };
    emit(args.output, &value);
    Ok(())
}

async fn volume(
    c: &mut csi::controller_client::ControllerClient<Channel>,
    cmd: VolumeCommand,
    secrets: HashMap<String, String>,
    t: Duration,
) -> Result<Value, CtlError> {
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
            let r = progress("creating volume", c.create_volume(request(req, t))).await?;
            volume_json(&r.into_inner().volume.unwrap_or_default())
        }
        VolumeCommand::Delete { volume_id } => {
            c.delete_volume(request(
                csi::DeleteVolumeRequest { volume_id: volume_id.clone(), secrets },
                t,
            ))
            .await?;
            json!({ "deleted": volume_id })
        }
        VolumeCommand::Get { volume_id } => {
            let r = c
                .controller_get_volume(request(csi::ControllerGetVolumeRequest { volume_id }, t))
                .await?;
            let r = r.into_inner();
            let mut v = volume_json(&r.volume.unwrap_or_default());
            if let Some(cond) = r.status.and_then(|s| s.volume_condition) {
                v["condition"] = json!({ "abnormal": cond.abnormal, "message": cond.message });
            }
            v
        }
        VolumeCommand::List => {
            let mut all = Vec::new();
            let mut token = String::new();
            loop {
                let req = csi::ListVolumesRequest { max_entries: 0, starting_token: token };
                let page = c.list_volumes(request(req, t)).await?.into_inner();
                all.extend(page.entries.iter().filter_map(|e| e.volume.as_ref()).map(volume_json));
                if page.next_token.is_empty() {
                    break;
                }
                token = page.next_token;
            }
            Value::Array(all)
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
            let r = c.controller_expand_volume(request(req, t)).await?.into_inner();
            json!({ "capacity_bytes": r.capacity_bytes, "node_expansion_required": r.node_expansion_required })
        }
        VolumeCommand::Validate { volume_id, cap } => {
            let req = csi::ValidateVolumeCapabilitiesRequest {
                volume_id,
                volume_capabilities: vec![cap.wire()],
                secrets,
                ..Default::default()
            };
            let r = c.validate_volume_capabilities(request(req, t)).await?.into_inner();
            json!({ "confirmed": r.confirmed.is_some(), "message": r.message })
        }
    })
}

async fn snapshot(
    c: &mut csi::controller_client::ControllerClient<Channel>,
    cmd: SnapshotCommand,
    secrets: HashMap<String, String>,
    t: Duration,
) -> Result<Value, CtlError> {
    Ok(match cmd {
        SnapshotCommand::Create { name, volume } => {
            let req = csi::CreateSnapshotRequest {
                source_volume_id: volume,
                name,
                secrets,
                ..Default::default()
            };
            let r = progress("creating snapshot", c.create_snapshot(request(req, t))).await?;
            snapshot_json(&r.into_inner().snapshot.unwrap_or_default())
        }
        SnapshotCommand::Delete { snapshot_id } => {
            let req = csi::DeleteSnapshotRequest { snapshot_id: snapshot_id.clone(), secrets };
            c.delete_snapshot(request(req, t)).await?;
            json!({ "deleted": snapshot_id })
        }
        SnapshotCommand::Get { snapshot_id } => {
            let r = c
                .get_snapshot(request(csi::GetSnapshotRequest { snapshot_id, secrets }, t))
                .await?;
            snapshot_json(&r.into_inner().snapshot.unwrap_or_default())
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
            Value::Array(all)
        }
    })
}

async fn group(
    ch: Channel,
    cmd: GroupCommand,
    secrets: HashMap<String, String>,
    t: Duration,
) -> Result<Value, CtlError> {
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
                g.create_volume_group_snapshot(request(req, t)),
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
    t: Duration,
) -> Result<Value, CtlError> {
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
            progress("staging", n.node_stage_volume(request(req, t))).await?;
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
            let r =
                progress("expanding", n.node_expand_volume(request(req, t))).await?.into_inner();
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
