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
//! - `Ready` whose file is missing: an empty thin volume (no content source,
//!   not preallocated) is made again, empty, at its capacity, and reported:
//!   its create does not wait for the file's directory entry to be durable,
//!   and until a pod's first flush made it durable (a flush through the
//!   loop device syncs the file, and with it the entry) it held no data.
//!   Any other: reported as dangling, never hidden (the volume reports an
//!   abnormal condition).
//! - A file no record owns: reported as an orphan and left alone; our own
//!   write order never produces one, so someone else put it there.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fmt;
use std::path::PathBuf;

use crate::error::{Error, Result};
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
    /// Empty thin volumes whose file was made again.
    pub recreated: Vec<String>,
    /// Pool files and directories others may read (or enter), with their
    /// modes: made 0600/0700 now, tightened by a repair.
    pub loose_modes: Vec<(PathBuf, u32)>,
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
             smaller than their capacity {:?}, recreated empty {:?}, readable by others {}",
            self.rolled_back,
            self.finished_deletes,
            self.published,
            self.unclaimed_staged,
            self.trash,
            self.resized,
            self.dangling,
            self.orphans,
            self.short,
            self.recreated,
            loose_modes(&self.loose_modes)
        )
    }
}

fn loose_modes(found: &[(PathBuf, u32)]) -> String {
    let each: Vec<String> =
        found.iter().map(|(p, m)| format!("{} ({m:04o})", p.display())).collect();
    format!("[{}]", each.join(", "))
}

/// The pool's own files and directories (not each volume's: those are
/// created 0600 one by one, and a start must not stat 100,000 files), and
/// the image `pool init` makes beside the pool by default.
fn private_paths(pool: &Pool) -> Vec<PathBuf> {
    let root = pool.root();
    let mut paths = vec![root.to_path_buf(), pool.journal_path()];
    paths.push(root.join(crate::identity::MARKER));
    for d in ["volumes", "snapshots", "staging", "trash"] {
        paths.push(root.join(d));
    }
    let mut image = root.as_os_str().to_owned();
    image.push(".img");
    paths.push(PathBuf::from(image));
    paths
}

/// Settles every record and file; what it did is in the report.
pub async fn recover(pool: &Pool, journal: &Journal) -> Result<Report> {
    let listed = Listing::of(pool)?;
    Pass { pool, journal, repair: true, report: Report::default(), listed }.run().await
}

/// What [`recover`] would do, changing nothing (`ferrovol pool check`).
pub async fn inspect(pool: &Pool, journal: &Journal) -> Result<Report> {
    let listed = Listing::of(pool)?;
    Pass { pool, journal, repair: false, report: Report::default(), listed }.run().await
}

/// One pass over the journal and the pool; `repair` false only reports.
struct Pass<'a> {
    pool: &'a Pool,
    journal: &'a Journal,
    repair: bool,
    report: Report,
    /// The file names in each of the pool's directories, listed once at the
    /// start: every record is checked against these sets, never by a stat
    /// per record (start-up stays linear, and cheap, at 100,000 volumes).
    listed: Listing,
}

#[derive(Default)]
struct Listing {
    volumes: HashSet<OsString>,
    snapshots: HashSet<OsString>,
    staging: HashSet<OsString>,
    trash: HashSet<OsString>,
}

impl Listing {
    fn of(pool: &Pool) -> Result<Listing> {
        // Once, here: the paths below are built without re-checking.
        pool.verify()?;
        let names = |dir: PathBuf| -> Result<HashSet<OsString>> {
            let entries = std::fs::read_dir(&dir)
                .map_err(|e| Error::io(format!("listing {}", dir.display()), e))?;
            entries
                .map(|e| {
                    e.map(|e| e.file_name())
                        .map_err(|e| Error::io(format!("listing {}", dir.display()), e))
                })
                .collect()
        };
        Ok(Listing {
            volumes: names(pool.dir(Kind::Volume))?,
            snapshots: names(pool.dir(Kind::Snapshot))?,
            staging: names(pool.staging_dir())?,
            trash: names(pool.trash_dir())?,
        })
    }

    fn placed(&self, kind: Kind) -> &HashSet<OsString> {
        match kind {
            Kind::Snapshot => &self.snapshots,
            _ => &self.volumes,
        }
    }

    fn placed_mut(&mut self, kind: Kind) -> &mut HashSet<OsString> {
        match kind {
            Kind::Snapshot => &mut self.snapshots,
            _ => &mut self.volumes,
        }
    }
}

/// Whether recovery may make a volume's missing file again from its
/// record: an empty thin volume (no content source, not preallocated).
pub fn recreatable(rec: &VolumeRecord) -> bool {
    rec.source_snapshot.is_empty()
        && rec.source_volume.is_empty()
        && rec.parameters.get(crate::PARAM_PROVISIONING).is_none_or(|p| p != "thick")
}

/// The paths of `names` in `dir`, sorted.
fn paths_in(dir: &std::path::Path, names: &HashSet<OsString>) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = names.iter().map(|n| dir.join(n)).collect();
    paths.sort();
    paths
}

/// An object's file name in any of the pool's directories.
fn file_name(id: &str) -> OsString {
    OsString::from(format!("{id}.img"))
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
        let mut known = HashSet::new();
        for mut rec in journal.all::<VolumeRecord>()? {
            known.insert(file_name(&rec.id));
            if !self.settle(Kind::Volume, &rec).await? {
                continue;
            }
            // One stat per live volume, for its size: the only per-record
            // syscall of a clean start.
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
                Err(_) if recreatable(&rec) => {
                    if self.repair {
                        let path = pool.path(Kind::Volume, &rec.id)?;
                        pool::create_empty(&path, rec.capacity, false)?;
                    }
                    self.report.recreated.push(rec.id.clone());
                }
                Err(_) => self.report.dangling.push(rec.id.clone()),
            }
        }
        for rec in journal.all::<SnapshotRecord>()? {
            known.insert(file_name(&rec.id));
            if self.settle(Kind::Snapshot, &rec).await? && !self.now_exists(Kind::Snapshot, &rec.id)
            {
                self.report.dangling.push(rec.id.clone());
            }
        }
        // From the listing, kept current through the pass (publishes and
        // erasures update it): no second read of either directory.
        self.report.trash = paths_in(&pool.trash_dir(), &self.listed.trash);
        if self.repair {
            pool.empty_trash()?;
        }
        for staged in paths_in(&pool.staging_dir(), &self.listed.staging) {
            if self.repair {
                pool::remove(&staged)?;
            }
            self.report.unclaimed_staged.push(staged);
        }
        for kind in [Kind::Volume, Kind::Snapshot] {
            let unowned: HashSet<OsString> =
                self.listed.placed(kind).difference(&known).cloned().collect();
            self.report.orphans.extend(paths_in(&pool.dir(kind), &unowned));
        }
        self.report.loose_modes = crate::private::loose(&private_paths(pool));
        if self.repair {
            for (path, mode) in &self.report.loose_modes {
                crate::private::tighten(path, *mode)
                    .map_err(|e| Error::io(format!("making {} private", path.display()), e))?;
            }
        }
        Ok(self.report)
    }

    /// Where a settled record's file is: in place, or (in a dry run, where
    /// nothing moved) still in staging.
    fn where_now(&self, kind: Kind, id: &str) -> Result<PathBuf> {
        let name = file_name(id);
        let (placed, staged) = (self.listed.placed(kind), &self.listed.staging);
        Ok(if !placed.contains(&name) && !self.repair && staged.contains(&name) {
            self.pool.staging_dir().join(name)
        } else {
            self.pool.dir(kind).join(name)
        })
    }

    /// Whether a settled record's file is there (in place, or staged in a
    /// dry run).
    fn now_exists(&self, kind: Kind, id: &str) -> bool {
        let name = file_name(id);
        self.listed.placed(kind).contains(&name)
            || (!self.repair && self.listed.staging.contains(&name))
    }

    /// Finishes whatever the record's last operation left undone; answers
    /// whether the record still describes a live object.
    async fn settle<R: Record>(&mut self, kind: Kind, rec: &R) -> Result<bool> {
        if self.settle_unfinished(kind, rec).await? || self.finish_trashed(kind, rec).await? {
            return Ok(false);
        }
        // A Ready record whose file is still staged: move it into place.
        let (pool, id, name) = (self.pool, rec.id(), file_name(rec.id()));
        if !self.listed.placed(kind).contains(&name) && self.listed.staging.contains(&name) {
            if self.repair {
                pool.publish(kind, id)?;
                self.listed.staging.remove(&name);
                self.listed.placed_mut(kind).insert(name);
            }
            self.report.published.push(id.to_string());
        }
        Ok(true)
    }

    /// A `Ready` record whose file is in the trash was being deleted: finish.
    async fn finish_trashed<R: Record>(&mut self, kind: Kind, rec: &R) -> Result<bool> {
        let name = file_name(rec.id());
        if self.listed.placed(kind).contains(&name) || !self.listed.trash.contains(&name) {
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
    async fn erase<R: Record>(&mut self, kind: Kind, rec: &R) -> Result<()> {
        if !self.repair {
            return Ok(());
        }
        pool::remove(&self.pool.staging_path(kind, rec.id())?)?;
        pool::remove(&self.pool.path(kind, rec.id())?)?;
        let name = file_name(rec.id());
        self.listed.staging.remove(&name);
        self.listed.placed_mut(kind).remove(&name);
        self.journal.remove_after_sync(rec, Some(&self.pool.dir(kind))).await
    }
}
