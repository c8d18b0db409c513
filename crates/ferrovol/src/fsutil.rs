//! Small filesystem helpers shared by the services and engines.

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{self, Result};

static PROBE_SEQ: AtomicU64 = AtomicU64::new(0);

/// Really writes and syncs a file in `dir`: a read-only remount or a
/// vanished directory shows up here, not at the next real request.
///
/// A full disk passes: it still serves reads, node calls and the deletes
/// that free it, and a liveness restart would free nothing. Capacity (zero)
/// and the RPCs that need space say so instead.
pub fn check_writable(dir: &Path) -> Result<()> {
    let seq = PROBE_SEQ.fetch_add(1, Ordering::Relaxed);
    let path = dir.join(format!(".probe-{}-{seq}", std::process::id()));
    let attempt = (|| {
        let mut f = std::fs::File::create(&path)?;
        f.write_all(b"ok")?;
        f.sync_data()
    })();
    let _ = std::fs::remove_file(&path);
    let full = |e: &std::io::Error| {
        matches!(
            rustix::io::Errno::from_io_error(e),
            Some(rustix::io::Errno::NOSPC | rustix::io::Errno::DQUOT)
        )
    };
    if attempt.as_ref().is_err_and(full) {
        tracing::warn!(dir = %dir.display(), "no space left; still serving");
        return Ok(());
    }
    attempt
        .map_err(|e| error::failed_precondition(format!("{} is not writable: {e}", dir.display())))
}
