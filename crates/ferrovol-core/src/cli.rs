//! The `serve` flags every engine shares (the binary adds the engine's
//! own). Every flag has a `FERROVOL_*` environment variable so the same
//! binary is configured the same way from a shell, a systemd unit or a pod.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

pub use crate::logging::LogFormat;

pub const DEFAULT_DRIVER_NAME: &str = "local.csi.ferrovol.io";

/// Which CSI services this process registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Identity + Controller (+ GroupController, SnapshotMetadata).
    Controller,
    /// Identity + Node.
    Node,
    /// Everything: the usual choice for the node-local engine on one node.
    All,
    /// The local engine's central controller (a Deployment): Identity +
    /// Controller, each call relayed to the node agent that holds the
    /// volume. No pool of its own.
    Relay,
    /// A node of a relayed cluster (the DaemonSet): everything `all`
    /// serves, and the same controller services to the relay, dialled out
    /// over mutual TLS.
    Agent,
}

impl Mode {
    pub fn controller(self) -> bool {
        matches!(self, Mode::Controller | Mode::All | Mode::Relay | Mode::Agent)
    }
    pub fn node(self) -> bool {
        matches!(self, Mode::Node | Mode::All | Mode::Agent)
    }
    /// The name `--mode` takes.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Controller => "controller",
            Mode::Node => "node",
            Mode::All => "all",
            Mode::Relay => "relay",
            Mode::Agent => "agent",
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// CSI endpoint: unix:///abs/path.sock, a plain path, or tcp://host:port
    /// (debugging only). Default: $CSI_ENDPOINT, else /run/ferrovol/csi.sock
    /// as root ($XDG_RUNTIME_DIR/ferrovol/csi.sock otherwise).
    #[arg(long, visible_alias = "csi-address", env = "FERROVOL_ENDPOINT")]
    pub endpoint: Option<String>,

    /// This node's id as reported to the CO. Default: the hostname.
    #[arg(long, env = "FERROVOL_NODE_ID")]
    pub node_id: Option<String>,

    /// The CSI driver name (must match the CSIDriver object and StorageClasses).
    #[arg(long, env = "FERROVOL_DRIVER_NAME", default_value = DEFAULT_DRIVER_NAME)]
    pub driver_name: String,

    /// Which services to register.
    #[arg(long, env = "FERROVOL_MODE", value_enum, default_value_t = Mode::All)]
    pub mode: Mode,

    /// Directory for the driver's state (created if missing). Default:
    /// /var/lib/ferrovol as root, else $XDG_STATE_HOME/ferrovol.
    #[arg(long, env = "FERROVOL_STATE_DIR",
          default_value_os_t = ferrovol_csi::endpoint::default_state_dir())]
    pub state_dir: PathBuf,

    /// Staging and target paths must lie under this directory.
    #[arg(long, env = "FERROVOL_KUBELET_DIR", default_value = "/var/lib/kubelet")]
    pub kubelet_dir: PathBuf,

    /// Reported in NodeGetInfo; 0 means no limit.
    #[arg(long, env = "FERROVOL_MAX_VOLUMES_PER_NODE", default_value_t = 0)]
    pub max_volumes_per_node: i64,

    /// Serve Prometheus /metrics and /healthz on this address (off if unset).
    #[arg(long, env = "FERROVOL_METRICS_ADDR")]
    pub metrics_addr: Option<String>,

    /// Seconds to let in-flight RPCs finish after SIGTERM/SIGINT.
    #[arg(long, env = "FERROVOL_SHUTDOWN_TIMEOUT", default_value_t = 10)]
    pub shutdown_timeout: u64,
}
