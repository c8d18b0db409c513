//! `ferrovol ctl`: a CSI client for humans and scripts, against any CSI
//! driver. This first part covers volumes (create, delete, get, list);
//! errors print the gRPC code and exit with a code per failure class.

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
}

#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// Volumes.
    #[command(subcommand)]
    Volume(VolumeCommand),
}

#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// CreateVolume.
    Create {
        name: String,
        /// Size, e.g. 1G, 512M.
        #[arg(long, value_parser = crate::poolinit::parse_size)]
        size: Option<u64>,
        /// Filesystem for a mount volume (ext4, xfs, btrfs).
        #[arg(long)]
        fs: Option<String>,
        /// A raw block volume instead of a filesystem.
        #[arg(long, conflicts_with = "fs")]
        block: bool,
        #[arg(long, value_enum, default_value_t = AccessMode::SingleNodeWriter)]
        access_mode: AccessMode,
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

fn print_volumes(output: Output, volumes: &[Value]) {
    match output {
        Output::Json if volumes.len() == 1 => {
            println!("{}", serde_json::to_string_pretty(&volumes[0]).unwrap_or_default())
        }
        Output::Json => println!("{}", serde_json::to_string_pretty(volumes).unwrap_or_default()),
        Output::Table => {
            println!("{:<40} {:>14}  SOURCE", "VOLUME ID", "CAPACITY");
            for v in volumes {
                let source = match &v["content_source"] {
                    Value::Object(m) => {
                        m.values().next().and_then(Value::as_str).unwrap_or("-").to_string()
                    }
                    _ => "-".into(),
                };
                println!(
                    "{:<40} {:>14}  {source}",
                    v["volume_id"].as_str().unwrap_or(""),
                    v["capacity_bytes"]
                );
            }
        }
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

pub async fn run(args: CtlArgs) -> Result<(), CtlError> {
    let mut c = csi::controller_client::ControllerClient::new(channel(&args.endpoint).await?);
    let secrets = secrets(&args.secrets_file)?;
    let t = args.timeout;
    match args.command {
        CtlCommand::Volume(cmd) => match cmd {
            VolumeCommand::Create {
                name,
                size,
                fs,
                block,
                access_mode,
                params,
                from_snapshot,
                from_volume,
                topology,
            } => {
                use csi::volume_capability::{
                    AccessMode as Wire, AccessType, BlockVolume, MountVolume,
                };
                use csi::volume_content_source::{SnapshotSource, Type, VolumeSource};
                let access_type = if block {
                    AccessType::Block(BlockVolume {})
                } else {
                    AccessType::Mount(MountVolume {
                        fs_type: fs.unwrap_or_default(),
                        ..Default::default()
                    })
                };
                let source = match (from_snapshot, from_volume) {
                    (Some(id), _) => Some(Type::Snapshot(SnapshotSource { snapshot_id: id })),
                    (_, Some(id)) => Some(Type::Volume(VolumeSource { volume_id: id })),
                    _ => None,
                };
                let req = csi::CreateVolumeRequest {
                    name,
                    capacity_range: size
                        .map(|s| csi::CapacityRange { required_bytes: s as i64, limit_bytes: 0 }),
                    volume_capabilities: vec![csi::VolumeCapability {
                        access_mode: Some(Wire { mode: access_mode.wire() as i32 }),
                        access_type: Some(access_type),
                    }],
                    parameters: params.into_iter().collect(),
                    secrets,
                    volume_content_source: source
                        .map(|s| csi::VolumeContentSource { r#type: Some(s) }),
                    accessibility_requirements: (!topology.is_empty()).then(|| {
                        csi::TopologyRequirement {
                            requisite: vec![csi::Topology {
                                segments: topology.into_iter().collect(),
                            }],
                            preferred: vec![],
                        }
                    }),
                    ..Default::default()
                };
                let v =
                    c.create_volume(request(req, t)).await?.into_inner().volume.unwrap_or_default();
                print_volumes(args.output, &[volume_json(&v)]);
            }
            VolumeCommand::Delete { volume_id } => {
                c.delete_volume(request(
                    csi::DeleteVolumeRequest { volume_id: volume_id.clone(), secrets },
                    t,
                ))
                .await?;
                match args.output {
                    Output::Json => println!("{}", json!({ "deleted": volume_id })),
                    Output::Table => println!("deleted {volume_id}"),
                }
            }
            VolumeCommand::Get { volume_id } => {
                let r = c
                    .controller_get_volume(request(
                        csi::ControllerGetVolumeRequest { volume_id },
                        t,
                    ))
                    .await?
                    .into_inner();
                let mut v = volume_json(&r.volume.unwrap_or_default());
                if let Some(cond) = r.status.and_then(|s| s.volume_condition) {
                    v["condition"] = json!({ "abnormal": cond.abnormal, "message": cond.message });
                }
                print_volumes(args.output, &[v]);
            }
            VolumeCommand::List => {
                let mut all = Vec::new();
                let mut token = String::new();
                loop {
                    let page = c
                        .list_volumes(request(
                            csi::ListVolumesRequest { max_entries: 0, starting_token: token },
                            t,
                        ))
                        .await?
                        .into_inner();
                    all.extend(
                        page.entries.iter().filter_map(|e| e.volume.as_ref()).map(volume_json),
                    );
                    if page.next_token.is_empty() {
                        break;
                    }
                    token = page.next_token;
                }
                match args.output {
                    Output::Json => {
                        println!("{}", serde_json::to_string_pretty(&all).unwrap_or_default())
                    }
                    Output::Table => print_volumes(Output::Table, &all),
                }
            }
        },
    }
    Ok(())
}
