//! Faults produced for real: a pool that fills up, a pool that turns
//! read-only or vanishes, loop devices that cannot be had. Each must give the
//! caller a clear error, leave nothing half made, and keep the driver serving.

use crate::common;

use std::io::Write;
use std::path::Path;

use common::req::{self, new_volume, publish_req, stage_req, unpublish_req, unstage_req, MIB};
use common::{DriverBuilder, Kubelet, PoolFs, TestPool};
use ferrovol_csi as csi;
use ferrovol_csi::controller_client::ControllerClient;
use ferrovol_csi::identity_client::IdentityClient;
use ferrovol_csi::node_client::NodeClient;
use tonic::transport::Channel;
use tonic::Code;

async fn probe(channel: Channel) -> Result<bool, tonic::Status> {
    let r = IdentityClient::new(channel).probe(csi::ProbeRequest {}).await?;
    Ok(r.into_inner().ready == Some(true))
}

fn failure<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> (Code, String) {
    let s = r.expect_err("the call should fail");
    (s.code(), s.message().to_string())
}

/// Nothing is being built or deleted: no file in staging or the trash.
fn assert_nothing_half_made(pool: &TestPool) {
    assert!(pool.files("staging").is_empty(), "staging: {:?}", pool.files("staging"));
    assert!(pool.files("trash").is_empty(), "trash: {:?}", pool.files("trash"));
}

/// Writes `path` until the filesystem has no block left; answers how many
/// bytes went in.
fn fill(path: &Path) -> u64 {
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap();
    let chunk = vec![0x5au8; 1 << 20];
    let mut written = 0u64;
    for size in [1 << 20, 4096] {
        while f.write_all(&chunk[..size]).and_then(|()| f.sync_data()).is_ok() {
            written += size as u64;
        }
    }
    written
}

fn volume_size(pool: &TestPool, id: &str) -> u64 {
    std::fs::metadata(pool.volume_file(id)).unwrap().len()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_pool_refuses_copies_deletes_still_work_and_names_survive() {
    let pool = TestPool::with_size(PoolFs::Ext4Image, 512 * MIB as u64).await;
    let root = tempfile::tempdir().unwrap();
    let mut driver = DriverBuilder::new(root.path()).pool(&pool).start();
    let mut c = ControllerClient::new(driver.channel().await);
    let cap = req::mount_cap("ext4");

    // Two volumes with 200 MiB of data each leave too little for a copy of
    // either: this pool cannot share blocks.
    let a = new_volume(&mut c, "a", 220 * MIB, cap.clone()).await;
    let b = new_volume(&mut c, "b", 220 * MIB, cap.clone()).await;
    common::write_pattern(&pool.volume_file(&a), 0, 200 << 20, 1);
    common::write_pattern(&pool.volume_file(&b), 0, 200 << 20, 2);

    let (code, msg) = failure(c.create_volume(req::from_volume("clone", &a, 220 * MIB)).await);
    assert_eq!(code, Code::ResourceExhausted, "clone: {msg}");
    assert!(msg.contains("free"), "the message says why: {msg}");
    // The snapshot passes the up-front check (it needs only the data) and
    // runs out of space in the middle of the copy.
    let (code, msg) = failure(c.create_snapshot(req::snapshot("snap", &a)).await);
    assert_eq!(code, Code::ResourceExhausted, "snapshot: {msg}");
    assert!(msg.contains("No space left"), "the message says why: {msg}");
    let (code, _) = failure(c.create_volume(req::create("big", 300 * MIB)).await);
    assert_eq!(code, Code::ResourceExhausted, "a volume bigger than the free space");
    assert_nothing_half_made(&pool);
    assert!(pool.files("snapshots").is_empty());
    assert!(probe(driver.channel().await).await.unwrap(), "a full pool is still a live driver");

    // Now to the last block, by something else on the pool's filesystem.
    let filler = pool.dir.join("filler");
    fill(&filler);
    assert_eq!(pool.free(), 0);
    let cap_resp = c.get_capacity(csi::GetCapacityRequest::default()).await.unwrap();
    assert_eq!(cap_resp.into_inner().available_capacity, 0);
    let (code, _) = failure(c.create_volume(req::create("tiny", 4096)).await);
    assert_eq!(code, Code::ResourceExhausted);
    assert!(probe(driver.channel().await).await.unwrap(), "full, but alive and serving");
    // Deleting is what frees space, so it must work on a full pool: the
    // journal commits into the space it holds in reserve.
    c.delete_volume(req::delete(&b)).await.unwrap();
    assert!(!pool.volume_file(&b).exists());
    std::fs::remove_file(&filler).unwrap();

    // With room again the very same requests go through: the failures
    // burnt neither name, and the journal rebuilt its reserve.
    let clone = c
        .create_volume(req::from_volume("clone", &a, 220 * MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(
        common::read_at(&pool.volume_file(&clone.volume_id), 150 << 20, 1 << 20),
        common::read_at(&pool.volume_file(&a), 150 << 20, 1 << 20)
    );
    c.delete_volume(req::delete(&clone.volume_id)).await.unwrap();
    let snap = c.create_snapshot(req::snapshot("snap", &a)).await.unwrap().into_inner();
    assert!(snap.snapshot.unwrap().ready_to_use);
    let reserve = pool.dir.join("journal.reserve");
    assert_eq!(std::fs::metadata(&reserve).map(|m| m.len()).ok(), Some(16 << 20), "reserve");
    let listed = c.list_volumes(csi::ListVolumesRequest::default()).await.unwrap().into_inner();
    assert_eq!(listed.entries.len(), 1, "only `a` is left");

    drop(c);
    assert!(driver.terminate().success());
    let (clean, report) = common::pool_check(&pool, false);
    assert!(clean, "{report}");
}

#[tokio::test(flavor = "multi_thread")]
async fn writes_into_a_full_pool_fail_in_the_pod_and_the_node_keeps_working() {
    let e = common::env_on(TestPool::with_size(PoolFs::Ext4Image, 512 * MIB as u64).await);
    let (mut c, mut n) = e.clients().await;
    let cap = req::mount_cap("ext4");
    let thin = new_volume(&mut c, "thin", 256 * MIB, cap.clone()).await;
    let mut thick_req = req::create("thick", 32 * MIB);
    thick_req.parameters.insert("provisioning".into(), "thick".into());
    thick_req.volume_capabilities = vec![cap.clone()];
    let thick = c.create_volume(thick_req).await.unwrap().into_inner().volume.unwrap().volume_id;

    let mut mounted = Vec::new();
    for id in [&thin, &thick] {
        let staging = e.kubelet.staging(id);
        let target = e.kubelet.target("pod", id);
        n.node_stage_volume(stage_req(id, &staging, cap.clone())).await.unwrap();
        n.node_publish_volume(publish_req(id, &staging, &target, cap.clone(), false))
            .await
            .unwrap();
        mounted.push((id.clone(), staging, target));
    }
    let filler = e.pool.dir.join("filler");
    fill(&filler);

    // The pod writes into its thin volume's holes: the pool has no block
    // for them, so the write (at the latest its fsync) fails.
    let pod_file = mounted[0].2.join("data");
    let written = std::fs::File::create(&pod_file).and_then(|mut f| {
        for _ in 0..64 {
            f.write_all(&[7u8; 1 << 20])?;
        }
        f.sync_all()
    });
    assert!(written.is_err(), "writing 64 MiB into a full pool succeeded");

    let stats = |id: &str, path: &Path| csi::NodeGetVolumeStatsRequest {
        volume_id: id.into(),
        volume_path: path.display().to_string(),
        ..Default::default()
    };
    let s = n.node_get_volume_stats(stats(&thin, &mounted[0].2)).await.unwrap().into_inner();
    let cond = s.volume_condition.unwrap();
    assert!(cond.abnormal && cond.message.contains("full"), "{cond:?}");
    let s = n.node_get_volume_stats(stats(&thick, &mounted[1].2)).await.unwrap().into_inner();
    assert!(!s.volume_condition.unwrap().abnormal, "a thick volume has its blocks");

    // Growing needs blocks the pool does not have: for the thick volume the
    // new range itself, for the thin one the filesystem's new metadata.
    for (id, _, target) in &mounted {
        let before = volume_size(&e.pool, id);
        let grow = csi::NodeExpandVolumeRequest {
            volume_id: id.clone(),
            volume_path: target.display().to_string(),
            capacity_range: req::range(300 * MIB, 0),
            ..Default::default()
        };
        let (code, msg) = failure(n.node_expand_volume(grow).await);
        assert_eq!(code, Code::ResourceExhausted, "{msg}");
        assert_eq!(volume_size(&e.pool, id), before, "the file did not change");
    }

    // A snapshot of the mounted thin volume (its pod's failed writes still
    // dirty) cannot be flushed into a full pool: RESOURCE_EXHAUSTED, not
    // FAILED_PRECONDITION "cannot freeze … Input/output error".
    let snap = c.create_snapshot(req::snapshot("snap-full", &thin)).await;
    if let Err(s) = snap {
        assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
        assert!(s.message().contains("is full"), "{s:?}");
    }
    assert!(e.pool.files("snapshots").len() <= 1, "no half-made snapshot");

    assert!(probe(e.driver.channel().await).await.unwrap());
    // Taking the volumes down still works, and nothing is left behind.
    for (id, staging, target) in &mounted {
        n.node_unpublish_volume(unpublish_req(id, target)).await.unwrap();
        n.node_unstage_volume(unstage_req(id, staging)).await.unwrap();
    }
    e.kubelet.assert_clean();
    std::fs::remove_file(&filler).unwrap();
    let s = c.validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
        volume_id: thin.clone(),
        volume_capabilities: vec![cap],
        ..Default::default()
    });
    assert!(s.await.unwrap().into_inner().confirmed.is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_read_only_pool_is_not_ready_and_creates_nothing() {
    let pool = TestPool::new(PoolFs::Xfs).await;
    let root = tempfile::tempdir().unwrap();
    let driver = DriverBuilder::new(root.path()).pool(&pool).start();
    let mut c = ControllerClient::new(driver.channel().await);
    let v = new_volume(&mut c, "v", MIB, req::mount_cap("ext4")).await;
    {
        let _ro = common::ReadOnly::new(&pool.dir);
        let err = probe(driver.channel().await).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition);
        assert!(err.message().contains("not writable"), "{}", err.message());
        let (code, msg) = failure(c.create_volume(req::create("w", MIB)).await);
        assert_eq!(code, Code::Unavailable, "{msg}");
        assert!(msg.contains("Read-only"), "{msg}");
        let (code, msg) = failure(c.delete_volume(req::delete(&v)).await);
        assert_eq!(code, Code::Unavailable, "{msg}");
        assert!(pool.volume_file(&v).exists(), "a refused delete keeps the volume");
    }
    assert!(probe(driver.channel().await).await.unwrap(), "writable again: ready again");
    new_volume(&mut c, "w", MIB, req::mount_cap("ext4")).await;
    c.delete_volume(req::delete(&v)).await.unwrap();
    assert_nothing_half_made(&pool);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_vanished_pool_is_never_mistaken_for_an_empty_one() {
    let pool = TestPool::new(PoolFs::Xfs).await;
    let root = tempfile::tempdir().unwrap();
    let mut driver = DriverBuilder::new(root.path()).pool(&pool).start();
    let mut c = ControllerClient::new(driver.channel().await);
    let v = new_volume(&mut c, "v", MIB, req::mount_cap("ext4")).await;

    // The pool's filesystem is unmounted under the driver; the same path is
    // now an empty directory on the host's filesystem.
    rustix::mount::unmount(&pool.dir, rustix::mount::UnmountFlags::DETACH).unwrap();
    let err = probe(driver.channel().await).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("no longer the directory"), "{}", err.message());
    // A delete must not see "file missing, already deleted" and forget it.
    let (code, msg) = failure(c.delete_volume(req::delete(&v)).await);
    assert_eq!(code, Code::Unavailable, "{msg}");
    let (code, _) = failure(c.create_volume(req::create("w", MIB)).await);
    assert_eq!(code, Code::Unavailable);
    assert!(std::fs::read_dir(&pool.dir).unwrap().next().is_none(), "nothing written there");
    drop(c);
    driver.kill();
}

#[tokio::test(flavor = "multi_thread")]
async fn no_loop_device_to_be_had_is_a_clear_error_and_leaks_nothing() {
    let pool = TestPool::new(PoolFs::Ext4).await;
    let kubelet = Kubelet::new(&pool);
    let root = tempfile::tempdir().unwrap();
    // The driver runs in a mount namespace of its own whose loop-control
    // is /dev/null: the kernel hands it no loop device.
    let script =
        "mount --make-rprivate / && mount --bind /dev/null /dev/loop-control && exec \"$@\"";
    let driver = DriverBuilder::new(root.path())
        .pool(&pool)
        .kubelet(&kubelet)
        .wrapped_in(["unshare", "--mount", "sh", "-c", script, "sh"])
        .start();
    let (mut c, mut n) = {
        let ch = driver.channel().await;
        (ControllerClient::new(ch.clone()), NodeClient::new(ch))
    };
    let cap = req::mount_cap("ext4");
    let id = new_volume(&mut c, "v", 64 * MIB, cap.clone()).await;
    let staging = kubelet.staging("pv");
    let (code, msg) = failure(n.node_stage_volume(stage_req(&id, &staging, cap)).await);
    assert_eq!(code, Code::ResourceExhausted, "{msg}");
    assert!(msg.contains("loop device"), "{msg}");
    let err = probe(driver.channel().await).await.unwrap_err();
    assert!(err.message().contains("loop"), "{}", err.message());
    kubelet.assert_clean();
    assert!(!common::is_mounted(&staging));
    c.delete_volume(req::delete(&id)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pool_disk_that_stops_taking_writes_is_not_ready() {
    let pool = TestPool::new(PoolFs::Xfs).await;
    let root = tempfile::tempdir().unwrap();
    let mut driver = DriverBuilder::new(root.path()).pool(&pool).start();
    assert!(probe(driver.channel().await).await.unwrap());

    // XFS's own forced shutdown: every later write fails with EIO, as on a
    // disk that died under the filesystem.
    let out = std::process::Command::new("xfs_io")
        .args(["-x", "-c", "shutdown"])
        .arg(&pool.dir)
        .output()
        .expect("running xfs_io");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // The background write notices within its interval; Probe then fails.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let err = loop {
        match probe(driver.channel().await).await {
            Err(e) => break e,
            Ok(_) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await
            }
            Ok(_) => panic!("Probe still ready 20 s after the pool's disk failed"),
        }
    };
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("not healthy"), "{}", err.message());
    let mut c = ControllerClient::new(driver.channel().await);
    let (code, msg) = failure(c.create_volume(req::create("after", MIB)).await);
    assert!(matches!(code, Code::Internal | Code::Unavailable), "{code:?} {msg}");
    drop(c);
    driver.kill();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_mkfs_names_its_package_and_leaks_nothing() {
    let pool = TestPool::new(PoolFs::Ext4).await;
    let kubelet = Kubelet::new(&pool);
    let root = tempfile::tempdir().unwrap();
    // A PATH with blkid (to see the device is blank) and no mkfs.xfs.
    let bin = root.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let blkid = ["/usr/sbin/blkid", "/sbin/blkid", "/usr/bin/blkid"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("blkid is installed");
    std::os::unix::fs::symlink(blkid, bin.join("blkid")).unwrap();
    let driver = DriverBuilder::new(root.path())
        .pool(&pool)
        .kubelet(&kubelet)
        .env("PATH", bin.to_str().unwrap())
        .start();
    let ch = driver.channel().await;
    let (mut c, mut n) = (ControllerClient::new(ch.clone()), NodeClient::new(ch));
    let cap = req::mount_cap("xfs");
    let id = new_volume(&mut c, "v", 320 * MIB, cap.clone()).await;
    let staging = kubelet.staging("pv");
    let (code, msg) = failure(n.node_stage_volume(stage_req(&id, &staging, cap)).await);
    assert_eq!(code, Code::FailedPrecondition, "{msg}");
    assert!(msg.contains("mkfs.xfs") && msg.contains("xfsprogs"), "{msg}");
    kubelet.assert_clean();
    c.delete_volume(req::delete(&id)).await.unwrap();
}

/// A volume whose file vanished behind the driver's back: stage, snapshot,
/// clone and a restore from a snapshot whose file vanished answer
/// FAILED_PRECONDITION with the condition, and leave nothing behind.
#[tokio::test(flavor = "multi_thread")]
async fn a_missing_backing_file_is_a_precondition() {
    let e = common::env(PoolFs::Ext4).await;
    let (mut c, mut n) = e.clients().await;
    let cap = req::mount_cap("ext4");
    let v = req::new_volume(&mut c, "vanishing", 16 * MIB, cap.clone()).await;
    let s = c.create_snapshot(req::snapshot("of-vanishing", &v)).await.unwrap().into_inner();
    let s = s.snapshot.unwrap().snapshot_id;
    std::fs::remove_file(e.pool.volume_file(&v)).unwrap();
    std::fs::remove_file(e.pool.snapshot_file(&s)).unwrap();

    let staging = e.kubelet.staging("vanishing");
    let stage = n.node_stage_volume(req::stage_req(&v, &staging, cap.clone())).await.unwrap_err();
    let snap = c.create_snapshot(req::snapshot("again", &v)).await.unwrap_err();
    let clone = c.create_volume(req::from_volume("clone", &v, 16 * MIB)).await.unwrap_err();
    let restore = c.create_volume(req::from_snapshot("restore", &s, 16 * MIB)).await.unwrap_err();
    for (what, err) in
        [("stage", stage), ("snapshot", snap), ("clone", clone), ("restore", restore)]
    {
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{what}: {err:?}");
        assert!(err.message().contains("missing"), "{what}: {err:?}");
    }
    assert!(e.pool.files("staging").is_empty(), "nothing half-made");
    assert_eq!(e.pool.files("snapshots").len(), 0);
    e.kubelet.assert_clean();
}
