//! The CSI gRPC services. Each one turns wire requests into calls on the
//! driver context (and, from the controller on, the storage engine), through
//! [`crate::rpc::handle`] so that every call is traced the same way.

pub mod identity;

use std::path::PathBuf;

use crate::cli::Mode;

/// What every service needs to know about this driver instance.
#[derive(Debug)]
pub struct Driver {
    pub name: String,
    pub node_id: String,
    pub mode: Mode,
    pub state_dir: PathBuf,
}
