//! Failpoints: named places where a test can make the real driver crash or
//! stop, to prove that recovery converges. Off unless `FERROVOL_FAILPOINTS`
//! names them, e.g. `create-volume-after-reserve=abort` or
//! `create-volume-after-reserve=pause:/tmp/fifo` (blocks until a writer opens
//! the FIFO).
//!
//! `abort` is a real crash (SIGABRT): no destructor, no flush, like `kill -9`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;

#[derive(Debug, Clone)]
enum Action {
    Abort,
    Pause(PathBuf),
}

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
