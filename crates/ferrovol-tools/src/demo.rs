//! `ferrovol demo`: the user's walkthrough, end to end, narrated. It starts
//! a driver on a temporary pool (or uses `--endpoint`) and drives it over
//! CSI exactly as the sidecars and the kubelet would.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use ferrovol_csi as csi;
use ferrovol_csi::controller_client::ControllerClient;
use ferrovol_csi::node_client::NodeClient;
use tonic::transport::Channel;

use crate::endpoint::{self, Endpoint};
use crate::scratch::{Options, Scratch};
use crate::{has_capability, CAP_SYS_ADMIN, CAP_SYS_RESOURCE};

#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Which engine walks through: `local` (a temporary XFS pool) or
    /// `cephfs` (a Ceph file system, --ceph-conf and --cephfs-fs; e.g.
    /// scripts/ceph-dev-cluster start DIR --cephfs).
    #[arg(long, value_enum, default_value_t = DemoEngine::Local)]
    pub engine: DemoEngine,
    /// The CephFS engine's cluster.
    #[arg(long)]
    pub ceph_conf: Option<PathBuf>,
    /// The CephFS engine's file system.
    #[arg(long, default_value = "cephfs")]
    pub cephfs_fs: String,
    /// Use this driver instead of starting one (its kubelet dir must be
    /// --kubelet-dir).
    #[arg(long)]
    pub endpoint: Option<String>,
    /// The driver's kubelet dir, when --endpoint is given.
    #[arg(long, default_value = "/var/lib/kubelet")]
    pub kubelet_dir: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DemoEngine {
    Local,
    Cephfs,
}

const GIB: i64 = 1 << 30;

struct Demo {
    channel: Channel,
    c: ControllerClient<Channel>,
    n: NodeClient<Channel>,
    kubelet: PathBuf,
    fs: &'static str,
    step: usize,
    /// (volume id, staging, target) of everything staged, for clean-up.
    staged: Vec<(String, PathBuf, Option<PathBuf>)>,
    volumes: Vec<String>,
    snapshots: Vec<String>,
    groups: Vec<String>,
}

fn say(s: &str) {
    println!("{s}");
}

fn err(e: tonic::Status) -> String {
    format!("{:?}: {}", e.code(), e.message())
}

impl Demo {
    fn step(&mut self, what: &str) {
        self.step += 1;
        say(&format!("\n[{}] {what}", self.step));
    }

    fn cap(&self) -> csi::VolumeCapability {
        use csi::volume_capability::{access_mode::Mode, AccessMode, AccessType, MountVolume};
        csi::VolumeCapability {
            access_mode: Some(AccessMode { mode: Mode::SingleNodeWriter as i32 }),
            access_type: Some(AccessType::Mount(MountVolume {
                fs_type: self.fs.into(),
                ..Default::default()
            })),
        }
    }

    async fn create(
        &mut self,
        name: &str,
        source: Option<csi::volume_content_source::Type>,
    ) -> Result<String, String> {
        let req = csi::CreateVolumeRequest {
            name: name.into(),
            capacity_range: Some(csi::CapacityRange { required_bytes: GIB, limit_bytes: 0 }),
            volume_capabilities: vec![self.cap()],
            volume_content_source: source.map(|t| csi::VolumeContentSource { r#type: Some(t) }),
            ..Default::default()
        };
        let t = Instant::now();
        let v =
            self.c.create_volume(req).await.map_err(err)?.into_inner().volume.unwrap_or_default();
        say(&format!(
            "    {name}: {} ({} MiB) in {:.1} ms",
            v.volume_id,
            v.capacity_bytes >> 20,
            ms(t)
        ));
        self.volumes.push(v.volume_id.clone());
        Ok(v.volume_id)
    }

    /// Stages (and optionally publishes) like the kubelet does; answers the
    /// path the pod would see.
    async fn mount(&mut self, id: &str, tag: &str, publish: bool) -> Result<PathBuf, String> {
        let staging =
            self.kubelet.join("plugins/kubernetes.io/csi/pv").join(tag).join("globalmount");
        let target =
            self.kubelet.join("pods/demo/volumes/kubernetes.io~csi").join(tag).join("mount");
        std::fs::create_dir_all(&staging).map_err(|e| e.to_string())?;
        std::fs::create_dir_all(target.parent().unwrap_or(&target)).map_err(|e| e.to_string())?;
        self.n
            .node_stage_volume(csi::NodeStageVolumeRequest {
                volume_id: id.into(),
                staging_target_path: staging.display().to_string(),
                volume_capability: Some(self.cap()),
                ..Default::default()
            })
            .await
            .map_err(err)?;
        if !publish {
            self.staged.push((id.into(), staging.clone(), None));
            return Ok(staging);
        }
        self.n
            .node_publish_volume(csi::NodePublishVolumeRequest {
                volume_id: id.into(),
                staging_target_path: staging.display().to_string(),
                target_path: target.display().to_string(),
                volume_capability: Some(self.cap()),
                ..Default::default()
            })
            .await
            .map_err(err)?;
        self.staged.push((id.into(), staging, Some(target.clone())));
        Ok(target)
    }

    async fn snapshot(&mut self, name: &str, volume: &str) -> Result<String, String> {
        let t = Instant::now();
        let req = csi::CreateSnapshotRequest {
            name: name.into(),
            source_volume_id: volume.into(),
            ..Default::default()
        };
        let s = self
            .c
            .create_snapshot(req)
            .await
            .map_err(err)?
            .into_inner()
            .snapshot
            .unwrap_or_default();
        say(&format!("    {name}: {} ready={} in {:.1} ms", s.snapshot_id, s.ready_to_use, ms(t)));
        self.snapshots.push(s.snapshot_id.clone());
        Ok(s.snapshot_id)
    }

    async fn cleanup(&mut self) -> Result<(), String> {
        for (id, staging, target) in std::mem::take(&mut self.staged).into_iter().rev() {
            if let Some(t) = target {
                let req = csi::NodeUnpublishVolumeRequest {
                    volume_id: id.clone(),
                    target_path: t.display().to_string(),
                };
                self.n.node_unpublish_volume(req).await.map_err(err)?;
            }
            let req = csi::NodeUnstageVolumeRequest {
                volume_id: id,
                staging_target_path: staging.display().to_string(),
            };
            self.n.node_unstage_volume(req).await.map_err(err)?;
        }
        let mut g = csi::group_controller_client::GroupControllerClient::new(self.channel.clone());
        for id in std::mem::take(&mut self.groups) {
            let req = csi::DeleteVolumeGroupSnapshotRequest {
                group_snapshot_id: id,
                ..Default::default()
            };
            g.delete_volume_group_snapshot(req).await.map_err(err)?;
        }
        for id in std::mem::take(&mut self.snapshots) {
            let req = csi::DeleteSnapshotRequest { snapshot_id: id, ..Default::default() };
            self.c.delete_snapshot(req).await.map_err(err)?;
        }
        for id in std::mem::take(&mut self.volumes) {
            let req = csi::DeleteVolumeRequest { volume_id: id, ..Default::default() };
            self.c.delete_volume(req).await.map_err(err)?;
        }
        Ok(())
    }
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

fn fs_size(path: &Path) -> u64 {
    rustix::fs::statvfs(path).map(|s| s.f_blocks * s.f_frsize).unwrap_or(0)
}

pub async fn run(args: DemoArgs) -> Result<(), String> {
    if !has_capability(CAP_SYS_ADMIN) {
        return Err(
            "ferrovol demo needs root (CAP_SYS_ADMIN): its node steps attach loop devices \
                    and mount filesystems. Run it with sudo."
                .into(),
        );
    }
    let mut scratch = None;
    let (endpoint, kubelet) = match &args.endpoint {
        Some(e) => (
            Endpoint::parse(e)?,
            args.kubelet_dir.join(format!("ferrovol-demo-{}", std::process::id())),
        ),
        None => {
            say("Starting ferrovol on a temporary XFS pool (copy-on-write by reflink)…");
            let s = Scratch::start(Options {
                local_pool: true,
                name: "demo",
                pool_dir: None,
                pool_size: 8 << 30,
                rust_log: "warn",
                args: vec![],
            })
            .await?;
            let started = (Endpoint::Unix(s.socket.clone()), s.kubelet_dir());
            scratch = Some(s);
            started
        }
    };
    let channel =
        endpoint::connect(&endpoint).await.map_err(|e| format!("connecting to {endpoint}: {e}"))?;
    let fs = if has_capability(CAP_SYS_RESOURCE) {
        "ext4"
    } else {
        say("(this process may not grow a mounted ext4 — no CAP_SYS_RESOURCE — so the demo uses xfs)");
        "xfs"
    };
    let mut demo = Demo {
        channel: channel.clone(),
        c: ControllerClient::new(channel.clone()),
        n: NodeClient::new(channel.clone()),
        kubelet,
        fs,
        step: 0,
        staged: vec![],
        volumes: vec![],
        snapshots: vec![],
        groups: vec![],
    };
    let outcome = walkthrough(&mut demo, channel).await;
    demo.step("Cleaning up: unpublish, unstage, delete every snapshot and volume");
    let cleaned = demo.cleanup().await;
    drop(scratch);
    outcome?;
    cleaned?;
    say("    everything cleaned up.\n\nDemo complete.");
    Ok(())
}

async fn walkthrough(d: &mut Demo, channel: Channel) -> Result<(), String> {
    use csi::volume_content_source::{SnapshotSource, Type, VolumeSource};
    d.step(&format!("Create mysql-pvc (1 GiB, {})", d.fs));
    let mysql = d.create("mysql-pvc", None).await?;

    d.step("Stage and publish it where a pod would mount it (/var/lib/mysql)");
    let data = d.mount(&mysql, "mysql-pvc", true).await?;
    say(&format!("    mounted at {}", data.display()));

    d.step("Write a database-like file into it");
    let pages: Vec<u8> =
        (0..8u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 24) as u8).collect();
    std::fs::write(data.join("ibdata1"), &pages).map_err(|e| e.to_string())?;
    say("    wrote ibdata1 (8 MiB)");

    d.step(
        "Snapshot it: mysql-snapshot-demo (the filesystem is frozen for the instant of the clone)",
    );
    let snap = d.snapshot("mysql-snapshot-demo", &mysql).await?;

    d.step("Restore the snapshot into mysql-restore-pvc and compare");
    let restored = d
        .create(
            "mysql-restore-pvc",
            Some(Type::Snapshot(SnapshotSource { snapshot_id: snap.clone() })),
        )
        .await?;
    let restored_at = d.mount(&restored, "mysql-restore-pvc", false).await?;
    let same = std::fs::read(restored_at.join("ibdata1")).map_err(|e| e.to_string())? == pages;
    say(&format!("    restored ibdata1 holds the same bytes: {same}"));
    if !same {
        return Err("the restored volume differs".into());
    }

    d.step("Clone mysql-pvc into mysql-clone-pvc and compare");
    let clone = d
        .create("mysql-clone-pvc", Some(Type::Volume(VolumeSource { volume_id: mysql.clone() })))
        .await?;
    let clone_at = d.mount(&clone, "mysql-clone-pvc", true).await?;
    let same = std::fs::read(clone_at.join("ibdata1")).map_err(|e| e.to_string())? == pages;
    say(&format!("    cloned ibdata1 holds the same bytes: {same}"));
    if !same {
        return Err("the clone differs".into());
    }

    d.step("Grow mysql-clone-pvc from 1 GiB to 2 GiB while it is mounted");
    let before = fs_size(&clone_at);
    let r =
        d.n.node_expand_volume(csi::NodeExpandVolumeRequest {
            volume_id: clone.clone(),
            volume_path: clone_at.display().to_string(),
            capacity_range: Some(csi::CapacityRange { required_bytes: 2 * GIB, limit_bytes: 0 }),
            volume_capability: Some(d.cap()),
            ..Default::default()
        })
        .await
        .map_err(err)?
        .into_inner();
    let after = fs_size(&clone_at);
    say(&format!(
        "    volume now {} MiB; filesystem grew from {} MiB to {} MiB without unmounting",
        r.capacity_bytes >> 20,
        before >> 20,
        after >> 20
    ));
    if after <= before {
        return Err("the filesystem did not grow".into());
    }

    d.step("Snapshot two labelled volumes (data + logs) together as one group");
    let logs = d.create("mysql-logs-pvc", None).await?;
    let logs_at = d.mount(&logs, "mysql-logs-pvc", true).await?;
    std::fs::write(logs_at.join("binlog.000001"), b"BEGIN; INSERT ...; COMMIT;\n")
        .map_err(|e| e.to_string())?;
    let mut g = csi::group_controller_client::GroupControllerClient::new(channel.clone());
    let t = Instant::now();
    let group = g
        .create_volume_group_snapshot(csi::CreateVolumeGroupSnapshotRequest {
            name: "mysql-group".into(),
            source_volume_ids: vec![mysql.clone(), logs.clone()],
            ..Default::default()
        })
        .await
        .map_err(err)?
        .into_inner()
        .group_snapshot
        .unwrap_or_default();
    d.groups.push(group.group_snapshot_id.clone());
    say(&format!(
        "    {}: {} members, frozen together, in {:.1} ms",
        group.group_snapshot_id,
        group.snapshots.len(),
        ms(t)
    ));

    d.step("Show the blocks that changed between two snapshots of mysql-pvc");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(data.join("ibdata1"))
        .map_err(|e| e.to_string())?;
    file.write_all_at(&[0xAB; 65536], 1 << 20).map_err(|e| e.to_string())?;
    file.sync_all().map_err(|e| e.to_string())?;
    let later = d.snapshot("mysql-snapshot-later", &mysql).await?;
    let mut m = csi::snapshot_metadata_client::SnapshotMetadataClient::new(channel);
    let mut stream = m
        .get_metadata_delta(csi::GetMetadataDeltaRequest {
            base_snapshot_id: snap,
            target_snapshot_id: later,
            ..Default::default()
        })
        .await
        .map_err(err)?
        .into_inner();
    let (mut ranges, mut total) = (0, 0);
    while let Some(msg) = stream.message().await.map_err(err)? {
        ranges += msg.block_metadata.len();
        total += msg.block_metadata.iter().map(|b| b.size_bytes).sum::<i64>();
    }
    say(&format!("    {ranges} changed range(s), {total} bytes: a backup copies only these"));
    Ok(())
}
