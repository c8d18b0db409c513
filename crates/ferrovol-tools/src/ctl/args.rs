//! `ferrovol ctl`'s command line: every subcommand and its arguments.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use ferrovol_csi as csi;
use ferrovol_csi::volume_capability::access_mode::Mode;

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

pub(crate) const EXIT_CODES: &str =
    "Exit codes: 0 done, 2 bad usage, 3 driver unreachable, 4 invalid \
request (INVALID_ARGUMENT, OUT_OF_RANGE), 5 not found, 6 conflict (ALREADY_EXISTS, \
FAILED_PRECONDITION), 7 try again (ABORTED, UNAVAILABLE, DEADLINE_EXCEEDED), 8 no space \
(RESOURCE_EXHAUSTED), 9 not supported (UNIMPLEMENTED), 10 the driver failed (INTERNAL, \
UNKNOWN and any other code).";

/// Deadlines when --timeout is not given.
pub(crate) const QUICK: Duration = Duration::from_secs(60);
pub(crate) const LONG: Duration = Duration::from_secs(3600);

/// The deadline of each kind of call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deadlines {
    pub(crate) quick: Duration,
    pub(crate) long: Duration,
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
    pub(crate) fn wire(&self) -> csi::VolumeCapability {
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
    pub(crate) fn wire(self) -> Mode {
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

pub(crate) fn key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected key=value, got {s:?}"))
}
