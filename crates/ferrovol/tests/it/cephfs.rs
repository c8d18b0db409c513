//! The CephFS engine against a real CephFS: the file system `ferrovolfs`
//! of the throw-away cluster `.ci/run` starts (`scripts/ceph-dev-cluster
//! --cephfs`, its ceph.conf in `FERROVOL_TEST_CEPH_CONF`). Each test puts
//! its volumes in a subvolume group of its own, which it checks is empty
//! at the end (subvolumes, name claims) and then removes. The node side
//! mounts with ceph-fuse, the only CephFS client this machine's kernel
//! allows. Ceph's own tools check what the driver did.
//!
//! Without `FERROVOL_TEST_CEPH_CONF` the tests say so and pass, unless
//! `FERROVOL_REQUIRE_CEPH` is set (as `.ci/run` sets it).

use crate::common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::req::{self, publish_req, stage_req, unpublish_req, unstage_req, MIB};
use common::{last_seq, Driver, DriverBuilder, Lockstep};
use ferrovol_csi as csi;
use ferrovol_csi::controller_client::ControllerClient;
use ferrovol_csi::group_controller_client::GroupControllerClient;
use ferrovol_csi::node_client::NodeClient;
use ferrovol_csi::volume_capability::access_mode::Mode;
use ferrovol_csi::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use tonic::transport::Channel;
use tonic::Code;

const FS: &str = "ferrovolfs";
const META_POOL: &str = "cephfs.ferrovolfs.meta";
/// The omap objects indexing volumes backed by a snapshot, copies under
/// way and group snapshots.
const INDEXES: [&str; 3] =
    ["ferrovol.cephfs.backed", "ferrovol.cephfs.copies", "ferrovol.cephfs.groups"];

/// A subvolume group of this test's own, and everything the test made on
/// this host; removed (and checked) on drop.
struct CephFs {
    conf: PathBuf,
    group: String,
    root: tempfile::TempDir,
    kubelet: PathBuf,
}

fn cephfs(test: &str) -> Option<CephFs> {
    let (conf, root, kubelet) = common::ceph::scratch(test)?;
    let group = format!("t-{test}-{}", std::process::id());
    Some(CephFs { conf, group, kubelet, root })
}

impl CephFs {
    fn tool(&self, tool: &str, args: &[&str]) -> String {
        common::ceph::tool(&self.conf, tool, args)
    }

    fn driver(&self, name: &str, node: &str, extra: &[&str]) -> DriverBuilder {
        let dir = self.root.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        DriverBuilder::new(&dir)
            .node_id(node)
            .args(["--engine", "cephfs", "--cephfs-filesystems", FS])
            .args(["--ceph-conf".to_string(), self.conf.display().to_string()])
            .args(["--kubelet-dir".to_string(), self.kubelet.display().to_string()])
            .args(extra.iter().copied())
    }

    fn params(&self) -> HashMap<String, String> {
        [("fsName", FS), ("subvolumeGroup", self.group.as_str()), ("mounter", "fuse")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn create(&self, name: &str, size: i64, mode: Mode) -> csi::CreateVolumeRequest {
        csi::CreateVolumeRequest {
            parameters: self.params(),
            volume_capabilities: vec![cap(mode)],
            ..req::create(name, size)
        }
    }

    /// The subvolumes in this test's group, as Ceph lists them.
    fn subvolumes(&self) -> Vec<String> {
        let out = std::process::Command::new("ceph")
            .arg("-c")
            .arg(&self.conf)
            .args(["fs", "subvolume", "ls", FS, "--group_name", &self.group, "--format", "json"])
            .output()
            .unwrap();
        if !out.status.success() {
            return vec![]; // no group: nothing in it
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v.as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap().to_string()).collect()
    }

    /// The quota Ceph holds for a volume's subvolume.
    fn quota(&self, volume_id: &str) -> u64 {
        let sub = volume_id.rsplit(':').next().unwrap();
        let info = self.tool(
            "ceph",
            &["fs", "subvolume", "info", FS, sub, "--group_name", &self.group, "--format", "json"],
        );
        let v: serde_json::Value = serde_json::from_str(&info).unwrap();
        v["bytes_quota"].as_u64().unwrap()
    }

    /// Name claims (volumes' and snapshots') that name a volume in this
    /// test's group, and entries of the index of volumes backed by a
    /// snapshot of one.
    fn claims(&self) -> Vec<String> {
        self.our_objects()
            .into_iter()
            .map(|(o, key, value)| format!("{o} {key}: {value}"))
            .collect()
    }

    /// (object, omap key or "", value) of every record naming this test's
    /// group.
    fn our_objects(&self) -> Vec<(String, String, String)> {
        let objects = self.tool("rados", &["-p", META_POOL, "ls"]);
        let mine = |value: &str| value.contains(&format!(":{}:", self.group));
        let rados = |args: &[&str]| {
            std::process::Command::new("rados")
                .arg("-c")
                .arg(&self.conf)
                .args(["-p", META_POOL])
                .args(args)
                .output()
                .unwrap()
        };
        let mut ours = vec![];
        for index in INDEXES.into_iter().filter(|i| objects.lines().any(|o| o == *i)) {
            let keys = rados(&["listomapkeys", index]);
            let out = self.root.path().join("omap-value");
            for key in String::from_utf8_lossy(&keys.stdout).lines() {
                rados(&["getomapval", index, key, out.to_str().unwrap()]);
                let value = std::fs::read_to_string(&out).unwrap_or_default();
                if mine(&value) || mine(&format!("{key}:")) {
                    ours.push((index.to_string(), key.to_string(), value));
                }
            }
        }
        for o in
            objects.lines().filter(|o| o.starts_with("ferrovol.cephfs.") && !INDEXES.contains(o))
        {
            let value = String::from_utf8_lossy(&rados(&["get", o, "-"]).stdout).into_owned();
            if mine(&value) {
                ours.push((o.to_string(), String::new(), value));
            }
        }
        ours
    }

    fn staging(&self, pv: &str) -> PathBuf {
        common::ceph::staging(&self.kubelet, pv)
    }

    fn target(&self, pod: &str, pv: &str) -> PathBuf {
        common::ceph::target(&self.kubelet, pod, pv)
    }

    fn host_mounts(&self) -> Vec<PathBuf> {
        common::ceph::mounts_under(self.root.path())
    }

    /// ceph-fuse helpers serving this test's state dirs.
    fn helpers(&self) -> Vec<i32> {
        common::ceph::helpers("ceph-fuse", self.root.path())
    }

    /// Nothing left: no subvolume or claim of this test's in Ceph, and no
    /// mount or helper on this host.
    fn assert_clean(&self) {
        assert_eq!(self.subvolumes(), Vec::<String>::new(), "subvolumes left behind");
        assert_eq!(self.claims(), Vec::<String>::new(), "name claims left behind");
        assert!(self.host_mounts().is_empty(), "mounts left: {:?}", self.host_mounts());
        assert!(self.helpers().is_empty(), "ceph-fuse helpers left: {:?}", self.helpers());
    }
}

impl Drop for CephFs {
    /// Undoes by force what the test left: pods' and staging mounts, the
    /// helpers' mounts (their helpers exit), any helper still running, the
    /// group's subvolumes and the group.
    fn drop(&mut self) {
        for m in self.host_mounts() {
            let _ = rustix::mount::unmount(&m, rustix::mount::UnmountFlags::DETACH);
        }
        for pid in self.helpers() {
            if let Some(p) = rustix::process::Pid::from_raw(pid) {
                let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
            }
        }
        let ceph = |args: &[&str]| {
            let _ =
                std::process::Command::new("ceph").arg("-c").arg(&self.conf).args(args).output();
        };
        for s in self.subvolumes() {
            ceph(&["fs", "subvolume", "rm", FS, &s, "--group_name", &self.group, "--force"]);
        }
        ceph(&["fs", "subvolumegroup", "rm", FS, &self.group, "--force"]);
        // Claims a failed test left would make a re-run's names taken.
        for (o, key, _) in self.our_objects() {
            let args = match key.is_empty() {
                true => vec!["-p", META_POOL, "rm", &o],
                false => vec!["-p", META_POOL, "rmomapkey", &o, &key],
            };
            let _ =
                std::process::Command::new("rados").arg("-c").arg(&self.conf).args(args).output();
        }
    }
}

fn cap(mode: Mode) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_mode: Some(AccessMode { mode: mode as i32 }),
        access_type: Some(AccessType::Mount(MountVolume::default())),
    }
}

struct Clients {
    c: ControllerClient<Channel>,
    n: NodeClient<Channel>,
}

async fn clients(d: &Driver) -> Clients {
    let ch = d.channel().await;
    Clients { c: ControllerClient::new(ch.clone()), n: NodeClient::new(ch) }
}

async fn new_volume(k: &mut Clients, fs: &CephFs, name: &str, mode: Mode) -> csi::Volume {
    let r = fs.create(name, 64 * MIB, mode);
    k.c.create_volume(r).await.unwrap().into_inner().volume.unwrap()
}

/// CreateVolume as the provisioner makes it: retried while it answers
/// ABORTED (a copy under way), bounded.
async fn created(c: &mut ControllerClient<Channel>, r: csi::CreateVolumeRequest) -> csi::Volume {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        match c.create_volume(r.clone()).await {
            Ok(v) => return v.into_inner().volume.unwrap(),
            Err(e) if e.code() == Code::Aborted && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("CreateVolume {}: {e:?}", r.name),
        }
    }
}

/// Stages and publishes a volume as the kubelet does; answers (staging,
/// target).
async fn mount(
    n: &mut NodeClient<Channel>,
    fs: &CephFs,
    v: &csi::Volume,
    pod: &str,
    mode: Mode,
) -> (PathBuf, PathBuf) {
    let pv = format!("pv-{}", &v.volume_id[v.volume_id.len() - 8..]);
    let (staging, target) = (fs.staging(&pv), fs.target(pod, &pv));
    let stage = csi::NodeStageVolumeRequest {
        volume_context: v.volume_context.clone(),
        ..stage_req(&v.volume_id, &staging, cap(mode))
    };
    n.node_stage_volume(stage).await.unwrap();
    let publish = csi::NodePublishVolumeRequest {
        volume_context: v.volume_context.clone(),
        ..publish_req(&v.volume_id, &staging, &target, cap(mode), false)
    };
    n.node_publish_volume(publish).await.unwrap();
    (staging, target)
}

async fn unmount(n: &mut NodeClient<Channel>, id: &str, staging: &Path, target: &Path) {
    n.node_unpublish_volume(unpublish_req(id, target)).await.unwrap();
    n.node_unstage_volume(unstage_req(id, staging)).await.unwrap();
}

/// Waits (bounded) until `path` holds `want`: another client's write
/// reaches this one through the MDS, not at once.
fn eventually_reads(path: &Path, want: &[u8], bound: Duration) {
    let deadline = Instant::now() + bound;
    loop {
        if std::fs::read(path).ok().as_deref() == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} does not show the other node's write within {bound:?}: {:?}",
            path.display(),
            std::fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned())
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The engines' one conformance suite, on CephFS (ceph-fuse on the node):
/// the shared-filesystem shape for real.
#[tokio::test]
async fn cephfs_conformance() {
    let Some(fs) = cephfs("conformance") else { return };
    let d = fs.driver("d", "node-a", &[]).start();
    let params = fs.params();
    let subject = common::Conforming {
        name: "cephfs".into(),
        controller: d.channel().await,
        node: Some((d.channel().await, fs.kubelet.clone())),
        create: Box::new(move |name, bytes, cap| csi::CreateVolumeRequest {
            volume_capabilities: vec![cap],
            parameters: params.clone(),
            ..req::create(name, bytes)
        }),
        volume_size: 64 * MIB,
        fs_type: String::new(),
    };
    ferrovol_testkit::conformance::run(&subject).await;
    fs.assert_clean();
    drop(d);
}

/// One volume, two nodes (two node plugins, two ceph-fuse mounts), both
/// writing: each sees the other's files.
#[tokio::test]
async fn cephfs_one_volume_is_written_and_read_on_two_nodes() {
    let Some(fs) = cephfs("rwx") else { return };
    let a = fs.driver("a", "node-a", &[]).start();
    let b = fs.driver("b", "node-b", &["--mode", "node"]).start();
    let mut ka = clients(&a).await;
    let mut nb = NodeClient::new(b.channel().await);
    let v = new_volume(&mut ka, &fs, "pvc-shared", Mode::MultiNodeMultiWriter).await;
    let (sa, ta) = mount(&mut ka.n, &fs, &v, "pod-a", Mode::MultiNodeMultiWriter).await;
    // Node b has its own kubelet paths (another pod, another staging dir).
    let pv_b = "pv-shared-on-b";
    let (sb, tb) = (fs.staging(pv_b), fs.target("pod-b", pv_b));
    let stage = csi::NodeStageVolumeRequest {
        volume_context: v.volume_context.clone(),
        ..stage_req(&v.volume_id, &sb, cap(Mode::MultiNodeMultiWriter))
    };
    nb.node_stage_volume(stage).await.unwrap();
    let publish = csi::NodePublishVolumeRequest {
        volume_context: v.volume_context.clone(),
        ..publish_req(&v.volume_id, &sb, &tb, cap(Mode::MultiNodeMultiWriter), false)
    };
    nb.node_publish_volume(publish).await.unwrap();
    assert_eq!(fs.helpers().len(), 2, "one ceph-fuse per node");

    std::fs::write(ta.join("from-a"), b"written on node a").unwrap();
    std::fs::write(tb.join("from-b"), b"written on node b").unwrap();
    let bound = Duration::from_secs(10);
    eventually_reads(&tb.join("from-a"), b"written on node a", bound);
    eventually_reads(&ta.join("from-b"), b"written on node b", bound);
    // A rewrite is seen too (no stale page cache on the reader).
    std::fs::write(ta.join("from-b"), b"rewritten on node a").unwrap();
    eventually_reads(&tb.join("from-b"), b"rewritten on node a", bound);

    unmount(&mut nb, &v.volume_id, &sb, &tb).await;
    unmount(&mut ka.n, &v.volume_id, &sa, &ta).await;
    ka.c.delete_volume(req::delete(&v.volume_id)).await.unwrap();
    fs.assert_clean();
    drop((a, b));
}

/// The driver dies with a volume mounted: ceph-fuse (its own session) and
/// the pod's mount live on; the restarted driver finds the stage, answers
/// stats, and takes it all down.
#[tokio::test]
async fn cephfs_mounts_survive_a_driver_restart() {
    let Some(fs) = cephfs("restart") else { return };
    let builder = || fs.driver("d", "node-a", &[]);
    let mut d = builder().start();
    let mut k = clients(&d).await;
    let v = new_volume(&mut k, &fs, "pvc-r", Mode::SingleNodeWriter).await;
    let (staging, target) = mount(&mut k.n, &fs, &v, "pod-r", Mode::SingleNodeWriter).await;
    std::fs::write(target.join("data"), b"written before the restart").unwrap();
    let helpers = fs.helpers();
    assert_eq!(helpers.len(), 1);

    d.kill();
    assert_eq!(fs.helpers(), helpers, "ceph-fuse outlived the driver");
    std::fs::write(target.join("more"), b"written while the driver was down").unwrap();

    d = builder().start();
    let mut k = clients(&d).await;
    // The kubelet retries the stage: the same mount, no second helper.
    let stage = csi::NodeStageVolumeRequest {
        volume_context: v.volume_context.clone(),
        ..stage_req(&v.volume_id, &staging, cap(Mode::SingleNodeWriter))
    };
    k.n.node_stage_volume(stage).await.unwrap();
    assert_eq!(fs.helpers(), helpers);
    let stats =
        k.n.node_get_volume_stats(req::stats(&v.volume_id, &target)).await.unwrap().into_inner();
    let bytes = &stats.usage[0];
    assert_eq!(bytes.total, 64 * MIB, "statfs shows the quota: {stats:?}");
    assert_eq!(stats.volume_condition.map(|c| c.abnormal), Some(false));
    unmount(&mut k.n, &v.volume_id, &staging, &target).await;
    assert!(fs.helpers().is_empty(), "unstage stopped ceph-fuse");

    // The data went to Ceph: a fresh mount shows it.
    let (staging, target) = mount(&mut k.n, &fs, &v, "pod-r2", Mode::SingleNodeWriter).await;
    assert_eq!(std::fs::read(target.join("data")).unwrap(), b"written before the restart");
    assert_eq!(std::fs::read(target.join("more")).unwrap(), b"written while the driver was down");
    unmount(&mut k.n, &v.volume_id, &staging, &target).await;
    k.c.delete_volume(req::delete(&v.volume_id)).await.unwrap();
    fs.assert_clean();
    drop(d);
}

/// A restart of the node container, not only of the driver: the runtime
/// kills every process of the container's cgroup (runc writes its
/// `cgroup.kill`), sessions or not. The driver runs as in a container (its
/// cgroup, a cgroup namespace of its own). With `--helper-cgroup`, ceph-fuse
/// was started outside that cgroup and the pod's mount lives on; without it,
/// the same kill takes ceph-fuse, and the pod's mount is dead (`Transport
/// endpoint is not connected`: what ceph-csi's users report). The driver
/// started again finds the live stage, says the dead one is abnormal, and
/// takes both down.
#[tokio::test]
async fn cephfs_mounts_outlive_the_node_container() {
    let Some(fs) = cephfs("container") else { return };
    let cg = common::Cgroups::new("container");
    let outside = ["--helper-cgroup".to_string(), cg.helpers.display().to_string()];
    let outside: Vec<&str> = outside.iter().map(String::as_str).collect();
    let builder = |extra: &[&str]| fs.driver("d", "node-a", extra);

    // A directory that is no cgroup is refused at start-up, by name.
    let plain = fs.root.path().join("not-a-cgroup");
    let plain = ["--helper-cgroup".to_string(), plain.display().to_string()];
    let mut refused = builder(&plain.iter().map(String::as_str).collect::<Vec<_>>()).spawn();
    assert!(!refused.wait().success());
    assert!(refused.logs().contains("is not inside a cgroup v2 file system"), "{}", refused.logs());

    let mut d = cg.containerised(builder(&outside));
    let mut k = clients(&d).await;
    let v1 = new_volume(&mut k, &fs, "pvc-kept", Mode::SingleNodeWriter).await;
    let (staging1, target1) = mount(&mut k.n, &fs, &v1, "pod-1", Mode::SingleNodeWriter).await;
    std::fs::write(target1.join("data"), b"before").unwrap();
    let kept = fs.helpers();
    assert_eq!(kept.len(), 1);
    assert!(common::Cgroups::of(kept[0]).ends_with("/helpers"), "{}", common::Cgroups::of(kept[0]));
    cg.kill_container();
    assert!(!d.wait().success(), "the driver was killed with its container");
    assert_eq!(fs.helpers(), kept, "ceph-fuse outlived the container");
    std::fs::write(target1.join("more"), b"while the container was gone").unwrap();

    // The control: a driver without the flag, its ceph-fuse in the
    // container, killed with it.
    d = cg.containerised(builder(&[]));
    let mut k = clients(&d).await;
    let v2 = new_volume(&mut k, &fs, "pvc-lost", Mode::SingleNodeWriter).await;
    let (staging2, target2) = mount(&mut k.n, &fs, &v2, "pod-2", Mode::SingleNodeWriter).await;
    let lost: Vec<i32> = fs.helpers().into_iter().filter(|p| !kept.contains(p)).collect();
    assert_eq!(lost.len(), 1);
    assert!(
        common::Cgroups::of(lost[0]).ends_with("/container"),
        "{}",
        common::Cgroups::of(lost[0])
    );
    cg.kill_container();
    d.wait();
    assert_eq!(fs.helpers(), kept, "the container's ceph-fuse died with it");
    let dead = std::fs::read_dir(&target2).map(|_| ()).unwrap_err();
    assert_eq!(dead.raw_os_error(), Some(libc::ENOTCONN), "{dead}");
    assert_eq!(std::fs::read(target1.join("data")).unwrap(), b"before");

    // Started again: the kept stage serves, the lost one is abnormal, and
    // both are taken down.
    let d = builder(&outside).start();
    let mut k = clients(&d).await;
    let stats =
        k.n.node_get_volume_stats(req::stats(&v1.volume_id, &target1)).await.unwrap().into_inner();
    assert_eq!(stats.volume_condition.map(|c| c.abnormal), Some(false));
    let stats =
        k.n.node_get_volume_stats(req::stats(&v2.volume_id, &target2)).await.unwrap().into_inner();
    assert_eq!(stats.volume_condition.map(|c| c.abnormal), Some(true), "the dead mount");
    unmount(&mut k.n, &v2.volume_id, &staging2, &target2).await;
    unmount(&mut k.n, &v1.volume_id, &staging1, &target1).await;
    assert!(fs.helpers().is_empty(), "unstage stopped ceph-fuse");
    k.c.delete_volume(req::delete(&v1.volume_id)).await.unwrap();
    k.c.delete_volume(req::delete(&v2.volume_id)).await.unwrap();
    fs.assert_clean();
    drop(d);
}

/// One name is one volume whatever the parameters; ceph-csi's keys we do
/// not support, unknown keys and raw block are refused by name; expansion
/// raises the quota, which a mounted pod sees without a remount.
#[tokio::test]
async fn cephfs_parameters_names_and_quota_growth() {
    let Some(fs) = cephfs("params") else { return };
    let d = fs.driver("d", "node-a", &[]).start();
    let mut k = clients(&d).await;
    let v = new_volume(&mut k, &fs, "pvc-p", Mode::MultiNodeMultiWriter).await;
    assert_eq!(fs.quota(&v.volume_id), 64 * MIB as u64);
    assert!(v.volume_context.get("rootPath").is_some_and(|p| p.starts_with("/volumes/")));
    // The same request again: the same volume.
    let again = k.c.create_volume(fs.create("pvc-p", 64 * MIB, Mode::MultiNodeMultiWriter)).await;
    assert_eq!(again.unwrap().into_inner().volume.unwrap().volume_id, v.volume_id);
    // The same name with another group, file system, prefix or pool.
    for (key, value) in [
        ("subvolumeGroup", "elsewhere"),
        ("fsName", "otherfs"),
        ("volumeNamePrefix", "other-"),
        ("pool", "cephfs.ferrovolfs.data"),
    ] {
        let mut r = fs.create("pvc-p", 64 * MIB, Mode::MultiNodeMultiWriter);
        r.parameters.insert(key.into(), value.into());
        let e = k.c.create_volume(r).await.unwrap_err();
        assert_eq!(e.code(), Code::AlreadyExists, "{key}: {e:?}");
    }
    // A larger size than the volume has.
    let e = k.c.create_volume(fs.create("pvc-p", 128 * MIB, Mode::MultiNodeMultiWriter)).await;
    assert_eq!(e.unwrap_err().code(), Code::AlreadyExists);
    for (key, value, needle) in [
        ("encrypted", "true", "encrypted"),
        ("imageFeatures", "layering", "imageFeatures"),
        ("mounter", "nfs", "mounter"),
    ] {
        let mut r = fs.create("pvc-bad", 64 * MIB, Mode::SingleNodeWriter);
        r.parameters.insert(key.into(), value.into());
        let e = k.c.create_volume(r).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{key}: {e:?}");
        assert!(e.message().contains(needle), "{key}: {e:?}");
    }
    let mut r = fs.create("pvc-block", 64 * MIB, Mode::SingleNodeWriter);
    r.volume_capabilities[0].access_type = Some(AccessType::Block(BlockVolume {}));
    let e = k.c.create_volume(r).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let mut r = fs.create("pvc-nofs", 64 * MIB, Mode::SingleNodeWriter);
    r.parameters.remove("fsName");
    let e = k.c.create_volume(r).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(fs.subvolumes().iter().all(|s| v.volume_id.ends_with(s.as_str())), "nothing else made");

    // Capacity is the data pool's.
    let cap =
        k.c.get_capacity(csi::GetCapacityRequest { parameters: fs.params(), ..Default::default() })
            .await
            .unwrap()
            .into_inner();
    assert!(cap.available_capacity > 0, "{cap:?}");

    // Growth: the controller raises the quota, and the node has no step.
    let (staging, target) = mount(&mut k.n, &fs, &v, "pod-p", Mode::MultiNodeMultiWriter).await;
    let grown =
        k.c.controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: v.volume_id.clone(),
            capacity_range: req::range(256 * MIB, 0),
            volume_capability: Some(cap_of_volume()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((grown.capacity_bytes, grown.node_expansion_required), (256 * MIB, false));
    assert_eq!(fs.quota(&v.volume_id), 256 * MIB as u64);
    // The pod sees the new size through its mount (ceph-fuse learns of
    // the quota from the MDS: not instantly, within a bound).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = rustix::fs::statvfs(&target).unwrap();
        if s.f_blocks * s.f_frsize == 256 * MIB as u64 {
            break;
        }
        assert!(Instant::now() < deadline, "the pod sees {} bytes", s.f_blocks * s.f_frsize);
        std::thread::sleep(Duration::from_millis(20));
    }
    unmount(&mut k.n, &v.volume_id, &staging, &target).await;
    k.c.delete_volume(req::delete(&v.volume_id)).await.unwrap();
    k.c.delete_volume(req::delete(&v.volume_id)).await.expect("deleting again: OK");
    fs.assert_clean();
    drop(d);
}

fn cap_of_volume() -> csi::VolumeCapability {
    cap(Mode::MultiNodeMultiWriter)
}

/// A volume `pvc-src` whose `dir/data` read "before the snapshot" when
/// snapshot `snap` was taken and "after the snapshot" since; unmounted.
async fn snapshotted_source(
    k: &mut Clients,
    fs: &CephFs,
    snap: &str,
) -> (csi::Volume, csi::Snapshot) {
    let v = new_volume(k, fs, "pvc-src", Mode::SingleNodeWriter).await;
    let (staging, target) = mount(&mut k.n, fs, &v, "pod-src", Mode::SingleNodeWriter).await;
    std::fs::create_dir(target.join("dir")).unwrap();
    std::fs::write(target.join("dir/data"), b"before the snapshot").unwrap();
    let s = k.c.create_snapshot(req::snapshot(snap, &v.volume_id)).await.unwrap();
    std::fs::write(target.join("dir/data"), b"after the snapshot").unwrap();
    unmount(&mut k.n, &v.volume_id, &staging, &target).await;
    (v, s.into_inner().snapshot.unwrap())
}

/// Snapshots are the subvolume's own (O(1)); a restore holds the data of
/// the instant it was taken; a snapshot outlives its volume (Ceph keeps the
/// subvolume as `snapshot-retained`, no longer a volume) and still
/// restores; deleting the last snapshot lets Ceph purge what was kept.
#[tokio::test]
async fn cephfs_snapshots_restore_and_outlive_their_volume() {
    let Some(fs) = cephfs("snap") else { return };
    let d = fs.driver("d", "node-a", &[]).start();
    let mut k = clients(&d).await;
    let (v, snap) = snapshotted_source(&mut k, &fs, "snap-1").await;
    let again = k.c.create_snapshot(req::snapshot("snap-1", &v.volume_id)).await.unwrap();
    let again = again.into_inner().snapshot.unwrap();
    assert_eq!(
        (again.snapshot_id.as_str(), again.source_volume_id.as_str()),
        (snap.snapshot_id.as_str(), v.volume_id.as_str())
    );
    assert!(snap.ready_to_use && snap.size_bytes == 64 * MIB, "{snap:?}");

    // A restore: the data of the snapshot's instant, in a volume of its own.
    let restore = |name: &str| csi::CreateVolumeRequest {
        parameters: fs.params(),
        volume_capabilities: vec![cap(Mode::SingleNodeWriter)],
        ..req::from_snapshot(name, &snap.snapshot_id, 64 * MIB)
    };
    let r1 = created(&mut k.c, restore("pvc-r1")).await;
    let again = created(&mut k.c, restore("pvc-r1")).await;
    assert_eq!(again.volume_id, r1.volume_id);
    assert!(r1.content_source.is_some(), "{r1:?}");
    let (st1, tg1) = mount(&mut k.n, &fs, &r1, "pod-r1", Mode::SingleNodeWriter).await;
    assert_eq!(std::fs::read(tg1.join("dir/data")).unwrap(), b"before the snapshot");
    unmount(&mut k.n, &r1.volume_id, &st1, &tg1).await;
    // The same name from no snapshot is another volume: ALREADY_EXISTS.
    let e = k.c.create_volume(fs.create("pvc-r1", 64 * MIB, Mode::SingleNodeWriter)).await;
    assert_eq!(e.unwrap_err().code(), Code::AlreadyExists);
    // A snapshot that does not exist, or on another file system.
    let mut r = restore("pvc-bad");
    r.volume_content_source =
        req::from_snapshot("x", "cephfs-snap:ferrovolfs:0123456789abcdef0123456789abcdef", 0)
            .volume_content_source;
    assert_eq!(k.c.create_volume(r).await.unwrap_err().code(), Code::NotFound);

    // The volume goes, its snapshot stays and still restores.
    k.c.delete_volume(req::delete(&v.volume_id)).await.unwrap();
    let get = csi::ControllerGetVolumeRequest { volume_id: v.volume_id.clone() };
    assert_eq!(k.c.controller_get_volume(get).await.unwrap_err().code(), Code::NotFound);
    let listed = k.c.list_volumes(csi::ListVolumesRequest::default()).await.unwrap().into_inner();
    assert!(listed.entries.iter().all(|e| e.volume.as_ref().unwrap().volume_id != v.volume_id));
    let by_id =
        csi::ListSnapshotsRequest { snapshot_id: snap.snapshot_id.clone(), ..Default::default() };
    assert_eq!(k.c.list_snapshots(by_id).await.unwrap().into_inner().entries.len(), 1);
    let r2 = created(&mut k.c, restore("pvc-r2")).await;
    let (st2, tg2) = mount(&mut k.n, &fs, &r2, "pod-r2", Mode::SingleNodeWriter).await;
    assert_eq!(std::fs::read(tg2.join("dir/data")).unwrap(), b"before the snapshot");
    unmount(&mut k.n, &r2.volume_id, &st2, &tg2).await;

    // The last snapshot takes the kept subvolume with it.
    let source_subvolume = v.volume_id.rsplit(':').next().unwrap().to_string();
    assert!(fs.subvolumes().contains(&source_subvolume), "kept for its snapshot");
    k.c.delete_snapshot(req::delete_snapshot(&snap.snapshot_id)).await.unwrap();
    k.c.delete_snapshot(req::delete_snapshot(&snap.snapshot_id)).await.expect("deleting again: OK");
    assert!(!fs.subvolumes().contains(&source_subvolume), "purged with its last snapshot");
    for r in [&r1, &r2] {
        k.c.delete_volume(req::delete(&r.volume_id)).await.unwrap();
    }
    fs.assert_clean();
    drop(d);
}

/// A restore whose copy outlasts the wait answers ABORTED, as the
/// provisioner expects of an operation in flight, and a retry finds the
/// same copy and answers once it is complete; a restore deleted while it
/// still copies is cancelled and leaves nothing.
#[tokio::test]
async fn cephfs_slow_restores_and_clones_answer_aborted_and_deleted_ones_are_cancelled() {
    let Some(fs) = cephfs("slowrestore") else { return };
    let flags = ["--cephfs-restore-wait", "1ms", "--metrics-addr", "127.0.0.1:0"];
    let mut d = fs.driver("d", "node-a", &flags).start();
    let metrics = common::logged_addr(&d.wait_for_log("metrics listening").unwrap());
    let mut k = clients(&d).await;
    let v = new_volume(&mut k, &fs, "pvc-big", Mode::SingleNodeWriter).await;
    let (staging, target) = mount(&mut k.n, &fs, &v, "pod-big", Mode::SingleNodeWriter).await;
    let chunk: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
    for f in 0..4 {
        let data: Vec<u8> = chunk.iter().cycle().take(16 << 20).copied().collect();
        std::fs::write(target.join(format!("f{f}")), data).unwrap();
    }
    unmount(&mut k.n, &v.volume_id, &staging, &target).await;
    let snap = k.c.create_snapshot(req::snapshot("snap-big", &v.volume_id)).await.unwrap();
    let snap = snap.into_inner().snapshot.unwrap();
    let restore = |name: &str| csi::CreateVolumeRequest {
        parameters: fs.params(),
        volume_capabilities: vec![cap(Mode::SingleNodeWriter)],
        ..req::from_snapshot(name, &snap.snapshot_id, 64 * MIB)
    };

    // In flight: ABORTED, then the sidecar's retries until it is done.
    let first = k.c.create_volume(restore("pvc-slow")).await.unwrap_err();
    assert_eq!(first.code(), Code::Aborted, "{first:?}");
    assert!(first.message().contains("copy"), "{first:?}");
    // The copy's progress is a metric too (read while it runs: 64 MiB at
    // this cluster's pace takes far longer than a scrape).
    let (status, body) = common::http_get(&metrics, "/metrics").await;
    assert_eq!(status, 200);
    let value = |series: &str| {
        body.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {series} in {body}"))
    };
    assert_eq!(value("ferrovol_copies_running"), 1.0, "{body}");
    let (done, size) = (value("ferrovol_copies_done_bytes"), value("ferrovol_copies_size_bytes"));
    assert!(done <= size && (size == 0.0 || size == (64 << 20) as f64), "{done} of {size}");
    let restored = created(&mut k.c, restore("pvc-slow")).await;
    let (_, body) = common::http_get(&metrics, "/metrics").await;
    assert!(body.contains("\nferrovol_copies_running 0\n"), "the copy ended: {body}");
    let (st, tg) = mount(&mut k.n, &fs, &restored, "pod-slow", Mode::SingleNodeWriter).await;
    for f in 0..4 {
        let data = std::fs::read(tg.join(format!("f{f}"))).unwrap();
        assert_eq!(data.len(), 16 << 20);
        assert!(data.chunks(1 << 20).all(|c| c == chunk.as_slice()), "f{f} differs");
    }
    unmount(&mut k.n, &restored.volume_id, &st, &tg).await;

    // Deleted mid-copy: cancelled, nothing left (the ID is the one the
    // CreateVolume would have answered).
    let e = k.c.create_volume(restore("pvc-abandoned")).await.unwrap_err();
    assert_eq!(e.code(), Code::Aborted, "{e:?}");
    let abandoned =
        ferrovol_cephfs::ids::VolumeId::new("ferrovolfs", &fs.group, "csi-vol-", "pvc-abandoned");
    assert!(fs.subvolumes().contains(&abandoned.subvolume), "the copy is under way");
    k.c.delete_volume(req::delete(&abandoned.id())).await.unwrap();
    assert!(!fs.subvolumes().contains(&abandoned.subvolume), "the copy was cancelled and removed");

    // A clone is the same copy, of a snapshot taken for it and removed
    // once it is done: ABORTED while it runs, the data once it is done,
    // and no snapshot of the clone's left on the source.
    let source_subvolume = v.volume_id.rsplit(':').next().unwrap().to_string();
    let own_snapshots = || {
        let out = fs.tool(
            "ceph",
            &[
                "fs",
                "subvolume",
                "snapshot",
                "ls",
                FS,
                &source_subvolume,
                "--group_name",
                &fs.group,
            ],
        );
        out.matches("csi-clone-").count()
    };
    let clone = |name: &str| csi::CreateVolumeRequest {
        parameters: fs.params(),
        volume_capabilities: vec![cap(Mode::SingleNodeWriter)],
        volume_content_source: Some(csi::VolumeContentSource {
            r#type: Some(csi::volume_content_source::Type::Volume(
                csi::volume_content_source::VolumeSource { volume_id: v.volume_id.clone() },
            )),
        }),
        ..req::create(name, 64 * MIB)
    };
    let e = k.c.create_volume(clone("pvc-clone")).await.unwrap_err();
    assert_eq!(e.code(), Code::Aborted, "{e:?}");
    assert_eq!(own_snapshots(), 1, "the clone copies a snapshot of its own");
    let cloned = created(&mut k.c, clone("pvc-clone")).await;
    assert_eq!(own_snapshots(), 0, "the clone's snapshot goes when it is done");
    let source = cloned.content_source.as_ref().and_then(|c| c.r#type.as_ref());
    assert!(
        matches!(source, Some(csi::volume_content_source::Type::Volume(s)) if s.volume_id == v.volume_id),
        "{cloned:?}"
    );
    let (st, tg) = mount(&mut k.n, &fs, &cloned, "pod-clone", Mode::SingleNodeWriter).await;
    for f in 0..4 {
        let data = std::fs::read(tg.join(format!("f{f}"))).unwrap();
        assert!(data.len() == 16 << 20 && data.chunks(1 << 20).all(|c| c == chunk.as_slice()));
    }
    unmount(&mut k.n, &cloned.volume_id, &st, &tg).await;
    // Deleted mid-copy: cancelled, and its snapshot removed.
    let e = k.c.create_volume(clone("pvc-clone-abandoned")).await.unwrap_err();
    assert_eq!(e.code(), Code::Aborted, "{e:?}");
    let abandoned = ferrovol_cephfs::ids::VolumeId::new(
        "ferrovolfs",
        &fs.group,
        "csi-vol-",
        "pvc-clone-abandoned",
    );
    k.c.delete_volume(req::delete(&abandoned.id())).await.unwrap();
    assert!(!fs.subvolumes().contains(&abandoned.subvolume), "the copy was cancelled and removed");
    assert_eq!(own_snapshots(), 0, "the abandoned clone's snapshot is removed");

    k.c.delete_volume(req::delete(&cloned.volume_id)).await.unwrap();
    k.c.delete_volume(req::delete(&restored.volume_id)).await.unwrap();
    k.c.delete_snapshot(req::delete_snapshot(&snap.snapshot_id)).await.unwrap();
    k.c.delete_volume(req::delete(&v.volume_id)).await.unwrap();
    fs.assert_clean();
    drop(d);
}

/// `backingSnapshot: "true"`: a read-only volume that is the snapshot
/// itself: nothing copied (no subvolume made), the snapshot's instant,
/// read-only whatever the publish asks; the snapshot can be deleted while
/// the view is in use and goes with it.
#[tokio::test]
async fn cephfs_a_read_only_restore_is_a_view_of_the_snapshot() {
    let Some(fs) = cephfs("view") else { return };
    let d = fs.driver("d", "node-a", &[]).start();
    let mut k = clients(&d).await;
    let (v, snap) = snapshotted_source(&mut k, &fs, "snap-v").await;

    let view = |name: &str, mode: Mode| csi::CreateVolumeRequest {
        parameters: {
            let mut p = fs.params();
            p.insert("backingSnapshot".into(), "true".into());
            p
        },
        volume_capabilities: vec![cap(mode)],
        ..req::from_snapshot(name, &snap.snapshot_id, 64 * MIB)
    };
    let before = fs.subvolumes();
    let ro = k.c.create_volume(view("pvc-ro", Mode::MultiNodeReaderOnly)).await.unwrap();
    let ro = ro.into_inner().volume.unwrap();
    let again = k.c.create_volume(view("pvc-ro", Mode::MultiNodeReaderOnly)).await.unwrap();
    assert_eq!(again.into_inner().volume.unwrap().volume_id, ro.volume_id);
    assert_eq!(fs.subvolumes(), before, "a view copies nothing and makes no subvolume");
    assert!(ro.volume_context["rootPath"].contains("/.snap/"), "{:?}", ro.volume_context);
    assert_eq!(ro.capacity_bytes, 64 * MIB);

    // Writable modes, or no snapshot: refused, naming why.
    let e = k.c.create_volume(view("pvc-rw", Mode::MultiNodeMultiWriter)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("read-only"), "{e:?}");
    let mut none = view("pvc-none", Mode::MultiNodeReaderOnly);
    none.volume_content_source = None;
    assert_eq!(k.c.create_volume(none).await.unwrap_err().code(), Code::InvalidArgument);
    // The same name without backingSnapshot is another volume.
    let e = k.c.create_volume(fs.create("pvc-ro", 64 * MIB, Mode::SingleNodeWriter)).await;
    assert_eq!(e.unwrap_err().code(), Code::AlreadyExists);

    // Listed and described like any volume; it neither grows nor is
    // snapshotted (it is a snapshot).
    let get = csi::ControllerGetVolumeRequest { volume_id: ro.volume_id.clone() };
    let got = k.c.controller_get_volume(get).await.unwrap().into_inner();
    assert_eq!(got.volume.unwrap().volume_id, ro.volume_id);
    let listed = k.c.list_volumes(csi::ListVolumesRequest::default()).await.unwrap().into_inner();
    assert!(listed.entries.iter().any(|e| e.volume.as_ref().unwrap().volume_id == ro.volume_id));
    let grow = csi::ControllerExpandVolumeRequest {
        volume_id: ro.volume_id.clone(),
        capacity_range: Some(csi::CapacityRange { required_bytes: 128 * MIB, limit_bytes: 0 }),
        ..Default::default()
    };
    assert_eq!(
        k.c.controller_expand_volume(grow).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    let e = k.c.create_snapshot(req::snapshot("snap-of-view", &ro.volume_id)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    // Mounted on a node: the snapshot's instant, and read-only even
    // though the publish does not ask for it.
    let (st, tg) = mount(&mut k.n, &fs, &ro, "pod-ro", Mode::MultiNodeReaderOnly).await;
    assert_eq!(std::fs::read(tg.join("dir/data")).unwrap(), b"before the snapshot");
    let e = std::fs::write(tg.join("dir/data"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    assert_eq!(std::fs::write(st.join("new"), b"x").unwrap_err().raw_os_error(), Some(libc::EROFS));

    // The CO deletes the snapshot while the view uses it: it goes from the
    // CO's view, the data stays for the volume, and the name is not
    // handed out again while it does.
    k.c.delete_snapshot(req::delete_snapshot(&snap.snapshot_id)).await.unwrap();
    let by_id =
        csi::ListSnapshotsRequest { snapshot_id: snap.snapshot_id.clone(), ..Default::default() };
    assert!(k.c.list_snapshots(by_id).await.unwrap().into_inner().entries.is_empty());
    assert_eq!(std::fs::read(tg.join("dir/data")).unwrap(), b"before the snapshot");
    let e = k.c.create_snapshot(req::snapshot("snap-v", &v.volume_id)).await.unwrap_err();
    assert_eq!(e.code(), Code::Aborted, "{e:?}");
    unmount(&mut k.n, &ro.volume_id, &st, &tg).await;

    // The source goes (kept by Ceph for its snapshot), then the view: the
    // snapshot goes with its last user, and the source with it.
    k.c.delete_volume(req::delete(&v.volume_id)).await.unwrap();
    let source_subvolume = v.volume_id.rsplit(':').next().unwrap().to_string();
    assert!(fs.subvolumes().contains(&source_subvolume), "kept for its snapshot");
    k.c.delete_volume(req::delete(&ro.volume_id)).await.unwrap();
    k.c.delete_volume(req::delete(&ro.volume_id)).await.expect("deleting again: OK");
    let hash = ro.volume_id.rsplit(':').next().unwrap();
    let objects = fs.tool("rados", &["-p", META_POOL, "ls"]);
    assert!(!objects.contains(&format!("ferrovol.cephfs.name.{hash}")), "the view's name claim");
    fs.assert_clean();
    drop(d);
}

/// What a copy must keep of one entry of a tree.
#[derive(Debug, PartialEq)]
struct Entry {
    path: String,
    mode: u32,
    owner: (u32, u32),
    /// Contents (files), target (symlinks), nothing (directories).
    data: Vec<u8>,
    xattrs: Vec<(String, Vec<u8>)>,
    /// Which earlier entry this one is a hard link of.
    link_of: Option<String>,
    /// Modification time (seconds, nanoseconds).
    mtime: (i64, i64),
}

/// Every entry under `root`, sorted by path.
fn tree(root: &Path) -> Vec<Entry> {
    use std::os::unix::fs::MetadataExt;
    let mut out = vec![];
    let mut inodes: HashMap<u64, String> = HashMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let data = match () {
                _ if m.is_symlink() => {
                    std::fs::read_link(&p).unwrap().into_os_string().into_encoded_bytes()
                }
                _ if m.is_dir() => {
                    todo.push(p.clone());
                    vec![]
                }
                _ => std::fs::read(&p).unwrap(),
            };
            let mut names = vec![0u8; 4096];
            let n = rustix::fs::llistxattr(&p, &mut names).unwrap_or(0);
            let mut xattrs: Vec<(String, Vec<u8>)> = names[..n]
                .split(|b| *b == 0)
                .filter(|n| n.starts_with(b"user."))
                .map(|n| {
                    let name = String::from_utf8_lossy(n).into_owned();
                    let mut v = vec![0u8; 4096];
                    let len = rustix::fs::lgetxattr(&p, name.as_str(), &mut v).unwrap();
                    v.truncate(len);
                    (name, v)
                })
                .collect();
            xattrs.sort();
            let link_of = match m.is_file() && m.nlink() > 1 {
                true => inodes.get(&m.ino()).cloned(),
                false => None,
            };
            if m.is_file() && m.nlink() > 1 {
                inodes.entry(m.ino()).or_insert_with(|| rel.clone());
            }
            out.push(Entry {
                path: rel,
                mode: m.mode(),
                owner: (m.uid(), m.gid()),
                data,
                xattrs,
                link_of,
                mtime: (m.mtime(), m.mtime_nsec()),
            });
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

/// A restore and a clone hold the source's tree: contents (holes read as
/// zeros), modes, owners, symlinks (dangling ones too), and with
/// ferrovol's own copier extended attributes and hard links too; the
/// manager's cloner drops those (measured, so the day it keeps them this
/// test says so).
#[tokio::test]
async fn cephfs_restores_and_clones_keep_the_tree() {
    keeps_the_tree("tree", "ferrovol").await;
}

#[tokio::test]
async fn cephfs_the_managers_cloner_drops_xattrs_and_hard_links() {
    keeps_the_tree("treemgr", "manager").await;
}

async fn keeps_the_tree(test: &str, copier: &str) {
    let Some(fs) = cephfs(test) else { return };
    let d = fs.driver("d", "node-a", &["--cephfs-copier", copier]).start();
    let mut k = clients(&d).await;
    let v = new_volume(&mut k, &fs, &format!("pvc-{test}"), Mode::SingleNodeWriter).await;
    let (staging, target) = mount(&mut k.n, &fs, &v, "pod-tree", Mode::SingleNodeWriter).await;
    let t = &target;
    std::fs::create_dir_all(t.join("a/b")).unwrap();
    std::fs::write(t.join("a/b/file"), b"some data").unwrap();
    let holes = std::fs::File::create(t.join("holes")).unwrap();
    holes.set_len(4 * MIB as u64).unwrap();
    std::os::unix::fs::FileExt::write_at(&holes, b"middle", 2 * MIB as u64).unwrap();
    drop(holes);
    std::os::unix::fs::symlink("a/b/file", t.join("link")).unwrap();
    std::os::unix::fs::symlink("/nowhere/at/all", t.join("dangling")).unwrap();
    std::fs::write(t.join("hard"), b"linked").unwrap();
    std::fs::hard_link(t.join("hard"), t.join("a/hard-too")).unwrap();
    rustix::fs::setxattr(
        t.join("a/b/file").as_path(),
        "user.origin",
        b"ferrovol",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(t.join("a/b/file"), std::fs::Permissions::from_mode(0o640)).unwrap();
    std::fs::set_permissions(t.join("a"), std::fs::Permissions::from_mode(0o750)).unwrap();
    std::os::unix::fs::lchown(t.join("a/b/file"), Some(1234), Some(5678)).unwrap();
    std::os::unix::fs::lchown(t.join("link"), Some(4321), Some(8765)).unwrap();
    let want = tree(t);
    unmount(&mut k.n, &v.volume_id, &staging, &target).await;
    let snap =
        k.c.create_snapshot(req::snapshot(&format!("snap-{test}"), &v.volume_id)).await.unwrap();
    let snap = snap.into_inner().snapshot.unwrap();

    let restore = csi::CreateVolumeRequest {
        parameters: fs.params(),
        volume_capabilities: vec![cap(Mode::SingleNodeWriter)],
        ..req::from_snapshot(&format!("pvc-{test}-r"), &snap.snapshot_id, 64 * MIB)
    };
    let clone = csi::CreateVolumeRequest {
        volume_content_source: Some(csi::VolumeContentSource {
            r#type: Some(csi::volume_content_source::Type::Volume(
                csi::volume_content_source::VolumeSource { volume_id: v.volume_id.clone() },
            )),
        }),
        ..fs.create(&format!("pvc-{test}-c"), 64 * MIB, Mode::SingleNodeWriter)
    };
    for (r, pod) in [(restore, "pod-r"), (clone, "pod-c")] {
        let made = created(&mut k.c, r).await;
        let (st, tg) = mount(&mut k.n, &fs, &made, pod, Mode::SingleNodeWriter).await;
        let got = tree(&tg);
        for (w, g) in want.iter().zip(&got) {
            if copier == "ferrovol" {
                assert_eq!(w, g, "{pod}");
                continue;
            }
            let kept = |e: &Entry| (e.path.clone(), e.mode, e.owner, e.data.clone());
            assert_eq!(kept(w), kept(g), "{pod}");
            // Each name of a hard link copied on its own; xattrs dropped.
            assert_eq!(g.link_of, None, "{pod}: {g:?}");
            if !w.xattrs.is_empty() {
                assert_eq!(g.xattrs, vec![], "{pod}: the manager's cloner kept xattrs now");
            }
        }
        assert_eq!(want.len(), got.len(), "{pod}: {got:?}");
        unmount(&mut k.n, &made.volume_id, &st, &tg).await;
        k.c.delete_volume(req::delete(&made.volume_id)).await.unwrap();
    }
    k.c.delete_snapshot(req::delete_snapshot(&snap.snapshot_id)).await.unwrap();
    k.c.delete_volume(req::delete(&v.volume_id)).await.unwrap();
    fs.assert_clean();
    drop(d);
}

/// ferrovol's own copy survives the driver: a restore cut short by SIGKILL
/// is resumed by the restarted driver (which finds it in Ceph) and holds
/// the data byte for byte on the provisioner's next retry; a restore
/// nobody asks about any more (the claim was deleted and the provisioner
/// stopped retrying) is abandoned after the idle time and what it made is
/// removed, by the driver copying it or, after it died, by its successor.
#[tokio::test]
async fn cephfs_a_copy_resumes_after_a_restart_and_an_abandoned_one_is_removed() {
    let Some(fs) = cephfs("resume") else { return };
    let flags = ["--cephfs-restore-wait", "1ms", "--cephfs-copy-abandon-after", "5s"];
    let builder = || fs.driver("d", "node-a", &flags);
    let mut d = builder().start();
    let mut k = clients(&d).await;
    let v = new_volume(&mut k, &fs, "pvc-resume-src", Mode::SingleNodeWriter).await;
    let (staging, target) = mount(&mut k.n, &fs, &v, "pod-src", Mode::SingleNodeWriter).await;
    let chunk: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 253) as u8).collect();
    for f in 0..8 {
        let data: Vec<u8> = chunk.iter().cycle().take(8 << 20).copied().collect();
        std::fs::write(target.join(format!("f{f}")), data).unwrap();
    }
    unmount(&mut k.n, &v.volume_id, &staging, &target).await;
    let snap = k.c.create_snapshot(req::snapshot("snap-resume", &v.volume_id)).await.unwrap();
    let snap = snap.into_inner().snapshot.unwrap();
    let restore = |name: &str| csi::CreateVolumeRequest {
        parameters: fs.params(),
        volume_capabilities: vec![cap(Mode::SingleNodeWriter)],
        ..req::from_snapshot(name, &snap.snapshot_id, 128 * MIB)
    };

    let e = k.c.create_volume(restore("pvc-resumed")).await.unwrap_err();
    assert_eq!(e.code(), Code::Aborted, "{e:?}");
    assert!(e.message().contains("MiB"), "the progress is in the answer: {e:?}");
    d.kill();
    d = builder().start();
    let mut k = clients(&d).await;
    let restored = created(&mut k.c, restore("pvc-resumed")).await;
    assert!(d.logs().contains("resuming the copy"), "{}", d.logs());
    let (st, tg) = mount(&mut k.n, &fs, &restored, "pod-resumed", Mode::SingleNodeWriter).await;
    for f in 0..8 {
        let data = std::fs::read(tg.join(format!("f{f}"))).unwrap();
        assert!(data.len() == 8 << 20 && data.chunks(1 << 20).all(|c| c == chunk.as_slice()));
    }
    unmount(&mut k.n, &restored.volume_id, &st, &tg).await;

    // Asked once, then never again: abandoned, nothing left.
    let e = k.c.create_volume(restore("pvc-forgotten")).await.unwrap_err();
    assert_eq!(e.code(), Code::Aborted, "{e:?}");
    let forgotten =
        ferrovol_cephfs::ids::VolumeId::new("ferrovolfs", &fs.group, "csi-vol-", "pvc-forgotten");
    assert!(fs.subvolumes().contains(&forgotten.subvolume), "the copy is under way");
    assert!(d.wait_for_log("abandoned and removed").is_some(), "{}", d.logs());
    assert!(!fs.subvolumes().contains(&forgotten.subvolume), "the abandoned copy is removed");

    // Asked once, then the driver died: the restarted one removes it once
    // nobody asked for longer than the abandon time.
    let e = k.c.create_volume(restore("pvc-orphan")).await.unwrap_err();
    assert_eq!(e.code(), Code::Aborted, "{e:?}");
    let orphan =
        ferrovol_cephfs::ids::VolumeId::new("ferrovolfs", &fs.group, "csi-vol-", "pvc-orphan");
    d.kill();
    d = builder().start();
    let mut k = clients(&d).await;
    assert!(d.wait_for_log("abandoned and removed").is_some(), "{}", d.logs());
    // The removal waits until the MDS lets go of the killed driver's
    // client (its session times out): polled, bounded.
    let deadline = Instant::now() + Duration::from_secs(240);
    while fs.subvolumes().contains(&orphan.subvolume) {
        assert!(Instant::now() < deadline, "the orphaned copy is still there");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(fs.claims().is_empty() || !fs.claims().iter().any(|c| c.contains(&orphan.subvolume)));

    k.c.delete_volume(req::delete(&restored.volume_id)).await.unwrap();
    k.c.delete_snapshot(req::delete_snapshot(&snap.snapshot_id)).await.unwrap();
    k.c.delete_volume(req::delete(&v.volume_id)).await.unwrap();
    fs.assert_clean();
    drop(d);
}

/// Restores each snapshot (a copy), mounts it and answers the last
/// sequence number its log holds; everything restored is removed again.
async fn restored_seqs(k: &mut Clients, fs: &CephFs, snaps: &[String], tag: &str) -> Vec<u64> {
    let mut seqs = vec![];
    for (i, s) in snaps.iter().enumerate() {
        let r = csi::CreateVolumeRequest {
            parameters: fs.params(),
            volume_capabilities: vec![cap(Mode::SingleNodeWriter)],
            ..req::from_snapshot(&format!("pvc-{tag}-{i}"), s, 64 * MIB)
        };
        let r = created(&mut k.c, r).await;
        let (st, tg) =
            mount(&mut k.n, fs, &r, &format!("pod-{tag}-{i}"), Mode::SingleNodeWriter).await;
        seqs.push(last_seq(&tg.join("log")));
        unmount(&mut k.n, &r.volume_id, &st, &tg).await;
        k.c.delete_volume(req::delete(&r.volume_id)).await.unwrap();
    }
    seqs
}

/// Group snapshots on Pacific (no quiesce API): one MDS snapshot of the
/// members' subvolume group, taken while a writer appends to both members
/// in lockstep, restores members from one instant, where two single
/// snapshots taken one after the other do not agree. Members are listed
/// with their group, are deleted only with it, restore after their source
/// volume is gone, and the group's snapshot goes with the group.
#[tokio::test]
async fn cephfs_group_snapshots_are_one_instant_and_members_restore() {
    let Some(fs) = cephfs("group") else { return };
    let d = fs.driver("d", "node-a", &[]).start();
    let mut k = clients(&d).await;
    let mut g = GroupControllerClient::new(d.channel().await);
    let mut vols = vec![];
    for i in 0..2 {
        let v = new_volume(&mut k, &fs, &format!("pvc-g{i}"), Mode::SingleNodeWriter).await;
        let (st, tg) = mount(&mut k.n, &fs, &v, &format!("pod-g{i}"), Mode::SingleNodeWriter).await;
        vols.push((v.volume_id.clone(), st, tg));
    }
    let ids: Vec<String> = vols.iter().map(|v| v.0.clone()).collect();
    let group_req = |name: &str, ids: &[String]| csi::CreateVolumeGroupSnapshotRequest {
        name: name.into(),
        source_volume_ids: ids.to_vec(),
        ..Default::default()
    };

    // One group snapshot while the writer runs, then two single snapshots
    // one after the other, the writer steps further on at the second.
    let writer = Lockstep::start_durable(&vols);
    let taken = g.create_volume_group_snapshot(group_req("group-1", &ids)).await.unwrap();
    let taken = taken.into_inner().group_snapshot.unwrap();
    let mut singles = vec![];
    for (i, id) in ids.iter().enumerate() {
        if i > 0 {
            writer.advance(3);
        }
        let s = k.c.create_snapshot(req::snapshot(&format!("single-{i}"), id)).await.unwrap();
        singles.push(s.into_inner().snapshot.unwrap().snapshot_id);
    }
    let steps = writer.stop();
    assert!(steps > 20, "{steps}");
    for (v, st, tg) in &vols {
        unmount(&mut k.n, v, st, tg).await;
    }

    assert_eq!(taken.snapshots.len(), 2);
    assert!(taken.ready_to_use && taken.creation_time.is_some());
    assert!(taken
        .snapshots
        .iter()
        .all(|s| s.group_snapshot_id == taken.group_snapshot_id && s.ready_to_use));
    let again = g.create_volume_group_snapshot(group_req("group-1", &ids)).await.unwrap();
    assert_eq!(again.into_inner().group_snapshot.unwrap(), taken, "same name, same members");
    let e = g.create_volume_group_snapshot(group_req("group-1", &ids[..1])).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    let got = g
        .get_volume_group_snapshot(csi::GetVolumeGroupSnapshotRequest {
            group_snapshot_id: taken.group_snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(got.into_inner().group_snapshot.unwrap(), taken);
    // Members of two subvolume groups cannot be one directory's snapshot.
    let mut elsewhere = fs.create("pvc-elsewhere", 64 * MIB, Mode::SingleNodeWriter);
    elsewhere.parameters.insert("subvolumeGroup".into(), format!("{}-b", fs.group));
    let other = k.c.create_volume(elsewhere).await.unwrap().into_inner().volume.unwrap();
    let mixed = [ids[0].clone(), other.volume_id.clone()];
    let e = g.create_volume_group_snapshot(group_req("group-mixed", &mixed)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    k.c.delete_volume(req::delete(&other.volume_id)).await.unwrap();
    let missing = [ids[0].clone(), format!("cephfs:{FS}:{}:csi-vol-gone", fs.group)];
    let e = g.create_volume_group_snapshot(group_req("group-gone", &missing)).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");

    let members: Vec<String> = ids
        .iter()
        .map(|id| {
            let m = taken.snapshots.iter().find(|s| &s.source_volume_id == id).unwrap();
            m.snapshot_id.clone()
        })
        .collect();
    let e = k.c.delete_snapshot(req::delete_snapshot(&members[0])).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "a member goes with its group");
    let lister = k.c.clone();
    let listed = |filter: csi::ListSnapshotsRequest| {
        let mut c = lister.clone();
        async move {
            let entries = c.list_snapshots(filter).await.unwrap().into_inner().entries;
            entries.into_iter().map(|e| e.snapshot.unwrap()).collect::<Vec<_>>()
        }
    };
    let by_id =
        listed(csi::ListSnapshotsRequest { snapshot_id: members[0].clone(), ..Default::default() })
            .await;
    assert_eq!(by_id.len(), 1);
    assert_eq!(by_id[0].group_snapshot_id, taken.group_snapshot_id);
    let by_source = listed(csi::ListSnapshotsRequest {
        source_volume_id: ids[1].clone(),
        ..Default::default()
    })
    .await;
    let found: Vec<&str> = by_source.iter().map(|s| s.snapshot_id.as_str()).collect();
    assert!(
        found.contains(&members[1].as_str()) && found.contains(&singles[1].as_str()),
        "{found:?}"
    );
    assert_eq!(found.len(), 2, "{found:?}");
    let all = listed(csi::ListSnapshotsRequest::default()).await;
    assert!(members.iter().all(|m| all.iter().any(|s| &s.snapshot_id == m)), "{all:?}");
    // A read-only view of a member would show its whole group: refused.
    let mut view = csi::CreateVolumeRequest {
        parameters: fs.params(),
        volume_capabilities: vec![cap(Mode::MultiNodeReaderOnly)],
        ..req::from_snapshot("pvc-member-view", &members[0], 64 * MIB)
    };
    view.parameters.insert("backingSnapshot".into(), "true".into());
    let e = k.c.create_volume(view).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    // The first member's volume goes; its member still restores (the MDS
    // keeps what the group's snapshot holds). Members restore within one
    // step of each other; the single snapshots, taken apart, do not.
    let singles_seqs = restored_seqs(&mut k, &fs, &singles, "rs").await;
    for s in &singles {
        k.c.delete_snapshot(req::delete_snapshot(s)).await.unwrap();
    }
    k.c.delete_volume(req::delete(&ids[0])).await.unwrap();
    let group_seqs = restored_seqs(&mut k, &fs, &members, "rg").await;
    eprintln!(
        "group members {group_seqs:?}, separate snapshots {singles_seqs:?}, of {steps} steps"
    );
    let (a, b) = (group_seqs[0], group_seqs[1]);
    assert!(
        a > 0 && (a == b || a == b + 1),
        "group members agree: {group_seqs:?} of {steps} steps"
    );
    let (a, b) = (singles_seqs[0], singles_seqs[1]);
    assert!(b > a + 1, "separate snapshots see different instants: {singles_seqs:?} of {steps}");

    g.delete_volume_group_snapshot(csi::DeleteVolumeGroupSnapshotRequest {
        group_snapshot_id: taken.group_snapshot_id.clone(),
        snapshot_ids: members.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let e = g
        .get_volume_group_snapshot(csi::GetVolumeGroupSnapshotRequest {
            group_snapshot_id: taken.group_snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let gone =
        listed(csi::ListSnapshotsRequest { snapshot_id: members[1].clone(), ..Default::default() })
            .await;
    assert!(gone.is_empty(), "{gone:?}");
    k.c.delete_volume(req::delete(&ids[1])).await.unwrap();
    // The group directory has no snapshot left: the group itself goes.
    fs.tool("ceph", &["fs", "subvolumegroup", "rm", FS, &fs.group]);
    fs.assert_clean();
    drop(d);
}

/// The user's walkthrough with a CephFS class, as `ferrovol demo --engine
/// cephfs` runs it through a pipe: a claim, a snapshot, a restore, a clone,
/// an expansion the pod sees at once, a group snapshot, and one claim
/// mounted read-write on two nodes (two driver processes); nothing of it
/// is left in Ceph or on this host.
#[test]
fn cephfs_the_walkthrough_runs_on_a_cephfs_class() {
    let Some(mut fs) = cephfs("demo") else { return };
    let child = std::process::Command::new(common::BIN)
        .args(["demo", "--engine", "cephfs", "--cephfs-fs", FS, "--ceph-conf"])
        .arg(&fs.conf)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    for line in [
        "restored ibdata1 holds the same bytes: true",
        "cloned ibdata1 holds the same bytes: true",
        "quota now 2048 MiB (node expansion required: false)",
        "to 2048 MiB without remounting",
        "2 members, one instant",
        "node-a reads node-b's write: true",
        "everything cleaned up.",
        "Demo complete.",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
    // The demo's group, claims, mounts and helpers are gone.
    fs.group = format!("ferrovol-demo-{pid}");
    let groups = fs.tool("ceph", &["fs", "subvolumegroup", "ls", FS, "--format", "json"]);
    assert!(!groups.contains(&fs.group), "{groups}");
    assert_eq!(fs.claims(), Vec::<String>::new(), "the demo's claims are left");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&format!("ferrovol-demo-cephfs-node-a-{pid}")), "{mounts}");
    assert!(!mounts.contains(&format!("ferrovol-demo-cephfs-node-b-{pid}")), "{mounts}");
    for node in ["a", "b"] {
        let work = std::env::temp_dir().join(format!("ferrovol-demo-cephfs-node-{node}-{pid}"));
        assert!(common::ceph::helpers("ceph-fuse", &work).is_empty(), "helpers of node-{node}");
    }
}
