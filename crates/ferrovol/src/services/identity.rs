//! Identity service: who we are, what we can do, and whether we are healthy.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferrovol_csi as csi;
use tonic::{Request, Response, Status};

use crate::error::{self, Result};
use crate::rpc::handle;
use crate::services::Driver;
use crate::version;

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
        let mut m = HashMap::new();
        m.insert("mode".into(), format!("{:?}", self.driver.mode).to_lowercase());
        if !version::GIT_REVISION.is_empty() {
            m.insert("git_revision".into(), version::GIT_REVISION.into());
        }
        m
    }

    fn capabilities(&self) -> Vec<csi::PluginCapability> {
        // Grows as services land; only what truly works is listed.
        Vec::new()
    }

    async fn check_ready(&self) -> Result<()> {
        let dir = self.driver.state_dir.clone();
        let check = tokio::task::spawn_blocking(move || state_dir_writable(&dir));
        match tokio::time::timeout(PROBE_CHECK_TIMEOUT, check).await {
            Err(_) => Err(error::failed_precondition(format!(
                "state dir {} did not answer within {PROBE_CHECK_TIMEOUT:?}",
                self.driver.state_dir.display()
            ))),
            Ok(joined) => joined.map_err(|e| error::internal(format!("probe task: {e}")))?,
        }
    }
}

static PROBE_SEQ: AtomicU64 = AtomicU64::new(0);

/// Really writes (and syncs) a file: a read-only remount, a full disk or a
/// vanished directory all show up here, not at the next CreateVolume.
fn state_dir_writable(dir: &Path) -> Result<()> {
    let seq = PROBE_SEQ.fetch_add(1, Ordering::Relaxed);
    let path = dir.join(format!(".probe-{}-{seq}", std::process::id()));
    let attempt = (|| {
        let mut f = std::fs::File::create(&path)?;
        f.write_all(b"ok")?;
        f.sync_data()
    })();
    let _ = std::fs::remove_file(&path);
    attempt.map_err(|e| {
        error::failed_precondition(format!("state dir {} is not writable: {e}", dir.display()))
    })
}

#[tonic::async_trait]
impl csi::identity_server::Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        request: Request<csi::GetPluginInfoRequest>,
    ) -> Result<Response<csi::GetPluginInfoResponse>, Status> {
        handle("GetPluginInfo", request, |_| async {
            Ok(csi::GetPluginInfoResponse {
                name: self.driver.name.clone(),
                vendor_version: version::VERSION.to_string(),
                manifest: self.manifest(),
            })
        })
        .await
    }

    async fn get_plugin_capabilities(
        &self,
        request: Request<csi::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<csi::GetPluginCapabilitiesResponse>, Status> {
        handle("GetPluginCapabilities", request, |_| async {
            Ok(csi::GetPluginCapabilitiesResponse { capabilities: self.capabilities() })
        })
        .await
    }

    async fn probe(
        &self,
        request: Request<csi::ProbeRequest>,
    ) -> Result<Response<csi::ProbeResponse>, Status> {
        handle("Probe", request, |_| async {
            self.check_ready().await?;
            Ok(csi::ProbeResponse { ready: Some(true) })
        })
        .await
    }
}
