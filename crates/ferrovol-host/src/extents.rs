//! Changed-block tracking from the filesystem's own block maps.
//!
//! Allocated ranges come from `SEEK_DATA`/`SEEK_HOLE`. The delta between two
//! snapshots of one volume comes from FIEMAP: where both files map the same
//! logical offset to the same physical block, the block is still shared, so
//! it is unchanged without reading a byte; where both are holes, unchanged
//! too. On a pool that shares blocks (reflink), everything else was written
//! since the base (copy-on-write broke the sharing), so the answer costs
//! O(extents). On a pool that cannot share, the remaining ranges are
//! compared by content, in large chunks, block by block.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use rustix::fs::SeekFrom;

/// Ranges are reported in whole blocks of this size (what volumes and
/// snapshots are sized in).
pub const GRANULARITY: u64 = 4096;

pub type Range = (u64, u64);

/// One mapped extent; `physical` is None when it cannot be trusted
/// (unknown, delayed allocation, encoded) and `unwritten` extents read as
/// zeros like holes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub logical: u64,
    pub len: u64,
    pub physical: Option<u64>,
    pub unwritten: bool,
}

// <linux/fiemap.h>
/// `_IOWR('f', 11, struct fiemap)`: the size in the opcode is the header's
/// (the extents follow it as a flexible array).
const FS_IOC_FIEMAP: libc::Ioctl =
    rustix::ioctl::opcode::read_write::<[u8; FIEMAP_HEADER]>(b'f', 11) as libc::Ioctl;
const FIEMAP_HEADER: usize = 32;
const FIEMAP_FLAG_SYNC: u32 = 0x1;
const FIEMAP_EXTENT_LAST: u32 = 0x1;
const FIEMAP_EXTENT_UNKNOWN: u32 = 0x2;
const FIEMAP_EXTENT_DELALLOC: u32 = 0x4;
const FIEMAP_EXTENT_ENCODED: u32 = 0x8;
const FIEMAP_EXTENT_UNWRITTEN: u32 = 0x800;
/// Extents per FIEMAP call: large, because a heavily rewritten snapshot has
/// tens of thousands and each call has a fixed cost.
const BATCH: usize = 4096;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FiemapExtent {
    fe_logical: u64,
    fe_physical: u64,
    fe_length: u64,
    fe_reserved64: [u64; 2],
    fe_flags: u32,
    fe_reserved: [u32; 3],
}

#[repr(C)]
struct Fiemap {
    fm_start: u64,
    fm_length: u64,
    fm_flags: u32,
    fm_mapped_extents: u32,
    fm_extent_count: u32,
    fm_reserved: u32,
    fm_extents: [FiemapExtent; BATCH],
}

const _: () = assert!(std::mem::size_of::<FiemapExtent>() == 56);
const _: () = assert!(std::mem::offset_of!(Fiemap, fm_extents) == FIEMAP_HEADER);

/// Every extent of a file, in logical order.
pub fn fiemap(file: &File) -> io::Result<Vec<Extent>> {
    fiemap_window(file, 0, u64::MAX, true)
}

/// The extents of a file that overlap [from, to), in logical order;
/// `sync` flushes the file first (once is enough: snapshots never change).
fn fiemap_window(file: &File, from: u64, to: u64, sync: bool) -> io::Result<Vec<Extent>> {
    let mut out = Vec::new();
    let mut start = from;
    let mut flags = if sync { FIEMAP_FLAG_SYNC } else { 0 };
    loop {
        if start >= to {
            return Ok(out);
        }
        let mut map = Box::new(Fiemap {
            fm_start: start,
            fm_length: to - start,
            fm_flags: std::mem::take(&mut flags),
            fm_mapped_extents: 0,
            fm_extent_count: BATCH as u32,
            fm_reserved: 0,
            fm_extents: [FiemapExtent::default(); BATCH],
        });
        // SAFETY: FS_IOC_FIEMAP reads the header and fills at most
        // fm_extent_count extents of the buffer we own.
        if unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FIEMAP, &mut *map as *mut Fiemap) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = map.fm_mapped_extents as usize;
        if n == 0 {
            return Ok(out);
        }
        let mut last = false;
        for e in &map.fm_extents[..n] {
            let untrusted = e.fe_flags
                & (FIEMAP_EXTENT_UNKNOWN | FIEMAP_EXTENT_DELALLOC | FIEMAP_EXTENT_ENCODED)
                != 0;
            out.push(Extent {
                logical: e.fe_logical,
                len: e.fe_length,
                physical: (!untrusted).then_some(e.fe_physical),
                unwritten: e.fe_flags & FIEMAP_EXTENT_UNWRITTEN != 0,
            });
            last |= e.fe_flags & FIEMAP_EXTENT_LAST != 0;
        }
        let tail = &map.fm_extents[n - 1];
        start = tail.fe_logical + tail.fe_length;
        if last {
            return Ok(out);
        }
    }
}

/// How much of a file one window of [`allocated_windows`] and
/// [`changed_windows`] maps: the ranges of one window are all that is held.
pub const WINDOW: u64 = 1 << 30;

/// The data ranges of a file (holes skipped), up to `size`.
pub fn allocated(file: &File, size: u64) -> io::Result<Vec<Range>> {
    allocated_window(file, 0, size, size)
}

/// [`allocated`], one [`WINDOW`] at a time from the window holding `from`:
/// `each` gets each window's ranges in order, and stops the walk by
/// answering false.
pub fn allocated_windows(
    file: &File,
    from: u64,
    size: u64,
    each: &mut dyn FnMut(Vec<Range>) -> bool,
) -> io::Result<()> {
    let mut at = from / WINDOW * WINDOW;
    while at < size {
        let end = at.saturating_add(WINDOW).min(size);
        if !each(allocated_window(file, at, end, size)?) {
            break;
        }
        at = end;
    }
    Ok(())
}

fn allocated_window(file: &File, from: u64, to: u64, size: u64) -> io::Result<Vec<Range>> {
    let mut out = Vec::new();
    let mut pos = from;
    while pos < to {
        let data = match rustix::fs::seek(file, SeekFrom::Data(pos)) {
            Ok(d) => d,
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(e.into()),
        };
        if data >= to {
            break;
        }
        let hole = rustix::fs::seek(file, SeekFrom::Hole(data))?.min(to);
        out.push((data, hole - data));
        pos = hole;
    }
    Ok(align_and_merge(out, size))
}

/// What one byte interval of both files is known to be.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Span {
    /// Both read zeros.
    BothHoles,
    /// Both map to the same physical blocks: shared, unchanged.
    Shared,
    /// Anything else: changed, or unknown without reading.
    Suspect,
}

/// The ranges of `target` that differ from `base`, up to `size`.
/// `shares_blocks`: the files' filesystem shares blocks between copies
/// (reflink), so a block that is not shared any more was written.
pub fn changed(
    base: &File,
    target: &File,
    size: u64,
    shares_blocks: bool,
) -> io::Result<Vec<Range>> {
    changed_window(base, target, 0, size, size, shares_blocks, true)
}

/// [`changed`], one [`WINDOW`] at a time from the window holding `from`:
/// `each` gets each window's ranges in order, and stops the walk by
/// answering false.
pub fn changed_windows(
    base: &File,
    target: &File,
    from: u64,
    size: u64,
    shares_blocks: bool,
    each: &mut dyn FnMut(Vec<Range>) -> bool,
) -> io::Result<()> {
    let mut at = from / WINDOW * WINDOW;
    let mut sync = true;
    while at < size {
        let end = at.saturating_add(WINDOW).min(size);
        let ranges = changed_window(base, target, at, end, size, shares_blocks, sync)?;
        sync = false;
        if !each(ranges) {
            break;
        }
        at = end;
    }
    Ok(())
}

fn changed_window(
    base: &File,
    target: &File,
    from: u64,
    to: u64,
    size: u64,
    shares_blocks: bool,
    sync: bool,
) -> io::Result<Vec<Range>> {
    // Sequential on purpose: mapping both files at once was measured ten
    // times slower on XFS (both walks contend on the shared refcount btree).
    let (b, t) = (fiemap_window(base, from, to, sync)?, fiemap_window(target, from, to, sync)?);
    let mut suspects = Vec::new();
    for (start, end, span) in classify(&b, &t, from, to) {
        if span == Span::Suspect {
            suspects.push((start, end - start));
        }
    }
    let suspects = align_and_merge(suspects, size);
    match shares_blocks {
        // Sharing would have survived had the block not been written.
        true => Ok(suspects),
        false => compare_content(base, target, &suspects, size),
    }
}

/// Splits [from, to) at every extent boundary of both maps and classifies
/// each piece.
fn classify(base: &[Extent], target: &[Extent], from: u64, to: u64) -> Vec<(u64, u64, Span)> {
    let mut cuts = vec![from, to];
    for e in base.iter().chain(target) {
        cuts.push(e.logical.clamp(from, to));
        cuts.push(e.logical.saturating_add(e.len).clamp(from, to));
    }
    cuts.sort_unstable();
    cuts.dedup();
    let lookup = |map: &[Extent], at: u64| -> Option<Extent> {
        let i = map.partition_point(|e| e.logical + e.len <= at);
        map.get(i).filter(|e| e.logical <= at && !e.unwritten).copied()
    };
    let mut out = Vec::new();
    for w in cuts.windows(2) {
        let (start, end) = (w[0], w[1]);
        if start >= end {
            continue;
        }
        let span = match (lookup(base, start), lookup(target, start)) {
            (None, None) => Span::BothHoles,
            (Some(x), Some(y)) => match (x.physical, y.physical) {
                (Some(px), Some(py)) if px + (start - x.logical) == py + (start - y.logical) => {
                    Span::Shared
                }
                _ => Span::Suspect,
            },
            _ => Span::Suspect,
        };
        out.push((start, end, span));
    }
    out
}

/// Reads suspect ranges of both files in large chunks and keeps the blocks
/// whose bytes differ.
fn compare_content(
    base: &File,
    target: &File,
    suspects: &[Range],
    size: u64,
) -> io::Result<Vec<Range>> {
    const CHUNK: u64 = 4 << 20;
    let mut changed = Vec::new();
    let (mut a, mut b) = (vec![0u8; CHUNK as usize], vec![0u8; CHUNK as usize]);
    for &(off, len) in suspects {
        let mut pos = off;
        while pos < off + len {
            let n = (off + len - pos).min(CHUNK) as usize;
            read_full(base, &mut a[..n], pos)?;
            read_full(target, &mut b[..n], pos)?;
            for (i, (x, y)) in a[..n]
                .chunks(GRANULARITY as usize)
                .zip(b[..n].chunks(GRANULARITY as usize))
                .enumerate()
            {
                if x != y {
                    changed.push((pos + (i as u64) * GRANULARITY, x.len() as u64));
                }
            }
            pos += n as u64;
        }
    }
    Ok(align_and_merge(changed, size))
}

/// Reads `buf.len()` bytes at `offset`; past the end of a shorter file the
/// bytes are zeros (what a volume reads there).
fn read_full(f: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], offset + done as u64)? {
            0 => {
                buf[done..].fill(0);
                return Ok(());
            }
            n => done += n,
        }
    }
    Ok(())
}

/// Widens ranges to whole blocks, clips to `size`, and merges neighbours.
pub fn align_and_merge(mut ranges: Vec<Range>, size: u64) -> Vec<Range> {
    ranges.sort_unstable();
    let mut out: Vec<Range> = Vec::with_capacity(ranges.len());
    for (off, len) in ranges {
        let start = off / GRANULARITY * GRANULARITY;
        let end = (off + len).div_ceil(GRANULARITY).saturating_mul(GRANULARITY).min(size);
        if end <= start {
            continue;
        }
        match out.last_mut() {
            Some((s, l)) if *s + *l >= start => *l = (*l).max(end - *s),
            _ => out.push((start, end - start)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(logical: u64, len: u64, physical: u64) -> Extent {
        Extent { logical, len, physical: Some(physical), unwritten: false }
    }

    #[test]
    fn shared_blocks_are_unchanged_and_rewritten_ones_are_not() {
        // base: [0,100) at 1000; target shares [0,40), rewrote [40,60)
        // elsewhere, shares [60,100).
        let base = [ext(0, 100, 1000)];
        let target = [ext(0, 40, 1000), ext(40, 20, 5000), ext(60, 40, 1060)];
        let spans = classify(&base, &target, 0, 200);
        assert_eq!(
            spans,
            vec![
                (0, 40, Span::Shared),
                (40, 60, Span::Suspect),
                (60, 100, Span::Shared),
                (100, 200, Span::BothHoles)
            ]
        );
    }

    #[test]
    fn holes_and_unwritten_extents_read_as_zeros() {
        let base = [Extent { logical: 0, len: 50, physical: Some(7), unwritten: true }];
        let target = [ext(50, 50, 9)];
        let spans = classify(&base, &target, 0, 100);
        assert_eq!(spans, vec![(0, 50, Span::BothHoles), (50, 100, Span::Suspect)]);
    }

    #[test]
    fn untrusted_physical_is_suspect() {
        let base = [Extent { logical: 0, len: 10, physical: None, unwritten: false }];
        let target = [ext(0, 10, 0)];
        assert_eq!(classify(&base, &target, 0, 10), vec![(0, 10, Span::Suspect)]);
    }

    #[test]
    fn alignment_and_merging() {
        let g = GRANULARITY;
        assert_eq!(align_and_merge(vec![(1, 1), (g + 5, 10)], 10 * g), vec![(0, 2 * g)]);
        assert_eq!(align_and_merge(vec![(3 * g, g), (0, g)], 10 * g), vec![(0, g), (3 * g, g)]);
        assert_eq!(align_and_merge(vec![(9 * g, 5 * g)], 10 * g), vec![(9 * g, g)]);
    }

    #[test]
    fn content_comparison_finds_exactly_the_written_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let size = 64 * GRANULARITY;
        for p in [&a, &b] {
            let f = File::create(p).unwrap();
            f.set_len(size).unwrap();
            f.write_all_at(&[1u8; 8192], 0).unwrap();
        }
        let fb = std::fs::OpenOptions::new().write(true).open(&b).unwrap();
        fb.write_all_at(&[2u8; 10], 5 * GRANULARITY + 100).unwrap();
        fb.write_all_at(&[3u8; 4096], 40 * GRANULARITY).unwrap();
        let got = changed(&File::open(&a).unwrap(), &File::open(&b).unwrap(), size, false).unwrap();
        assert_eq!(got, vec![(5 * GRANULARITY, GRANULARITY), (40 * GRANULARITY, GRANULARITY)]);
        let alloc = allocated(&File::open(&b).unwrap(), size).unwrap();
        assert!(alloc.contains(&(0, 2 * GRANULARITY)), "{alloc:?}");
        assert!(alloc.iter().all(|(o, _)| *o % GRANULARITY == 0));
    }

    /// Window by window, a file's ranges are the whole walk's (a range
    /// across a window's edge comes in two pieces), and a walk from an
    /// offset starts at that offset's window.
    #[test]
    fn windows_cover_what_the_whole_walk_finds() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("sparse"))
            .unwrap();
        let size = 3 * WINDOW;
        f.set_len(size).unwrap();
        for at in [0, WINDOW - 4096, 2 * WINDOW + (WINDOW / 2)] {
            f.write_at(&[7u8; 8192], at).unwrap();
        }
        f.sync_all().unwrap();
        let whole = allocated(&f, size).unwrap();
        let mut windows = Vec::new();
        allocated_windows(&f, 0, size, &mut |r| {
            windows.push(r);
            true
        })
        .unwrap();
        assert_eq!(windows.len(), 3, "one batch per window");
        let merged = align_and_merge(windows.concat(), size);
        assert_eq!(merged, whole);
        let mut later = Vec::new();
        allocated_windows(&f, 2 * WINDOW + 1, size, &mut |r| {
            later.extend(r);
            true
        })
        .unwrap();
        assert_eq!(later, vec![(2 * WINDOW + WINDOW / 2, 8192)]);
        let mut first_only = 0;
        allocated_windows(&f, 0, size, &mut |_| {
            first_only += 1;
            false
        })
        .unwrap();
        assert_eq!(first_only, 1, "a reader that stops stops the walk");
    }
}
