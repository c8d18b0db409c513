//! Node service: makes a volume usable in a pod and takes it away again.
//!
//! Stage is the engine's (a block engine's device formatted and mounted by
//! the block staging library, a filesystem engine's own mount); what every
//! engine shares is here: path and ID checks, one staging path per volume,
//! operation locks, publish (a bind mount of the stage, or of a raw block
//! volume's device; read-only enforced by a read-only device of its own),
//! unpublish, unmounting at unstage, and stats. Every decision reads the
//! kernel's own state (mountinfo, the engine's view of its volume's
//! mounts), so a restarted driver converges on repeated calls.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferrovol_csi as csi;
use ferrovol_csi::node_service_capability::rpc::Type as Cap;
use ferrovol_csi::volume_capability::access_mode::Mode;

use crate::engine::{AccessType, Attach, Features, Stage, VolumeView, BLOCK_STAGE_FILE};
use crate::error::{self, Error, Result};
use crate::locks;
use crate::rpc;
use crate::services::{convert, validate, Driver};
use ferrovol_host::node::beneath::{self, Beneath};
use ferrovol_host::node::fs as nodefs;
use ferrovol_host::node::mountinfo::{self, MountEntry};
use ferrovol_host::node::read_only as read_only_device;
use ferrovol_host::offload::{self, NODE_WORK, QUICK};

pub struct NodeConfig {
    /// Staging and target paths must lie under this directory.
    pub kubelet_dir: PathBuf,
    pub max_volumes_per_node: i64,
}

#[derive(Clone)]
pub struct NodeService {
    driver: Arc<Driver>,
    /// The kubelet directory, symlinks resolved: what paths are checked
    /// against.
    kubelet_dir: PathBuf,
    /// The kubelet directory as configured, which the kubelet also uses in
    /// the paths it sends (it may be a symlink to `kubelet_dir`).
    kubelet_dir_given: PathBuf,
    max_volumes_per_node: i64,
    /// Why node operations cannot work here (no CAP_SYS_ADMIN), if so.
    unprivileged: Option<String>,
}

/// Node operations mount filesystems and configure loop devices: both need
/// CAP_SYS_ADMIN. Said once, clearly, rather than as a cryptic EPERM.
fn privilege_problem() -> Option<String> {
    (!nodefs::has_capability(nodefs::CAP_SYS_ADMIN)).then(|| {
        "node operations need CAP_SYS_ADMIN (run ferrovol as root, or privileged in its pod)"
            .to_string()
    })
}

impl NodeService {
    pub fn new(driver: Arc<Driver>, config: NodeConfig) -> Self {
        let kubelet_dir_given = config.kubelet_dir.clone();
        let kubelet_dir = config.kubelet_dir.canonicalize().unwrap_or(config.kubelet_dir);
        NodeService {
            driver,
            kubelet_dir,
            kubelet_dir_given,
            max_volumes_per_node: config.max_volumes_per_node,
            unprivileged: privilege_problem(),
        }
    }

    /// What the engine's node half offers.
    pub fn capabilities(features: &Features) -> Vec<Cap> {
        let mut caps = vec![
            Cap::StageUnstageVolume,
            Cap::GetVolumeStats,
            Cap::VolumeCondition,
            Cap::SingleNodeMultiWriter,
        ];
        if features.node_expansion {
            caps.push(Cap::ExpandVolume);
        }
        caps
    }

    fn require_privilege(&self) -> Result<()> {
        match &self.unprivileged {
            Some(why) => Err(error::precondition(why.clone())),
            None => Ok(()),
        }
    }

    /// An absolute, `..`-free path under the kubelet directory whose
    /// existing part does not escape it through a symlink.
    fn checked_path(&self, raw: &str, what: &str) -> Result<PathBuf> {
        // A path under the configured directory is the same path under the
        // resolved one (the configured one may be a symlink).
        let translated = Path::new(raw)
            .strip_prefix(&self.kubelet_dir_given)
            .ok()
            .filter(|_| self.kubelet_dir_given != self.kubelet_dir)
            .map(|rest| self.kubelet_dir.join(rest).display().to_string());
        validate::kubelet_path(translated.as_deref().unwrap_or(raw), what, &self.kubelet_dir)
    }

    /// A `volume_path` (NodeGetVolumeStats, NodeExpandVolume) as a path under
    /// the kubelet directory; any other (relative, elsewhere) is where the
    /// volume is not: NOT_FOUND, as the spec's tables say, and as for an
    /// unmounted path or another volume's.
    fn volume_path(&self, volume_id: &str, raw: &str) -> Result<PathBuf> {
        self.checked_path(raw, "volume_path").map_err(|_| not_here(volume_id, Path::new(raw)))
    }

    /// The path where the volume is mounted on this node, among `mounts`
    /// (the volume's own, from [`crate::engine::NodeEngine::mounts`]); NOT_FOUND
    /// when `path` is not one of them, whatever else may be mounted there.
    fn own_mount<'a>(
        volume_id: &str,
        mounts: &'a [MountEntry],
        path: &Path,
    ) -> Result<&'a MountEntry> {
        mounts.iter().find(|m| m.mount_point == path).ok_or_else(|| not_here(volume_id, path))
    }

    fn access(
        cap: Option<&csi::VolumeCapability>,
        features: &Features,
    ) -> Result<(AccessType, Mode, Vec<String>)> {
        let cap = cap.ok_or_else(|| error::invalid("volume_capability is required"))?;
        let access = validate::capability(cap, features)?;
        let mode = cap
            .access_mode
            .as_ref()
            .and_then(|m| Mode::try_from(m.mode).ok())
            .unwrap_or(Mode::Unknown);
        let flags = match &cap.access_type {
            Some(csi::volume_capability::AccessType::Mount(m)) => m.mount_flags.clone(),
            _ => vec![],
        };
        Ok((access, mode, flags))
    }

    async fn stage(
        &self,
        req: csi::NodeStageVolumeRequest,
    ) -> Result<csi::NodeStageVolumeResponse> {
        validate::id(&req.volume_id, "volume_id")?;
        let staging = self.checked_path(&req.staging_target_path, "staging_target_path")?;
        let engine = self.driver.node();
        let (access, mode, flags) =
            Self::access(req.volume_capability.as_ref(), &engine.features())?;
        self.require_privilege()?;
        let _guard = self.driver.locks.exclusive(locks::volume(&req.volume_id))?;
        engine.check_known(&req.volume_id).await?;

        let mounts = engine.view(&req.volume_id).await?.mounts;
        let target = match access {
            AccessType::Block => staging.join(BLOCK_STAGE_FILE),
            AccessType::Mount { .. } => staging.clone(),
        };
        // A volume is staged at one path: the first mount of it.
        if let Some(first) =
            mounts.first().filter(|_| !mounts.iter().any(|m| m.mount_point == target))
        {
            let other_form = match access {
                AccessType::Block => first.mount_point == staging,
                AccessType::Mount { .. } => first.mount_point == staging.join(BLOCK_STAGE_FILE),
            };
            if other_form {
                return Err(error::exists(format!(
                    "volume {} is staged at {} with the other access type (block vs \
                     filesystem)",
                    req.volume_id,
                    staging.display()
                )));
            }
            return Err(error::precondition(format!(
                "volume {} is already staged at {}; one staging path per volume",
                req.volume_id,
                first.mount_point.display()
            )));
        }
        let request = Stage {
            volume: Attach {
                volume_id: req.volume_id.clone(),
                volume_context: req.volume_context.into_iter().collect(),
                publish_context: req.publish_context.into_iter().collect(),
                secrets: validate::secrets(&req.secrets),
                read_only: mode == Mode::SingleNodeReaderOnly,
            },
            access,
            mount_flags: flags,
            kubelet_dir: self.kubelet_dir.clone(),
            staging,
        };
        engine.stage(&request).await?;
        Ok(csi::NodeStageVolumeResponse {})
    }

    async fn publish(
        &self,
        req: csi::NodePublishVolumeRequest,
    ) -> Result<csi::NodePublishVolumeResponse> {
        validate::id(&req.volume_id, "volume_id")?;
        if req.target_path.is_empty() {
            return Err(error::invalid("target_path is required"));
        }
        if req.volume_capability.is_none() {
            return Err(error::invalid("volume_capability is required"));
        }
        // The spec's code: this plugin stages (STAGE_UNSTAGE_VOLUME), so a
        // publish must name where the volume was staged.
        if req.staging_target_path.is_empty() {
            return Err(error::precondition(
                "staging_target_path is required: this plugin stages volumes \
                 (STAGE_UNSTAGE_VOLUME); call NodeStageVolume first and publish from there",
            ));
        }
        let staging = self.checked_path(&req.staging_target_path, "staging_target_path")?;
        let target = self.checked_path(&req.target_path, "target_path")?;
        let engine = self.driver.node();
        let (access, mode, flags) =
            Self::access(req.volume_capability.as_ref(), &engine.features())?;
        self.require_privilege()?;
        let _guard = self.driver.locks.exclusive(locks::volume(&req.volume_id))?;
        engine.check_known(&req.volume_id).await?;
        let read_only = req.readonly || mode == Mode::SingleNodeReaderOnly;
        if target.starts_with(&staging) || staging.starts_with(&target) {
            return Err(error::invalid(format!(
                "target_path {} and staging_target_path {} must not contain one another",
                target.display(),
                staging.display()
            )));
        }

        let VolumeView { device, mounts } = engine.view(&req.volume_id).await?;
        let staged_at = match access {
            AccessType::Block => staging.join(BLOCK_STAGE_FILE),
            AccessType::Mount { .. } => staging.clone(),
        };
        let not_staged = || {
            error::precondition(format!(
                "volume {} is not staged at {}",
                req.volume_id,
                staging.display()
            ))
        };
        if !mounts.iter().any(|m| m.mount_point == staged_at) {
            return Err(not_staged());
        }
        // The device a raw block publish binds (a filesystem publish binds
        // the stage itself).
        let device = match access {
            AccessType::Block => Some(device.ok_or_else(not_staged)?),
            AccessType::Mount { .. } => None,
        };
        if let AccessType::Mount { fs_type } = &access {
            let staged = mounts.iter().find(|m| m.mount_point == staged_at);
            if let Some(m) = staged.filter(|m| !fs_type.is_empty() && m.fs_type != *fs_type) {
                return Err(error::precondition(format!(
                    "volume {} holds a {} filesystem, not the requested {fs_type}",
                    req.volume_id, m.fs_type
                )));
            }
        }
        if let Some(m) = mounts.iter().find(|m| m.mount_point == target) {
            if m.has_option("ro") == read_only {
                return Ok(csi::NodePublishVolumeResponse {});
            }
            return Err(error::exists(format!(
                "volume {} is already published at {} with a different read-only setting",
                req.volume_id,
                target.display()
            )));
        }
        if mode == Mode::SingleNodeSingleWriter {
            if let Some(other) = mounts.iter().find(|m| m.mount_point != staged_at) {
                return Err(error::precondition(format!(
                    "volume {} is single-writer (ReadWriteOncePod) and already published at {}",
                    req.volume_id,
                    other.mount_point.display()
                )));
            }
        }
        let all = offload::run("reading the mount table", QUICK, mountinfo::table).await?;
        if let Some(m) = mountinfo::at(&all, &target) {
            return Err(error::precondition(format!(
                "target {} is already a mount of something else ({})",
                target.display(),
                m.source
            )));
        }
        if std::fs::symlink_metadata(&target).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(error::invalid(format!("target {} is a symlink", target.display())));
        }
        let kubelet = self.kubelet_dir.clone();
        offload::run("publishing", NODE_WORK, move || {
            let paths = Beneath::open(&kubelet)?;
            match (access, device) {
                (AccessType::Block, Some(device)) if read_only => {
                    // `ro` on a device node's bind stops no write: the pod
                    // gets a device that refuses them itself.
                    let onto = paths.file(&target)?;
                    let ro_device = read_only_device::attach(&device)?;
                    let bound = beneath::open_source(&ro_device)
                        .and_then(|source| nodefs::bind(&source, &ro_device, &onto, &[], true));
                    if bound.is_err() {
                        let _ = read_only_device::detach(&ro_device);
                    }
                    bound
                }
                (AccessType::Block, Some(device)) => {
                    let onto = paths.file(&target)?;
                    let source = beneath::open_source(&device)?;
                    nodefs::bind(&source, &device, &onto, &[], read_only)
                }
                (AccessType::Block, None) => {
                    Err(error::internal("a raw block publish without its device"))
                }
                (AccessType::Mount { .. }, _) => {
                    let onto = paths.dir(&target)?;
                    // The staging mount itself, resolved as the target is.
                    let source = paths.existing(&staging)?.ok_or_else(|| {
                        error::precondition(format!("{} is gone", staging.display()))
                    })?;
                    // nodev,nosuid again: a bind's own flags are its own.
                    let mut flags = flags;
                    flags.push("nodev,nosuid".into());
                    nodefs::bind(&source.fd, &staging, &onto, &flags, read_only)
                }
            }
        })
        .await?;
        Ok(csi::NodePublishVolumeResponse {})
    }

    async fn unpublish(
        &self,
        req: csi::NodeUnpublishVolumeRequest,
    ) -> Result<csi::NodeUnpublishVolumeResponse> {
        validate::id(&req.volume_id, "volume_id")?;
        let target = self.checked_path(&req.target_path, "target_path")?;
        self.require_privilege()?;
        let _guard = self.driver.locks.exclusive(locks::volume(&req.volume_id))?;
        let engine = self.driver.node();
        engine.check_known(&req.volume_id).await?;
        let VolumeView { device, mounts } = engine.view(&req.volume_id).await?;
        let (id, kubelet) = (req.volume_id.clone(), self.kubelet_dir.clone());
        offload::run("unpublishing", NODE_WORK, move || {
            let all = mountinfo::table()?;
            refuse_foreign_mount(&id, &mounts, &all, &target)?;
            // A read-only publish's own device goes with its mount.
            let at_target: Vec<MountEntry> =
                mounts.iter().filter(|m| m.mount_point == target).cloned().collect();
            let ro_device = device
                .as_deref()
                .and_then(|d| read_only_device::among(&at_target, d).into_iter().next());
            unmount_all_and_remove(&Beneath::open(&kubelet)?, &target)?;
            ro_device.map_or(Ok(()), |ro| read_only_device::detach(&ro))
        })
        .await?;
        Ok(csi::NodeUnpublishVolumeResponse {})
    }

    async fn unstage(
        &self,
        req: csi::NodeUnstageVolumeRequest,
    ) -> Result<csi::NodeUnstageVolumeResponse> {
        validate::id(&req.volume_id, "volume_id")?;
        let staging = self.checked_path(&req.staging_target_path, "staging_target_path")?;
        self.require_privilege()?;
        let _guard = self.driver.locks.exclusive(locks::volume(&req.volume_id))?;
        let engine = self.driver.node();
        engine.check_known(&req.volume_id).await?;
        let VolumeView { device, mounts } = engine.view(&req.volume_id).await?;
        let marker = staging.join(BLOCK_STAGE_FILE);
        // Staged somewhere else, not here: the spec's answer is OK, and
        // nothing of the volume is touched (it stays staged where it is);
        // a path that holds another volume's mount is NOT_FOUND.
        let here = |m: &MountEntry| m.mount_point == staging || m.mount_point == marker;
        if !mounts.is_empty() && !mounts.iter().any(here) {
            let (id, own, s, mk) =
                (req.volume_id.clone(), mounts.clone(), staging.clone(), marker.clone());
            offload::run("reading the mount table", QUICK, move || {
                let all = mountinfo::table()?;
                refuse_foreign_mount(&id, &own, &all, &s)?;
                refuse_foreign_mount(&id, &own, &all, &mk)
            })
            .await?;
            tracing::warn!(
                volume_id = %req.volume_id,
                path = %staging.display(),
                staged_at = %mounts[0].mount_point.display(),
                "NodeUnstageVolume at a path where the volume is not staged: nothing to do"
            );
            return Ok(csi::NodeUnstageVolumeResponse {});
        }
        if let Some(p) = mounts.iter().find(|m| !here(m)) {
            return Err(error::precondition(format!(
                "volume {} is still published at {}",
                req.volume_id,
                p.mount_point.display()
            )));
        }
        let (id, kubelet) = (req.volume_id.clone(), self.kubelet_dir.clone());
        offload::run("unstaging", NODE_WORK, move || {
            let all = mountinfo::table()?;
            refuse_foreign_mount(&id, &mounts, &all, &staging)?;
            refuse_foreign_mount(&id, &mounts, &all, &marker)?;
            let paths = Beneath::open(&kubelet)?;
            // A filesystem staged here is never looked into for a block
            // stage's file: it may be dead (its fuse helper gone, every
            // lookup ENOTCONN), and it must still come down.
            let mounted = |p: &Path| all.iter().any(|m| m.mount_point == p);
            if mounted(&marker) || (!mounted(&staging) && paths.existing(&marker)?.is_some()) {
                unmount_all_and_remove(&paths, &marker)?;
            }
            unmount_all(&paths, &staging)
        })
        .await?;
        if let Err(e) = engine.release(&req.volume_id).await {
            // Nothing is published any more: a read-only publish device
            // still over the volume's is one a crash left between making
            // and mounting it, and it holds the device. Looked for only
            // now (a walk of every loop device), then the release again.
            let Some(d) = device.filter(|_| e.code() == tonic::Code::FailedPrecondition) else {
                return Err(e);
            };
            let strays = offload::run("finding read-only publish devices", QUICK, move || {
                let strays = read_only_device::over(&d)?;
                for ro in &strays {
                    read_only_device::detach(ro)?;
                }
                Ok(strays)
            })
            .await?;
            if strays.is_empty() {
                return Err(e);
            }
            tracing::warn!(volume_id = %req.volume_id, ?strays,
                "detached read-only publish devices a crash left behind");
            engine.release(&req.volume_id).await?;
        }
        Ok(csi::NodeUnstageVolumeResponse {})
    }

    async fn stats(
        &self,
        req: csi::NodeGetVolumeStatsRequest,
    ) -> Result<csi::NodeGetVolumeStatsResponse> {
        use crate::engine::Condition::{Abnormal, Healthy};
        // The spec's order: a missing argument, then an unknown volume
        // (whatever the path), then a path where the volume is not.
        validate::id(&req.volume_id, "volume_id")?;
        if req.volume_path.is_empty() {
            return Err(error::invalid("volume_path is required"));
        }
        let engine = self.driver.node();
        engine.check_known(&req.volume_id).await?;
        let path = self.volume_path(&req.volume_id, &req.volume_path)?;
        // Only the volume's own mount is measured: never whatever filesystem
        // (the host's) lies under a path it has left.
        let mounts = engine.view(&req.volume_id).await?.mounts;
        let mount = Self::own_mount(&req.volume_id, &mounts, &path)?.clone();
        // A statfs of a network filesystem blocks while its server is away:
        // measured off the executor, and given up on after a deadline.
        let at = path.clone();
        let measured = offload::run("measuring the volume", QUICK, move || usage(&at)).await?;
        let (usage, unmeasured) = match measured {
            Ok(usage) => (usage, None),
            // The volume's own mount whose filesystem does not answer (its
            // fuse helper gone: ENOTCONN): an abnormal volume, which the
            // caller can act on, not a failed call.
            Err(why) => (vec![], Some(why)),
        };
        let problem = match engine.condition(&req.volume_id, &mount).await? {
            Abnormal(m) => Some(m),
            Healthy if unmeasured.is_some() => unmeasured,
            Healthy if mount.super_read_only() && !mount.has_option("ro") => Some(
                "the filesystem was remounted read-only by the kernel (I/O or filesystem errors)"
                    .into(),
            ),
            Healthy => None,
        };
        let condition = problem.map_or(Healthy, Abnormal);
        Ok(csi::NodeGetVolumeStatsResponse {
            usage,
            volume_condition: Some(convert::condition(&condition)),
        })
    }

    async fn expand(
        &self,
        req: csi::NodeExpandVolumeRequest,
    ) -> Result<csi::NodeExpandVolumeResponse> {
        let engine = self.driver.node();
        if !engine.features().node_expansion {
            return Err(error::unsupported(format!(
                "the {} engine grows volumes in the controller; the node has nothing to do",
                engine.kind()
            )));
        }
        validate::id(&req.volume_id, "volume_id")?;
        if req.volume_path.is_empty() {
            return Err(error::invalid("volume_path is required"));
        }
        let (required, limit) = validate::capacity_range(req.capacity_range.as_ref())?;
        self.require_privilege()?;
        let _guard = self.driver.locks.exclusive(locks::volume(&req.volume_id))?;
        engine.check_known(&req.volume_id).await?;
        let path = self.volume_path(&req.volume_id, &req.volume_path)?;
        // Staged, and at this path, before anything grows.
        let view = engine.view(&req.volume_id).await?;
        Self::own_mount(&req.volume_id, &view.mounts, &path)?;
        let capacity = engine.expand(&req.volume_id, &path, &view, required, limit).await?;
        Ok(csi::NodeExpandVolumeResponse { capacity_bytes: capacity as i64 })
    }
}

/// NodeGetVolumeStats' usage of what is at `path`: a device's size, or a
/// filesystem's bytes and inodes; the inner error says why a path that is
/// there cannot be measured.
fn usage(path: &Path) -> Result<std::result::Result<Vec<csi::VolumeUsage>, String>> {
    use csi::volume_usage::Unit;
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(error::not_found(format!("volume path {} does not exist", path.display())))
        }
        Err(e) => return Ok(Err(format!("its filesystem does not answer: {e}"))),
    };
    if std::os::unix::fs::FileTypeExt::is_block_device(&meta.file_type()) {
        let total = nodefs::block_device_size(path)?;
        return Ok(Ok(vec![csi::VolumeUsage {
            total: total as i64,
            unit: Unit::Bytes as i32,
            ..Default::default()
        }]));
    }
    let st = match rustix::fs::statvfs(path) {
        Ok(st) => st,
        Err(e) => return Ok(Err(format!("its filesystem does not answer: {e}"))),
    };
    Ok(Ok(filesystem_usage(&Counts {
        block: st.f_frsize,
        blocks: st.f_blocks,
        free: st.f_bfree,
        available: st.f_bavail,
        files: st.f_files,
        files_free: st.f_ffree,
        files_available: st.f_favail,
    })))
}

/// A filesystem's counts, as statvfs gives them.
struct Counts {
    block: u64,
    blocks: u64,
    free: u64,
    available: u64,
    files: u64,
    files_free: u64,
    files_available: u64,
}

/// Bytes, and inodes where the filesystem counts them. A network
/// filesystem may report counts that do not add up (CephFS says -1 free
/// inodes: it has no limit to count down from): such a figure is left out,
/// never wrapped around into a nonsense number.
fn filesystem_usage(c: &Counts) -> Vec<csi::VolumeUsage> {
    use csi::volume_usage::Unit;
    let bytes = |n: u64| i64::try_from(n.saturating_mul(c.block)).unwrap_or(i64::MAX);
    let mut usage = vec![csi::VolumeUsage {
        available: bytes(c.available),
        total: bytes(c.blocks),
        used: bytes(c.blocks.saturating_sub(c.free)),
        unit: Unit::Bytes as i32,
    }];
    if c.files_free <= c.files && c.files_available <= c.files {
        usage.push(csi::VolumeUsage {
            available: c.files_available as i64,
            total: c.files as i64,
            used: (c.files - c.files_free) as i64,
            unit: Unit::Inodes as i32,
        });
    }
    usage
}

/// The one answer for a volume path where the volume is not.
fn not_here(volume_id: &str, path: &Path) -> Error {
    error::not_found(format!(
        "volume {} is not staged or published at {}",
        error::bounded(volume_id),
        error::bounded(&path.to_string_lossy())
    ))
}

/// A mount at `path` that is not the volume's own is someone else's: NOT_FOUND,
/// and it is left alone.
fn refuse_foreign_mount(
    volume_id: &str,
    own: &[MountEntry],
    all: &[MountEntry],
    path: &Path,
) -> Result<()> {
    match mountinfo::at(all, path) {
        Some(m) if !own.iter().any(|o| o.mount_point == path) => Err(error::not_found(format!(
            "{} holds a mount of {}, not of volume {volume_id}; it is left as it is",
            path.display(),
            m.source
        ))),
        _ => Ok(()),
    }
}

/// Unmounts everything stacked at `path`, each mount named through a
/// descriptor resolved beneath the kubelet directory.
fn unmount_all(paths: &Beneath, path: &Path) -> Result<()> {
    // Bounded: a path can only hold so many stacked mounts, and a loop that
    // never empties the stack must not spin forever.
    for _ in 0..16 {
        if mountinfo::at(&mountinfo::table()?, path).is_none() {
            return Ok(());
        }
        if !paths.unmount(path)? {
            return Ok(());
        }
    }
    Err(error::internal(format!("{} stays mounted", path.display())))
}

/// Unmounts `path` and removes the directory or file there; gone is fine.
fn unmount_all_and_remove(paths: &Beneath, path: &Path) -> Result<()> {
    unmount_all(paths, path)?;
    paths.remove(path)
}

impl NodeService {
    async fn get_capabilities(
        &self,
        _: csi::NodeGetCapabilitiesRequest,
    ) -> Result<csi::NodeGetCapabilitiesResponse> {
        Self::capabilities_answer(&self.driver.node().features())
    }

    /// NodeGetCapabilities' answer for an engine with these features.
    pub(crate) fn capabilities_answer(
        features: &Features,
    ) -> Result<csi::NodeGetCapabilitiesResponse> {
        let capabilities = Self::capabilities(features)
            .into_iter()
            .map(|c| csi::NodeServiceCapability {
                r#type: Some(csi::node_service_capability::Type::Rpc(
                    csi::node_service_capability::Rpc { r#type: c as i32 },
                )),
            })
            .collect();
        Ok(csi::NodeGetCapabilitiesResponse { capabilities })
    }

    async fn get_info(&self, _: csi::NodeGetInfoRequest) -> Result<csi::NodeGetInfoResponse> {
        let topology = self.driver.node().topology();
        Ok(csi::NodeGetInfoResponse {
            node_id: self.driver.node_id.clone(),
            max_volumes_per_node: self.max_volumes_per_node,
            accessible_topology: (!topology.is_empty()).then(|| convert::topology(&topology)),
        })
    }
}

rpc::service! {
    NodeService: csi::node_server::Node {
        fn node_stage_volume(csi::NodeStageVolumeRequest)
            -> csi::NodeStageVolumeResponse => detached stage;
        fn node_unstage_volume(csi::NodeUnstageVolumeRequest)
            -> csi::NodeUnstageVolumeResponse => detached unstage;
        fn node_publish_volume(csi::NodePublishVolumeRequest)
            -> csi::NodePublishVolumeResponse => detached publish;
        fn node_unpublish_volume(csi::NodeUnpublishVolumeRequest)
            -> csi::NodeUnpublishVolumeResponse => detached unpublish;
        fn node_get_volume_stats(csi::NodeGetVolumeStatsRequest)
            -> csi::NodeGetVolumeStatsResponse => inline stats;
        fn node_expand_volume(csi::NodeExpandVolumeRequest)
            -> csi::NodeExpandVolumeResponse => detached expand;
        fn node_get_capabilities(csi::NodeGetCapabilitiesRequest)
            -> csi::NodeGetCapabilitiesResponse => inline get_capabilities;
        fn node_get_info(csi::NodeGetInfoRequest) -> csi::NodeGetInfoResponse => inline get_info;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_leaves_out_counts_that_do_not_add_up() {
        use csi::volume_usage::Unit;
        let ext4 = Counts {
            block: 4096,
            blocks: 100,
            free: 40,
            available: 30,
            files: 64,
            files_free: 60,
            files_available: 60,
        };
        let u = filesystem_usage(&ext4);
        assert_eq!((u[0].total, u[0].used, u[0].available), (409_600, 245_760, 122_880));
        assert_eq!((u[1].unit, u[1].total, u[1].used), (Unit::Inodes as i32, 64, 4));
        // CephFS through ceph-fuse: 4 MiB blocks, the quota as the total,
        // two files and -1 free inodes.
        let cephfs = Counts {
            block: 4 << 20,
            blocks: 25,
            free: 25,
            available: 25,
            files: 2,
            files_free: u64::MAX,
            files_available: u64::MAX,
        };
        let u = filesystem_usage(&cephfs);
        assert_eq!(u.len(), 1, "no inode figures: {u:?}");
        assert_eq!((u[0].total, u[0].used), (100 << 20, 0));
        // Free above total (a counter racing a delete): used is zero.
        let racing = Counts { free: 101, ..ext4 };
        assert_eq!(filesystem_usage(&racing)[0].used, 0);
    }
}
