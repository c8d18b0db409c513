//! The pool directory: where volume and snapshot files live, and the file
//! operations on them (create, copy-on-write clone or sparse copy, grow).
//!
//! Everything here is blocking I/O; callers run it off the async executor.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{FallocateFlags, SeekFrom};

use crate::error::{self, Error, Result};
use crate::ids::{self, Kind};

/// How copies are made in this pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CowMethod {
    /// FICLONE: O(metadata), blocks shared until written.
    Reflink,
    /// The filesystem cannot share blocks: sparse-aware copy of the data.
    Copy,
}

impl CowMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            CowMethod::Reflink => "reflink",
            CowMethod::Copy => "copy",
        }
    }
}

/// The journal's file name in the pool.
pub const JOURNAL: &str = "journal.redb";

/// Volume and snapshot sizes are multiples of this (the loop device and
/// every filesystem we format are happy with 4 KiB).
pub const GRANULARITY: u64 = 4096;

#[derive(Clone, Debug)]
pub struct Pool {
    root: PathBuf,
    /// Device and inode of the root when opened: if the pool's filesystem is
    /// unmounted behind our back, the same path names another directory, and
    /// nothing may be written (or found missing and forgotten) there.
    identity: (u64, u64),
}

impl Pool {
    /// Opens the pool directory, creating its layout when missing.
    pub fn open(root: &Path) -> Result<Pool> {
        let dirs = ["volumes", "snapshots", "staging", "trash"].map(|d| root.join(d));
        for dir in std::iter::once(root.to_path_buf()).chain(dirs) {
            crate::private::create_dir_all(&dir)
                .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        }
        let root = root
            .canonicalize()
            .map_err(|e| Error::io(format!("resolving pool {}", root.display()), e))?;
        let identity = identity_of(&root)?;
        Ok(Pool { root, identity })
    }

    /// Opens a pool that must exist already, creating nothing (`pool
    /// check`): a missing part of its layout is an error.
    pub fn open_existing(root: &Path) -> Result<Pool> {
        for d in ["volumes", "snapshots", "staging", "trash"] {
            if !root.join(d).is_dir() {
                return Err(error::precondition(format!(
                    "{} has a journal but no {d} directory: not a whole ferrovol pool",
                    root.display()
                )));
            }
        }
        let root = root
            .canonicalize()
            .map_err(|e| Error::io(format!("resolving pool {}", root.display()), e))?;
        let identity = identity_of(&root)?;
        Ok(Pool { root, identity })
    }

    /// Fails unless the pool directory is still the one opened.
    pub fn verify(&self) -> Result<()> {
        match identity_of(&self.root) {
            Ok(id) if id == self.identity => Ok(()),
            Ok(_) => Err(error::unavailable(format!(
                "pool {} is no longer the directory ferrovol opened (was its filesystem \
                 unmounted or replaced?)",
                self.root.display()
            ))),
            Err(e) => Err(error::unavailable(format!("pool {} is gone: {e}", self.root.display()))),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn journal_path(&self) -> PathBuf {
        self.root.join(JOURNAL)
    }

    pub fn dir(&self, kind: Kind) -> PathBuf {
        match kind {
            Kind::Volume => self.root.join("volumes"),
            Kind::Snapshot => self.root.join("snapshots"),
            Kind::Group => self.root.join("groups"),
        }
    }

    /// The file of an object. The ID must already have been validated; this
    /// re-checks so that no caller can ever build a path from a hostile ID.
    /// Every file operation goes through here, so it is also where a pool
    /// that vanished is noticed before anything touches the wrong directory.
    pub fn path(&self, kind: Kind, id: &str) -> Result<PathBuf> {
        if !ids::is_valid(kind, id) {
            return Err(error::not_found(format!("no {kind:?} with id {id:?}").to_lowercase()));
        }
        self.verify()?;
        Ok(self.dir(kind).join(format!("{id}.img")))
    }

    /// Where a file is built until the journal durably says it exists. Only
    /// unfinished creations are here, so recovery may remove anything in it
    /// that no `Ready` record claims.
    pub fn staging_dir(&self) -> PathBuf {
        self.root.join("staging")
    }

    /// The staging path of an object being created.
    pub fn staging_path(&self, kind: Kind, id: &str) -> Result<PathBuf> {
        let path = self.path(kind, id)?;
        Ok(self.staging_dir().join(path.file_name().expect("object paths have a file name")))
    }

    /// Moves a finished object from staging to its place.
    pub fn publish(&self, kind: Kind, id: &str) -> Result<()> {
        let (from, to) = (self.staging_path(kind, id)?, self.path(kind, id)?);
        std::fs::rename(&from, &to)
            .map_err(|e| Error::io(format!("moving {} into place", from.display()), e))
    }

    /// Where a file goes while it is being deleted. Only deletions ever put
    /// files here, so anything in it may be removed at any time.
    pub fn trash_dir(&self) -> PathBuf {
        self.root.join("trash")
    }

    /// Moves an object's file to the trash (atomically; a missing file is
    /// fine) and answers the trash path.
    pub fn move_to_trash(&self, kind: Kind, id: &str) -> Result<PathBuf> {
        let from = self.path(kind, id)?;
        let to = self.trash_dir().join(from.file_name().expect("object paths have a file name"));
        match std::fs::rename(&from, &to) {
            Ok(()) => Ok(to),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(to),
            Err(e) => Err(Error::io(format!("moving {} to the trash", from.display()), e)),
        }
    }

    /// Empties the trash (recovery).
    pub fn empty_trash(&self) -> Result<Vec<PathBuf>> {
        let dir = self.trash_dir();
        let entries = std::fs::read_dir(&dir)
            .map_err(|e| Error::io(format!("listing {}", dir.display()), e))?;
        let mut removed = Vec::new();
        for e in entries {
            let p = e.map_err(|e| Error::io(format!("listing {}", dir.display()), e))?.path();
            remove(&p)?;
            removed.push(p);
        }
        Ok(removed)
    }

    /// Files in a kind's directory (for recovery and checks).
    pub fn files(&self, kind: Kind) -> Result<Vec<PathBuf>> {
        self.files_in(&self.dir(kind))
    }

    /// Files in one of the pool's directories, sorted.
    pub fn files_in(&self, dir: &Path) -> Result<Vec<PathBuf>> {
        let entries = std::fs::read_dir(dir)
            .map_err(|e| Error::io(format!("listing {}", dir.display()), e))?;
        let mut out = Vec::new();
        for e in entries {
            let e = e.map_err(|e| Error::io(format!("listing {}", dir.display()), e))?;
            out.push(e.path());
        }
        out.sort();
        Ok(out)
    }

    /// Detects whether the pool's filesystem can share blocks.
    pub fn probe_cow_method(&self) -> Result<CowMethod> {
        let a = self.root.join(format!(".reflink-probe-{}-a", std::process::id()));
        let b = self.root.join(format!(".reflink-probe-{}-b", std::process::id()));
        let result = (|| -> io::Result<bool> {
            // FICLONE reads the source: it must be open for reading.
            std::fs::write(&a, [0x5a; GRANULARITY as usize])?;
            let src = File::open(&a)?;
            let dst = File::create(&b)?;
            Ok(rustix::fs::ioctl_ficlone(&dst, &src).is_ok())
        })();
        let _ = std::fs::remove_file(&a);
        let _ = std::fs::remove_file(&b);
        match result {
            Ok(true) => Ok(CowMethod::Reflink),
            Ok(false) => Ok(CowMethod::Copy),
            Err(e) => Err(Error::io(format!("probing pool {}", self.root.display()), e)),
        }
    }

    /// Bytes free for new data, and the size of the whole pool filesystem.
    pub fn space(&self) -> Result<(u64, u64)> {
        let st = self.statvfs()?;
        Ok((st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize))
    }

    /// Bytes in use, as df counts them: all blocks less the free ones
    /// (free to anyone, root's reserve included — unlike [`Pool::space`]'s
    /// available bytes, which leave the reserve out).
    pub fn used(&self) -> Result<u64> {
        let st = self.statvfs()?;
        Ok(st.f_blocks.saturating_sub(st.f_bfree) * st.f_frsize)
    }

    fn statvfs(&self) -> Result<rustix::fs::StatVfs> {
        rustix::fs::statvfs(&self.root)
            .map_err(|e| Error::io(format!("statvfs {}", self.root.display()), e.into()))
    }
}

fn identity_of(dir: &Path) -> Result<(u64, u64)> {
    let st = rustix::fs::stat(dir)
        .map_err(|e| Error::io(format!("examining {}", dir.display()), e.into()))?;
    Ok((st.st_dev, st.st_ino))
}

fn create_new(path: &Path) -> io::Result<File> {
    OpenOptions::new().read(true).write(true).create_new(true).mode(0o600).open(path)
}

/// Creates an empty volume file of `size` bytes; `thick` allocates every block
/// now so writes can never fail for lack of space later.
pub fn create_empty(path: &Path, size: u64, thick: bool) -> Result<()> {
    let attempt = (|| -> io::Result<()> {
        let f = create_new(path)?;
        if thick {
            rustix::fs::fallocate(&f, FallocateFlags::empty(), 0, size)?;
            f.sync_all()?;
        } else {
            f.set_len(size)?;
        }
        Ok(())
    })();
    attempt.map_err(|e| {
        let _ = std::fs::remove_file(path);
        Error::io(format!("creating {}", path.display()), e)
    })
}

/// Makes `dst` a copy of `src` that is `size` bytes long (at least the
/// source's length): a reflink where the pool allows, else a sparse copy.
/// Durable when it returns; on failure nothing is left at `dst`.
pub fn clone_file(src: &Path, dst: &Path, size: u64, method: CowMethod) -> Result<()> {
    let attempt = (|| -> io::Result<()> {
        let from = File::open(src)?;
        let len = from.metadata()?.len();
        let to = create_new(dst)?;
        match method {
            CowMethod::Reflink => rustix::fs::ioctl_ficlone(&to, &from)?,
            CowMethod::Copy => sparse_copy(&from, &to, len)?,
        }
        if size > len {
            to.set_len(size)?;
        }
        to.sync_all()
    })();
    attempt.map_err(|e| {
        let _ = std::fs::remove_file(dst);
        Error::io(format!("copying {} to {}", src.display(), dst.display()), e)
    })
}

/// Copies only the data extents of `from`, leaving holes as holes, so an
/// empty 1 GiB volume copies in no time even without reflink.
fn sparse_copy(from: &File, to: &File, len: u64) -> io::Result<()> {
    to.set_len(len)?;
    let mut pos = 0u64;
    while pos < len {
        let data = match rustix::fs::seek(from, SeekFrom::Data(pos)) {
            Ok(off) => off,
            Err(rustix::io::Errno::NXIO) => break, // only a hole remains
            Err(e) => return Err(e.into()),
        };
        let hole = rustix::fs::seek(from, SeekFrom::Hole(data))?.min(len);
        let mut off_in = data;
        let mut off_out = data;
        while off_in < hole {
            let chunk = (hole - off_in).min(1 << 30) as usize;
            let n = rustix::fs::copy_file_range(
                from,
                Some(&mut off_in),
                to,
                Some(&mut off_out),
                chunk,
            )?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "source shrank while copying",
                ));
            }
        }
        pos = hole;
    }
    Ok(())
}

/// Grows a volume file to `size` bytes (thick: allocating the new range).
/// On failure the file is as it was: a half-allocated tail would be space
/// taken for a size the volume never got.
pub fn grow(path: &Path, size: u64, thick: bool) -> Result<()> {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    let len =
        f.metadata().map_err(|e| Error::io(format!("examining {}", path.display()), e))?.len();
    if size <= len {
        return Ok(());
    }
    let attempt = (|| -> io::Result<()> {
        if thick {
            rustix::fs::fallocate(&f, FallocateFlags::empty(), len, size - len)?;
        } else {
            f.set_len(size)?;
        }
        f.sync_all()
    })();
    attempt.map_err(|e| {
        let _ = f.set_len(len);
        Error::io(format!("growing {}", path.display()), e)
    })
}

/// Makes a snapshot file read-only: nothing may ever write through it.
pub fn seal(path: &Path) -> Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o400))
        .map_err(|e| Error::io(format!("sealing {}", path.display()), e))
}

/// Removes a file; a file that is already gone is fine.
pub fn remove(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("removing {}", path.display()), e)),
    }
}

/// Rounds up to the pool's granularity (None on overflow).
pub fn round_up(bytes: u64) -> Option<u64> {
    bytes.checked_add(GRANULARITY - 1).map(|b| b / GRANULARITY * GRANULARITY)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};

    #[test]
    fn sparse_copy_keeps_data_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let dst = dir.path().join("dst");
        let mut f = File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        f.seek(io::SeekFrom::Start(10 << 20)).unwrap();
        f.write_all(&[7u8; 8192]).unwrap();
        f.seek(io::SeekFrom::Start((64 << 20) - 4096)).unwrap();
        f.write_all(&[9u8; 4096]).unwrap();
        drop(f);

        clone_file(&src, &dst, 128 << 20, CowMethod::Copy).unwrap();
        let mut out = Vec::new();
        File::open(&dst).unwrap().read_to_end(&mut out).unwrap();
        assert_eq!(out.len(), 128 << 20);
        assert!(out[(10 << 20)..(10 << 20) + 8192].iter().all(|&b| b == 7));
        assert!(out[(64 << 20) - 4096..64 << 20].iter().all(|&b| b == 9));
        assert!(out[..10 << 20].iter().all(|&b| b == 0));
        // Holes stayed holes: far fewer blocks than the logical size.
        let blocks = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&dst).unwrap());
        assert!(blocks * 512 < 1 << 20, "copy allocated {} bytes", blocks * 512);
    }

    #[test]
    fn failed_clone_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let dst = dir.path().join("dst");
        assert!(clone_file(&dir.path().join("missing"), &dst, 4096, CowMethod::Copy).is_err());
        assert!(!dst.exists());
    }

    #[test]
    fn rounding() {
        assert_eq!(round_up(0), Some(0));
        assert_eq!(round_up(1), Some(4096));
        assert_eq!(round_up(4096), Some(4096));
        assert_eq!(round_up(u64::MAX), None);
    }

    #[test]
    fn paths_only_from_valid_ids() {
        let dir = tempfile::tempdir().unwrap();
        let pool = Pool::open(dir.path()).unwrap();
        assert!(pool.path(Kind::Volume, "../../etc/passwd").is_err());
        let id = ids::mint(Kind::Volume, "n1");
        let p = pool.path(Kind::Volume, &id).unwrap();
        assert!(p.starts_with(pool.root()));
    }
}
