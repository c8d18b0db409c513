//! Start-up recovery: settle every journal record against the pool's files.
//!
//! - `Creating`: the operation never completed, and the CO will retry it by
//!   name; roll it back (remove the partial file, drop the reservation).
//! - `Ready` with its file still in staging: committed but not yet moved
//!   into place; move it. Everything else in staging is unfinished work that
//!   no record claims, and is removed.
//! - `Deleting`, or `Ready` with its file in the trash: a deletion was under
//!   way; finish it. The trash is then emptied (only deletions fill it).
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
use crate::journal::{GroupRecord, Journal, Record, SnapshotRecord, State, VolumeRecord};

use super::pool::{self, Pool};

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Interrupted creations that were undone.
    pub rolled_back: Vec<String>,
    /// Interrupted deletions that were finished.
    pub finished_deletes: Vec<String>,
    /// Committed creations whose file recovery moved into place.
    pub published: Vec<String>,
    /// Staged files of creations that never committed, removed.
    pub unclaimed_staged: Vec<PathBuf>,
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
            "rolled back {:?}, finished deletes {:?}, published {:?}, removed unclaimed staged \
             files {:?}, resized {:?}, dangling {:?}, orphans {:?}",
            self.rolled_back,
            self.finished_deletes,
            self.published,
            self.unclaimed_staged,
            self.resized,
            self.dangling,
            self.orphans
        )
    }
}

pub async fn recover(pool: &Pool, journal: &Journal) -> Result<Report> {
    let mut report = Report::default();
    // A group that never became Ready takes its members with it (even ones
    // already Ready: half a group is no group); one being deleted finishes.
    for group in journal.all::<GroupRecord>()? {
        if group.state() == State::Ready {
            continue;
        }
        for id in &group.snapshot_ids {
            if let Some(member) = journal.get::<SnapshotRecord>(id)? {
                erase(pool, journal, Kind::Snapshot, &member).await?;
            }
        }
        journal.remove(&group).await?;
        match group.state() {
            State::Deleting => report.finished_deletes.push(group.id.clone()),
            _ => report.rolled_back.push(group.id.clone()),
        }
    }
    let mut known = Vec::new();
    for mut rec in journal.all::<VolumeRecord>()? {
        let path = pool.path(Kind::Volume, &rec.id)?;
        known.push(path.clone());
        if !settle(pool, journal, Kind::Volume, &rec, &mut report).await? {
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
        if !settle(pool, journal, Kind::Snapshot, &rec, &mut report).await? {
            continue;
        }
        if !path.exists() {
            report.dangling.push(rec.id.clone());
        }
    }
    pool.empty_trash()?;
    for staged in pool.files_in(&pool.staging_dir())? {
        pool::remove(&staged)?;
        report.unclaimed_staged.push(staged);
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

/// Finishes whatever the record's last operation left undone; answers
/// whether the record still describes a live object.
async fn settle<R: Record>(
    pool: &Pool,
    journal: &Journal,
    kind: Kind,
    rec: &R,
    report: &mut Report,
) -> Result<bool> {
    if settle_unfinished(pool, journal, kind, rec, report).await?
        || finish_trashed(pool, journal, kind, rec, report).await?
    {
        return Ok(false);
    }
    finish_publish(pool, kind, rec.id(), report)?;
    Ok(true)
}

/// A `Ready` record whose file is still staged: move it into place.
fn finish_publish(pool: &Pool, kind: Kind, id: &str, report: &mut Report) -> Result<()> {
    if !pool.path(kind, id)?.exists() && pool.staging_path(kind, id)?.exists() {
        pool.publish(kind, id)?;
        report.published.push(id.to_string());
    }
    Ok(())
}

/// A `Ready` record whose file is in the trash was being deleted: finish.
async fn finish_trashed<R: Record>(
    pool: &Pool,
    journal: &Journal,
    kind: Kind,
    rec: &R,
    report: &mut Report,
) -> Result<bool> {
    let path = pool.path(kind, rec.id())?;
    let trashed = pool.trash_dir().join(path.file_name().expect("object paths have a file name"));
    if path.exists() || !trashed.exists() {
        return Ok(false);
    }
    journal.remove_after_sync(rec, Some(&pool.dir(kind))).await?;
    report.finished_deletes.push(rec.id().to_string());
    Ok(true)
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
    erase(pool, journal, kind, rec).await?;
    list.push(rec.id().to_string());
    Ok(true)
}

/// Removes an object's files, wherever they are, then its record once the
/// removal is durable.
async fn erase<R: Record>(pool: &Pool, journal: &Journal, kind: Kind, rec: &R) -> Result<()> {
    pool::remove(&pool.staging_path(kind, rec.id())?)?;
    pool::remove(&pool.path(kind, rec.id())?)?;
    journal.remove_after_sync(rec, Some(&pool.dir(kind))).await
}
