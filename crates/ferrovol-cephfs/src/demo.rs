//! `ferrovol demo --engine cephfs`: the user's walkthrough on a Ceph file
//! system (e.g. `scripts/ceph-dev-cluster start DIR --cephfs`), narrated: a
//! claim, a snapshot, a restore, a clone, an expansion, a group snapshot,
//! and one claim mounted read-write by pods on two nodes. Two drivers run
//! from this binary in scratch directories (node-a with the controller,
//! node-b a node only) and are driven over CSI as the sidecars and two
//! kubelets would; the volumes live in a subvolume group of the demo's own,
//! removed at the end.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferrovol_ceph::{self as ceph, Cluster, Subvolumes};
use ferrovol_csi as csi;
use ferrovol_csi::controller_client::ControllerClient;
use ferrovol_csi::group_controller_client::GroupControllerClient;
use ferrovol_csi::node_client::NodeClient;
use ferrovol_tools::bench::{node_paths, off, start_engine};
use tonic::transport::Channel;

const GIB: i64 = 1 << 30;

/// How long a restore or clone may take before the demo gives up (the
/// provisioner would keep retrying).
const COPY_BOUND: Duration = Duration::from_secs(600);

/// How long a node may take to see another client's write or a new quota
/// (the MDS tells ceph-fuse, not instantly).
const SEEN_BOUND: Duration = Duration::from_secs(15);

fn say(s: &str) {
    println!("{s}");
}

fn text(e: impl std::fmt::Display) -> String {
    e.to_string()
}

struct Node {
    name: &'static str,
    n: NodeClient<Channel>,
    work: PathBuf,
}

struct Walk {
    c: ControllerClient<Channel>,
    g: GroupControllerClient<Channel>,
    nodes: Vec<Node>,
    fs: String,
    group: String,
    step: usize,
    /// (node, volume, staging, target) of every mount, for clean-up.
    mounted: Vec<(usize, String, PathBuf, PathBuf)>,
    volumes: Vec<String>,
    snapshots: Vec<String>,
    groups: Vec<String>,
}

fn cap() -> csi::VolumeCapability {
    use csi::volume_capability::access_mode::Mode;
    use csi::volume_capability::{AccessMode, AccessType, MountVolume};
    csi::VolumeCapability {
        access_mode: Some(AccessMode { mode: Mode::MultiNodeMultiWriter as i32 }),
        access_type: Some(AccessType::Mount(MountVolume::default())),
    }
}

fn size_of(path: &Path) -> u64 {
    rustix::fs::statvfs(path).map(|s| s.f_blocks * s.f_frsize).unwrap_or(0)
}

/// Polls `check` until it holds or `bound` passes: whether it held.
async fn within(bound: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + bound;
    loop {
        if check() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Walk {
    fn step(&mut self, what: &str) {
        self.step += 1;
        say(&format!("\n{}. {what}", self.step));
    }

    fn params(&self) -> HashMap<String, String> {
        [("fsName", self.fs.as_str()), ("subvolumeGroup", &self.group), ("mounter", "fuse")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// CreateVolume as the provisioner makes it: retried while the copy
    /// behind a restore or clone runs (ABORTED, with its progress).
    async fn create(
        &mut self,
        name: &str,
        source: Option<csi::volume_content_source::Type>,
    ) -> Result<csi::Volume, String> {
        let request = csi::CreateVolumeRequest {
            name: name.into(),
            parameters: self.params(),
            capacity_range: Some(csi::CapacityRange { required_bytes: GIB, limit_bytes: 0 }),
            volume_capabilities: vec![cap()],
            volume_content_source: source.map(|t| csi::VolumeContentSource { r#type: Some(t) }),
            ..Default::default()
        };
        let started = Instant::now();
        let mut said = Instant::now() - Duration::from_secs(10);
        let v = loop {
            match self.c.create_volume(request.clone()).await {
                Ok(v) => break v.into_inner().volume.ok_or("no volume")?,
                Err(e) if e.code() == tonic::Code::Aborted && started.elapsed() < COPY_BOUND => {
                    if said.elapsed() > Duration::from_secs(2) {
                        say(&format!("    ABORTED (the provisioner retries): {}", e.message()));
                        said = Instant::now();
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(format!("CreateVolume {name}: {e}")),
            }
        };
        self.volumes.push(v.volume_id.clone());
        say(&format!(
            "    {} ({} MiB quota) in {:.1} s",
            v.volume_id,
            v.capacity_bytes >> 20,
            started.elapsed().as_secs_f64()
        ));
        Ok(v)
    }

    /// Stages and publishes `v` on node `node` as its kubelet would:
    /// answers where the pod sees it.
    async fn mount(&mut self, node: usize, v: &csi::Volume, pod: &str) -> Result<PathBuf, String> {
        let (staging, target) = node_paths(&self.nodes[node].work, pod)?;
        let n = &mut self.nodes[node].n;
        n.node_stage_volume(csi::NodeStageVolumeRequest {
            volume_id: v.volume_id.clone(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(cap()),
            volume_context: v.volume_context.clone(),
            ..Default::default()
        })
        .await
        .map_err(text)?;
        self.mounted.push((node, v.volume_id.clone(), staging.clone(), target.clone()));
        n.node_publish_volume(csi::NodePublishVolumeRequest {
            volume_id: v.volume_id.clone(),
            staging_target_path: staging.display().to_string(),
            target_path: target.display().to_string(),
            volume_capability: Some(cap()),
            volume_context: v.volume_context.clone(),
            ..Default::default()
        })
        .await
        .map_err(text)?;
        say(&format!("    mounted on {} at {}", self.nodes[node].name, target.display()));
        Ok(target)
    }

    async fn snapshot(&mut self, name: &str, volume: &str) -> Result<String, String> {
        let t = Instant::now();
        let s = self
            .c
            .create_snapshot(csi::CreateSnapshotRequest {
                name: name.into(),
                source_volume_id: volume.into(),
                ..Default::default()
            })
            .await
            .map_err(text)?
            .into_inner()
            .snapshot
            .ok_or("no snapshot")?;
        self.snapshots.push(s.snapshot_id.clone());
        say(&format!(
            "    {} (a subvolume snapshot) in {:.1} ms",
            s.snapshot_id,
            t.elapsed().as_secs_f64() * 1000.0
        ));
        Ok(s.snapshot_id)
    }

    /// Unmounts, then deletes every group, snapshot and volume, newest
    /// first; the first error is answered after everything was tried.
    async fn cleanup(&mut self) -> Result<(), String> {
        let mut first = None;
        let mut keep = |r: Result<(), String>| {
            if let Err(e) = r {
                first.get_or_insert(e);
            }
        };
        for (node, id, staging, target) in std::mem::take(&mut self.mounted).into_iter().rev() {
            let n = &mut self.nodes[node].n;
            keep(ferrovol_tools::bench::unpublish_unstage(n, &id, &staging, &target).await);
        }
        for id in std::mem::take(&mut self.groups) {
            let r = self
                .g
                .delete_volume_group_snapshot(csi::DeleteVolumeGroupSnapshotRequest {
                    group_snapshot_id: id,
                    ..Default::default()
                })
                .await;
            keep(r.map(drop).map_err(text));
        }
        for id in std::mem::take(&mut self.snapshots).into_iter().rev() {
            let r = self
                .c
                .delete_snapshot(csi::DeleteSnapshotRequest {
                    snapshot_id: id,
                    ..Default::default()
                })
                .await;
            keep(r.map(drop).map_err(text));
        }
        for id in std::mem::take(&mut self.volumes).into_iter().rev() {
            let r = self
                .c
                .delete_volume(csi::DeleteVolumeRequest { volume_id: id, ..Default::default() })
                .await;
            keep(r.map(drop).map_err(text));
        }
        first.map_or(Ok(()), Err)
    }
}

pub async fn run(conf: &Path, fs: &str) -> Result<(), String> {
    say(&format!("Starting ferrovol (CephFS engine) on file system {fs} via {}:", conf.display()));
    let engine = |mode: &str| -> Vec<String> {
        ["--engine", "cephfs", "--mode", mode, "--cephfs-filesystems", fs, "--ceph-conf"]
            .iter()
            .map(|s| s.to_string())
            .chain([conf.display().to_string()])
            .collect()
    };
    let (a, channel_a, _) = start_engine("demo-cephfs-node-a", engine("all")).await?;
    let (b, channel_b, _) = start_engine("demo-cephfs-node-b", engine("node")).await?;
    say("    node-a: controller and node; node-b: node (each its own driver process)");
    let group = format!("ferrovol-demo-{}", std::process::id());
    let mut walk = Walk {
        c: ControllerClient::new(channel_a.clone()),
        g: GroupControllerClient::new(channel_a.clone()),
        nodes: vec![
            Node { name: "node-a", n: NodeClient::new(channel_a), work: a.work.clone() },
            Node { name: "node-b", n: NodeClient::new(channel_b), work: b.work.clone() },
        ],
        fs: fs.to_string(),
        group: group.clone(),
        step: 0,
        mounted: vec![],
        volumes: vec![],
        snapshots: vec![],
        groups: vec![],
    };
    let outcome = walkthrough(&mut walk).await;
    walk.step("Cleaning up: unpublish, unstage, delete every group, snapshot and volume");
    let cleaned = walk.cleanup().await;
    let removed = remove_group(conf, fs, &group).await;
    drop((a, b));
    outcome?;
    cleaned?;
    removed?;
    say("    everything cleaned up.\n\nDemo complete.");
    Ok(())
}

/// Removes the demo's subvolume group (empty by now; Ceph purges deleted
/// subvolumes in the background, so it may take a few tries).
async fn remove_group(conf: &Path, fs: &str, group: &str) -> Result<(), String> {
    let (conf, fs, group) = (conf.to_path_buf(), fs.to_string(), group.to_string());
    off(move || {
        let how = ceph::Connect { conf: Some(&conf), op_timeout: 30, ..Default::default() };
        let sv = Subvolumes::new(Cluster::connect(&how).map_err(text)?, &fs);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match sv.remove_group(&group) {
                Ok(()) => return Ok(()),
                Err(e) if e.is(libc::ENOENT) => return Ok(()),
                Err(e) if Instant::now() < deadline && e.is(libc::ENOTEMPTY) => {
                    std::thread::sleep(Duration::from_millis(500))
                }
                Err(e) => return Err(format!("removing subvolume group {group}: {e}")),
            }
        }
    })
    .await?
}

async fn walkthrough(d: &mut Walk) -> Result<(), String> {
    use csi::volume_content_source::{SnapshotSource, Type, VolumeSource};
    d.step("Create mysql-pvc (1 GiB, ReadWriteMany): a CephFS subvolume with a 1 GiB quota");
    let mysql = d.create("mysql-pvc", None).await?;

    d.step("Stage and publish it on node-a, where the database pod runs");
    let data = d.mount(0, &mysql, "mysql-pvc").await?;

    d.step("Write a database-like file into it");
    let pages: Vec<u8> =
        (0..8u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 24) as u8).collect();
    std::fs::write(data.join("ibdata1"), &pages).map_err(text)?;
    std::fs::File::open(data.join("ibdata1")).and_then(|f| f.sync_all()).map_err(text)?;
    say("    wrote ibdata1 (8 MiB)");

    d.step("Snapshot it: mysql-snapshot-demo");
    let snap = d.snapshot("mysql-snapshot-demo", &mysql.volume_id).await?;

    d.step("Restore the snapshot into mysql-restore-pvc (ferrovol copies it) and compare");
    let source = Type::Snapshot(SnapshotSource { snapshot_id: snap.clone() });
    let restored = d.create("mysql-restore-pvc", Some(source)).await?;
    let at = d.mount(0, &restored, "mysql-restore-pvc").await?;
    let same = std::fs::read(at.join("ibdata1")).map_err(text)? == pages;
    say(&format!("    restored ibdata1 holds the same bytes: {same}"));
    if !same {
        return Err("the restored volume differs".into());
    }

    d.step("Clone mysql-pvc into mysql-clone-pvc and compare");
    let source = Type::Volume(VolumeSource { volume_id: mysql.volume_id.clone() });
    let clone = d.create("mysql-clone-pvc", Some(source)).await?;
    let clone_at = d.mount(0, &clone, "mysql-clone-pvc").await?;
    let same = std::fs::read(clone_at.join("ibdata1")).map_err(text)? == pages;
    say(&format!("    cloned ibdata1 holds the same bytes: {same}"));
    if !same {
        return Err("the clone differs".into());
    }

    d.step("Grow mysql-clone-pvc from 1 GiB to 2 GiB while a pod has it mounted");
    let before = size_of(&clone_at);
    let grown =
        d.c.controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: clone.volume_id.clone(),
            capacity_range: Some(csi::CapacityRange { required_bytes: 2 * GIB, limit_bytes: 0 }),
            volume_capability: Some(cap()),
            ..Default::default()
        })
        .await
        .map_err(text)?
        .into_inner();
    let seen = within(SEEN_BOUND, || size_of(&clone_at) >= 2 * GIB as u64).await;
    say(&format!(
        "    quota now {} MiB (node expansion required: {}); the pod's df went from {} MiB to \
         {} MiB without remounting",
        grown.capacity_bytes >> 20,
        grown.node_expansion_required,
        before >> 20,
        size_of(&clone_at) >> 20
    ));
    if !seen {
        return Err("the pod does not see the new size".into());
    }

    d.step("Snapshot mysql-pvc and mysql-logs-pvc together as one group");
    let logs = d.create("mysql-logs-pvc", None).await?;
    let logs_at = d.mount(0, &logs, "mysql-logs-pvc").await?;
    std::fs::write(logs_at.join("binlog.000001"), b"BEGIN; INSERT ...; COMMIT;\n").map_err(text)?;
    let t = Instant::now();
    let group =
        d.g.create_volume_group_snapshot(csi::CreateVolumeGroupSnapshotRequest {
            name: "mysql-group".into(),
            source_volume_ids: vec![mysql.volume_id.clone(), logs.volume_id.clone()],
            ..Default::default()
        })
        .await
        .map_err(text)?
        .into_inner()
        .group_snapshot
        .ok_or("no group snapshot")?;
    d.groups.push(group.group_snapshot_id.clone());
    say(&format!(
        "    {}: {} members, one instant (one MDS snapshot of their subvolume group), in {:.1} ms",
        group.group_snapshot_id,
        group.snapshots.len(),
        t.elapsed().as_secs_f64() * 1000.0
    ));

    d.step("Mount mysql-pvc on node-b too (ReadWriteMany): node-b writes, node-a reads");
    let other = d.mount(1, &mysql, "mysql-pvc-on-node-b").await?;
    let note = b"written on node-b\n";
    std::fs::write(other.join("from-node-b"), note).map_err(text)?;
    let path = data.join("from-node-b");
    let seen = within(SEEN_BOUND, || std::fs::read(&path).ok().as_deref() == Some(note)).await;
    say(&format!("    node-a reads node-b's write: {seen}"));
    if !seen {
        return Err("node-a does not see node-b's write".into());
    }
    Ok(())
}
