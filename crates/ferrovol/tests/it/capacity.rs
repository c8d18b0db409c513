//! GetCapacity tells the scheduler the truth: at every fill level of a real
//! pool, the largest volume it reports is exactly the largest CreateVolume
//! accepts, thin and thick.

use crate::common;

use common::req::{self, MIB};
use common::{DriverBuilder, PoolFs, TestPool};
use ferrovol_csi as csi;
use ferrovol_csi::controller_client::ControllerClient;
use tonic::Code;

const GRANULARITY: i64 = 4096;

fn with_provisioning(mut r: csi::CreateVolumeRequest, how: &str) -> csi::CreateVolumeRequest {
    r.parameters.insert("provisioning".into(), how.into());
    r
}

#[tokio::test(flavor = "multi_thread")]
async fn capacity_and_create_agree_at_every_fill_level() {
    let pool = TestPool::with_size(PoolFs::Ext4Image, 512 * MIB as u64).await;
    let root = tempfile::tempdir().unwrap();
    let driver = DriverBuilder::new(root.path()).pool(&pool).start();
    let mut c = ControllerClient::new(driver.channel().await);

    // Each level adds a thick volume: the pool fills up step by step.
    for (level, fill) in [0, 128 * MIB, 200 * MIB, 96 * MIB].into_iter().enumerate() {
        if fill > 0 {
            let r = with_provisioning(req::create(&format!("fill-{level}"), fill), "thick");
            c.create_volume(r).await.unwrap();
        }
        for how in ["thin", "thick"] {
            let asked = csi::GetCapacityRequest {
                volume_capabilities: vec![req::mount_cap("ext4")],
                parameters: [("provisioning".to_string(), how.to_string())].into(),
                ..Default::default()
            };
            let cap = c.get_capacity(asked).await.unwrap().into_inner();
            let max = cap.maximum_volume_size.unwrap();
            assert!(max <= cap.available_capacity && max > 0, "{how} at level {level}: {cap:?}");
            let more = c
                .create_volume(with_provisioning(req::create("too-big", max + GRANULARITY), how))
                .await
                .unwrap_err();
            assert_eq!(more.code(), Code::ResourceExhausted, "{how} at level {level}: {more:?}");
            let fits = c
                .create_volume(with_provisioning(req::create("largest", max), how))
                .await
                .unwrap_or_else(|e| panic!("{how} at level {level}: {max} refused: {e:?}"))
                .into_inner()
                .volume
                .unwrap();
            assert_eq!(fits.capacity_bytes, max);
            c.delete_volume(req::delete(&fits.volume_id)).await.unwrap();
        }
    }
    // Nothing fits an XFS volume (300 MiB at least) now: capacity says 0.
    let xfs = csi::GetCapacityRequest {
        volume_capabilities: vec![req::mount_cap("xfs")],
        ..Default::default()
    };
    let cap = c.get_capacity(xfs).await.unwrap().into_inner();
    assert_eq!((cap.available_capacity, cap.maximum_volume_size), (0, Some(0)), "{cap:?}");
    assert_eq!(cap.minimum_volume_size, Some(300 * MIB));
}

#[tokio::test(flavor = "multi_thread")]
async fn tiny_ext4_volumes_are_rounded_up_and_stage() {
    let e = common::env(PoolFs::Ext4).await;
    let (mut c, mut n) = e.clients().await;
    let cap = req::mount_cap("ext4");
    let v = c
        .create_volume(csi::CreateVolumeRequest {
            volume_capabilities: vec![cap.clone()],
            ..req::create("tiny", 4096)
        })
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(v.capacity_bytes, MIB, "rounded up to what mkfs.ext4 accepts");
    let staging = e.kubelet.staging("tiny");
    n.node_stage_volume(req::stage_req(&v.volume_id, &staging, cap)).await.unwrap();
    n.node_unstage_volume(req::unstage_req(&v.volume_id, &staging)).await.unwrap();
    e.kubelet.assert_clean();
}
