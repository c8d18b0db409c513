//! Running the external tools a storage driver cannot avoid (mkfs, fsck,
//! filesystem growers): always with a timeout, with their stderr in the
//! error, and with a clear message naming the package when a tool is missing.

use std::ffi::OsStr;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use crate::error::{self, Result};

/// The Debian package that ships a tool, for "please install" messages.
pub fn package_for(program: &str) -> &'static str {
    match program {
        "mkfs.ext4" | "resize2fs" | "e2fsck" | "tune2fs" => "e2fsprogs",
        "mkfs.xfs" | "xfs_growfs" | "xfs_repair" | "xfs_admin" => "xfsprogs",
        "mkfs.btrfs" | "btrfs" => "btrfs-progs",
        "blkid" | "mount" | "umount" | "wipefs" => "util-linux",
        "rbd-fuse" => "rbd-fuse",
        "ceph-fuse" => "ceph-fuse",
        "rbd-nbd" => "rbd-nbd",
        "rbd" => "ceph-common",
        _ => "the package providing it",
    }
}

/// Why a tool did not start: a missing one names its package.
fn spawn_error(program: &str, e: std::io::Error) -> error::Error {
    match e.kind() {
        std::io::ErrorKind::NotFound => error::precondition(format!(
            "{program} is not installed on this node (install the {} package)",
            package_for(program)
        )),
        _ => error::internal(format!("starting {program}: {e}")),
    }
}

/// Output of a successful run.
#[derive(Debug)]
pub struct Output {
    pub stdout: String,
    pub stderr: String,
}

/// Runs `program args…`; fails on a non-zero exit, a timeout (the child is
/// killed) or a missing program.
pub async fn run<I, S>(program: &str, args: I, timeout: Duration) -> Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let out = run_status(program, args, timeout).await?;
    match out.0 {
        0 => Ok(out.1),
        code => {
            Err(error::internal(format!("{program} failed (exit {code}): {}", out.1.stderr.trim())))
        }
    }
}

/// Like [`run`] but answers the exit code instead of failing on non-zero
/// (for tools whose exit codes carry meaning, like blkid or fsck).
pub async fn run_status<I, S>(program: &str, args: I, timeout: Duration) -> Result<(i32, Output)>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut command = Command::new(program);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // A tool must not outlive a driver that is killed: a mkfs still running
    // when the restarted driver retries the stage would hold the device
    // (EBUSY) or race a second mkfs.
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork
    // and exec.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command.spawn().map_err(|e| spawn_error(program, e))?;
    let waited = tokio::time::timeout(timeout, child.wait_with_output()).await;
    let out = match waited {
        Err(_) => {
            return Err(error::internal(format!("{program} did not finish within {timeout:?}")))
        }
        Ok(r) => r.map_err(|e| error::internal(format!("waiting for {program}: {e}")))?,
    };
    let output = Output {
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    Ok((out.status.code().unwrap_or(-1), output))
}

/// A cgroup (v2) the node's helpers are started in, outside the driver's
/// container. A container runtime stopping a container kills every process
/// of the container's cgroup, whatever their session: a helper serving a
/// pod's mount (ceph-fuse, rbd-fuse) must not be one of them, or every pod
/// using the mount sees `Transport endpoint is not connected`.
#[derive(Clone, Debug)]
pub struct HelperCgroup {
    dir: std::path::PathBuf,
    /// Its `cgroup.procs`, opened once: the kernel judges a move by the
    /// cgroup namespace the file was opened in, and it was opened in the
    /// host's (see [`open_procs`]).
    procs: std::sync::Arc<std::fs::File>,
}

/// `CGROUP2_SUPER_MAGIC`: what statfs says of a cgroup v2 file system.
const CGROUP2_MAGIC: i64 = 0x6367_7270;

impl HelperCgroup {
    /// The cgroup at `dir`, made if missing (a directory made inside a
    /// cgroup v2 file system is a cgroup). Refused unless it is one, and
    /// unless a process can be moved into it from here: checked by starting
    /// `true` in it, so a cgroup namespace or a permission that forbids the
    /// move is said at start-up, not at the first stage.
    pub fn open(dir: &std::path::Path) -> Result<HelperCgroup> {
        let shown = dir.display();
        let parent = dir.parent().filter(|p| !p.as_os_str().is_empty());
        let fs = rustix::fs::statfs(parent.unwrap_or(dir))
            .map_err(|e| error::precondition(format!("{shown}: {e}")))?;
        if fs.f_type as i64 != CGROUP2_MAGIC {
            return Err(error::precondition(format!(
                "{shown} is not inside a cgroup v2 file system (mount the host's /sys/fs/cgroup, \
                 or on a hybrid host its unified hierarchy)"
            )));
        }
        match std::fs::create_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(error::precondition(format!("making the cgroup {shown}: {e}"))),
        }
        let procs = open_procs(&dir.join("cgroup.procs"))
            .map_err(|e| error::precondition(format!("opening {shown}/cgroup.procs: {e}")))?;
        let cgroup = HelperCgroup { dir: dir.to_path_buf(), procs: std::sync::Arc::new(procs) };
        let mut probe = std::process::Command::new("true");
        probe.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        cgroup.enter_on_exec(&mut probe);
        match probe.status() {
            Ok(s) if s.success() => Ok(cgroup),
            Ok(s) => Err(error::precondition(format!("a probe in the cgroup {shown} {s}"))),
            Err(e) => Err(error::precondition(format!(
                "a process cannot be moved into the cgroup {shown} from here: {e} (is it \
                 outside this process's cgroup namespace?)"
            ))),
        }
    }

    pub fn path(&self) -> &std::path::Path {
        &self.dir
    }

    /// Makes `command`'s child move itself into this cgroup before it
    /// runs the program, so nothing of it ever runs in the driver's.
    fn enter_on_exec(&self, command: &mut std::process::Command) {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        // The file lives as long as the cgroup value, which the caller
        // holds across the spawn.
        let fd = self.procs.as_raw_fd();
        // SAFETY: write(2) is async-signal-safe, and the buffer is a static;
        // "0" moves the writing process (the child, between fork and exec).
        unsafe {
            command.pre_exec(move || {
                if libc::write(fd, b"0".as_ptr().cast(), 1) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
}

/// Opens a `cgroup.procs` for writing in the host's cgroup namespace (PID
/// 1's, seen with hostPID). A container has a cgroup namespace of its own
/// on cgroup v2 hosts, and from inside it the kernel refuses (ENOENT) to
/// move a process to a cgroup outside the container's: so the file is
/// opened on a short-lived thread that entered the host's namespace, and
/// every move through it is judged as made from there.
fn open_procs(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::MetadataExt;
    let open = |p: &std::path::Path| std::fs::OpenOptions::new().write(true).open(p);
    let ns = |pid: &str| std::fs::metadata(format!("/proc/{pid}/ns/cgroup")).map(|m| m.ino());
    match (ns("self"), ns("1")) {
        (Ok(ours), Ok(host)) if ours != host => {
            let path = path.to_path_buf();
            std::thread::spawn(move || {
                let host = std::fs::File::open("/proc/1/ns/cgroup")?;
                rustix::thread::move_into_link_name_space(
                    std::os::fd::AsFd::as_fd(&host),
                    Some(rustix::thread::LinkNameSpaceType::ControlGroup),
                )?;
                open(&path)
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the opening thread panicked")))
        }
        _ => open(path),
    }
}

/// Starts a helper daemon that must outlive this driver (rbd-fuse,
/// ceph-fuse): in its own session and process group, so neither a signal
/// to the driver's group nor the driver's death reaches it, and in
/// `cgroup` when there is one, so neither does the end of the driver's
/// container; stdin is null and its output goes to `log`. Answers its
/// pid; the caller owns stopping it.
pub fn spawn_detached(
    program: &str,
    args: &[std::ffi::OsString],
    log: &std::path::Path,
    cgroup: Option<&HelperCgroup>,
) -> Result<u32> {
    use std::os::unix::process::CommandExt;
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| error::Error::io(format!("opening {}", log.display()), e))?;
    let err = out.try_clone().map_err(|e| error::Error::io("duplicating the log", e))?;
    let mut command = std::process::Command::new(program);
    command.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
    // SAFETY: setsid is async-signal-safe; nothing else runs between fork
    // and exec.
    unsafe {
        command.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    if let Some(c) = cgroup {
        c.enter_on_exec(&mut command);
    }
    let child = command.spawn().map_err(|e| match (cgroup, e.kind()) {
        (Some(c), kind) if kind != std::io::ErrorKind::NotFound => error::precondition(format!(
            "starting {program} in the cgroup {}: {e}",
            c.path().display()
        )),
        _ => spawn_error(program, e),
    })?;
    // Not waited for here: a child of ours that exits is reaped by
    // whoever stops it (or by init once we are gone).
    Ok(child.id())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[tokio::test]
    async fn missing_tool_names_its_package() {
        let e = run("mkfs.nonexistent-fs", ["x"], Duration::from_secs(5)).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition);
        assert!(e.message().contains("not installed"), "{e}");
    }

    #[tokio::test]
    async fn stderr_is_in_the_error() {
        let e =
            run("sh", ["-c", "echo boom >&2; exit 3"], Duration::from_secs(5)).await.unwrap_err();
        assert!(e.message().contains("exit 3") && e.message().contains("boom"), "{e}");
    }

    #[tokio::test]
    async fn hung_tool_is_killed_at_the_timeout() {
        let e = run("sleep", ["30"], Duration::from_millis(100)).await.unwrap_err();
        assert!(e.message().contains("did not finish"), "{e}");
    }
}
