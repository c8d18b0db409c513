//! Ceph's fuse helpers (rbd-fuse, ceph-fuse) as the node halves run them:
//! each in a session of its own (so it outlives a restart of the driver,
//! and the mounts it serves with it), mounted in a directory of the
//! driver's own, its pid recorded beside it, and stopped by unmounting its
//! file system. The credentials a request carried reach the helper in a
//! 0600 key file, never on its command line.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferrovol_host::exec;
use ferrovol_host::node::mountinfo;
use ferrovol_host::offload::{self, QUICK};

use crate::error::{self, Error, Result};

/// How long a helper may take to show its file system, or to exit once
/// it is unmounted.
pub const HELPER_DEADLINE: Duration = Duration::from_secs(30);

/// How a helper reaches the cluster.
#[derive(Clone, Debug, Default)]
pub struct Auth {
    pub conf: Option<PathBuf>,
    pub user: Option<String>,
    pub keyring: Option<PathBuf>,
    /// A key from the request's secret (written to a 0600 file for the
    /// helper, never put on a command line).
    pub key: Option<String>,
}

impl Auth {
    /// The helper's arguments for these credentials (`keyfile`: where
    /// [`write_keyfile`] put the key).
    pub fn args(&self, keyfile: Option<&Path>) -> Vec<OsString> {
        let mut a: Vec<OsString> = vec![];
        if let Some(c) = &self.conf {
            a.extend(["-c".into(), c.clone().into()]);
        }
        if let Some(u) = &self.user {
            a.extend(["--id".into(), u.into()]);
        }
        match (keyfile, &self.keyring) {
            (Some(k), _) => a.extend(["--keyfile".into(), k.into()]),
            (None, Some(k)) => a.extend(["--keyring".into(), k.clone().into()]),
            (None, None) => {}
        }
        a
    }
}

/// Where this node's helpers run (`--helper-cgroup`), set once at start-up:
/// a setting of the whole process, as the node's mounts are.
static CGROUP: std::sync::OnceLock<exec::HelperCgroup> = std::sync::OnceLock::new();

/// Starts every helper from now on in the cgroup at `dir` (made if
/// missing, and checked): they then outlive the node container, not only
/// the driver process.
pub fn run_in_cgroup(dir: &Path) -> Result<()> {
    let _ = CGROUP.set(exec::HelperCgroup::open(dir)?);
    Ok(())
}

/// Whether a program is on the PATH.
pub fn installed(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
        .unwrap_or(false)
}

pub fn io(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::io(what, e)
}

/// Writes the request's key for the helper (0600, in `dir`); None when the
/// helper uses the node's own keyring.
pub fn write_keyfile(dir: &Path, auth: &Auth) -> Result<Option<PathBuf>> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let Some(key) = &auth.key else { return Ok(None) };
    std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    let path = dir.join("keyfile");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .map_err(io(format!("writing {}", path.display())))?;
    f.write_all(key.as_bytes()).map_err(io(format!("writing {}", path.display())))?;
    Ok(Some(path))
}

/// Whether a fuse file system is mounted at `mnt` (a helper's own
/// directory: no lookup inside it, which would block on a hung helper).
pub fn fuse_mounted(mnt: &Path) -> Result<bool> {
    let mounts = mountinfo::read().map_err(io("reading the mount table"))?;
    Ok(mountinfo::at(&mounts, mnt).is_some_and(|m| m.fs_type.starts_with("fuse")))
}

/// A helper to start: `program args…` in `dir`, logging to `dir/<program>.log`
/// and recorded in `dir/<program>.pid`.
pub struct Start<'a> {
    pub program: &'static str,
    pub args: Vec<OsString>,
    pub dir: &'a Path,
    /// What the helper serves, for errors ("ferrovolfs/csi/csi-vol-…").
    pub what: String,
}

impl Start<'_> {
    fn pid_file(&self) -> PathBuf {
        pid_file(self.dir, self.program)
    }
}

/// Where a helper's pid is recorded.
pub fn pid_file(dir: &Path, program: &str) -> PathBuf {
    dir.join(format!("{program}.pid"))
}

/// Starts a helper and waits until `ready` says it serves (checked off the
/// executor, bounded), or until it gives up: then it is stopped, its mount
/// at `mnt` taken away, and the error carries the end of its log.
pub async fn start<F>(start: Start<'_>, mnt: &Path, ready: F) -> Result<()>
where
    F: Fn() -> Result<bool> + Clone + Send + 'static,
{
    let log = start.dir.join(format!("{}.log", start.program));
    let pid = exec::spawn_detached(start.program, &start.args, &log, CGROUP.get())?;
    let pid_file = start.pid_file();
    offload::run("recording the helper", QUICK, move || {
        std::fs::write(pid_file, pid.to_string()).map_err(io("writing the helper's pid"))
    })
    .await?;
    let deadline = Instant::now() + HELPER_DEADLINE;
    loop {
        let check = ready.clone();
        if offload::run("waiting for the helper", QUICK, check).await.unwrap_or(false) {
            return Ok(());
        }
        if !alive(pid) || Instant::now() > deadline {
            stop(pid);
            let _ = ferrovol_host::node::fs::unmount_own(mnt);
            return Err(error::unavailable(format!(
                "{} did not serve {}: {}",
                start.program,
                start.what,
                log_tail(&log)
            )));
        }
        // Polling the helper's progress: it says nothing when it is ready.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The last lines a helper logged, on one line.
fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(5).collect();
    let tail: Vec<&str> = lines.into_iter().rev().collect();
    match tail.join(" | ").trim() {
        "" => format!("it wrote nothing to {}", log.display()),
        t => t.to_string(),
    }
}

/// The helper recorded in `dir`, if it is still the `program` serving `mnt`
/// (a recorded pid may have been reused since).
pub fn recorded(dir: &Path, program: &str, mnt: &Path) -> Option<u32> {
    std::fs::read_to_string(pid_file(dir, program))
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())
        .filter(|p| is_helper(*p, program, mnt))
}

fn is_helper(pid: u32, program: &str, mnt: &Path) -> bool {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let text = String::from_utf8_lossy(&cmdline);
    text.contains(program) && text.contains(&*mnt.to_string_lossy())
}

/// Ends the helper serving `mnt` (recorded in `dir`): its file system is
/// unmounted, which ends it, and it is waited for (killed past the
/// deadline). Not mounted, or no helper, is fine.
pub async fn stop_serving(dir: &Path, program: &'static str, mnt: &Path) -> Result<()> {
    let (d, m) = (dir.to_path_buf(), mnt.to_path_buf());
    let pid = offload::run("unmounting the helper", offload::NODE_WORK, move || {
        // Which process is the helper is read before it is told to go: an
        // exiting process soon has no command line to recognise it by, and
        // it still holds its session with the cluster until it has exited.
        let pid = recorded(&d, program, &m);
        ferrovol_host::node::fs::unmount_own(&m)?;
        Ok(pid)
    })
    .await?;
    if let Some(pid) = pid {
        let deadline = Instant::now() + HELPER_DEADLINE;
        while alive(pid) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if alive(pid) {
            stop(pid);
        }
    }
    Ok(())
}

/// Running and not a zombie; reaps it if it is our exited child.
pub fn alive(pid: u32) -> bool {
    if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::waitpid(Some(p), rustix::process::WaitOptions::NOHANG);
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Kills a helper and reaps it.
pub fn stop(pid: u32) {
    if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
        let _ = rustix::process::waitpid(Some(p), rustix::process::WaitOptions::empty());
    }
}

/// Whether the helper recorded in `dir` still serves `mnt` (None: no
/// helper was started there).
pub fn helper_alive(dir: &Path, program: &str, mnt: &Path) -> Option<bool> {
    if !dir.exists() {
        return None;
    }
    let pid: u32 = std::fs::read_to_string(pid_file(dir, program)).ok()?.trim().parse().ok()?;
    Some(is_helper(pid, program, mnt) && alive(pid))
}
