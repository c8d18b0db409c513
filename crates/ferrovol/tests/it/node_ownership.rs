//! Node calls act only on the volume they name: teardown, stats and expand
//! check that the mount at a path is the named volume's; one staging path
//! per volume; hostile or odd paths are the caller's errors, not INTERNAL.
//! Real loop devices and mounts; every test ends with a leak check.

use crate::common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::req::{self, MIB};
use common::req::{new_volume, publish_req, stage_req, stats, unpublish_req, unstage_req};
use common::{env, is_mounted, DriverBuilder, Kubelet, PoolFs, TestPool};
use ferrovol_csi as csi;
use ferrovol_csi::node_client::NodeClient;
use tonic::Code;

fn expand(id: &str, path: &Path, bytes: i64) -> csi::NodeExpandVolumeRequest {
    csi::NodeExpandVolumeRequest {
        volume_id: id.into(),
        volume_path: path.display().to_string(),
        capacity_range: req::range(bytes, 0),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn teardown_stats_and_expand_touch_only_the_named_volume() {
    let e = env(PoolFs::Ext4).await;
    let (mut c, mut n) = e.clients().await;
    let cap = req::mount_cap("ext4");
    let a = new_volume(&mut c, "a", 64 * MIB, cap.clone()).await;
    let b = new_volume(&mut c, "b", 64 * MIB, cap.clone()).await;
    let (sa, ta) = (e.kubelet.staging("a"), e.kubelet.target("pod", "a"));
    let (sb, tb) = (e.kubelet.staging("b"), e.kubelet.target("pod", "b"));
    for (v, s, t) in [(&a, &sa, &ta), (&b, &sb, &tb)] {
        n.node_stage_volume(stage_req(v, s, cap.clone())).await.unwrap();
        n.node_publish_volume(publish_req(v, s, t, cap.clone(), false)).await.unwrap();
    }

    // A's name with B's paths: NOT_FOUND, and B keeps its mounts.
    let e1 = n.node_unpublish_volume(unpublish_req(&a, &tb)).await.unwrap_err();
    assert_eq!(e1.code(), Code::NotFound, "{e1:?}");
    assert!(is_mounted(&tb), "B's pod mount survives");
    let e2 = n.node_unstage_volume(unstage_req(&a, &sb)).await.unwrap_err();
    assert!(matches!(e2.code(), Code::NotFound | Code::FailedPrecondition), "{e2:?}");
    assert!(is_mounted(&sb), "B's staging mount survives");
    let e3 = n.node_get_volume_stats(stats(&a, &tb)).await.unwrap_err();
    assert_eq!(e3.code(), Code::NotFound, "{e3:?}");
    let size_of = |id: &str| std::fs::metadata(e.pool.volume_file(id)).unwrap().len();
    let before = size_of(&a);
    let e4 = n.node_expand_volume(expand(&a, &tb, 128 * MIB)).await.unwrap_err();
    assert_eq!(e4.code(), Code::NotFound, "{e4:?}");
    assert_eq!(before, size_of(&a), "nothing grew");

    // The spec's order for stats and expand: unknown volume first, whatever
    // the path; an empty path is INVALID_ARGUMENT.
    let unknown = "vol-00000000000000000000000000000000";
    for path in [Path::new("relative/path"), Path::new("/etc")] {
        let s = n.node_get_volume_stats(stats(unknown, path)).await.unwrap_err();
        assert_eq!(s.code(), Code::NotFound, "{path:?}: {s:?}");
        let x = n.node_expand_volume(expand(unknown, path, MIB)).await.unwrap_err();
        assert_eq!(x.code(), Code::NotFound, "{path:?}: {x:?}");
    }
    let empty = n.node_get_volume_stats(stats(&a, Path::new(""))).await.unwrap_err();
    assert_eq!(empty.code(), Code::InvalidArgument);

    for (v, s, t) in [(&a, &sa, &ta), (&b, &sb, &tb)] {
        n.node_unpublish_volume(unpublish_req(v, t)).await.unwrap();
        n.node_unstage_volume(unstage_req(v, s)).await.unwrap();
    }
    // After unstage, stats never measure what is left at the path.
    let left = n.node_get_volume_stats(stats(&a, &sa)).await.unwrap_err();
    assert_eq!(left.code(), Code::NotFound, "{left:?}");
    e.kubelet.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn one_staging_path_per_volume() {
    let e = env(PoolFs::Ext4).await;
    let (mut c, mut n) = e.clients().await;
    let cap = req::mount_cap("ext4");
    let v = new_volume(&mut c, "once", 64 * MIB, cap.clone()).await;
    let (first, second) = (e.kubelet.staging("first"), e.kubelet.staging("second"));
    n.node_stage_volume(stage_req(&v, &first, cap.clone())).await.unwrap();

    let again = n.node_stage_volume(stage_req(&v, &second, cap.clone())).await.unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition, "{again:?}");
    assert!(again.message().contains(&first.display().to_string()), "{again:?}");
    assert!(!is_mounted(&second));
    // The same path with a block capability: ALREADY_EXISTS, no stray file
    // in the user's filesystem.
    let block = n.node_stage_volume(stage_req(&v, &first, req::block_cap())).await.unwrap_err();
    assert_eq!(block.code(), Code::AlreadyExists, "{block:?}");
    assert!(!first.join("device").exists(), "no device file inside the filesystem");
    // Publishing as another filesystem than it was made with: refused.
    let target = e.kubelet.target("pod", "once");
    let xfs = n
        .node_publish_volume(publish_req(&v, &first, &target, req::mount_cap("xfs"), false))
        .await
        .unwrap_err();
    assert_eq!(xfs.code(), Code::FailedPrecondition, "{xfs:?}");
    assert!(!is_mounted(&target));

    // And it can still be torn down and deleted.
    n.node_unstage_volume(unstage_req(&v, &first)).await.unwrap();
    c.delete_volume(req::delete(&v)).await.unwrap();
    e.kubelet.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn odd_paths_are_the_callers_to_fix() {
    let e = env(PoolFs::Ext4).await;
    let (mut c, mut n) = e.clients().await;
    let cap = req::mount_cap("ext4");
    let v = new_volume(&mut c, "paths", 64 * MIB, cap.clone()).await;

    // A staging path that is a regular file, or lies under one.
    let file = e.kubelet.dir.join("plugins/a-file");
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(&file, b"x").unwrap();
    for p in [file.clone(), file.join("under")] {
        let err = n.node_stage_volume(stage_req(&v, &p, cap.clone())).await.unwrap_err();
        assert!(
            matches!(err.code(), Code::FailedPrecondition | Code::InvalidArgument),
            "{p:?}: {err:?}"
        );
    }
    assert!(e.kubelet.loops().is_empty(), "a failed first stage leaves nothing attached");

    // A target inside the staging path (or equal to it) is refused.
    let staging = e.kubelet.staging("paths");
    n.node_stage_volume(stage_req(&v, &staging, cap.clone())).await.unwrap();
    for t in [staging.clone(), staging.join("inside")] {
        let err = n
            .node_publish_volume(publish_req(&v, &staging, &t, cap.clone(), false))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{t:?}: {err:?}");
    }
    assert!(is_mounted(&staging), "the staging mount is intact");
    n.node_unstage_volume(unstage_req(&v, &staging)).await.unwrap();

    // Raw block: a symlink planted where the device file goes is not followed.
    let b = new_volume(&mut c, "blk", 16 * MIB, req::block_cap()).await;
    let bstaging = e.kubelet.staging("blk");
    let victim = e.kubelet.dir.join("victim");
    std::fs::write(&victim, b"keep").unwrap();
    std::os::unix::fs::symlink(&victim, bstaging.join("device")).unwrap();
    let err = n.node_stage_volume(stage_req(&b, &bstaging, req::block_cap())).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
    assert!(!is_mounted(&victim), "nothing was mounted through the link");
    std::fs::remove_file(bstaging.join("device")).unwrap();
    e.kubelet.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kubelet_dir_that_is_a_symlink_works() {
    let pool = TestPool::new(PoolFs::Ext4).await;
    let kubelet = Kubelet::new(&pool);
    let links = tempfile::tempdir().unwrap();
    let link = links.path().join("kubelet-link");
    std::os::unix::fs::symlink(&kubelet.dir, &link).unwrap();
    let root = tempfile::tempdir().unwrap();
    let driver = DriverBuilder::new(root.path())
        .pool(&pool)
        .args(["--kubelet-dir".to_string(), link.display().to_string()])
        .start();
    let ch = driver.channel().await;
    let mut c = ferrovol_csi::controller_client::ControllerClient::new(ch.clone());
    let mut n = NodeClient::new(ch);
    let cap = req::mount_cap("ext4");
    let v = new_volume(&mut c, "linked", 64 * MIB, cap.clone()).await;
    // The kubelet sends paths under the directory it was configured with.
    kubelet.staging("linked");
    let staging = link.join("plugins/kubernetes.io/csi/pv/linked/globalmount");
    n.node_stage_volume(stage_req(&v, &staging, cap.clone())).await.unwrap();
    n.node_get_volume_stats(stats(&v, &staging)).await.unwrap();
    n.node_unstage_volume(unstage_req(&v, &staging)).await.unwrap();
    kubelet.assert_clean();
}

/// Swaps what `a` and `b` name, in one step (RENAME_EXCHANGE).
fn exchange(a: &Path, b: &Path) {
    use rustix::fs::{renameat_with, RenameFlags, CWD};
    renameat_with(CWD, a, CWD, b, RenameFlags::EXCHANGE).unwrap();
}

/// Exchanges `a` and `b` (a directory and a symlink to a directory outside
/// the kubelet dir) as fast as it can until told to stop; answers how many
/// times.
fn swapper(a: PathBuf, b: PathBuf, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut swaps = 0;
        while !stop.load(Ordering::Relaxed) {
            exchange(&a, &b);
            swaps += 1;
        }
        swaps
    })
}

/// Puts the real directory back at `real` (the symlink at `other`).
fn settle(real: &Path, other: &Path) {
    if std::fs::symlink_metadata(real).unwrap().file_type().is_symlink() {
        exchange(real, other);
    }
}

/// Whatever an escaped mount left under the outside directory goes, even
/// when the test fails.
struct UnmountUnder(PathBuf);

impl Drop for UnmountUnder {
    fn drop(&mut self) {
        for m in mounts_under(&self.0).into_iter().rev() {
            let _ = rustix::mount::unmount(&m, rustix::mount::UnmountFlags::DETACH);
        }
    }
}

/// Mounts under `outside`, from the kernel's table.
fn mounts_under(outside: &Path) -> Vec<PathBuf> {
    ferrovol_host::node::mountinfo::read()
        .unwrap()
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|p| p.starts_with(outside))
        .collect()
}

/// A component of the staging (then the target) path swapped for a symlink
/// to a directory outside the kubelet dir while NodeStageVolume (then
/// NodePublishVolume) runs, again and again: each call either mounts where
/// it checked (inside) or refuses the symlink — never a mount outside. It
/// mounted outside in 1 of 25 stages, answering OK.
#[tokio::test(flavor = "multi_thread")]
async fn a_symlink_swapped_in_mid_call_never_redirects_a_mount() {
    const ROUNDS: usize = 150;
    let e = env(PoolFs::Ext4).await;
    let (mut c, mut n) = e.clients().await;
    let cap = req::mount_cap("ext4");
    let v = new_volume(&mut c, "race", 64 * MIB, cap.clone()).await;
    let outside = tempfile::tempdir().unwrap();
    let outside = outside.path().canonicalize().unwrap();
    let _guard = UnmountUnder(outside.clone());
    std::fs::create_dir_all(outside.join("globalmount")).unwrap();
    std::fs::create_dir_all(outside.join("mount")).unwrap();

    // The staging path's pv directory, and its twin symlink.
    let pv = e.kubelet.dir.join("plugins/kubernetes.io/csi/pv/race");
    let pv_link = e.kubelet.dir.join("plugins/kubernetes.io/csi/pv/race-swap");
    std::fs::create_dir_all(pv.join("globalmount")).unwrap();
    std::os::unix::fs::symlink(&outside, &pv_link).unwrap();
    let staging = pv.join("globalmount");
    // Formatted once, in peace.
    n.node_stage_volume(stage_req(&v, &staging, cap.clone())).await.unwrap();
    n.node_unstage_volume(unstage_req(&v, &staging)).await.unwrap();

    let (mut swaps, mut staged, mut refused) = (0u64, 0, 0);
    for _ in 0..ROUNDS {
        let stop = Arc::new(AtomicBool::new(false));
        let t = swapper(pv.clone(), pv_link.clone(), stop.clone());
        let r = n.node_stage_volume(stage_req(&v, &staging, cap.clone())).await;
        stop.store(true, Ordering::Relaxed);
        swaps += t.join().unwrap();
        settle(&pv, &pv_link);
        assert_eq!(mounts_under(&outside), Vec::<PathBuf>::new(), "a stage mounted outside");
        match r {
            Ok(_) => {
                staged += 1;
                assert!(is_mounted(&staging), "mounted where it was checked");
                n.node_unstage_volume(unstage_req(&v, &staging)).await.unwrap();
            }
            Err(s) => {
                assert!(
                    matches!(s.code(), Code::FailedPrecondition | Code::InvalidArgument),
                    "{s:?}"
                );
                refused += 1;
            }
        }
    }
    eprintln!("stage: {ROUNDS} calls, {swaps} swaps, {staged} staged, {refused} refused");
    assert!(swaps >= 1000, "{swaps} swaps");
    assert!(staged > 0, "some stages found the directory");

    // The same for the pod's target.
    n.node_stage_volume(stage_req(&v, &staging, cap.clone())).await.unwrap();
    let pod = e.kubelet.dir.join("pods/racer/volumes/kubernetes.io~csi");
    let pod_link = e.kubelet.dir.join("pods/racer/volumes/swap");
    std::fs::create_dir_all(&pod).unwrap();
    std::os::unix::fs::symlink(&outside, &pod_link).unwrap();
    let target = pod.join("mount");
    let (mut swaps, mut published) = (0u64, 0);
    for _ in 0..ROUNDS {
        let stop = Arc::new(AtomicBool::new(false));
        let t = swapper(pod.clone(), pod_link.clone(), stop.clone());
        let r = n.node_publish_volume(publish_req(&v, &staging, &target, cap.clone(), false)).await;
        stop.store(true, Ordering::Relaxed);
        swaps += t.join().unwrap();
        settle(&pod, &pod_link);
        assert_eq!(mounts_under(&outside), Vec::<PathBuf>::new(), "a publish mounted outside");
        if r.is_ok() {
            published += 1;
            n.node_unpublish_volume(unpublish_req(&v, &target)).await.unwrap();
        }
    }
    eprintln!("publish: {ROUNDS} calls, {swaps} swaps, {published} published");
    assert!(swaps >= 1000 && published > 0, "{swaps} swaps, {published} published");
    n.node_unstage_volume(unstage_req(&v, &staging)).await.unwrap();
    std::fs::remove_file(&pv_link).unwrap();
    std::fs::remove_file(&pod_link).unwrap();
    e.kubelet.assert_clean();
}
