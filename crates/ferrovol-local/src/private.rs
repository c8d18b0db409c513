//! The pool holds every volume's data, and its journal and identity say
//! what is where: made for root alone (files 0600, directories 0700), and
//! checked by `pool check` (looser modes are reported; `--repair`, and a
//! start, tighten them).

use std::fs::{DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

pub const FILE_MODE: u32 = 0o600;
pub const DIR_MODE: u32 = 0o700;

/// Creates `path` and any missing parents, each 0700 (one that exists
/// keeps its mode).
pub fn create_dir_all(path: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(DIR_MODE).create(path)
}

/// Options that create a file 0600.
pub fn options() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.mode(FILE_MODE);
    o
}

/// Creates the file 0600 if it is missing (an existing one is untouched).
pub fn ensure_file(path: &Path) -> io::Result<File> {
    options().read(true).write(true).create(true).truncate(false).open(path)
}

/// Which of `paths` (those that exist) anyone but their owner may read,
/// write or enter, with their modes.
pub fn loose(paths: &[PathBuf]) -> Vec<(PathBuf, u32)> {
    paths
        .iter()
        .filter_map(|p| {
            let mode = std::fs::symlink_metadata(p).ok()?.permissions().mode() & 0o7777;
            (mode & 0o077 != 0).then(|| (p.clone(), mode))
        })
        .collect()
}

/// Takes every right of group and others away.
pub fn tighten(path: &Path, mode: u32) -> io::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o7700))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_private_and_loose_ones_found() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("a/b");
        create_dir_all(&sub).unwrap();
        let f = sub.join("f");
        ensure_file(&f).unwrap();
        let all = vec![dir.path().join("a"), sub.clone(), f.clone()];
        assert!(loose(&all).is_empty(), "{:?}", loose(&all));
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(loose(&all), vec![(f.clone(), 0o644)]);
        tighten(&f, 0o644).unwrap();
        assert!(loose(&all).is_empty());
    }
}
