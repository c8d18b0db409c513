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
#[command(after_help = EXIT_CODES)]
pub struct CtlArgs {
    /// The driver's CSI endpoint: unix:///path, a path, or tcp://host:port.
    /// Default: $CSI_ENDPOINT, else the default socket of `ferrovol serve`
    /// (/run/ferrovol/csi.sock as root).
    #[arg(long, visible_alias = "csi-address", env = "FERROVOL_ENDPOINT", global = true)]
    pub endpoint: Option<String>,
    /// Output format. Errors follow it: with json, an error is a JSON object
    /// on stderr.
    #[arg(long, short, value_enum, global = true, default_value_t = Output::Table)]
    pub output: Output,
    /// Sizes in the table as exact bytes instead of human units (KiB, MiB,
    /// GiB: binary).
    #[arg(long, global = true)]
    pub bytes: bool,
    /// Deadline for each call, e.g. 30s, 10m. Default: 60s, and 1h for calls
    /// that may copy data or make a filesystem (create from a snapshot or
    /// volume, snapshots, group snapshots, stage, expand).
    #[arg(long, global = true, value_parser = crate::units::parse_duration)]
    pub timeout: Option<Duration>,
    /// A file of `key=value` lines sent as the request's secrets.
    #[arg(long, global = true)]
    pub secrets_file: Option<PathBuf>,
    #[command(subcommand)]
    pub command: CtlCommand,
}

const EXIT_CODES: &str = "Exit codes: 0 done, 2 bad usage, 3 driver unreachable, 4 invalid \
request (INVALID_ARGUMENT, OUT_OF_RANGE), 5 not found, 6 conflict (ALREADY_EXISTS, \
FAILED_PRECONDITION), 7 try again (ABORTED, UNAVAILABLE, DEADLINE_EXCEEDED), 8 no space \
(RESOURCE_EXHAUSTED), 9 not supported (UNIMPLEMENTED), 10 the driver failed (INTERNAL, \
UNKNOWN and any other code).";

/// Deadlines when --timeout is not given.
const QUICK: Duration = Duration::from_secs(60);
const LONG: Duration = Duration::from_secs(3600);

/// The deadline of each kind of call.
#[derive(Debug, Clone, Copy)]
struct Deadlines {
    quick: Duration,
    long: Duration,
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
        /// StorageClass-style parameter `key=value`, repeatable.
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
    /// The access mode asked for.
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
        /// The snapshot's name (the CO's idempotency key).
        name: String,
        /// The volume to snapshot.
        #[arg(long)]
        volume: String,
    },
    /// DeleteSnapshot.
    Delete {
        /// The snapshot to delete.
        snapshot_id: String,
    },
    /// GetSnapshot.
    Get {
        /// The snapshot to show.
        snapshot_id: String,
    },
    /// ListSnapshots (all pages), optionally of one volume.
    List {
        /// Only snapshots of this volume.
        #[arg(long)]
        volume: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// CreateVolumeGroupSnapshot of several volumes at one instant.
    Create {
        /// The group snapshot's name.
        name: String,
        /// The volumes it covers.
        #[arg(required = true)]
        volumes: Vec<String>,
    },
    /// DeleteVolumeGroupSnapshot.
    Delete {
        /// The group snapshot to delete, with its member snapshots.
        group_snapshot_id: String,
    },
    /// GetVolumeGroupSnapshot.
    Get {
        /// The group snapshot to show.
        group_snapshot_id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// NodeStageVolume.
    Stage {
        /// The volume to stage.
        volume_id: String,
        /// The staging directory (under the driver's kubelet dir).
        #[arg(long)]
        staging: String,
        #[command(flatten)]
        cap: CapArgs,
    },
    /// NodePublishVolume.
    Publish {
        /// The volume to publish.
        volume_id: String,
        /// Where it was staged.
        #[arg(long)]
        staging: String,
        /// The pod's target path.
        #[arg(long)]
        target: String,
        /// Publish read-only.
        #[arg(long)]
        readonly: bool,
        #[command(flatten)]
        cap: CapArgs,
    },
    /// NodeUnpublishVolume.
    Unpublish {
        /// The volume to unpublish.
        volume_id: String,
        /// The target path it was published at.
        #[arg(long)]
        target: String,
    },
    /// NodeUnstageVolume.
    Unstage {
        /// The volume to unstage.
        volume_id: String,
        /// The staging path it was staged at.
        #[arg(long)]
        staging: String,
    },
    /// NodeGetVolumeStats.
    Stats {
        /// The volume to measure.
        volume_id: String,
        /// A path where it is staged or published.
        #[arg(long)]
        path: String,
    },
    /// NodeExpandVolume: grow the filesystem (and the volume, on drivers
    /// that grow on the node).
    Expand {
        /// The volume to grow.
        volume_id: String,
        /// A path where it is staged or published.
        #[arg(long)]
        path: String,
        /// The new size, e.g. 2G, 1.5G (binary units).
        #[arg(long, value_parser = crate::units::parse_size)]
        size: u64,
    },
}

#[derive(Debug, Subcommand)]
pub enum MetadataCommand {
    /// GetMetadataAllocated: the allocated ranges of a snapshot.
    Allocated {
        /// The snapshot.
        snapshot_id: String,
        /// Byte offset to start from.
        #[arg(long, default_value_t = 0)]
        start: i64,
        /// Ranges per streamed message (0: the driver's choice).
        #[arg(long, default_value_t = 0)]
        max: i32,
    },
    /// GetMetadataDelta: the ranges that changed between two snapshots.
    Delta {
        /// The older snapshot.
        base_snapshot_id: String,
        /// The newer snapshot, of the same volume.
        target_snapshot_id: String,
        /// Byte offset to start from.
        #[arg(long, default_value_t = 0)]
        start: i64,
        /// Ranges per streamed message (0: the driver's choice).
        #[arg(long, default_value_t = 0)]
        max: i32,
    },
}

#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// CreateVolume.
    Create {
        /// The volume's name (the CO's idempotency key).
        name: String,
        /// Size, e.g. 1G, 1.5G, 512M (binary units: 1G = 1 GiB). Without it
        /// the driver picks its default size.
        #[arg(long, value_parser = crate::units::parse_size)]
        size: Option<u64>,
        #[command(flatten)]
        cap: CapArgs,
        /// StorageClass-style parameters, `key=value`, repeatable.
        #[arg(long = "param", value_parser = key_value)]
        params: Vec<(String, String)>,
        /// Restore this snapshot into the new volume.
        #[arg(long, conflicts_with = "from_volume")]
        from_snapshot: Option<String>,
        /// Clone this volume into the new volume.
        #[arg(long)]
        from_volume: Option<String>,
        /// Required topology segment `key=value`, repeatable.
        #[arg(long = "topology", value_parser = key_value)]
        topology: Vec<(String, String)>,
    },
    /// DeleteVolume.
    Delete {
        /// The volume to delete.
        volume_id: String,
    },
    /// ControllerGetVolume.
    Get {
        /// The volume to show.
        volume_id: String,
    },
    /// ListVolumes (all pages): ID, name, size, condition and age.
    List,
    /// ControllerExpandVolume (drivers that grow volumes on the node answer
    /// UNIMPLEMENTED; use `ctl node expand`).
    Expand {
        /// The volume to grow.
        volume_id: String,
        /// The new size, e.g. 2G, 1.5G (binary units).
        #[arg(long, value_parser = crate::units::parse_size)]
        size: u64,
    },
    /// ValidateVolumeCapabilities.
    Validate {
        /// The volume to check.
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
    /// The gRPC code, when the driver answered with one.
    pub grpc: Option<&'static str>,
}

impl CtlError {
    fn new(code: u8, message: impl Into<String>) -> CtlError {
        CtlError { message: message.into(), code, grpc: None }
    }

    /// The error as ctl prints it (once, on stderr): a line of text, or a
    /// JSON object when the output is JSON.
    pub fn render(&self, output: Output) -> String {
        match output {
            Output::Json => json!({ "error": {
                "message": self.message,
                "grpc_code": self.grpc,
                "exit_code": self.code,
            }})
            .to_string(),
            _ => format!("ferrovol ctl: {}", self.message),
        }
    }
}

impl From<tonic::Status> for CtlError {
    fn from(s: tonic::Status) -> CtlError {
        use tonic::Code::*;
        let code = match s.code() {
            InvalidArgument | OutOfRange => exit::INVALID,
            NotFound => exit::NOT_FOUND,
            AlreadyExists | FailedPrecondition => exit::CONFLICT,
            Aborted | Unavailable | DeadlineExceeded => exit::RETRY,
            // No CSI driver answers these: the call was cut off (the driver
            // stopped or crashed mid-call, the connection broke). Nothing
            // says it failed; it may have been done, and a retry finds out.
            Unknown | Cancelled => exit::RETRY,
            ResourceExhausted => exit::NO_SPACE,
            Unimplemented => exit::UNSUPPORTED,
            _ => exit::FAILED,
        };
        let name = crate::error::code_name(s.code());
        CtlError { message: format!("{name}: {}", s.message()), code, grpc: Some(name) }
    }
}

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

fn volume_json(v: &csi::Volume) -> Value {
    use csi::volume_content_source::Type;
    let source = v.content_source.as_ref().and_then(|s| s.r#type.as_ref()).map(|t| match t {
        Type::Snapshot(s) => json!({ "snapshot_id": s.snapshot_id }),
        Type::Volume(s) => json!({ "volume_id": s.volume_id }),
    });
    json!({
        "volume_id": v.volume_id,
        // ferrovol says these in the context; other drivers' show `-`.
        "name": v.volume_context.get(csi::context::NAME),
        "capacity_bytes": v.capacity_bytes,
        "created": v.volume_context.get(csi::context::CREATED),
        "content_source": source,
        "accessible_topology": v.accessible_topology.iter().map(|t| &t.segments).collect::<Vec<_>>(),
        "volume_context": v.volume_context,
    })
}

fn time_json(t: &Option<prost_types::Timestamp>) -> Value {
    let Some(t) = t else { return Value::Null };
    let at = std::time::UNIX_EPOCH
        + Duration::from_secs(t.seconds.max(0) as u64)
        + Duration::from_nanos(t.nanos.max(0) as u64);
    json!(crate::units::rfc3339(at))
}

fn snapshot_json(s: &csi::Snapshot) -> Value {
    json!({
        "snapshot_id": s.snapshot_id,
        "source_volume_id": s.source_volume_id,
        "size_bytes": s.size_bytes,
        "ready_to_use": s.ready_to_use,
        "creation_time": time_json(&s.creation_time),
        "group_snapshot_id": s.group_snapshot_id,
    })
}

fn group_json(g: &csi::VolumeGroupSnapshot) -> Value {
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
struct Answer {
    value: Value,
    columns: Vec<(&'static str, Cell)>,
}

#[derive(Clone, Copy)]
enum Cell {
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

fn cell(row: &Value, how: Cell, bytes: bool, now: std::time::SystemTime) -> String {
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
fn render(output: Output, answer: &Answer, bytes: bool) -> String {
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
fn write_stdout(text: &str) -> Result<(), CtlError> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(CtlError::new(exit::FAILED, format!("writing the answer: {e}")))
        }
        _ => Ok(()),
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
            let mut v = volume_json(&r.into_inner().volume.unwrap_or_default());
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
            let r = r.into_inner();
            let mut v = volume_json(&r.volume.unwrap_or_default());
            if let Some(cond) = r.status.and_then(|s| s.volume_condition) {
                v["condition"] = json!({ "abnormal": cond.abnormal, "message": cond.message });
            }
            v.into()
        }
        VolumeCommand::List => {
            let mut all = Vec::new();
            let mut token = String::new();
            loop {
                let req = csi::ListVolumesRequest { max_entries: 0, starting_token: token };
                let page = c.list_volumes(request(req, t)).await?.into_inner();
                for entry in &page.entries {
                    let Some(volume) = &entry.volume else { continue };
                    let mut v = volume_json(volume);
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
