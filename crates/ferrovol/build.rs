//! Stamps the binary with the git revision it was built from, when there is one.

use std::process::Command;

fn main() {
    let rev = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let dirty = Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| !o.stdout.is_empty())
        .unwrap_or(false);
    let rev = if !rev.is_empty() && dirty { format!("{rev}-dirty") } else { rev };
    let pkg = std::env::var("CARGO_PKG_VERSION").unwrap_or_default();
    let version = if rev.is_empty() { pkg } else { format!("{pkg}+g{rev}") };
    println!("cargo:rustc-env=FERROVOL_GIT_REV={rev}");
    println!("cargo:rustc-env=FERROVOL_VERSION={version}");
    // Rebuild the stamp when HEAD moves; a missing .git just means no stamp.
    for p in ["../../.git/HEAD", "../../.git/index"] {
        if std::path::Path::new(p).exists() {
            println!("cargo:rerun-if-changed={p}");
        }
    }
}
