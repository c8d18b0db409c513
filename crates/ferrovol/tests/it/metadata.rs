//! Changed-block tracking (SnapshotMetadata): allocated and delta ranges,
//! exact to the block, resumable and pageable, on XFS (extent sharing) and on
//! the ext4 fallback (content comparison).

use crate::common;

use std::os::unix::fs::FileExt;

use common::req::{self, MIB};
use common::{DriverBuilder, PoolFs, TestPool};
use ferrovol_csi as csi;
use ferrovol_csi::controller_client::ControllerClient;
use ferrovol_csi::snapshot_metadata_client::SnapshotMetadataClient;
use tonic::transport::Channel;
use tonic::Code;

const K: u64 = 4096;

/// Ranges received, number of messages, and the capacity they reported.
type Delta = (Vec<(u64, u64)>, usize, i64);

async fn delta(
    m: &mut SnapshotMetadataClient<Channel>,
    base: &str,
    target: &str,
    start: i64,
    max: i32,
) -> Result<Delta, tonic::Status> {
    let req = csi::GetMetadataDeltaRequest {
        base_snapshot_id: base.into(),
        target_snapshot_id: target.into(),
        starting_offset: start,
        max_results: max,
        ..Default::default()
    };
    let mut stream = m.get_metadata_delta(req).await?.into_inner();
    let (mut ranges, mut messages, mut capacity) = (Vec::new(), 0, 0);
    while let Some(msg) = stream.message().await? {
        messages += 1;
        capacity = msg.volume_capacity_bytes;
        assert_eq!(msg.block_metadata_type, csi::BlockMetadataType::VariableLength as i32);
        assert!(max == 0 || msg.block_metadata.len() <= max as usize);
        ranges
            .extend(msg.block_metadata.iter().map(|b| (b.byte_offset as u64, b.size_bytes as u64)));
    }
    Ok((ranges, messages, capacity))
}

async fn allocated(m: &mut SnapshotMetadataClient<Channel>, id: &str) -> Vec<(u64, u64)> {
    let req = csi::GetMetadataAllocatedRequest { snapshot_id: id.into(), ..Default::default() };
    let mut stream = m.get_metadata_allocated(req).await.unwrap().into_inner();
    let mut out = Vec::new();
    while let Some(msg) = stream.message().await.unwrap() {
        out.extend(msg.block_metadata.iter().map(|b| (b.byte_offset as u64, b.size_bytes as u64)));
    }
    out
}

fn write_at(path: &std::path::Path, offset: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset).unwrap();
    f.sync_all().unwrap();
}

async fn tracks_exactly_the_written_blocks(fs: PoolFs) {
    let pool = TestPool::new(fs).await;
    let root = tempfile::tempdir().unwrap();
    let driver = DriverBuilder::new(root.path()).pool(&pool).start();
    let ch = driver.channel().await;
    let (mut c, mut m) = (ControllerClient::new(ch.clone()), SnapshotMetadataClient::new(ch));
    let vol = c
        .create_volume(req::create("tracked", 64 * MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let file = pool.volume_file(&vol.volume_id);

    let empty = c
        .create_snapshot(req::snapshot("empty", &vol.volume_id))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert!(allocated(&mut m, &empty.snapshot_id).await.is_empty(), "a fresh volume has no data");

    write_at(&file, 0, &[1; 8192]);
    write_at(&file, MIB as u64, &[2; 4096]);
    write_at(&file, 40 * MIB as u64 + 100, &[3; 10]);
    let s1 = c
        .create_snapshot(req::snapshot("s1", &vol.volume_id))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    let alloc = allocated(&mut m, &s1.snapshot_id).await;
    for written in [(0, 2 * K), (MIB as u64, K), (40 * MIB as u64, K)] {
        assert!(
            alloc.iter().any(|&(o, l)| o <= written.0 && written.0 + written.1 <= o + l),
            "{written:?} not in {alloc:?}"
        );
    }
    assert!(alloc.iter().map(|r| r.1).sum::<u64>() < 2 * MIB as u64, "sparse: {alloc:?}");

    // Between the snapshots: one block, a few bytes, and 16 KiB.
    write_at(&file, 2 * MIB as u64, &[4; 4096]);
    write_at(&file, 3 * MIB as u64 + 5, &[5; 3]);
    write_at(&file, 10 * MIB as u64, &[6; 16384]);
    let s2 = c
        .create_snapshot(req::snapshot("s2", &vol.volume_id))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();

    let want = vec![(2 * MIB as u64, K), (3 * MIB as u64, K), (10 * MIB as u64, 4 * K)];
    let (got, messages, capacity) =
        delta(&mut m, &s1.snapshot_id, &s2.snapshot_id, 0, 0).await.unwrap();
    assert_eq!(got, want, "exactly the blocks written between the snapshots");
    assert_eq!(messages, 1);
    assert_eq!(capacity, 64 * MIB);

    // Paging and resuming.
    let (paged, messages, _) = delta(&mut m, &s1.snapshot_id, &s2.snapshot_id, 0, 1).await.unwrap();
    assert_eq!((paged, messages), (want.clone(), 3));
    let resume = 2 * MIB + 4096;
    let (rest, _, _) = delta(&mut m, &s1.snapshot_id, &s2.snapshot_id, resume, 0).await.unwrap();
    assert_eq!(rest, want[1..].to_vec());
    let (mid, _, _) =
        delta(&mut m, &s1.snapshot_id, &s2.snapshot_id, 10 * MIB + 8192, 0).await.unwrap();
    assert_eq!(
        mid,
        vec![(10 * MIB as u64 + 8192, 2 * K)],
        "a range straddling the offset is clipped"
    );

    // Nothing changed between a snapshot and itself, nor across a no-op.
    let s3 = c
        .create_snapshot(req::snapshot("s3", &vol.volume_id))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert!(delta(&mut m, &s2.snapshot_id, &s3.snapshot_id, 0, 0).await.unwrap().0.is_empty());

    // Errors.
    let other =
        c.create_volume(req::create("other", 4 * MIB)).await.unwrap().into_inner().volume.unwrap();
    let os = c
        .create_snapshot(req::snapshot("os", &other.volume_id))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    let code = |r: Result<Delta, tonic::Status>| r.unwrap_err().code();
    assert_eq!(
        code(delta(&mut m, &s1.snapshot_id, &os.snapshot_id, 0, 0).await),
        Code::InvalidArgument
    );
    assert_eq!(code(delta(&mut m, &s1.snapshot_id, "snap-unknown", 0, 0).await), Code::NotFound);
    assert_eq!(
        code(delta(&mut m, &s1.snapshot_id, &s2.snapshot_id, 65 * MIB, 0).await),
        Code::OutOfRange
    );
    assert_eq!(
        code(delta(&mut m, &s1.snapshot_id, &s2.snapshot_id, -1, 0).await),
        Code::InvalidArgument
    );
    let unknown =
        csi::GetMetadataAllocatedRequest { snapshot_id: "snap-x".into(), ..Default::default() };
    assert_eq!(m.get_metadata_allocated(unknown).await.unwrap_err().code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread")]
async fn delta_on_xfs_from_shared_extents() {
    tracks_exactly_the_written_blocks(PoolFs::Xfs).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn delta_on_ext4_by_content() {
    tracks_exactly_the_written_blocks(PoolFs::Ext4).await;
}
