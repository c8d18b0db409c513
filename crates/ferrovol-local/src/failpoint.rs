//! Failpoints: named places where a test can make the real driver crash or
//! stop, to prove that recovery converges. Off unless `FERROVOL_FAILPOINTS`
//! names them, e.g. `create-volume-after-reserve=abort` or
//! `create-volume-after-reserve=pause:/tmp/fifo` (blocks until a writer opens
//! the FIFO).
//!
//! `abort` is a real crash (SIGABRT): no destructor, no flush, like `kill -9`.
//!
//! Compiled in only with the `failpoints` feature (the test build turns it
//! on); without it `hit` is empty and no environment variable arms anything.

#[cfg(feature = "failpoints")]
use std::collections::HashMap;
#[cfg(feature = "failpoints")]
use std::path::PathBuf;
#[cfg(feature = "failpoints")]
use std::sync::OnceLock;

#[cfg(feature = "failpoints")]
#[derive(Debug, Clone)]
enum Action {
    Abort,
    Pause(PathBuf),
}

#[cfg(feature = "failpoints")]
fn points() -> &'static HashMap<String, Action> {
    static POINTS: OnceLock<HashMap<String, Action>> = OnceLock::new();
    POINTS.get_or_init(|| {
        let spec = std::env::var("FERROVOL_FAILPOINTS").unwrap_or_default();
        spec.split(';')
            .filter_map(|item| {
                let (name, action) = item.split_once('=')?;
                let action = match action.split_once(':') {
                    Some(("pause", path)) => Action::Pause(PathBuf::from(path)),
                    None if action == "abort" => Action::Abort,
                    _ => return None,
                };
                Some((name.trim().to_string(), action))
            })
            .collect()
    })
}

/// Blocking: call from blocking code only (a pause waits on a FIFO).
#[cfg(feature = "failpoints")]
pub fn hit(name: &str) {
    let Some(action) = points().get(name) else { return };
    tracing::warn!(failpoint = name, ?action, "failpoint reached");
    match action {
        Action::Abort => std::process::abort(),
        Action::Pause(fifo) => {
            // Opening a FIFO for reading blocks until the test opens it for
            // writing: a real rendezvous, no timing involved.
            let _ = std::fs::read(fifo);
        }
    }
}

/// Without the feature: nothing, inlined away.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(_name: &str) {}
