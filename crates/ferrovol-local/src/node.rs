//! The local engine's node half: a volume is attached as a loop device of
//! its file in the pool. Everything here works from the volume ID and the
//! kernel (the file's path follows from the ID, attachments are in sysfs),
//! never from the journal, so a `--mode node` process serves a pool whose
//! journal another process holds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{self, Error, Result};
use crate::ids::{self, Kind};
use ferrovol_block::{Attacher, Attachment, Written};
use ferrovol_core::engine::{Attach, Condition, Features, Topology};
use ferrovol_host::node::quiesce::Quiesce;

use super::pool::Pool;
use crate::loopdev;
use crate::{blocking, FULL_POOL_BYTES, TOPOLOGY_KEY};

/// How long a deferred detach may take before unstage says who holds it.
const DETACH_SETTLE: std::time::Duration = std::time::Duration::from_secs(2);

pub struct LocalNode {
    pool: Pool,
    node_id: String,
}

impl LocalNode {
    pub(super) fn new(pool: Pool, node_id: &str) -> LocalNode {
        LocalNode { pool, node_id: node_id.to_string() }
    }

    pub(super) fn node_id(&self) -> &str {
        &self.node_id
    }

    /// The node half alone, for `--mode node`: the pool's layout, without
    /// its journal (the controller half's, which another process may hold).
    /// The pool's identity is checked first, as in every mode: a node
    /// process whose state knows a pool refuses an empty mount point.
    pub fn open(pool_dir: &Path, state_dir: &Path, node_id: &str) -> Result<LocalNode> {
        crate::identity::settle(pool_dir, state_dir)?;
        Ok(LocalNode::new(Pool::open(pool_dir)?, node_id))
    }

    fn file(&self, volume_id: &str) -> Result<PathBuf> {
        self.pool.path(Kind::Volume, volume_id)
    }

    async fn attached(&self, volume_id: &str) -> Result<Vec<loopdev::Attached>> {
        if !ids::is_valid(Kind::Volume, volume_id) {
            return Ok(vec![]);
        }
        let path = self.file(volume_id)?;
        blocking(move || {
            loopdev::find(&path).map_err(|e| Error::io("reading loop devices from sysfs", e))
        })
        .await
    }
}

/// The features both halves of the local engine answer.
pub fn features() -> Features {
    Features {
        // The file lives on this node, next to the filesystem that must grow
        // with it; see docs/architecture.md.
        expansion: ferrovol_core::engine::ExpansionSite::Node,
        node_expansion: true,
        clones: true,
        filesystems: ferrovol_block::filesystems(),
        mount_modes: Features::single_node_modes(),
        block_modes: Features::single_node_modes(),
    }
}

#[tonic::async_trait]
impl Attacher for LocalNode {
    fn kind(&self) -> &'static str {
        "local"
    }

    fn features(&self) -> Features {
        features()
    }

    fn topology(&self) -> Topology {
        BTreeMap::from([(TOPOLOGY_KEY.to_string(), self.node_id.clone())])
    }

    async fn health(&self) -> Result<()> {
        self.pool.verify()?;
        loopdev::check_available().map_err(|e| e.into_error("staging volumes"))
    }

    async fn check_known(&self, volume_id: &str) -> Result<()> {
        let missing = || error::not_found(format!("volume {volume_id:?} does not exist"));
        if !ids::is_valid(Kind::Volume, volume_id) {
            return Err(missing());
        }
        // A file that vanished while attached is still this node's volume
        // (its condition says what happened).
        if self.file(volume_id)?.exists() || !self.attached(volume_id).await?.is_empty() {
            return Ok(());
        }
        Err(missing())
    }

    async fn attach(&self, request: &Attach) -> Result<Attachment> {
        let id = &request.volume_id;
        if let Some(a) = self.attached(id).await?.into_iter().next() {
            return Ok(Attachment { device: a.device, fresh: false });
        }
        let path = self.file(id)?;
        let id = id.clone();
        // Read-only is the publish's business: the same device serves a
        // read-only and a read-write publish of one staging.
        blocking(move || {
            if let Err(e) = std::fs::symlink_metadata(&path) {
                return Err(error::precondition(format!(
                    "volume {id}: backing file {} is missing or unreadable: {e}",
                    path.display()
                )));
            }
            loopdev::attach(&path, false, loopdev::VOLUME_BLOCK_SIZE)
                .map_err(|e| e.into_error(format!("attaching {}", path.display())))
        })
        .await
        .map(|device| Attachment { device, fresh: true })
    }

    /// Detaches, and answers only once the kernel has let the file go: the
    /// kernel defers a detach while anyone else holds the device open (a
    /// process forked at that instant holds a copy of every descriptor
    /// until it execs), and a volume still bound would refuse its delete.
    async fn detach(&self, volume_id: &str) -> Result<()> {
        let path = self.file(volume_id)?;
        for a in self.attached(volume_id).await? {
            let (device, backing) = (a.device.clone(), path.clone());
            blocking(move || {
                loopdev::detach(&device)
                    .map_err(|e| Error::io(format!("detaching {}", device.display()), e))?;
                let deadline = std::time::Instant::now() + DETACH_SETTLE;
                loop {
                    let bound = loopdev::find(&backing)
                        .map_err(|e| Error::io("reading loop devices", e))?
                        .iter()
                        .any(|b| b.device == device);
                    if !bound {
                        return Ok(());
                    }
                    if std::time::Instant::now() > deadline {
                        return Err(error::precondition(format!(
                            "{} stays bound to {}: another process holds the device open; \
                             it detaches when that process closes it",
                            device.display(),
                            backing.display()
                        )));
                    }
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            })
            .await?;
        }
        Ok(())
    }

    async fn device(&self, volume_id: &str) -> Result<Option<PathBuf>> {
        Ok(self.attached(volume_id).await?.into_iter().next().map(|a| a.device))
    }

    async fn release_unused(&self) -> Result<Vec<String>> {
        let volumes = self.pool.dir(Kind::Volume);
        let unused: Vec<String> = blocking(move || {
            let mounts = crate::host_node::mountinfo::read()
                .map_err(|e| Error::io("reading /proc/self/mountinfo", e))?;
            let all = loopdev::list().map_err(|e| Error::io("reading loop devices", e))?;
            let mut unused = Vec::new();
            for a in all.into_iter().filter(|a| a.backing.starts_with(&volumes)) {
                let used = crate::host_node::mountinfo::mounts_of_device(&mounts, &a.device)
                    .map_err(|e| Error::io(format!("inspecting {}", a.device.display()), e))?;
                let id = a.backing.file_stem().map(|s| s.to_string_lossy().into_owned());
                if let (true, Some(id)) = (used.is_empty(), id) {
                    // A read-only publish device a crash left over it
                    // (unmounted, or `used` would hold its mount) holds
                    // the device open: it goes first.
                    for ro in crate::host_node::read_only::over(&a.device)? {
                        crate::host_node::read_only::detach(&ro)?;
                    }
                    unused.push(id);
                }
            }
            Ok(unused)
        })
        .await?;
        for id in &unused {
            self.detach(id).await?;
        }
        Ok(unused)
    }

    async fn all_attached(&self) -> Result<Vec<PathBuf>> {
        let root = self.pool.root().to_path_buf();
        blocking(move || {
            let all = loopdev::list().map_err(|e| Error::io("reading loop devices", e))?;
            Ok(all.into_iter().filter(|a| a.backing.starts_with(&root)).map(|a| a.device).collect())
        })
        .await
    }

    async fn refresh(&self, volume_id: &str, _size: u64) -> Result<()> {
        if !ids::is_valid(Kind::Volume, volume_id) {
            return Err(error::not_found(format!("volume {volume_id:?} does not exist")));
        }
        let (path, id) = (self.file(volume_id)?, volume_id.to_string());
        // The device's lookup and its refresh in one trip off the executor.
        blocking(move || {
            let found = loopdev::find(&path).map_err(|e| Error::io("reading loop devices", e))?;
            let Some(device) = found.into_iter().next().map(|a| a.device) else {
                return Err(error::precondition(format!(
                    "volume {id} is not attached on this node"
                )));
            };
            loopdev::refresh_capacity(&device)
                .map_err(|e| Error::io(format!("refreshing the size of {}", device.display()), e))
        })
        .await
    }

    /// From the volume's file: a data extent anywhere means something was
    /// written (a preallocated, never written extent is no data). The
    /// device is flushed first, so writes still in its page cache count.
    async fn written(&self, request: &Attach, device: &Path) -> Result<Written> {
        let path = self.file(&request.volume_id)?;
        let device = device.to_path_buf();
        blocking(move || {
            let dev = std::fs::File::open(&device)
                .map_err(|e| Error::io(format!("opening {}", device.display()), e))?;
            dev.sync_all().map_err(|e| Error::io(format!("flushing {}", device.display()), e))?;
            let file = std::fs::File::open(&path)
                .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
            let size = file
                .metadata()
                .map_err(|e| Error::io(format!("reading {}", path.display()), e))?
                .len();
            let data = ferrovol_host::extents::allocated(&file, size)
                .map_err(|e| Error::io(format!("reading the extents of {}", path.display()), e))?;
            Ok(match data.first() {
                None => Written::Never,
                Some((offset, _)) => Written::Maybe(format!(
                    "it holds {} bytes of data (the first at offset {offset})",
                    data.iter().map(|(_, len)| len).sum::<u64>()
                )),
            })
        })
        .await
    }

    async fn condition(&self, volume_id: &str) -> Result<Condition> {
        let path = self.file(volume_id)?;
        let device = self.device(volume_id).await?;
        let pool = self.pool.clone();
        blocking(move || {
            let (available, _) = pool.space()?;
            Ok(file_condition(&path, device.as_deref(), available, &pool))
        })
        .await
    }

    async fn grow(&self, volume_id: &str, _required: u64, _limit: u64) -> Result<u64> {
        Err(error::precondition(format!(
            "volume {volume_id}: a local volume grows where its pool's journal is open; serve \
             this node with --mode all (a node-mode process does not open the journal)"
        )))
    }
}

impl LocalNode {
    /// Finds what must be frozen for the volumes' snapshot on this node and
    /// flushes it (outside the window); answers the freeze itself. `strict`
    /// (group snapshots): a member that cannot be quiesced (raw block in
    /// use) is FAILED_PRECONDITION rather than taken crash-consistent.
    pub async fn prepare_quiesce(&self, volume_ids: &[String], strict: bool) -> Result<Quiesce> {
        crate::host_node::quiesce::prepare(self.devices(volume_ids).await?, strict).await
    }

    async fn devices(&self, volume_ids: &[String]) -> Result<Vec<(String, Option<PathBuf>)>> {
        let mut devices = Vec::with_capacity(volume_ids.len());
        for id in volume_ids {
            devices.push((id.clone(), self.device(id).await?));
        }
        Ok(devices)
    }

    /// This node's part of a group snapshot spread over several nodes: its
    /// mounted members must be (and stay, through the clones) frozen by the
    /// relay's freeze; one it no longer holds is ABORTED.
    pub async fn prepare_quiesce_within_hold(&self, volume_ids: &[String]) -> Result<Quiesce> {
        crate::host_node::quiesce::prepare_within_hold(self.devices(volume_ids).await?).await
    }
}

/// A volume's condition from its file alone: what the node sees.
fn file_condition(path: &Path, device: Option<&Path>, available: u64, pool: &Pool) -> Condition {
    use std::os::unix::fs::MetadataExt;
    let meta = match std::fs::File::open(path).and_then(|f| f.metadata()) {
        Ok(m) => m,
        Err(e) => {
            return Condition::Abnormal(format!(
                "backing file {} is missing or unreadable: {e}",
                path.display()
            ))
        }
    };
    let device_size = device.and_then(|d| crate::host_node::fs::block_device_size(d).ok());
    if let Some(size) = device_size.filter(|s| meta.len() < *s) {
        return Condition::Abnormal(format!(
            "backing file {} is {} bytes, less than its attached device's {size} bytes",
            path.display(),
            meta.len()
        ));
    }
    // Writes into a thin volume's holes need pool space; the pod sees I/O
    // errors, and this says where they come from. A file with every block
    // allocated (thick) writes in place.
    let fully_allocated = meta.blocks() * 512 >= meta.len();
    if available < FULL_POOL_BYTES && !fully_allocated {
        return Condition::Abnormal(format!(
            "pool {} is full ({available} bytes free): writes to unallocated blocks of this \
             thin-provisioned volume fail",
            pool.root().display()
        ));
    }
    Condition::Healthy
}
