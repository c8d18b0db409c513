//! The host layer: everything that talks to the kernel or runs a host tool.
//!
//! - [`node`]: the mount table, mount/mkfs/grow, freeze, quiescing;
//! - [`loopdev`]: loop devices (attach, detach, find by backing file);
//! - [`extents`]: allocated and shared ranges of files (FIEMAP);
//! - [`exec`]: external tools with timeouts, dying with the driver;
//! - [`fsutil`]: durable writes and write probes.
//!
//! This is the only crate with `unsafe` code (ioctls and `pre_exec`); each
//! block says why it is sound, and every ioctl opcode is built from its
//! definition (group, number, argument type) rather than written as a
//! number.

pub use ferrovol_csi::error;

pub mod exec;
pub mod extents;
pub mod fsutil;
pub mod loopdev;
pub mod node;
