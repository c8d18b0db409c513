//! Dev-only test kit: an in-memory engine (both halves, in the two shapes
//! engines come in), the services over an in-process channel, and the
//! bodies of the fuzz targets. Never linked into the driver.

#![forbid(unsafe_code)]

pub mod conformance;
pub mod fuzz;
pub mod harness;
pub mod mem;
pub mod memfs;
pub mod userns;
