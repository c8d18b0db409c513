//! Tools for any CSI endpoint, ours or another driver's: `ctl` (a CSI
//! client), `probe` (the liveness prober), `bench` and `demo` (which start
//! a throw-away `ferrovol serve` as a child process).
//!
//! They speak CSI over the wire and nothing else: this crate depends on the
//! wire crate and the HTTP exposition, never on the driver core or an
//! engine, so an edit here rebuilds no part of the driver.

#![forbid(unsafe_code)]

pub use ferrovol_csi::{endpoint, units};
pub use ferrovol_error as error;
use ferrovol_http as metrics;

pub mod bench;
pub mod ctl;
pub mod demo;
pub mod prober;
pub mod scratch;

/// Whether this process holds a capability (by number, see
/// capabilities(7)), from /proc.
fn has_capability(cap: u32) -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|eff| eff & (1 << cap) != 0)
}

const CAP_SYS_ADMIN: u32 = 21;
const CAP_SYS_RESOURCE: u32 = 24;
