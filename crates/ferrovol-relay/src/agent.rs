//! The node agent's end of the link: the node DaemonSet's ferrovol keeps
//! serving the kubelet on its socket, dials every relay replica, and serves
//! each one the controller services of its own pool plus the [`Agent`]
//! calls (who it is; the freeze of a group snapshot spread over nodes).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use ferrovol_core::locks::{self, OpGuard};
use ferrovol_core::rpc::MethodLayer;
use ferrovol_core::services::Driver;
use ferrovol_host::node::quiesce::Held;
use ferrovol_host::offload;
use ferrovol_local::LocalEngine;
use tokio::net::TcpStream;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::link::{LinkIo, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT};
use crate::proto::agent_server::{Agent, AgentServer};
use crate::proto::*;

/// The longest a relay may keep this node's filesystems frozen.
pub const MAX_HOLD: Duration = Duration::from_secs(10);

/// How often the relay's address is resolved again (a new replica, or one
/// that moved).
const RESOLVE_EVERY: Duration = Duration::from_secs(5);
const DIAL_TIMEOUT: Duration = Duration::from_secs(3);
/// Between tries at a relay that cannot be reached.
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Between tries at a relay that closes the link at once (it refused this
/// node: a certificate not its own, a second link): far apart, so a
/// refusal is a line a minute in each log, not ten a second.
const REFUSED_BACKOFF_MAX: Duration = Duration::from_secs(60);
/// A link that lasted less than this was refused rather than lost.
const SHORT_LINK: Duration = Duration::from_secs(5);

/// One freeze a relay holds here: the frozen filesystems, and the members'
/// operation locks, taken shared as a local snapshot takes them, so no
/// node call (an unpublish, an unstage, an expansion) changes a member
/// while it is frozen for the group's instant.
struct Hold {
    held: Held,
    _locks: OpGuard,
}

/// The freezes one relay connection made; dropped (thawed) with it.
#[derive(Default)]
struct Holds {
    live: HashMap<String, Hold>,
    /// Holds that ran out of time, so Thaw can say so.
    expired: HashSet<String>,
}

/// The Agent service for one link connection.
pub struct AgentService {
    driver: Arc<Driver>,
    /// The controller half the link's calls act on (the same engine the
    /// driver's services hold).
    engine: Arc<LocalEngine>,
    holds: Arc<Mutex<Holds>>,
}

impl AgentService {
    pub fn new(driver: Arc<Driver>, engine: Arc<LocalEngine>) -> AgentService {
        AgentService { driver, engine, holds: Arc::default() }
    }

    fn holds(&self) -> std::sync::MutexGuard<'_, Holds> {
        self.holds.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for AgentService {
    fn drop(&mut self) {
        // The relay is gone: thaw whatever it froze, at once, here (not
        // under the holds' lock, and not later on another thread: a part
        // still running must find its freeze over the moment the link is,
        // and refuse itself rather than finish at an instant of its own).
        let left: Vec<Hold> = std::mem::take(&mut self.holds().live).into_values().collect();
        let count = left.len();
        drop(left);
        // Said once it is true: a part that looks for its freeze after this
        // line finds it over (tests wait for the line, not the link's).
        if count > 0 {
            warn!(holds = count, "link closed with filesystems frozen: thawed");
        }
    }
}

#[tonic::async_trait]
impl Agent for AgentService {
    async fn hello(&self, _: Request<HelloRequest>) -> Result<Response<HelloReply>, Status> {
        Ok(Response::new(HelloReply {
            node_id: self.driver.node_id.clone(),
            tag: ferrovol_local::ids::node_tag(&self.driver.node_id),
            version: ferrovol_csi::build::version().to_string(),
        }))
    }

    async fn freeze(&self, req: Request<FreezeRequest>) -> Result<Response<FreezeReply>, Status> {
        let req = req.into_inner();
        if req.hold_id.is_empty() {
            return Err(Status::invalid_argument("hold_id is required"));
        }
        let limit = Duration::from_millis(u64::from(req.hold_ms)).min(MAX_HOLD);
        let keys: Vec<String> = req.volume_ids.iter().map(|id| locks::volume(id)).collect();
        let op_locks = self.driver.locks.acquire(&[], &keys).map_err(Status::from)?;
        let node = self.driver.node();
        let mut devices = Vec::with_capacity(req.volume_ids.len());
        for id in &req.volume_ids {
            devices.push((id.clone(), node.view(id).await.map_err(Status::from)?.device));
        }
        let held = Held::freeze(devices, true).await.map_err(Status::from)?;
        let frozen = held.mounts().len() as u32;
        info!(hold = %req.hold_id, volumes = req.volume_ids.len(), filesystems = frozen,
              "froze for a group snapshot across nodes");
        {
            let mut holds = self.holds();
            if holds.live.contains_key(&req.hold_id) {
                return Err(Status::already_exists(format!("hold {} exists", req.hold_id)));
            }
            holds.live.insert(req.hold_id.clone(), Hold { held, _locks: op_locks });
        }
        // The bound: thawed on our own if the relay never comes back for it.
        let weak: Weak<Mutex<Holds>> = Arc::downgrade(&self.holds);
        let id = req.hold_id;
        tokio::spawn(async move {
            tokio::time::sleep(limit).await;
            let Some(holds) = weak.upgrade() else { return };
            let ran_out = {
                let mut holds = holds.lock().unwrap_or_else(|p| p.into_inner());
                let ran_out = holds.live.remove(&id);
                if ran_out.is_some() {
                    holds.expired.insert(id.clone());
                }
                ran_out
            };
            if let Some(hold) = ran_out {
                let _ = offload::run("thawing", offload::NODE_WORK, move || {
                    drop(hold);
                    Ok(())
                })
                .await;
                warn!(hold = %id, ?limit, "a group snapshot's freeze ran out of time: thawed");
            }
        });
        Ok(Response::new(FreezeReply { frozen }))
    }

    /// Run detached from the link, as the services' calls are: a link
    /// that drops mid-part leaves the part to finish (or to refuse itself,
    /// its freeze gone with the link) rather than cut it off halfway.
    async fn create_group_part(
        &self,
        req: Request<GroupPartRequest>,
    ) -> Result<Response<GroupPartReply>, Status> {
        let (driver, engine, holds) =
            (self.driver.clone(), self.engine.clone(), self.holds.clone());
        ferrovol_core::rpc::handle_detached("CreateGroupPart", req, move |req| async move {
            group_part(&driver, &engine, &holds, req).await
        })
        .await
    }

    async fn thaw(&self, req: Request<ThawRequest>) -> Result<Response<ThawReply>, Status> {
        let id = req.into_inner().hold_id;
        let hold = {
            let mut holds = self.holds();
            holds.expired.remove(&id);
            holds.live.remove(&id)
        };
        Ok(Response::new(match hold {
            Some(hold) => {
                let frozen_us = hold.held.frozen_at.elapsed().as_micros() as u64;
                offload::run("thawing", offload::NODE_WORK, move || {
                    drop(hold);
                    Ok(())
                })
                .await
                .map_err(Status::from)?;
                info!(hold = %id, frozen_ms = frozen_us as f64 / 1000.0, "thawed");
                ThawReply { held: true, frozen_us }
            }
            None => ThawReply { held: false, frozen_us: 0 },
        }))
    }
}

impl ferrovol_core::rpc::RequestIds for GroupPartRequest {
    fn ids(&self) -> ferrovol_core::rpc::Ids<'_> {
        ferrovol_core::rpc::Ids { group_snapshot_id: Some(&self.group_id), ..Default::default() }
    }

    fn maps(&self) -> Vec<(&'static str, &HashMap<String, String>)> {
        vec![("secrets", &self.secrets)]
    }
}

/// This node's part of a group spread over nodes: under its freeze, with
/// the locks a GroupController call takes.
async fn group_part(
    driver: &Driver,
    engine: &LocalEngine,
    holds: &Mutex<Holds>,
    req: GroupPartRequest,
) -> ferrovol_core::error::Result<GroupPartReply> {
    use ferrovol_core::error;
    if req.group_id.is_empty() || req.volume_ids.is_empty() || req.hold_id.is_empty() {
        return Err(error::invalid("group_id, volume_ids and hold_id are required"));
    }
    // Taken under its freeze or not at all: a hold that ended (its limit,
    // its link) would make a part at an instant of its own.
    if !holds.lock().unwrap_or_else(|p| p.into_inner()).live.contains_key(&req.hold_id) {
        return Err(error::busy(format!(
            "the freeze {} this part belongs to is over here; the group is taken anew",
            error::bounded(&req.hold_id)
        )));
    }
    // The group exclusively, its members shared (the hold holds them
    // shared too).
    let members: Vec<String> = req.volume_ids.iter().map(|id| locks::volume(id)).collect();
    let _guard = driver.locks.acquire(&[locks::group_name(&req.group_id)], &members)?;
    let (group, window) = engine.create_group_part(&req.group_id, &req.volume_ids).await?;
    info!(group_snapshot_id = %group.id, members = group.snapshots.len(),
          window_ms = window.as_secs_f64() * 1000.0, "group part taken under the relay's freeze");
    let nanos = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64)
    };
    Ok(GroupPartReply {
        group_id: group.id,
        members: group
            .snapshots
            .iter()
            .map(|m| GroupMember {
                snapshot_id: m.id.clone(),
                source_volume_id: m.source_volume.clone(),
                size_bytes: m.size as i64,
                created_unix_nanos: nanos(m.created),
                ready: m.ready,
            })
            .collect(),
        created_unix_nanos: nanos(group.created),
        ready: group.ready,
    })
}

/// Dials the relay at `address` (host:port, or several comma-separated;
/// every address they resolve to is one replica) and serves each
/// connection; redials a lost one with backoff. Runs until aborted (the
/// server's shutdown), which stops every dialer with it.
pub async fn run(
    address: String,
    tls: Arc<tokio_rustls::rustls::ClientConfig>,
    driver: Arc<Driver>,
    engine: Arc<LocalEngine>,
) {
    let mut dialers: HashMap<std::net::SocketAddr, Dialer> = HashMap::new();
    loop {
        match resolve(&address).await {
            Ok(found) => {
                dialers.retain(|addr, _| {
                    let keep = found.contains(addr);
                    if !keep {
                        info!(relay = %addr, "relay address gone from {address}");
                    }
                    keep
                });
                for addr in found {
                    dialers.entry(addr).or_insert_with(|| {
                        Dialer(tokio::spawn(dial(
                            addr,
                            tls.clone(),
                            driver.clone(),
                            engine.clone(),
                        )))
                    });
                }
            }
            Err(e) => warn!(%address, error = %e, "cannot resolve the relay"),
        }
        tokio::time::sleep(RESOLVE_EVERY).await;
    }
}

/// A replica's dialer task, stopped when dropped: by the address leaving the
/// Service, or by the whole dialer being aborted.
struct Dialer(tokio::task::JoinHandle<()>);

impl Drop for Dialer {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Every address of every `host:port` in `address` (comma-separated): a
/// headless Service's name gives one per replica; outside Kubernetes the
/// replicas can be listed.
async fn resolve(address: &str) -> std::io::Result<HashSet<std::net::SocketAddr>> {
    let mut all = HashSet::new();
    for one in address.split(',').map(str::trim).filter(|a| !a.is_empty()) {
        all.extend(tokio::net::lookup_host(one).await?);
    }
    Ok(all)
}

/// One replica: connect, serve until the connection is gone, again.
async fn dial(
    addr: std::net::SocketAddr,
    tls: Arc<tokio_rustls::rustls::ClientConfig>,
    driver: Arc<Driver>,
    engine: Arc<LocalEngine>,
) {
    let connector = tokio_rustls::TlsConnector::from(tls);
    let first = Duration::from_millis(100);
    let mut backoff = first;
    loop {
        match connect(addr, &connector).await {
            Ok(stream) => {
                info!(relay = %addr, "link to the relay up");
                let up = std::time::Instant::now();
                let (io, closed) = LinkIo::new(stream);
                let routes = link_routes(driver.clone(), engine.clone());
                tokio::spawn(
                    routes.serve_with_incoming(tokio_stream::once(Ok::<_, std::io::Error>(io))),
                );
                let _ = closed.await;
                if up.elapsed() < SHORT_LINK {
                    backoff = (backoff * 2).min(REFUSED_BACKOFF_MAX);
                    warn!(relay = %addr, retry_in = ?backoff,
                          "link to the relay lost at once (refused? the relay's log says why)");
                } else {
                    backoff = first;
                    warn!(relay = %addr, "link to the relay lost; redialling");
                }
            }
            Err(e) => {
                backoff = (backoff * 2).min(BACKOFF_MAX.max(backoff));
                warn!(relay = %addr, error = %e, "cannot reach the relay");
            }
        }
        tokio::time::sleep(backoff).await;
    }
}

async fn connect(
    addr: std::net::SocketAddr,
    connector: &tokio_rustls::TlsConnector,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let tcp = tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| format!("no answer within {DIAL_TIMEOUT:?}"))?
        .map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    tokio::time::timeout(DIAL_TIMEOUT, connector.connect(crate::tls::relay_name(), tcp))
        .await
        .map_err(|_| format!("TLS handshake took over {DIAL_TIMEOUT:?}"))?
        .map_err(|e| format!("TLS: {e}"))
}

/// What an agent serves a relay: its controller services, and [`Agent`].
fn link_routes(
    driver: Arc<Driver>,
    engine: Arc<LocalEngine>,
) -> tonic::transport::server::Router<
    tower::layer::util::Stack<MethodLayer, tower::layer::util::Identity>,
> {
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT));
    ferrovol_core::server::controller_routes(server, driver.clone())
        .add_service(AgentServer::new(AgentService::new(driver, engine)))
}
