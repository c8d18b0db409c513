//! The version the binary was stamped with (by the `ferrovol` crate's
//! build script, at start-up): kept out of the libraries' own builds so a
//! new commit relinks the binary instead of rebuilding every crate.

use std::sync::OnceLock;

static STAMP: OnceLock<(&'static str, &'static str)> = OnceLock::new();

/// Called once by the binary before anything reports a version.
pub fn set_version(version: &'static str, git_revision: &'static str) {
    let _ = STAMP.set((version, git_revision));
}

/// The crate version, plus `+g<rev>` when built from a git checkout.
pub fn version() -> &'static str {
    STAMP.get().map_or(env!("CARGO_PKG_VERSION"), |s| s.0)
}

/// The git revision alone (empty outside a checkout).
pub fn git_revision() -> &'static str {
    STAMP.get().map_or("", |s| s.1)
}
