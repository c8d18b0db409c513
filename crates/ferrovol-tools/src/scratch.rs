//! A throwaway driver for the tools that need one (`bench`, `demo`): a work
//! directory, a fresh XFS pool on an image file there (unless given a pool),
//! and `ferrovol serve` on a socket in it. All of it is undone on drop. The
//! pool is made and released by `ferrovol pool init`/`pool release` run as
//! children of this same binary, so the tools link no engine.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Options {
    /// Names the work directory (`<tmp>/ferrovol-<name>-<pid>`) and the node.
    pub name: &'static str,
    /// Use this pool instead of making one.
    pub pool_dir: Option<PathBuf>,
    /// Whether the engine has a pool at all (the RBD engine's live in Ceph).
    pub local_pool: bool,
    /// Size of the pool image made when no pool is given.
    pub pool_size: u64,
    /// The driver's RUST_LOG; its JSON log goes to `log_path()`.
    pub rust_log: &'static str,
    /// More `serve` flags (e.g. `--mode agent` and the link's).
    pub args: Vec<String>,
}

pub struct Scratch {
    pub work: PathBuf,
    pub socket: PathBuf,
    pub pool_dir: PathBuf,
    driver: Option<Child>,
    /// The pool this scratch made (and releases), if it made one.
    made_pool: bool,
}

impl Scratch {
    /// Makes the pool, starts the driver and waits until it accepts calls.
    pub async fn start(opts: Options) -> Result<Scratch, String> {
        let work =
            std::env::temp_dir().join(format!("ferrovol-{}-{}", opts.name, std::process::id()));
        std::fs::create_dir_all(work.join("kubelet"))
            .map_err(|e| format!("creating {}: {e}", work.display()))?;
        let mut scratch = Scratch {
            socket: work.join("csi.sock"),
            pool_dir: opts.pool_dir.clone().unwrap_or_else(|| work.join("pool")),
            work,
            driver: None,
            made_pool: false,
        };
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        if opts.local_pool && opts.pool_dir.is_none() {
            let image = scratch.work.join("pool.img");
            let made = Command::new(&exe)
                .args(["pool", "init", "--fs", "xfs", "--dir"])
                .arg(&scratch.pool_dir)
                .arg("--image")
                .arg(&image)
                .arg("--size")
                .arg(opts.pool_size.to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .output()
                .map_err(|e| format!("running pool init: {e}"))?;
            if !made.status.success() {
                return Err(format!(
                    "making an XFS pool (needs root): {}",
                    String::from_utf8_lossy(&made.stderr).trim()
                ));
            }
            scratch.made_pool = true;
        }
        let log = std::fs::File::create(scratch.log_path()).map_err(|e| e.to_string())?;
        let pool_flag = match opts.local_pool {
            true => vec!["--pool-dir".into(), scratch.pool_dir.clone().into_os_string()],
            false => vec![],
        };
        let child = Command::new(exe)
            .args(["serve", "--node-id", opts.name, "--endpoint"])
            .arg(&scratch.socket)
            .arg("--state-dir")
            .arg(scratch.work.join("state"))
            .args(pool_flag)
            .arg("--kubelet-dir")
            .arg(scratch.kubelet_dir())
            .args(&opts.args)
            .env("RUST_LOG", opts.rust_log)
            .env("FERROVOL_LOG_FORMAT", "json")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting the driver: {e}"))?;
        scratch.driver = Some(child);
        // A tool may poll for its own child to come up: it measures or
        // narrates, it does not assert.
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::os::unix::net::UnixStream::connect(&scratch.socket).is_err() {
            if Instant::now() > deadline {
                return Err("the driver did not start within 60 s".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(scratch)
    }

    /// The driver's process ID.
    pub fn driver_pid(&self) -> Option<u32> {
        self.driver.as_ref().map(Child::id)
    }

    pub fn kubelet_dir(&self) -> PathBuf {
        self.work.join("kubelet")
    }

    pub fn log_path(&self) -> PathBuf {
        self.work.join("driver.log")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(mut d) = self.driver.take() {
            if let Some(pid) = rustix::process::Pid::from_raw(d.id() as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
            let _ = d.wait();
        }
        if std::mem::take(&mut self.made_pool) {
            let _ = Command::new(std::env::current_exe().unwrap_or_else(|_| "ferrovol".into()))
                .args(["pool", "release", "--dir"])
                .arg(&self.pool_dir)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.work);
    }
}
