//! Chaos: a mixed workload shaped like the sidecars and the kubelet runs
//! against the real driver while it is killed (SIGKILL) at random moments
//! and restarted. Every request is retried with the same name until it
//! succeeds, as the sidecars do. After each round:
//! - the pool is clean (`ferrovol pool check`: no orphan, no dangling
//!   record, nothing half-done);
//! - every acknowledged write is in its volume and in the snapshot, restore
//!   and clone taken after it;
//! - one name never made two volumes;
//! - once everything is unpublished and unstaged, no loop device or mount
//!   of the test remains.
//!
//! Bounded: a fixed number of rounds and kills, seeded for reproducibility.

use crate::common;

use std::collections::HashSet;
use std::future::Future;
use std::time::Duration;

use common::req::{self, publish_req, stage_req, unpublish_req, unstage_req, MIB};
use common::{DriverBuilder, Kubelet, PoolFs, Rng, TestPool};
use ferrovol_csi as csi;
use ferrovol_csi::controller_client::ControllerClient;
use ferrovol_csi::group_controller_client::GroupControllerClient;
use ferrovol_csi::node_client::NodeClient;
use tonic::transport::Channel;

/// Rounds in CI; `FERROVOL_CHAOS_ROUNDS` and `FERROVOL_CHAOS_SEED` run more,
/// or others, by hand.
const ROUNDS: u64 = 12;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}
const KILLS_PER_ROUND: u64 = 3;

/// Retries a call the way a sidecar does: on a dead or restarting driver
/// (or ABORTED for work in flight) it reconnects and repeats, bounded.
async fn retry<T, F, Fut>(socket: &std::path::Path, mut call: F) -> T
where
    F: FnMut(Channel) -> Fut,
    Fut: Future<Output = Result<T, tonic::Status>>,
{
    for _ in 0..2000 {
        if let Ok(ch) =
            ferrovol_csi::endpoint::connect(&ferrovol_csi::endpoint::Endpoint::Unix(socket.into()))
                .await
        {
            match call(ch).await {
                Ok(v) => return v,
                Err(s)
                    if matches!(
                        s.code(),
                        tonic::Code::Unavailable
                            | tonic::Code::Aborted
                            | tonic::Code::Unknown
                            | tonic::Code::Cancelled
                    ) => {}
                Err(s) => panic!("a retry got a final error: {s:?}"),
            }
        }
        // Backoff between retries, as the sidecars do: not synchronisation.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no success after 2000 retries");
}

/// CreateVolume retried through kills; answers the volume id.
async fn create_retrying(socket: &std::path::Path, r: csi::CreateVolumeRequest) -> String {
    retry(socket, |ch| {
        let r = r.clone();
        async move { ControllerClient::new(ch).create_volume(r).await }
    })
    .await
    .into_inner()
    .volume
    .unwrap()
    .volume_id
}

/// CreateSnapshot retried through kills; answers the snapshot id.
async fn snapshot_retrying(socket: &std::path::Path, name: &str, volume: &str) -> String {
    retry(socket, |ch| {
        let r = req::snapshot(name, volume);
        async move { ControllerClient::new(ch).create_snapshot(r).await }
    })
    .await
    .into_inner()
    .snapshot
    .unwrap()
    .snapshot_id
}

fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, b| (h ^ *b as u64).wrapping_mul(0x100000001b3))
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_at_random_moments_nothing_is_lost_or_leaked() {
    let pool = TestPool::new(PoolFs::Xfs).await;
    let kubelet = Kubelet::new(&pool);
    let root = tempfile::tempdir().unwrap();
    let start = || DriverBuilder::new(root.path()).pool(&pool).kubelet(&kubelet).start();
    let mut driver = start();
    let socket = driver.socket.clone();
    let rounds = env_or("FERROVOL_CHAOS_ROUNDS", ROUNDS);
    let seed = env_or("FERROVOL_CHAOS_SEED", 4242);
    let mut rng = Rng(seed);
    let mut kills = 0;

    for round in 0..rounds {
        let cap = req::mount_cap("ext4");
        // The workload: the controller side in one task, the node side in
        // another, both retrying through kills.
        let controller = {
            let (socket, cap) = (socket.clone(), cap.clone());
            tokio::spawn(async move {
                let mut made = Vec::new();
                for i in 0..4 {
                    let name = format!("r{round}-v{i}");
                    let r = csi::CreateVolumeRequest {
                        volume_capabilities: vec![cap.clone()],
                        ..req::create(&name, 8 * MIB)
                    };
                    let v = create_retrying(&socket, r).await;
                    let s = snapshot_retrying(&socket, &format!("r{round}-s{i}"), &v).await;
                    let restored = create_retrying(
                        &socket,
                        req::from_snapshot(&format!("r{round}-restore{i}"), &s, 8 * MIB),
                    )
                    .await;
                    let clone = create_retrying(
                        &socket,
                        req::from_volume(&format!("r{round}-clone{i}"), &v, 8 * MIB),
                    )
                    .await;
                    // A group snapshot of the volume and its clone, then gone.
                    let group = retry(&socket, |ch| {
                        let r = csi::CreateVolumeGroupSnapshotRequest {
                            name: format!("r{round}-g{i}"),
                            source_volume_ids: vec![v.clone(), clone.clone()],
                            ..Default::default()
                        };
                        async move {
                            GroupControllerClient::new(ch).create_volume_group_snapshot(r).await
                        }
                    })
                    .await
                    .into_inner()
                    .group_snapshot
                    .unwrap();
                    retry(&socket, |ch| {
                        let r = csi::DeleteVolumeGroupSnapshotRequest {
                            group_snapshot_id: group.group_snapshot_id.clone(),
                            snapshot_ids: group
                                .snapshots
                                .iter()
                                .map(|s| s.snapshot_id.clone())
                                .collect(),
                            ..Default::default()
                        };
                        async move {
                            GroupControllerClient::new(ch).delete_volume_group_snapshot(r).await
                        }
                    })
                    .await;
                    for doomed in [restored, clone] {
                        retry(&socket, |ch| {
                            let r = req::delete(&doomed);
                            async move { ControllerClient::new(ch).delete_volume(r).await }
                        })
                        .await;
                    }
                    made.push((name, v, s));
                }
                made
            })
        };
        let node = {
            let (socket, cap) = (socket.clone(), cap.clone());
            let staging = kubelet.staging(&format!("r{round}"));
            let target = kubelet.target(&format!("pod{round}"), "data");
            tokio::spawn(async move {
                let name = format!("r{round}-data");
                let r = csi::CreateVolumeRequest {
                    volume_capabilities: vec![cap.clone()],
                    ..req::create(&name, 64 * MIB)
                };
                let v = create_retrying(&socket, r).await;
                let sr = stage_req(&v, &staging, cap.clone());
                retry(&socket, |ch| {
                    let r = sr.clone();
                    async move { NodeClient::new(ch).node_stage_volume(r).await }
                })
                .await;
                let pr = publish_req(&v, &staging, &target, cap.clone(), false);
                retry(&socket, |ch| {
                    let r = pr.clone();
                    async move { NodeClient::new(ch).node_publish_volume(r).await }
                })
                .await;
                // Acknowledged writes: fsync'd before we count them.
                let bytes: Vec<u8> = (0..(1u32 << 20))
                    .map(|i| (i ^ round as u32).wrapping_mul(2654435761) as u8)
                    .collect();
                let path = target.join("acked");
                std::fs::write(&path, &bytes).unwrap();
                std::fs::File::open(&path).unwrap().sync_all().unwrap();
                (name, v, staging, target, checksum(&bytes))
            })
        };

        // A volume staged, grown online, unstaged and deleted, all through
        // kills (xfs: it grows online without CAP_SYS_RESOURCE).
        let expansion = {
            let socket = socket.clone();
            let cap = req::mount_cap("xfs");
            let staging = kubelet.staging(&format!("r{round}-grow"));
            tokio::spawn(async move {
                let r = csi::CreateVolumeRequest {
                    volume_capabilities: vec![cap.clone()],
                    ..req::create(&format!("r{round}-grow"), 320 * MIB)
                };
                let v = create_retrying(&socket, r).await;
                let sr = stage_req(&v, &staging, cap.clone());
                retry(&socket, |ch| {
                    let r = sr.clone();
                    async move { NodeClient::new(ch).node_stage_volume(r).await }
                })
                .await;
                let grown = retry(&socket, |ch| {
                    let r = csi::NodeExpandVolumeRequest {
                        volume_id: v.clone(),
                        volume_path: staging.display().to_string(),
                        capacity_range: req::range(384 * MIB, 0),
                        ..Default::default()
                    };
                    async move { NodeClient::new(ch).node_expand_volume(r).await }
                })
                .await
                .into_inner();
                assert_eq!(grown.capacity_bytes, 384 * MIB);
                let stats = retry(&socket, |ch| {
                    let r = csi::NodeGetVolumeStatsRequest {
                        volume_id: v.clone(),
                        volume_path: staging.display().to_string(),
                        ..Default::default()
                    };
                    async move { NodeClient::new(ch).node_get_volume_stats(r).await }
                })
                .await
                .into_inner();
                // XFS keeps about 64 MiB of these sizes for itself: 256 MiB
                // usable at 320, 320 at 384.
                let usable = stats.usage[0].total;
                assert!(usable > 300 * MIB, "round {round}: the filesystem grew: {usable}");
                let ur = unstage_req(&v, &staging);
                retry(&socket, |ch| {
                    let r = ur.clone();
                    async move { NodeClient::new(ch).node_unstage_volume(r).await }
                })
                .await;
                retry(&socket, |ch| {
                    let r = req::delete(&v);
                    async move { ControllerClient::new(ch).delete_volume(r).await }
                })
                .await;
            })
        };

        // Kill at random moments while the workload runs, and bring the
        // driver back: three times per round.
        for _ in 0..KILLS_PER_ROUND {
            tokio::time::sleep(Duration::from_millis(rng.next() % 60)).await;
            driver.kill();
            kills += 1;
            driver = start();
        }
        let made = controller.await.unwrap();
        expansion.await.unwrap();
        let (data_name, data, staging, target, sum) = node.await.unwrap();

        // Acknowledged data is in the volume, and in a snapshot taken after
        // it, its restore and a clone.
        assert_eq!(
            checksum(&std::fs::read(target.join("acked")).unwrap()),
            sum,
            "round {round}: volume"
        );
        let snap = snapshot_retrying(&socket, &format!("r{round}-data-snap"), &data).await;
        let mut c = ControllerClient::new(driver.channel().await);
        let mut n = NodeClient::new(driver.channel().await);
        let restored = c
            .create_volume(req::from_snapshot(&format!("r{round}-data-restore"), &snap, 64 * MIB))
            .await
            .unwrap();
        let clone = c
            .create_volume(req::from_volume(&format!("r{round}-data-clone"), &data, 64 * MIB))
            .await
            .unwrap();
        for (tag, v) in [("restore", restored), ("clone", clone)] {
            let id = v.into_inner().volume.unwrap().volume_id;
            let st = kubelet.staging(&format!("r{round}-{tag}"));
            n.node_stage_volume(stage_req(&id, &st, cap.clone())).await.unwrap();
            assert_eq!(
                checksum(&std::fs::read(st.join("acked")).unwrap()),
                sum,
                "round {round}: {tag}"
            );
            n.node_unstage_volume(unstage_req(&id, &st)).await.unwrap();
            c.delete_volume(req::delete(&id)).await.unwrap();
        }
        c.delete_snapshot(req::delete_snapshot(&snap)).await.unwrap();

        // One name, one volume.
        let listed = c.list_volumes(csi::ListVolumesRequest::default()).await.unwrap().into_inner();
        let ids: Vec<String> =
            listed.entries.iter().map(|e| e.volume.as_ref().unwrap().volume_id.clone()).collect();
        let expected: HashSet<String> =
            made.iter().map(|m| m.1.clone()).chain(std::iter::once(data.clone())).collect();
        assert_eq!(
            ids.iter().cloned().collect::<HashSet<_>>(),
            expected,
            "round {round}: {data_name}"
        );
        assert_eq!(ids.len(), expected.len());

        // Tear the round down and prove nothing is left.
        n.node_unpublish_volume(unpublish_req(&data, &target)).await.unwrap();
        n.node_unstage_volume(unstage_req(&data, &staging)).await.unwrap();
        for (_, v, s) in &made {
            c.delete_snapshot(req::delete_snapshot(s)).await.unwrap();
            c.delete_volume(req::delete(v)).await.unwrap();
        }
        c.delete_volume(req::delete(&data)).await.unwrap();
        kubelet.assert_clean();
        let status = driver.terminate();
        assert!(status.success());
        let (clean, text) = common::pool_check(&pool, false);
        assert!(clean, "round {round}: {text}");
        assert!(pool.files("volumes").is_empty() && pool.files("snapshots").is_empty());
        driver = start();
    }
    eprintln!("chaos: seed {seed:#x}, {rounds} rounds, {kills} kills, all invariants held");
}

/// The round the random kills miss: the driver dies inside the freeze
/// window of a staged volume's snapshot (a crash at the failpoint between
/// freeze and thaw, like SIGKILL or the OOM killer). The pod's filesystem
/// stays frozen until the driver comes back; at start-up it is thawed and
/// the pod's writes go through again.
#[tokio::test(flavor = "multi_thread")]
async fn killed_inside_a_freeze_window_the_pods_filesystem_is_thawed_at_restart() {
    let pool = TestPool::new(PoolFs::Xfs).await;
    let kubelet = Kubelet::new(&pool);
    let root = tempfile::tempdir().unwrap();
    let start = |failpoints: &str| {
        let b = DriverBuilder::new(root.path()).pool(&pool).kubelet(&kubelet);
        match failpoints {
            "" => b.start(),
            f => b.env("FERROVOL_FAILPOINTS", f).start(),
        }
    };
    let mut driver = start("create-snapshot-frozen=abort");
    let ch = driver.channel().await;
    let (mut c, mut n) = (ControllerClient::new(ch.clone()), NodeClient::new(ch));
    let cap = req::mount_cap("ext4");
    let v = req::new_volume(&mut c, "frozen-pod", 64 * MIB, cap.clone()).await;
    let (staging, target) = (kubelet.staging("frozen"), kubelet.target("pod", "frozen"));
    n.node_stage_volume(stage_req(&v, &staging, cap.clone())).await.unwrap();
    n.node_publish_volume(publish_req(&v, &staging, &target, cap.clone(), false)).await.unwrap();
    std::fs::write(target.join("before"), b"written before the snapshot").unwrap();

    assert!(c.create_snapshot(req::snapshot("mid-freeze", &v)).await.is_err());
    assert!(!driver.wait().success(), "the driver died in the window");
    // Left frozen: a second freeze is refused as busy.
    let still = ferrovol_host::node::freeze::Frozen::freeze(&target).err();
    assert_eq!(
        still.as_ref().and_then(|e| e.raw_os_error()),
        Some(libc::EBUSY),
        "the crash left the filesystem frozen"
    );

    let mut driver = start("");
    assert!(driver.wait_for_log("thawed a filesystem a previous run left frozen").is_some());
    // The pod writes again (from a thread: a frozen filesystem would block
    // the write, and the test must fail, not hang).
    let file = target.join("after");
    let (done, wrote) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(std::fs::write(&file, b"written after the restart"));
    });
    let outcome = wrote.recv_timeout(Duration::from_secs(30));
    if outcome.is_err() {
        let _ = ferrovol_host::node::freeze::thaw_if_frozen(&target);
    }
    outcome.expect("the write went through").unwrap();

    let ch = driver.channel().await;
    let (mut c, mut n) = (ControllerClient::new(ch.clone()), NodeClient::new(ch));
    let s = c.create_snapshot(req::snapshot("after-restart", &v)).await.unwrap().into_inner();
    n.node_unpublish_volume(unpublish_req(&v, &target)).await.unwrap();
    n.node_unstage_volume(unstage_req(&v, &staging)).await.unwrap();
    c.delete_snapshot(req::delete_snapshot(&s.snapshot.unwrap().snapshot_id)).await.unwrap();
    c.delete_volume(req::delete(&v)).await.unwrap();
    kubelet.assert_clean();
}
