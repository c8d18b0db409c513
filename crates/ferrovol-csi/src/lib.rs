//! CSI v1.12 wire types, clients and server traits, and what the driver and
//! the tools must agree on without depending on each other.
//!
//! The types are generated at build time from `proto/csi.proto`; the crate
//! exists so that the (slow to compile) generated code is built once and
//! shared by the driver, its tools and the tests. Beside them:
//! - [`error`]: our errors and their one mapping to gRPC codes;
//! - [`endpoint`]: CSI endpoint addresses, the default socket, connecting;
//! - [`units`]: sizes, durations and times as people write them;
//! - [`build`]: the version the binary was stamped with.

#![forbid(unsafe_code)]

pub mod build;
pub mod codec;
pub mod endpoint;
pub mod error;
pub mod units;

/// The generated code, which clippy's lints are not for.
#[allow(clippy::all, missing_docs)]
mod generated {
    tonic::include_proto!("csi.v1");
}

pub mod v1 {
    pub use crate::generated::*;
}

pub use v1::*;

/// Keys of the volume context under which ferrovol reports a volume's name
/// and creation time (RFC 3339), for people and tools that list volumes.
/// Shared here so the driver and the tools agree without depending on each
/// other.
pub mod context {
    pub const NAME: &str = "csi.ferrovol.io/name";
    pub const CREATED: &str = "csi.ferrovol.io/created";
}
