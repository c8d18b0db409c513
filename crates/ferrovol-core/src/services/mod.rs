//! The CSI gRPC services. Each one turns wire requests into calls on the
//! storage engine, through [`crate::rpc::handle`] so that every call is
//! traced the same way.

pub mod controller;
pub mod controller_side_node;
pub mod convert;
pub mod group_controller;
pub mod identity;
pub mod mount_options;
pub mod node;
pub mod snapshot_metadata;
pub mod validate;

use std::path::PathBuf;
use std::sync::Arc;

use crate::cli::Mode;
use crate::engine::{ControllerEngine, NodeEngine};
use crate::locks::OpLocks;

/// What every service needs to know about this driver instance.
pub struct Driver {
    pub name: String,
    pub node_id: String,
    pub mode: Mode,
    /// The driver's own state (format markers of the node service, the
    /// write probe); engines keep theirs where they choose.
    pub state_dir: PathBuf,
    /// Keeps writing to the state dir in the background, for Probe; only
    /// where the node service keeps state there (a controller-only process
    /// writes nothing to disk of its own).
    pub state_writes: Option<Arc<ferrovol_host::fsutil::WriteMonitor>>,
    /// The controller half: Some when this process serves the Controller
    /// services.
    pub controller: Option<Arc<dyn ControllerEngine>>,
    /// The node half: Some when this process serves the Node service.
    pub node: Option<Arc<dyn NodeEngine>>,
    /// Shared by all services: a node operation and a controller operation
    /// on the same volume exclude each other too.
    pub locks: OpLocks,
}

impl Driver {
    /// The controller half; only the Controller services hold a driver
    /// that has one, so its absence is a wiring bug.
    pub fn controller(&self) -> &Arc<dyn ControllerEngine> {
        self.controller.as_ref().expect("a controller service without a controller engine")
    }

    /// The node half, likewise for the Node service.
    pub fn node(&self) -> &Arc<dyn NodeEngine> {
        self.node.as_ref().expect("a node service without a node attacher")
    }

    /// The engine's kind, from whichever half this process holds.
    pub fn engine_kind(&self) -> &'static str {
        match (&self.controller, &self.node) {
            (Some(c), _) => c.kind(),
            (None, Some(n)) => n.kind(),
            (None, None) => "none",
        }
    }

    /// What the engine can do, from whichever half this process holds.
    pub fn features(&self) -> crate::engine::Features {
        match (&self.controller, &self.node) {
            (Some(c), _) => c.features(),
            (None, Some(n)) => n.features(),
            (None, None) => unreachable!("a driver with no engine half"),
        }
    }
}
