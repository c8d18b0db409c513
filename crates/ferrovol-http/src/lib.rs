//! `/metrics` and `/healthz` over HTTP, for the driver and the prober: the
//! answer is in the format the scraper's `Accept` header asks for (see
//! [`format`]).

#![forbid(unsafe_code)]

pub mod format;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::registry::Registry;

use format::{to_classic, wants_openmetrics};

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
