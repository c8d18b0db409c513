//! The Node service of a process without a node half (`--mode controller`
//! or `relay`): the controller sidecars ask their own socket node questions
//! too. csi-resizer, when the controller does not grow volumes itself, asks
//! NodeGetCapabilities whether the node does, and exits at start if the
//! answer is an error. So this answers what the engine's node plugin
//! offers, and every call that needs a node says where to send it.

use std::sync::Arc;

use ferrovol_csi as csi;

use crate::error::{self, Result};
use crate::rpc;
use crate::services::node::NodeService;
use crate::services::Driver;

#[derive(Clone)]
pub struct ControllerSideNode {
    driver: Arc<Driver>,
}

impl ControllerSideNode {
    pub fn new(driver: Arc<Driver>) -> Self {
        ControllerSideNode { driver }
    }

    /// The same list the engine's node plugin answers: capabilities are the
    /// driver's, not the process's.
    async fn get_capabilities(
        &self,
        _: csi::NodeGetCapabilitiesRequest,
    ) -> Result<csi::NodeGetCapabilitiesResponse> {
        NodeService::capabilities_answer(&self.driver.features())
    }

    async fn elsewhere<Req, Resp>(&self, _: Req) -> Result<Resp> {
        Err(error::unsupported(format!(
            "this ferrovol process serves the controller (--mode {}); node calls go to the \
             node plugin on the node",
            self.driver.mode.name()
        )))
    }
}

rpc::service! {
    ControllerSideNode: csi::node_server::Node {
        fn node_stage_volume(csi::NodeStageVolumeRequest)
            -> csi::NodeStageVolumeResponse => inline elsewhere;
        fn node_unstage_volume(csi::NodeUnstageVolumeRequest)
            -> csi::NodeUnstageVolumeResponse => inline elsewhere;
        fn node_publish_volume(csi::NodePublishVolumeRequest)
            -> csi::NodePublishVolumeResponse => inline elsewhere;
        fn node_unpublish_volume(csi::NodeUnpublishVolumeRequest)
            -> csi::NodeUnpublishVolumeResponse => inline elsewhere;
        fn node_get_volume_stats(csi::NodeGetVolumeStatsRequest)
            -> csi::NodeGetVolumeStatsResponse => inline elsewhere;
        fn node_expand_volume(csi::NodeExpandVolumeRequest)
            -> csi::NodeExpandVolumeResponse => inline elsewhere;
        fn node_get_capabilities(csi::NodeGetCapabilitiesRequest)
            -> csi::NodeGetCapabilitiesResponse => inline get_capabilities;
        fn node_get_info(csi::NodeGetInfoRequest) -> csi::NodeGetInfoResponse => inline elsewhere;
    }
}
