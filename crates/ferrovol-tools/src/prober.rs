//! `ferrovol probe`: a liveness prober for any CSI driver. It calls Probe on
//! the driver's socket every interval, exports `csi_liveness` (1 ready, 0
//! not) with probe latency and failures, and answers `/healthz` with 503
//! while the driver is not ready — the liveness container next to ferrovol
//! or next to any other driver.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferrovol_csi as csi;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tracing::{info, warn};

use crate::endpoint::{self, Endpoint};
use crate::metrics::{encode, Endpoints};

#[derive(Debug, Clone, clap::Args)]
pub struct ProbeArgs {
    /// The driver's CSI endpoint: unix:///path, a path, or tcp://host:port.
    /// Default: $CSI_ENDPOINT, else the default socket of `ferrovol serve`.
    #[arg(long, visible_alias = "csi-address", env = "FERROVOL_ENDPOINT")]
    pub endpoint: Option<String>,
    /// Where to serve /metrics and /healthz: host:port, or :port for every
    /// interface.
    #[arg(long, default_value = "127.0.0.1:9809")]
    pub metrics_addr: String,
    /// Time between probes, e.g. 10s, 500ms.
    #[arg(long, default_value = "10s", value_parser = crate::units::parse_duration)]
    pub interval: Duration,
    /// How long one Probe may take before it counts as failed.
    #[arg(long, default_value = "3s", value_parser = crate::units::parse_duration)]
    pub timeout: Duration,
}

struct State {
    registry: Registry,
    liveness: Gauge,
    latency: Histogram,
    failures: Counter,
    /// Why the driver is not ready; None while it is.
    problem: Mutex<Option<String>>,
}

async fn probe_once(endpoint: &Endpoint, timeout: Duration) -> Result<(), String> {
    let attempt = async {
        let channel = endpoint::connect(endpoint).await.map_err(|e| match endpoint {
            Endpoint::Unix(path) => format!("cannot connect: {}", endpoint::diagnose(path)),
            Endpoint::Tcp(_) => format!("cannot connect: {e}"),
        })?;
        let mut id = csi::identity_client::IdentityClient::new(channel);
        let r = id
            .probe(csi::ProbeRequest {})
            .await
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
        match r.into_inner().ready {
            Some(false) => Err("driver reports ready=false".to_string()),
            _ => Ok(()),
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))?
}

pub async fn run(args: ProbeArgs) -> Result<(), String> {
    let endpoint = endpoint::resolve(args.endpoint.as_deref())?;
    let mut registry = Registry::default();
    let liveness = Gauge::default();
    registry.register(
        "csi_liveness",
        "1 when the CSI driver answers Probe ready, else 0",
        liveness.clone(),
    );
    let latency = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
    registry.register("csi_liveness_probe_duration_seconds", "Probe call latency", latency.clone());
    let failures = Counter::default();
    registry.register("csi_liveness_probe_failures", "Probes that failed", failures.clone());
    let state = Arc::new(State {
        registry,
        liveness,
        latency,
        failures,
        problem: Mutex::new(Some("not probed yet".into())),
    });

    let (for_metrics, for_health) = (state.clone(), state.clone());
    let endpoints = Endpoints {
        metrics: Arc::new(move || {
            let s = for_metrics.clone();
            Box::pin(async move { encode(&s.registry) })
        }),
        health: Arc::new(move || {
            let problem = for_health.problem.lock().unwrap_or_else(|p| p.into_inner()).clone();
            Box::pin(async move { problem.map_or(Ok(()), Err) })
        }),
    };
    let local = crate::metrics::listen(&args.metrics_addr, endpoints).await?;
    info!(addr = %local, csi = %endpoint, "prober listening");

    let mut ticks = tokio::time::interval(args.interval);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| e.to_string())?;
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = term.recv() => return Ok(()),
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
        let started = Instant::now();
        let outcome = probe_once(&endpoint, args.timeout).await;
        state.latency.observe(started.elapsed().as_secs_f64());
        let mut problem = state.problem.lock().unwrap_or_else(|p| p.into_inner());
        match outcome {
            Ok(()) => {
                state.liveness.set(1);
                if problem.take().is_some() {
                    info!("driver is ready");
                }
            }
            Err(why) => {
                state.liveness.set(0);
                state.failures.inc();
                if problem.as_deref() != Some(why.as_str()) {
                    warn!(reason = %why, "driver is not ready");
                }
                *problem = Some(why);
            }
        }
    }
}
