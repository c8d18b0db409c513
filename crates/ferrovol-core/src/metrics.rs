//! The driver's Prometheus metrics (served with `/healthz` by
//! [`ferrovol_http`]).
//!
//! RPC counters and latency histograms are recorded as calls finish (in
//! `rpc::handle`); engine and node gauges are read fresh at each scrape, so
//! they never drift from the journal and the kernel.

use std::sync::LazyLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use crate::engine::EngineStats;

pub use ferrovol_http::{encode, format, listen, Endpoints};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    method: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabel {
    method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CowLabel {
    method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
    revision: String,
}

type Latency = Family<MethodLabel, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 100 µs .. ~3.3 s: from Probe to a large copy.
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

/// The driver's metrics.
pub struct Metrics {
    registry: Registry,
    rpcs: Family<RpcLabels, Counter>,
    latency: Latency,
    freeze: Histogram,
    volumes: Gauge,
    snapshots: Gauge,
    groups: Gauge,
    pool_capacity: Gauge,
    pool_used: Gauge,
    provisioned: Gauge,
    copies: Gauge,
    copies_done: Gauge,
    copies_size: Gauge,
    attached: Gauge,
    staged: Gauge,
    published: Gauge,
    mounts: Gauge,
    cow: Family<CowLabel, Gauge>,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

pub fn global() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::default();
        let rpcs = Family::<RpcLabels, Counter>::default();
        registry.register(
            "ferrovol_rpc_requests",
            "CSI calls finished, by method and gRPC code",
            rpcs.clone(),
        );
        let latency: Latency = Family::new_with_constructor(latency_histogram);
        registry.register(
            "ferrovol_rpc_duration_seconds",
            "CSI call latency by method",
            latency.clone(),
        );
        let freeze = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        registry.register(
            "ferrovol_group_snapshot_freeze_seconds",
            "How long group snapshot members stayed frozen",
            freeze.clone(),
        );
        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            let g = Gauge::default();
            registry.register(name, help, g.clone());
            g
        };
        let volumes = gauge(&mut registry, "ferrovol_volumes", "Volumes in the journal");
        let snapshots = gauge(&mut registry, "ferrovol_snapshots", "Snapshots in the journal");
        let groups =
            gauge(&mut registry, "ferrovol_group_snapshots", "Group snapshots in the journal");
        let pool_capacity =
            gauge(&mut registry, "ferrovol_pool_capacity_bytes", "Size of the pool filesystem");
        let pool_used =
            gauge(&mut registry, "ferrovol_pool_used_bytes", "Bytes used in the pool filesystem");
        let provisioned =
            gauge(&mut registry, "ferrovol_pool_provisioned_bytes", "Sum of volume capacities");
        let copies = gauge(
            &mut registry,
            "ferrovol_copies_running",
            "Restores and clones being copied in the background",
        );
        let copies_done = gauge(
            &mut registry,
            "ferrovol_copies_done_bytes",
            "Bytes the copies under way have copied",
        );
        let copies_size = gauge(
            &mut registry,
            "ferrovol_copies_size_bytes",
            "Bytes the copies under way copy in all",
        );
        let attached = gauge(
            &mut registry,
            "ferrovol_devices_attached",
            "Volumes attached as block devices here",
        );
        let staged =
            gauge(&mut registry, "ferrovol_node_volumes_staged", "Volumes staged on this node");
        let published = gauge(
            &mut registry,
            "ferrovol_node_volumes_published",
            "Publications (pod mounts) on this node",
        );
        let mounts = gauge(
            &mut registry,
            "ferrovol_node_mounts",
            "Mounts of attached volumes held on this node",
        );
        let cow = Family::<CowLabel, Gauge>::default();
        registry.register(
            "ferrovol_cow_method",
            "How the pool copies (1 for the method in use)",
            cow.clone(),
        );
        registry.register(
            "ferrovol_build",
            "Build of this driver",
            Info::new(BuildLabels {
                version: ferrovol_csi::build::version().to_string(),
                revision: ferrovol_csi::build::git_revision().to_string(),
            }),
        );
        Metrics {
            registry,
            rpcs,
            latency,
            freeze,
            volumes,
            snapshots,
            groups,
            pool_capacity,
            pool_used,
            provisioned,
            copies,
            copies_done,
            copies_size,
            attached,
            staged,
            published,
            mounts,
            cow,
        }
    }

    pub fn observe_rpc(&self, method: &str, code: tonic::Code, seconds: f64) {
        let code = crate::error::code_name(code).to_string();
        self.rpcs.get_or_create(&RpcLabels { method: method.to_string(), code }).inc();
        self.latency.get_or_create(&MethodLabel { method: method.to_string() }).observe(seconds);
    }

    pub fn observe_freeze(&self, seconds: f64) {
        self.freeze.observe(seconds);
    }

    /// Sets the gauges from fresh engine figures and the kernel's mount
    /// table, and renders everything.
    /// `staged`: the mounts of each volume the node half holds here, its
    /// stage first (empty in a controller-only process).
    pub fn render(&self, stats: &EngineStats, staged: &[Vec<crate::engine::MountEntry>]) -> String {
        let set = |g: &Gauge, v: u64| {
            g.set(i64::try_from(v).unwrap_or(i64::MAX));
        };

        // Each volume is staged once; every further mount of it is a
        // publication into a pod.
        let published: usize = staged.iter().map(|m| m.len().saturating_sub(1)).sum();
        let node = (staged.len() as u64, published as u64);
        set(&self.mounts, staged.iter().map(Vec::len).sum::<usize>() as u64);
        set(&self.volumes, stats.volumes);
        set(&self.snapshots, stats.snapshots);
        set(&self.groups, stats.groups);
        set(&self.pool_capacity, stats.storage_capacity_bytes);
        set(&self.pool_used, stats.storage_used_bytes);
        set(&self.provisioned, stats.provisioned_bytes);
        set(&self.copies, stats.copies_running);
        set(&self.copies_done, stats.copies_done_bytes);
        set(&self.copies_size, stats.copies_size_bytes);
        set(&self.attached, staged.len() as u64);
        set(&self.staged, node.0);
        set(&self.published, node.1);
        if let Some(method) = stats.facts.get("cow_method") {
            self.cow.get_or_create(&CowLabel { method: method.clone() }).set(1);
        }
        encode(&self.registry)
    }
}
