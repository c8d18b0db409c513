//! What the kubernetes-csi sidecars ask a driver's socket when they start,
//! call for call, and the answers that make each of them exit (a crash
//! loop in the pod): external-provisioner, -attacher, -resizer,
//! -snapshotter (with group snapshots), the snapshot-metadata sidecar,
//! livenessprobe and node-driver-registrar, as the shipped manifests run
//! them. Every `--mode` must satisfy the sidecars its pods run beside it.

use crate::common;

use common::{DriverBuilder, Kubelet, PoolFs, TestPool};
use ferrovol_csi as csi;
use ferrovol_csi::controller_client::ControllerClient;
use ferrovol_csi::group_controller_client::GroupControllerClient;
use ferrovol_csi::identity_client::IdentityClient;
use ferrovol_csi::node_client::NodeClient;
use tonic::transport::Channel;

#[derive(Clone, Copy, Debug)]
pub enum Sidecar {
    Provisioner,
    Attacher,
    Resizer,
    Snapshotter,
    SnapshotMetadata,
    Liveness,
    Registrar,
}

/// The sidecars of a controller Deployment, and of a node DaemonSet.
pub const CONTROLLER: &[Sidecar] = &[
    Sidecar::Provisioner,
    Sidecar::Attacher,
    Sidecar::Resizer,
    Sidecar::Snapshotter,
    Sidecar::SnapshotMetadata,
    Sidecar::Liveness,
];
pub const NODE: &[Sidecar] = &[Sidecar::Registrar, Sidecar::Liveness];

type Caps = std::collections::HashSet<i32>;

async fn plugin_services(id: &mut IdentityClient<Channel>) -> Result<Caps, String> {
    let r = id
        .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
        .await
        .map_err(|s| format!("GetPluginCapabilities: {s:?}"))?;
    Ok(r.into_inner()
        .capabilities
        .into_iter()
        .filter_map(|c| match c.r#type? {
            csi::plugin_capability::Type::Service(s) => Some(s.r#type),
            _ => None,
        })
        .collect())
}

async fn controller_caps(channel: &Channel) -> Result<Caps, String> {
    let r = ControllerClient::new(channel.clone())
        .controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {})
        .await
        .map_err(|s| format!("ControllerGetCapabilities: {s:?}"))?;
    Ok(r.into_inner()
        .capabilities
        .into_iter()
        .filter_map(|c| match c.r#type? {
            csi::controller_service_capability::Type::Rpc(r) => Some(r.r#type),
        })
        .collect())
}

async fn node_caps(channel: &Channel) -> Result<Caps, String> {
    let r = NodeClient::new(channel.clone())
        .node_get_capabilities(csi::NodeGetCapabilitiesRequest {})
        .await
        .map_err(|s| format!("NodeGetCapabilities: {s:?}"))?;
    Ok(r.into_inner()
        .capabilities
        .into_iter()
        .filter_map(|c| match c.r#type? {
            csi::node_service_capability::Type::Rpc(r) => Some(r.r#type),
        })
        .collect())
}

/// `csi-lib-utils`' ProbeForever: Probe until it answers ready (an absent
/// `ready` counts as ready); any error but UNAVAILABLE or a deadline ends
/// the sidecar. Here: must be ready at the first answer.
async fn probe(id: &mut IdentityClient<Channel>) -> Result<(), String> {
    let r = id.probe(csi::ProbeRequest {}).await.map_err(|s| format!("Probe: {s:?}"))?;
    match r.into_inner().ready {
        Some(false) => Err("Probe: not ready".into()),
        _ => Ok(()),
    }
}

async fn driver_name(id: &mut IdentityClient<Channel>) -> Result<String, String> {
    let r = id
        .get_plugin_info(csi::GetPluginInfoRequest {})
        .await
        .map_err(|s| format!("GetPluginInfo: {s:?}"))?;
    let name = r.into_inner().name;
    if name.is_empty() {
        return Err("GetPluginInfo: empty driver name".into());
    }
    Ok(name)
}

/// The calls `sidecar` makes at start on `channel`, and its reasons to exit.
pub async fn startup(channel: &Channel, sidecar: Sidecar) -> Result<(), String> {
    use csi::controller_service_capability::rpc::Type as C;
    use csi::plugin_capability::service::Type as S;
    let mut id = IdentityClient::new(channel.clone());
    let has = |caps: &Caps, c: i32| caps.contains(&c);
    match sidecar {
        Sidecar::Registrar => {
            driver_name(&mut id).await?;
        }
        Sidecar::Liveness => {
            driver_name(&mut id).await?;
            probe(&mut id).await?;
        }
        Sidecar::Provisioner => {
            probe(&mut id).await?;
            driver_name(&mut id).await?;
            let plugin = plugin_services(&mut id).await?;
            let controller = controller_caps(channel).await?;
            if !has(&plugin, S::ControllerService as i32) {
                return Err("provisioner: no CONTROLLER_SERVICE".into());
            }
            if !has(&controller, C::CreateDeleteVolume as i32) {
                return Err("provisioner: no CREATE_DELETE_VOLUME".into());
            }
        }
        Sidecar::Attacher => {
            probe(&mut id).await?;
            driver_name(&mut id).await?;
            // Without CONTROLLER_SERVICE or PUBLISH_UNPUBLISH it attaches
            // trivially; only errors end it.
            if has(&plugin_services(&mut id).await?, S::ControllerService as i32) {
                controller_caps(channel).await?;
            }
        }
        Sidecar::Resizer => {
            driver_name(&mut id).await?;
            if !has(&plugin_services(&mut id).await?, S::ControllerService as i32) {
                return Err("resizer: CSI driver does not support controller service".into());
            }
            let controller = controller_caps(channel).await?;
            if !has(&controller, C::ExpandVolume as i32) {
                // The trivial resizer, if the node grows volumes.
                use csi::node_service_capability::rpc::Type as N;
                if !has(&node_caps(channel).await?, N::ExpandVolume as i32) {
                    return Err("resizer: neither controller nor node resize".into());
                }
            }
            controller_caps(channel).await?;
        }
        Sidecar::Snapshotter => {
            probe(&mut id).await?;
            driver_name(&mut id).await?;
            if !has(&controller_caps(channel).await?, C::CreateDeleteSnapshot as i32) {
                return Err("snapshotter: no CREATE_DELETE_SNAPSHOT".into());
            }
            // --feature-gates=CSIVolumeGroupSnapshot=true
            let r = GroupControllerClient::new(channel.clone())
                .group_controller_get_capabilities(csi::GroupControllerGetCapabilitiesRequest {})
                .await
                .map_err(|s| format!("GroupControllerGetCapabilities: {s:?}"))?;
            if r.into_inner().capabilities.is_empty() {
                return Err("snapshotter: no group snapshot capability".into());
            }
        }
        Sidecar::SnapshotMetadata => {
            probe(&mut id).await?;
            driver_name(&mut id).await?;
            if !has(&plugin_services(&mut id).await?, S::SnapshotMetadataService as i32) {
                return Err("snapshot-metadata: no SNAPSHOT_METADATA_SERVICE".into());
            }
        }
    }
    Ok(())
}

/// Every sidecar in `sidecars` starts against `channel`.
pub async fn assert_start(channel: &Channel, sidecars: &[Sidecar], what: &str) {
    for s in sidecars {
        if let Err(e) = startup(channel, *s).await {
            panic!("{s:?} would exit at start beside {what}: {e}");
        }
    }
}

/// A call this process does not serve is UNIMPLEMENTED with a message
/// saying so (never an empty one, which leaves the operator guessing).
pub async fn assert_unserved_says_so(channel: &Channel, node_side: bool) {
    let e = if node_side {
        NodeClient::new(channel.clone())
            .node_stage_volume(csi::NodeStageVolumeRequest::default())
            .await
            .unwrap_err()
    } else {
        ControllerClient::new(channel.clone())
            .create_volume(csi::CreateVolumeRequest::default())
            .await
            .unwrap_err()
    };
    assert_eq!(e.code(), tonic::Code::Unimplemented, "{e:?}");
    assert!(e.message().contains("--mode"), "{e:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_mode_of_the_local_engine_starts_its_sidecars() {
    let pool = TestPool::new(PoolFs::Ext4).await;
    let kubelet = Kubelet::new(&pool);
    let root = tempfile::tempdir().unwrap();
    let (controller, node) = common::controller_and_node(root.path(), &pool, &kubelet);
    let c = controller.channel().await;
    assert_start(&c, CONTROLLER, "--mode controller").await;
    assert_unserved_says_so(&c, true).await;
    let n = node.channel().await;
    assert_start(&n, NODE, "--mode node").await;
    assert_unserved_says_so(&n, false).await;
    drop((controller, node));

    let all = DriverBuilder::new(&root.path().join("all")).pool(&pool).kubelet(&kubelet).start();
    let a = all.channel().await;
    assert_start(&a, CONTROLLER, "--mode all").await;
    assert_start(&a, NODE, "--mode all").await;
}
