//! The node half: a volume is staged by mounting its subvolume with
//! ceph-fuse in a directory of the driver's own (`<state>/cephfs/<hash of
//! the volume ID>/mnt`) and binding that onto the staging path through a
//! descriptor resolved beneath the kubelet directory. The core's publishes
//! are binds of the stage; every mount of the volume shares the fuse
//! mount's device number, which is how they are found again.
//!
//! ceph-fuse runs in a session of its own, so it and the pods' mounts
//! outlive a restart of the driver; the restarted driver finds them from
//! its records and the kernel's mount table. The page cache is off
//! (`--fuse_disable_pagecache=true`): with it on, a reader on another node
//! stays stale for as long as its cache holds the pages.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferrovol_cephclient::connect::Connections;
use ferrovol_cephclient::helper;
use ferrovol_core::engine::{
    self, Condition, Features, MountEntry, NodeEngine, Stage, Topology, VolumeView,
};
use ferrovol_host::node::beneath::{self, Beneath};
use ferrovol_host::node::{fs as nodefs, mountinfo};
use ferrovol_host::offload::{self, NODE_WORK, QUICK};

use crate::error::{self, Error, Result};
use crate::ids;
use crate::params::Mounter;

const HELPER: &str = "ceph-fuse";

/// How long a look at a mounted volume may take before it counts as hung
/// (an MDS that does not answer).
const LOOK_DEADLINE: Duration = Duration::from_secs(10);

pub struct CephFsNode {
    state: PathBuf,
    /// The node's own client (flags), used when a request carries no
    /// secret; ceph-fuse gets it (or the request's) through
    /// [`Connections::helper_auth`].
    conn: Connections,
}

/// Where a staged volume's helper, mount and record live.
struct Place {
    dir: PathBuf,
    mnt: PathBuf,
}

/// What ceph-fuse is started with, from the volume context. The context
/// reaches the node from the PV, which anyone who may edit PVs can change:
/// everything in it is checked again here, not trusted because the
/// controller wrote it.
struct Mountable {
    /// What ceph-fuse mounts: the subvolume's path inside the file system
    /// (for a snapshot's data, the directory that holds the snapshots).
    root: String,
    /// A snapshot's data under `root` (`.snap/<snapshot>/...`): what is
    /// bound onto the staging path, always read-only. None: `root` itself.
    snapshot: Option<PathBuf>,
    fuse_options: Option<String>,
}

impl Mountable {
    /// `fs`: the file system the volume ID names.
    fn from_context(ctx: &engine::Context, fs: &str) -> Result<Mountable> {
        let root = ctx.get("rootPath").map(String::as_str).unwrap_or_default();
        // An absolute path of plain names: no `.` or `..`, nothing a
        // helper could read as an option.
        let plain = |c: &str| {
            !c.is_empty()
                && c != "."
                && c != ".."
                && c.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        };
        let ok =
            root.len() <= 1024 && root.strip_prefix('/').is_some_and(|r| r.split('/').all(plain));
        if !ok {
            return Err(error::invalid(format!(
                "the volume context's rootPath {:?} is not the absolute path of a subvolume \
                 (plain names of [A-Za-z0-9._-], no . or ..)",
                error::bounded(root)
            )));
        }
        if ctx.get("fsName").is_some_and(|f| f != fs) {
            return Err(error::invalid("the volume context's fsName is not the volume's"));
        }
        if let Some(m) = ctx.get("mounter").filter(|m| !m.is_empty()) {
            match Mounter::parse(m) {
                Some(Mounter::Fuse) => {}
                Some(Mounter::Kernel) => {
                    return Err(error::precondition(
                        "this class asks for the kernel CephFS client (mounter: kernel), which \
                         ferrovol does not drive yet: use mounter: fuse",
                    ))
                }
                None => return Err(error::invalid("the volume context's mounter is unknown")),
            }
        }
        let fuse_options = match ctx.get("fuseMountOptions").filter(|o| !o.is_empty()) {
            Some(o) => Some(crate::params::mount_options("fuseMountOptions", o)?),
            None => None,
        };
        // ceph-fuse cannot mount a path inside `.snap`: it mounts the
        // directory with the snapshots, and the snapshot's part is bound.
        let names: Vec<&str> = root[1..].split('/').collect();
        let (root, snapshot) = match names.iter().position(|c| *c == ".snap") {
            None => (root.to_string(), None),
            Some(at) if at > 0 && names.len() > at + 1 && !names[at + 1..].contains(&".snap") => {
                (format!("/{}", names[..at].join("/")), Some(names[at..].iter().collect()))
            }
            Some(_) => {
                return Err(error::invalid(format!(
                    "the volume context's rootPath {:?} names no snapshot's data (one .snap, \
                     below the subvolume, followed by the snapshot's name)",
                    error::bounded(root)
                )))
            }
        };
        Ok(Mountable { root, snapshot, fuse_options })
    }
}

/// What a stage left for the next look: the volume and where it is staged.
const RECORD: &str = "volume";

impl CephFsNode {
    pub fn new(state: &Path, conn: Connections) -> CephFsNode {
        CephFsNode { state: state.join("cephfs"), conn }
    }

    fn place(&self, volume_id: &str) -> Place {
        let dir = self.state.join(ids::hash(volume_id));
        Place { mnt: dir.join("mnt"), dir }
    }
}

fn io(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::io(what, e)
}

/// The recorded (volume ID, staging path) of a place.
fn read_record(dir: &Path) -> Option<(String, PathBuf)> {
    let text = std::fs::read_to_string(dir.join(RECORD)).ok()?;
    let (id, staging) = text.split_once('\n')?;
    Some((id.to_string(), PathBuf::from(staging.trim_end_matches('\n'))))
}

/// Every mount of the volume whose helper mount is `mnt`: its stage (at
/// `staging`) first, then the rest (the publishes); empty when the helper
/// does not serve it.
fn mounts(mnt: &Path, staging: &Path) -> Result<Vec<MountEntry>> {
    let all = mountinfo::read().map_err(io("reading the mount table"))?;
    Ok(mounts_in(&all, mnt, staging))
}

/// [`mounts`] in a table already read.
fn mounts_in(all: &[MountEntry], mnt: &Path, staging: &Path) -> Vec<MountEntry> {
    let Some(own) = mountinfo::at(all, mnt).filter(|m| m.fs_type.starts_with("fuse")) else {
        return vec![];
    };
    let dev = (own.major, own.minor);
    let mut of_volume: Vec<MountEntry> =
        all.iter().filter(|m| (m.major, m.minor) == dev && m.mount_point != mnt).cloned().collect();
    of_volume.sort_by_key(|m| m.mount_point != staging);
    if of_volume.first().is_some_and(|m| m.mount_point != staging) {
        // The helper serves it, but no stage stands: nothing to show.
        return vec![];
    }
    of_volume
}

#[tonic::async_trait]
impl NodeEngine for CephFsNode {
    fn kind(&self) -> &'static str {
        "cephfs"
    }

    fn features(&self) -> Features {
        crate::features()
    }

    fn topology(&self) -> Topology {
        Topology::new()
    }

    async fn health(&self) -> Result<()> {
        match () {
            _ if !Path::new("/dev/fuse").exists() => {
                Err(error::precondition("the kernel has no fuse (/dev/fuse) for ceph-fuse"))
            }
            _ if !helper::installed(HELPER) => {
                Err(error::precondition("ceph-fuse is not installed (package ceph-fuse)"))
            }
            _ => Ok(()),
        }
    }

    async fn check_known(&self, volume_id: &str) -> Result<()> {
        match ids::fs_of_volume(volume_id) {
            Some(_) => Ok(()),
            None => Err(error::not_found(format!(
                "volume {} does not exist",
                error::bounded(volume_id)
            ))),
        }
    }

    async fn stage(&self, request: &Stage) -> Result<()> {
        let id = request.volume.volume_id.clone();
        let fs = ids::fs_of_volume(&id).ok_or_else(|| {
            error::not_found(format!("volume {} does not exist", error::bounded(&id)))
        })?;
        let mountable = Mountable::from_context(&request.volume.volume_context, &fs)?;
        let place = self.place(&id);
        let staging = request.staging.clone();
        let (dir, mnt, s) = (place.dir.clone(), place.mnt.clone(), staging.clone());
        let staged = offload::run("looking at the stage", QUICK, move || {
            let all = mountinfo::read().map_err(io("reading the mount table"))?;
            if mounts_in(&all, &mnt, &s).first().is_some_and(|m| m.mount_point == s) {
                return Ok(true);
            }
            if let Some(m) = mountinfo::at(&all, &s) {
                return Err(error::exists(format!(
                    "staging path {} already holds another mount ({})",
                    s.display(),
                    m.source
                )));
            }
            std::fs::create_dir_all(&mnt).map_err(io(format!("creating {}", mnt.display())))?;
            std::fs::write(dir.join(RECORD), format!("{id}\n{}\n", s.display()))
                .map_err(io("recording the stage"))?;
            Ok(false)
        })
        .await?;
        if staged {
            return Ok(());
        }
        let result = self.mount_and_bind(request, &fs, &mountable, &place).await;
        if result.is_err() {
            // A failed first stage leaves nothing behind.
            let _ = self.release(&request.volume.volume_id).await;
        }
        result
    }

    async fn release(&self, volume_id: &str) -> Result<()> {
        let place = self.place(volume_id);
        helper::stop_serving(&place.dir, HELPER, &place.mnt).await?;
        let dir = place.dir;
        offload::run(
            "removing the stage's directory",
            QUICK,
            move || match std::fs::remove_dir_all(&dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(Error::io(format!("removing {}", dir.display()), e))
                }
                _ => Ok(()),
            },
        )
        .await
    }

    async fn view(&self, volume_id: &str) -> Result<VolumeView> {
        let place = self.place(volume_id);
        let mounts =
            offload::run("reading the mount table", QUICK, move || match read_record(&place.dir) {
                Some((_, staging)) => mounts(&place.mnt, &staging),
                None => Ok(vec![]),
            })
            .await?;
        Ok(VolumeView { device: None, mounts })
    }

    /// Healthy while ceph-fuse runs and the mount answers a statfs within
    /// the deadline (a hung MDS, a helper gone: abnormal, never a stall).
    async fn condition(&self, volume_id: &str, staged: &MountEntry) -> Result<Condition> {
        let place = self.place(volume_id);
        let at = staged.mount_point.clone();
        let look = offload::run("looking at the mount", LOOK_DEADLINE, move || {
            if helper::helper_alive(&place.dir, HELPER, &place.mnt) == Some(false) {
                return Ok(Condition::Abnormal(
                    "ceph-fuse, which served this volume, has exited: unstage and stage it \
                     again"
                        .into(),
                ));
            }
            Ok(match rustix::fs::statvfs(&at) {
                Ok(_) => Condition::Healthy,
                Err(e) => Condition::Abnormal(format!("the mount does not answer: {e}")),
            })
        })
        .await;
        Ok(look.unwrap_or_else(|e| Condition::Abnormal(e.message().to_string())))
    }

    async fn staged(&self) -> Result<Vec<Vec<MountEntry>>> {
        let state = self.state.clone();
        offload::run("reading the mount table", QUICK, move || {
            let entries = match std::fs::read_dir(&state) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
                other => other.map_err(io(format!("reading {}", state.display())))?,
            };
            let all = mountinfo::read().map_err(io("reading the mount table"))?;
            let mut by_volume = BTreeMap::new();
            for e in entries.flatten() {
                let dir = e.path();
                if let Some((id, staging)) = read_record(&dir) {
                    let found = mounts_in(&all, &dir.join("mnt"), &staging);
                    if !found.is_empty() {
                        by_volume.insert(id, found);
                    }
                }
            }
            Ok(by_volume.into_values().collect())
        })
        .await
    }
}

impl CephFsNode {
    /// Starts ceph-fuse on the subvolume in the volume's own directory,
    /// then binds its mount onto the staging path.
    async fn mount_and_bind(
        &self,
        request: &Stage,
        fs: &str,
        mountable: &Mountable,
        place: &Place,
    ) -> Result<()> {
        let root = mountable.root.as_str();
        let auth = self.conn.helper_auth(&request.volume.secrets)?;
        let (dir, a) = (place.dir.clone(), auth.clone());
        let keyfile =
            offload::run("writing the key file", QUICK, move || helper::write_keyfile(&dir, &a))
                .await?;
        let mut args = auth.args(keyfile.as_deref());
        args.extend(["-f".into(), "--client_fs".into(), fs.into()]);
        args.extend(["-r".into(), root.into(), "--fuse_disable_pagecache=true".into()]);
        if let Some(o) = &mountable.fuse_options {
            args.extend(["-o".into(), o.into()]);
        }
        args.push(OsString::from(&place.mnt));
        let start =
            helper::Start { program: HELPER, args, dir: &place.dir, what: format!("{fs}{root}") };
        let m = place.mnt.clone();
        helper::start(start, &place.mnt, move || helper::fuse_mounted(&m)).await?;
        let (kubelet, staging, mnt) =
            (request.kubelet_dir.clone(), request.staging.clone(), place.mnt.clone());
        let mut flags = request.mount_flags.clone();
        flags.extend(["nodev".to_string(), "nosuid".to_string()]);
        // A snapshot is read-only whatever the request says.
        let read_only = request.volume.read_only || mountable.snapshot.is_some();
        let snapshot = mountable.snapshot.clone();
        offload::run("binding the stage", NODE_WORK, move || {
            let onto = Beneath::open(&kubelet)?.dir(&staging)?;
            match snapshot {
                None => {
                    let source = beneath::open_source(&mnt)?;
                    nodefs::bind(&source, &mnt, &onto, &flags, read_only)
                }
                // Resolved beneath the helper's mount, no symlink followed.
                Some(within) => {
                    let at = mnt.join(&within);
                    let source = Beneath::open(&mnt)?.existing(&at)?.ok_or_else(|| {
                        error::not_found(format!(
                            "the snapshot's data ({}) is not in the file system: was the \
                             snapshot deleted?",
                            within.display()
                        ))
                    })?;
                    nodefs::bind(&source.fd, &at, &onto, &flags, read_only)
                }
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn context(pairs: &[(&str, &str)]) -> engine::Context {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn a_hostile_volume_context_never_reaches_ceph_fuse() {
        let v = "myfs";
        let root = "/volumes/csi/csi-vol-1/0a1b2c3d-0000-4000-8000-000000000000";
        let good = Mountable::from_context(
            &context(&[("rootPath", root), ("fsName", "myfs"), ("fuseMountOptions", "debug")]),
            v,
        )
        .unwrap();
        assert_eq!((good.root.as_str(), good.fuse_options.as_deref()), (root, Some("debug")));
        assert_eq!(good.snapshot, None);
        let snap = "/volumes/csi/csi-vol-1/.snap/csi-snap-2/0a1b";
        let view = Mountable::from_context(&context(&[("rootPath", snap)]), v).unwrap();
        assert_eq!(view.root, "/volumes/csi/csi-vol-1");
        assert_eq!(view.snapshot.as_deref(), Some(Path::new(".snap/csi-snap-2/0a1b")));
        let long = format!("/{}", "a/".repeat(600));
        for (pairs, code) in [
            (vec![], Code::InvalidArgument),
            (vec![("rootPath", "volumes/csi/x")], Code::InvalidArgument),
            (vec![("rootPath", "/volumes/../../etc")], Code::InvalidArgument),
            (vec![("rootPath", "/volumes/./x")], Code::InvalidArgument),
            (vec![("rootPath", "/.snap/x")], Code::InvalidArgument),
            (vec![("rootPath", "/volumes/x/.snap")], Code::InvalidArgument),
            (vec![("rootPath", "/volumes/x/.snap/a/.snap/b")], Code::InvalidArgument),
            (vec![("rootPath", "/volumes//x")], Code::InvalidArgument),
            (vec![("rootPath", "/volumes/x --id admin")], Code::InvalidArgument),
            (vec![("rootPath", "/volumes/x\0y")], Code::InvalidArgument),
            (vec![("rootPath", long.as_str())], Code::InvalidArgument),
            (vec![("rootPath", root), ("fsName", "otherfs")], Code::InvalidArgument),
            (vec![("rootPath", root), ("mounter", "nfs")], Code::InvalidArgument),
            (vec![("rootPath", root), ("mounter", "kernel")], Code::FailedPrecondition),
            (vec![("rootPath", root), ("fuseMountOptions", "a b")], Code::InvalidArgument),
            (
                vec![("rootPath", root), ("fuseMountOptions", "x,/etc/passwd")],
                Code::InvalidArgument,
            ),
        ] {
            let e = Mountable::from_context(&context(&pairs), v).err();
            assert_eq!(e.map(|e| e.code()), Some(code), "{pairs:?}");
        }
    }
}
