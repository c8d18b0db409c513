//! Start-up knows its own pool: an unmounted pool, a lost, emptied or
//! garbled journal, and `pool check` creating nothing — against the real
//! binary on real loop-mounted pools.

use crate::common;

use std::process::Command;

use common::req::{self, MIB};
use common::{DriverBuilder, PoolFs, TestPool};
use ferrovol_csi::controller_client::ControllerClient;

/// Starts a driver expected to refuse: (exit code, everything it logged).
/// One that serves instead fails the test (and is killed) rather than
/// hanging it.
fn refused(builder: DriverBuilder) -> (Option<i32>, String) {
    let mut d = builder.spawn();
    if d.wait_for_log("ferrovol failed").is_none() {
        let logs = d.logs();
        d.kill();
        panic!("the driver did not refuse to start: {logs}");
    }
    let status = d.wait();
    (status.code(), d.logs())
}

async fn make_volume(root: &std::path::Path, pool: &TestPool) -> String {
    let mut d = DriverBuilder::new(root).pool(pool).start();
    let mut c = ControllerClient::new(d.channel().await);
    let v = c.create_volume(req::create("kept", 16 * MIB)).await.unwrap().into_inner();
    assert!(d.terminate().success());
    v.volume.unwrap().volume_id
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unmounted_pool_is_refused_not_replaced() {
    let pool = TestPool::new(PoolFs::Xfs).await;
    let root = tempfile::tempdir().unwrap();
    let id = make_volume(root.path(), &pool).await;

    // A node-mode process that served the pool before (it recorded its
    // identity) is held to the same rule, journal or not.
    let node_root = tempfile::tempdir().unwrap();
    let node = || DriverBuilder::new(node_root.path()).pool(&pool).args(["--mode", "node"]);
    drop(node().start());

    pool.unmount();
    let (code, logs) = refused(DriverBuilder::new(root.path()).pool(&pool));
    let (node_code, node_logs) = refused(node());
    let mountpoint_after: Vec<_> = std::fs::read_dir(&pool.dir).unwrap().collect();
    pool.remount();
    assert_ne!(code, Some(0), "a driver must not serve an empty mount point: {logs}");
    assert!(logs.contains("not mounted"), "{logs}");
    assert_ne!(node_code, Some(0), "nor a node-mode one: {node_logs}");
    assert!(node_logs.contains("not mounted"), "{node_logs}");
    assert!(
        mountpoint_after.is_empty(),
        "nothing was created on the host's disk: {mountpoint_after:?}"
    );

    // Mounted again, the same pool is served, its volume intact.
    let d = DriverBuilder::new(root.path()).pool(&pool).start();
    let mut c = ControllerClient::new(d.channel().await);
    let listed =
        c.list_volumes(ferrovol_csi::ListVolumesRequest::default()).await.unwrap().into_inner();
    let ids: Vec<_> =
        listed.entries.iter().map(|e| e.volume.as_ref().unwrap().volume_id.clone()).collect();
    assert_eq!(ids, [id]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_or_emptied_journal_is_refused() {
    let pool = TestPool::new(PoolFs::Ext4).await;
    let root = tempfile::tempdir().unwrap();
    make_volume(root.path(), &pool).await;
    let journal = pool.dir.join("journal.redb");
    let saved = std::fs::read(&journal).unwrap();

    for (what, damage) in [("deleted", None), ("emptied", Some(Vec::new()))] {
        match &damage {
            None => std::fs::remove_file(&journal).unwrap(),
            Some(bytes) => std::fs::write(&journal, bytes).unwrap(),
        }
        let (code, logs) = refused(DriverBuilder::new(root.path()).pool(&pool));
        assert_ne!(code, Some(0), "journal {what}: {logs}");
        assert!(logs.contains("is missing or empty") && logs.contains("restore"), "{what}: {logs}");
        // pool check says the same (it said "no ferrovol pool").
        let (clean, said) = common::pool_check(&pool, false);
        assert!(!clean && said.contains("holds 1 volume"), "{what}: {said}");
        std::fs::write(&journal, &saved).unwrap();
    }
    // Another pool's journal with no records beside files: refused too
    // (it names its own pool).
    let other = tempfile::tempdir().unwrap();
    let blank = TestPool::new(PoolFs::Ext4).await;
    DriverBuilder::new(other.path()).pool(&blank).start().terminate();
    std::fs::copy(blank.dir.join("journal.redb"), &journal).unwrap();
    let (code, logs) = refused(DriverBuilder::new(root.path()).pool(&pool));
    assert_ne!(code, Some(0), "{logs}");
    assert!(logs.contains("belongs to pool"), "{logs}");
    std::fs::write(&journal, &saved).unwrap();
    DriverBuilder::new(root.path()).pool(&pool).start().terminate();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_garbled_journal_is_a_clear_error_not_a_panic() {
    let pool = TestPool::new(PoolFs::Ext4).await;
    let root = tempfile::tempdir().unwrap();
    {
        let mut d = DriverBuilder::new(root.path()).pool(&pool).start();
        let mut c = ControllerClient::new(d.channel().await);
        for i in 0..200 {
            c.create_volume(req::create(&format!("v{i}"), MIB)).await.unwrap();
        }
        assert!(d.terminate().success());
    }
    // Everything after the header garbled: what made redb panic with
    // "entered unreachable code" inside the store.
    let journal = pool.dir.join("journal.redb");
    let mut bytes = std::fs::read(&journal).unwrap();
    for b in &mut bytes[4096..] {
        *b = 0xA5;
    }
    std::fs::write(&journal, &bytes).unwrap();

    let (code, logs) = refused(DriverBuilder::new(root.path()).pool(&pool));
    assert!(code != Some(0) && code != Some(101), "exit {code:?}: {logs}");
    assert!(logs.contains("is corrupt") && logs.contains("backup"), "{logs}");
    // The clean refusal only: no Rust panic or backtrace printed first.
    assert!(!logs.contains("panicked at") && !logs.contains("backtrace"), "{logs}");
    let check = Command::new(common::BIN)
        .args(["pool", "check", "--pool-dir"])
        .arg(&pool.dir)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&check.stderr);
    assert!(check.status.code() == Some(1), "pool check exit {:?}: {said}", check.status.code());
    assert!(said.contains("is corrupt"), "{said}");
    assert!(!said.contains("panicked at"), "{said}");
}

#[tokio::test(flavor = "multi_thread")]
async fn pool_check_creates_nothing_and_reports_short_files() {
    let root = tempfile::tempdir().unwrap();
    let nowhere = root.path().join("nonexistent");
    let check = |args: &[&std::ffi::OsStr]| {
        Command::new(common::BIN).args(["pool", "check"]).args(args).output().unwrap()
    };
    let o = check(&["--state-dir".as_ref(), nowhere.as_os_str()]);
    let said = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{said}");
    assert!(said.contains("no ferrovol pool"), "{said}");
    assert!(!nowhere.exists(), "pool check created {}", nowhere.display());

    let pool = TestPool::new(PoolFs::Ext4).await;
    let id = make_volume(root.path(), &pool).await;
    let before: Vec<_> = std::fs::read_dir(&pool.dir).unwrap().map(|e| e.unwrap().path()).collect();
    let (clean, _) = common::pool_check(&pool, false);
    assert!(clean);
    std::fs::OpenOptions::new()
        .write(true)
        .open(pool.volume_file(&id))
        .unwrap()
        .set_len(MIB as u64)
        .unwrap();
    let (clean, said) = common::pool_check(&pool, false);
    assert!(!clean && said.contains("smaller than their capacity") && said.contains(&id), "{said}");
    let mut after: Vec<_> =
        std::fs::read_dir(&pool.dir).unwrap().map(|e| e.unwrap().path()).collect();
    let mut before = before;
    before.sort();
    after.sort();
    assert_eq!(before, after, "pool check made or removed files");
}

/// `pool seed` (what `ferrovol bench --only startup` fills pools with)
/// leaves exactly what CreateVolume would: the driver serves every seeded
/// volume, `pool check` finds the pool clean, and they delete normally.
#[tokio::test(flavor = "multi_thread")]
async fn seeded_volumes_are_ordinary_volumes() {
    let pool = TestPool::new(PoolFs::Xfs).await;
    let seeded = Command::new(common::BIN)
        .args(["pool", "seed", "--volumes", "300", "--dir"])
        .arg(&pool.dir)
        .output()
        .unwrap();
    assert!(seeded.status.success(), "{}", String::from_utf8_lossy(&seeded.stderr));
    let check = Command::new(common::BIN)
        .args(["pool", "check", "--pool-dir"])
        .arg(&pool.dir)
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stdout));

    let root = tempfile::tempdir().unwrap();
    let d = DriverBuilder::new(root.path()).pool(&pool).start();
    let mut c = ControllerClient::new(d.channel().await);
    let list = c.list_volumes(ferrovol_csi::ListVolumesRequest::default()).await.unwrap();
    let ids: Vec<String> =
        list.into_inner().entries.into_iter().map(|e| e.volume.unwrap().volume_id).collect();
    assert_eq!(ids.len(), 300);
    assert_eq!(pool.files("volumes").len(), 300);
    for id in ids {
        c.delete_volume(req::delete(&id)).await.unwrap();
    }
    assert!(pool.files("volumes").is_empty());
}

/// A journal copied from another pool (as "restore it from a backup"
/// invites): refused at start and by `pool check`, naming both pools;
/// before, it started with a warning, made empty files for the foreign
/// volumes and left this pool's own files orphaned.
#[tokio::test(flavor = "multi_thread")]
async fn a_journal_from_another_pool_is_refused() {
    let (a, b) = (TestPool::new(PoolFs::Ext4).await, TestPool::new(PoolFs::Ext4).await);
    let (root_a, root_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    make_volume(root_a.path(), &a).await;
    let ours = make_volume(root_b.path(), &b).await;
    let id_of = |p: &TestPool| {
        let text = std::fs::read_to_string(p.dir.join(".ferrovol-pool")).unwrap();
        text.split_whitespace().last().unwrap().to_string()
    };
    let (id_a, id_b) = (id_of(&a), id_of(&b));
    let journal = b.dir.join("journal.redb");
    let saved = std::fs::read(&journal).unwrap();
    let files_before = b.files("volumes");
    std::fs::copy(a.dir.join("journal.redb"), &journal).unwrap();

    let (code, logs) = refused(DriverBuilder::new(root_b.path()).pool(&b));
    assert_ne!(code, Some(0), "{logs}");
    assert!(logs.contains(&format!("belongs to pool {id_a}")), "{logs}");
    assert!(logs.contains(&format!("is pool {id_b}")), "{logs}");
    for repair in [false, true] {
        let (clean, said) = common::pool_check(&b, repair);
        assert!(!clean && said.contains(&format!("belongs to pool {id_a}")), "{said}");
    }
    assert_eq!(b.files("volumes"), files_before, "nothing made, nothing orphaned");

    std::fs::write(&journal, &saved).unwrap();
    let d = DriverBuilder::new(root_b.path()).pool(&b).start();
    let mut c = ControllerClient::new(d.channel().await);
    let listed =
        c.list_volumes(ferrovol_csi::ListVolumesRequest::default()).await.unwrap().into_inner();
    assert_eq!(listed.entries.len(), 1);
    assert_eq!(listed.entries[0].volume.as_ref().unwrap().volume_id, ours);
}

/// A listing of a large pool answers in pages that every gRPC client can
/// receive (grpc-go's default is 4 MiB): "no limit" and limits past a
/// page get one page and a next_token, paging covers every volume once,
/// and repeated full listings leave the driver's memory where it was
/// (one unbounded reply was 19.7 MB for 100,000 volumes and added about
/// 220 MiB of RSS a call).
#[tokio::test(flavor = "multi_thread")]
async fn listings_of_a_large_pool_come_in_bounded_pages() {
    use prost::Message;
    const N: usize = 20_000;
    let pool = TestPool::new(PoolFs::Xfs).await;
    let seeded = Command::new(common::BIN)
        .args(["pool", "seed", "--volumes", &N.to_string(), "--dir"])
        .arg(&pool.dir)
        .output()
        .unwrap();
    assert!(seeded.status.success(), "{}", String::from_utf8_lossy(&seeded.stderr));
    let root = tempfile::tempdir().unwrap();
    let d = DriverBuilder::new(root.path()).pool(&pool).start();
    let mut c = ControllerClient::new(d.channel().await);
    let rss = || {
        let status = std::fs::read_to_string(format!("/proc/{}/status", d.pid())).unwrap();
        let kb = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap();
        kb.trim().trim_end_matches(" kB").trim().parse::<u64>().unwrap() << 10
    };
    let mut all = std::collections::HashSet::new();
    let mut after_first = 0;
    for round in 0..3 {
        for max_entries in [0, 1_000_000] {
            let (mut token, mut seen) = (String::new(), 0usize);
            loop {
                let r = ferrovol_csi::ListVolumesRequest { max_entries, starting_token: token };
                let page = c.list_volumes(r).await.unwrap().into_inner();
                assert!(page.encoded_len() < 4 << 20, "a page of {} bytes", page.encoded_len());
                assert!(page.entries.len() <= 4096, "{} entries", page.entries.len());
                seen += page.entries.len();
                if round == 0 {
                    all.extend(page.entries.into_iter().map(|e| e.volume.unwrap().volume_id));
                }
                if page.next_token.is_empty() {
                    break;
                }
                token = page.next_token;
            }
            assert_eq!(seen, N, "every volume once");
        }
        if round == 0 {
            after_first = rss();
        }
    }
    assert_eq!(all.len(), N);
    let growth = rss().saturating_sub(after_first);
    assert!(growth < 64 << 20, "RSS grew {} MiB over two more full listings", growth >> 20);
}
