//! The journal: a durable map of request names to IDs and of IDs to records,
//! in an embedded transactional store (redb) inside the pool.
//!
//! Every change is *reserved* here before it touches storage and *completed*
//! after, so a crash at any point leaves a record that start-up recovery can
//! finish or roll back (see `engine::local::recovery`).
//!
//! Writes are group-committed: pending changes are drained into a single
//! transaction and one fsync, so durability costs one sync per batch rather
//! than one per request. A change may also name a directory that must be
//! durable before it commits (the file it describes was just created or
//! removed there); the writer syncs each such directory once per batch.
//! (Splitting sync and commit into a two-thread pipeline was measured: it
//! shrank batches and lowered throughput.)
//!
//! A full pool must not wedge the journal: deleting a volume, the one thing
//! that frees space, needs a commit. So a small preallocated *reserve* file
//! sits beside the journal. When a commit fails for lack of space the writer
//! gives the reserve back to the filesystem, reopens the store (redb refuses
//! all work after a failed write until it is reopened, which rolls it back to
//! its last durable commit) and retries the batch once; the reserve is
//! rebuilt as soon as the pool has room again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::oneshot;

use crate::error::{self, Error, Result};

/// Lifecycle of a journalled object. Only `Ready` objects exist for the CO.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum State {
    /// Name and ID reserved; storage may be partly created.
    Creating = 0,
    Ready = 1,
    /// Removal started; storage may be partly removed.
    Deleting = 2,
}

/// A volume as the journal knows it.
#[derive(Clone, PartialEq, Message)]
pub struct VolumeRecord {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(string, tag = "2")]
    pub name: String,
    #[prost(enumeration = "State", tag = "3")]
    pub state: i32,
    #[prost(uint64, tag = "4")]
    pub capacity: u64,
    /// Snapshot this volume was restored from, if any.
    #[prost(string, tag = "5")]
    pub source_snapshot: String,
    /// Volume this volume was cloned from, if any.
    #[prost(string, tag = "6")]
    pub source_volume: String,
    #[prost(bool, tag = "7")]
    pub block: bool,
    #[prost(string, tag = "8")]
    pub fs_type: String,
    #[prost(btree_map = "string, string", tag = "9")]
    pub parameters: BTreeMap<String, String>,
    #[prost(btree_map = "string, string", tag = "10")]
    pub topology: BTreeMap<String, String>,
    #[prost(int64, tag = "11")]
    pub created_unix_nanos: i64,
}

/// A snapshot as the journal knows it.
#[derive(Clone, PartialEq, Message)]
pub struct SnapshotRecord {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(string, tag = "2")]
    pub name: String,
    #[prost(enumeration = "State", tag = "3")]
    pub state: i32,
    #[prost(string, tag = "4")]
    pub source_volume: String,
    #[prost(uint64, tag = "5")]
    pub size: u64,
    #[prost(int64, tag = "6")]
    pub created_unix_nanos: i64,
    /// Set for members of a volume group snapshot.
    #[prost(string, tag = "7")]
    pub group_id: String,
}

/// A volume group snapshot: its members are ordinary snapshot records that
/// carry the group's id.
#[derive(Clone, PartialEq, Message)]
pub struct GroupRecord {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(string, tag = "2")]
    pub name: String,
    #[prost(enumeration = "State", tag = "3")]
    pub state: i32,
    #[prost(string, repeated, tag = "4")]
    pub source_volumes: Vec<String>,
    /// Member snapshot ids, in the order of `source_volumes`.
    #[prost(string, repeated, tag = "5")]
    pub snapshot_ids: Vec<String>,
    #[prost(int64, tag = "6")]
    pub created_unix_nanos: i64,
}

type Table = TableDefinition<'static, &'static str, &'static [u8]>;

/// Facts about the journal itself: `pool`, the identity of the pool it
/// belongs to (the UUID of the pool's `.ferrovol-pool`).
const META: Table = TableDefinition::new("meta");
const META_POOL: &str = "pool";

/// A kind of journalled object: where its records and its names live.
pub trait Record: Message + Default + Clone + Send + 'static {
    const RECORDS: Table;
    const NAMES: Table;
    fn id(&self) -> &str;
    fn name(&self) -> &str;
    fn state(&self) -> State;
    fn set_state(&mut self, state: State);
}

macro_rules! record_kind {
    ($ty:ty, $records:literal, $names:literal) => {
        impl Record for $ty {
            const RECORDS: Table = TableDefinition::new($records);
            const NAMES: Table = TableDefinition::new($names);
            fn id(&self) -> &str {
                &self.id
            }
            fn name(&self) -> &str {
                &self.name
            }
            fn state(&self) -> State {
                State::try_from(self.state).unwrap_or(State::Creating)
            }
            fn set_state(&mut self, state: State) {
                self.state = state as i32;
            }
        }
    };
}

record_kind!(VolumeRecord, "volumes", "volume_names");
record_kind!(SnapshotRecord, "snapshots", "snapshot_names");
record_kind!(GroupRecord, "groups", "group_names");

/// The outcome of a reservation.
#[derive(Debug)]
pub enum Reservation<R> {
    /// The name was free and is now ours, with the record in `Creating`.
    Reserved,
    /// The name already maps to this record (created earlier, or half-done).
    Existing(R),
}

/// One change, applied inside the writer's batch transaction.
enum Change {
    /// Insert the record under its name unless the name is taken; answers the
    /// existing record's bytes when it is.
    Reserve {
        records: Table,
        names: Table,
        id: String,
        name: String,
        bytes: Vec<u8>,
    },
    /// Store a record, and map its name to it if the name is unmapped: a
    /// reservation (not durable on its own) is lost when the store is
    /// reopened after a failed write, and the name must survive that.
    Put {
        records: Table,
        names: Table,
        id: String,
        name: String,
        bytes: Vec<u8>,
    },
    Remove {
        records: Table,
        names: Table,
        id: String,
        name: String,
    },
    /// Nothing: a durable commit that makes every lazy change before it
    /// durable ([`Journal::sync`]).
    Barrier,
}

impl Change {
    fn reserve<R: Record>(record: &R) -> Change {
        Change::Reserve {
            records: R::RECORDS,
            names: R::NAMES,
            id: record.id().to_string(),
            name: record.name().to_string(),
            bytes: record.encode_to_vec(),
        }
    }

    fn put<R: Record>(record: &R) -> Change {
        Change::Put {
            records: R::RECORDS,
            names: R::NAMES,
            id: record.id().to_string(),
            name: record.name().to_string(),
            bytes: record.encode_to_vec(),
        }
    }

    fn remove<R: Record>(record: &R) -> Change {
        Change::Remove {
            records: R::RECORDS,
            names: R::NAMES,
            id: record.id().to_string(),
            name: record.name().to_string(),
        }
    }
}

type Outcome = Result<Option<Vec<u8>>>;

struct Pending {
    change: Change,
    /// Directory to fsync before this change commits.
    sync_first: Option<PathBuf>,
    /// Whether the caller waits for this change to be on disk. A change that
    /// is not durable on its own becomes durable with the next one that is.
    durable: bool,
    reply: oneshot::Sender<Outcome>,
}

/// Most changes one transaction takes; bounds the latency of a batch.
const MAX_BATCH: usize = 512;

#[derive(Clone)]
pub struct Journal {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<Store>,
    writer: Option<tokio::sync::mpsc::Sender<Pending>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// The open database, replaceable: after a failed write redb must be closed
/// and opened again before it does anything else.
struct Store {
    path: PathBuf,
    /// `None` only while it is being reopened (or if that failed).
    db: RwLock<Option<Arc<Db>>>,
}

/// The database as opened: for the driver, or only for reading (`pool
/// check`, which must create and change nothing).
enum Db {
    ReadWrite(Database),
    ReadOnly(redb::ReadOnlyDatabase),
}

impl Db {
    fn begin_read(&self) -> Result<redb::ReadTransaction> {
        let txn = match self {
            Db::ReadWrite(db) => db.begin_read(),
            Db::ReadOnly(db) => db.begin_read(),
        };
        txn.map_err(|e| db_err("read", e))
    }

    fn writable(&self) -> Result<&Database> {
        match self {
            Db::ReadWrite(db) => Ok(db),
            Db::ReadOnly(_) => Err(error::internal("the journal was opened read-only")),
        }
    }
}

thread_local! {
    /// Depth of [`guarded`] calls on this thread: a panic inside one is
    /// answered as an error, so it is not printed as a crash.
    static GUARDED: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Installs (once) a panic hook that stays silent for panics [`guarded`]
/// catches (a garbled journal printed a Rust panic and a backtrace before
/// its clean refusal) and reports every other panic as before.
fn quiet_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let before = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if GUARDED.with(|g| g.get()) == 0 {
                before(info);
            }
        }));
    });
}

/// Runs a store operation, turning a panic inside the store (redb panics on
/// some corruptions instead of answering an error) into an error that says
/// what to do.
fn guarded<T>(path: &Path, what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    quiet_panics();
    GUARDED.with(|g| g.set(g.get() + 1));
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    GUARDED.with(|g| g.set(g.get() - 1));
    outcome.unwrap_or_else(|panic| {
        let why = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".into());
        Err(corrupt(path, &format!("{what}: {why}")))
    })
}

/// The error for a journal the store cannot read.
fn corrupt(path: &Path, why: &str) -> Error {
    error::unavailable(format!(
        "journal {} is corrupt ({why}): restore it from a backup, or move it and the pool's \
         files aside to start a new pool; `ferrovol pool check` reports what the pool holds",
        path.display()
    ))
}

/// Space held back for the journal's own commits when the pool fills up.
pub(crate) const RESERVE_BYTES: u64 = 16 << 20;

impl Store {
    fn db(&self) -> Result<Arc<Db>> {
        self.db.read().unwrap_or_else(|p| p.into_inner()).clone().ok_or_else(|| {
            error::unavailable("the journal could not be reopened after a failed write")
        })
    }

    fn reserve_path(&self) -> PathBuf {
        self.path.with_extension("reserve")
    }

    /// Allocates the reserve if it is not whole; false when the pool has no
    /// room for it (nothing partial is left).
    fn fill_reserve(&self) -> bool {
        let path = self.reserve_path();
        if std::fs::metadata(&path).is_ok_and(|m| m.len() == RESERVE_BYTES) {
            return true;
        }
        let made = std::fs::File::create(&path).and_then(|f| {
            rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), 0, RESERVE_BYTES)?;
            f.sync_all()
        });
        if made.is_err() {
            let _ = std::fs::remove_file(&path);
        }
        made.is_ok()
    }

    /// Gives the reserve back to the filesystem; false if there was none.
    fn release_reserve(&self) -> bool {
        std::fs::remove_file(self.reserve_path()).is_ok()
    }

    /// Closes and reopens the database, which rolls it back to its last
    /// durable commit. Readers hold it only for one call, so the wait for
    /// them is short.
    fn reopen(&self) -> Result<()> {
        let mut slot = self.db.write().unwrap_or_else(|p| p.into_inner());
        if let Some(mut old) = slot.take() {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            // Dropping the last handle closes the file and releases its lock.
            while let Err(still_shared) = Arc::try_unwrap(old) {
                if std::time::Instant::now() > deadline {
                    *slot = Some(still_shared);
                    return Err(error::internal("journal reopen: readers did not finish"));
                }
                old = still_shared;
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        *slot = Some(Arc::new(Db::ReadWrite(open_db(&self.path)?)));
        Ok(())
    }
}

impl Drop for Inner {
    /// Closing the queue ends the pipeline after its last batch; joining it
    /// releases the database (and its file lock) before `drop` returns.
    fn drop(&mut self) {
        self.writer.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn store_err(what: &str, e: impl std::fmt::Display) -> Error {
    error::internal(format!("journal {what}: {e}"))
}

/// A store error in CSI terms: a full pool is RESOURCE_EXHAUSTED like any
/// other write that finds no space.
fn db_err(what: &str, e: impl Into<redb::Error>) -> Error {
    match e.into() {
        redb::Error::Io(io) => Error::io(format!("journal {what}"), io),
        other => store_err(what, other),
    }
}

/// A copy of the journal in the temporary directory, opened (and so
/// repaired) there; the copy's name is gone once it is open.
fn repaired_copy(path: &Path) -> Result<Database> {
    let copy = std::env::temp_dir().join(format!("ferrovol-check-{}.redb", uuid::Uuid::new_v4()));
    // Made 0600 before a byte is copied: /tmp is everyone's.
    let copied = crate::private::options()
        .write(true)
        .create_new(true)
        .open(&copy)
        .and_then(|mut dst| std::io::copy(&mut std::fs::File::open(path)?, &mut dst));
    if let Err(e) = copied {
        let _ = std::fs::remove_file(&copy);
        return Err(Error::io(format!("copying {} to check it", path.display()), e));
    }
    let db = Database::create(&copy).map_err(|e| db_err(&format!("open {}", path.display()), e));
    let _ = std::fs::remove_file(&copy);
    db
}

/// Opens (or creates) the database with every table, so read transactions
/// never miss one.
fn open_db(path: &Path) -> Result<Database> {
    guarded(path, "open", || open_db_unguarded(path))
}

fn open_db_unguarded(path: &Path) -> Result<Database> {
    // Made 0600 by us when missing (redb would make it as the umask says).
    crate::private::ensure_file(path)
        .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
    let db = Database::create(path).map_err(|e| match e {
        redb::DatabaseError::DatabaseAlreadyOpen => error::unavailable(format!(
            "journal {} is locked by another process (is another ferrovol serving this pool?)",
            path.display()
        )),
        e => db_err(&format!("open {}", path.display()), e),
    })?;
    let txn = db.begin_write().map_err(|e| db_err("begin", e))?;
    for t in [
        VolumeRecord::RECORDS,
        VolumeRecord::NAMES,
        SnapshotRecord::RECORDS,
        SnapshotRecord::NAMES,
        GroupRecord::RECORDS,
        GroupRecord::NAMES,
    ] {
        txn.open_table(t).map_err(|e| db_err("create table", e))?;
    }
    txn.commit().map_err(|e| db_err("commit", e))?;
    Ok(db)
}

/// Checks (or records) which pool the journal belongs to.
fn bind_to_pool(db: &Database, path: &Path, pool_id: &str) -> Result<()> {
    let txn = db.begin_write().map_err(|e| db_err("begin", e))?;
    {
        let mut meta = txn.open_table(META).map_err(|e| db_err("open", e))?;
        let found = meta
            .get(META_POOL)
            .map_err(|e| db_err("get", e))?
            .map(|v| String::from_utf8_lossy(v.value()).into_owned());
        match found {
            Some(theirs) if theirs == pool_id => return Ok(()),
            Some(theirs) => return Err(foreign(path, &theirs, pool_id)),
            None => {
                meta.insert(META_POOL, pool_id.as_bytes()).map_err(|e| db_err("insert", e))?;
            }
        }
    }
    txn.commit().map_err(|e| db_err("commit", e))
}

/// The refusal of a journal from another pool.
pub fn foreign(path: &Path, theirs: &str, ours: &str) -> Error {
    error::precondition(format!(
        "journal {} belongs to pool {theirs}, but the pool it sits in is pool {ours} (its \
         .ferrovol-pool): a journal from another pool would serve that pool's volumes here and \
         leave this pool's files unaccounted for. Put this pool's own journal back (a backup of \
         it), or serve the other pool where it lives",
        path.display()
    ))
}

impl Journal {
    /// Opens (or creates) the journal. Fails if another process holds it, so
    /// two drivers can never share one pool.
    pub fn open(path: &Path) -> Result<Journal> {
        Self::open_with(path, None)
    }

    /// Opens (or creates) the journal of pool `pool_id`: a journal that
    /// names another pool is refused (one copied from another pool would
    /// serve that pool's volumes here, and leave this pool's files
    /// orphaned); one that names none (new, or from before journals named
    /// their pool) is given this pool's.
    pub fn open_for_pool(path: &Path, pool_id: &str) -> Result<Journal> {
        Self::open_with(path, Some(pool_id))
    }

    fn open_with(path: &Path, pool_id: Option<&str>) -> Result<Journal> {
        let db = open_db(path)?;
        if let Some(id) = pool_id {
            guarded(path, "bind", || bind_to_pool(&db, path, id))?;
        }
        let store = Arc::new(Store {
            path: path.to_path_buf(),
            db: RwLock::new(Some(Arc::new(Db::ReadWrite(db)))),
        });
        if !store.fill_reserve() {
            tracing::warn!(
                path = %store.reserve_path().display(),
                "no room for the journal's space reserve; deletes may fail while the pool is full"
            );
        }
        let (tx, rx) = tokio::sync::mpsc::channel::<Pending>(MAX_BATCH * 4);
        let writer_store = store.clone();
        let thread = std::thread::Builder::new()
            .name("journal-writer".into())
            .spawn(move || writer_loop(&writer_store, rx))
            .map_err(|e| store_err("spawn writer", e))?;
        Ok(Journal { inner: Arc::new(Inner { store, writer: Some(tx), threads: vec![thread] }) })
    }

    /// Opens an existing journal only to read it: nothing is created or
    /// written (no tables, no space reserve, no writer). Changes fail.
    pub fn open_read_only(path: &Path) -> Result<Journal> {
        let db = guarded(path, "open", || match redb::ReadOnlyDatabase::open(path) {
            Ok(db) => Ok(Db::ReadOnly(db)),
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => Err(error::unavailable(format!(
                "journal {} is locked by another process (is a driver serving this pool? stop \
                 it first)",
                path.display()
            ))),
            // Left by a crash: redb must repair it before reading, which is
            // a write. Repair a private copy instead, so the journal itself
            // stays as it is.
            Err(redb::DatabaseError::RepairAborted) => repaired_copy(path).map(Db::ReadWrite),
            Err(e) => Err(db_err(&format!("open {}", path.display()), e)),
        })?;
        let store =
            Arc::new(Store { path: path.to_path_buf(), db: RwLock::new(Some(Arc::new(db))) });
        Ok(Journal { inner: Arc::new(Inner { store, writer: None, threads: vec![] }) })
    }

    fn db(&self) -> Result<Arc<Db>> {
        self.inner.store.db()
    }

    fn path(&self) -> &Path {
        &self.inner.store.path
    }

    async fn submit(&self, change: Change, sync_first: Option<&Path>, durable: bool) -> Outcome {
        let (reply, answer) = oneshot::channel();
        let writer = self
            .inner
            .writer
            .as_ref()
            .ok_or_else(|| error::internal("the journal was opened read-only"))?;
        let pending =
            Pending { change, sync_first: sync_first.map(Path::to_path_buf), durable, reply };
        // Bounded: a full queue means the writer is behind, and callers wait
        // (asynchronously) for room rather than pile up without limit.
        writer.send(pending).await.map_err(|_| error::unavailable("journal writer has stopped"))?;
        answer.await.map_err(|_| error::unavailable("journal writer has stopped"))?
    }

    /// Reserves `record.name()` for `record` (stored in state `Creating`), or
    /// answers the record that already owns the name.
    ///
    /// The reservation is visible at once but not synced on its own: it
    /// reaches the disk with the next durable commit. Callers therefore build
    /// what they reserved somewhere recovery owns (the pool's staging area)
    /// until they commit it durably.
    pub async fn reserve<R: Record>(&self, record: &R) -> Result<Reservation<R>> {
        let mut r = record.clone();
        r.set_state(State::Creating);
        let answer = self.submit(Change::reserve(&r), None, false).await?;
        match answer {
            None => Ok(Reservation::Reserved),
            Some(bytes) => Ok(Reservation::Existing(decode(&bytes)?)),
        }
    }

    /// Stores a new record as it is (its state included) under its name,
    /// durably, once `dir` is durable; or answers the record that already
    /// owns the name, changing nothing. For an object whose storage is
    /// complete before its record exists (recovery removes a staged file no
    /// record claims), so no separate reservation is needed.
    pub async fn insert<R: Record>(
        &self,
        record: &R,
        dir: Option<&Path>,
    ) -> Result<Reservation<R>> {
        let change = Change::reserve(record);
        match self.submit(change, dir, true).await? {
            None => Ok(Reservation::Reserved),
            Some(bytes) => Ok(Reservation::Existing(decode(&bytes)?)),
        }
    }

    /// Stores a record without waiting for the disk (durable with the next
    /// durable commit): for a change recovery can redo from the pool itself
    /// (a volume's size, from its synced file).
    pub async fn put_lazily<R: Record>(&self, record: &R) -> Result<()> {
        let change = Change::put(record);
        self.submit(change, None, false).await.map(|_| ())
    }

    /// Stores a record, mapping its name to it if the name is unmapped.
    pub async fn put<R: Record>(&self, record: &R) -> Result<()> {
        self.put_after_sync(record, None).await
    }

    /// Stores a record once `dir` is durable: for a record that says a file
    /// just created in `dir` exists.
    pub async fn put_after_sync<R: Record>(&self, record: &R, dir: Option<&Path>) -> Result<()> {
        let change = Change::put(record);
        self.submit(change, dir, true).await.map(|_| ())
    }

    /// Removes a record and its name mapping without waiting for the disk:
    /// the removal is durable with the next durable commit. For a record
    /// whose durable state already says what a crash must finish
    /// (`Deleting`).
    pub async fn remove_lazily<R: Record>(&self, record: &R) -> Result<()> {
        let change = Change::remove(record);
        self.submit(change, None, false).await.map(|_| ())
    }

    /// Makes every change so far durable (lazy ones included): for a clean
    /// stop, which must leave nothing for recovery to finish.
    pub async fn sync(&self) -> Result<()> {
        self.submit(Change::Barrier, None, true).await.map(|_| ())
    }

    /// Removes a record and its name mapping.
    pub async fn remove<R: Record>(&self, record: &R) -> Result<()> {
        self.remove_after_sync(record, None).await
    }

    /// Removes a record once `dir` is durable: for a record whose file was
    /// just removed from `dir`.
    pub async fn remove_after_sync<R: Record>(&self, record: &R, dir: Option<&Path>) -> Result<()> {
        let change = Change::remove(record);
        self.submit(change, dir, true).await.map(|_| ())
    }

    pub fn get<R: Record>(&self, id: &str) -> Result<Option<R>> {
        guarded(self.path(), "get", || {
            let txn = self.db()?.begin_read()?;
            let table = txn.open_table(R::RECORDS).map_err(|e| db_err("open", e))?;
            let found = table.get(id).map_err(|e| db_err("get", e))?;
            found.map(|v| decode(v.value())).transpose()
        })
    }

    pub fn by_name<R: Record>(&self, name: &str) -> Result<Option<R>> {
        guarded(self.path(), "get", || {
            let txn = self.db()?.begin_read()?;
            let names = txn.open_table(R::NAMES).map_err(|e| db_err("open", e))?;
            let Some(id) = names.get(name).map_err(|e| db_err("get", e))? else {
                return Ok(None);
            };
            let id = String::from_utf8_lossy(id.value()).into_owned();
            let table = txn.open_table(R::RECORDS).map_err(|e| db_err("open", e))?;
            let found = table.get(id.as_str()).map_err(|e| db_err("get", e))?;
            found.map(|v| decode(v.value())).transpose()
        })
    }

    /// Records in id order, strictly after `after`, at most `limit`, keeping
    /// those `keep` accepts. A consistent snapshot of the journal.
    pub fn scan<R: Record>(
        &self,
        after: Option<&str>,
        limit: usize,
        keep: impl FnMut(&R) -> bool,
    ) -> Result<Vec<R>> {
        guarded(self.path(), "scan", || self.scan_unguarded(after, limit, keep))
    }

    fn scan_unguarded<R: Record>(
        &self,
        after: Option<&str>,
        limit: usize,
        mut keep: impl FnMut(&R) -> bool,
    ) -> Result<Vec<R>> {
        let txn = self.db()?.begin_read()?;
        let table = txn.open_table(R::RECORDS).map_err(|e| db_err("open", e))?;
        let iter = match after {
            Some(a) => {
                table.range::<&str>((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded))
            }
            None => table.range::<&str>(..),
        }
        .map_err(|e| db_err("range", e))?;
        let mut out = Vec::new();
        for item in iter {
            if out.len() >= limit {
                break;
            }
            let (_, v) = item.map_err(|e| db_err("iterate", e))?;
            let r: R = decode(v.value())?;
            if keep(&r) {
                out.push(r);
            }
        }
        Ok(out)
    }

    /// The pool this journal belongs to, if it names one.
    pub fn pool(&self) -> Result<Option<String>> {
        guarded(self.path(), "get", || {
            let txn = self.db()?.begin_read()?;
            let meta = match txn.open_table(META) {
                Ok(t) => t,
                // A journal from before journals named their pool.
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(e) => return Err(db_err("open", e)),
            };
            let found = meta.get(META_POOL).map_err(|e| db_err("get", e))?;
            Ok(found.map(|v| String::from_utf8_lossy(v.value()).into_owned()))
        })
    }

    /// Whether the journal holds no record at all.
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.scan::<VolumeRecord>(None, 1, |_| true)?.is_empty()
            && self.scan::<SnapshotRecord>(None, 1, |_| true)?.is_empty()
            && self.scan::<GroupRecord>(None, 1, |_| true)?.is_empty())
    }

    /// Every record of a kind, whatever its state (recovery, checks).
    pub fn all<R: Record>(&self) -> Result<Vec<R>> {
        self.scan(None, usize::MAX, |_| true)
    }
}

fn decode<R: Record>(bytes: &[u8]) -> Result<R> {
    R::decode(bytes).map_err(|e| store_err("decode", e))
}

fn writer_loop(store: &Store, mut rx: tokio::sync::mpsc::Receiver<Pending>) {
    let mut reserve_spent = false;
    while let Some(first) = rx.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let mut dirs: Vec<PathBuf> = batch.iter().filter_map(|p| p.sync_first.clone()).collect();
        dirs.sort();
        dirs.dedup();
        let durable = batch.iter().any(|p| p.durable);
        let (changes, replies): (Vec<_>, Vec<_>) =
            batch.into_iter().map(|p| (p.change, p.reply)).unzip();
        let synced = dirs.iter().try_for_each(|d| {
            std::fs::File::open(d)
                .and_then(|f| f.sync_all())
                .map_err(|e| Error::io(format!("syncing {}", d.display()), e))
        });
        let mut result = synced.and_then(|()| commit_batch(store, &changes, durable));
        if let Err(e) = &result {
            // The store refuses everything after a failed write until it is
            // reopened; with the reserve given back, the batch gets one more try.
            let full = e.code() == tonic::Code::ResourceExhausted;
            let freed = full && store.release_reserve();
            reserve_spent |= freed;
            tracing::warn!(error = %e, reserve_released = freed, "journal commit failed; reopening");
            match store.reopen() {
                Ok(()) if freed => result = commit_batch(store, &changes, durable),
                Ok(()) => {}
                Err(reopen) => tracing::error!(error = %reopen, "journal reopen failed"),
            }
        } else if reserve_spent && store.fill_reserve() {
            reserve_spent = false;
            tracing::info!("journal space reserve rebuilt");
        }
        match result {
            Ok(outcomes) => {
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    let _ = reply.send(outcome);
                }
            }
            Err(e) => {
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// Applies changes in order in one transaction. A change that cannot apply
/// (e.g. a name already taken) answers without writing; the others commit.
fn commit_batch(store: &Store, changes: &[Change], durable: bool) -> Result<Vec<Outcome>> {
    guarded(&store.path, "commit", || commit_batch_unguarded(store, changes, durable))
}

fn commit_batch_unguarded(
    store: &Store,
    changes: &[Change],
    durable: bool,
) -> Result<Vec<Outcome>> {
    let db = store.db()?;
    let mut txn = db.writable()?.begin_write().map_err(|e| db_err("begin", e))?;
    if !durable {
        txn.set_durability(redb::Durability::None).map_err(|e| db_err("durability", e))?;
    }
    let outcomes = changes.iter().map(|c| apply(&txn, c)).collect();
    txn.commit().map_err(|e| db_err("commit", e))?;
    Ok(outcomes)
}

fn apply(txn: &redb::WriteTransaction, change: &Change) -> Outcome {
    match change {
        Change::Reserve { records, names, id, name, bytes } => {
            let mut names = txn.open_table(*names).map_err(|e| db_err("open", e))?;
            let mut records = txn.open_table(*records).map_err(|e| db_err("open", e))?;
            let owner =
                names.get(name.as_str()).map_err(|e| db_err("get", e))?.map(|v| v.value().to_vec());
            if let Some(owner) = owner {
                let owner = String::from_utf8_lossy(&owner).into_owned();
                let existing = records.get(owner.as_str()).map_err(|e| db_err("get", e))?;
                if let Some(existing) = existing {
                    return Ok(Some(existing.value().to_vec()));
                }
                // A name without a record cannot be produced by our own
                // writes; treat it as free rather than wedge the name forever.
            }
            names.insert(name.as_str(), id.as_bytes()).map_err(|e| db_err("insert", e))?;
            records.insert(id.as_str(), bytes.as_slice()).map_err(|e| db_err("insert", e))?;
            Ok(None)
        }
        Change::Put { records, names, id, name, bytes } => {
            let mut names = txn.open_table(*names).map_err(|e| db_err("open", e))?;
            if names.get(name.as_str()).map_err(|e| db_err("get", e))?.is_none() {
                names.insert(name.as_str(), id.as_bytes()).map_err(|e| db_err("insert", e))?;
            }
            let mut records = txn.open_table(*records).map_err(|e| db_err("open", e))?;
            records.insert(id.as_str(), bytes.as_slice()).map_err(|e| db_err("insert", e))?;
            Ok(None)
        }
        Change::Remove { records, names, id, name } => {
            let mut names = txn.open_table(*names).map_err(|e| db_err("open", e))?;
            // Only drop the name if it still points at this record.
            let points_here = names
                .get(name.as_str())
                .map_err(|e| db_err("get", e))?
                .is_some_and(|v| v.value() == id.as_bytes());
            if points_here {
                names.remove(name.as_str()).map_err(|e| db_err("remove", e))?;
            }
            let mut records = txn.open_table(*records).map_err(|e| db_err("open", e))?;
            records.remove(id.as_str()).map_err(|e| db_err("remove", e))?;
            Ok(None)
        }
        Change::Barrier => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vol(id: &str, name: &str) -> VolumeRecord {
        VolumeRecord { id: id.into(), name: name.into(), capacity: 4096, ..Default::default() }
    }

    #[tokio::test]
    async fn reserve_is_first_come_and_remove_frees_the_name() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join("j.redb")).unwrap();
        assert!(matches!(j.reserve(&vol("a", "n")).await.unwrap(), Reservation::Reserved));
        match j.reserve(&vol("b", "n")).await.unwrap() {
            Reservation::Existing(r) => {
                assert_eq!(r.id, "a");
                assert_eq!(r.state(), State::Creating);
            }
            other => panic!("{other:?}"),
        }
        let mut a: VolumeRecord = j.get("a").unwrap().unwrap();
        a.set_state(State::Ready);
        j.put(&a).await.unwrap();
        assert_eq!(j.by_name::<VolumeRecord>("n").unwrap().unwrap().state(), State::Ready);
        j.remove(&a).await.unwrap();
        assert!(j.get::<VolumeRecord>("a").unwrap().is_none());
        assert!(j.by_name::<VolumeRecord>("n").unwrap().is_none());
        assert!(matches!(j.reserve(&vol("c", "n")).await.unwrap(), Reservation::Reserved));
    }

    #[tokio::test]
    async fn concurrent_reservations_of_one_name_yield_one_owner() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join("j.redb")).unwrap();
        let tasks: Vec<_> = (0..32)
            .map(|i| {
                let j = j.clone();
                tokio::spawn(async move { j.reserve(&vol(&format!("id{i:02}"), "same")).await })
            })
            .collect();
        let mut reserved = 0;
        for t in tasks {
            if matches!(t.await.unwrap().unwrap(), Reservation::Reserved) {
                reserved += 1;
            }
        }
        assert_eq!(reserved, 1);
        assert_eq!(j.all::<VolumeRecord>().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn scan_pages_in_id_order() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join("j.redb")).unwrap();
        for i in 0..10 {
            j.reserve(&vol(&format!("v{i}"), &format!("n{i}"))).await.unwrap();
        }
        let page = j.scan::<VolumeRecord>(None, 4, |_| true).unwrap();
        assert_eq!(
            page.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            ["v0", "v1", "v2", "v3"]
        );
        let page = j.scan::<VolumeRecord>(Some("v3"), 4, |r| r.id != "v5").unwrap();
        assert_eq!(
            page.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            ["v4", "v6", "v7", "v8"]
        );
    }

    #[test]
    fn a_second_open_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.redb");
        let _first = Journal::open(&path).unwrap();
        // redb's lock is per file handle, so even this process is refused.
        let err = Journal::open(&path).err().expect("second open must fail");
        assert_eq!(err.code(), tonic::Code::Unavailable);
        assert!(err.message().contains("locked"), "{}", err.message());
    }

    /// A small tmpfs, unmounted on drop.
    struct Tmpfs(tempfile::TempDir);

    impl Tmpfs {
        fn new(size: &str) -> Tmpfs {
            let dir = tempfile::tempdir().unwrap();
            let opts = std::ffi::CString::new(format!("size={size}")).unwrap();
            rustix::mount::mount(
                "tmpfs",
                dir.path(),
                "tmpfs",
                rustix::mount::MountFlags::empty(),
                opts.as_c_str(),
            )
            .expect("mounting a tmpfs");
            Tmpfs(dir)
        }
    }

    impl Drop for Tmpfs {
        fn drop(&mut self) {
            let _ = rustix::mount::unmount(self.0.path(), rustix::mount::UnmountFlags::DETACH);
        }
    }

    #[tokio::test]
    async fn a_full_filesystem_spends_the_reserve_and_loses_no_record() {
        let fs = Tmpfs::new("48m");
        let path = fs.0.path().join("j.redb");
        let j = Journal::open(&path).unwrap();
        let reserve = path.with_extension("reserve");
        assert_eq!(std::fs::metadata(&reserve).unwrap().len(), RESERVE_BYTES);
        // Everything else on the filesystem is taken.
        let filler = fs.0.path().join("filler");
        let mut f = std::fs::File::create(&filler).unwrap();
        while std::io::Write::write_all(&mut f, &[1u8; 4096]).is_ok() {}
        drop(f);

        // Enough records that the journal must grow: only the reserve can
        // give it room, and no acknowledged record may be lost on the way.
        let big = "x".repeat(2048);
        for i in 0..2000 {
            let mut r = vol(&format!("v{i:04}"), &format!("n{i:04}"));
            r.fs_type = big.clone();
            j.put(&r).await.unwrap_or_else(|e| panic!("record {i}: {e}"));
        }
        assert!(!reserve.exists(), "the reserve was spent");
        assert_eq!(j.all::<VolumeRecord>().unwrap().len(), 2000);
        assert_eq!(j.by_name::<VolumeRecord>("n0000").unwrap().unwrap().id, "v0000");

        // Room again: the next commit rebuilds the reserve.
        std::fs::remove_file(&filler).unwrap();
        j.remove(&vol("v0000", "n0000")).await.unwrap();
        assert_eq!(std::fs::metadata(&reserve).unwrap().len(), RESERVE_BYTES);
        drop(j);
        let j = Journal::open(&path).unwrap();
        assert_eq!(j.all::<VolumeRecord>().unwrap().len(), 1999, "all of it durable");
    }

    #[tokio::test]
    async fn records_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.redb");
        {
            let j = Journal::open(&path).unwrap();
            j.reserve(&vol("a", "n")).await.unwrap();
        }
        let j = Journal::open(&path).unwrap();
        assert_eq!(j.by_name::<VolumeRecord>("n").unwrap().unwrap().id, "a");
    }
}
