//! ferrovol: a Kubernetes CSI storage driver.
//!
//! Layout (see docs/architecture.md):
//! - [`endpoint`], [`server`]: the socket and the gRPC server;
//! - [`rpc`]: the path every RPC takes (span, ids, code, latency);
//! - [`services`]: the CSI services;
//! - [`error`]: our errors and their one mapping to gRPC codes;
//! - [`cli`]: the command line.

pub mod cli;
pub mod endpoint;
pub mod error;
pub mod logging;
pub mod rpc;
pub mod server;
pub mod services;
pub mod version;
