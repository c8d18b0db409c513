//! ferrovol: a Kubernetes CSI storage driver.
//!
//! Layout (see docs/architecture.md):
//! - [`endpoint`], [`server`]: the socket and the gRPC server;
//! - [`rpc`]: the path every RPC takes (span, ids, code, latency);
//! - [`services`]: the CSI services, validating requests and taking
//!   [`locks`] before calling an [`engine`];
//! - [`engine`]: storage engines (the local engine keeps a [`journal`]);
//! - [`error`]: our errors and their one mapping to gRPC codes;
//! - [`cli`]: the command line.

pub mod authority;
pub mod bench;
pub mod cli;
pub mod ctl;
pub mod demo;
pub mod endpoint;
pub mod engine;
pub mod error;
pub mod exec;
pub mod failpoint;
pub mod fsutil;
pub mod fuzz;
pub mod journal;
pub mod locks;
pub mod logging;
pub mod metrics;
pub mod node;
pub mod poolinit;
pub mod prober;
pub mod rpc;
pub mod scratch;
pub mod server;
pub mod services;
pub mod units;
pub mod version;
