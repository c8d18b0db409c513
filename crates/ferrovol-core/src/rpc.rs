//! The single path every RPC takes: one tracing span per call carrying the
//! method, a request id and the object ids of the request, then one line with
//! the resulting gRPC code and latency.
//!
//! Requests are never logged whole: CSI requests carry `secrets` maps, and the
//! only way to be sure they never reach a log is to log chosen fields only.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use ferrovol_csi as csi;
use tonic::{Request, Response, Status};
use tracing::{debug, error, field, info, info_span, warn, Instrument};

use crate::error::{Error, Result};

static NEXT_REQUEST_ID: AtomicU64 = AtomicU64::new(1);

/// The identifiers of a request that are worth a span field. Never secrets,
/// parameters or contexts: only names and ids.
#[derive(Default)]
pub struct Ids<'a> {
    pub name: Option<&'a str>,
    pub volume_id: Option<&'a str>,
    pub snapshot_id: Option<&'a str>,
    pub group_snapshot_id: Option<&'a str>,
}

pub trait RequestIds {
    fn ids(&self) -> Ids<'_> {
        Ids::default()
    }
}

/// Methods polled constantly by the CO; their successes are logged at debug
/// so that real operations stand out at info.
fn is_chatty(method: &str) -> bool {
    matches!(
        method,
        "Probe"
            | "GetPluginInfo"
            | "GetPluginCapabilities"
            | "ControllerGetCapabilities"
            | "NodeGetCapabilities"
            | "GroupControllerGetCapabilities"
            | "NodeGetInfo"
            | "NodeGetVolumeStats"
            | "GetCapacity"
            | "ListVolumes"
            | "ListSnapshots"
    )
}

fn code_of<T>(outcome: &Result<T>) -> tonic::Code {
    outcome.as_ref().map_or_else(Error::code, |_| tonic::Code::Ok)
}

/// Runs one RPC inside its span and maps the outcome to a gRPC response.
pub async fn handle<Req, Resp, F, Fut>(
    method: &'static str,
    request: Request<Req>,
    body: F,
) -> Result<Response<Resp>, Status>
where
    Req: RequestIds,
    F: FnOnce(Req) -> Fut,
    Fut: Future<Output = Result<Resp>>,
{
    let req = request.into_inner();
    let request_id = NEXT_REQUEST_ID.fetch_add(1, Ordering::Relaxed);
    let span = info_span!(
        "rpc",
        method,
        request_id,
        name = field::Empty,
        volume_id = field::Empty,
        snapshot_id = field::Empty,
        group_snapshot_id = field::Empty,
    );
    {
        let ids = req.ids();
        for (key, value) in [
            ("name", ids.name),
            ("volume_id", ids.volume_id),
            ("snapshot_id", ids.snapshot_id),
            ("group_snapshot_id", ids.group_snapshot_id),
        ] {
            if let Some(v) = value.filter(|v| !v.is_empty()) {
                span.record(key, v);
            }
        }
    }

    let started = Instant::now();
    let outcome = body(req).instrument(span.clone()).await;
    let latency_ms = started.elapsed().as_secs_f64() * 1000.0;

    let code = code_of(&outcome);
    crate::metrics::global().observe_rpc(method, code, latency_ms / 1000.0);
    let _entered = span.enter();
    let code = crate::error::code_name(code);
    match &outcome {
        Ok(_) if is_chatty(method) => debug!(code, latency_ms, "rpc done"),
        Ok(_) => info!(code, latency_ms, "rpc done"),
        Err(e @ (Error::Internal(_) | Error::Unavailable(_))) => {
            error!(code, latency_ms, error = e.message(), "rpc failed")
        }
        Err(e) => warn!(code, latency_ms, error = e.message(), "rpc failed"),
    }
    outcome.map(Response::new).map_err(Status::from)
}

/// Like [`handle`], for calls that change state. The work runs in a task of
/// its own: a caller that gives up (its deadline passes, it disconnects)
/// drops only its wait, never the work, which finishes or rolls back while
/// still holding its operation locks — so the sidecar's retry meanwhile is
/// ABORTED, and afterwards finds the finished result.
pub async fn handle_detached<Req, Resp, F, Fut>(
    method: &'static str,
    request: Request<Req>,
    body: F,
) -> Result<Response<Resp>, Status>
where
    Req: RequestIds,
    Resp: Send + 'static,
    F: FnOnce(Req) -> Fut,
    Fut: Future<Output = Result<Resp>> + Send + 'static,
{
    handle(method, request, |req| {
        let work = body(req);
        async move {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let tracked = in_flight::track(method);
            tokio::spawn(
                async move {
                    let _tracked = tracked;
                    let outcome = work.await;
                    let code = crate::error::code_name(code_of(&outcome));
                    if tx.send(outcome).is_err() {
                        info!(code, "finished after the caller stopped waiting");
                    }
                }
                .in_current_span(),
            );
            rx.await
                .map_err(|_| crate::error::internal(format!("{method} stopped unexpectedly")))?
        }
    })
    .await
}

macro_rules! request_ids {
    ($($ty:ident { $($kind:ident : $field:ident),* $(,)? })*) => {
        $(
            impl RequestIds for csi::$ty {
                #[allow(clippy::needless_update)]
                fn ids(&self) -> Ids<'_> {
                    Ids { $($kind: Some(self.$field.as_str()),)* ..Ids::default() }
                }
            }
        )*
    };
}

request_ids! {
    GetPluginInfoRequest {}
    GetPluginCapabilitiesRequest {}
    ProbeRequest {}
    CreateVolumeRequest { name: name }
    DeleteVolumeRequest { volume_id: volume_id }
    ControllerPublishVolumeRequest { volume_id: volume_id }
    ControllerUnpublishVolumeRequest { volume_id: volume_id }
    ValidateVolumeCapabilitiesRequest { volume_id: volume_id }
    ListVolumesRequest {}
    GetCapacityRequest {}
    ControllerGetCapabilitiesRequest {}
    CreateSnapshotRequest { name: name, volume_id: source_volume_id }
    DeleteSnapshotRequest { snapshot_id: snapshot_id }
    ListSnapshotsRequest { volume_id: source_volume_id, snapshot_id: snapshot_id }
    GetSnapshotRequest { snapshot_id: snapshot_id }
    ControllerExpandVolumeRequest { volume_id: volume_id }
    ControllerGetVolumeRequest { volume_id: volume_id }
    ControllerModifyVolumeRequest { volume_id: volume_id }
    GroupControllerGetCapabilitiesRequest {}
    CreateVolumeGroupSnapshotRequest { name: name }
    DeleteVolumeGroupSnapshotRequest { group_snapshot_id: group_snapshot_id }
    GetVolumeGroupSnapshotRequest { group_snapshot_id: group_snapshot_id }
    GetMetadataAllocatedRequest { snapshot_id: snapshot_id }
    GetMetadataDeltaRequest { snapshot_id: target_snapshot_id }
    NodeStageVolumeRequest { volume_id: volume_id }
    NodeUnstageVolumeRequest { volume_id: volume_id }
    NodePublishVolumeRequest { volume_id: volume_id }
    NodeUnpublishVolumeRequest { volume_id: volume_id }
    NodeGetVolumeStatsRequest { volume_id: volume_id }
    NodeExpandVolumeRequest { volume_id: volume_id }
    NodeGetCapabilitiesRequest {}
    NodeGetInfoRequest {}
}

/// The detached calls still running, which the server owns: at shutdown it
/// waits for them (bounded) and names those it leaves behind.
pub mod in_flight {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{LazyLock, Mutex};
    use std::time::Duration;

    static CALLS: LazyLock<Mutex<HashMap<u64, &'static str>>> = LazyLock::new(Default::default);
    static NEXT: AtomicU64 = AtomicU64::new(0);
    static FINISHED: tokio::sync::Notify = tokio::sync::Notify::const_new();

    /// Held by a detached call's task for as long as it runs.
    pub struct Tracked(u64);

    pub fn track(method: &'static str) -> Tracked {
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        CALLS.lock().unwrap_or_else(|p| p.into_inner()).insert(id, method);
        Tracked(id)
    }

    impl Drop for Tracked {
        fn drop(&mut self) {
            CALLS.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.0);
            FINISHED.notify_waiters();
        }
    }

    /// The methods of the calls still running, sorted.
    pub fn running() -> Vec<&'static str> {
        let mut v: Vec<_> =
            CALLS.lock().unwrap_or_else(|p| p.into_inner()).values().copied().collect();
        v.sort();
        v
    }

    /// Waits until no detached call runs, or `within` passes: answers the
    /// ones still running.
    pub async fn drain(within: Duration) -> Vec<&'static str> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            // Registered before the check, so a call that finishes between
            // the two still wakes us.
            let finished = FINISHED.notified();
            let left = running();
            if left.is_empty() {
                return left;
            }
            if tokio::time::timeout_at(deadline, finished).await.is_err() {
                return running();
            }
        }
    }
}
