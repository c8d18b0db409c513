//! Test harness: runs the real `ferrovol` binary on a private unix socket and
//! captures its log output, so tests talk real gRPC to the real thing.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferrovol::endpoint::{self, Endpoint};
use tonic::transport::Channel;

pub const BIN: &str = env!("CARGO_BIN_EXE_ferrovol");

/// How long a driver may take to start before the test gives up. Generous:
/// CI machines are slow, and this is a failure bound, not a wait.
const START_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Driver {
    child: Option<Child>,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    logs: Arc<Mutex<Vec<String>>>,
    lines: mpsc::Receiver<String>,
}

pub struct DriverBuilder {
    socket: PathBuf,
    state_dir: PathBuf,
    args: Vec<String>,
    envs: Vec<(String, String)>,
}

impl DriverBuilder {
    /// A driver whose state and socket live under `root`.
    pub fn new(root: &Path) -> Self {
        DriverBuilder {
            socket: root.join("csi.sock"),
            state_dir: root.join("state"),
            args: Vec::new(),
            envs: vec![("RUST_LOG".into(), "debug,h2=info,hyper=info,tower=info".into())],
        }
    }

    pub fn socket(mut self, p: impl Into<PathBuf>) -> Self {
        self.socket = p.into();
        self
    }

    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, a: I) -> Self {
        self.args.extend(a.into_iter().map(Into::into));
        self
    }

    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.envs.push((k.into(), v.into()));
        self
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.arg("serve")
            .arg("--endpoint")
            .arg(format!("unix://{}", self.socket.display()))
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--node-id")
            .arg("test-node")
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        cmd
    }

    /// Starts the driver and waits until it logs that it serves.
    pub fn start(self) -> Driver {
        let mut d = self.spawn();
        d.wait_for_log(ferrovol::server::READY_MESSAGE)
            .unwrap_or_else(|| panic!("driver did not become ready; log:\n{}", d.logs()));
        d
    }

    /// Starts the driver without waiting for readiness.
    pub fn spawn(self) -> Driver {
        let mut child = self.command().spawn().expect("spawning ferrovol");
        let stderr = child.stderr.take().unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        Driver {
            child: Some(child),
            socket: self.socket,
            state_dir: self.state_dir,
            logs,
            lines: rx,
        }
    }
}

impl Driver {
    pub fn endpoint(&self) -> Endpoint {
        Endpoint::Unix(self.socket.clone())
    }

    pub async fn channel(&self) -> Channel {
        endpoint::connect(&self.endpoint()).await.expect("connecting to the driver")
    }

    /// Waits for a log line containing `needle`; None if the process ended
    /// (or went silent past the start timeout) first.
    pub fn wait_for_log(&mut self, needle: &str) -> Option<String> {
        if let Some(l) = self.logs.lock().unwrap().iter().find(|l| l.contains(needle)) {
            return Some(l.clone());
        }
        loop {
            match self.lines.recv_timeout(START_TIMEOUT) {
                Ok(line) if line.contains(needle) => return Some(line),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    pub fn signal(&self, sig: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.pid()).unwrap();
        rustix::process::kill_process(pid, sig).expect("signalling driver");
    }

    /// Sends SIGTERM and waits for the process to exit.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal(rustix::process::Signal::TERM);
        self.wait()
    }

    /// Waits for the process to exit and for its log to be fully read.
    pub fn wait(&mut self) -> ExitStatus {
        let status = self.child.take().expect("running").wait().expect("waiting for driver");
        // Drain: the reader thread ends at EOF, which follows process exit.
        while self.lines.recv_timeout(START_TIMEOUT).is_ok() {}
        status
    }

    /// SIGKILL: the crash the sidecars must survive.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.kill();
    }
}
