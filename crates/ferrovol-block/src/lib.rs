//! Block staging, shared by every engine whose volumes are block devices
//! (local loop devices, RBD through krbd, nbd or rbd-fuse).
//!
//! An engine writes an [`Attacher`]: how a volume becomes a device on this
//! node and stops being one. [`BlockStaging`] turns it into the core's
//! [`NodeEngine`]: it formats a device only when it is provably blank,
//! grows and mounts it, binds a raw block volume's device, finds every
//! mount of a volume from the kernel's table, thaws what a dead run left
//! frozen. Quiescing (freezing the filesystems of attached volumes for a
//! snapshot's instant) is the block engines' own business, done through
//! `ferrovol_host::node::quiesce` with the devices their attacher knows.

#![forbid(unsafe_code)]

mod format;
mod stage;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferrovol_core::engine::{
    Attach, Condition, Features, Filesystem, MountEntry, NodeEngine, Stage, Topology, VolumeView,
};
use ferrovol_core::error::{self, Result};
use ferrovol_host::node::fs as nodefs;
use ferrovol_host::node::quiesce;
use ferrovol_host::offload;

/// The filesystems block staging formats, the default first, each with the
/// smallest device its mkfs accepts (xfsprogs refuses under 300 MiB,
/// btrfs-progs under about 114 MiB; mkfs.ext4 with 4 KiB blocks needs
/// somewhat over 128 KiB, and 1 MiB leaves room for a usable filesystem).
pub fn filesystems() -> Vec<Filesystem> {
    vec![
        Filesystem { name: "ext4", minimum_size: 1 << 20 },
        Filesystem { name: "xfs", minimum_size: 300 << 20 },
        Filesystem { name: "btrfs", minimum_size: 120 << 20 },
    ]
}

/// Whether a volume that shows no filesystem signature was ever written:
/// only one provably never written may be formatted (data without a
/// signature — a database's raw device, headerless encrypted data — looks
/// blank to `blkid`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Written {
    /// Nothing was ever written: formatting loses nothing.
    Never,
    /// Data is there, or may be: why, for the refusal.
    Maybe(String),
}

/// What [`Attacher::attach`] answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    pub device: PathBuf,
    /// Attached by this call (not already): a failed first stage detaches
    /// it again.
    pub fresh: bool,
}

/// How an engine makes its volumes block devices on this node: the one
/// part of the node half that differs between block engines (a loop
/// device over a pool file; an RBD image mapped by krbd, nbd or rbd-fuse).
#[tonic::async_trait]
pub trait Attacher: Send + Sync + 'static {
    fn kind(&self) -> &'static str;

    fn features(&self) -> Features;

    /// This node's topology segments (NodeGetInfo).
    fn topology(&self) -> Topology;

    /// Checks that volumes can be attached here now (Probe).
    async fn health(&self) -> Result<()>;

    /// NOT_FOUND unless the volume is one this node can reach.
    async fn check_known(&self, volume_id: &str) -> Result<()>;

    /// Makes the volume a block device on this node; answers its device,
    /// and whether this call attached it. Attaching an attached volume
    /// answers the same device.
    async fn attach(&self, request: &Attach) -> Result<Attachment>;

    /// Undoes `attach`; detaching a detached volume succeeds.
    async fn detach(&self, volume_id: &str) -> Result<()>;

    /// The device the volume is attached as on this node, if it is.
    async fn device(&self, volume_id: &str) -> Result<Option<PathBuf>>;

    /// Every device of this engine's volumes attached on this node, and
    /// nothing else's.
    async fn all_attached(&self) -> Result<Vec<PathBuf>>;

    /// Makes the attached device show the volume's current size after an
    /// expansion (some devices follow on their own; others must be told).
    /// `size` is the capacity the volume was grown to (0: unknown).
    async fn refresh(&self, volume_id: &str, size: u64) -> Result<()>;

    /// The volume's health as this node sees it.
    async fn condition(&self, volume_id: &str) -> Result<Condition>;

    /// At start-up: detaches what a stage killed between attaching and
    /// mounting left attached; answers the volumes released.
    async fn release_unused(&self) -> Result<Vec<String>> {
        Ok(Vec::new())
    }

    async fn close(&self) -> Result<()> {
        Ok(())
    }

    /// Whether the attached volume (`device`) was ever written, asked when
    /// it shows no filesystem signature, before formatting it. An engine
    /// that cannot tell answers `Maybe`, and such a volume is never
    /// formatted.
    async fn written(&self, request: &Attach, device: &Path) -> Result<Written> {
        let _ = (request, device);
        Ok(Written::Maybe(format!("the {} engine cannot tell whether it was written", self.kind())))
    }

    /// Grows the volume's storage, for engines whose expansion happens on
    /// the node; answers the new capacity. Others answer 0 (the controller
    /// grew it already).
    async fn grow(&self, volume_id: &str, required: u64, limit: u64) -> Result<u64> {
        let _ = (volume_id, required, limit);
        Ok(0)
    }
}

/// The core's node half for an engine whose volumes are block devices.
pub struct BlockStaging<A> {
    attacher: Arc<A>,
    /// Where format records live (`<state>/formatting/…`).
    state_dir: PathBuf,
}

impl<A: Attacher> BlockStaging<A> {
    pub fn new(attacher: Arc<A>, state_dir: &Path) -> BlockStaging<A> {
        BlockStaging { attacher, state_dir: state_dir.to_path_buf() }
    }

    pub fn attacher(&self) -> &Arc<A> {
        &self.attacher
    }

    /// The volume's device here, if attached, and every mount of it (and
    /// of its read-only publish devices).
    async fn device_mounts(&self, volume_id: &str) -> Result<(Option<PathBuf>, Vec<MountEntry>)> {
        let Some(device) = self.attacher.device(volume_id).await? else {
            return Ok((None, vec![]));
        };
        let dev = device.clone();
        let mounts = offload::run("reading the mount table", offload::QUICK, move || {
            quiesce::mounts_of(&dev)
        })
        .await?;
        Ok((Some(device), mounts))
    }
}

#[tonic::async_trait]
impl<A: Attacher> NodeEngine for BlockStaging<A> {
    fn kind(&self) -> &'static str {
        self.attacher.kind()
    }

    fn features(&self) -> Features {
        self.attacher.features()
    }

    fn topology(&self) -> Topology {
        self.attacher.topology()
    }

    async fn health(&self) -> Result<()> {
        self.attacher.health().await
    }

    async fn check_known(&self, volume_id: &str) -> Result<()> {
        self.attacher.check_known(volume_id).await
    }

    async fn stage(&self, request: &Stage) -> Result<()> {
        let Attachment { device, fresh } = self.attacher.attach(&request.volume).await?;
        let staged = stage::on(self.attacher.as_ref(), &self.state_dir, &device, request).await;
        if staged.is_err() && fresh {
            // Nothing of a failed first stage may stay attached.
            let _ = self.attacher.detach(&request.volume.volume_id).await;
        }
        staged
    }

    async fn release(&self, volume_id: &str) -> Result<()> {
        self.attacher.detach(volume_id).await
    }

    async fn view(&self, volume_id: &str) -> Result<VolumeView> {
        let (device, mounts) = self.device_mounts(volume_id).await?;
        Ok(VolumeView { device, mounts })
    }

    async fn condition(&self, volume_id: &str, staged: &MountEntry) -> Result<Condition> {
        if let Condition::Abnormal(why) = self.attacher.condition(volume_id).await? {
            return Ok(Condition::Abnormal(why));
        }
        let Some(device) = self.attacher.device(volume_id).await? else {
            return Ok(Condition::Healthy);
        };
        let ext4 = staged.fs_type == "ext4";
        let lags =
            offload::run("comparing the filesystem to its device", offload::QUICK, move || {
                Ok(ext4 && nodefs::ext4_smaller_than_device(&device))
            })
            .await?;
        Ok(match lags {
            true => Condition::Abnormal(
                "the ext4 filesystem is smaller than its grown volume: it grows when the volume \
                 is next staged (or online, given CAP_SYS_RESOURCE)"
                    .into(),
            ),
            false => Condition::Healthy,
        })
    }

    async fn expand(
        &self,
        volume_id: &str,
        path: &Path,
        view: &VolumeView,
        required: u64,
        limit: u64,
    ) -> Result<u64> {
        let mounts = &view.mounts;
        let device = view.device.clone().ok_or_else(|| {
            error::not_found(format!(
                "volume {} is not staged on this node",
                error::bounded(volume_id)
            ))
        })?;
        self.attacher.grow(volume_id, required, limit).await?;
        self.attacher.refresh(volume_id, required).await?;
        // What the device now is: the volume's capacity as this node sees it.
        let (dev, at) = (device.clone(), path.to_path_buf());
        let (capacity, is_block) = offload::run("sizing the device", offload::QUICK, move || {
            let is_block = std::fs::metadata(&at)
                .map(|m| std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()))
                .unwrap_or(false);
            Ok((nodefs::block_device_size(&dev)?, is_block))
        })
        .await?;
        if !is_block {
            let mount = mounts
                .iter()
                .find(|m| m.mount_point == path)
                .or_else(|| mounts.iter().find(|m| m.fs_type != "devtmpfs"))
                .ok_or_else(|| {
                    error::precondition(format!("volume {volume_id} has no mounted filesystem"))
                })?;
            // A request no larger than the volume (the spec's idempotent
            // "already big enough") has nothing to grow: an ext4 that fills
            // its device is left alone, rather than asking for a capability
            // to do nothing.
            let dev = device.clone();
            let ext4 = mount.fs_type == "ext4";
            let lags =
                offload::run("comparing the filesystem to its device", offload::QUICK, move || {
                    Ok(!ext4 || nodefs::ext4_smaller_than_device(&dev))
                })
                .await?;
            if lags {
                nodefs::grow(&mount.fs_type, &device, &mount.mount_point).await?;
            }
        }
        Ok(capacity)
    }

    async fn staged(&self) -> Result<Vec<Vec<MountEntry>>> {
        let devices = self.attacher.all_attached().await?;
        offload::run("reading the mount table", offload::QUICK, move || {
            devices.iter().map(|d| quiesce::mounts_of(d)).collect()
        })
        .await
    }

    /// A driver that died inside a snapshot's freeze window left that
    /// filesystem frozen, and every writer in the pod hanging: thawed
    /// first. Then what a stage killed between attaching and mounting left
    /// attached is released.
    async fn recover(&self) -> Result<Vec<String>> {
        let devices = self.attacher.all_attached().await?;
        let thawed = offload::run("thawing", offload::NODE_WORK, move || {
            Ok(quiesce::thaw_left_frozen(&devices))
        })
        .await?;
        let mut done: Vec<String> = thawed
            .iter()
            .map(|m| format!("thawed a filesystem a previous run left frozen: {}", m.display()))
            .collect();
        for volume_id in self.attacher.release_unused().await? {
            done.push(format!(
                "released an attachment a stage left without a mount (the previous run stopped \
                 inside it): volume {volume_id}"
            ));
        }
        Ok(done)
    }

    async fn close(&self) -> Result<()> {
        self.attacher.close().await
    }
}
