//! In one process (`--mode all`) the engine is its own node half too: the
//! same attachments, and node-side growth, which needs the journal.

use super::*;

/// In one process (`--mode all`) the engine is its own node half too: the
/// same attachments, and node-side growth, which needs the journal.
#[tonic::async_trait]
impl Attacher for LocalEngine {
    fn kind(&self) -> &'static str {
        "local"
    }

    fn features(&self) -> Features {
        node::features()
    }

    fn topology(&self) -> Topology {
        self.node.topology()
    }

    async fn health(&self) -> Result<()> {
        self.node.health().await
    }

    async fn check_known(&self, volume_id: &str) -> Result<()> {
        self.ready_volume(volume_id).map(drop)
    }

    async fn attach(&self, request: &Attach) -> Result<ferrovol_block::Attachment> {
        self.ready_volume(&request.volume_id)?;
        self.node.attach(request).await
    }

    async fn detach(&self, volume_id: &str) -> Result<()> {
        self.node.detach(volume_id).await
    }

    async fn device(&self, volume_id: &str) -> Result<Option<PathBuf>> {
        self.node.device(volume_id).await
    }

    async fn all_attached(&self) -> Result<Vec<PathBuf>> {
        self.node.all_attached().await
    }

    async fn refresh(&self, volume_id: &str, size: u64) -> Result<()> {
        self.node.refresh(volume_id, size).await
    }

    /// The journal's view (the record's size and provisioning), which
    /// knows more than the file alone.
    async fn condition(&self, volume_id: &str) -> Result<Condition> {
        self.volume_condition(volume_id).await
    }

    async fn grow(&self, volume_id: &str, required: u64, limit: u64) -> Result<u64> {
        let grown = self.expand_volume(volume_id, required, limit, &Secrets::default()).await?;
        Ok(grown.capacity)
    }

    async fn written(&self, request: &Attach, device: &Path) -> Result<Written> {
        self.node.written(request, device).await
    }

    async fn release_unused(&self) -> Result<Vec<String>> {
        self.node.release_unused().await
    }
}
