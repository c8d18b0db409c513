//! The driver core: what every engine shares.
//!
//! Layout (see docs/architecture.md):
//! - [`engine`]: the two traits an engine implements (controller half,
//!   node half) and the types they speak;
//! - [`services`]: the CSI services, validating requests and taking
//!   [`locks`] before calling an engine half;
//! - [`rpc`]: the path every RPC takes (span, ids, code, latency, panics,
//!   calls that run detached from their callers);
//! - [`server`]: the socket, the services a mode registers, shutdown;
//! - [`metrics`], [`authority`], [`logging`].
//!
//! It knows nothing of files, pools or devices: those are an engine's.

#![forbid(unsafe_code)]

pub use ferrovol_csi::{endpoint, units};
pub use ferrovol_error as error;

pub mod authority;
pub mod cli;
pub mod engine;
pub mod locks;
pub mod logging;
pub mod metrics;
pub mod rpc;
pub mod server;
pub mod services;
