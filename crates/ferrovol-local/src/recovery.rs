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

use crate::error::Result;
use crate::ids::Kind;
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
    /// Files of finished deletions still in the trash, removed.
    pub trash: Vec<PathBuf>,
    /// Records brought up to their file's (larger) size.
    pub resized: Vec<String>,
    /// Ready records whose file is missing.
    pub dangling: Vec<String>,
    /// Files in the pool that no record owns.
    pub orphans: Vec<PathBuf>,
    /// Volumes whose file is smaller than their record's capacity.
    pub short: Vec<String>,
}

impl Report {
    /// Nothing was found that needed attention.
    pub fn is_clean(&self) -> bool {
        *self == Report::default()
    }

    /// What no repair can fix: records without files, files without records.
    pub fn needs_a_person(&self) -> bool {
        !self.dangling.is_empty() || !self.orphans.is_empty() || !self.short.is_empty()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rolled back {:?}, finished deletes {:?}, published {:?}, removed unclaimed staged \
             files {:?}, emptied trash {:?}, resized {:?}, dangling {:?}, orphans {:?}, \
             smaller than their capacity {:?}",
            self.rolled_back,
            self.finished_deletes,
            self.published,
            self.unclaimed_staged,
            self.trash,
            self.resized,
            self.dangling,
            self.orphans,
            self.short
        )
    }
}

/// Settles every record and file; what it did is in the report.
pub async fn recover(pool: &Pool, journal: &Journal) -> Result<Report> {
    Pass { pool, journal, repair: true, report: Report::default() }.run().await
}

/// What [`recover`] would do, changing nothing (`ferrovol pool check`).
pub async fn inspect(pool: &Pool, journal: &Journal) -> Result<Report> {
    Pass { pool, journal, repair: false, report: Report::default() }.run().await
}

/// One pass over the journal and the pool; `repair` false only reports.
struct Pass<'a> {
    pool: &'a Pool,
    journal: &'a Journal,
    repair: bool,
    report: Report,
}

impl Pass<'_> {
    async fn run(mut self) -> Result<Report> {
        let (pool, journal) = (self.pool, self.journal);
        // A group that never became Ready takes its members with it (even
        // ones already Ready: half a group is no group); one being deleted
        // finishes.
        for group in journal.all::<GroupRecord>()? {
            if group.state() == State::Ready {
                continue;
            }
            for id in &group.snapshot_ids {
                if let Some(member) = journal.get::<SnapshotRecord>(id)? {
                    self.erase(Kind::Snapshot, &member).await?;
                }
            }
            if self.repair {
                journal.remove(&group).await?;
            }
            match group.state() {
                State::Deleting => self.report.finished_deletes.push(group.id.clone()),
                _ => self.report.rolled_back.push(group.id.clone()),
            }
        }
        // A set: the pool may hold 100,000 files.
        let mut known = std::collections::HashSet::new();
        for mut rec in journal.all::<VolumeRecord>()? {
            let path = pool.path(Kind::Volume, &rec.id)?;
            known.insert(path.clone());
            if !self.settle(Kind::Volume, &rec).await? {
                continue;
            }
            match std::fs::metadata(self.where_now(Kind::Volume, &rec.id)?) {
                Ok(m) if m.len() > rec.capacity => {
                    rec.capacity = m.len();
                    if self.repair {
                        journal.put(&rec).await?;
                    }
                    self.report.resized.push(rec.id.clone());
                }
                Ok(m) if m.len() < rec.capacity => self.report.short.push(rec.id.clone()),
                Ok(_) => {}
                Err(_) => self.report.dangling.push(rec.id.clone()),
            }
        }
        for rec in journal.all::<SnapshotRecord>()? {
            let path = pool.path(Kind::Snapshot, &rec.id)?;
            known.insert(path.clone());
            if self.settle(Kind::Snapshot, &rec).await?
                && !self.where_now(Kind::Snapshot, &rec.id)?.exists()
            {
                self.report.dangling.push(rec.id.clone());
            }
        }
        self.report.trash = pool.files_in(&pool.trash_dir())?;
        if self.repair {
            pool.empty_trash()?;
        }
        for staged in pool.files_in(&pool.staging_dir())? {
            if self.repair {
                pool::remove(&staged)?;
            }
            self.report.unclaimed_staged.push(staged);
        }
        for kind in [Kind::Volume, Kind::Snapshot] {
            for file in pool.files(kind)? {
                if !known.contains(&file) {
                    self.report.orphans.push(file);
                }
            }
        }
        Ok(self.report)
    }

    /// Where a settled record's file is: in place, or (in a dry run, where
    /// nothing moved) still in staging.
    fn where_now(&self, kind: Kind, id: &str) -> Result<PathBuf> {
        let placed = self.pool.path(kind, id)?;
        let staged = self.pool.staging_path(kind, id)?;
        Ok(if !placed.exists() && !self.repair && staged.exists() { staged } else { placed })
    }

    /// Finishes whatever the record's last operation left undone; answers
    /// whether the record still describes a live object.
    async fn settle<R: Record>(&mut self, kind: Kind, rec: &R) -> Result<bool> {
        if self.settle_unfinished(kind, rec).await? || self.finish_trashed(kind, rec).await? {
            return Ok(false);
        }
        // A Ready record whose file is still staged: move it into place.
        let (pool, id) = (self.pool, rec.id());
        if !pool.path(kind, id)?.exists() && pool.staging_path(kind, id)?.exists() {
            if self.repair {
                pool.publish(kind, id)?;
            }
            self.report.published.push(id.to_string());
        }
        Ok(true)
    }

    /// A `Ready` record whose file is in the trash was being deleted: finish.
    async fn finish_trashed<R: Record>(&mut self, kind: Kind, rec: &R) -> Result<bool> {
        let path = self.pool.path(kind, rec.id())?;
        let trashed =
            self.pool.trash_dir().join(path.file_name().expect("object paths have a file name"));
        if path.exists() || !trashed.exists() {
            return Ok(false);
        }
        if self.repair {
            self.journal.remove_after_sync(rec, Some(&self.pool.dir(kind))).await?;
        }
        self.report.finished_deletes.push(rec.id().to_string());
        Ok(true)
    }

    /// Rolls back a `Creating` record or finishes a `Deleting` one; answers
    /// whether the record was one of those.
    async fn settle_unfinished<R: Record>(&mut self, kind: Kind, rec: &R) -> Result<bool> {
        match rec.state() {
            State::Ready => return Ok(false),
            State::Creating => self.report.rolled_back.push(rec.id().to_string()),
            State::Deleting => self.report.finished_deletes.push(rec.id().to_string()),
        }
        self.erase(kind, rec).await?;
        Ok(true)
    }

    /// Removes an object's files, wherever they are, then its record once
    /// the removal is durable.
    async fn erase<R: Record>(&self, kind: Kind, rec: &R) -> Result<()> {
        if !self.repair {
            return Ok(());
        }
        pool::remove(&self.pool.staging_path(kind, rec.id())?)?;
        pool::remove(&self.pool.path(kind, rec.id())?)?;
        self.journal.remove_after_sync(rec, Some(&self.pool.dir(kind))).await
    }
}
