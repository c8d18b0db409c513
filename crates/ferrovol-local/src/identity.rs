//! A pool's identity: which pool a driver serves, so that a start-up never
//! mistakes an empty directory (the pool's filesystem not mounted, after a
//! reboot without its fstab line) for a new pool.
//!
//! The pool carries a marker, `<pool>/.ferrovol-pool`, naming a UUID made
//! when the pool was first used (or by `ferrovol pool init`); the driver's
//! state directory records the UUID it serves, `<state>/pool-id`. A start
//! whose state knows a pool refuses a directory without that marker.

use std::io::Write;
use std::path::Path;

use crate::error::{self, Error, Result};

pub const MARKER: &str = ".ferrovol-pool";
pub const RECORD: &str = "pool-id";
const MAGIC: &str = "ferrovol pool";

/// The identity a pool directory carries: the UUID in its marker, if it
/// has one.
pub fn pool_id(pool_dir: &Path) -> Result<Option<String>> {
    read_id(&pool_dir.join(MARKER))
}

/// The UUID a state directory serves, if it records one.
fn recorded_in(state_dir: &Path) -> Result<Option<String>> {
    read_id(&state_dir.join(RECORD))
}

fn read_id(path: &Path) -> Result<Option<String>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
    };
    let id = text
        .lines()
        .next()
        .and_then(|l| l.strip_prefix(MAGIC))
        .map(str::trim)
        .and_then(|id| uuid::Uuid::parse_str(id).ok())
        .ok_or_else(|| {
            error::precondition(format!("{} is not a ferrovol pool identity", path.display()))
        })?;
    Ok(Some(id.to_string()))
}

/// Writes `<dir>/<name>` durably (file and directory synced).
fn write_id(dir: &Path, name: &str, id: &str) -> Result<()> {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let written = crate::private::options()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .and_then(|mut f| {
            writeln!(f, "{MAGIC} {id}")?;
            f.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, &path))
        .and_then(|()| std::fs::File::open(dir)?.sync_all());
    written.map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

/// Gives a new pool directory its identity (`pool init`, a first start).
pub fn stamp(pool_dir: &Path) -> Result<String> {
    let id = uuid::Uuid::new_v4().to_string();
    write_id(pool_dir, MARKER, &id)?;
    Ok(id)
}

/// Whether a directory holds anything of a pool made before pools had
/// identities (a journal, volume or snapshot files).
fn holds_an_old_pool(pool_dir: &Path) -> bool {
    pool_dir.join("journal.redb").exists()
        || ["volumes", "snapshots"].iter().any(|d| {
            std::fs::read_dir(pool_dir.join(d)).is_ok_and(|mut entries| entries.next().is_some())
        })
}

/// What start-up found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    /// The pool the state directory serves.
    Known(String),
    /// A pool new to this state directory (a fresh install, a pool made by
    /// `pool init`, or one from before identities), now recorded.
    Adopted { id: String, fresh: bool },
}

/// Checks that `pool_dir` is the pool `state_dir` serves, before anything
/// is created in it; records or stamps the identity where none exists yet.
pub fn settle(pool_dir: &Path, state_dir: &Path) -> Result<Settled> {
    let recorded = recorded_in(state_dir)?;
    let marker = if pool_dir.exists() { pool_id(pool_dir)? } else { None };
    let record_path = state_dir.join(RECORD);
    match (recorded, marker) {
        (Some(r), Some(m)) if r == m => Ok(Settled::Known(r)),
        (Some(r), Some(m)) => Err(error::precondition(format!(
            "{} holds pool {m}, but this driver's state ({}) serves pool {r}: is another \
             pool mounted there?",
            pool_dir.display(),
            record_path.display()
        ))),
        (Some(r), None) => Err(error::precondition(format!(
            "{} is not pool {r} (it has no {MARKER}): is the pool's filesystem not mounted? \
             Mount it (for an image made by `ferrovol pool init`, run the same pool init \
             again), then start again. Only to start over with a new, empty pool here, remove \
             {}.",
            pool_dir.display(),
            record_path.display()
        ))),
        (None, Some(m)) => {
            write_id(state_dir, RECORD, &m)?;
            Ok(Settled::Adopted { id: m, fresh: false })
        }
        (None, None) => {
            let fresh = !holds_an_old_pool(pool_dir);
            std::fs::create_dir_all(pool_dir)
                .map_err(|e| Error::io(format!("creating {}", pool_dir.display()), e))?;
            let id = stamp(pool_dir)?;
            write_id(state_dir, RECORD, &id)?;
            Ok(Settled::Adopted { id, fresh })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_known_pool_must_carry_its_marker() {
        let root = tempfile::tempdir().unwrap();
        let (pool, state) = (root.path().join("pool"), root.path().join("state"));
        std::fs::create_dir_all(&state).unwrap();
        let Settled::Adopted { id, fresh: true } = settle(&pool, &state).unwrap() else {
            panic!("a fresh install adopts a new pool")
        };
        assert_eq!(settle(&pool, &state).unwrap(), Settled::Known(id.clone()));

        // The pool's filesystem not mounted: an empty directory.
        std::fs::remove_file(pool.join(MARKER)).unwrap();
        let err = settle(&pool, &state).unwrap_err();
        assert!(err.message().contains("not mounted"), "{}", err.message());
        assert!(!pool.join(MARKER).exists(), "nothing is stamped over a missing pool");

        // Another pool there.
        let other = stamp(&pool).unwrap();
        let err = settle(&pool, &state).unwrap_err();
        assert!(err.message().contains(&other) && err.message().contains(&id));
    }

    #[test]
    fn pools_from_before_identities_are_adopted() {
        let root = tempfile::tempdir().unwrap();
        let (pool, state) = (root.path().join("pool"), root.path().join("state"));
        std::fs::create_dir_all(pool.join("volumes")).unwrap();
        std::fs::create_dir_all(&state).unwrap();
        std::fs::write(pool.join("volumes/vol-x.img"), b"").unwrap();
        assert!(matches!(settle(&pool, &state).unwrap(), Settled::Adopted { fresh: false, .. }));
        // A state directory new to a stamped pool records it.
        let state2 = root.path().join("state2");
        std::fs::create_dir_all(&state2).unwrap();
        let marker = pool_id(&pool).unwrap().unwrap();
        assert_eq!(settle(&pool, &state2).unwrap(), Settled::Adopted { id: marker, fresh: false });
    }
}
