//! Node checks without root: a test runs itself again inside a new user
//! and mount namespace where it is root over mounts of its own (tmpfs,
//! binds, read-only binds, all made and enforced by the kernel) and over
//! nothing of the host's. The node service and a filesystem engine's node
//! half then run for real, unchanged, in the root-free tier.
//!
//! Loop devices are not namespaced: the block shapes' node checks stay in
//! the root tier.

use std::process::Command;

/// Set in the child, so that it knows where it runs.
const INSIDE: &str = "FERROVOL_TEST_IN_USER_NAMESPACE";

/// Whether this process runs in the namespace [`run_as_namespace_root`]
/// made.
pub fn inside() -> bool {
    std::env::var_os(INSIDE).is_some()
}

/// Runs the test named `test` of this test binary again, root of a new
/// user and mount namespace (util-linux `unshare`); panics with its output
/// when it fails, or when the kernel allows no unprivileged user
/// namespaces (the root-free tier then cannot check the node).
pub fn run_as_namespace_root(test: &str) {
    assert!(!inside(), "already in a user namespace of our own");
    let exe = std::env::current_exe().expect("the test binary");
    let out = Command::new("unshare")
        .args(["--user", "--map-root-user", "--mount", "--propagation", "private", "--"])
        .arg(exe)
        .args(["--exact", test, "--nocapture", "--test-threads", "1"])
        .env(INSIDE, "1")
        .output()
        .expect("running unshare (util-linux)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{test} in a user namespace: {}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
    // The filter matched the test, and it ran (not zero tests).
    assert!(stdout.contains("1 passed"), "{test} did not run in the namespace:\n{stdout}");
    eprint!("{stderr}");
}
