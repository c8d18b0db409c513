//! CSI v1.12 wire types, clients and server traits.
//!
//! Everything here is generated at build time from `proto/csi.proto`; the
//! crate exists so that the (slow to compile) generated code is built once and
//! shared by the driver, its CLI and the tests.

#![allow(clippy::all, missing_docs)]

pub mod codec;

pub mod v1 {
    tonic::include_proto!("csi.v1");
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
