//! Start-up recovery: settle every journal record against the pool's files.
//!
//! - `Creating`: the operation never completed, and the CO will retry it by
//!   name; roll it back (remove the partial file, drop the reservation).
//! - `Deleting`: the CO asked for removal; finish it.
//! - `Ready` whose file grew past the record: an expansion reached the disk
//!   but not the journal; the file is the truth.
//! - `Ready` whose file is missing: reported as dangling, never hidden (the
//!   volume reports an abnormal condition).
//! - A file no record owns: reported as an orphan and left alone; our own
//!   write order never produces one, so someone else put it there.

use std::fmt;
use std::path::PathBuf;

use crate::engine::ids::Kind;
use crate::error::Result;
use crate::journal::{Journal, Record, SnapshotRecord, State, VolumeRecord};

use super::pool::{self, Pool};

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Interrupted creations that were undone.
    pub rolled_back: Vec<String>,
    /// Interrupted deletions that were finished.
    pub finished_deletes: Vec<String>,
    /// Records brought up to their file's (larger) size.
    pub resized: Vec<String>,
    /// Ready records whose file is missing.
    pub dangling: Vec<String>,
    /// Files in the pool that no record owns.
    pub orphans: Vec<PathBuf>,
}

impl Report {
    /// Nothing was found that needed attention.
    pub fn is_clean(&self) -> bool {
        *self == Report::default()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rolled back {:?}, finished deletes {:?}, resized {:?}, dangling {:?}, orphans {:?}",
            self.rolled_back, self.finished_deletes, self.resized, self.dangling, self.orphans
        )
    }
}

pub async fn recover(pool: &Pool, journal: &Journal) -> Result<Report> {
    let mut report = Report::default();
    let mut known = Vec::new();
    for mut rec in journal.all::<VolumeRecord>()? {
        let path = pool.path(Kind::Volume, &rec.id)?;
        known.push(path.clone());
        if settle_unfinished(pool, journal, Kind::Volume, &rec, &mut report).await? {
            continue;
        }
        match std::fs::metadata(&path) {
            Ok(m) if m.len() > rec.capacity => {
                rec.capacity = m.len();
                journal.put(&rec).await?;
                report.resized.push(rec.id.clone());
            }
            Ok(_) => {}
            Err(_) => report.dangling.push(rec.id.clone()),
        }
    }
    for rec in journal.all::<SnapshotRecord>()? {
        let path = pool.path(Kind::Snapshot, &rec.id)?;
        known.push(path.clone());
        if settle_unfinished(pool, journal, Kind::Snapshot, &rec, &mut report).await? {
            continue;
        }
        if !path.exists() {
            report.dangling.push(rec.id.clone());
        }
    }
    for kind in [Kind::Volume, Kind::Snapshot] {
        for file in pool.files(kind)? {
            if !known.contains(&file) {
                report.orphans.push(file);
            }
        }
    }
    Ok(report)
}

/// Rolls back a `Creating` record or finishes a `Deleting` one; answers
/// whether the record was one of those (and is now gone).
async fn settle_unfinished<R: Record>(
    pool: &Pool,
    journal: &Journal,
    kind: Kind,
    rec: &R,
    report: &mut Report,
) -> Result<bool> {
    let list = match rec.state() {
        State::Ready => return Ok(false),
        State::Creating => &mut report.rolled_back,
        State::Deleting => &mut report.finished_deletes,
    };
    pool::remove(&pool.path(kind, rec.id())?)?;
    pool.sync_dir(kind)?;
    journal.remove(rec).await?;
    list.push(rec.id().to_string());
    Ok(true)
}
