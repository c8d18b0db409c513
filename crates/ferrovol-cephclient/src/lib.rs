//! What the Ceph engines share: connections to a cluster per set of
//! credentials (ceph-csi's secret keys), what a librados errno means as an
//! error kind, the counted off-executor call every Ceph call runs in, and
//! the graceful end that waits for those calls before the connections shut
//! down. The FFI itself is `ferrovol-ceph`; each engine is its own crate.

#![forbid(unsafe_code)]

pub mod connect;
pub mod helper;

pub use ferrovol_error as error;

use error::{Error, Kind, Result};
use ferrovol_ceph::CephError;

/// What a librados/librbd/libcephfs failure means, in one place. The kind is what
/// the errno says about the object the call named; a caller for whom that
/// object is the request's argument rather than its subject says so with
/// its own context (a missing pool in CreateVolume is the StorageClass's
/// mistake, INVALID_ARGUMENT, not a missing volume).
pub fn ceph_error(e: CephError) -> Error {
    let msg = e.to_string();
    let kind = match e.errno {
        libc::ENOENT => Kind::NotFound,
        libc::EEXIST => Kind::Exists,
        libc::EBUSY | libc::ENOTEMPTY | libc::EXDEV => Kind::Precondition,
        // Accepted credentials whose caps do not allow this.
        libc::EACCES | libc::EPERM => {
            return error::denied(format!("{msg} (the Ceph user's caps do not allow it)"))
        }
        libc::ENOSPC | libc::EDQUOT => Kind::Exhausted,
        libc::EINVAL => Kind::Invalid,
        libc::ERANGE | libc::EFBIG => Kind::OutOfRange,
        libc::ETIMEDOUT
        | libc::ECONNREFUSED
        | libc::ENOTCONN
        | libc::ESHUTDOWN
        | libc::EHOSTUNREACH
        | libc::EROFS
        | libc::EAGAIN => Kind::Unavailable,
        _ => Kind::Internal,
    };
    Error::new(kind, msg)
}

/// The cluster's space as `ceph df` reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Space {
    pub total: u64,
    pub total_available: u64,
    /// Each pool's `max_avail`: what it can still take, its replication
    /// counted.
    pub pools: std::collections::BTreeMap<String, u64>,
}

impl Space {
    /// What `pool` can take (None: the cluster's raw space).
    pub fn available(&self, pool: Option<&str>) -> Option<u64> {
        match pool {
            Some(p) => self.pools.get(p).copied(),
            None => Some(self.total_available),
        }
    }
}

/// Reads `ceph df` (a blocking call: run it through [`blocking`]).
/// UNAVAILABLE while no ceph-mgr reports usage: the monitors then answer
/// zeros, which mean unknown, not full.
pub fn space(cluster: &ferrovol_ceph::Cluster) -> Result<Space> {
    let out = cluster.mon_command(r#"{"prefix":"df","format":"json"}"#).map_err(ceph_error)?;
    parse_space(&out)
}

fn parse_space(out: &str) -> Result<Space> {
    let v: serde_json::Value =
        serde_json::from_str(out).map_err(|e| error::internal(format!("ceph df answered {e}")))?;
    let total = v["stats"]["total_bytes"].as_u64().unwrap_or(0);
    if total == 0 {
        return Err(error::unavailable(
            "the cluster's capacity is unknown: no ceph-mgr reports usage yet",
        ));
    }
    let pools = v["pools"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| Some((p["name"].as_str()?.to_string(), p["stats"]["max_avail"].as_u64()?)))
        .collect();
    Ok(Space {
        total,
        total_available: v["stats"]["total_avail_bytes"].as_u64().unwrap_or(0),
        pools,
    })
}

/// Records a name as taken by `value` (a small object created
/// exclusively), or checks that it already is: ALREADY_EXISTS when another
/// value took it.
pub fn claim(
    pool: &ferrovol_ceph::Pool,
    oid: &str,
    value: &[u8],
    taken: impl Fn() -> String,
) -> Result<()> {
    loop {
        match pool.read_object(oid).map_err(ceph_error)? {
            Some(v) if v == value => return Ok(()),
            Some(_) => return Err(error::exists(taken())),
            None => match pool.create_object(oid, value) {
                Ok(()) => return Ok(()),
                // Someone claimed it between the read and the create.
                Err(e) if e.is(libc::EEXIST) => continue,
                Err(e) => return Err(ceph_error(e)),
            },
        }
    }
}

/// Ceph calls running on the blocking pool right now: a stop waits for
/// them before it shuts the clients down (librados torn down under a
/// running call aborts the process).
static IN_FLIGHT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static SETTLED: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// One counted call; uncounted when it ends, however it ends. A stream of
/// librbd results holds one for as long as its producer runs.
pub struct Counted;

impl Counted {
    // Not `Default`: making one counts a call, which a default must not do.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Counted {
        IN_FLIGHT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Counted
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        if IN_FLIGHT.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) == 1 {
            SETTLED.notify_waiters();
        }
    }
}

/// Runs a blocking sequence of Ceph calls off the async executor.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let counted = Counted::new();
    // To its end: a librbd call is bounded by the cluster's own op timeout
    // (`--ceph-timeout`), and the stop waits for the calls counted here.
    ferrovol_host::offload::to_completion("a Ceph call", move || {
        let _counted = counted;
        f()
    })
    .await
}

/// The end of an engine half: waits for the Ceph calls still running (at
/// most `limit`), then closes every pool and shuts every connection down,
/// in order, before the process goes (librados torn down by the exit
/// itself, with its threads still busy, aborted the driver on SIGTERM).
pub async fn close_connections(conn: &connect::Connections, limit: std::time::Duration) {
    let running = settle_calls(limit).await;
    if running > 0 {
        tracing::warn!(running, "Ceph calls still running at the stop");
    }
    let held = conn.shutdown();
    if held > 0 {
        tracing::warn!(held, "Ceph connections still held elsewhere at the stop");
    }
}

/// Waits (at most `limit`) until no Ceph call runs; answers how many still do.
pub async fn settle_calls(limit: std::time::Duration) -> usize {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let settled = SETTLED.notified();
        let running = IN_FLIGHT.load(std::sync::atomic::Ordering::SeqCst);
        if running == 0 {
            return 0;
        }
        if tokio::time::timeout_at(deadline, settled).await.is_err() {
            return IN_FLIGHT.load(std::sync::atomic::Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn df_answers_pools_and_refuses_unknown_capacity() {
        let out = r#"{"stats":{"total_bytes":100,"total_avail_bytes":60},
            "pools":[{"name":"rbd","stats":{"max_avail":20}}]}"#;
        let s = parse_space(out).unwrap();
        assert_eq!((s.available(Some("rbd")), s.available(None)), (Some(20), Some(60)));
        assert_eq!(s.available(Some("gone")), None);
        let none = r#"{"stats":{"total_bytes":0},"pools":[]}"#;
        assert_eq!(parse_space(none).unwrap_err().code(), tonic::Code::Unavailable);
    }
}
