//! The CSI gRPC services. Each one turns wire requests into calls on the
//! storage engine, through [`crate::rpc::handle`] so that every call is
//! traced the same way.

pub mod controller;
pub mod convert;
pub mod identity;
pub mod validate;

use std::path::PathBuf;
use std::sync::Arc;

use crate::cli::Mode;
use crate::engine::Engine;
use crate::locks::OpLocks;

/// What every service needs to know about this driver instance.
pub struct Driver {
    pub name: String,
    pub node_id: String,
    pub mode: Mode,
    pub state_dir: PathBuf,
    pub engine: Arc<dyn Engine>,
    /// Shared by all services: a node operation and a controller operation
    /// on the same volume exclude each other too.
    pub locks: OpLocks,
}
