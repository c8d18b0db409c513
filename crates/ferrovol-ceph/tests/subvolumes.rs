//! CephFS subvolumes through the manager, against the dev cluster's file
//! system (`scripts/ceph-dev-cluster start DIR --cephfs`, which `.ci/run`
//! starts; `FERROVOL_TEST_CEPH_CONF` names its ceph.conf). Each test works
//! in a subvolume group of its own and leaves none behind. Without the
//! cluster the tests say so and pass, unless `FERROVOL_REQUIRE_CEPH` is set.

use ferrovol_ceph::{Cluster, Connect, NewSubvolume, Subvolumes};

const FS: &str = "ferrovolfs";
const MIB: u64 = 1 << 20;

fn subvolumes(test: &str) -> Option<(Subvolumes, String)> {
    if std::env::var_os("FERROVOL_TEST_CEPH_CONF").is_none() {
        assert!(
            std::env::var_os("FERROVOL_REQUIRE_CEPH").is_none(),
            "FERROVOL_REQUIRE_CEPH is set but FERROVOL_TEST_CEPH_CONF is not"
        );
        eprintln!("{test}: skipped (no Ceph: set FERROVOL_TEST_CEPH_CONF, see .ci/run)");
        return None;
    }
    let group = format!("t-{test}-{}", std::process::id());
    Some((Subvolumes::new(connect(), FS), group))
}

/// Removes the group's subvolumes and snapshots, then the group, and
/// checks nothing is left.
fn clean(s: &Subvolumes, group: &str) {
    for name in s.list(group).unwrap_or_default() {
        for snap in s.snapshots(group, &name).unwrap_or_default() {
            s.remove_snapshot(group, &name, &snap).unwrap();
        }
        s.remove(group, &name, false).unwrap();
    }
    s.remove_group(group).unwrap();
    let e = s.list(group).unwrap_err();
    assert!(e.is(libc::ENOENT), "{e}");
}

#[test]
fn a_subvolume_lives_and_goes_with_its_quota_and_snapshots() {
    let Some((s, group)) = subvolumes("life") else { return };
    s.create_group(&group).unwrap();
    s.create_group(&group).expect("a group that exists is fine");
    let new = NewSubvolume { size: 100 * MIB, mode: Some("0777"), ..Default::default() };
    s.create(&group, "v1", &new).unwrap();

    let info = s.info(&group, "v1").unwrap();
    assert_eq!(info.bytes_quota, Some(100 * MIB), "{info:?}");
    assert_eq!(info.state, "complete");
    assert_eq!(info.data_pool, format!("cephfs.{FS}.data"));
    let path = s.path(&group, "v1").unwrap();
    assert!(path.starts_with(&format!("/volumes/{group}/v1/")), "{path}");
    assert_eq!(path, info.path);
    assert_eq!(s.list(&group).unwrap(), ["v1"]);

    assert_eq!(s.resize(&group, "v1", 200 * MIB, true).unwrap(), 200 * MIB);
    assert_eq!(s.info(&group, "v1").unwrap().bytes_quota, Some(200 * MIB));

    s.snapshot(&group, "v1", "s1").unwrap();
    assert_eq!(s.snapshots(&group, "v1").unwrap(), ["s1"]);
    // A subvolume with snapshots goes only when they may be kept.
    let e = s.remove(&group, "v1", false).unwrap_err();
    assert!(e.is(libc::ENOTEMPTY), "{e}");
    s.remove_snapshot(&group, "v1", "s1").unwrap();
    s.remove_snapshot(&group, "v1", "s1").expect("a missing snapshot is fine");
    s.remove(&group, "v1", false).unwrap();
    s.remove(&group, "v1", false).expect("a missing subvolume is fine");
    clean(&s, &group);
}

#[test]
fn missing_things_are_enoent_and_bad_pools_einval() {
    let Some((s, group)) = subvolumes("missing") else { return };
    s.create_group(&group).unwrap();
    let e = s.info(&group, "nope").unwrap_err();
    assert!(e.is(libc::ENOENT), "{e}");
    let e = s.path("no-such-group", "nope").unwrap_err();
    assert!(e.is(libc::ENOENT), "{e}");
    let bad = NewSubvolume { size: MIB, pool_layout: Some("no-such-pool"), ..Default::default() };
    let e = s.create(&group, "v", &bad).unwrap_err();
    assert!(e.is(libc::EINVAL) || e.is(libc::ENOENT), "{e}");
    let e = Subvolumes::new(connect(), "no-such-fs").list(&group).unwrap_err();
    assert!(e.is(libc::ENOENT), "{e}");
    clean(&s, &group);
}

fn connect() -> Cluster {
    let conf = std::path::PathBuf::from(std::env::var_os("FERROVOL_TEST_CEPH_CONF").unwrap());
    Cluster::connect(&Connect { conf: Some(&conf), op_timeout: 30, ..Default::default() })
        .expect("connecting to the dev cluster")
}
