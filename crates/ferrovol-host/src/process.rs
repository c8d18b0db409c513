//! Leaving the process.

/// Ends the process at once with `code`: no atexit handlers, no static
/// destructors of the C and C++ libraries loaded (Ceph's tear their
/// global state down under threads still running, and abort). For a stop
/// that must not wait for work still in flight; whatever must be durable
/// was made so before.
pub fn exit_now(code: i32) -> ! {
    use std::io::Write;
    let _ = std::io::stderr().flush();
    let _ = std::io::stdout().flush();
    // SAFETY: _exit ends the process; nothing runs after it.
    unsafe { libc::_exit(code) }
}
