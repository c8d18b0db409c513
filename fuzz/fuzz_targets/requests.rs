//! Arbitrary bytes as CSI requests, served by the real services on a scratch
//! pool: no panic, no INTERNAL/UNKNOWN, nothing written outside the pool.
#![no_main]

use std::sync::OnceLock;

use ferrovol_testkit::fuzz::Harness;
use libfuzzer_sys::fuzz_target;

static HARNESS: OnceLock<Harness> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let harness = HARNESS.get_or_init(|| {
        let root = std::env::temp_dir().join(format!("ferrovol-fuzz-{}", std::process::id()));
        Harness::new(&root)
    });
    let _ = harness.request(data);
});
