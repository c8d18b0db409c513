//! Identity service: who we are, what we can do, and whether we are healthy.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ferrovol_csi as csi;

use crate::engine::ExpansionSite;
use crate::error::{self, Result};
use crate::rpc;
use crate::services::Driver;

/// Longest a readiness check may take before Probe calls the driver unhealthy;
/// the livenessprobe sidecar's own timeout is typically 1-3 s.
const PROBE_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

pub struct IdentityService {
    driver: Arc<Driver>,
}

impl IdentityService {
    pub fn new(driver: Arc<Driver>) -> Self {
        IdentityService { driver }
    }

    fn manifest(&self) -> HashMap<String, String> {
        let mut m: HashMap<String, String> = match &self.driver.controller {
            Some(c) => c.manifest().into_iter().collect(),
            None => HashMap::from([("engine".to_string(), self.driver.engine_kind().to_string())]),
        };
        m.insert("mode".into(), format!("{:?}", self.driver.mode).to_lowercase());
        if !ferrovol_csi::build::git_revision().is_empty() {
            m.insert("git_revision".into(), ferrovol_csi::build::git_revision().into());
        }
        m
    }

    fn capabilities(&self) -> Vec<csi::PluginCapability> {
        use csi::plugin_capability::service::Type as Service;
        let mut services = Vec::new();
        if let Some(engine) =
            self.driver.controller.as_ref().filter(|_| self.driver.mode.controller())
        {
            services.push(Service::ControllerService);
            if engine.groups().is_some() {
                services.push(Service::GroupControllerService);
            }
            if engine.changed_blocks().is_some() {
                services.push(Service::SnapshotMetadataService);
            }
        }
        let constrained = match (&self.driver.controller, &self.driver.node) {
            (Some(c), _) => c.has_topology(),
            (None, Some(n)) => !n.topology().is_empty(),
            (None, None) => false,
        };
        if constrained {
            services.push(Service::VolumeAccessibilityConstraints);
        }
        let mut caps: Vec<csi::PluginCapability> = services
            .into_iter()
            .map(|s| csi::PluginCapability {
                r#type: Some(csi::plugin_capability::Type::Service(
                    csi::plugin_capability::Service { r#type: s as i32 },
                )),
            })
            .collect();
        // Online expansion, where this process takes part in it: the
        // controller that grows the volume, or the node that grows it (and
        // its filesystem) itself. A relay fronts nodes that grow their
        // volumes: the resizer beside it must see the capability to do its
        // (no-op) controller step and hand the PVC to the kubelet.
        let grows_here = match self.driver.features().expansion {
            ExpansionSite::Controller => self.driver.controller.is_some(),
            ExpansionSite::Node => {
                self.driver.node.is_some() || self.driver.mode == crate::cli::Mode::Relay
            }
        };
        if grows_here {
            caps.push(csi::PluginCapability {
                r#type: Some(csi::plugin_capability::Type::VolumeExpansion(
                    csi::plugin_capability::VolumeExpansion {
                        r#type: csi::plugin_capability::volume_expansion::Type::Online as i32,
                    },
                )),
            });
        }
        caps
    }

    /// What Probe checks: the state dir is writable (not read-only now, and
    /// its latest background write went through) and the engine is healthy.
    /// Nothing here waits for a device (the writes happen in the background
    /// monitors), so Probe answers at once even while copies keep the disk
    /// busy. The engine gets a deadline: a remote engine's check may hang.
    pub async fn check_ready(&self) -> Result<()> {
        if let Some(writes) = &self.driver.state_writes {
            ferrovol_host::fsutil::check_not_read_only(&self.driver.state_dir)?;
            writes.status()?;
        }
        let (controller, node) = (self.driver.controller.clone(), self.driver.node.clone());
        let health = async move {
            if let Some(c) = controller {
                c.health().await?;
            }
            if let Some(n) = node {
                n.health().await?;
            }
            Ok::<_, error::Error>(())
        };
        match tokio::time::timeout(PROBE_CHECK_TIMEOUT, health).await {
            Err(_) => Err(error::precondition(format!(
                "the {} engine did not answer within {PROBE_CHECK_TIMEOUT:?}",
                self.driver.engine_kind()
            ))),
            Ok(Err(e)) => Err(error::precondition(format!(
                "the {} engine is not healthy: {}",
                self.driver.engine_kind(),
                e.message()
            ))),
            Ok(Ok(())) => Ok(()),
        }
    }
}

impl IdentityService {
    async fn plugin_info(
        &self,
        _: csi::GetPluginInfoRequest,
    ) -> Result<csi::GetPluginInfoResponse> {
        Ok(csi::GetPluginInfoResponse {
            name: self.driver.name.clone(),
            vendor_version: ferrovol_csi::build::version().to_string(),
            manifest: self.manifest(),
        })
    }

    async fn plugin_capabilities(
        &self,
        _: csi::GetPluginCapabilitiesRequest,
    ) -> Result<csi::GetPluginCapabilitiesResponse> {
        Ok(csi::GetPluginCapabilitiesResponse { capabilities: self.capabilities() })
    }

    async fn probe(&self, _: csi::ProbeRequest) -> Result<csi::ProbeResponse> {
        self.check_ready().await?;
        Ok(csi::ProbeResponse { ready: Some(true) })
    }
}

rpc::service! {
    IdentityService: csi::identity_server::Identity {
        fn get_plugin_info(csi::GetPluginInfoRequest) -> csi::GetPluginInfoResponse
            => inline plugin_info;
        fn get_plugin_capabilities(csi::GetPluginCapabilitiesRequest)
            -> csi::GetPluginCapabilitiesResponse => inline plugin_capabilities;
        fn probe(csi::ProbeRequest) -> csi::ProbeResponse => inline probe;
    }
}
