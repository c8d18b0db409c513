//! The host layer: everything that talks to the kernel or runs a host tool.
//!
//! - [`node`]: the mount table, mount/mkfs/grow, freeze, quiescing;
//! - [`loopdev`]: loop devices (attach, detach, find by backing file);
//! - [`extents`]: allocated and shared ranges of files (FIEMAP);
//! - [`exec`]: external tools with timeouts, dying with the driver;
//! - [`fsutil`]: durable writes and write probes;
//! - [`offload`]: blocking work off the async executor, with a deadline.
//!
//! With `ferrovol-ceph` (Ceph's C libraries), this is the only crate with
//! `unsafe` code (ioctls and `pre_exec`); each block says why it is sound,
//! and every ioctl opcode is built from its definition (group, number,
//! argument type) rather than written as a number.

pub(crate) use ferrovol_error as error;

pub mod exec;
pub mod extents;
pub mod fsutil;
pub mod loopdev;
pub mod node;
pub mod offload;
pub mod process;

#[cfg(test)]
mod tests {
    /// The opcodes built from their definitions are the kernel headers'
    /// numbers (as printed by a C program on x86_64 and aarch64).
    #[test]
    fn ioctl_opcodes_match_the_kernel_headers() {
        use rustix::ioctl::opcode::{none, read, read_write, write};
        assert_eq!(none(b'L', 0x0A) as u64, 0x4C0A, "LOOP_CONFIGURE");
        assert_eq!(none(b'L', 0x82) as u64, 0x4C82, "LOOP_CTL_GET_FREE");
        assert_eq!(read_write::<libc::c_int>(b'X', 119) as u64, 0xC004_5877, "FIFREEZE");
        assert_eq!(read_write::<libc::c_int>(b'X', 120) as u64, 0xC004_5878, "FITHAW");
        assert_eq!(write::<u32>(b'f', 43) as u64, 0x4004_662B, "EXT4_IOC_CHECKPOINT");
        assert_eq!(read::<libc::size_t>(0x12, 114) as u64, 0x8008_1272, "BLKGETSIZE64");
        assert_eq!(read_write::<[u8; 32]>(b'f', 11) as u64, 0xC020_660B, "FS_IOC_FIEMAP");
        assert_eq!(none(0x12, 104) as u64, 0x1268, "BLKSSZGET");
    }
}
