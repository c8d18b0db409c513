//! Node service against the real kernel: loop devices, mkfs, mounts, bind
//! mounts, online growth, freeze. Every test ends with a leak check, and the
//! `Kubelet` fixture force-cleans on drop even when a test fails.

use crate::common;

use std::io::Write;
use std::path::Path;

use common::req::{self, GIB, MIB};
use common::req::{new_volume, publish_req, stage_req, unpublish_req, unstage_req};
use common::{env, is_mounted, DriverBuilder, Kubelet, PoolFs, TestPool};
use ferrovol_csi as csi;
use ferrovol_csi::controller_client::ControllerClient;
use ferrovol_csi::node_client::NodeClient;
use ferrovol_csi::volume_capability::access_mode::Mode;
use tonic::transport::Channel;
use tonic::Code;

fn fs_of(path: &Path) -> String {
    ferrovol_host::node::mountinfo::read()
        .unwrap()
        .into_iter()
        .rev()
        .find(|m| m.mount_point == path)
        .map(|m| m.fs_type)
        .unwrap_or_default()
}

async fn filesystem_lifecycle(fs_type: &str) {
    let e = env(PoolFs::Ext4).await;
    let (mut c, mut n) = e.clients().await;
    let cap = req::mount_cap(fs_type);
    let id = new_volume(&mut c, "mysql-pvc", 256 * MIB, cap.clone()).await;
    let staging = e.kubelet.staging("pv1");
    let target = e.kubelet.target("pod-a", "pv1");
    let target_ro = e.kubelet.target("pod-b", "pv1");

    n.node_stage_volume(stage_req(&id, &staging, cap.clone())).await.unwrap();
    assert_eq!(fs_of(&staging), if fs_type.is_empty() { "ext4" } else { fs_type });
    n.node_stage_volume(stage_req(&id, &staging, cap.clone())).await.expect("stage is idempotent");
    assert_eq!(e.kubelet.loops().len(), 1, "attached once");

    n.node_publish_volume(publish_req(&id, &staging, &target, cap.clone(), false)).await.unwrap();
    n.node_publish_volume(publish_req(&id, &staging, &target, cap.clone(), false))
        .await
        .expect("idempotent");
    std::fs::write(target.join("ibdata1"), b"database pages").unwrap();
    n.node_publish_volume(publish_req(&id, &staging, &target_ro, cap.clone(), true)).await.unwrap();
    assert_eq!(std::fs::read(target_ro.join("ibdata1")).unwrap(), b"database pages");
    let err = std::fs::write(target_ro.join("x"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "read-only publish");
    assert_eq!(
        n.node_publish_volume(publish_req(&id, &staging, &target, cap.clone(), true))
            .await
            .unwrap_err()
            .code(),
        Code::AlreadyExists,
        "same target, different read-only setting"
    );

    for t in [&target, &target_ro] {
        n.node_unpublish_volume(unpublish_req(&id, t)).await.unwrap();
        assert!(!t.exists(), "target removed");
        n.node_unpublish_volume(unpublish_req(&id, t)).await.expect("unpublish is idempotent");
    }
    n.node_unstage_volume(unstage_req(&id, &staging)).await.unwrap();
    n.node_unstage_volume(unstage_req(&id, &staging)).await.expect("unstage is idempotent");
    e.kubelet.assert_clean();

    // Staging again finds the filesystem and never formats it.
    n.node_stage_volume(stage_req(&id, &staging, cap.clone())).await.unwrap();
    assert_eq!(std::fs::read(staging.join("ibdata1")).unwrap(), b"database pages");
    let other = if fs_type == "xfs" { "ext4" } else { "xfs" };
    n.node_unstage_volume(unstage_req(&id, &staging)).await.unwrap();
    let wrong =
        n.node_stage_volume(stage_req(&id, &staging, req::mount_cap(other))).await.unwrap_err();
    assert_eq!(wrong.code(), Code::FailedPrecondition, "{wrong:?}");
    e.kubelet.assert_clean();
    n.node_stage_volume(stage_req(&id, &staging, req::mount_cap(""))).await.unwrap();
    assert_eq!(std::fs::read(staging.join("ibdata1")).unwrap(), b"database pages", "data survived");
    n.node_unstage_volume(unstage_req(&id, &staging)).await.unwrap();
    e.kubelet.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn ext4_stage_publish_unpublish_unstage() {
    filesystem_lifecycle("ext4").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn xfs_stage_publish_unpublish_unstage() {
    filesystem_lifecycle("xfs").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn default_filesystem_is_ext4() {
    filesystem_lifecycle("").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn raw_block_volume_is_a_device_in_the_pod() {
    let e = env(PoolFs::Ext4).await;
    let (mut c, mut n) = e.clients().await;
    let cap = req::block_cap();
    let id = new_volume(&mut c, "raw", 64 * MIB, cap.clone()).await;
    let staging = e.kubelet.staging("pv-raw");
    let target = e.kubelet.target("pod", "pv-raw");
    n.node_stage_volume(stage_req(&id, &staging, cap.clone())).await.unwrap();
    n.node_stage_volume(stage_req(&id, &staging, cap.clone())).await.unwrap();
    n.node_publish_volume(publish_req(&id, &staging, &target, cap.clone(), false)).await.unwrap();
    let meta = std::fs::metadata(&target).unwrap();
    assert!(
        std::os::unix::fs::FileTypeExt::is_block_device(&meta.file_type()),
        "a device at the target"
    );

    {
        let mut dev = std::fs::OpenOptions::new().write(true).open(&target).unwrap();
        dev.write_all(&[0xAB; 4096]).unwrap();
        dev.sync_all().unwrap();
    }
    assert_eq!(
        common::read_at(&e.pool.volume_file(&id), 0, 4096),
        vec![0xAB; 4096],
        "bytes reach the volume"
    );
    let stats = n
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: target.display().to_string(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.usage[0].total, 64 * MIB);

    n.node_unpublish_volume(unpublish_req(&id, &target)).await.unwrap();
    assert!(!target.exists());
    n.node_unstage_volume(unstage_req(&id, &staging)).await.unwrap();
    e.kubelet.assert_clean();
}

/// A raw block volume published read-only is a device the pod cannot
/// write: a read-only bind mount of a device node stops nothing (the node's
/// `ro` flag does not reach the device), so the write must be refused by
/// the device itself, while a read-write publish of the same volume beside
/// it still writes.
#[tokio::test(flavor = "multi_thread")]
async fn a_read_only_raw_block_publish_refuses_writes() {
    use std::os::unix::fs::FileExt;
    let e = env(PoolFs::Ext4).await;
    let (mut c, mut n) = e.clients().await;
    let cap = req::block_cap();
    let id = new_volume(&mut c, "raw-ro", 64 * MIB, cap.clone()).await;
    let staging = e.kubelet.staging("pv-raw-ro");
    let (ro, rw) = (e.kubelet.target("pod-ro", "pv"), e.kubelet.target("pod-rw", "pv"));
    n.node_stage_volume(stage_req(&id, &staging, cap.clone())).await.unwrap();
    n.node_publish_volume(publish_req(&id, &staging, &ro, cap.clone(), true)).await.unwrap();
    n.node_publish_volume(publish_req(&id, &staging, &ro, cap.clone(), true))
        .await
        .expect("publishing again: OK");
    n.node_publish_volume(publish_req(&id, &staging, &rw, cap.clone(), false)).await.unwrap();

    common::assert_refuses_writes(&ro);
    {
        let dev = std::fs::OpenOptions::new().write(true).open(&rw).unwrap();
        dev.write_at(&[0xAB; 4096], 0).unwrap();
        dev.sync_all().unwrap();
    }
    assert_eq!(common::read_at(&e.pool.volume_file(&id), 0, 4096), vec![0xAB; 4096]);
    assert_eq!(common::read_at(&ro, 0, 4096), vec![0xAB; 4096], "the reader sees the writer");
    let stats = n
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: ro.display().to_string(),
            ..Default::default()
        })
        .await
        .expect("the read-only publish is the volume's own")
        .into_inner();
    assert_eq!(stats.usage[0].total, 64 * MIB);
    let busy = n.node_unstage_volume(unstage_req(&id, &staging)).await.unwrap_err();
    assert_eq!(busy.code(), Code::FailedPrecondition, "still published read-only: {busy:?}");

    for t in [&ro, &rw] {
        n.node_unpublish_volume(unpublish_req(&id, t)).await.unwrap();
        n.node_unpublish_volume(unpublish_req(&id, t)).await.expect("again: OK");
        assert!(!t.exists());
    }
    n.node_unstage_volume(unstage_req(&id, &staging)).await.unwrap();
    e.kubelet.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn read_write_once_pod_allows_one_target() {
    let e = env(PoolFs::Ext4).await;
    let (mut c, mut n) = e.clients().await;
    let cap = req::cap_with_mode(Mode::SingleNodeSingleWriter);
    let id = new_volume(&mut c, "rwop", 64 * MIB, cap.clone()).await;
    let staging = e.kubelet.staging("pv");
    let (a, b) = (e.kubelet.target("pod-a", "pv"), e.kubelet.target("pod-b", "pv"));
    n.node_stage_volume(stage_req(&id, &staging, cap.clone())).await.unwrap();
    n.node_publish_volume(publish_req(&id, &staging, &a, cap.clone(), false)).await.unwrap();
    let err = n
        .node_publish_volume(publish_req(&id, &staging, &b, cap.clone(), false))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(!is_mounted(&b));
    n.node_publish_volume(publish_req(&id, &staging, &a, cap.clone(), false))
        .await
        .expect("same target: OK");
    let busy = n.node_unstage_volume(unstage_req(&id, &staging)).await.unwrap_err();
    assert_eq!(busy.code(), Code::FailedPrecondition, "cannot unstage while published");
    let del = c.delete_volume(req::delete(&id)).await.unwrap_err();
    assert_eq!(del.code(), Code::FailedPrecondition, "cannot delete while staged");
    n.node_unpublish_volume(unpublish_req(&id, &a)).await.unwrap();
    n.node_unstage_volume(unstage_req(&id, &staging)).await.unwrap();
    c.delete_volume(req::delete(&id)).await.unwrap();
    e.kubelet.assert_clean();
}

/// A pod's mount some process is still in (its working directory there)
/// cannot be unmounted: NodeUnpublishVolume says so (ABORTED: retry once it
/// is closed), not INTERNAL, and leaves the mount; once the process is
/// gone, the retry unpublishes.
#[tokio::test(flavor = "multi_thread")]
async fn an_unpublish_of_a_mount_in_use_is_refused_until_it_is_free() {
    let e = env(PoolFs::Ext4).await;
    let (mut c, mut n) = e.clients().await;
    let cap = req::mount_cap("ext4");
    let id = new_volume(&mut c, "in-use", 64 * MIB, cap.clone()).await;
    let (staging, target) = (e.kubelet.staging("pv"), e.kubelet.target("pod", "pv"));
    n.node_stage_volume(stage_req(&id, &staging, cap.clone())).await.unwrap();
    n.node_publish_volume(publish_req(&id, &staging, &target, cap, false)).await.unwrap();
    let mut holder =
        std::process::Command::new("sleep").arg("600").current_dir(&target).spawn().unwrap();
    let busy = n.node_unpublish_volume(unpublish_req(&id, &target)).await.unwrap_err();
    let _ = holder.kill();
    holder.wait().unwrap();
    assert_eq!(busy.code(), Code::Aborted, "{busy:?}");
    assert!(busy.message().contains("in use"), "{busy:?}");
    assert!(is_mounted(&target), "the pod's mount is left as it was");
    n.node_unpublish_volume(unpublish_req(&id, &target)).await.unwrap();
    n.node_unstage_volume(unstage_req(&id, &staging)).await.unwrap();
    c.delete_volume(req::delete(&id)).await.unwrap();
    e.kubelet.assert_clean();
}

async fn online_expansion(fs_type: &str) {
    let e = env(PoolFs::Ext4).await;
    let (mut c, mut n) = e.clients().await;
    let cap = req::mount_cap(fs_type);
    let id = new_volume(&mut c, "grow", 512 * MIB, cap.clone()).await;
    let staging = e.kubelet.staging("pv");
    let target = e.kubelet.target("pod", "pv");
    n.node_stage_volume(stage_req(&id, &staging, cap.clone())).await.unwrap();
    n.node_publish_volume(publish_req(&id, &staging, &target, cap.clone(), false)).await.unwrap();

    // The application keeps a file open and writing across the resize.
    let mut held = std::fs::File::create(target.join("log")).unwrap();
    held.write_all(b"before ").unwrap();
    let before = rustix::fs::statvfs(&target).unwrap();
    let expand = csi::NodeExpandVolumeRequest {
        volume_id: id.clone(),
        volume_path: target.display().to_string(),
        capacity_range: req::range(GIB, 0),
        volume_capability: Some(cap.clone()),
        ..Default::default()
    };
    // The kernel grows a mounted ext4 only for CAP_SYS_RESOURCE; where that
    // is withheld (as in some sandboxes) the driver must say exactly that,
    // and the volume itself must still have grown.
    let ext4_without_cap = fs_type == "ext4"
        && !ferrovol_host::node::fs::has_capability(ferrovol_host::node::fs::CAP_SYS_RESOURCE);
    if ext4_without_cap {
        let err = n.node_expand_volume(expand).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition);
        assert!(err.message().contains("CAP_SYS_RESOURCE"), "{err:?}");
        assert_eq!(std::fs::metadata(e.pool.volume_file(&id)).unwrap().len(), GIB as u64);
        eprintln!("note: CAP_SYS_RESOURCE is withheld here; ext4 online growth checked for its error path");
        drop(held);
        n.node_unpublish_volume(unpublish_req(&id, &target)).await.unwrap();
        n.node_unstage_volume(unstage_req(&id, &staging)).await.unwrap();
        e.kubelet.assert_clean();
        return;
    }
    let r = n.node_expand_volume(expand).await.unwrap().into_inner();
    assert_eq!(r.capacity_bytes, GIB);
    let after = rustix::fs::statvfs(&target).unwrap();
    let total = |s: &rustix::fs::StatVfs| s.f_blocks * s.f_frsize;
    assert!(
        total(&after) > total(&before) + (400 << 20),
        "{} -> {}",
        total(&before),
        total(&after)
    );
    held.write_all(b"after").unwrap();
    held.sync_all().unwrap();
    drop(held);
    assert_eq!(std::fs::read(target.join("log")).unwrap(), b"before after");
    assert_eq!(std::fs::metadata(e.pool.volume_file(&id)).unwrap().len(), GIB as u64);
    let got = c
        .controller_get_volume(csi::ControllerGetVolumeRequest { volume_id: id.clone() })
        .await
        .unwrap();
    assert_eq!(
        got.into_inner().volume.unwrap().capacity_bytes,
        GIB,
        "the journal knows the new size"
    );

    n.node_unpublish_volume(unpublish_req(&id, &target)).await.unwrap();
    n.node_unstage_volume(unstage_req(&id, &staging)).await.unwrap();
    e.kubelet.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn ext4_grows_online_while_in_use() {
    online_expansion("ext4").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn xfs_grows_online_while_in_use() {
    online_expansion("xfs").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn stats_and_abnormal_conditions() {
    let e = env(PoolFs::Ext4).await;
    let (mut c, mut n) = e.clients().await;
    let cap = req::mount_cap("ext4");
    let id = new_volume(&mut c, "watched", 128 * MIB, cap.clone()).await;
    let staging = e.kubelet.staging("pv");
    let target = e.kubelet.target("pod", "pv");
    n.node_stage_volume(stage_req(&id, &staging, cap.clone())).await.unwrap();
    n.node_publish_volume(publish_req(&id, &staging, &target, cap.clone(), false)).await.unwrap();
    let stats = |path: &Path| csi::NodeGetVolumeStatsRequest {
        volume_id: id.clone(),
        volume_path: path.display().to_string(),
        ..Default::default()
    };

    let s = n.node_get_volume_stats(stats(&target)).await.unwrap().into_inner();
    assert_eq!(s.usage.len(), 2, "bytes and inodes");
    assert!(s.usage[0].total > 100 * MIB && s.usage[0].available > 0 && s.usage[1].total > 0);
    assert!(!s.volume_condition.unwrap().abnormal);

    // Unmounted behind the driver's back: the volume is not at that path any
    // more (NOT_FOUND), and what lies under it (the host's disk) is never
    // reported as the volume's usage.
    rustix::mount::unmount(&target, rustix::mount::UnmountFlags::empty()).unwrap();
    let gone = n.node_get_volume_stats(stats(&target)).await.unwrap_err();
    assert_eq!(gone.code(), Code::NotFound, "{gone:?}");

    // The backing file deleted while attached.
    std::fs::remove_file(e.pool.volume_file(&id)).unwrap();
    let s = n.node_get_volume_stats(stats(&staging)).await.unwrap().into_inner();
    let cond = s.volume_condition.unwrap();
    assert!(cond.abnormal && cond.message.contains("missing"), "{cond:?}");

    let mut unknown = stats(&target);
    unknown.volume_id = "vol-unknown".into();
    assert_eq!(n.node_get_volume_stats(unknown).await.unwrap_err().code(), Code::NotFound);
    let missing = stats(&e.kubelet.dir.join("nowhere"));
    assert_eq!(n.node_get_volume_stats(missing).await.unwrap_err().code(), Code::NotFound);

    n.node_unpublish_volume(unpublish_req(&id, &target)).await.unwrap();
    n.node_unstage_volume(unstage_req(&id, &staging)).await.unwrap();
    e.kubelet.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn restarts_between_calls_converge() {
    let mut e = env(PoolFs::Ext4).await;
    let cap = req::mount_cap("ext4");
    let staging = e.kubelet.staging("pv");
    let target = e.kubelet.target("pod", "pv");
    let id = {
        let (mut c, mut n) = e.clients().await;
        let id = new_volume(&mut c, "survivor", 64 * MIB, cap.clone()).await;
        n.node_stage_volume(stage_req(&id, &staging, cap.clone())).await.unwrap();
        id
    };
    e.restart(); // between stage and publish
    {
        let (_, mut n) = e.clients().await;
        n.node_stage_volume(stage_req(&id, &staging, cap.clone()))
            .await
            .expect("repeat after restart");
        n.node_publish_volume(publish_req(&id, &staging, &target, cap.clone(), false))
            .await
            .unwrap();
        assert_eq!(e.kubelet.loops().len(), 1, "never attached twice");
    }
    e.restart(); // between publish and unpublish
    let (_, mut n) = e.clients().await;
    n.node_publish_volume(publish_req(&id, &staging, &target, cap.clone(), false))
        .await
        .expect("repeat");
    n.node_unpublish_volume(unpublish_req(&id, &target)).await.unwrap();
    n.node_unstage_volume(unstage_req(&id, &staging)).await.unwrap();
    e.kubelet.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn paths_outside_the_kubelet_dir_are_refused() {
    let e = env(PoolFs::Ext4).await;
    let (mut c, mut n) = e.clients().await;
    let cap = req::mount_cap("ext4");
    let id = new_volume(&mut c, "guarded", 16 * MIB, cap.clone()).await;
    let elsewhere = tempfile::tempdir().unwrap();
    let link = e.kubelet.dir.join("escape");
    std::os::unix::fs::symlink(elsewhere.path(), &link).unwrap();
    let bad = [
        elsewhere.path().join("staging"),
        Path::new("relative/path").to_path_buf(),
        e.kubelet.dir.join("../outside"),
        link.join("staging"),
    ];
    for p in &bad {
        let err = n.node_stage_volume(stage_req(&id, p, cap.clone())).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{p:?}: {err:?}");
    }
    let empty = csi::NodeStageVolumeRequest {
        staging_target_path: String::new(),
        ..stage_req(&id, &bad[0], cap.clone())
    };
    assert_eq!(n.node_stage_volume(empty).await.unwrap_err().code(), Code::InvalidArgument);
    let no_cap = csi::NodeStageVolumeRequest {
        volume_capability: None,
        ..stage_req(&id, &e.kubelet.staging("x"), cap.clone())
    };
    assert_eq!(n.node_stage_volume(no_cap).await.unwrap_err().code(), Code::InvalidArgument);
    let unknown =
        n.node_stage_volume(stage_req("vol-nope", &e.kubelet.staging("y"), cap.clone())).await;
    assert_eq!(unknown.unwrap_err().code(), Code::NotFound);
    assert!(
        std::fs::read_dir(elsewhere.path()).unwrap().next().is_none(),
        "nothing created outside"
    );
    e.kubelet.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_staging_path_holding_another_volume_is_refused() {
    let e = env(PoolFs::Ext4).await;
    let (mut c, mut n) = e.clients().await;
    let cap = req::mount_cap("ext4");
    let a = new_volume(&mut c, "a", 16 * MIB, cap.clone()).await;
    let b = new_volume(&mut c, "b", 16 * MIB, cap.clone()).await;
    let staging = e.kubelet.staging("shared");
    n.node_stage_volume(stage_req(&a, &staging, cap.clone())).await.unwrap();
    let err = n.node_stage_volume(stage_req(&b, &staging, cap.clone())).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    assert_eq!(e.kubelet.loops().len(), 1, "the refused volume was not left attached");
    n.node_unstage_volume(unstage_req(&a, &staging)).await.unwrap();
    e.kubelet.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshots_of_a_mounted_filesystem_are_clean() {
    let e = env(PoolFs::Xfs).await;
    let (mut c, mut n) = e.clients().await;
    let cap = req::mount_cap("ext4");
    let id = new_volume(&mut c, "live", 128 * MIB, cap.clone()).await;
    let staging = e.kubelet.staging("pv");
    let target = e.kubelet.target("pod", "pv");
    n.node_stage_volume(stage_req(&id, &staging, cap.clone())).await.unwrap();
    n.node_publish_volume(publish_req(&id, &staging, &target, cap.clone(), false)).await.unwrap();
    // Written but never synced: only a freeze puts it on the device.
    std::fs::write(target.join("unsynced"), vec![7u8; 1 << 20]).unwrap();

    let snap = c
        .create_snapshot(req::snapshot("clean", &id))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    std::fs::write(target.join("after"), b"thawed").expect("the filesystem is writable again");

    let restored = c
        .create_volume(req::from_snapshot("restored", &snap.snapshot_id, 128 * MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let staging2 = e.kubelet.staging("pv-restored");
    n.node_stage_volume(stage_req(&restored, &staging2, cap.clone())).await.unwrap();
    assert_eq!(std::fs::read(staging2.join("unsynced")).unwrap(), vec![7u8; 1 << 20]);
    assert!(!staging2.join("after").exists(), "point in time");

    n.node_unstage_volume(unstage_req(&restored, &staging2)).await.unwrap();
    n.node_unpublish_volume(unpublish_req(&id, &target)).await.unwrap();
    n.node_unstage_volume(unstage_req(&id, &staging)).await.unwrap();
    e.kubelet.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn node_info_and_capabilities() {
    let e = env(PoolFs::Ext4).await;
    let (_, mut n) = e.clients().await;
    let info = n.node_get_info(csi::NodeGetInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.node_id, "test-node");
    assert_eq!(info.max_volumes_per_node, 0);
    assert_eq!(
        info.accessible_topology.unwrap().segments["local.csi.ferrovol.io/node"],
        "test-node"
    );
    let caps =
        n.node_get_capabilities(csi::NodeGetCapabilitiesRequest {}).await.unwrap().into_inner();
    use csi::node_service_capability::rpc::Type as Cap;
    let got: Vec<i32> = caps
        .capabilities
        .iter()
        .filter_map(|c| {
            c.r#type.as_ref().map(|csi::node_service_capability::Type::Rpc(r)| r.r#type)
        })
        .collect();
    for want in
        [Cap::StageUnstageVolume, Cap::GetVolumeStats, Cap::ExpandVolume, Cap::VolumeCondition]
    {
        assert!(got.contains(&(want as i32)), "{want:?}");
    }
    assert!(!got.contains(&(Cap::VolumeMountGroup as i32)), "fsGroup is left to the kubelet");
}

/// A driver on a fresh pool whose process lacks one capability (`setpriv`
/// drops it from the bounding and inheritable sets), with its clients.
async fn without_capability(
    cap: &str,
) -> (
    TestPool,
    Kubelet,
    tempfile::TempDir,
    common::Driver,
    ControllerClient<Channel>,
    NodeClient<Channel>,
) {
    let pool = TestPool::new(PoolFs::Ext4).await;
    let kubelet = Kubelet::new(&pool);
    let root = tempfile::tempdir().unwrap();
    let drop = format!("-{cap}");
    let driver = DriverBuilder::new(root.path())
        .pool(&pool)
        .kubelet(&kubelet)
        .wrapped_in(["setpriv", "--bounding-set", &drop, "--inh-caps", &drop])
        .start();
    let ch = driver.channel().await;
    (pool, kubelet, root, driver, ControllerClient::new(ch.clone()), NodeClient::new(ch))
}

#[tokio::test(flavor = "multi_thread")]
async fn without_cap_sys_admin_node_calls_say_so_and_controller_works() {
    let (_pool, kubelet, _root, _driver, mut c, mut n) = without_capability("sys_admin").await;
    let cap = req::mount_cap("ext4");
    let id = new_volume(&mut c, "unprivileged", 16 * MIB, cap.clone()).await;
    let err = n.node_stage_volume(stage_req(&id, &kubelet.staging("pv"), cap)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("CAP_SYS_ADMIN"), "{err:?}");
    c.delete_volume(req::delete(&id)).await.expect("controller calls still work");
    kubelet.assert_clean();
}

/// Without CAP_SYS_RESOURCE a mounted ext4 cannot grow: the volume grows,
/// the condition says the filesystem lags, and the next stage grows it
/// offline (which needs no such capability), data intact.
#[tokio::test(flavor = "multi_thread")]
async fn ext4_growth_without_cap_sys_resource_converges_at_the_next_stage() {
    let (_pool, kubelet, _root, _driver, mut c, mut n) = without_capability("sys_resource").await;
    let cap = req::mount_cap("ext4");
    let id = new_volume(&mut c, "lagging", 256 * MIB, cap.clone()).await;
    let (staging, target) = (kubelet.staging("lag"), kubelet.target("pod", "lag"));
    n.node_stage_volume(stage_req(&id, &staging, cap.clone())).await.unwrap();
    n.node_publish_volume(publish_req(&id, &staging, &target, cap.clone(), false)).await.unwrap();
    std::fs::write(target.join("data"), b"kept across the growth").unwrap();
    let total = |p: &Path| {
        let s = rustix::fs::statvfs(p).unwrap();
        s.f_blocks * s.f_frsize
    };
    let before = total(&target);

    let expand = |bytes: i64| csi::NodeExpandVolumeRequest {
        volume_id: id.clone(),
        volume_path: target.display().to_string(),
        capacity_range: req::range(bytes, 0),
        ..Default::default()
    };
    // No larger than the volume: nothing to grow, OK (it asked for the
    // capability and said "the volume itself has grown").
    let same = n.node_expand_volume(expand(128 * MIB)).await.unwrap().into_inner();
    assert_eq!(same.capacity_bytes, 256 * MIB);
    let err = n.node_expand_volume(expand(512 * MIB)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    // The controller's view says so too (ControllerGetVolume's condition).
    let got = c
        .controller_get_volume(csi::ControllerGetVolumeRequest { volume_id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    let cond = got.status.unwrap().volume_condition.unwrap();
    assert!(cond.abnormal && cond.message.contains("next staged"), "{cond:?}");
    let stats = |path: &Path| csi::NodeGetVolumeStatsRequest {
        volume_id: id.clone(),
        volume_path: path.display().to_string(),
        ..Default::default()
    };
    let cond = n.node_get_volume_stats(stats(&target)).await.unwrap().into_inner();
    let cond = cond.volume_condition.unwrap();
    assert!(cond.abnormal && cond.message.contains("next staged"), "{cond:?}");

    n.node_unpublish_volume(unpublish_req(&id, &target)).await.unwrap();
    n.node_unstage_volume(unstage_req(&id, &staging)).await.unwrap();
    n.node_stage_volume(stage_req(&id, &staging, cap.clone())).await.unwrap();
    assert!(total(&staging) > before + (200 << 20), "{before} -> {}", total(&staging));
    assert_eq!(std::fs::read(staging.join("data")).unwrap(), b"kept across the growth");
    let cond = n.node_get_volume_stats(stats(&staging)).await.unwrap().into_inner();
    assert!(!cond.volume_condition.unwrap().abnormal);
    n.node_unstage_volume(unstage_req(&id, &staging)).await.unwrap();
    kubelet.assert_clean();
}

/// The kernel defers a detach while another process holds the loop device
/// open. Unstage answers only once the volume is really detached: while the
/// device is held it says so (and the volume is not yet deletable); once
/// the holder lets go, the retried unstage and the delete succeed.
#[tokio::test(flavor = "multi_thread")]
async fn unstage_waits_for_the_kernel_to_let_the_device_go() {
    let e = env(PoolFs::Xfs).await;
    let (mut c, mut n) = e.clients().await;
    let cap = req::block_cap();
    let id = new_volume(&mut c, "held-pvc", 64 * MIB, cap.clone()).await;
    let staging = e.kubelet.staging("held");
    n.node_stage_volume(stage_req(&id, &staging, cap.clone())).await.unwrap();
    let device = e.kubelet.loops().first().expect("attached").device.clone();
    let holder = std::fs::File::open(&device).unwrap();

    let held = n.node_unstage_volume(unstage_req(&id, &staging)).await.unwrap_err();
    assert_eq!(held.code(), Code::FailedPrecondition, "{held:?}");
    assert!(held.message().contains("holds the device open"), "{held:?}");
    let busy = c.delete_volume(req::delete(&id)).await.unwrap_err();
    assert_eq!(busy.code(), Code::FailedPrecondition, "{busy:?}");

    drop(holder);
    n.node_unstage_volume(unstage_req(&id, &staging)).await.unwrap();
    assert!(e.kubelet.loops().is_empty(), "detached once the holder closed it");
    c.delete_volume(req::delete(&id)).await.unwrap();
    e.kubelet.assert_clean();
}

/// A volume that holds data without a filesystem signature (here, 1 MiB of
/// random bytes written through a raw block stage, as a database's raw
/// device or headerless encrypted data would be) is never formatted when
/// it is later staged as a filesystem: FAILED_PRECONDITION saying why, and
/// every byte still there. Today's `blkid` alone saw it blank and ran mkfs.
#[tokio::test(flavor = "multi_thread")]
async fn data_without_a_signature_is_never_formatted() {
    let e = env(PoolFs::Ext4).await;
    let (mut c, mut n) = e.clients().await;
    let block = req::block_cap();
    let id = new_volume(&mut c, "raw-then-fs", 64 * MIB, block.clone()).await;
    let (staging, target) = (e.kubelet.staging("pv-rf"), e.kubelet.target("pod", "pv-rf"));
    n.node_stage_volume(stage_req(&id, &staging, block.clone())).await.unwrap();
    n.node_publish_volume(publish_req(&id, &staging, &target, block.clone(), false)).await.unwrap();
    let mut rng = common::Rng(0x5eed);
    let data: Vec<u8> = (0..MIB).map(|_| rng.next() as u8).collect();
    {
        use std::os::unix::fs::FileExt;
        let dev = std::fs::OpenOptions::new().write(true).open(&target).unwrap();
        dev.write_all_at(&data, 4 * MIB as u64).unwrap();
        dev.sync_all().unwrap();
    }
    n.node_unpublish_volume(unpublish_req(&id, &target)).await.unwrap();
    n.node_unstage_volume(unstage_req(&id, &staging)).await.unwrap();

    let e2 = n.node_stage_volume(stage_req(&id, &staging, req::mount_cap("ext4"))).await;
    let err = e2.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("no filesystem signature"), "{err:?}");
    assert!(err.message().contains("1048576 bytes of data"), "{err:?}");
    assert!(!is_mounted(&staging) && e.kubelet.loops().is_empty(), "nothing left attached");
    let kept = common::read_at(&e.pool.volume_file(&id), 4 * MIB as u64, MIB as usize);
    assert!(kept == data, "the data is untouched");

    // A volume never written is formatted as before.
    let fresh = new_volume(&mut c, "fresh", 64 * MIB, req::mount_cap("ext4")).await;
    let staging2 = e.kubelet.staging("pv-fresh");
    n.node_stage_volume(stage_req(&fresh, &staging2, req::mount_cap("ext4"))).await.unwrap();
    assert_eq!(fs_of(&staging2), "ext4");
    n.node_unstage_volume(unstage_req(&fresh, &staging2)).await.unwrap();
    e.kubelet.assert_clean();
}

fn options_of(path: &Path) -> String {
    ferrovol_host::node::mountinfo::read()
        .unwrap()
        .into_iter()
        .rev()
        .find(|m| m.mount_point == path)
        .map(|m| m.options)
        .unwrap_or_default()
}

/// Mount options from a capability are checked before the kernel sees
/// them: `dev`, `suid`, `exec`, `remount` and `errors=panic` (which reached
/// the kernel as INTERNAL "Invalid argument", or were applied silently)
/// are INVALID_ARGUMENT naming the option, at create, stage and publish;
/// every filesystem a pod gets is nodev,nosuid.
#[tokio::test(flavor = "multi_thread")]
async fn mount_options_are_checked_and_pods_get_nodev_nosuid() {
    let e = env(PoolFs::Ext4).await;
    let (mut c, mut n) = e.clients().await;
    let with = |flags: &[&str]| {
        let mut cap = req::mount_cap("ext4");
        if let Some(csi::volume_capability::AccessType::Mount(m)) = &mut cap.access_type {
            m.mount_flags = flags.iter().map(|f| f.to_string()).collect();
        }
        cap
    };
    let good = with(&["noatime", "errors=remount-ro"]);
    let id = new_volume(&mut c, "opts", 64 * MIB, good.clone()).await;
    let (staging, target) = (e.kubelet.staging("pv-o"), e.kubelet.target("pod", "pv-o"));
    for bad in ["dev", "suid", "exec", "nosuid,dev", "remount", "errors=panic", "nonsense=1"] {
        let named = bad.rsplit(',').next().unwrap();
        let st = n.node_stage_volume(stage_req(&id, &staging, with(&[bad]))).await.unwrap_err();
        assert_eq!(st.code(), Code::InvalidArgument, "{bad}: {st:?}");
        assert!(st.message().contains(&format!("{named:?}")), "{bad}: {st:?}");
        let mut create = req::create("opts-bad", 64 * MIB);
        create.volume_capabilities = vec![with(&[bad])];
        let cr = c.create_volume(create).await.unwrap_err();
        assert_eq!(cr.code(), Code::InvalidArgument, "{bad}: {cr:?}");
    }
    assert!(!is_mounted(&staging) && e.kubelet.loops().is_empty(), "nothing happened");

    n.node_stage_volume(stage_req(&id, &staging, good.clone())).await.unwrap();
    let bad_publish = publish_req(&id, &staging, &target, with(&["suid"]), false);
    assert_eq!(n.node_publish_volume(bad_publish).await.unwrap_err().code(), Code::InvalidArgument);
    n.node_publish_volume(publish_req(&id, &staging, &target, good.clone(), false)).await.unwrap();
    for p in [&staging, &target] {
        let o = options_of(p);
        assert!(o.contains("nodev") && o.contains("nosuid") && o.contains("noatime"), "{o}");
    }
    n.node_unpublish_volume(unpublish_req(&id, &target)).await.unwrap();
    n.node_unstage_volume(unstage_req(&id, &staging)).await.unwrap();
    e.kubelet.assert_clean();
}

/// The spec's codes for node calls at the wrong place: a publish without
/// a staging path is FAILED_PRECONDITION (this plugin stages); stats and
/// expansion at a path where the volume is not — relative, never mounted,
/// another volume's — are NOT_FOUND, the same answer from both.
#[tokio::test(flavor = "multi_thread")]
async fn node_calls_at_the_wrong_place_get_the_spec_s_codes() {
    let e = env(PoolFs::Ext4).await;
    let (mut c, mut n) = e.clients().await;
    let cap = req::mount_cap("ext4");
    let a = new_volume(&mut c, "where-a", 64 * MIB, cap.clone()).await;
    let b = new_volume(&mut c, "where-b", 64 * MIB, cap.clone()).await;
    let (sa, ta) = (e.kubelet.staging("pv-wa"), e.kubelet.target("pod", "pv-wa"));
    let sb = e.kubelet.staging("pv-wb");
    n.node_stage_volume(stage_req(&a, &sa, cap.clone())).await.unwrap();
    n.node_stage_volume(stage_req(&b, &sb, cap.clone())).await.unwrap();

    let mut unstaged = publish_req(&a, &sa, &ta, cap.clone(), false);
    unstaged.staging_target_path = String::new();
    let err = n.node_publish_volume(unstaged).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    let never_mounted = e.kubelet.staging("pv-nowhere");
    std::fs::create_dir_all(&never_mounted).unwrap();
    for path in
        ["relative/path".to_string(), never_mounted.display().to_string(), sb.display().to_string()]
    {
        let stats = n
            .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                volume_id: a.clone(),
                volume_path: path.clone(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        let grow = n
            .node_expand_volume(csi::NodeExpandVolumeRequest {
                volume_id: a.clone(),
                volume_path: path.clone(),
                capacity_range: req::range(128 * MIB, 0),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!((stats.code(), grow.code()), (Code::NotFound, Code::NotFound), "{path}");
        assert_eq!(stats.message(), grow.message(), "the same answer at {path}");
    }
    // Unstaged at a path where it is not staged: OK as the spec says, and
    // nothing touched (it answered "still published at" its real staging
    // path, which it was not).
    n.node_unstage_volume(unstage_req(&a, &never_mounted)).await.unwrap();
    assert!(is_mounted(&sa), "still staged where it was");
    n.node_unstage_volume(unstage_req(&a, &sa)).await.unwrap();
    n.node_unstage_volume(unstage_req(&b, &sb)).await.unwrap();
    e.kubelet.assert_clean();
}

/// A stage killed between attaching and mounting leaves the volume's loop
/// device attached and nothing mounted: the next start releases it (only
/// an unstage at some path could before), and leaves staged volumes alone.
#[tokio::test(flavor = "multi_thread")]
async fn an_attachment_a_killed_stage_left_is_released_at_start() {
    let mut e = env(PoolFs::Ext4).await;
    let (mut c, mut n) = e.clients().await;
    let cap = req::mount_cap("ext4");
    let staged = new_volume(&mut c, "kept", 64 * MIB, cap.clone()).await;
    let left = new_volume(&mut c, "left", 64 * MIB, cap.clone()).await;
    let staging = e.kubelet.staging("pv-kept");
    n.node_stage_volume(stage_req(&staged, &staging, cap.clone())).await.unwrap();
    // What the killed stage left: the device, no mount.
    let device = ferrovol_host::loopdev::attach(&e.pool.volume_file(&left), false, 4096).unwrap();
    e.restart();
    let released = e.driver.wait_for_log("released an attachment a stage left").unwrap();
    assert!(released.contains(&left), "{released}");
    let attached: Vec<_> = e.kubelet.loops().into_iter().map(|a| a.device).collect();
    assert!(!attached.contains(&device), "{attached:?}");
    assert_eq!(attached.len(), 1, "the staged volume keeps its device");
    assert!(is_mounted(&staging));
    let (_, mut n) = e.clients().await;
    n.node_unstage_volume(unstage_req(&staged, &staging)).await.unwrap();
    e.kubelet.assert_clean();
}

/// A read-only publish device a crash left between making it and binding
/// it (over the volume's device, mounted nowhere) holds the volume's
/// device: unstage finds it, lets it go, and releases the volume.
#[tokio::test(flavor = "multi_thread")]
async fn unstage_lets_go_of_a_read_only_device_a_crash_left() {
    let e = env(PoolFs::Ext4).await;
    let (mut c, mut n) = e.clients().await;
    let cap = req::block_cap();
    let id = new_volume(&mut c, "raw-stray", 64 * MIB, cap.clone()).await;
    let staging = e.kubelet.staging("pv-raw-stray");
    n.node_stage_volume(stage_req(&id, &staging, cap.clone())).await.unwrap();
    let device = e.kubelet.loops().into_iter().next().expect("the volume's device").device;
    let stray = ferrovol_host::node::read_only::attach(&device).unwrap();
    n.node_unstage_volume(unstage_req(&id, &staging)).await.expect("unstaged, the stray gone");
    assert!(!ferrovol_host::loopdev::list().unwrap().iter().any(|a| a.device == stray));
    e.kubelet.assert_clean();
}

/// The engines' one conformance suite, on the local engine in one process.
#[tokio::test(flavor = "multi_thread")]
async fn conformance_of_the_local_engine() {
    let e = env(PoolFs::Xfs).await;
    let subject = common::Conforming {
        name: "local".into(),
        controller: e.driver.channel().await,
        node: Some((e.driver.channel().await, e.kubelet.dir.clone())),
        create: Box::new(|name, bytes, cap| csi::CreateVolumeRequest {
            volume_capabilities: vec![cap],
            ..req::create(name, bytes)
        }),
        // XFS: it grows mounted without CAP_SYS_RESOURCE (ext4 does not).
        volume_size: 320 * MIB,
        fs_type: "xfs".into(),
    };
    ferrovol_testkit::conformance::run(&subject).await;
    e.kubelet.assert_clean();
}
