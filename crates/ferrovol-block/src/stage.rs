//! Staging one attached device: a raw block volume's device bound onto the
//! stage file; a filesystem volume probed, formatted only if provably
//! blank, grown if it lags its device, and mounted.

use std::path::Path;

use ferrovol_core::engine::{AccessType, Stage};
use ferrovol_core::error::{self, Result};
use ferrovol_host::node::beneath::{self, Beneath};
use ferrovol_host::node::fs::{self as nodefs, Content};
use ferrovol_host::node::mountinfo;
use ferrovol_host::offload::{self, NODE_WORK, QUICK};

use crate::format::FormatMarker;
use crate::{Attacher, Written};

/// Stages `device` (the volume's, attached) as `request` asks.
pub(crate) async fn on(
    attacher: &dyn Attacher,
    state_dir: &Path,
    device: &Path,
    request: &Stage,
) -> Result<()> {
    let volume_id = request.volume.volume_id.as_str();
    let read_only = request.volume.read_only;
    let target = request.target();
    let mounts = offload::run("reading the mount table", QUICK, mountinfo::table).await?;
    if let Some(m) = mountinfo::at(&mounts, &target) {
        if mountinfo::device_at(&mounts, device, &target)? {
            return Ok(()); // already staged here: idempotent
        }
        return Err(error::exists(format!(
            "staging path {} already holds another mount ({})",
            target.display(),
            m.source
        )));
    }
    let (kubelet, dir) = (request.kubelet_dir.clone(), request.staging.clone());
    offload::run("creating the staging directory", NODE_WORK, move || {
        Beneath::open(&kubelet)?.dir(&dir).map(drop)
    })
    .await?;

    let fs_type = match &request.access {
        AccessType::Block => {
            let (kubelet, device) = (request.kubelet_dir.clone(), device.to_path_buf());
            return offload::run("binding the device", NODE_WORK, move || {
                let onto = Beneath::open(&kubelet)?.file(&target)?;
                let source = beneath::open_source(&device)?;
                nodefs::bind(&source, &device, &onto, &[], false)
            })
            .await;
        }
        AccessType::Mount { fs_type } => fs_type,
    };
    let marker = FormatMarker::new(state_dir, volume_id);
    let content = match marker.exists() {
        true => Content::Blank,
        false => nodefs::probe(device).await?,
    };
    // No signature is not no data: only a volume the engine knows was
    // never written is formatted.
    if content == Content::Blank && !marker.exists() {
        if let Written::Maybe(why) = attacher.written(&request.volume, device).await? {
            return Err(error::precondition(format!(
                "volume {volume_id} shows no filesystem signature, but {why}: it will not be \
                 formatted (stage it as a raw block volume to reach its data, or erase it \
                 yourself if the data is not wanted)"
            )));
        }
    }
    let features = attacher.features();
    let fs_type = match content {
        Content::Blank => {
            let fs = features.filesystem(fs_type).ok_or_else(|| {
                error::invalid(format!("fs_type {fs_type:?} is not one this engine formats"))
            })?;
            let dev = device.to_path_buf();
            let size =
                offload::run("sizing the device", QUICK, move || nodefs::block_device_size(&dev))
                    .await?;
            if size < fs.minimum_size {
                return Err(error::precondition(format!(
                    "volume {volume_id} ({size} bytes) is too small for {} (needs {})",
                    fs.name, fs.minimum_size
                )));
            }
            if read_only {
                return Err(error::precondition(format!(
                    "volume {volume_id} is blank and cannot be formatted read-only"
                )));
            }
            let m = marker.clone();
            offload::run("recording the format", NODE_WORK, move || m.set()).await?;
            nodefs::mkfs(device, fs.name).await?;
            // Durably gone before anything can be written to the
            // filesystem, or a later stage would format it again.
            offload::run("clearing the format record", NODE_WORK, move || marker.clear()).await?;
            fs.name.to_string()
        }
        Content::Filesystem(found) if fs_type.is_empty() || *fs_type == found => found,
        Content::Filesystem(found) => {
            return Err(error::precondition(format!(
                "volume {volume_id} holds a {found} filesystem, not the requested {fs_type}; \
                 it will not be reformatted"
            )))
        }
        Content::Unknown(what) => {
            return Err(error::precondition(format!(
                "volume {volume_id} holds data that is not a filesystem ({what}); it will not \
                 be formatted"
            )))
        }
    };
    // A volume that grew while its ext4 could not (no CAP_SYS_RESOURCE)
    // grows here, before the mount.
    if fs_type == "ext4" && !read_only && nodefs::grow_unmounted_ext4(device).await? {
        tracing::info!(volume_id, "grew the ext4 filesystem to its volume at stage");
    }
    let (device, staging, flags) =
        (device.to_path_buf(), request.staging.clone(), request.mount_flags.clone());
    let kubelet = request.kubelet_dir.clone();
    offload::run("mounting", NODE_WORK, move || {
        // Resolved once, mounted onto what was resolved.
        let onto = Beneath::open(&kubelet)?.dir(&staging)?;
        let mounted = nodefs::mount(&device, &onto, &fs_type, &flags, read_only);
        if mounted.is_err() && mountinfo::device_at(&mountinfo::table()?, &device, &staging)? {
            return Ok(()); // a mount from before a restart finished meanwhile
        }
        mounted
    })
    .await
}
