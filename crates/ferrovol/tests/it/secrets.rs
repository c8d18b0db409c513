//! Secrets go through every RPC that carries them, in calls that succeed and
//! in calls that fail, and must show up in no log line (at trace level), no
//! error message and no metric.

use crate::common;

use std::collections::HashMap;

use common::req::{self, publish_req, stage_req, unpublish_req, unstage_req, MIB};
use common::{http_get, logged_addr, DriverBuilder, Kubelet, PoolFs, TestPool};
use ferrovol_csi as csi;
use ferrovol_csi::controller_client::ControllerClient;
use ferrovol_csi::group_controller_client::GroupControllerClient;
use ferrovol_csi::node_client::NodeClient;
use ferrovol_csi::snapshot_metadata_client::SnapshotMetadataClient;

const SECRET: &str = "hunter2-do-not-log-7f3a";
const TOKEN: &str = "bearer-token-never-log-91c2";

fn token() -> HashMap<String, String> {
    [("token".to_string(), TOKEN.to_string())].into()
}

/// Every status message the test saw, to be searched for the secret.
#[derive(Default)]
struct Seen(Vec<String>);

impl Seen {
    /// Records the outcome of a call; answers the response when it worked.
    fn note<T>(&mut self, r: Result<tonic::Response<T>, tonic::Status>) -> Option<T> {
        match r {
            Ok(r) => Some(r.into_inner()),
            Err(s) => {
                self.0.push(format!("{:?}: {}", s.code(), s.message()));
                None
            }
        }
    }
}

fn secrets() -> HashMap<String, String> {
    // The secret also sits in a key: some sidecars pass a key named after
    // the credential itself.
    [("password".to_string(), SECRET.to_string()), (format!("{SECRET}-key"), SECRET.to_string())]
        .into()
}

#[tokio::test(flavor = "multi_thread")]
async fn secrets_reach_no_log_error_or_metric() {
    let pool = TestPool::new(PoolFs::Xfs).await;
    let kubelet = Kubelet::new(&pool);
    let root = tempfile::tempdir().unwrap();
    let mut driver = DriverBuilder::new(root.path())
        .pool(&pool)
        .kubelet(&kubelet)
        .env("RUST_LOG", "trace")
        .args(["--metrics-addr", "127.0.0.1:0"])
        .start();
    let addr = logged_addr(&driver.wait_for_log("metrics listening").unwrap());
    let ch = driver.channel().await;
    let mut c = ControllerClient::new(ch.clone());
    let mut g = GroupControllerClient::new(ch.clone());
    let mut n = NodeClient::new(ch.clone());
    let mut m = SnapshotMetadataClient::new(ch);
    let s = secrets();
    let mut seen = Seen::default();
    let cap = req::mount_cap("ext4");
    const BAD: &str = "vol-doesnotexist";

    // Controller: every call once as it should be and once failing.
    let mut create = req::create("secretive", 16 * MIB);
    create.secrets = s.clone();
    let vol = seen.note(c.create_volume(create.clone()).await).unwrap().volume.unwrap().volume_id;
    let mut bad = create.clone();
    bad.name = String::new();
    seen.note(c.create_volume(bad).await);
    let mut conflicting = create.clone();
    conflicting.capacity_range = req::range(32 * MIB, 0);
    seen.note(c.create_volume(conflicting).await);
    for id in [vol.as_str(), BAD] {
        seen.note(
            c.validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
                volume_id: id.into(),
                volume_capabilities: vec![cap.clone()],
                secrets: s.clone(),
                ..Default::default()
            })
            .await,
        );
        seen.note(
            c.controller_publish_volume(csi::ControllerPublishVolumeRequest {
                volume_id: id.into(),
                node_id: "test-node".into(),
                volume_capability: Some(cap.clone()),
                secrets: s.clone(),
                ..Default::default()
            })
            .await,
        );
        seen.note(
            c.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
                volume_id: id.into(),
                node_id: "test-node".into(),
                secrets: s.clone(),
            })
            .await,
        );
        seen.note(
            c.controller_expand_volume(csi::ControllerExpandVolumeRequest {
                volume_id: id.into(),
                capacity_range: req::range(32 * MIB, 0),
                secrets: s.clone(),
                ..Default::default()
            })
            .await,
        );
        seen.note(
            c.controller_modify_volume(csi::ControllerModifyVolumeRequest {
                volume_id: id.into(),
                secrets: s.clone(),
                mutable_parameters: [("iops".to_string(), "100".to_string())].into(),
            })
            .await,
        );
    }
    let mut snap_req = req::snapshot("secret-snap", &vol);
    snap_req.secrets = s.clone();
    let snap = seen.note(c.create_snapshot(snap_req).await).unwrap().snapshot.unwrap().snapshot_id;
    let mut bad_snap = req::snapshot("secret-snap-2", BAD);
    bad_snap.secrets = s.clone();
    seen.note(c.create_snapshot(bad_snap).await);
    for id in [snap.as_str(), "snap-doesnotexist"] {
        seen.note(
            c.list_snapshots(csi::ListSnapshotsRequest {
                snapshot_id: id.into(),
                secrets: s.clone(),
                ..Default::default()
            })
            .await,
        );
        seen.note(
            c.get_snapshot(csi::GetSnapshotRequest { snapshot_id: id.into(), secrets: s.clone() })
                .await,
        );
    }
    seen.note(
        c.list_snapshots(csi::ListSnapshotsRequest {
            starting_token: "not-a-token".into(),
            secrets: s.clone(),
            ..Default::default()
        })
        .await,
    );

    // Group controller.
    let group = seen
        .note(
            g.create_volume_group_snapshot(csi::CreateVolumeGroupSnapshotRequest {
                name: "secret-group".into(),
                source_volume_ids: vec![vol.clone()],
                secrets: s.clone(),
                ..Default::default()
            })
            .await,
        )
        .unwrap()
        .group_snapshot
        .unwrap();
    seen.note(
        g.create_volume_group_snapshot(csi::CreateVolumeGroupSnapshotRequest {
            name: "secret-group-2".into(),
            source_volume_ids: vec![BAD.into()],
            secrets: s.clone(),
            ..Default::default()
        })
        .await,
    );
    for id in [group.group_snapshot_id.as_str(), "group-doesnotexist"] {
        seen.note(
            g.get_volume_group_snapshot(csi::GetVolumeGroupSnapshotRequest {
                group_snapshot_id: id.into(),
                snapshot_ids: group.snapshots.iter().map(|s| s.snapshot_id.clone()).collect(),
                secrets: s.clone(),
            })
            .await,
        );
    }

    // Snapshot metadata.
    for id in [snap.as_str(), "snap-doesnotexist"] {
        let allocated = m
            .get_metadata_allocated(csi::GetMetadataAllocatedRequest {
                secrets: token(),
                snapshot_id: id.into(),
                ..Default::default()
            })
            .await;
        if let Some(mut stream) = seen.note(allocated) {
            while let Ok(Some(_)) = stream.message().await {}
        }
        let delta = m
            .get_metadata_delta(csi::GetMetadataDeltaRequest {
                secrets: token(),
                base_snapshot_id: snap.clone(),
                target_snapshot_id: id.into(),
                ..Default::default()
            })
            .await;
        if let Some(mut stream) = seen.note(delta) {
            while let Ok(Some(_)) = stream.message().await {}
        }
    }

    // Node.
    let staging = kubelet.staging("pv");
    let target = kubelet.target("pod", "pv");
    let mut stage = stage_req(&vol, &staging, cap.clone());
    stage.secrets = s.clone();
    let mut bad_stage = stage.clone();
    bad_stage.volume_id = BAD.into();
    seen.note(n.node_stage_volume(bad_stage).await);
    seen.note(n.node_stage_volume(stage).await).unwrap();
    let mut publish = publish_req(&vol, &staging, &target, cap.clone(), false);
    publish.secrets = s.clone();
    let mut bad_publish = publish.clone();
    bad_publish.target_path = "/etc/outside".into();
    seen.note(n.node_publish_volume(bad_publish).await);
    seen.note(n.node_publish_volume(publish).await).unwrap();
    for id in [vol.as_str(), BAD] {
        seen.note(
            n.node_expand_volume(csi::NodeExpandVolumeRequest {
                volume_id: id.into(),
                volume_path: target.display().to_string(),
                capacity_range: req::range(32 * MIB, 0),
                secrets: s.clone(),
                ..Default::default()
            })
            .await,
        );
    }
    seen.note(n.node_unpublish_volume(unpublish_req(&vol, &target)).await).unwrap();
    seen.note(n.node_unstage_volume(unstage_req(&vol, &staging)).await).unwrap();
    kubelet.assert_clean();

    // Deletes, and deletes refused.
    seen.note(
        c.delete_volume(csi::DeleteVolumeRequest { volume_id: vol.clone(), secrets: s.clone() })
            .await,
    );
    for id in [snap.as_str(), "../etc/passwd"] {
        seen.note(
            c.delete_snapshot(csi::DeleteSnapshotRequest {
                snapshot_id: id.into(),
                secrets: s.clone(),
            })
            .await,
        );
    }
    for id in [group.group_snapshot_id.as_str(), "group-doesnotexist"] {
        seen.note(
            g.delete_volume_group_snapshot(csi::DeleteVolumeGroupSnapshotRequest {
                group_snapshot_id: id.into(),
                snapshot_ids: group.snapshots.iter().map(|s| s.snapshot_id.clone()).collect(),
                secrets: s.clone(),
            })
            .await,
        );
    }
    seen.note(
        c.delete_volume(csi::DeleteVolumeRequest { volume_id: vol, secrets: s.clone() }).await,
    )
    .unwrap();

    let (_, metrics) = http_get(&addr, "/metrics").await;
    drop((c, g, n, m));
    assert!(driver.terminate().success());
    let logs = driver.logs();

    // The checks can fail: the calls did happen, were logged, and failed
    // where they were meant to.
    assert!(seen.0.len() >= 15, "expected failures were seen: {:?}", seen.0);
    for method in
        ["CreateVolume", "NodeStageVolume", "GetMetadataDelta", "CreateVolumeGroupSnapshot"]
    {
        assert!(logs.contains(method), "{method} is in the log");
        assert!(metrics.contains(method), "{method} is in the metrics");
    }
    for needle in [SECRET, TOKEN] {
        assert!(!logs.contains(needle), "a secret leaked into the log");
        assert!(!metrics.contains(needle), "a secret leaked into the metrics");
        for msg in &seen.0 {
            assert!(!msg.contains(needle), "a secret leaked into an error: {msg}");
        }
    }
}
