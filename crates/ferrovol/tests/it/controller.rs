//! Controller service on the local engine: real files on a real XFS pool
//! (reflink) and on the ext4 fallback, through the real binary.

use crate::common;

use std::collections::HashSet;

use common::req::{self, GIB, MIB};
use common::{read_at, write_pattern, DriverBuilder, PoolFs, TestPool};
use ferrovol_csi as csi;
use ferrovol_csi::controller_client::ControllerClient;
use ferrovol_csi::identity_client::IdentityClient;
use ferrovol_csi::volume_capability::access_mode::Mode;
use tonic::transport::Channel;
use tonic::Code;

type Client = ControllerClient<Channel>;

async fn create(c: &mut Client, r: csi::CreateVolumeRequest) -> csi::Volume {
    c.create_volume(r).await.expect("CreateVolume").into_inner().volume.unwrap()
}

async fn snapshot(c: &mut Client, name: &str, source: &str) -> csi::Snapshot {
    c.create_snapshot(req::snapshot(name, source))
        .await
        .expect("CreateSnapshot")
        .into_inner()
        .snapshot
        .unwrap()
}

fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> Code {
    r.expect_err("expected an error").code()
}

/// The user's walkthrough, byte for byte: snapshot mysql-pvc, overwrite it,
/// restore the snapshot, clone the volume, delete with space returned.
async fn walkthrough(fs: PoolFs) {
    let pool = TestPool::new(fs).await;
    let root = tempfile::tempdir().unwrap();
    let driver = DriverBuilder::new(root.path()).pool(&pool).start();
    let mut c = ControllerClient::new(driver.channel().await);

    let vol = create(&mut c, req::create("mysql-pvc", GIB)).await;
    assert_eq!(vol.capacity_bytes, GIB);
    let vol_file = pool.volume_file(&vol.volume_id);
    write_pattern(&vol_file, 0, 16 << 20, 1);
    write_pattern(&vol_file, (GIB as u64) - (1 << 20), 1 << 20, 2);

    let snap = snapshot(&mut c, "mysql-snapshot-demo", &vol.volume_id).await;
    assert!(snap.ready_to_use);
    assert_eq!(snap.size_bytes, GIB);
    assert_eq!(snap.source_volume_id, vol.volume_id);
    assert!(snap.creation_time.is_some_and(|t| t.seconds > 0));

    // The application keeps writing after the snapshot.
    write_pattern(&vol_file, 0, 16 << 20, 9);

    let restored =
        create(&mut c, req::from_snapshot("mysql-restore-pvc", &snap.snapshot_id, GIB)).await;
    let restored_file = pool.volume_file(&restored.volume_id);
    assert_eq!(read_at(&restored_file, 0, 16 << 20), {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        tmp.as_file().set_len(16 << 20).unwrap();
        write_pattern(tmp.path(), 0, 16 << 20, 1);
        read_at(tmp.path(), 0, 16 << 20)
    });
    assert_eq!(
        read_at(&restored_file, (GIB as u64) - (1 << 20), 1 << 20),
        read_at(&vol_file, (GIB as u64) - (1 << 20), 1 << 20)
    );
    assert!(matches!(
        restored.content_source.and_then(|s| s.r#type),
        Some(csi::volume_content_source::Type::Snapshot(s)) if s.snapshot_id == snap.snapshot_id
    ));

    let clone = create(&mut c, req::from_volume("mysql-clone-pvc", &vol.volume_id, GIB)).await;
    assert_eq!(
        read_at(&pool.volume_file(&clone.volume_id), 0, 16 << 20),
        read_at(&vol_file, 0, 16 << 20)
    );

    // A larger request grows the result; a limit below the source fails.
    let bigger = create(&mut c, req::from_snapshot("bigger", &snap.snapshot_id, 2 * GIB)).await;
    assert_eq!(bigger.capacity_bytes, 2 * GIB);
    assert_eq!(
        std::fs::metadata(pool.volume_file(&bigger.volume_id)).unwrap().len(),
        2 * GIB as u64
    );
    let mut small = req::from_snapshot("too-small", &snap.snapshot_id, 0);
    small.capacity_range = req::range(0, GIB / 2);
    assert_eq!(code(c.create_volume(small).await), Code::OutOfRange);

    // Snapshots outlive their source; deleting returns the space.
    let held_before = pool.allocated();
    assert!(held_before > 16 << 20, "the written data is held: {held_before}");
    c.delete_volume(req::delete(&vol.volume_id)).await.unwrap();
    assert!(!vol_file.exists());
    let again =
        create(&mut c, req::from_snapshot("after-source-deleted", &snap.snapshot_id, 0)).await;
    assert_eq!(
        read_at(&pool.volume_file(&again.volume_id), 0, 1 << 20),
        read_at(&restored_file, 0, 1 << 20)
    );
    for id in [&restored.volume_id, &clone.volume_id, &bigger.volume_id, &again.volume_id] {
        c.delete_volume(req::delete(id)).await.unwrap();
    }
    c.delete_snapshot(req::delete_snapshot(&snap.snapshot_id)).await.unwrap();
    assert!(pool.files("volumes").is_empty(), "{:?}", pool.files("volumes"));
    assert!(pool.files("snapshots").is_empty());
    assert_eq!(pool.allocated(), 0, "space is returned after delete");
}

#[tokio::test(flavor = "multi_thread")]
async fn walkthrough_on_xfs_reflink_pool() {
    walkthrough(PoolFs::Xfs).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn walkthrough_on_ext4_copy_fallback() {
    walkthrough(PoolFs::Ext4).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn reflink_pool_shares_blocks_and_says_so() {
    let pool = TestPool::new(PoolFs::Xfs).await;
    let root = tempfile::tempdir().unwrap();
    let driver = DriverBuilder::new(root.path()).pool(&pool).start();
    let mut id = IdentityClient::new(driver.channel().await);
    let info = id.get_plugin_info(csi::GetPluginInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.manifest.get("cow_method").map(String::as_str), Some("reflink"));
    assert_eq!(info.manifest.get("engine").map(String::as_str), Some("local"));

    let mut c = ControllerClient::new(driver.channel().await);
    let vol = create(&mut c, req::create("data", GIB)).await;
    write_pattern(&pool.volume_file(&vol.volume_id), 0, 256 << 20, 3);
    let before = pool.free();
    snapshot(&mut c, "s1", &vol.volume_id).await;
    create(&mut c, req::from_volume("c1", &vol.volume_id, 0)).await;
    let used = before.saturating_sub(pool.free());
    assert!(used < 16 << 20, "snapshot + clone of 256 MiB used {used} bytes: blocks were copied");
}

#[tokio::test(flavor = "multi_thread")]
async fn ext4_pool_reports_the_copy_method() {
    let pool = TestPool::new(PoolFs::Ext4).await;
    let root = tempfile::tempdir().unwrap();
    let mut driver = DriverBuilder::new(root.path()).pool(&pool).start();
    assert!(driver.wait_for_log("no reflink").is_some());
    let mut id = IdentityClient::new(driver.channel().await);
    let info = id.get_plugin_info(csi::GetPluginInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.manifest.get("cow_method").map(String::as_str), Some("copy"));
}

#[tokio::test(flavor = "multi_thread")]
async fn create_is_idempotent_and_conflicts_are_already_exists() {
    let pool = TestPool::new(PoolFs::Ext4).await;
    let root = tempfile::tempdir().unwrap();
    let driver = DriverBuilder::new(root.path()).pool(&pool).start();
    let mut c = ControllerClient::new(driver.channel().await);

    let a = create(&mut c, req::create("pvc-a", GIB)).await;
    let b = create(&mut c, req::create("pvc-a", GIB)).await;
    assert_eq!(a, b);
    let mut wider = req::create("pvc-a", GIB / 2);
    wider.capacity_range = req::range(GIB / 2, 2 * GIB);
    assert_eq!(create(&mut c, wider).await.volume_id, a.volume_id, "1 GiB satisfies [0.5, 2] GiB");

    assert_eq!(code(c.create_volume(req::create("pvc-a", 2 * GIB)).await), Code::AlreadyExists);
    let mut thick = req::create("pvc-a", GIB);
    thick.parameters.insert("provisioning".into(), "thick".into());
    assert_eq!(code(c.create_volume(thick).await), Code::AlreadyExists);
    assert_eq!(
        code(c.create_volume(req::from_volume("pvc-a", &a.volume_id, GIB)).await),
        Code::AlreadyExists
    );
    assert_eq!(pool.files("volumes").len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_create_requests_get_the_spec_codes() {
    let pool = TestPool::with_size(PoolFs::Xfs, 2 << 30).await;
    let root = tempfile::tempdir().unwrap();
    let driver = DriverBuilder::new(root.path()).pool(&pool).start();
    let mut c = ControllerClient::new(driver.channel().await);

    let cases: Vec<(&str, csi::CreateVolumeRequest, Code)> = vec![
        ("no name", req::create("", GIB), Code::InvalidArgument),
        (
            "no capabilities",
            csi::CreateVolumeRequest { volume_capabilities: vec![], ..req::create("x", GIB) },
            Code::InvalidArgument,
        ),
        (
            "multi-node",
            csi::CreateVolumeRequest {
                volume_capabilities: vec![req::cap_with_mode(Mode::MultiNodeMultiWriter)],
                ..req::create("x", GIB)
            },
            Code::InvalidArgument,
        ),
        (
            "limit below required",
            csi::CreateVolumeRequest {
                capacity_range: req::range(2 * GIB, GIB),
                ..req::create("x", 0)
            },
            Code::InvalidArgument,
        ),
        ("negative", req::create("x", -1), Code::InvalidArgument),
        (
            "unknown fs",
            csi::CreateVolumeRequest {
                volume_capabilities: vec![req::mount_cap("ntfs")],
                ..req::create("x", GIB)
            },
            Code::InvalidArgument,
        ),
        (
            "unknown parameter",
            csi::CreateVolumeRequest {
                parameters: [("colour".to_string(), "blue".to_string())].into(),
                ..req::create("x", GIB)
            },
            Code::InvalidArgument,
        ),
        (
            "bad provisioning",
            csi::CreateVolumeRequest {
                parameters: [("provisioning".to_string(), "fat".to_string())].into(),
                ..req::create("x", GIB)
            },
            Code::InvalidArgument,
        ),
        ("bigger than the pool can ever hold", req::create("x", 64 * GIB), Code::OutOfRange),
        (
            "unknown snapshot source",
            req::from_snapshot("x", "snap-doesnotexist", GIB),
            Code::NotFound,
        ),
        (
            "hostile volume source",
            req::from_volume("x", "../../../etc/passwd", GIB),
            Code::NotFound,
        ),
        (
            "elsewhere",
            csi::CreateVolumeRequest {
                accessibility_requirements: Some(csi::TopologyRequirement {
                    requisite: vec![csi::Topology {
                        segments: [(
                            "local.csi.ferrovol.io/node".to_string(),
                            "other-node".to_string(),
                        )]
                        .into(),
                    }],
                    preferred: vec![],
                }),
                ..req::create("x", GIB / 4)
            },
            Code::ResourceExhausted,
        ),
    ];
    for (what, r, want) in cases {
        assert_eq!(code(c.create_volume(r).await), want, "{what}");
    }
    assert!(pool.files("volumes").is_empty(), "failed requests create nothing");

    // The CO's own keys are accepted and ignored; the topology of this node
    // is accepted.
    let mut ok = req::create("fine", 5000);
    ok.parameters.insert("csi.storage.k8s.io/pvc/name".into(), "fine".into());
    ok.accessibility_requirements = Some(csi::TopologyRequirement {
        requisite: vec![csi::Topology {
            segments: [("local.csi.ferrovol.io/node".to_string(), "test-node".to_string())].into(),
        }],
        preferred: vec![],
    });
    let v = create(&mut c, ok).await;
    assert_eq!(v.capacity_bytes, MIB, "an ext4 volume is at least what mkfs.ext4 accepts");
    let block = csi::CreateVolumeRequest {
        volume_capabilities: vec![req::block_cap()],
        ..req::create("fine-block", 5000)
    };
    assert_eq!(create(&mut c, block).await.capacity_bytes, 8192, "rounded up to 4 KiB");
    assert_eq!(v.accessible_topology[0].segments["local.csi.ferrovol.io/node"], "test-node");
    let v = create(
        &mut c,
        csi::CreateVolumeRequest { capacity_range: None, ..req::create("default", 0) },
    )
    .await;
    assert_eq!(v.capacity_bytes, GIB, "default size");
    c.delete_volume(req::delete(&v.volume_id)).await.unwrap();

    // Thick volumes take real space; when it is gone: RESOURCE_EXHAUSTED.
    let mut thick = req::create("thick", 1200 * MIB);
    thick.parameters.insert("provisioning".into(), "thick".into());
    let t = create(&mut c, thick.clone()).await;
    let blocks = std::os::unix::fs::MetadataExt::blocks(
        &std::fs::metadata(pool.volume_file(&t.volume_id)).unwrap(),
    );
    assert!(blocks * 512 >= 1200 << 20, "thick volume is preallocated");
    thick.name = "thick-2".into();
    assert_eq!(code(c.create_volume(thick).await), Code::ResourceExhausted);
    assert_eq!(pool.files("volumes").len(), 3, "the refused volume left nothing");
}

#[tokio::test(flavor = "multi_thread")]
async fn delete_is_idempotent_and_refuses_attached_volumes() {
    let pool = TestPool::new(PoolFs::Ext4).await;
    let root = tempfile::tempdir().unwrap();
    let driver = DriverBuilder::new(root.path()).pool(&pool).start();
    let mut c = ControllerClient::new(driver.channel().await);
    let v = create(&mut c, req::create("attached", 64 * MIB)).await;

    struct Detach(std::path::PathBuf);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = ferrovol_host::loopdev::detach(&self.0);
        }
    }
    let dev = Detach(
        ferrovol_host::loopdev::attach(&pool.volume_file(&v.volume_id), false, 4096).unwrap(),
    );
    assert_eq!(code(c.delete_volume(req::delete(&v.volume_id)).await), Code::FailedPrecondition);
    assert!(pool.volume_file(&v.volume_id).exists());
    drop(dev);

    c.delete_volume(req::delete(&v.volume_id)).await.unwrap();
    c.delete_volume(req::delete(&v.volume_id)).await.expect("second delete is OK");
    c.delete_volume(req::delete("vol-00000000000000000000000000000000"))
        .await
        .expect("unknown is OK");
    c.delete_volume(req::delete("../../etc/passwd")).await.expect("malformed cannot exist: OK");
    assert_eq!(code(c.delete_volume(req::delete("")).await), Code::InvalidArgument);
    assert!(std::path::Path::new("/etc/passwd").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn volumes_and_snapshots_page_through_listings() {
    let pool = TestPool::new(PoolFs::Ext4).await;
    let root = tempfile::tempdir().unwrap();
    let driver = DriverBuilder::new(root.path()).pool(&pool).start();
    let mut c = ControllerClient::new(driver.channel().await);
    let mut made = HashSet::new();
    for i in 0..7 {
        made.insert(create(&mut c, req::create(&format!("v{i}"), 4 * MIB)).await.volume_id);
    }

    let mut seen = HashSet::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let r = c
            .list_volumes(csi::ListVolumesRequest { max_entries: 3, starting_token: token.clone() })
            .await
            .unwrap()
            .into_inner();
        assert!(r.entries.len() <= 3);
        for e in r.entries {
            let status = e.status.unwrap();
            assert!(!status.volume_condition.unwrap().abnormal);
            assert!(seen.insert(e.volume.unwrap().volume_id), "no volume twice");
        }
        pages += 1;
        if r.next_token.is_empty() {
            break;
        }
        token = r.next_token;
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, made);
    let all = c.list_volumes(csi::ListVolumesRequest::default()).await.unwrap().into_inner();
    assert_eq!(all.entries.len(), 7);
    assert!(all.next_token.is_empty());
    let bad = csi::ListVolumesRequest { max_entries: 2, starting_token: "garbage".into() };
    assert_eq!(code(c.list_volumes(bad).await), Code::Aborted);
    let neg = csi::ListVolumesRequest { max_entries: -1, ..Default::default() };
    assert_eq!(code(c.list_volumes(neg).await), Code::InvalidArgument);

    // Snapshots: filters and paging.
    let vols: Vec<String> = made.iter().cloned().collect();
    let mut snaps = Vec::new();
    for i in 0..5 {
        snaps.push(snapshot(&mut c, &format!("s{i}"), &vols[i % 2]).await);
    }
    let by_source = c
        .list_snapshots(csi::ListSnapshotsRequest {
            source_volume_id: vols[0].clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_source.entries.len(), 3);
    let by_id = c
        .list_snapshots(csi::ListSnapshotsRequest {
            snapshot_id: snaps[4].snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_id.entries.len(), 1);
    assert_eq!(by_id.entries[0].snapshot.as_ref().unwrap(), &snaps[4]);
    let unknown = c
        .list_snapshots(csi::ListSnapshotsRequest {
            snapshot_id: "snap-nope".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(unknown.entries.is_empty(), "an unknown id filters to nothing, not an error");
    let page1 = c
        .list_snapshots(csi::ListSnapshotsRequest { max_entries: 2, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page1.entries.len(), 2);
    let page2 = c
        .list_snapshots(csi::ListSnapshotsRequest {
            max_entries: 10,
            starting_token: page1.next_token,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page2.entries.len(), 3);
    assert!(page2.next_token.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshot_rules() {
    let pool = TestPool::new(PoolFs::Xfs).await;
    let root = tempfile::tempdir().unwrap();
    let driver = DriverBuilder::new(root.path()).pool(&pool).start();
    let mut c = ControllerClient::new(driver.channel().await);
    let a = create(&mut c, req::create("a", 64 * MIB)).await;
    let b = create(&mut c, req::create("b", 64 * MIB)).await;

    let s = snapshot(&mut c, "snap", &a.volume_id).await;
    assert_eq!(snapshot(&mut c, "snap", &a.volume_id).await, s, "idempotent by name");
    assert_eq!(
        code(c.create_snapshot(req::snapshot("snap", &b.volume_id)).await),
        Code::AlreadyExists
    );
    assert_eq!(code(c.create_snapshot(req::snapshot("other", "vol-nope")).await), Code::NotFound);
    assert_eq!(
        code(c.create_snapshot(req::snapshot("", &a.volume_id)).await),
        Code::InvalidArgument
    );
    assert_eq!(code(c.create_snapshot(req::snapshot("x", "")).await), Code::InvalidArgument);
    let mut with_param = req::snapshot("p", &a.volume_id);
    with_param.parameters.insert("bogus".into(), "1".into());
    assert_eq!(code(c.create_snapshot(with_param).await), Code::InvalidArgument);

    let got = c
        .get_snapshot(csi::GetSnapshotRequest {
            snapshot_id: s.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(got, s);
    let missing = csi::GetSnapshotRequest { snapshot_id: "snap-0000".into(), ..Default::default() };
    assert_eq!(code(c.get_snapshot(missing).await), Code::NotFound);

    // Snapshot files are read-only.
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(pool.snapshot_file(&s.snapshot_id)).unwrap().permissions(),
    );
    assert_eq!(mode & 0o222, 0, "snapshot files are sealed");

    c.delete_snapshot(req::delete_snapshot(&s.snapshot_id)).await.unwrap();
    c.delete_snapshot(req::delete_snapshot(&s.snapshot_id)).await.expect("idempotent");
    c.delete_snapshot(req::delete_snapshot("../x")).await.expect("malformed: nothing to delete");
    assert_eq!(code(c.delete_snapshot(req::delete_snapshot("")).await), Code::InvalidArgument);
    assert!(pool.files("snapshots").is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn capacity_get_volume_and_validate() {
    let pool = TestPool::new(PoolFs::Xfs).await;
    let root = tempfile::tempdir().unwrap();
    let driver = DriverBuilder::new(root.path()).pool(&pool).start();
    let mut c = ControllerClient::new(driver.channel().await);

    let cap = c.get_capacity(csi::GetCapacityRequest::default()).await.unwrap().into_inner();
    let free = pool.free() as i64;
    assert!(
        (cap.available_capacity - free).abs() < 64 * MIB,
        "{} vs {free}",
        cap.available_capacity
    );
    let max = cap.maximum_volume_size.unwrap();
    assert!(max > 3 * GIB && max <= 4 * GIB, "{max}");
    let elsewhere = csi::GetCapacityRequest {
        accessible_topology: Some(csi::Topology {
            segments: [("local.csi.ferrovol.io/node".to_string(), "elsewhere".to_string())].into(),
        }),
        ..Default::default()
    };
    assert_eq!(c.get_capacity(elsewhere).await.unwrap().into_inner().available_capacity, 0);
    let multi = csi::GetCapacityRequest {
        volume_capabilities: vec![req::cap_with_mode(Mode::MultiNodeMultiWriter)],
        ..Default::default()
    };
    assert_eq!(c.get_capacity(multi).await.unwrap().into_inner().available_capacity, 0);

    let v = create(&mut c, req::create("v", 64 * MIB)).await;
    let get = |id: &str| csi::ControllerGetVolumeRequest { volume_id: id.into() };
    let r = c.controller_get_volume(get(&v.volume_id)).await.unwrap().into_inner();
    assert_eq!(r.volume.unwrap(), v);
    assert!(!r.status.unwrap().volume_condition.unwrap().abnormal);
    assert_eq!(code(c.controller_get_volume(get("vol-missing")).await), Code::NotFound);

    let validate = |caps| csi::ValidateVolumeCapabilitiesRequest {
        volume_id: v.volume_id.clone(),
        volume_capabilities: caps,
        ..Default::default()
    };
    let ok = c
        .validate_volume_capabilities(validate(vec![req::mount_cap("xfs"), req::block_cap()]))
        .await
        .unwrap();
    assert!(ok.into_inner().confirmed.is_some());
    let no = c
        .validate_volume_capabilities(validate(vec![req::cap_with_mode(Mode::MultiNodeReaderOnly)]))
        .await
        .unwrap()
        .into_inner();
    assert!(no.confirmed.is_none());
    assert!(!no.message.is_empty());
    assert_eq!(code(c.validate_volume_capabilities(validate(vec![])).await), Code::InvalidArgument);
    let mut unknown = validate(vec![req::mount_cap("")]);
    unknown.volume_id = "vol-unknown".into();
    assert_eq!(code(c.validate_volume_capabilities(unknown).await), Code::NotFound);

    // The backing file vanishing behind our back is an abnormal condition.
    std::fs::remove_file(pool.volume_file(&v.volume_id)).unwrap();
    let r = c.controller_get_volume(get(&v.volume_id)).await.unwrap().into_inner();
    let cond = r.status.unwrap().volume_condition.unwrap();
    assert!(cond.abnormal);
    assert!(cond.message.contains("missing"), "{}", cond.message);
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_same_name_creates_yield_one_volume() {
    let pool = TestPool::new(PoolFs::Xfs).await;
    let root = tempfile::tempdir().unwrap();
    let driver = DriverBuilder::new(root.path()).pool(&pool).start();
    let channel = driver.channel().await;
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let mut c = ControllerClient::new(channel.clone());
            tokio::spawn(async move { c.create_volume(req::create("racy", 64 * MIB)).await })
        })
        .collect();
    let mut ids = HashSet::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(r) => {
                ids.insert(r.into_inner().volume.unwrap().volume_id);
            }
            Err(s) => assert_eq!(s.code(), Code::Aborted, "{s:?}"),
        }
    }
    // The sidecar retries ABORTED; the retry must converge on the same volume.
    let mut c = ControllerClient::new(channel);
    ids.insert(create(&mut c, req::create("racy", 64 * MIB)).await.volume_id);
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_eq!(pool.files("volumes").len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn in_flight_operations_abort_conflicts_but_nothing_else() {
    let pool = TestPool::new(PoolFs::Xfs).await;
    let root = tempfile::tempdir().unwrap();
    let (mut driver, fifo) =
        common::driver_paused_at(root.path(), &pool, "create-snapshot-after-reserve");
    let channel = driver.channel().await;
    let mut c = ControllerClient::new(channel.clone());
    let v = create(&mut c, req::create("busy", 64 * MIB)).await;

    let mut slow = ControllerClient::new(channel.clone());
    let vid = v.volume_id.clone();
    let in_flight =
        tokio::spawn(async move { slow.create_snapshot(req::snapshot("held", &vid)).await });
    assert!(driver.wait_for_log("failpoint reached").is_some());

    // Same snapshot name, or deleting its source: ABORTED at once.
    assert_eq!(code(c.create_snapshot(req::snapshot("held", &v.volume_id)).await), Code::Aborted);
    assert_eq!(code(c.delete_volume(req::delete(&v.volume_id)).await), Code::Aborted);
    // Everything else proceeds: other volumes, clones of the same source, Probe.
    create(&mut c, req::create("independent", 4 * MIB)).await;
    create(&mut c, req::from_volume("clone-while-busy", &v.volume_id, 0)).await;
    let mut id = IdentityClient::new(channel);
    assert_eq!(id.probe(csi::ProbeRequest {}).await.unwrap().into_inner().ready, Some(true));

    std::fs::write(&fifo, b"go").unwrap();
    let s = in_flight
        .await
        .unwrap()
        .expect("the held snapshot completes")
        .into_inner()
        .snapshot
        .unwrap();
    assert!(s.ready_to_use);
}

#[tokio::test(flavor = "multi_thread")]
async fn unsupported_rpcs_are_unimplemented() {
    let pool = TestPool::new(PoolFs::Ext4).await;
    let root = tempfile::tempdir().unwrap();
    let driver = DriverBuilder::new(root.path()).pool(&pool).start();
    let channel = driver.channel().await;
    let mut c = ControllerClient::new(channel.clone());
    let publish = csi::ControllerPublishVolumeRequest {
        volume_id: "v".into(),
        node_id: "n".into(),
        ..Default::default()
    };
    assert_eq!(code(c.controller_publish_volume(publish).await), Code::Unimplemented);
    let modify = csi::ControllerModifyVolumeRequest { volume_id: "v".into(), ..Default::default() };
    assert_eq!(code(c.controller_modify_volume(modify).await), Code::Unimplemented);
    let expand = csi::ControllerExpandVolumeRequest { volume_id: "v".into(), ..Default::default() };
    assert_eq!(code(c.controller_expand_volume(expand).await), Code::Unimplemented);
    let caps = c
        .controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    use csi::controller_service_capability::rpc::Type as Cap;
    let advertised: Vec<i32> = caps
        .capabilities
        .iter()
        .filter_map(|c| {
            c.r#type.as_ref().map(|csi::controller_service_capability::Type::Rpc(r)| r.r#type)
        })
        .collect();
    for not in [Cap::PublishUnpublishVolume, Cap::ExpandVolume, Cap::ModifyVolume] {
        assert!(!advertised.contains(&(not as i32)), "{not:?} must not be advertised");
    }
    for yes in
        [Cap::CreateDeleteVolume, Cap::CreateDeleteSnapshot, Cap::CloneVolume, Cap::GetSnapshot]
    {
        assert!(advertised.contains(&(yes as i32)), "{yes:?} must be advertised");
    }
    // A service this process does not register answers UNIMPLEMENTED.
    drop(channel);
    drop(driver);
    let node_only_root = tempfile::tempdir().unwrap();
    let node_only =
        DriverBuilder::new(node_only_root.path()).pool(&pool).args(["--mode", "node"]).start();
    let mut c = ControllerClient::new(node_only.channel().await);
    assert_eq!(code(c.create_volume(req::create("x", MIB)).await), Code::Unimplemented);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_driver_on_the_same_pool_is_refused() {
    let pool = TestPool::new(PoolFs::Ext4).await;
    let root = tempfile::tempdir().unwrap();
    let _first = DriverBuilder::new(root.path()).pool(&pool).start();
    let other = root.path().join("second");
    std::fs::create_dir(&other).unwrap();
    let mut second = DriverBuilder::new(&other).pool(&pool).spawn();
    assert!(!second.wait().success());
    assert!(second.logs().contains("locked by another process"), "{}", second.logs());
}
