//! Volume group snapshots: point-in-time across members with live writers,
//! rollback, idempotency, the spec's error codes and deletion rules.

use crate::common;

use std::path::PathBuf;

use common::req::{self, new_volume, publish_req, stage_req, unpublish_req, unstage_req, MIB};
use common::{env, last_seq, Env, Lockstep, PoolFs};
use ferrovol_csi as csi;
use ferrovol_csi::group_controller_client::GroupControllerClient;
use tonic::Code;

fn group_req(name: &str, vols: &[String]) -> csi::CreateVolumeGroupSnapshotRequest {
    csi::CreateVolumeGroupSnapshotRequest {
        name: name.into(),
        source_volume_ids: vols.to_vec(),
        ..Default::default()
    }
}

/// Volumes staged and published like a pod's: (volume id, staging, target).
async fn mounted_volumes(e: &Env, n: usize) -> Vec<(String, PathBuf, PathBuf)> {
    let (mut c, mut node) = e.clients().await;
    let cap = req::mount_cap("ext4");
    let mut out = Vec::new();
    for i in 0..n {
        let id = new_volume(&mut c, &format!("app-{i}"), 64 * MIB, cap.clone()).await;
        let staging = e.kubelet.staging(&format!("pv{i}"));
        let target = e.kubelet.target("app", &format!("pv{i}"));
        node.node_stage_volume(stage_req(&id, &staging, cap.clone())).await.unwrap();
        node.node_publish_volume(publish_req(&id, &staging, &target, cap.clone(), false))
            .await
            .unwrap();
        out.push((id, staging, target));
    }
    out
}

async fn unmount_all(e: &Env, vols: &[(String, PathBuf, PathBuf)]) {
    let (_, mut node) = e.clients().await;
    for (id, staging, target) in vols {
        node.node_unpublish_volume(unpublish_req(id, target)).await.unwrap();
        node.node_unstage_volume(unstage_req(id, staging)).await.unwrap();
    }
}

/// Writers append sequence numbers to every member in lockstep (seq N goes
/// to member 0, then 1, …, before N+1 starts) while the group snapshot is
/// taken; every restored member must end within one step of the others.
async fn point_in_time(members: usize) {
    let e = env(PoolFs::Xfs).await;
    let vols = mounted_volumes(&e, members).await;
    let writer = Lockstep::start(&vols);
    let mut g = GroupControllerClient::new(e.driver.channel().await);
    let ids: Vec<String> = vols.iter().map(|v| v.0.clone()).collect();
    let group = g.create_volume_group_snapshot(group_req("consistent", &ids)).await.unwrap();
    let group = group.into_inner().group_snapshot.unwrap();
    // Some steps after the instant, whatever the machine's load: a member
    // ending at the last step written would prove nothing.
    writer.advance(2);
    let written = writer.stop();
    assert_eq!(group.snapshots.len(), members);
    assert!(group.ready_to_use && group.creation_time.is_some());

    // Restore every member and read where its log ended.
    let (mut c, mut node) = e.clients().await;
    let cap = req::mount_cap("ext4");
    let mut ends = Vec::new();
    for (i, s) in group.snapshots.iter().enumerate() {
        assert_eq!(s.group_snapshot_id, group.group_snapshot_id);
        assert!(ids.contains(&s.source_volume_id));
        let restored = c
            .create_volume(req::from_snapshot(&format!("restored-{i}"), &s.snapshot_id, 64 * MIB))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap()
            .volume_id;
        let staging = e.kubelet.staging(&format!("restored{i}"));
        node.node_stage_volume(stage_req(&restored, &staging, cap.clone())).await.unwrap();
        ends.push((s.source_volume_id.clone(), last_seq(&staging.join("log"))));
        node.node_unstage_volume(unstage_req(&restored, &staging)).await.unwrap();
    }
    let seqs: Vec<u64> = ends.iter().map(|e| e.1).collect();
    let (lo, hi) = (*seqs.iter().min().unwrap(), *seqs.iter().max().unwrap());
    assert!(lo > 0, "the snapshot holds the writers' data: {ends:?}");
    assert!(hi < written, "the snapshot is older than the last write");
    assert!(hi - lo <= 1, "members are from one instant: {ends:?}");
    unmount_all(&e, &vols).await;
    e.kubelet.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn two_members_share_one_instant() {
    point_in_time(2).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn four_members_share_one_instant() {
    point_in_time(4).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn idempotency_errors_and_deletion_rules() {
    let e = env(PoolFs::Xfs).await;
    let (mut c, _) = e.clients().await;
    let cap = req::mount_cap("");
    let a = new_volume(&mut c, "data", 16 * MIB, cap.clone()).await;
    let b = new_volume(&mut c, "logs", 16 * MIB, cap.clone()).await;
    let other = new_volume(&mut c, "other", 16 * MIB, cap.clone()).await;
    let mut g = GroupControllerClient::new(e.driver.channel().await);

    let first =
        g.create_volume_group_snapshot(group_req("grp", &[a.clone(), b.clone()])).await.unwrap();
    let first = first.into_inner().group_snapshot.unwrap();
    let again =
        g.create_volume_group_snapshot(group_req("grp", &[b.clone(), a.clone()])).await.unwrap();
    assert_eq!(again.into_inner().group_snapshot.unwrap(), first, "same name, same members");
    let code = |r: Result<tonic::Response<_>, tonic::Status>| {
        r.map(|_: tonic::Response<csi::CreateVolumeGroupSnapshotResponse>| ()).unwrap_err().code()
    };
    assert_eq!(
        code(g.create_volume_group_snapshot(group_req("grp", &[a.clone(), other.clone()])).await),
        Code::AlreadyExists
    );
    assert_eq!(
        code(g.create_volume_group_snapshot(group_req("x", &[a.clone(), "vol-nope".into()])).await),
        Code::NotFound
    );
    assert_eq!(
        code(g.create_volume_group_snapshot(group_req("x", &[])).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(g.create_volume_group_snapshot(group_req("x", &[a.clone(), a.clone()])).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(g.create_volume_group_snapshot(group_req("", std::slice::from_ref(&a))).await),
        Code::InvalidArgument
    );

    // Members look like snapshots that belong to the group…
    let member = &first.snapshots[0];
    let got = c
        .get_snapshot(csi::GetSnapshotRequest {
            snapshot_id: member.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(got.group_snapshot_id, first.group_snapshot_id);
    let listed = c.list_snapshots(csi::ListSnapshotsRequest::default()).await.unwrap().into_inner();
    assert_eq!(listed.entries.len(), 2);
    // …restore like any snapshot, but are not deleted on their own.
    c.create_volume(req::from_snapshot("from-member", &member.snapshot_id, 0)).await.unwrap();
    let del = c.delete_snapshot(req::delete_snapshot(&member.snapshot_id)).await.unwrap_err();
    assert_eq!(del.code(), Code::InvalidArgument, "the spec's code for a group member");

    let ids: Vec<String> = first.snapshots.iter().map(|s| s.snapshot_id.clone()).collect();
    let get = |snapshot_ids: Vec<String>| csi::GetVolumeGroupSnapshotRequest {
        group_snapshot_id: first.group_snapshot_id.clone(),
        snapshot_ids,
        ..Default::default()
    };
    assert_eq!(
        g.get_volume_group_snapshot(get(ids.clone()))
            .await
            .unwrap()
            .into_inner()
            .group_snapshot
            .unwrap(),
        first
    );
    g.get_volume_group_snapshot(get(vec![])).await.expect("no ids: no check");
    let wrong = g.get_volume_group_snapshot(get(vec![ids[0].clone()])).await.unwrap_err();
    assert_eq!(wrong.code(), Code::InvalidArgument);
    let delete = |snapshot_ids: Vec<String>| csi::DeleteVolumeGroupSnapshotRequest {
        group_snapshot_id: first.group_snapshot_id.clone(),
        snapshot_ids,
        ..Default::default()
    };
    let mismatch =
        g.delete_volume_group_snapshot(delete(vec!["snap-other".into()])).await.unwrap_err();
    assert_eq!(mismatch.code(), Code::InvalidArgument);
    g.delete_volume_group_snapshot(delete(ids.clone())).await.unwrap();
    g.delete_volume_group_snapshot(delete(ids)).await.expect("idempotent");
    assert_eq!(g.get_volume_group_snapshot(get(vec![])).await.unwrap_err().code(), Code::NotFound);
    let listed = c.list_snapshots(csi::ListSnapshotsRequest::default()).await.unwrap().into_inner();
    assert!(listed.entries.is_empty(), "members went with the group");
    assert!(e.pool.files("snapshots").is_empty() && e.pool.files("staging").is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_member_rolls_back_the_whole_group() {
    let e = env(PoolFs::Xfs).await;
    let (mut c, _) = e.clients().await;
    let cap = req::mount_cap("");
    let good = new_volume(&mut c, "good", 16 * MIB, cap.clone()).await;
    let lost = new_volume(&mut c, "lost", 16 * MIB, cap.clone()).await;
    std::fs::remove_file(e.pool.volume_file(&lost)).unwrap();
    let mut g = GroupControllerClient::new(e.driver.channel().await);
    let err =
        g.create_volume_group_snapshot(group_req("half", &[good.clone(), lost])).await.unwrap_err();
    assert_ne!(err.code(), Code::Ok);
    let listed = c.list_snapshots(csi::ListSnapshotsRequest::default()).await.unwrap().into_inner();
    assert!(listed.entries.is_empty(), "no half group: {listed:?}");
    assert!(e.pool.files("snapshots").is_empty() && e.pool.files("staging").is_empty());
    // The name is free again for a good group.
    g.create_volume_group_snapshot(group_req("half", &[good]))
        .await
        .expect("retry with good members");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_raw_block_member_is_refused() {
    let e = env(PoolFs::Ext4).await;
    let (mut c, mut node) = e.clients().await;
    let fs = new_volume(&mut c, "fs", 16 * MIB, req::mount_cap("")).await;
    let raw = new_volume(&mut c, "raw", 16 * MIB, req::block_cap()).await;
    let staging = e.kubelet.staging("raw");
    node.node_stage_volume(stage_req(&raw, &staging, req::block_cap())).await.unwrap();
    let mut g = GroupControllerClient::new(e.driver.channel().await);
    let err =
        g.create_volume_group_snapshot(group_req("mixed", &[fs, raw.clone()])).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("raw block"), "{err:?}");
    node.node_unstage_volume(unstage_req(&raw, &staging)).await.unwrap();
    e.kubelet.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_before_commit_leaves_no_member() {
    let pool = common::TestPool::new(PoolFs::Xfs).await;
    let root = tempfile::tempdir().unwrap();
    let vols = {
        let d = common::DriverBuilder::new(root.path()).pool(&pool).start();
        let mut c = ferrovol_csi::controller_client::ControllerClient::new(d.channel().await);
        let mut v = Vec::new();
        for n in ["m1", "m2"] {
            v.push(new_volume(&mut c, n, 8 * MIB, req::mount_cap("")).await);
        }
        v
    };
    let mut crashing = common::DriverBuilder::new(root.path())
        .pool(&pool)
        .env("FERROVOL_FAILPOINTS", "create-group-before-commit=abort")
        .start();
    let mut g = GroupControllerClient::new(crashing.channel().await);
    assert!(g.create_volume_group_snapshot(group_req("crashy", &vols)).await.is_err());
    assert!(!crashing.wait().success());
    let healthy = common::DriverBuilder::new(root.path()).pool(&pool).start();
    assert!(pool.files("snapshots").is_empty() && pool.files("staging").is_empty());
    let mut g = GroupControllerClient::new(healthy.channel().await);
    let done = g.create_volume_group_snapshot(group_req("crashy", &vols)).await.unwrap();
    assert_eq!(done.into_inner().group_snapshot.unwrap().snapshots.len(), 2);
}

/// DeleteVolumeGroupSnapshot locks its members: a restore from a member that
/// is running finishes first; the delete meanwhile is ABORTED, never
/// trashing the file under the restore.
#[tokio::test(flavor = "multi_thread")]
async fn group_delete_waits_for_a_restore_from_a_member() {
    let pool = common::TestPool::new(PoolFs::Ext4).await;
    let root = tempfile::tempdir().unwrap();
    let (mut driver, fifo) =
        common::driver_paused_at(root.path(), &pool, "create-volume-after-reserve");
    let ch = driver.channel().await;
    let c = ferrovol_csi::controller_client::ControllerClient::new(ch.clone());
    let mut g = GroupControllerClient::new(ch);
    // Creations pause at the failpoint until the gate opens: open it for the
    // two sources.
    // Pauses are counted, not waited for "from now on": a call spawned
    // first may reach its pause before the wait starts.
    let mut sources = Vec::new();
    for (i, name) in ["m1", "m2"].into_iter().enumerate() {
        let call = tokio::spawn({
            let mut c = c.clone();
            async move { c.create_volume(req::create(name, 4 * MIB)).await }
        });
        assert!(driver.wait_for_log_count("failpoint reached", i + 1));
        std::fs::write(&fifo, b"go").unwrap();
        sources.push(call.await.unwrap().unwrap().into_inner().volume.unwrap().volume_id);
    }
    let group = g
        .create_volume_group_snapshot(csi::CreateVolumeGroupSnapshotRequest {
            name: "pair".into(),
            source_volume_ids: sources.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .group_snapshot
        .unwrap();
    let member = group.snapshots[0].snapshot_id.clone();

    // A restore from the member, held inside its work.
    let restore = tokio::spawn({
        let mut c = c.clone();
        let member = member.clone();
        async move { c.create_volume(req::from_snapshot("restored", &member, 4 * MIB)).await }
    });
    assert!(driver.wait_for_log_count("failpoint reached", 3));
    let delete = csi::DeleteVolumeGroupSnapshotRequest {
        group_snapshot_id: group.group_snapshot_id.clone(),
        ..Default::default()
    };
    let busy = g.delete_volume_group_snapshot(delete.clone()).await.unwrap_err();
    assert_eq!(busy.code(), Code::Aborted, "{busy:?}");
    assert!(pool.snapshot_file(&member).exists(), "the member's file is untouched");

    std::fs::write(&fifo, b"go").unwrap();
    restore.await.unwrap().expect("the restore finishes");
    g.delete_volume_group_snapshot(delete).await.expect("then the delete goes through");
    assert!(!pool.snapshot_file(&member).exists());
}

/// What makes a group a relay's part spread over nodes is a field of the
/// link's request, never its name: a CO's group whose name looks like a
/// relay's group ID is an ordinary group, frozen and taken here (it was
/// refused for want of a relay's freeze).
#[tokio::test(flavor = "multi_thread")]
async fn a_group_named_like_a_relay_s_is_an_ordinary_group() {
    let e = env(PoolFs::Xfs).await;
    let vols = mounted_volumes(&e, 2).await;
    let ids: Vec<String> = vols.iter().map(|v| v.0.clone()).collect();
    let mut g = GroupControllerClient::new(e.driver.channel().await);
    let name = ferrovol_local::ids::shared_group("looks-like-a-relay-s");
    let made = g.create_volume_group_snapshot(group_req(&name, &ids)).await;
    let group = made.expect("an ordinary group").into_inner().group_snapshot.unwrap();
    assert_ne!(group.group_snapshot_id, name, "its ID is minted here, not taken from the name");
    assert_eq!(group.snapshots.len(), 2);
    g.delete_volume_group_snapshot(csi::DeleteVolumeGroupSnapshotRequest {
        group_snapshot_id: group.group_snapshot_id,
        ..Default::default()
    })
    .await
    .unwrap();
    unmount_all(&e, &vols).await;
}
