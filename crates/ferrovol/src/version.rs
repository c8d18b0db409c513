//! Build identity, stamped by build.rs.

/// Crate version, plus `+g<rev>` when built from a git checkout.
pub const VERSION: &str = env!("FERROVOL_VERSION");

/// The git revision alone (empty outside a checkout).
pub const GIT_REVISION: &str = env!("FERROVOL_GIT_REV");
