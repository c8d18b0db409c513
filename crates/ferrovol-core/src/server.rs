//! `ferrovol serve`: binds the endpoint, registers the services the mode asks
//! for, and shuts down gracefully on SIGTERM/SIGINT.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ferrovol_csi as csi;
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tokio_stream::StreamExt;
use tonic::transport::server::Router;
use tonic::transport::Server;
use tower::layer::util::{Identity, Stack};

use crate::rpc::MethodLayer;
use tracing::{info, warn};

use crate::authority::AuthorityFix;
use crate::cli::ServeArgs;
use crate::endpoint::{self, Endpoint, SocketState};
use crate::engine::{ControllerEngine, NodeEngine};
use crate::locks::OpLocks;
use crate::services::controller::ControllerService;
use crate::services::controller_side_node::ControllerSideNode;
use crate::services::group_controller::GroupControllerService;
use crate::services::identity::IdentityService;
use crate::services::node::{NodeConfig, NodeService};
use crate::services::snapshot_metadata::SnapshotMetadataService;
use crate::services::Driver;
use ferrovol_host::offload::QUICK;

/// Logged once the socket accepts connections; tests and scripts wait for it.
pub const READY_MESSAGE: &str = "ferrovol is serving";

/// The engine halves this process serves, as `--mode` asks for them.
pub type Halves = (Option<Arc<dyn ControllerEngine>>, Option<Arc<dyn NodeEngine>>);

/// The node ID to serve as: `--node-id`, else the hostname.
pub fn node_id(args: &ServeArgs) -> Result<String, String> {
    match &args.node_id {
        Some(id) if !id.is_empty() => Ok(id.clone()),
        _ => hostname(),
    }
}

/// Creates the driver's state dir: the node service keeps its format
/// markers there, and an engine may keep its own state there too (the
/// binary calls this before it opens one that does).
pub fn prepare_state_dir(args: &ServeArgs) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt;
    // Root's alone: format markers and the engine's journal live there.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&args.state_dir)
        .map_err(|e| format!("creating state dir {}: {e}", args.state_dir.display()))
}

/// Work that runs beside the CSI server for as long as it serves (the
/// relay's link listener, an agent's dialer): started with the driver once
/// it exists, aborted at shutdown.
pub type Companion = Box<dyn FnOnce(Arc<Driver>) -> tokio::task::JoinHandle<()> + Send>;

/// Serves the halves until SIGTERM/SIGINT.
pub async fn run(
    args: ServeArgs,
    node_id: String,
    halves: Halves,
    companion: Option<Companion>,
) -> Result<(), String> {
    if args.mode.node() {
        prepare_state_dir(&args)?;
    }
    let endpoint = endpoint::resolve(args.endpoint.as_deref())?;
    let (controller, node) = halves;
    let driver = Arc::new(Driver {
        name: args.driver_name.clone(),
        node_id,
        mode: args.mode,
        state_dir: args.state_dir.clone(),
        state_writes: args
            .mode
            .node()
            .then(|| ferrovol_host::fsutil::WriteMonitor::spawn(&args.state_dir)),
        controller,
        node,
        locks: OpLocks::new(),
    });

    let config = NodeConfig {
        kubelet_dir: args.kubelet_dir.clone(),
        max_volumes_per_node: args.max_volumes_per_node,
    };
    let router = routes(driver.clone(), config);

    if driver.mode.node() {
        match driver.node().recover().await {
            Ok(done) => {
                for what in done {
                    warn!(recovered = %what, "settled what the previous run left");
                }
            }
            Err(e) => warn!(error = e.message(), "cannot settle what the previous run left"),
        }
    }

    if let Some(addr) = &args.metrics_addr {
        let local = crate::metrics::listen(addr, driver_endpoints(driver.clone())).await?;
        info!(addr = %local, "metrics listening");
    }

    // Installed before we announce readiness: a SIGTERM that arrives right
    // after must take the graceful path, not the default "die at once".
    let signals = Signals::install()?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let shutdown = {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };

    let companion = companion.map(|start| start(driver.clone()));

    let mut socket_path: Option<PathBuf> = None;
    let server = match &endpoint {
        Endpoint::Unix(path) => {
            let (listener, state) =
                endpoint::bind_unix(path).map_err(|e| format!("binding {endpoint}: {e}"))?;
            if state == SocketState::Stale {
                warn!(socket = %path.display(), "replaced a stale socket left by a dead process");
            }
            socket_path = Some(path.clone());
            // Clients other than grpc-go send the socket path as the
            // authority; see `authority`.
            let incoming =
                UnixListenerStream::new(listener).map(|conn| conn.map(AuthorityFix::new));
            tokio::spawn(router.serve_with_incoming_shutdown(incoming, shutdown))
        }
        Endpoint::Tcp(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| format!("binding {endpoint}: {e}"))?;
            let incoming = TcpListenerStream::new(listener);
            tokio::spawn(router.serve_with_incoming_shutdown(incoming, shutdown))
        }
    };
    info!(
        endpoint = %endpoint,
        driver = %driver.name,
        node_id = %driver.node_id,
        mode = ?driver.mode,
        engine = driver.engine_kind(),
        version = ferrovol_csi::build::version(),
        "{READY_MESSAGE}"
    );

    let signal = signals.wait().await;
    info!(signal, "shutting down: no new connections, finishing in-flight RPCs");
    let _ = stop_tx.send(true);
    if let Some(task) = companion {
        task.abort();
    }
    let grace = Duration::from_secs(args.shutdown_timeout);
    let deadline = tokio::time::Instant::now() + grace;
    match tokio::time::timeout_at(deadline, server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => warn!(error = %e, "server ended with an error"),
        Ok(Err(e)) => warn!(error = %e, "server task failed"),
        Err(_) => warn!(?grace, "connections did not close in time"),
    }
    // Calls that change state run detached from their callers: wait for
    // them too, within the same grace.
    let left = crate::rpc::in_flight::drain(
        deadline.saturating_duration_since(tokio::time::Instant::now()),
    )
    .await;
    if left.is_empty() {
        if let Some(c) = &driver.controller {
            if let Err(e) = c.close().await {
                warn!(error = e.message(), "closing the engine");
            }
        }
        if let Some(n) = &driver.node {
            if let Err(e) = n.close().await {
                warn!(error = e.message(), "closing the engine's node half");
            }
        }
    }
    if let Some(path) = socket_path {
        if let Err(e) = std::fs::remove_file(&path) {
            warn!(socket = %path.display(), error = %e, "could not remove socket");
        }
    }
    if !left.is_empty() {
        // Said, then gone for real: work left behind holds the journal lock
        // and must not go on after we said we stopped. The next start's
        // recovery finishes or rolls back each of them.
        tracing::error!(
            calls = ?left,
            ?grace,
            "exiting with calls still running after the shutdown timeout; the next start \
             settles them"
        );
        // At once: an exit that ran the libraries' own teardown (Ceph's)
        // under the calls still running would crash instead.
        ferrovol_host::process::exit_now(1);
    }
    info!("stopped");
    Ok(())
}

/// The server with every service `driver.mode` asks for, each call through
/// [`crate::rpc::MethodLayer`]: what `run` serves on its socket, and what the
/// test kit serves over an in-process channel.
pub fn routes(driver: Arc<Driver>, node: NodeConfig) -> Router<Stack<MethodLayer, Identity>> {
    let mut router = if driver.mode.controller() {
        controller_routes(Server::builder(), driver.clone())
    } else {
        identity_routes(Server::builder(), driver.clone())
    };
    if driver.mode.node() {
        router =
            router.add_service(csi::node_server::NodeServer::new(NodeService::new(driver, node)));
    } else if driver.mode.controller() {
        router =
            router.add_service(csi::node_server::NodeServer::new(ControllerSideNode::new(driver)));
    }
    router
}

fn identity_routes(server: Server, driver: Arc<Driver>) -> Router<Stack<MethodLayer, Identity>> {
    server
        .layer(MethodLayer::new(driver.mode))
        .add_service(csi::identity_server::IdentityServer::new(IdentityService::new(driver)))
}

/// Identity and the controller services (Controller, GroupController,
/// SnapshotMetadata) on `server`: also what a node agent serves its relay.
pub fn controller_routes(
    server: Server,
    driver: Arc<Driver>,
) -> Router<Stack<MethodLayer, Identity>> {
    let engine = driver.controller().clone();
    let mut router = identity_routes(server, driver.clone()).add_service(
        csi::controller_server::ControllerServer::new(ControllerService::new(driver.clone())),
    );
    // The optional services exactly where the engine has their part.
    if engine.groups().is_some() {
        router = router.add_service(csi::group_controller_server::GroupControllerServer::new(
            GroupControllerService::new(driver.clone()),
        ));
    }
    if engine.changed_blocks().is_some() {
        router = router.add_service(csi::snapshot_metadata_server::SnapshotMetadataServer::new(
            SnapshotMetadataService::new(driver),
        ));
    }
    router
}

/// /metrics from fresh engine figures; /healthz is what Probe checks.
fn driver_endpoints(driver: Arc<Driver>) -> crate::metrics::Endpoints {
    let for_metrics = driver.clone();
    crate::metrics::Endpoints {
        metrics: Arc::new(move || {
            let driver = for_metrics.clone();
            Box::pin(async move {
                let stats = match &driver.controller {
                    Some(c) => c.stats().await.unwrap_or_default(),
                    None => Default::default(),
                };
                let staged = match &driver.node {
                    Some(n) => n.staged().await.unwrap_or_default(),
                    None => Vec::new(),
                };
                let rendered = ferrovol_host::offload::run("rendering metrics", QUICK, move || {
                    Ok(crate::metrics::global().render(&stats, &staged))
                });
                rendered.await.unwrap_or_default()
            })
        }),
        health: Arc::new(move || {
            let identity = IdentityService::new(driver.clone());
            Box::pin(
                async move { identity.check_ready().await.map_err(|e| e.message().to_string()) },
            )
        }),
    }
}

struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Signals, String> {
        use tokio::signal::unix::{signal, SignalKind};
        let term = signal(SignalKind::terminate()).map_err(|e| format!("SIGTERM handler: {e}"))?;
        let int = signal(SignalKind::interrupt()).map_err(|e| format!("SIGINT handler: {e}"))?;
        Ok(Signals { term, int })
    }

    async fn wait(mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

fn hostname() -> Result<String, String> {
    let name = rustix::system::uname().nodename().to_string_lossy().into_owned();
    if name.is_empty() {
        return Err("cannot determine the hostname; pass --node-id".into());
    }
    Ok(name)
}
