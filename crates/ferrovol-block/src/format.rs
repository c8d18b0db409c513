//! `<state dir>/formatting/<volume>`: present, durably, exactly while a
//! format of the volume is under way on this node. A format a crash
//! interrupted leaves a device that looks formatted but is not; it held no
//! data (it was proven blank before the record was made), so it is
//! formatted again.

use std::path::{Path, PathBuf};

use ferrovol_core::error::{Error, Result};

#[derive(Clone)]
pub(crate) struct FormatMarker {
    dir: PathBuf,
    path: PathBuf,
}

impl FormatMarker {
    pub(crate) fn new(state_dir: &Path, volume_id: &str) -> FormatMarker {
        let dir = state_dir.join("formatting");
        // Hex: an engine's IDs need not be safe file names.
        let name: String = volume_id.bytes().map(|b| format!("{b:02x}")).collect();
        FormatMarker { path: dir.join(name), dir }
    }

    pub(crate) fn exists(&self) -> bool {
        self.path.exists()
    }

    pub(crate) fn set(&self) -> Result<()> {
        let made = std::fs::create_dir_all(&self.dir)
            .and_then(|()| std::fs::File::create(&self.path)?.sync_all())
            .and_then(|()| std::fs::File::open(&self.dir)?.sync_all());
        made.map_err(|e| Error::io(format!("recording a format in {}", self.path.display()), e))
    }

    pub(crate) fn clear(&self) -> Result<()> {
        let cleared = std::fs::remove_file(&self.path)
            .and_then(|()| std::fs::File::open(&self.dir)?.sync_all());
        cleared.map_err(|e| Error::io(format!("clearing {}", self.path.display()), e))
    }
}
