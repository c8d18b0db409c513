//! `ferrovol demo` runs the whole walkthrough on this machine, and says
//! clearly that it needs root when it cannot mount.

use crate::common;

use std::process::Command;

#[test]
fn the_walkthrough_completes_and_cleans_up() {
    let out = Command::new(common::BIN).arg("demo").output().expect("running ferrovol demo");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    for line in [
        "restored ibdata1 holds the same bytes: true",
        "cloned ibdata1 holds the same bytes: true",
        "without unmounting",
        "2 members, frozen together",
        "changed range(s)",
        "everything cleaned up.",
        "Demo complete.",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
    // Nothing of the demo stays attached or mounted.
    let loops = ferrovol_host::loopdev::list().unwrap();
    assert!(
        !loops.iter().any(|l| l.backing.to_string_lossy().contains("ferrovol-demo-")),
        "{loops:?}"
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains("ferrovol-demo-"), "a demo mount was left behind");
}

#[test]
fn without_root_it_says_so() {
    let out = Command::new("setpriv")
        .args(["--bounding-set", "-sys_admin", "--inh-caps", "-sys_admin", common::BIN, "demo"])
        .output()
        .expect("running ferrovol demo under setpriv");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs root"), "{err}");
}
