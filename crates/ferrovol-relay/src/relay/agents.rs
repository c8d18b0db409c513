//! The node agents connected to this relay replica, found by the tag their
//! IDs carry; and the listener that lets them in.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ferrovol_csi as csi;
use ferrovol_error::{self as error, Error, Result};
use tokio::net::TcpListener;
use tonic::transport::{Channel, Endpoint};
use tracing::{info, warn};

use crate::link::{LinkIo, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT};
use crate::proto::agent_client::AgentClient;
use crate::proto::HelloRequest;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a node's existing link has to answer before a new link for the
/// node replaces it.
const LIVENESS_CHECK: Duration = Duration::from_secs(2);

/// How long an agent may take to answer a call that reads (a volume, a
/// listing page, capacity) or freezes and thaws: an agent whose link is
/// alive but which does not answer (a hung disk) must not hold the relay's
/// call, and its locks, for ever. Calls that copy data have no such bound.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(30);

/// `call`, or UNAVAILABLE when it takes longer than [`ANSWER_WITHIN`].
pub async fn bounded<T>(
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<tonic::Response<T>, tonic::Status> {
    tokio::time::timeout(ANSWER_WITHIN, call).await.unwrap_or_else(|_| {
        Err(tonic::Status::unavailable(format!("no answer within {ANSWER_WITHIN:?}")))
    })
}

/// One connected agent: a node, and clients for what it serves.
pub struct AgentLink {
    pub node_id: String,
    pub tag: String,
    generation: u64,
    pub controller: csi::controller_client::ControllerClient<Channel>,
    pub group: csi::group_controller_client::GroupControllerClient<Channel>,
    pub metadata: csi::snapshot_metadata_client::SnapshotMetadataClient<Channel>,
    pub agent: AgentClient<Channel>,
}

impl AgentLink {
    /// What a failure on this link says.
    pub fn context(&self) -> String {
        format!("node {}", self.node_id)
    }

    pub fn failed(&self, status: tonic::Status) -> Error {
        Error::from_status(&status, self.context())
    }
}

#[derive(Default)]
struct Inner {
    by_tag: HashMap<String, Arc<AgentLink>>,
    /// Every node seen since this replica started, connected or not: a
    /// listing over all nodes must not quietly leave one out.
    known: BTreeMap<String, String>,
}

#[derive(Default)]
pub struct Agents {
    inner: RwLock<Inner>,
    generations: AtomicU64,
    /// Nodes the operator declared gone (`--retired-node`), by tag.
    retired: HashMap<String, String>,
}

impl Agents {
    /// The registry of a relay whose operator declared `nodes` gone for
    /// good (their disks with them).
    pub fn retiring(nodes: &[String]) -> Agents {
        let retired: HashMap<String, String> = nodes
            .iter()
            .filter(|n| !n.is_empty())
            .map(|n| (ferrovol_local::ids::node_tag(n), n.clone()))
            .collect();
        for node in retired.values() {
            warn!(node = %node, "node retired by the operator (--retired-node): its volumes and \
                   snapshots are gone with its disk; deletes of them answer OK, lookups NOT_FOUND");
        }
        Agents { retired, ..Agents::default() }
    }

    /// The node of `tag` if the operator retired it.
    pub fn retired(&self, tag: &str) -> Option<&str> {
        self.retired.get(tag).map(String::as_str)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The agent whose IDs carry `tag`; UNAVAILABLE when it is not
    /// connected (the call may be retried once it is back).
    pub fn by_tag(&self, tag: &str) -> Result<Arc<AgentLink>> {
        let inner = self.read();
        if let Some(link) = inner.by_tag.get(tag) {
            return Ok(link.clone());
        }
        let node = inner.known.iter().find(|(_, t)| t.as_str() == tag).map(|(n, _)| n.as_str());
        Err(error::unavailable(match node {
            Some(node) => format!("node {node} is not connected to this controller"),
            None => format!("no node whose IDs carry {tag:?} has connected to this controller"),
        }))
    }

    /// The agent of `node_id`, if connected.
    pub fn by_node(&self, node_id: &str) -> Option<Arc<AgentLink>> {
        let tag = ferrovol_local::ids::node_tag(node_id);
        self.read().by_tag.get(&tag).cloned()
    }

    /// Every connected agent, by tag.
    pub fn connected(&self) -> Vec<Arc<AgentLink>> {
        let inner = self.read();
        let mut all: Vec<_> = inner.by_tag.values().cloned().collect();
        all.sort_by(|a, b| a.tag.cmp(&b.tag));
        all
    }

    /// Every agent, for a call that must reach all of them: UNAVAILABLE
    /// naming the nodes seen before that are not connected now.
    pub fn all(&self) -> Result<Vec<Arc<AgentLink>>> {
        let inner = self.read();
        let away: Vec<&str> = inner
            .known
            .iter()
            .filter(|(_, tag)| !inner.by_tag.contains_key(*tag))
            .map(|(node, _)| node.as_str())
            .collect();
        if !away.is_empty() {
            return Err(error::unavailable(format!(
                "not connected to this controller: node {}",
                away.join(", node ")
            )));
        }
        drop(inner);
        Ok(self.connected())
    }

    pub fn count(&self) -> usize {
        self.read().by_tag.len()
    }

    /// Admits a node's link, unless it has a live one already: one
    /// identity, one link. A link that is there but dead (the node
    /// restarted before the keepalive noticed) is replaced; a live one
    /// stays and the newcomer is refused.
    async fn insert(&self, link: Arc<AgentLink>) -> Result<(), String> {
        if self.retired(&link.tag).is_some() {
            return Err(format!(
                "node {} is retired (--retired-node): its link is refused; to serve it again, \
                 take it off the list and restart the relay",
                link.node_id
            ));
        }
        let existing = self.read().by_tag.get(&link.tag).cloned();
        if let Some(old) = existing {
            let alive =
                tokio::time::timeout(LIVENESS_CHECK, old.agent.clone().hello(HelloRequest {}))
                    .await
                    .is_ok_and(|r| r.is_ok());
            if alive {
                return Err(format!(
                    "node {} already has a live link; a second one is refused (is another \
                     process using this node's identity?)",
                    link.node_id
                ));
            }
            info!(node = %old.node_id, "the node reconnected: its dead link is replaced");
        }
        let mut inner = self.write();
        inner.known.insert(link.node_id.clone(), link.tag.clone());
        inner.by_tag.insert(link.tag.clone(), link);
        Ok(())
    }

    fn remove(&self, tag: &str, generation: u64) {
        let mut inner = self.write();
        if inner.by_tag.get(tag).is_some_and(|l| l.generation == generation) {
            inner.by_tag.remove(tag);
        }
    }
}

/// Accepts agents on `listener` until dropped: TLS with a client
/// certificate from the link CA, then Hello, then the agent is reachable.
pub async fn listen(
    listener: TcpListener,
    tls: Arc<tokio_rustls::rustls::ServerConfig>,
    agents: Arc<Agents>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                warn!(error = %e, "accepting a link connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (acceptor, agents) = (acceptor.clone(), agents.clone());
        tokio::spawn(async move {
            if let Err(e) = admit(tcp, acceptor, agents).await {
                warn!(%peer, error = %e, "refused a link connection");
            }
        });
    }
}

async fn admit(
    tcp: tokio::net::TcpStream,
    acceptor: tokio_rustls::TlsAcceptor,
    agents: Arc<Agents>,
) -> Result<(), String> {
    let peer = tcp.peer_addr().map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
        .await
        .map_err(|_| "no TLS handshake in time".to_string())?
        .map_err(|e| format!("TLS: {e}"))?;
    // The node this certificate is for: the only node ID this link may
    // claim (checked against Hello below).
    let cert = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .cloned()
        .ok_or_else(|| "no client certificate".to_string())?;
    let (io, closed) = LinkIo::new(stream);
    // The roles turn: the agent dialled, but it is the server from here.
    let one = std::sync::Mutex::new(Some(io));
    let connector = tower::service_fn(move |_: http::Uri| {
        let io = one.lock().unwrap_or_else(|p| p.into_inner()).take();
        async move {
            io.map(hyper_util::rt::TokioIo::new).ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::NotConnected, "the agent's link is closed")
            })
        }
    });
    let channel = Endpoint::from_static("http://agent.link")
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .connect_with_connector(connector)
        .await
        .map_err(|e| format!("HTTP/2 over the link: {e}"))?;
    let mut agent = AgentClient::new(channel.clone());
    let hello = tokio::time::timeout(HANDSHAKE_TIMEOUT, agent.hello(HelloRequest {}))
        .await
        .map_err(|_| "no Hello in time".to_string())?
        .map_err(|e| format!("Hello: {}", e.message()))?
        .into_inner();
    let claimed = ferrovol_error::bounded(&hello.node_id).into_owned();
    if hello.tag != ferrovol_local::ids::node_tag(&hello.node_id) {
        return Err(format!("node {claimed} says its tag is {:?}", hello.tag));
    }
    if !crate::tls::certifies_node(&cert, &hello.node_id) {
        return Err(format!(
            "a link claiming node {claimed} presented a certificate that is not node {claimed}'s \
             (each node needs its own: ferrovol link certs --node {claimed})"
        ));
    }
    let generation = agents.generations.fetch_add(1, Ordering::Relaxed);
    let link = Arc::new(AgentLink {
        node_id: hello.node_id.clone(),
        tag: hello.tag.clone(),
        generation,
        controller: csi::controller_client::ControllerClient::new(channel.clone()),
        group: csi::group_controller_client::GroupControllerClient::new(channel.clone()),
        metadata: csi::snapshot_metadata_client::SnapshotMetadataClient::new(channel),
        agent,
    });
    agents.insert(link).await?;
    info!(node = %hello.node_id, %peer, version = %hello.version, agents = agents.count(), "node agent connected");
    let _ = closed.await;
    agents.remove(&hello.tag, generation);
    warn!(node = %hello.node_id, %peer, agents = agents.count(), "node agent disconnected");
    Ok(())
}
