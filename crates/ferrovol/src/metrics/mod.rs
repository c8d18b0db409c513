//! Prometheus metrics (`/metrics`) and health (`/healthz`) over HTTP.
//!
//! RPC counters and latency histograms are recorded as calls finish (in
//! `rpc::handle`); engine and node gauges are read fresh at each scrape, so
//! they never drift from the journal and the kernel.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, LazyLock};

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use crate::engine::EngineStats;

mod format;
pub use format::{to_classic, wants_openmetrics};

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
                version: crate::version::VERSION.to_string(),
                revision: crate::version::GIT_REVISION.to_string(),
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
    /// `attached`: the node half's devices (empty in a controller-only
    /// process).
    pub fn render(&self, stats: &EngineStats, attached: &[std::path::PathBuf]) -> String {
        let set = |g: &Gauge, v: u64| {
            g.set(i64::try_from(v).unwrap_or(i64::MAX));
        };

        // Each attached volume is staged once; every further mount of its
        // device is a publication into a pod.
        let mounts = crate::node::mountinfo::read().unwrap_or_default();
        let per_device: Vec<usize> = attached
            .iter()
            .filter_map(|d| crate::node::mountinfo::mounts_of_device(&mounts, d).ok())
            .map(|m| m.len())
            .collect();
        let published: usize = per_device.iter().map(|n| n.saturating_sub(1)).sum();
        let node = (attached.len() as u64, published as u64);
        set(&self.mounts, per_device.iter().sum::<usize>() as u64);
        set(&self.volumes, stats.volumes);
        set(&self.snapshots, stats.snapshots);
        set(&self.groups, stats.groups);
        set(&self.pool_capacity, stats.storage_capacity_bytes);
        set(&self.pool_used, stats.storage_used_bytes);
        set(&self.provisioned, stats.provisioned_bytes);
        set(&self.attached, attached.len() as u64);
        set(&self.staged, node.0);
        set(&self.published, node.1);
        if let Some(method) = stats.facts.get("cow_method") {
            self.cow.get_or_create(&CowLabel { method: method.clone() }).set(1);
        }
        encode(&self.registry)
    }
}

/// The registry in OpenMetrics text; [`to_classic`] makes the classic format.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// What the HTTP endpoints answer: the metrics as OpenMetrics text, and
/// health (Err with the reason when unhealthy).
#[derive(Clone)]
pub struct Endpoints {
    pub metrics: Arc<dyn Fn() -> BoxFuture<String> + Send + Sync>,
    pub health: Arc<dyn Fn() -> BoxFuture<Result<(), String>> + Send + Sync>,
}

/// Answers in the format the scraper's `Accept` header asks for, under the
/// Content-Type that names it (see [`format`]).
async fn metrics_handler(State(ep): State<Endpoints>, headers: HeaderMap) -> impl IntoResponse {
    let body = (ep.metrics)().await;
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    if wants_openmetrics(accept) {
        ([(header::CONTENT_TYPE, format::OPENMETRICS)], body)
    } else {
        ([(header::CONTENT_TYPE, format::CLASSIC)], to_classic(&body))
    }
}

async fn health_handler(State(ep): State<Endpoints>) -> impl IntoResponse {
    match (ep.health)().await {
        Ok(()) => (StatusCode::OK, "ok\n".to_string()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}

/// Binds `host:port`, or `:port` for every interface as Go exporters read it
/// (IPv6 and IPv4 where the host has IPv6, IPv4 alone otherwise).
async fn bind(addr: &str) -> std::io::Result<tokio::net::TcpListener> {
    let Some(port) = addr.strip_prefix(':') else {
        return tokio::net::TcpListener::bind(addr).await;
    };
    let port: u16 = port.parse().map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("invalid port in {addr:?}"))
    })?;
    match tokio::net::TcpListener::bind(("::", port)).await {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Err(e),
        Err(_) => tokio::net::TcpListener::bind(("0.0.0.0", port)).await,
    }
}

/// Serves `/metrics` and `/healthz` on `addr` in the background; answers the
/// bound address (useful with port 0).
pub async fn listen(addr: &str, endpoints: Endpoints) -> Result<SocketAddr, String> {
    let listener = bind(addr).await.map_err(|e| format!("binding metrics address {addr}: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(health_handler))
        .with_state(endpoints);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    Ok(local)
}
