//! Command-line interface: `ferrovol serve` and friends.
//!
//! Every `serve` flag has a `FERROVOL_*` environment variable so the same
//! binary is configured the same way from a shell, a systemd unit or a pod.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

pub use ferrovol_core::cli::{LogFormat, ServeArgs as CommonServeArgs};

#[derive(Debug, Parser)]
#[command(name = "ferrovol", version = env!("FERROVOL_VERSION"), about = "A Kubernetes CSI storage driver")]
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
    Serve(Box<ServeCommand>),
    /// The walkthrough, end to end, narrated (needs root).
    Demo(ferrovol_tools::demo::DemoArgs),
    /// A CSI client for any CSI driver.
    Ctl(ferrovol_tools::ctl::CtlArgs),
    /// Liveness prober for any CSI driver: Probe every interval, export
    /// csi_liveness, serve /healthz.
    Probe(ferrovol_tools::prober::ProbeArgs),
    /// Measure the driver: provisioning rate, snapshot/restore/clone latency.
    Bench(ferrovol_tools::bench::BenchArgs),
    /// Manage the local engine's pool.
    #[command(subcommand)]
    Pool(PoolCommand),
    /// The link between the relay (the central controller) and the node
    /// agents.
    #[command(subcommand)]
    Link(LinkCommand),
}

#[derive(Debug, Subcommand)]
pub enum LinkCommand {
    /// Make the link's CA (kept in DIR/ca, key and all) and the relay's
    /// certificate (DIR/relay); with --node, issue a node's own certificate
    /// (DIR/nodes/NAME) from the CA in DIR. Each node's agent needs its
    /// own: the relay admits a node's link only with that node's
    /// certificate. Each directory holds ca.crt, tls.crt and tls.key.
    Certs {
        /// Where the CA, the relay's and the nodes' certificates go.
        #[arg(long)]
        out: PathBuf,
        /// Issue a certificate for this node (repeatable; its node ID, as
        /// --node-id or the hostname, a DNS name). The CA in --out is made
        /// first if there is none.
        #[arg(long = "node", value_name = "NAME")]
        nodes: Vec<String>,
        /// How long the certificates are valid, in days.
        #[arg(long, default_value_t = 3650)]
        days: u32,
        /// Replace a CA already in --out. A new CA breaks every agent and
        /// relay still holding the old one at its next restart, so this is
        /// never done without asking.
        #[arg(long)]
        force: bool,
    },
    /// Print the relay's Kubernetes Secret (from `link certs --out DIR`),
    /// ready for `kubectl apply -f -`.
    Secret {
        /// The directory `link certs --out` wrote.
        #[arg(long)]
        dir: PathBuf,
        /// The Secret's namespace.
        #[arg(long, default_value = "ferrovol")]
        namespace: String,
    },
}

/// The relay link's flags (`serve --mode relay` and `--mode agent`).
#[derive(Debug, Clone, Args)]
pub struct LinkArgs {
    /// Relay: where node agents connect (host:port), e.g. 0.0.0.0:7443.
    #[arg(long, env = "FERROVOL_LINK_LISTEN")]
    pub link_listen: Option<String>,

    /// Agent: the relay's address (host:port, or several comma-separated);
    /// every address a name resolves to is a replica, and each is dialled
    /// (a headless Service).
    #[arg(long, env = "FERROVOL_LINK_CONTROLLER")]
    pub link_controller: Option<String>,

    /// A directory with this end's ca.crt, tls.crt and tls.key (a mounted
    /// Secret from `ferrovol link certs`).
    #[arg(long, env = "FERROVOL_LINK_TLS")]
    pub link_tls: Option<PathBuf>,

    /// Relay: the longest a group snapshot spread over nodes keeps its
    /// members frozen; past it the snapshot is ABORTED and retried.
    #[arg(long, env = "FERROVOL_GROUP_FREEZE_LIMIT", default_value = "3s",
          value_parser = ferrovol_csi::units::parse_duration)]
    pub group_freeze_limit: std::time::Duration,

    /// Relay: a node the operator declares gone for good, with its disk
    /// (repeatable, or comma-separated). Its volumes and snapshots are
    /// lost: deletes of them answer OK, lookups NOT_FOUND, listings leave
    /// it out, and its link is refused should it come back. Never done on
    /// a mere disconnect; logged at start and on every answer it changes.
    #[arg(long = "retired-node", env = "FERROVOL_RETIRED_NODES", value_delimiter = ',')]
    pub retired_nodes: Vec<String>,
}

/// `ferrovol serve`: the flags every engine shares, the engine, and its own.
#[derive(Debug, Clone, Args)]
pub struct ServeCommand {
    #[command(flatten)]
    pub common: CommonServeArgs,

    /// The storage engine: `local` (volumes are files in a pool on this
    /// node), `rbd` (volumes are Ceph RBD images) or `cephfs` (volumes are
    /// CephFS subvolumes).
    #[arg(long, env = "FERROVOL_ENGINE", value_enum, default_value_t = EngineKind::Local)]
    pub engine: EngineKind,

    /// The local engine's pool directory. Default: <state-dir>/pool.
    #[arg(long, env = "FERROVOL_POOL_DIR")]
    pub pool_dir: Option<PathBuf>,

    #[command(flatten)]
    pub link: LinkArgs,

    #[command(flatten)]
    pub rbd: RbdArgs,
}

/// The RBD engine's flags (`--engine rbd`).
#[derive(Debug, Clone, Args)]
pub struct RbdArgs {
    /// ceph.conf naming the monitors. Default: librados' own search
    /// ($CEPH_CONF, /etc/ceph/ceph.conf).
    #[arg(long, env = "FERROVOL_CEPH_CONF")]
    pub ceph_conf: Option<PathBuf>,

    /// Client id (without "client.") for calls that carry no secrets
    /// (listings, capacity, Probe) and for requests without secrets.
    #[arg(long, env = "FERROVOL_CEPH_USER")]
    pub ceph_user: Option<String>,

    /// Keyring of that client.
    #[arg(long, env = "FERROVOL_CEPH_KEYRING")]
    pub ceph_keyring: Option<PathBuf>,

    /// Instead of --ceph-user/--ceph-keyring: a directory holding a
    /// Kubernetes Secret with ceph-csi's keys, one file per key (as a Secret
    /// volume mounts it): adminID/adminKey (the controller; else
    /// userID/userKey) or userID/userKey (the node).
    #[arg(long, env = "FERROVOL_CEPH_SECRET_DIR", conflicts_with_all = ["ceph_user", "ceph_keyring"])]
    pub ceph_secret_dir: Option<PathBuf>,

    /// Pools that ListVolumes, ListSnapshots, metrics and capacity cover
    /// (comma-separated). Volumes in other pools work all the same.
    #[arg(long, env = "FERROVOL_RBD_POOLS", value_delimiter = ',', default_value = "rbd")]
    pub rbd_pools: Vec<String>,

    /// A clone whose chain of parents is longer than this is flattened in
    /// the background, so chains never grow without bound.
    #[arg(long, env = "FERROVOL_RBD_MAX_CLONE_DEPTH", default_value_t = 4)]
    pub rbd_max_clone_depth: u32,

    /// How the node maps images: the kernel's rbd, rbd-nbd, or rbd-fuse and
    /// a loop device; auto takes the first that works here.
    #[arg(long, env = "FERROVOL_RBD_MAPPER", value_enum, default_value = "auto")]
    pub rbd_mapper: ferrovol_rbd::mapper::Choice,

    /// A cgroup v2 directory (made if missing) the node's fuse helpers
    /// (ceph-fuse, rbd-fuse) are started in, outside the node container's
    /// cgroup, so the pods' mounts outlive a restart of the container, not
    /// only of the driver: the host's cgroup file system mounted in the
    /// container, e.g. /host/sys/fs/cgroup/ferrovol-helpers, with hostPID.
    #[arg(long, env = "FERROVOL_HELPER_CGROUP")]
    pub helper_cgroup: Option<PathBuf>,

    /// Seconds connecting to Ceph or an OSD call may take before it fails.
    /// Monitor and manager commands wait for their answer: Pacific's
    /// librados cannot safely give up on a manager command.
    #[arg(long, env = "FERROVOL_CEPH_TIMEOUT", default_value_t = 30)]
    pub ceph_timeout: u64,

    /// CephFS: the file systems ListVolumes, metrics and capacity cover
    /// (comma-separated); request names are claimed in the first one's
    /// metadata pool. Volumes on others work all the same.
    #[arg(
        long,
        env = "FERROVOL_CEPHFS_FILESYSTEMS",
        value_delimiter = ',',
        default_value = "cephfs"
    )]
    pub cephfs_filesystems: Vec<String>,

    /// CephFS: how long a CreateVolume from a snapshot waits for the copy
    /// before it answers ABORTED (the provisioner retries; keep it well
    /// under the provisioner's --timeout).
    #[arg(long, env = "FERROVOL_CEPHFS_RESTORE_WAIT", default_value = "20s",
          value_parser = ferrovol_csi::units::parse_duration)]
    pub cephfs_restore_wait: std::time::Duration,

    /// CephFS: who copies a snapshot's data into a restore or a clone:
    /// `ferrovol` (its own parallel copy through libcephfs: keeps hard
    /// links and extended attributes, resumes after a restart) or
    /// `manager` (the Ceph manager's cloner).
    #[arg(long, env = "FERROVOL_CEPHFS_COPIER", value_enum, default_value_t = CephFsCopier::Ferrovol)]
    pub cephfs_copier: CephFsCopier,

    /// CephFS: how long a copy nobody asks about (the claim was deleted
    /// and the provisioner stopped retrying) runs before it is stopped and
    /// what it made removed.
    #[arg(long, env = "FERROVOL_CEPHFS_COPY_ABANDON_AFTER", default_value = "10m",
          value_parser = ferrovol_csi::units::parse_duration)]
    pub cephfs_copy_abandon_after: std::time::Duration,
}

/// Who copies CephFS restores and clones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CephFsCopier {
    Ferrovol,
    Manager,
}

impl From<CephFsCopier> for ferrovol_cephfs::controller::Copier {
    fn from(c: CephFsCopier) -> Self {
        match c {
            CephFsCopier::Ferrovol => Self::Ferrovol,
            CephFsCopier::Manager => Self::Manager,
        }
    }
}

/// The storage engines ferrovol can serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EngineKind {
    /// Volumes are files in a pool directory on this node, copied by
    /// reflink, attached as loop devices.
    Local,
    /// Volumes are RBD images on a Ceph cluster; snapshots and clones are
    /// RBD's own; nodes map images (driver name rbd.csi.ferrovol.io).
    Rbd,
    /// Volumes are CephFS subvolumes, shared file systems every node can
    /// mount read-write; the size is a quota; nodes mount with ceph-fuse
    /// (driver name cephfs.csi.ferrovol.io).
    Cephfs,
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
        #[arg(long, value_parser = ferrovol_csi::units::parse_size)]
        size: u64,
        /// Reserve the image's space on the host now (refused if the host
        /// has less free); without it the image is sparse and grows as
        /// volumes fill.
        #[arg(long)]
        preallocate: bool,
        /// Filesystem of the pool.
        #[arg(long, value_enum, default_value_t = ferrovol_local::poolinit::PoolFs::Xfs)]
        fs: ferrovol_local::poolinit::PoolFs,
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
    /// Fill a stopped pool with empty thin volumes (`seed-<n>`), for
    /// measuring start-up at scale (`ferrovol bench --only startup`).
    #[command(hide = true)]
    Seed {
        /// The pool directory.
        #[arg(long)]
        dir: PathBuf,
        /// How many volumes to add.
        #[arg(long)]
        volumes: usize,
        /// The node the volumes live on (their topology).
        #[arg(long, default_value = "bench")]
        node_id: String,
        /// Mint IDs without a node tag, as releases before tags did.
        #[arg(long)]
        legacy_ids: bool,
    },
    /// Check the journal against the pool's files (read-only unless
    /// --repair); exits 0 only when clean. Run it while the driver is
    /// stopped: the driver holds the journal, and runs the same repair at
    /// start-up.
    Check {
        /// The driver's state dir (the pool is <state-dir>/pool).
        #[arg(long, default_value_os_t = ferrovol_csi::endpoint::default_state_dir())]
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
