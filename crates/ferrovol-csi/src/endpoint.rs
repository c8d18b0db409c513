//! CSI endpoints: parsing `unix://` / `tcp://` addresses, binding the server's
//! socket safely, and connecting a client to any CSI driver.

use std::fmt;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint as TonicEndpoint, Uri};

/// Where a CSI driver listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(String),
}

impl Endpoint {
    /// Accepts `unix:///abs/path`, `unix:/abs/path`, a plain path, or
    /// `tcp://host:port` (for debugging only: CSI is meant for unix sockets).
    pub fn parse(s: &str) -> Result<Endpoint, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("empty endpoint".into());
        }
        if let Some(addr) = s.strip_prefix("tcp://") {
            if addr.is_empty() || !addr.contains(':') {
                return Err(format!("tcp endpoint {s:?} needs host:port"));
            }
            return Ok(Endpoint::Tcp(addr.to_string()));
        }
        let path = if let Some(rest) = s.strip_prefix("unix://") {
            rest
        } else if let Some(rest) = s.strip_prefix("unix:") {
            rest
        } else if s.contains("://") {
            return Err(format!("unsupported endpoint scheme in {s:?} (use unix:// or tcp://)"));
        } else {
            s
        };
        if path.is_empty() {
            return Err(format!("endpoint {s:?} has no socket path"));
        }
        Ok(Endpoint::Unix(PathBuf::from(path)))
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix://{}", p.display()),
            Endpoint::Tcp(a) => write!(f, "tcp://{a}"),
        }
    }
}

/// The socket every ferrovol command uses when given none: the same for
/// `serve`, `ctl` and `probe`, and absolute, so a client finds the driver
/// from any directory. As root `/run/ferrovol/csi.sock`; otherwise under
/// `$XDG_RUNTIME_DIR` (a per-user directory), else `/tmp/ferrovol-<uid>`.
pub fn default_socket() -> PathBuf {
    let uid = rustix::process::geteuid();
    if uid.is_root() {
        return PathBuf::from("/run/ferrovol/csi.sock");
    }
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir).join("ferrovol/csi.sock"),
        None => PathBuf::from(format!("/tmp/ferrovol-{}/csi.sock", uid.as_raw())),
    }
}

/// The driver's state directory when given none: the same from any
/// working directory (a relative default made a new, empty pool wherever
/// the driver happened to start). As root `/var/lib/ferrovol`, as the
/// manifests use; otherwise `$XDG_STATE_HOME/ferrovol`, else
/// `~/.local/state/ferrovol`.
pub fn default_state_dir() -> PathBuf {
    if rustix::process::geteuid().is_root() {
        return PathBuf::from("/var/lib/ferrovol");
    }
    let nonempty = |v: &str| std::env::var_os(v).filter(|d| !d.is_empty()).map(PathBuf::from);
    match (nonempty("XDG_STATE_HOME"), nonempty("HOME")) {
        (Some(state), _) => state.join("ferrovol"),
        (None, Some(home)) => home.join(".local/state/ferrovol"),
        (None, None) => {
            PathBuf::from(format!("/tmp/ferrovol-{}/state", rustix::process::geteuid().as_raw()))
        }
    }
}

/// The endpoint a command was told: its `--endpoint` (or `FERROVOL_ENDPOINT`,
/// which clap reads), else `CSI_ENDPOINT` as the sidecars name it, else
/// [`default_socket`].
pub fn resolve(given: Option<&str>) -> Result<Endpoint, String> {
    let from_sidecar_env = || std::env::var("CSI_ENDPOINT").ok().filter(|s| !s.trim().is_empty());
    match given.map(str::to_string).or_else(from_sidecar_env) {
        Some(s) => Endpoint::parse(&s),
        None => Ok(Endpoint::Unix(default_socket())),
    }
}

/// Why a unix socket cannot be reached, in terms of what to check.
pub fn diagnose(path: &Path) -> String {
    let shown = path.display();
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => format!(
            "no socket at {shown}: is the driver running? (start it with `ferrovol serve`, or \
             pass --endpoint)"
        ),
        Err(e) => format!("cannot look at {shown}: {e}"),
        Ok(m) if !m.file_type().is_socket() => {
            format!("{shown} is not a socket: check --endpoint")
        }
        Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => format!(
                "{shown} refuses connections: no process serves it (the driver stopped and left \
                 its socket?)"
            ),
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => format!(
                "no permission to connect to {shown}: run as its owner or group (the socket is \
                 0660)"
            ),
            Err(e) => format!("cannot connect to {shown}: {e}"),
            Ok(_) => format!("{shown} accepts connections but does not speak gRPC/HTTP2"),
        },
    }
}

/// What was found at a socket path before binding.
#[derive(Debug, PartialEq, Eq)]
pub enum SocketState {
    Absent,
    /// A socket file nobody answers on: left by a dead process.
    Stale,
}

/// Checks the socket path before we bind: a stale socket may be replaced, but
/// a socket some live process still serves, or a file that is not a socket,
/// must never be taken over.
pub fn inspect_socket_path(path: &Path) -> io::Result<SocketState> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(SocketState::Absent),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket; refusing to replace it", path.display()),
        ));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("{} is served by a live process; refusing to take it over", path.display()),
        )),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Ok(SocketState::Stale),
        Err(e) => Err(io::Error::new(e.kind(), format!("probing {}: {e}", path.display()))),
    }
}

/// Binds a unix socket at `path`, replacing a stale one, and restricts it to
/// owner and group (0660): whoever may connect may create and delete volumes.
pub fn bind_unix(path: &Path) -> io::Result<(tokio::net::UnixListener, SocketState)> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    let state = inspect_socket_path(path)?;
    if state == SocketState::Stale {
        std::fs::remove_file(path)?;
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    Ok((listener, state))
}

/// Connects a gRPC channel to a CSI endpoint (ours or any other driver's).
pub async fn connect(endpoint: &Endpoint) -> Result<Channel, tonic::transport::Error> {
    match endpoint {
        Endpoint::Tcp(addr) => {
            TonicEndpoint::from_shared(format!("http://{addr}"))?.connect().await
        }
        Endpoint::Unix(path) => {
            let path = path.clone();
            // The URI is required by the API but unused: the connector below
            // decides where bytes go.
            TonicEndpoint::from_static("http://localhost")
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        let stream = tokio::net::UnixStream::connect(path).await?;
                        Ok::<_, io::Error>(TokioIo::new(stream))
                    }
                }))
                .await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_all_accepted_forms() {
        let unix = |p: &str| Endpoint::Unix(PathBuf::from(p));
        assert_eq!(Endpoint::parse("unix:///csi/csi.sock").unwrap(), unix("/csi/csi.sock"));
        assert_eq!(Endpoint::parse("unix:/csi/csi.sock").unwrap(), unix("/csi/csi.sock"));
        assert_eq!(Endpoint::parse("/csi/csi.sock").unwrap(), unix("/csi/csi.sock"));
        assert_eq!(Endpoint::parse("./d/csi.sock").unwrap(), unix("./d/csi.sock"));
        assert_eq!(
            Endpoint::parse("tcp://127.0.0.1:10000").unwrap(),
            Endpoint::Tcp("127.0.0.1:10000".into())
        );
    }

    #[test]
    fn rejects_bad_forms() {
        for bad in ["", "unix://", "http://x:1", "tcp://", "tcp://nohostport"] {
            assert!(Endpoint::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn refuses_to_replace_a_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("csi.sock");
        std::fs::write(&p, b"precious").unwrap();
        let err = inspect_socket_path(&p).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&p).unwrap(), b"precious");
    }

    #[test]
    fn stale_socket_is_detected_and_live_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("csi.sock");
        let live = std::os::unix::net::UnixListener::bind(&p).unwrap();
        assert_eq!(inspect_socket_path(&p).unwrap_err().kind(), io::ErrorKind::AddrInUse);
        drop(live); // the file stays, nobody listens: stale
        assert_eq!(inspect_socket_path(&p).unwrap(), SocketState::Stale);
    }
}
