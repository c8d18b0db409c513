//! ferrovol's own copy of a tree (a snapshot's data) into another (a new
//! subvolume's), through libcephfs: files in parallel, a large file in
//! parallel ranges, all-zero blocks left as holes, and everything a tree
//! holds besides data kept: modes, owners, times, extended attributes,
//! symlinks, hard links, fifos and device nodes. The manager's cloner
//! copies one file after another and drops extended attributes and hard
//! links.
//!
//! A copy can be run again over what an interrupted one left: a file whose
//! size and modification time already match is complete (its times are
//! set after its data), everything else is written again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use ferrovol_ceph::fs::{self, FsMount, Stat};
use ferrovol_ceph::CephError;

/// A range of a file one worker copies at a time.
const RANGE: u64 = 16 << 20;
/// What is read and written at once (CephFS's default object size), and
/// the unit a hole is left in.
const BLOCK: usize = 4 << 20;

/// How far a copy is; shared with whoever reports it.
#[derive(Default)]
pub struct Progress {
    pub bytes_total: AtomicU64,
    pub bytes_done: AtomicU64,
    pub files_total: AtomicU64,
    pub files_done: AtomicU64,
    /// Set by whoever wants the copy stopped.
    pub stop: AtomicBool,
}

impl Progress {
    /// "N of M MiB, n of m files" for messages.
    pub fn describe(&self) -> String {
        let mib = |b: u64| b >> 20;
        format!(
            "{} of {} MiB, {} of {} files",
            mib(self.bytes_done.load(Ordering::Relaxed)),
            mib(self.bytes_total.load(Ordering::Relaxed)),
            self.files_done.load(Ordering::Relaxed),
            self.files_total.load(Ordering::Relaxed)
        )
    }
}

#[derive(Debug)]
pub enum CopyError {
    Stopped,
    Ceph(CephError),
}

impl From<CephError> for CopyError {
    fn from(e: CephError) -> CopyError {
        CopyError::Ceph(e)
    }
}

type Result<T> = std::result::Result<T, CopyError>;

enum Kind {
    Dir,
    /// A regular file; `Some(i)`: another name of entry `i`'s file.
    File(Option<usize>),
    Symlink(Vec<u8>),
    /// A fifo, socket or device node.
    Node,
}

struct Entry {
    /// Relative to the tree's root ("" for the root).
    rel: String,
    stat: Stat,
    kind: Kind,
}

fn at(root: &str, rel: &str) -> String {
    match rel.is_empty() {
        true => root.to_string(),
        false => fs::join(root, rel),
    }
}

/// Every entry of the tree at `root`, parents before their children.
fn scan(m: &FsMount, root: &str, progress: &Progress) -> Result<Vec<Entry>> {
    let mut entries = vec![Entry { rel: String::new(), stat: m.lstat(root)?, kind: Kind::Dir }];
    let mut inodes: HashMap<u64, usize> = HashMap::new();
    let mut next = 0;
    while next < entries.len() {
        if progress.stop.load(Ordering::Relaxed) {
            return Err(CopyError::Stopped);
        }
        if matches!(entries[next].kind, Kind::Dir) {
            let dir = entries[next].rel.clone();
            let mut names = m.read_dir(&at(root, &dir))?;
            names.sort();
            for name in names {
                let rel = match dir.is_empty() {
                    true => name,
                    false => format!("{dir}/{name}"),
                };
                let path = at(root, &rel);
                let stat = m.lstat(&path)?;
                let kind = match stat.kind() {
                    libc::S_IFDIR => Kind::Dir,
                    libc::S_IFLNK => Kind::Symlink(m.readlink(&path)?),
                    libc::S_IFREG if stat.nlink > 1 => match inodes.get(&stat.ino) {
                        Some(first) => Kind::File(Some(*first)),
                        None => {
                            inodes.insert(stat.ino, entries.len());
                            Kind::File(None)
                        }
                    },
                    libc::S_IFREG => Kind::File(None),
                    _ => Kind::Node,
                };
                if matches!(kind, Kind::File(None)) {
                    progress.bytes_total.fetch_add(stat.size, Ordering::Relaxed);
                    progress.files_total.fetch_add(1, Ordering::Relaxed);
                }
                entries.push(Entry { rel, stat, kind });
            }
        }
        next += 1;
    }
    Ok(entries)
}

/// A piece of work: range `offset..offset+len` of file entry `file`.
struct Job {
    file: usize,
    offset: u64,
    len: u64,
}

fn ignore(e: CephError, errno: i32) -> std::result::Result<(), CephError> {
    match e.errno == errno {
        true => Ok(()),
        false => Err(e),
    }
}

fn copy_xattrs(m: &FsMount, from: &str, to: &str) -> Result<()> {
    for (name, value) in m.xattrs(from)? {
        m.set_xattr(to, &name, &value)?;
    }
    Ok(())
}

/// Copies the tree at `src` into the directory `dst` (which exists) with
/// `workers` threads.
pub fn copy_tree(
    m: &FsMount,
    src: &str,
    dst: &str,
    workers: usize,
    progress: &Progress,
) -> Result<()> {
    let entries = scan(m, src, progress)?;
    // Directories first, private until their attributes are set last.
    for e in entries.iter().skip(1).filter(|e| matches!(e.kind, Kind::Dir)) {
        m.mkdir(&at(dst, &e.rel), 0o700).or_else(|e| ignore(e, libc::EEXIST))?;
    }
    // The files' data: what a previous run finished is skipped.
    let mut jobs = vec![];
    let remaining: Vec<AtomicU32> = entries.iter().map(|_| AtomicU32::new(0)).collect();
    for (i, e) in entries.iter().enumerate() {
        if !matches!(e.kind, Kind::File(None)) {
            continue;
        }
        let done = m.lstat(&at(dst, &e.rel)).is_ok_and(|d| {
            d.kind() == libc::S_IFREG && d.size == e.stat.size && d.mtime == e.stat.mtime
        });
        if done {
            progress.bytes_done.fetch_add(e.stat.size, Ordering::Relaxed);
            progress.files_done.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let ranges = e.stat.size.div_ceil(RANGE).max(1);
        remaining[i].store(ranges as u32, Ordering::Relaxed);
        for r in 0..ranges {
            let offset = r * RANGE;
            jobs.push(Job { file: i, offset, len: RANGE.min(e.stat.size - offset) });
        }
    }
    let cursor = AtomicUsize::new(0);
    let work = || -> Result<()> {
        let mut buf = vec![0u8; BLOCK];
        loop {
            let Some(job) = jobs.get(cursor.fetch_add(1, Ordering::Relaxed)) else { return Ok(()) };
            if progress.stop.load(Ordering::Relaxed) {
                return Err(CopyError::Stopped);
            }
            let e = &entries[job.file];
            let (from, to) = (at(src, &e.rel), at(dst, &e.rel));
            copy_range(m, &from, &to, job, &mut buf, progress)?;
            if remaining[job.file].fetch_sub(1, Ordering::AcqRel) == 1 {
                // The last range of the file: its size (a hole at the end
                // included), then what it holds besides data, times last.
                m.open(&to, libc::O_WRONLY, 0)?.truncate(e.stat.size)?;
                copy_xattrs(m, &from, &to)?;
                m.set_attributes(&to, &e.stat)?;
                progress.files_done.fetch_add(1, Ordering::Relaxed);
            }
        }
    };
    std::thread::scope(|s| {
        let threads: Vec<_> = (0..workers.max(1)).map(|_| s.spawn(work)).collect();
        threads
            .into_iter()
            .map(|t| t.join().unwrap_or(Err(CopyError::Stopped)))
            .collect::<Result<Vec<()>>>()
    })?;
    // Other names of files, symlinks and nodes, once the files are there.
    for e in &entries {
        let to = at(dst, &e.rel);
        match &e.kind {
            Kind::File(Some(first)) => {
                let first = at(dst, &entries[*first].rel);
                if let Err(err) = m.link(&first, &to) {
                    ignore(err, libc::EEXIST)?;
                    if m.lstat(&to)?.ino != m.lstat(&first)?.ino {
                        m.unlink(&to)?;
                        m.link(&first, &to)?;
                    }
                }
            }
            Kind::Symlink(target) => {
                if let Err(err) = m.symlink(target, &to) {
                    ignore(err, libc::EEXIST)?;
                    m.unlink(&to)?;
                    m.symlink(target, &to)?;
                }
                copy_xattrs(m, &at(src, &e.rel), &to)?;
                m.set_attributes(&to, &e.stat)?;
            }
            Kind::Node => {
                m.mknod(&to, e.stat.mode, e.stat.rdev).or_else(|e| ignore(e, libc::EEXIST))?;
                copy_xattrs(m, &at(src, &e.rel), &to)?;
                m.set_attributes(&to, &e.stat)?;
            }
            Kind::Dir | Kind::File(None) => {}
        }
    }
    // Directories last, deepest first: their times stay as the source's.
    for e in entries.iter().rev().filter(|e| matches!(e.kind, Kind::Dir)) {
        let to = at(dst, &e.rel);
        copy_xattrs(m, &at(src, &e.rel), &to)?;
        m.set_attributes(&to, &e.stat)?;
    }
    m.sync()?;
    Ok(())
}

/// One range of a file; blocks of zeros are not written (holes).
fn copy_range(
    m: &FsMount,
    from: &str,
    to: &str,
    job: &Job,
    buf: &mut [u8],
    progress: &Progress,
) -> Result<()> {
    let src = m.open(from, libc::O_RDONLY, 0)?;
    let dst = m.open(to, libc::O_WRONLY | libc::O_CREAT, 0o600)?;
    let end = job.offset + job.len;
    let mut offset = job.offset;
    while offset < end {
        let want = (BLOCK as u64).min(end - offset) as usize;
        let mut got = 0;
        while got < want {
            let n = src.read_at(&mut buf[got..want], offset + got as u64)?;
            if n == 0 {
                break; // shorter than it was: the rest is a hole
            }
            got += n;
        }
        if got == 0 {
            break;
        }
        if buf[..got].iter().any(|b| *b != 0) {
            dst.write_all_at(&buf[..got], offset)?;
        }
        progress.bytes_done.fetch_add(got as u64, Ordering::Relaxed);
        offset += got as u64;
    }
    Ok(())
}
