//! Blocking work off the async executor: the one way every crate runs a
//! syscall that can block (a mount, a statfs on a network filesystem, a
//! file copy, a librbd call).
//!
//! The async workers are few (one per core); one of them stuck in the
//! kernel stalls every call scheduled on it, Probe included. So blocking
//! work runs on the blocking pool, and a caller waits for it at most its
//! deadline: past it the call answers UNAVAILABLE (retry later) while the
//! kernel may still finish the work, which the retry then finds done.
//! Work that must never be abandoned halfway from the caller's point of
//! view (a copy whose operation lock would be released while it still
//! writes) runs [`to_completion`]; work that yields items as it goes (the
//! ranges of a snapshot) runs as a bounded [`produce`]r.

use std::time::Duration;

use crate::error::{self, Result};

/// Reading the kernel's state (the mount table, sysfs, a statfs): quick
/// unless something is hung, which is what the deadline is for.
pub const QUICK: Duration = Duration::from_secs(30);

/// One piece of node work (a mount, an unmount, an fsync, a loop attach).
pub const NODE_WORK: Duration = Duration::from_secs(120);

/// Runs `work` on the blocking pool; waits at most `within`.
pub async fn run<T: Send + 'static>(
    what: &'static str,
    within: Duration,
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    match tokio::time::timeout(within, tokio::task::spawn_blocking(work)).await {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(e)) => Err(error::internal(format!("{what} stopped: {e}"))),
        Err(_) => Err(error::unavailable(format!(
            "{what} did not finish within {}s (the kernel may still be at it); retry later",
            within.as_secs()
        ))),
    }
}

/// Runs `work` on the blocking pool and waits for its end, however long:
/// for work whose caller holds what must not be let go before the work is
/// over (an operation lock over a copy, a journal transaction).
pub async fn to_completion<T: Send + 'static>(
    what: &'static str,
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| error::internal(format!("{what} stopped: {e}")))?
}

/// Runs a blocking producer on the blocking pool, feeding a channel of
/// `capacity` items: the reader gets items as they come, and the producer
/// waits while the reader is `capacity` behind. `send` answers false once
/// the reader is gone; the producer should stop then.
pub fn produce<T: Send + 'static>(
    capacity: usize,
    work: impl FnOnce(&dyn Fn(T) -> bool) + Send + 'static,
) -> tokio::sync::mpsc::Receiver<T> {
    let (tx, rx) = tokio::sync::mpsc::channel(capacity);
    tokio::task::spawn_blocking(move || work(&|item| tx.blocking_send(item).is_ok()));
    rx
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[tokio::test]
    async fn work_past_its_deadline_is_unavailable_and_a_panic_internal() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let hung = run("a hung statfs", Duration::from_millis(20), move || {
            let _ = rx.recv(); // until the test lets go
            Ok(())
        });
        let e = hung.await.unwrap_err();
        assert_eq!(e.code(), Code::Unavailable, "{e}");
        assert!(e.message().contains("a hung statfs"), "{e}");
        drop(tx);
        let e = run("panicking", QUICK, || -> Result<()> { panic!("boom") }).await.unwrap_err();
        assert_eq!(e.code(), Code::Internal, "{e}");
        assert_eq!(run("quick", QUICK, || Ok(7)).await.unwrap(), 7);
        assert_eq!(to_completion("long", || Ok(8)).await.unwrap(), 8);
    }
}
