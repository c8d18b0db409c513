//! The single path every RPC takes: one tracing span per call carrying the
//! method, a request id and the object ids of the request, then one line with
//! the resulting gRPC code and latency.
//!
//! Requests are never logged whole: CSI requests carry `secrets` maps, and the
//! only way to be sure they never reach a log is to log chosen fields only.
//!
//! Each service declares its methods once, in a [`service!`] table: which
//! run inline and which run detached from their callers. The method name
//! every log line and metric carries is the gRPC path tonic routed on
//! (recorded by [`MethodLayer`]), and a handler that panics answers
//! INTERNAL and is logged, never a dropped stream.

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use ferrovol_csi as csi;
use tonic::{Request, Response, Status};
use tracing::{debug, error, field, info, info_span, warn, Instrument};

use crate::error::{Error, Kind, Result};

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

    /// The request's maps (parameters, secrets, contexts), by field name:
    /// held to the spec's size limits before any handler sees them.
    fn maps(&self) -> Vec<(&'static str, &std::collections::HashMap<String, String>)> {
        Vec::new()
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

/// The gRPC path of a request (`/csi.v1.Controller/CreateVolume`), put in
/// its extensions by [`MethodLayer`] before tonic routes it.
#[derive(Clone, Debug)]
struct GrpcPath(String);

/// A tower layer for the server: records each request's gRPC path, which
/// tonic routes on but does not hand to the service, and gives tonic's own
/// UNIMPLEMENTED answer (a service or method this process does not serve)
/// a message saying so: an empty one leaves the caller guessing.
#[derive(Clone, Copy, Debug)]
pub struct MethodLayer {
    mode: crate::cli::Mode,
}

impl MethodLayer {
    pub fn new(mode: crate::cli::Mode) -> Self {
        MethodLayer { mode }
    }
}

impl<S> tower::Layer<S> for MethodLayer {
    type Service = MethodService<S>;

    fn layer(&self, inner: S) -> MethodService<S> {
        MethodService { inner, mode: self.mode }
    }
}

#[derive(Clone, Debug)]
pub struct MethodService<S> {
    inner: S,
    mode: crate::cli::Mode,
}

impl<S, B, RB> tower::Service<http::Request<B>> for MethodService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<
        Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let path = request.uri().path().to_string();
        let mode = self.mode;
        request.extensions_mut().insert(GrpcPath(path.clone()));
        let answer = self.inner.call(request);
        Box::pin(async move {
            let mut response = answer.await?;
            explain_unimplemented(response.headers_mut(), &path, mode);
            Ok(response)
        })
    }
}

/// Adds a `grpc-message` to a trailers-only UNIMPLEMENTED answer that has
/// none (tonic's answer for a path no registered service routes).
fn explain_unimplemented(headers: &mut http::HeaderMap, path: &str, mode: crate::cli::Mode) {
    let unimplemented = headers.get("grpc-status").is_some_and(|v| {
        v.as_bytes() == (tonic::Code::Unimplemented as i32).to_string().as_bytes()
    });
    if !unimplemented || headers.contains_key("grpc-message") {
        return;
    }
    let message = format!(
        "{} is not served by this ferrovol process (--mode {}): node calls go to the node \
         plugin's socket, controller calls to the controller's",
        crate::error::bounded(path),
        mode.name()
    );
    if let Ok(value) = http::HeaderValue::from_str(&percent_encode(&message)) {
        headers.insert("grpc-message", value);
    }
}

/// gRPC's encoding of `grpc-message`: bytes outside printable ASCII, and
/// `%` itself, as `%XX`.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        match b {
            b'%' => out.push_str("%25"),
            0x20..=0x7e => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The method name of a request: the last part of its gRPC path, or
/// `fallback` for a call made in-process without a server (the fuzz
/// harness). Names are interned: only paths tonic routed to one of our
/// handlers get here, a set as small as the CSI spec.
pub fn method_name<T>(request: &Request<T>, fallback: &'static str) -> &'static str {
    static NAMES: LazyLock<Mutex<HashSet<&'static str>>> = LazyLock::new(Default::default);
    let Some(GrpcPath(path)) = request.extensions().get::<GrpcPath>() else { return fallback };
    let name = path.rsplit('/').next().unwrap_or(path);
    let mut names = NAMES.lock().unwrap_or_else(|p| p.into_inner());
    match names.get(name) {
        Some(interned) => interned,
        None => {
            let interned: &'static str = Box::leak(name.to_string().into_boxed_str());
            names.insert(interned);
            interned
        }
    }
}

/// A handler's panic as the INTERNAL error its caller gets.
fn panicked(panic: Box<dyn std::any::Any + Send>) -> Error {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into());
    error!(panic = %what, "rpc handler panicked");
    crate::error::internal(format!("the driver failed: {what}"))
}

/// Awaits `work`, turning a panic inside it into an INTERNAL error.
async fn catching_panics<T>(work: impl Future<Output = Result<T>>) -> Result<T> {
    let mut work = std::pin::pin!(work);
    std::future::poll_fn(|cx: &mut Context<'_>| {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work.as_mut().poll(cx))) {
            Ok(poll) => poll,
            Err(panic) => Poll::Ready(Err(panicked(panic))),
        }
    })
    .await
}

/// Runs one RPC inside its span and maps the outcome to a gRPC response.
/// A reply and response headers of ferrovol's own (facts the CSI message
/// has no field for, `ferrovol_csi::facts`).
pub struct Annotated<T> {
    pub message: T,
    pub headers: tonic::metadata::MetadataMap,
}

impl<T> Annotated<T> {
    fn into_response(self) -> Response<T> {
        let mut response = Response::new(self.message);
        *response.metadata_mut() = self.headers;
        response
    }
}

/// Like [`handle`], for a handler that answers headers with its message.
pub async fn handle_annotated<Req, Resp, F, Fut>(
    method: &'static str,
    request: Request<Req>,
    body: F,
) -> Result<Response<Resp>, Status>
where
    Req: RequestIds,
    F: FnOnce(Req) -> Fut,
    Fut: Future<Output = Result<Annotated<Resp>>>,
{
    run(method, request, body, Annotated::into_response).await
}

/// Runs one call: its span, its request maps held to the spec's limits,
/// panics caught, the outcome logged and measured; `respond` makes the
/// gRPC response of a success.
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
    run(method, request, body, Response::new).await
}

async fn run<Req, R, Resp, F, Fut>(
    method: &'static str,
    request: Request<Req>,
    body: F,
    respond: fn(R) -> Response<Resp>,
) -> Result<Response<Resp>, Status>
where
    Req: RequestIds,
    F: FnOnce(Req) -> Fut,
    Fut: Future<Output = Result<R>>,
{
    let req = request.into_inner();
    let request_id = NEXT_REQUEST_ID.fetch_add(1, Ordering::Relaxed);
    let span = info_span!(
        "rpc",
        method,
        request_id,
        // Not `name`: JSON logs name the span itself under that key.
        object_name = field::Empty,
        volume_id = field::Empty,
        snapshot_id = field::Empty,
        group_snapshot_id = field::Empty,
    );
    {
        let ids = req.ids();
        for (key, value) in [
            ("object_name", ids.name),
            ("volume_id", ids.volume_id),
            ("snapshot_id", ids.snapshot_id),
            ("group_snapshot_id", ids.group_snapshot_id),
        ] {
            if let Some(v) = value.filter(|v| !v.is_empty()) {
                // Logged before validation: a client's value, bounded.
                span.record(key, crate::error::bounded(v).as_ref());
            }
        }
    }

    let started = Instant::now();
    let outcome = match crate::services::validate::maps(&req.maps()) {
        Err(e) => Err(e),
        Ok(()) => catching_panics(body(req).instrument(span.clone())).await,
    };
    let latency_ms = started.elapsed().as_secs_f64() * 1000.0;

    let code = code_of(&outcome);
    crate::metrics::global().observe_rpc(method, code, latency_ms / 1000.0);
    let _entered = span.enter();
    let code = crate::error::code_name(code);
    match &outcome {
        Ok(_) if is_chatty(method) => debug!(code, latency_ms, "rpc done"),
        Ok(_) => info!(code, latency_ms, "rpc done"),
        Err(e) if matches!(e.kind(), Kind::Internal | Kind::Unavailable) => {
            error!(code, latency_ms, error = e.message(), "rpc failed")
        }
        Err(e) => warn!(code, latency_ms, error = e.message(), "rpc failed"),
    }
    outcome.map(respond).map_err(Status::from)
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
    run(method, request, |req| detached(method, body(req)), Response::new).await
}

/// [`handle_detached`] for a handler that answers headers with its message.
pub async fn handle_detached_annotated<Req, Resp, F, Fut>(
    method: &'static str,
    request: Request<Req>,
    body: F,
) -> Result<Response<Resp>, Status>
where
    Req: RequestIds,
    Resp: Send + 'static,
    F: FnOnce(Req) -> Fut,
    Fut: Future<Output = Result<Annotated<Resp>>> + Send + 'static,
{
    run(method, request, |req| detached(method, body(req)), Annotated::into_response).await
}

/// The work in a task of its own, its outcome sent back to the caller's
/// wait (which may be dropped without dropping the work).
async fn detached<R: Send + 'static>(
    method: &'static str,
    work: impl Future<Output = Result<R>> + Send + 'static,
) -> Result<R> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let tracked = in_flight::track(method);
    tokio::spawn(
        async move {
            let _tracked = tracked;
            let outcome = catching_panics(work).await;
            let code = crate::error::code_name(code_of(&outcome));
            if tx.send(outcome).is_err() {
                info!(code, "finished after the caller stopped waiting");
            }
        }
        .in_current_span(),
    );
    rx.await.map_err(|_| crate::error::internal(format!("{method} stopped unexpectedly")))?
}

/// Declares a service's tonic trait impl from one table: each method,
/// its request and response types, whether it runs `inline` or `detached`
/// (calls that change state: see [`handle_detached`]), and the inherent
/// method that does the work:
/// `fn create_volume(Req) -> Resp => detached create_volume;`.
/// Associated types (streams) come first.
macro_rules! service {
    (
        $svc:ident: $trait:path {
            $(type $assoc:ident = $aty:ty;)*
            $(fn $method:ident($req:ty) -> $resp:ty => $kind:ident $body:ident;)*
        }
    ) => {
        #[tonic::async_trait]
        impl $trait for $svc {
            $(type $assoc = $aty;)*
            $(
                async fn $method(
                    &self,
                    request: tonic::Request<$req>,
                ) -> std::result::Result<tonic::Response<$resp>, tonic::Status> {
                    let method = $crate::rpc::method_name(&request, stringify!($method));
                    $crate::rpc::service!(@call $kind self method request $body)
                }
            )*
        }
    };
    (@call detached $self:ident $name:ident $request:ident $body:ident) => {{
        let this = $self.clone();
        $crate::rpc::handle_detached($name, $request, move |r| async move { this.$body(r).await })
            .await
    }};
    (@call inline $self:ident $name:ident $request:ident $body:ident) => {
        $crate::rpc::handle($name, $request, |r| $self.$body(r)).await
    };
    (@call annotated $self:ident $name:ident $request:ident $body:ident) => {
        $crate::rpc::handle_annotated($name, $request, |r| $self.$body(r)).await
    };
    (@call detached_annotated $self:ident $name:ident $request:ident $body:ident) => {{
        let this = $self.clone();
        $crate::rpc::handle_detached_annotated(
            $name,
            $request,
            move |r| async move { this.$body(r).await },
        )
        .await
    }};
}
pub(crate) use service;

macro_rules! request_ids {
    ($($ty:ident { $($kind:ident : $field:ident),* $(,)? } $([$($map:ident),*])?)*) => {
        $(
            impl RequestIds for csi::$ty {
                #[allow(clippy::needless_update)]
                fn ids(&self) -> Ids<'_> {
                    Ids { $($kind: Some(self.$field.as_str()),)* ..Ids::default() }
                }

                fn maps(&self) -> Vec<(&'static str, &std::collections::HashMap<String, String>)> {
                    vec![$($((stringify!($map), &self.$map)),*)?]
                }
            }
        )*
    };
}

request_ids! {
    GetPluginInfoRequest {}
    GetPluginCapabilitiesRequest {}
    ProbeRequest {}
    CreateVolumeRequest { name: name } [parameters, secrets, mutable_parameters]
    DeleteVolumeRequest { volume_id: volume_id } [secrets]
    ControllerPublishVolumeRequest { volume_id: volume_id } [secrets, volume_context]
    ControllerUnpublishVolumeRequest { volume_id: volume_id } [secrets]
    ValidateVolumeCapabilitiesRequest { volume_id: volume_id }
        [volume_context, parameters, secrets, mutable_parameters]
    ListVolumesRequest {}
    GetCapacityRequest {} [parameters]
    ControllerGetCapabilitiesRequest {}
    CreateSnapshotRequest { name: name, volume_id: source_volume_id } [secrets, parameters]
    DeleteSnapshotRequest { snapshot_id: snapshot_id } [secrets]
    ListSnapshotsRequest { volume_id: source_volume_id, snapshot_id: snapshot_id } [secrets]
    GetSnapshotRequest { snapshot_id: snapshot_id } [secrets]
    ControllerExpandVolumeRequest { volume_id: volume_id } [secrets]
    ControllerGetVolumeRequest { volume_id: volume_id }
    ControllerModifyVolumeRequest { volume_id: volume_id } [secrets, mutable_parameters]
    GroupControllerGetCapabilitiesRequest {}
    CreateVolumeGroupSnapshotRequest { name: name } [secrets, parameters]
    DeleteVolumeGroupSnapshotRequest { group_snapshot_id: group_snapshot_id } [secrets]
    GetVolumeGroupSnapshotRequest { group_snapshot_id: group_snapshot_id } [secrets]
    GetMetadataAllocatedRequest { snapshot_id: snapshot_id } [secrets]
    GetMetadataDeltaRequest { snapshot_id: target_snapshot_id } [secrets]
    NodeStageVolumeRequest { volume_id: volume_id } [publish_context, secrets, volume_context]
    NodeUnstageVolumeRequest { volume_id: volume_id }
    NodePublishVolumeRequest { volume_id: volume_id } [publish_context, secrets, volume_context]
    NodeUnpublishVolumeRequest { volume_id: volume_id }
    NodeGetVolumeStatsRequest { volume_id: volume_id }
    NodeExpandVolumeRequest { volume_id: volume_id } [secrets]
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
