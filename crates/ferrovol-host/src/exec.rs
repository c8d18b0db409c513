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

/// Starts a helper daemon that must outlive this driver (rbd-fuse,
/// rbd-nbd): in its own session and process group, so neither a signal to
/// the driver's group nor the driver's death reaches it; stdin is null and
/// its output goes to `log`. Answers its pid; the caller owns stopping it.
pub fn spawn_detached(
    program: &str,
    args: &[std::ffi::OsString],
    log: &std::path::Path,
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
    let child = command.spawn().map_err(|e| spawn_error(program, e))?;
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
