//! The controller/node split of the engine seam, with the local engine: a
//! `--mode controller` process owns the pool's journal and creates the
//! volume; a `--mode node` process on the same pool (the node half alone,
//! which never opens the journal) stages, publishes and tears it down from
//! what the node calls carry.

use crate::common;

use common::req::{self, new_volume, publish_req, stage_req, unpublish_req, unstage_req, MIB};
use common::{Kubelet, PoolFs, TestPool};
use ferrovol_csi as csi;
use ferrovol_csi::controller_client::ControllerClient;
use ferrovol_csi::node_client::NodeClient;
use tonic::Code;

#[tokio::test(flavor = "multi_thread")]
async fn node_mode_serves_volumes_a_controller_mode_process_made() {
    let pool = TestPool::new(PoolFs::Ext4).await;
    let kubelet = Kubelet::new(&pool);
    let root = tempfile::tempdir().unwrap();
    // The node process starts while the controller holds the journal (redb
    // locks it): a node half that opened it would fail here.
    let (controller, node) = common::controller_and_node(root.path(), &pool, &kubelet);
    let mut c = ControllerClient::new(controller.channel().await);
    let mut n = NodeClient::new(node.channel().await);

    let cap = req::mount_cap("ext4");
    let id = new_volume(&mut c, "split-pvc", 64 * MIB, cap.clone()).await;
    let (staging, target) = (kubelet.staging("split"), kubelet.target("pod", "split"));
    n.node_stage_volume(stage_req(&id, &staging, cap.clone())).await.unwrap();
    n.node_publish_volume(publish_req(&id, &staging, &target, cap.clone(), false)).await.unwrap();
    std::fs::write(target.join("table"), b"rows").unwrap();

    // Node calls about volumes the pool does not hold are NOT_FOUND, from
    // the ID and the pool alone.
    let unknown = stage_req("vol-00000000000000000000000000000000", &staging, cap.clone());
    assert_eq!(n.node_stage_volume(unknown).await.unwrap_err().code(), Code::NotFound);

    // Node-side growth needs the journal, which this process does not have:
    // said clearly, not INTERNAL.
    let grow = csi::NodeExpandVolumeRequest {
        volume_id: id.clone(),
        volume_path: target.display().to_string(),
        capacity_range: req::range(128 * MIB, 0),
        ..Default::default()
    };
    let e = n.node_expand_volume(grow).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("--mode all"), "{e:?}");

    // The controller process sees the attachment (same node) and refuses
    // to delete an attached volume.
    let busy = c.delete_volume(req::delete(&id)).await.unwrap_err();
    assert_eq!(busy.code(), Code::FailedPrecondition, "{busy:?}");

    n.node_unpublish_volume(unpublish_req(&id, &target)).await.unwrap();
    n.node_unstage_volume(unstage_req(&id, &staging)).await.unwrap();
    c.delete_volume(req::delete(&id)).await.unwrap();
    // Gone from the pool: the node half says so without the journal.
    let gone = n.node_unstage_volume(unstage_req(&id, &staging)).await.unwrap_err();
    assert_eq!(gone.code(), Code::NotFound, "{gone:?}");
    kubelet.assert_clean();
}
