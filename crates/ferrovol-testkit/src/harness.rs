//! The driver's services over an in-process channel: the real server
//! (every service the mode asks for, through the same RPC plumbing), a real
//! tonic client, no socket, no root.

use std::sync::Arc;

use ferrovol_block::BlockStaging;
use ferrovol_core::cli::Mode;
use ferrovol_core::engine::{ControllerEngine, NodeEngine};
use ferrovol_core::locks::OpLocks;
use ferrovol_core::services::node::NodeConfig;
use ferrovol_core::services::Driver;
use hyper_util::rt::TokioIo;
use tokio::io::DuplexStream;
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::mem::{MemEngine, Shape};
use crate::memfs::MemFsNode;

/// A served driver; dropping it stops the server.
pub struct Harness {
    pub channel: Channel,
    pub engine: Arc<MemEngine>,
    pub kubelet_dir: std::path::PathBuf,
    /// The driver's state dir (the kubelet dir is inside it).
    pub state_dir: std::path::PathBuf,
    _dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// Serves a fresh in-memory engine of `shape` in `mode` (the halves `mode`
/// asks for, as `ferrovol serve` would hold them).
pub async fn serve(shape: Shape, mode: Mode) -> Harness {
    let engine = Arc::new(MemEngine::new(shape, "mem-node"));
    let controller: Option<Arc<dyn ControllerEngine>> =
        mode.controller().then(|| engine.clone() as Arc<dyn ControllerEngine>);
    let dir = tempfile::tempdir().expect("a temporary directory");
    let node: Option<Arc<dyn NodeEngine>> = mode.node().then(|| match shape {
        Shape::SharedFs => Arc::new(MemFsNode::new(engine.clone())) as Arc<dyn NodeEngine>,
        _ => Arc::new(BlockStaging::new(engine.clone(), dir.path())),
    });
    let kubelet_dir = dir.path().join("kubelet");
    std::fs::create_dir_all(&kubelet_dir).expect("the kubelet directory");
    let driver = Arc::new(Driver {
        name: "mem.csi.ferrovol.io".into(),
        node_id: "mem-node".into(),
        mode,
        state_dir: dir.path().to_path_buf(),
        state_writes: mode.node().then(|| ferrovol_host::fsutil::WriteMonitor::spawn(dir.path())),
        controller,
        node,
        locks: OpLocks::new(),
    });
    let config = NodeConfig { kubelet_dir: kubelet_dir.clone(), max_volumes_per_node: 0 };
    let router = ferrovol_core::server::routes(driver, config);

    let (conns, incoming) = mpsc::unbounded_channel::<DuplexStream>();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let incoming = tokio_stream::wrappers::UnboundedReceiverStream::new(incoming);
    let incoming = tokio_stream::StreamExt::map(incoming, Ok::<_, std::io::Error>);
    tokio::spawn(router.serve_with_incoming_shutdown(incoming, async {
        let _ = stopped.await;
    }));
    let channel = Endpoint::from_static("http://in-process")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let (client, server) = tokio::io::duplex(1 << 16);
            let sent = conns.send(server);
            async move {
                sent.map_err(|_| std::io::Error::other("the in-process server stopped"))?;
                Ok::<_, std::io::Error>(TokioIo::new(client))
            }
        }))
        .await
        .expect("an in-process channel");
    let state_dir = dir.path().to_path_buf();
    Harness { channel, engine, kubelet_dir, state_dir, _dir: dir, _stop: stop }
}
