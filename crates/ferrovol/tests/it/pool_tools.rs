//! `ferrovol pool init` and `pool release` as an operator runs them: real
//! images, loop devices and mounts, through the binary.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn pool(args: &[&str]) -> Output {
    Command::new(common::BIN).arg("pool").args(args).output().expect("running ferrovol pool")
}

fn said(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn mounted_at(dir: &Path) -> bool {
    let mounts = ferrovol_host::node::mountinfo::read().unwrap();
    ferrovol_host::node::mountinfo::at(&mounts, &std::fs::canonicalize(dir).unwrap()).is_some()
}

fn loops_of(image: &Path) -> usize {
    let image = std::fs::canonicalize(image).unwrap_or_else(|_| image.to_path_buf());
    ferrovol_host::loopdev::find(&image).unwrap().len()
}

/// Whatever a failed test left mounted or attached goes.
struct Cleanup(PathBuf, PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = rustix::mount::unmount(&self.0, rustix::mount::UnmountFlags::DETACH);
        let image = std::fs::canonicalize(&self.1).unwrap_or_else(|_| self.1.clone());
        for l in ferrovol_host::loopdev::list().unwrap_or_default() {
            if l.backing.starts_with(&self.0) || l.backing == image {
                let _ = ferrovol_host::loopdev::detach(&l.device);
            }
        }
    }
}

#[test]
fn init_is_idempotent_and_release_refuses_while_attached() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("pool");
    let image = root.path().join("pool.img");
    let _cleanup = Cleanup(dir.clone(), image.clone());
    let (d, i) = (dir.to_str().unwrap(), image.to_str().unwrap());
    let init = |size: &str| pool(&["init", "--dir", d, "--image", i, "--size", size]);

    let first = init("600M");
    assert!(first.status.success(), "{}", said(&first));
    assert!(said(&first).contains("pool ready"), "{}", said(&first));
    assert!(mounted_at(&dir) && loops_of(&image) == 1);

    // The same again: said, exit 0, nothing new attached.
    let again = init("600M");
    assert!(again.status.success(), "{}", said(&again));
    assert!(said(&again).contains("already set up"), "{}", said(&again));
    assert_eq!(loops_of(&image), 1);
    // Other arguments under the same names: refused, nothing changed.
    let other = init("700M");
    assert_eq!(other.status.code(), Some(1), "{}", said(&other));
    assert!(said(&other).contains("a different pool"), "{}", said(&other));
    let other_fs = pool(&["init", "--dir", d, "--image", i, "--size", "600M", "--fs", "btrfs"]);
    assert!(said(&other_fs).contains("not btrfs"), "{}", said(&other_fs));
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 600 << 20);

    // A volume of the pool attached: release refuses and names it.
    let volume = dir.join("vol-attached");
    std::fs::write(&volume, vec![0u8; 1 << 20]).unwrap();
    let device = ferrovol_host::loopdev::attach(&volume, false, 0).unwrap();
    let busy = pool(&["release", "--dir", d]);
    assert_eq!(busy.status.code(), Some(1), "{}", said(&busy));
    assert!(said(&busy).contains(&device.display().to_string()), "{}", said(&busy));
    assert!(mounted_at(&dir), "a refused release leaves the pool mounted");
    ferrovol_host::loopdev::detach(&device).unwrap();

    let released = pool(&["release", "--dir", d]);
    assert!(released.status.success(), "{}", said(&released));
    assert!(!mounted_at(&dir) && loops_of(&image) == 0, "unmounted and detached");
    assert!(image.exists(), "the image and its data stay");
    let nothing = pool(&["release", "--dir", d]);
    assert!(said(&nothing).contains("no pool is mounted"), "{}", said(&nothing));

    // After a reboot without the fstab line: init mounts it again, data
    // intact.
    let back = init("600M");
    assert!(back.status.success(), "{}", said(&back));
    assert!(said(&back).contains("mounted again"), "{}", said(&back));
    assert_eq!(std::fs::metadata(&volume).unwrap().len(), 1 << 20);
    assert!(pool(&["release", "--dir", d]).status.success());
}

#[test]
fn init_checks_the_hosts_free_space() {
    let root = tempfile::tempdir().unwrap();
    let st = rustix::fs::statvfs(root.path()).unwrap();
    let free = st.f_bavail * st.f_frsize;
    let more = format!("{}", free + (1 << 30));
    let dir = root.path().join("pool");
    let image = root.path().join("pool.img");
    let _cleanup = Cleanup(dir.clone(), image.clone());
    let (d, i) = (dir.to_str().unwrap(), image.to_str().unwrap());

    // Preallocated: refused up front, nothing made.
    let thick = pool(&["init", "--dir", d, "--image", i, "--size", &more, "--preallocate"]);
    assert_eq!(thick.status.code(), Some(1), "{}", said(&thick));
    assert!(said(&thick).contains("free, less than the pool's"), "{}", said(&thick));
    assert!(!image.exists());

    // Sparse: made, with a warning that it can fill the host.
    let sparse = pool(&["init", "--dir", d, "--image", i, "--size", &more]);
    assert!(sparse.status.success(), "{}", said(&sparse));
    assert!(said(&sparse).contains("can fill the host's disk"), "{}", said(&sparse));
    assert!(pool(&["release", "--dir", d]).status.success());
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

/// The pool holds every volume's data: `pool init` makes its image and
/// directory root's alone, a driver's first start makes the journal, the
/// identity records and every directory the same (they were 0644/0755:
/// every local user could read every volume through the image), and `pool
/// check` reports looser modes (an old pool, a hand-made copy) until a
/// repair tightens them.
#[tokio::test(flavor = "multi_thread")]
async fn the_pool_is_root_s_alone_and_check_says_when_it_is_not() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("pool");
    let image = root.path().join("pool.img");
    let _cleanup = Cleanup(dir.clone(), image.clone());
    let (d, i) = (dir.to_str().unwrap(), image.to_str().unwrap());
    let made = pool(&["init", "--dir", d, "--image", i, "--size", "600M"]);
    assert!(made.status.success(), "{}", said(&made));
    assert_eq!(mode(&image), 0o600, "the image");
    assert_eq!(mode(&dir), 0o700, "the pool's root");

    // The driver's own state dir is <its root>/state.
    let state = root.path().join("driver").join("state");
    let driver = common::DriverBuilder::new(&root.path().join("driver"))
        .args(["--pool-dir", d, "--mode", "controller"])
        .start();
    drop(driver);
    for f in [dir.join("journal.redb"), dir.join(".ferrovol-pool"), state.join("pool-id")] {
        assert_eq!(mode(&f), 0o600, "{}", f.display());
    }
    for sub in ["volumes", "snapshots", "staging", "trash"] {
        assert_eq!(mode(&dir.join(sub)), 0o700, "{sub}");
    }
    assert_eq!(mode(&state), 0o700, "the state dir");

    let check = |repair: bool| {
        let mut args = vec!["check", "--state-dir", state.to_str().unwrap(), "--pool-dir", d];
        if repair {
            args.push("--repair");
        }
        pool(&args)
    };
    assert!(check(false).status.success(), "{}", said(&check(false)));
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.join("journal.redb"), std::fs::Permissions::from_mode(0o644))
        .unwrap();
    std::fs::set_permissions(&image, std::fs::Permissions::from_mode(0o644)).unwrap();
    let loose = check(false);
    assert!(!loose.status.success(), "{}", said(&loose));
    assert!(said(&loose).contains("readable by others"), "{}", said(&loose));
    assert!(said(&loose).contains("journal.redb (0644)"), "{}", said(&loose));
    assert!(said(&loose).contains("pool.img (0644)"), "{}", said(&loose));
    assert_eq!(mode(&image), 0o644, "a check changes nothing");
    assert!(check(true).status.success(), "{}", said(&check(true)));
    assert_eq!((mode(&image), mode(&dir.join("journal.redb"))), (0o600, 0o600));
    assert!(check(false).status.success(), "{}", said(&check(false)));
    assert!(pool(&["release", "--dir", d]).status.success());
}
