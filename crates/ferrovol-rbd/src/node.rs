//! The node half: maps an image from the volume ID (its pool and name),
//! the volume context (a StorageClass's `mounter`) and the stage secrets;
//! the node service formats, mounts and grows it as any block device.
//!
//! Before mapping an image published with a single-node access mode, a
//! lock held by another client is broken (which blocklists that client):
//! the controller gave this node the volume, so the holder is a dead or
//! fenced node whose lock would otherwise stall the first write until its
//! watch times out.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ferrovol_block::{Attacher, Attachment, Written};
use ferrovol_core::engine::{Attach, Condition, Features, Topology};

use crate::connect::Connections;
use crate::error::{self, Result};
use crate::ids::VolumeId;
use crate::mapper::{self, Mapper};
use crate::{blocking, ceph_error};

pub struct RbdNode {
    conn: Connections,
    state_dir: PathBuf,
    default_mapper: &'static dyn Mapper,
}

impl RbdNode {
    pub fn new(conn: Connections, state_dir: PathBuf, choice: mapper::Choice) -> Result<RbdNode> {
        let default_mapper = mapper::choose(choice)?;
        tracing::info!(mapper = default_mapper.name(), "RBD images are mapped with this mapper");
        Ok(RbdNode { conn, state_dir, default_mapper })
    }

    fn parse(volume_id: &str) -> Result<VolumeId> {
        VolumeId::parse(volume_id)
            .ok_or_else(|| error::not_found(format!("volume {volume_id:?} does not exist")))
    }

    /// Breaks a lock another client holds on an image this node was
    /// given alone.
    async fn fence_others(&self, v: &VolumeId, request: &Attach) -> Result<()> {
        if request.publish_context.get("exclusive").map(String::as_str) != Some("true") {
            return Ok(());
        }
        let pool = self.conn.node_pool(&v.pool, &request.secrets).await?;
        let image = v.image.clone();
        blocking(move || {
            // Lock owners are only seen through a writable open (which
            // watches the image but takes no lock).
            let img = pool.open(&image).map_err(ceph_error)?;
            // Without the exclusive-lock feature there is no lock to hold.
            if img.features().map_err(ceph_error)? & ferrovol_ceph::FEATURE_EXCLUSIVE_LOCK == 0 {
                return Ok(());
            }
            for owner in img.lock_owners().map_err(ceph_error)? {
                tracing::warn!(image = %image, owner = %owner, "breaking a stale lock (its client is blocklisted)");
                match img.lock_break(&owner) {
                    Err(e) if !e.is(libc::ENOENT) => return Err(ceph_error(e)),
                    _ => {}
                }
            }
            Ok(())
        })
        .await
    }
}

#[tonic::async_trait]
impl Attacher for RbdNode {
    fn kind(&self) -> &'static str {
        "rbd"
    }

    fn features(&self) -> Features {
        crate::controller::features()
    }

    fn topology(&self) -> Topology {
        BTreeMap::new()
    }

    async fn close(&self) -> Result<()> {
        let limit = std::time::Duration::from_secs(self.conn.config().op_timeout);
        crate::close_connections(&self.conn, limit).await;
        Ok(())
    }

    async fn health(&self) -> Result<()> {
        self.default_mapper.available().map_err(error::unavailable)
    }

    async fn check_known(&self, volume_id: &str) -> Result<()> {
        Self::parse(volume_id).map(drop)
    }

    async fn attach(&self, request: &Attach) -> Result<Attachment> {
        let v = Self::parse(&request.volume_id)?;
        if let Some((_, device)) = mapper::find(&self.state_dir, &v)? {
            return Ok(Attachment { device, fresh: false });
        }
        let mapper = match request.volume_context.get("mounter") {
            Some(m) => {
                let chosen = mapper::by_name(m)
                    .ok_or_else(|| error::invalid(format!("mounter {m:?} is unknown")))?;
                chosen.available().map_err(|e| error::precondition(format!("mounter {m}: {e}")))?;
                chosen
            }
            None => self.default_mapper,
        };
        self.fence_others(&v, request).await?;
        let auth = self.conn.helper_auth(&request.secrets)?;
        let device = mapper.map(&self.state_dir, &v, &auth).await?;
        Ok(Attachment { device, fresh: true })
    }

    /// From the image itself: any extent `rbd_diff_iterate2` reports from
    /// nothing (parents included) means data is there.
    async fn written(&self, request: &Attach, _device: &Path) -> Result<Written> {
        let v = Self::parse(&request.volume_id)?;
        let pool = self.conn.node_pool(&v.pool, &request.secrets).await?;
        blocking(move || {
            let img = pool.open_read_only(&v.image).map_err(ceph_error)?;
            let size = img.size().map_err(ceph_error)?;
            let (mut bytes, mut first) = (0u64, None);
            img.diff(None, 0, size, &mut |off, len, exists| {
                if exists {
                    bytes += len;
                    first.get_or_insert(off);
                }
                true
            })
            .map_err(ceph_error)?;
            Ok(match first {
                None => Written::Never,
                Some(offset) => Written::Maybe(format!(
                    "its image holds {bytes} bytes of data (the first at offset {offset})"
                )),
            })
        })
        .await
    }

    async fn detach(&self, volume_id: &str) -> Result<()> {
        mapper::unmap(&self.state_dir, &Self::parse(volume_id)?).await
    }

    async fn device(&self, volume_id: &str) -> Result<Option<PathBuf>> {
        Ok(mapper::find(&self.state_dir, &Self::parse(volume_id)?)?.map(|(_, d)| d))
    }

    async fn all_attached(&self) -> Result<Vec<PathBuf>> {
        mapper::all(&self.state_dir)
    }

    async fn refresh(&self, volume_id: &str, size: u64) -> Result<()> {
        match mapper::find(&self.state_dir, &Self::parse(volume_id)?)? {
            Some((mapper, device)) => mapper.refresh(&device, size).await,
            None => {
                Err(error::precondition(format!("volume {volume_id} is not mapped on this node")))
            }
        }
    }

    async fn condition(&self, volume_id: &str) -> Result<Condition> {
        let v = Self::parse(volume_id)?;
        let (state, id) = (self.state_dir.clone(), volume_id.to_string());
        // sysfs, /proc and the state dir: read off the executor.
        blocking(move || {
            Ok(match mapper::find(&state, &v)? {
                Some((mapper, _)) => match mapper.trouble(&state, &v) {
                    Some(why) => Condition::Abnormal(format!("volume {id}: {why}")),
                    None => Condition::Healthy,
                },
                None if mapper::fuse_dir(&state, &v).exists() => Condition::Abnormal(format!(
                    "the mapping of {id} is gone: unstage and stage the volume again"
                )),
                None => Condition::Healthy,
            })
        })
        .await
    }
}
