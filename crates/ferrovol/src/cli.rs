//! Command-line interface: `ferrovol serve` and friends.
//!
//! Every `serve` flag has a `FERROVOL_*` environment variable so the same
//! binary is configured the same way from a shell, a systemd unit or a pod.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

pub const DEFAULT_DRIVER_NAME: &str = "local.csi.ferrovol.io";

#[derive(Debug, Parser)]
#[command(name = "ferrovol", version = crate::version::VERSION, about = "A Kubernetes CSI storage driver")]
pub struct Cli {
    /// Log output format.
    #[arg(long, global = true, env = "FERROVOL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the CSI gRPC services on a socket.
    Serve(ServeArgs),
    /// The walkthrough, end to end, narrated (needs root).
    Demo(crate::demo::DemoArgs),
    /// A CSI client for any CSI driver.
    Ctl(crate::ctl::CtlArgs),
    /// Liveness prober for any CSI driver: Probe every interval, export
    /// csi_liveness, serve /healthz.
    Probe(crate::prober::ProbeArgs),
    /// Measure the driver: provisioning rate, snapshot/restore/clone latency.
    Bench(crate::bench::BenchArgs),
    /// Manage the local engine's pool.
    #[command(subcommand)]
    Pool(PoolCommand),
}

#[derive(Debug, Subcommand)]
pub enum PoolCommand {
    /// Create a reflink-capable pool (XFS or btrfs on an image file) and
    /// mount it at --dir, for hosts whose filesystem cannot share blocks.
    /// Idempotent: run again with the same arguments, it says the pool is
    /// there (and mounts it if it is not mounted, as after a reboot without
    /// the fstab line).
    Init {
        /// Where the pool is mounted (an empty or missing directory).
        #[arg(long)]
        dir: PathBuf,
        /// Image size, e.g. 20G, 1.5T (binary units).
        #[arg(long, value_parser = crate::units::parse_size)]
        size: u64,
        /// Reserve the image's space on the host now (refused if the host
        /// has less free); without it the image is sparse and grows as
        /// volumes fill.
        #[arg(long)]
        preallocate: bool,
        /// Filesystem of the pool.
        #[arg(long, value_enum, default_value_t = crate::poolinit::PoolFs::Xfs)]
        fs: crate::poolinit::PoolFs,
        /// The image file. Default: <dir>.img beside the directory.
        #[arg(long)]
        image: Option<PathBuf>,
    },
    /// Take down a pool made by `pool init`: unmount it and detach its loop
    /// device, refusing while any of its volumes is attached. The image and
    /// its data stay.
    Release {
        /// Where the pool is mounted.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Check the journal against the pool's files (read-only unless
    /// --repair); exits 0 only when clean. Run it while the driver is
    /// stopped: the driver holds the journal, and runs the same repair at
    /// start-up.
    Check {
        /// The driver's state dir (the pool is <state-dir>/pool).
        #[arg(long, default_value = "./ferrovol-data")]
        state_dir: PathBuf,
        /// The pool, when not under the state dir.
        #[arg(long)]
        pool_dir: Option<PathBuf>,
        /// Finish or roll back interrupted work. Dangling records and
        /// orphaned files are reported, never changed.
        #[arg(long)]
        repair: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The storage engines ferrovol can serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EngineKind {
    /// Volumes are files in a pool directory on this node, copied by
    /// reflink, attached as loop devices.
    Local,
}

/// Which CSI services this process registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Identity + Controller (+ GroupController, SnapshotMetadata).
    Controller,
    /// Identity + Node.
    Node,
    /// Everything: the usual choice for the node-local engine.
    All,
}

impl Mode {
    pub fn controller(self) -> bool {
        matches!(self, Mode::Controller | Mode::All)
    }
    pub fn node(self) -> bool {
        matches!(self, Mode::Node | Mode::All)
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

    /// The storage engine. Only `local` exists so far: volumes are files in
    /// a pool on this node (Ceph RBD is the next engine).
    #[arg(long, env = "FERROVOL_ENGINE", value_enum, default_value_t = EngineKind::Local)]
    pub engine: EngineKind,

    /// Directory for the driver's state (created if missing).
    #[arg(long, env = "FERROVOL_STATE_DIR", default_value = "./ferrovol-data")]
    pub state_dir: PathBuf,

    /// The local engine's pool directory. Default: <state-dir>/pool.
    #[arg(long, env = "FERROVOL_POOL_DIR")]
    pub pool_dir: Option<PathBuf>,

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

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every flag and argument of every subcommand says what it is for.
    #[test]
    fn every_flag_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if arg.is_hide_set() || id == "help" || id == "version" {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_about().is_none() {
                    missing.push(format!("{path} {} (about)", sub.get_name()));
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&super::Cli::command(), "ferrovol", &mut missing);
        assert!(missing.is_empty(), "without help text: {missing:#?}");
    }
}
