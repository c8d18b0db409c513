//! The RBD engine against a real Ceph: the throw-away cluster `.ci/run`
//! starts with `scripts/ceph-dev-cluster` (its ceph.conf in
//! `FERROVOL_TEST_CEPH_CONF`). Each test gets a pool of its own, which it
//! checks is empty at the end (images, trash, groups, our records) and then
//! removes. The node side maps through rbd-fuse and a loop device, the only
//! mapper this machine's kernel allows. Ceph's own tools (`rbd`, `rados`,
//! `ceph`) check what the driver did.
//!
//! Without `FERROVOL_TEST_CEPH_CONF` the tests say so and pass, unless
//! `FERROVOL_REQUIRE_CEPH` is set (as `.ci/run` sets it).

use crate::common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::req::{self, publish_req, stage_req, unpublish_req, unstage_req, MIB};
use common::{last_seq, Driver, DriverBuilder, Lockstep};
use ferrovol_csi as csi;
use ferrovol_csi::controller_client::ControllerClient;
use ferrovol_csi::group_controller_client::GroupControllerClient;
use ferrovol_csi::identity_client::IdentityClient;
use ferrovol_csi::node_client::NodeClient;
use ferrovol_csi::snapshot_metadata_client::SnapshotMetadataClient;
use ferrovol_csi::volume_capability::access_mode::Mode;
use tonic::transport::Channel;
use tonic::Code;

/// A pool of this test's own on the dev cluster, and everything the test
/// made on this host; removed (and checked) on drop.
struct Ceph {
    conf: PathBuf,
    pool: String,
    root: tempfile::TempDir,
    kubelet: PathBuf,
}

fn ceph(test: &str) -> Option<Ceph> {
    let (conf, root, kubelet) = common::ceph::scratch(test)?;
    let pool = format!("t-{test}-{}", std::process::id());
    let c = Ceph { conf, pool, kubelet, root };
    c.tool("ceph", &["osd", "pool", "create", &c.pool, "4", "4"]);
    c.tool("ceph", &["osd", "pool", "set", &c.pool, "size", "1", "--yes-i-really-mean-it"]);
    c.tool("rbd", &["pool", "init", &c.pool]);
    Some(c)
}

impl Ceph {
    /// Runs a Ceph tool against the dev cluster; answers its stdout.
    fn tool(&self, tool: &str, args: &[&str]) -> String {
        common::ceph::tool(&self.conf, tool, args)
    }

    fn json(&self, tool: &str, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.extend(["--format", "json"]);
        serde_json::from_str(&self.tool(tool, &a)).unwrap()
    }

    fn driver(&self, name: &str, node: &str, extra: &[&str]) -> DriverBuilder {
        let dir = self.root.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        DriverBuilder::new(&dir)
            .node_id(node)
            .args(["--engine", "rbd", "--rbd-mapper", "fuse", "--rbd-pools", &self.pool])
            .args(["--ceph-conf".to_string(), self.conf.display().to_string()])
            .args(["--kubelet-dir".to_string(), self.kubelet.display().to_string()])
            .args(extra.iter().copied())
    }

    fn params(&self, features: &str) -> std::collections::HashMap<String, String> {
        [("pool", self.pool.as_str()), ("imageFeatures", features)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn create(&self, name: &str, size: i64) -> csi::CreateVolumeRequest {
        csi::CreateVolumeRequest {
            parameters: self.params("layering,exclusive-lock"),
            ..req::create(name, size)
        }
    }

    fn images(&self) -> Vec<String> {
        self.json("rbd", &["ls", "-p", &self.pool])
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    }

    /// User-visible and hidden snapshots of an image (name, namespace).
    fn snaps(&self, image: &str) -> Vec<(String, String)> {
        self.json("rbd", &["snap", "ls", "--all", &format!("{}/{image}", self.pool)])
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                let ns = s["namespace"]["type"].as_str().unwrap_or("user").to_string();
                (s["name"].as_str().unwrap().to_string(), ns)
            })
            .collect()
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

    fn loops(&self) -> Vec<ferrovol_host::loopdev::Attached> {
        common::loops_under(self.root.path())
    }

    /// rbd-fuse helpers serving this test's state dirs.
    fn helpers(&self) -> Vec<i32> {
        common::ceph::helpers("rbd-fuse", self.root.path())
    }

    /// Undoes by force what the test's nodes hold on this host, in the
    /// order they hold each other: pods' and staging mounts (they hold the
    /// loop devices), the loop devices (found first: their backing files'
    /// paths are lost with the fuse mounts under them), the fuse mounts
    /// (their helpers exit), then any helper still running.
    fn release_host(&self) {
        let loops = self.loops();
        for m in self.host_mounts().iter().filter(|m| m.starts_with(&self.kubelet)) {
            let _ = rustix::mount::unmount(m, rustix::mount::UnmountFlags::DETACH);
        }
        for l in &loops {
            let _ = ferrovol_host::loopdev::detach(&l.device);
        }
        for m in self.host_mounts() {
            let _ = rustix::mount::unmount(&m, rustix::mount::UnmountFlags::DETACH);
        }
        for pid in self.helpers() {
            if let Some(p) = rustix::process::Pid::from_raw(pid) {
                let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
            }
        }
    }

    /// Nothing left: no image, trash entry, group or record of ours in
    /// the pool, and no mount, loop device or helper on this host.
    fn assert_clean(&self) {
        assert_eq!(self.images(), Vec::<String>::new(), "images left behind");
        // Deleted images leave the trash in the background (the purger):
        // waited for, within a bound only a purge that never happens
        // exceeds.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let trash = self.json("rbd", &["trash", "ls", "-p", &self.pool]);
            if trash.as_array().unwrap().is_empty() {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "trash left behind: {trash}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let groups = self.json("rbd", &["group", "ls", "-p", &self.pool]);
        assert_eq!(groups.as_array().unwrap().len(), 0, "groups left behind: {groups}");
        let objects = self.tool("rados", &["-p", &self.pool, "ls"]);
        let ours: Vec<&str> = objects.lines().filter(|o| o.starts_with("ferrovol.")).collect();
        assert!(ours.is_empty(), "records left behind: {ours:?}");
        assert!(self.host_mounts().is_empty(), "mounts left: {:?}", self.host_mounts());
        assert!(self.loops().is_empty(), "loop devices left: {:?}", self.loops());
        assert!(self.helpers().is_empty(), "rbd-fuse helpers left: {:?}", self.helpers());
    }
}

impl Drop for Ceph {
    fn drop(&mut self) {
        self.release_host();
        let _ = std::process::Command::new("ceph")
            .arg("-c")
            .arg(&self.conf)
            .args(["osd", "pool", "rm", &self.pool, &self.pool, "--yes-i-really-really-mean-it"])
            .output();
    }
}

struct Clients {
    c: ControllerClient<Channel>,
    g: GroupControllerClient<Channel>,
    n: NodeClient<Channel>,
    m: SnapshotMetadataClient<Channel>,
}

async fn clients(d: &Driver) -> Clients {
    let ch = d.channel().await;
    Clients {
        c: ControllerClient::new(ch.clone()),
        g: GroupControllerClient::new(ch.clone()),
        n: NodeClient::new(ch.clone()),
        m: SnapshotMetadataClient::new(ch),
    }
}

fn image_of(volume_id: &str) -> String {
    volume_id.rsplit(':').next().unwrap().to_string()
}

async fn new_volume(k: &mut Clients, ceph: &Ceph, name: &str, size: i64) -> String {
    let v = k.c.create_volume(ceph.create(name, size)).await.unwrap().into_inner();
    v.volume.unwrap().volume_id
}

async fn snapshot(k: &mut Clients, name: &str, source: &str) -> String {
    let s = k.c.create_snapshot(req::snapshot(name, source)).await.unwrap().into_inner();
    s.snapshot.unwrap().snapshot_id
}

fn publish(
    volume: &str,
    node: &str,
    mode: Mode,
    block: bool,
) -> csi::ControllerPublishVolumeRequest {
    let mut cap = if block { req::block_cap() } else { req::mount_cap("ext4") };
    cap.access_mode = Some(csi::volume_capability::AccessMode { mode: mode as i32 });
    csi::ControllerPublishVolumeRequest {
        volume_id: volume.into(),
        node_id: node.into(),
        volume_capability: Some(cap),
        ..Default::default()
    }
}

fn unpublish(volume: &str, node: &str) -> csi::ControllerUnpublishVolumeRequest {
    csi::ControllerUnpublishVolumeRequest {
        volume_id: volume.into(),
        node_id: node.into(),
        ..Default::default()
    }
}

/// ControllerPublish for one node alone, then the stage with the context
/// it answered, as the attacher and the kubelet do.
async fn publish_and_stage(k: &mut Clients, volume: &str, node: &str, staging: &Path) {
    let ctx =
        k.c.controller_publish_volume(publish(volume, node, Mode::SingleNodeWriter, false))
            .await
            .unwrap()
            .into_inner()
            .publish_context;
    let stage = csi::NodeStageVolumeRequest {
        publish_context: ctx,
        ..stage_req(volume, staging, req::mount_cap("ext4"))
    };
    k.n.node_stage_volume(stage).await.unwrap();
}

#[tokio::test]
async fn rbd_volumes_snapshots_and_clones() {
    let Some(ceph) = ceph("ctrl") else { return };
    let d = ceph.driver("d", "node-a", &["--mode", "controller"]).start();
    let mut k = clients(&d).await;

    // Parameters: ceph-csi's names; anything else is the caller's mistake.
    for (params, why) in [
        (vec![], "no pool"),
        (vec![("pool", ceph.pool.as_str()), ("thickProvision", "true")], "ceph-csi only"),
        (vec![("pool", ceph.pool.as_str()), ("colour", "blue")], "unknown"),
        (vec![("pool", "no-such-pool")], "missing pool"),
    ] {
        let r = csi::CreateVolumeRequest {
            parameters: params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ..req::create("bad", 16 * MIB)
        };
        let e = k.c.create_volume(r).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{why}: {e:?}");
    }
    assert!(ceph.images().is_empty(), "a refused request made an image");

    // Create: the image is named by the request; a retry finds it.
    let a = new_volume(&mut k, &ceph, "pvc-a", 64 * MIB).await;
    assert_eq!(new_volume(&mut k, &ceph, "pvc-a", 64 * MIB).await, a);
    let e = k.c.create_volume(ceph.create("pvc-a", 128 * MIB)).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    let info = ceph.json("rbd", &["info", &format!("{}/{}", ceph.pool, image_of(&a))]);
    assert_eq!(info["size"], 64 * MIB);
    let features: Vec<&str> =
        info["features"].as_array().unwrap().iter().map(|f| f.as_str().unwrap()).collect();
    assert!(features.contains(&"exclusive-lock"), "{features:?}");

    // Snapshots: RBD snapshots of the image, idempotent by name.
    let s = snapshot(&mut k, "snap-1", &a).await;
    assert_eq!(snapshot(&mut k, "snap-1", &a).await, s);
    let b = new_volume(&mut k, &ceph, "pvc-b", 16 * MIB).await;
    let e = k.c.create_snapshot(req::snapshot("snap-1", &b)).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    assert_eq!(ceph.snaps(&image_of(&a)).len(), 1);

    // Restore and clone are copy-on-write clones; the clone's transient
    // snapshot of its source is gone from view at once.
    let restore = csi::CreateVolumeRequest {
        parameters: ceph.params("layering"),
        ..req::from_snapshot("pvc-r", &s, 128 * MIB)
    };
    let r = k.c.create_volume(restore.clone()).await.unwrap().into_inner().volume.unwrap();
    assert_eq!(r.capacity_bytes, 128 * MIB, "grown past its snapshot");
    let rinfo = ceph.json("rbd", &["info", &format!("{}/{}", ceph.pool, image_of(&r.volume_id))]);
    assert_eq!(rinfo["parent"]["image"], image_of(&a), "{rinfo}");
    assert_eq!(
        k.c.create_volume(restore).await.unwrap().into_inner().volume.unwrap().volume_id,
        r.volume_id
    );
    let clone = csi::CreateVolumeRequest {
        parameters: ceph.params("layering"),
        ..req::from_volume("pvc-c", &a, 64 * MIB)
    };
    let c = k.c.create_volume(clone).await.unwrap().into_inner().volume.unwrap().volume_id;
    let cinfo = ceph.json("rbd", &["info", &format!("{}/{}", ceph.pool, image_of(&c))]);
    assert_eq!(cinfo["parent"]["image"], image_of(&a), "{cinfo}");
    let user: Vec<_> =
        ceph.snaps(&image_of(&a)).into_iter().filter(|(_, ns)| ns == "user").collect();
    assert_eq!(user.len(), 1, "only the CSI snapshot is visible: {user:?}");
    assert_eq!(ceph.images().len(), 4, "no temporary images: {:?}", ceph.images());

    // Get and list (page by page) answer exactly these volumes.
    let got =
        k.c.controller_get_volume(csi::ControllerGetVolumeRequest { volume_id: a.clone() })
            .await
            .unwrap();
    assert_eq!(got.into_inner().volume.unwrap().capacity_bytes, 64 * MIB);
    let mut listed = vec![];
    let mut token = String::new();
    loop {
        let page =
            k.c.list_volumes(csi::ListVolumesRequest { max_entries: 1, starting_token: token })
                .await
                .unwrap()
                .into_inner();
        assert!(page.entries.len() <= 1);
        listed.extend(page.entries.into_iter().map(|e| e.volume.unwrap().volume_id));
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    let mut want = vec![a.clone(), b.clone(), r.volume_id.clone(), c.clone()];
    want.sort();
    listed.sort();
    assert_eq!(listed, want);
    let e = k
        .c
        .list_volumes(csi::ListVolumesRequest { max_entries: 1, starting_token: "bogus".into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Aborted);
    let snaps =
        k.c.list_snapshots(csi::ListSnapshotsRequest {
            source_volume_id: a.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(snaps.entries.len(), 1);

    // Expansion happens in the controller; the node grows the filesystem.
    let grown =
        k.c.controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: b.clone(),
            capacity_range: req::range(32 * MIB, 0),
            volume_capability: Some(req::mount_cap("ext4")),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(grown.capacity_bytes, 32 * MIB);
    assert!(grown.node_expansion_required);
    assert_eq!(
        ceph.json("rbd", &["info", &format!("{}/{}", ceph.pool, image_of(&b))])["size"],
        32 * MIB
    );

    // A deleted volume's snapshot lives on and still restores.
    k.c.delete_volume(req::delete(&a)).await.unwrap();
    k.c.delete_volume(req::delete(&a)).await.unwrap();
    let e =
        k.c.controller_get_volume(csi::ControllerGetVolumeRequest { volume_id: a.clone() })
            .await
            .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let listed = k.c.list_snapshots(csi::ListSnapshotsRequest::default()).await.unwrap();
    let listed: Vec<String> =
        listed.into_inner().entries.into_iter().map(|e| e.snapshot.unwrap().snapshot_id).collect();
    assert_eq!(listed, vec![s.clone()], "the deleted volume's snapshot is still listed");
    let again = csi::CreateVolumeRequest {
        parameters: ceph.params("layering"),
        ..req::from_snapshot("pvc-r2", &s, 64 * MIB)
    };
    let r2 = k.c.create_volume(again).await.unwrap().into_inner().volume.unwrap().volume_id;
    let got =
        k.c.get_snapshot(csi::GetSnapshotRequest { snapshot_id: s.clone(), ..Default::default() })
            .await
            .unwrap();
    assert_eq!(
        got.into_inner().snapshot.unwrap().source_volume_id,
        a,
        "the snapshot still names its volume"
    );

    // Deleting everything, in any order, leaves nothing: the deleted
    // volume's image goes with the last thing that needs it.
    for id in [&s] {
        k.c.delete_snapshot(req::delete_snapshot(id)).await.unwrap();
    }
    for id in [&r.volume_id, &c, &b, &r2] {
        k.c.delete_volume(req::delete(id)).await.unwrap();
    }
    k.c.delete_snapshot(req::delete_snapshot(&s)).await.unwrap();
    ceph.assert_clean();
    drop(d);
}

#[tokio::test]
async fn rbd_publish_enforces_single_node_modes_across_replicas() {
    let Some(ceph) = ceph("publish") else { return };
    // Two controller replicas: the record lives with the image, so either
    // one enforces what the other granted.
    let d1 = ceph.driver("d1", "ctl-1", &["--mode", "controller"]).start();
    let d2 = ceph.driver("d2", "ctl-2", &["--mode", "controller"]).start();
    let (mut k1, mut k2) = (clients(&d1).await, clients(&d2).await);
    let v = new_volume(&mut k1, &ceph, "pvc-rwo", 16 * MIB).await;

    let ctx =
        k1.c.controller_publish_volume(publish(&v, "node-a", Mode::SingleNodeWriter, false))
            .await
            .unwrap();
    assert_eq!(ctx.into_inner().publish_context.get("exclusive").map(String::as_str), Some("true"));
    // Again: the same answer.
    k2.c.controller_publish_volume(publish(&v, "node-a", Mode::SingleNodeWriter, false))
        .await
        .unwrap();
    let e =
        k2.c.controller_publish_volume(publish(&v, "node-b", Mode::SingleNodeWriter, false))
            .await
            .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let e =
        k1.c.controller_publish_volume(publish(&v, "node-a", Mode::SingleNodeReaderOnly, false))
            .await
            .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    let got =
        k2.c.controller_get_volume(csi::ControllerGetVolumeRequest { volume_id: v.clone() })
            .await
            .unwrap();
    assert_eq!(got.into_inner().status.unwrap().published_node_ids, vec!["node-a".to_string()]);

    let unpub = |node: &str| unpublish(&v, node);
    k2.c.controller_unpublish_volume(unpub("node-a")).await.unwrap();
    k2.c.controller_unpublish_volume(unpub("node-a")).await.unwrap();
    k1.c.controller_publish_volume(publish(&v, "node-b", Mode::SingleNodeWriter, false))
        .await
        .unwrap();
    k1.c.controller_unpublish_volume(unpub("node-b")).await.unwrap();

    // Raw block volumes may be shared by several nodes; filesystems not.
    let b = block_volume(&mut k1, &ceph, "pvc-rwx", 16 * MIB).await;
    for node in ["node-a", "node-b"] {
        let ctx =
            k1.c.controller_publish_volume(publish(&b, node, Mode::MultiNodeMultiWriter, true))
                .await
                .unwrap();
        assert_eq!(
            ctx.into_inner().publish_context.get("exclusive").map(String::as_str),
            Some("false")
        );
    }
    let e =
        k1.c.controller_publish_volume(publish(&v, "node-a", Mode::MultiNodeMultiWriter, false))
            .await
            .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    // A volume that is gone was unpublished.
    let gone = "rbd:nopool:csi-vol-00000000000000000000000000000000";
    k1.c.controller_unpublish_volume(unpublish(gone, "node-a")).await.unwrap();
    let e =
        k1.c.controller_publish_volume(publish(gone, "node-a", Mode::SingleNodeWriter, false))
            .await
            .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    for id in [&v, &b] {
        k1.c.delete_volume(req::delete(id)).await.unwrap();
    }
    ceph.assert_clean();
    drop((d1, d2));
}

/// Stages and publishes a volume on a node as `cap` says; answers the
/// staging path and the target.
async fn stage_publish(
    k: &mut Clients,
    ceph: &Ceph,
    id: &str,
    pv: &str,
    cap: csi::VolumeCapability,
) -> (PathBuf, PathBuf) {
    let (staging, target) = (ceph.staging(pv), ceph.target("app", pv));
    k.n.node_stage_volume(stage_req(id, &staging, cap.clone())).await.unwrap();
    k.n.node_publish_volume(publish_req(id, &staging, &target, cap, false)).await.unwrap();
    (staging, target)
}

/// Stages and publishes a filesystem volume on a node.
async fn mount(k: &mut Clients, ceph: &Ceph, id: &str, pv: &str, fs: &str) -> (PathBuf, PathBuf) {
    stage_publish(k, ceph, id, pv, req::mount_cap(fs)).await
}

/// A new raw block volume.
async fn block_volume(k: &mut Clients, ceph: &Ceph, name: &str, size: i64) -> String {
    let r = csi::CreateVolumeRequest {
        volume_capabilities: vec![req::block_cap()],
        ..ceph.create(name, size)
    };
    k.c.create_volume(r).await.unwrap().into_inner().volume.unwrap().volume_id
}

async fn unmount(k: &mut Clients, id: &str, staging: &Path, target: &Path) {
    k.n.node_unpublish_volume(unpublish_req(id, target)).await.unwrap();
    k.n.node_unstage_volume(unstage_req(id, staging)).await.unwrap();
}

/// rbd-fuse and a loop device serve a mounted volume; the node container
/// is stopped as a runtime stops it (every process of its cgroup killed,
/// the driver included), and rbd-fuse, started with `--helper-cgroup` in a
/// cgroup of the host's, lives on with the pod's mount; the restarted
/// driver finds the mapping.
#[tokio::test]
async fn rbd_node_maps_with_rbd_fuse_and_survives_its_container() {
    let Some(ceph) = ceph("node") else { return };
    let cg = common::Cgroups::new("rbd-node");
    let outside = ["--helper-cgroup".to_string(), cg.helpers.display().to_string()];
    let outside: Vec<&str> = outside.iter().map(String::as_str).collect();
    let builder = || ceph.driver("d", "node-a", &outside);
    let mut d = cg.containerised(builder());
    let mut k = clients(&d).await;
    let v = new_volume(&mut k, &ceph, "pvc-n", 64 * MIB).await;
    let (staging, target) = mount(&mut k, &ceph, &v, "pv-n", "ext4").await;
    std::fs::write(target.join("data"), b"written before the restart").unwrap();
    let helpers = ceph.helpers();
    assert_eq!(helpers.len(), 1, "one rbd-fuse helper per mapped image");
    let loops = ceph.loops();
    assert_eq!(loops.len(), 1);

    // The container dies; the helper (its own session, a cgroup outside)
    // and the mount do not.
    assert!(common::Cgroups::of(helpers[0]).ends_with("/helpers"));
    cg.kill_container();
    assert!(!d.wait().success(), "the driver was killed with its container");
    assert_eq!(ceph.helpers(), helpers, "the helper outlived the container");
    std::fs::write(target.join("more"), b"written while the driver was down").unwrap();

    d = cg.containerised(builder());
    let mut k = clients(&d).await;
    // The kubelet retries the stage: the same device, no second helper.
    k.n.node_stage_volume(stage_req(&v, &staging, req::mount_cap("ext4"))).await.unwrap();
    assert_eq!(ceph.helpers(), helpers);
    assert_eq!(
        ceph.loops().iter().map(|l| &l.device).collect::<Vec<_>>(),
        loops.iter().map(|l| &l.device).collect::<Vec<_>>()
    );
    let stats = k.n.node_get_volume_stats(req::stats(&v, &target)).await.unwrap().into_inner();
    assert!(!stats.usage.is_empty());

    // Deleting a mapped volume is refused while its helper has it open.
    let e = k.c.delete_volume(req::delete(&v)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");

    unmount(&mut k, &v, &staging, &target).await;
    assert!(ceph.helpers().is_empty(), "unstage stopped the helper");
    assert!(ceph.loops().is_empty());
    // The data went to Ceph: a restore of a snapshot shows it.
    let s = snapshot(&mut k, "snap-n", &v).await;
    let r = csi::CreateVolumeRequest {
        parameters: ceph.params("layering"),
        ..req::from_snapshot("pvc-n2", &s, 64 * MIB)
    };
    let r = k.c.create_volume(r).await.unwrap().into_inner().volume.unwrap().volume_id;
    let (st2, tg2) = mount(&mut k, &ceph, &r, "pv-n2", "ext4").await;
    assert_eq!(std::fs::read(tg2.join("data")).unwrap(), b"written before the restart");
    assert_eq!(std::fs::read(tg2.join("more")).unwrap(), b"written while the driver was down");
    unmount(&mut k, &r, &st2, &tg2).await;
    k.c.delete_volume(req::delete(&r)).await.unwrap();
    k.c.delete_snapshot(req::delete_snapshot(&s)).await.unwrap();
    k.c.delete_volume(req::delete(&v)).await.unwrap();
    ceph.assert_clean();
    drop(d);
}

#[tokio::test]
async fn rbd_online_expansion_grows_a_mounted_filesystem() {
    let Some(ceph) = ceph("expand") else { return };
    let d = ceph.driver("d", "node-a", &[]).start();
    let mut k = clients(&d).await;
    let r = csi::CreateVolumeRequest {
        volume_capabilities: vec![req::mount_cap("xfs")],
        ..ceph.create("pvc-x", 320 * MIB)
    };
    let v = k.c.create_volume(r).await.unwrap().into_inner().volume.unwrap().volume_id;
    let (staging, target) = mount(&mut k, &ceph, &v, "pv-x", "xfs").await;
    let size = |p: &Path| rustix::fs::statvfs(p).map(|s| s.f_blocks * s.f_frsize).unwrap();
    let before = size(&target);
    let grown =
        k.c.controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: v.clone(),
            capacity_range: req::range(640 * MIB, 0),
            volume_capability: Some(req::mount_cap("xfs")),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(grown.node_expansion_required);
    let out =
        k.n.node_expand_volume(csi::NodeExpandVolumeRequest {
            volume_id: v.clone(),
            volume_path: target.display().to_string(),
            staging_target_path: staging.display().to_string(),
            capacity_range: req::range(640 * MIB, 0),
            volume_capability: Some(req::mount_cap("xfs")),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(out.capacity_bytes, 640 * MIB);
    let after = size(&target);
    assert!(after > before + 250 * MIB as u64, "the mounted filesystem grew: {before} -> {after}");
    unmount(&mut k, &v, &staging, &target).await;
    k.c.delete_volume(req::delete(&v)).await.unwrap();
    ceph.assert_clean();
    drop(d);
}

/// Restores each snapshot, mounts it and answers the last sequence number
/// its log holds; everything restored is removed again.
async fn restored_seqs(k: &mut Clients, ceph: &Ceph, snaps: &[String], tag: &str) -> Vec<u64> {
    let mut seqs = vec![];
    for (i, s) in snaps.iter().enumerate() {
        let r = csi::CreateVolumeRequest {
            parameters: ceph.params("layering"),
            ..req::from_snapshot(&format!("{tag}-{i}"), s, 64 * MIB)
        };
        let r = k.c.create_volume(r).await.unwrap().into_inner().volume.unwrap().volume_id;
        let (st, tg) = mount(k, ceph, &r, &format!("pv-{tag}-{i}"), "ext4").await;
        seqs.push(last_seq(&tg.join("log")));
        unmount(k, &r, &st, &tg).await;
        k.c.delete_volume(req::delete(&r)).await.unwrap();
    }
    seqs
}

#[tokio::test]
async fn rbd_group_snapshots_are_one_instant_and_members_restore() {
    let Some(ceph) = ceph("group") else { return };
    let d = ceph.driver("d", "node-a", &[]).start();
    let mut k = clients(&d).await;
    let mut vols = vec![];
    for i in 0..2 {
        let v = new_volume(&mut k, &ceph, &format!("pvc-g{i}"), 64 * MIB).await;
        let (st, tg) = mount(&mut k, &ceph, &v, &format!("pv-g{i}"), "ext4").await;
        vols.push((v, st, tg));
    }
    let ids: Vec<String> = vols.iter().map(|v| v.0.clone()).collect();
    let group_req = |name: &str, ids: &[String]| csi::CreateVolumeGroupSnapshotRequest {
        name: name.into(),
        source_volume_ids: ids.to_vec(),
        ..Default::default()
    };

    // One group snapshot while the writer runs...
    let writer = Lockstep::start_durable(&vols);
    let g =
        k.g.create_volume_group_snapshot(group_req("group-1", &ids))
            .await
            .unwrap()
            .into_inner()
            .group_snapshot
            .unwrap();
    // ...and, for contrast, two single snapshots one after the other, the
    // writer at least two steps further on at the second.
    let mut singles = vec![];
    for (i, id) in ids.iter().enumerate() {
        if i > 0 {
            writer.advance(3);
        }
        singles.push(snapshot(&mut k, &format!("single-{i}"), id).await);
    }
    let steps = writer.stop();
    assert!(steps > 20);

    assert_eq!(g.snapshots.len(), 2);
    assert!(g
        .snapshots
        .iter()
        .all(|s| s.group_snapshot_id == g.group_snapshot_id && s.ready_to_use));
    let again =
        k.g.create_volume_group_snapshot(group_req("group-1", &ids))
            .await
            .unwrap()
            .into_inner()
            .group_snapshot
            .unwrap();
    assert_eq!(again.group_snapshot_id, g.group_snapshot_id);
    let e = k.g.create_volume_group_snapshot(group_req("group-1", &ids[..1])).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    let member =
        g.snapshots.iter().find(|s| s.source_volume_id == ids[0]).unwrap().snapshot_id.clone();
    let e = k.c.delete_snapshot(req::delete_snapshot(&member)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "a member goes with its group");
    let listed =
        k.c.list_snapshots(csi::ListSnapshotsRequest {
            snapshot_id: member.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        listed.into_inner().entries[0].snapshot.as_ref().unwrap().group_snapshot_id,
        g.group_snapshot_id
    );

    // Members restore (on Pacific by a full copy) within one step of each
    // other; the single snapshots, taken apart, do not.
    let members: Vec<String> = ids
        .iter()
        .map(|id| {
            g.snapshots.iter().find(|s| &s.source_volume_id == id).unwrap().snapshot_id.clone()
        })
        .collect();
    let group_seqs = restored_seqs(&mut k, &ceph, &members, "rg").await;
    let single_seqs = restored_seqs(&mut k, &ceph, &singles, "rs").await;
    let (a, b) = (group_seqs[0], group_seqs[1]);
    assert!(
        a > 0 && (a == b || a == b + 1),
        "group members agree: {group_seqs:?} of {steps} steps"
    );
    let (a, b) = (single_seqs[0], single_seqs[1]);
    assert!(b > a + 1, "separate snapshots see different instants: {single_seqs:?} of {steps}");
    eprintln!("group members {group_seqs:?}, separate snapshots {single_seqs:?}, of {steps} steps");

    // CBT on a member: its allocated blocks list; a member as a base of a
    // delta is refused (librbd diffs from user snapshots only).
    let req_alloc =
        csi::GetMetadataAllocatedRequest { snapshot_id: members[0].clone(), ..Default::default() };
    let mut stream = k.m.get_metadata_allocated(req_alloc).await.unwrap().into_inner();
    let mut ranges = 0;
    while let Some(msg) = stream.message().await.unwrap() {
        ranges += msg.block_metadata.len();
    }
    assert!(ranges > 0);
    let delta = csi::GetMetadataDeltaRequest {
        base_snapshot_id: members[0].clone(),
        target_snapshot_id: singles[0].clone(),
        ..Default::default()
    };
    let e = match k.m.get_metadata_delta(delta).await {
        Err(e) => e,
        Ok(s) => s.into_inner().message().await.unwrap_err(),
    };
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");

    k.g.delete_volume_group_snapshot(csi::DeleteVolumeGroupSnapshotRequest {
        group_snapshot_id: g.group_snapshot_id.clone(),
        snapshot_ids: members.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    for (v, st, tg) in &vols {
        let group_snaps: Vec<_> =
            ceph.snaps(&image_of(v)).into_iter().filter(|(_, ns)| ns == "group").collect();
        assert!(group_snaps.is_empty(), "{group_snaps:?}");
        unmount(&mut k, v, st, tg).await;
    }
    for s in &singles {
        k.c.delete_snapshot(req::delete_snapshot(s)).await.unwrap();
    }
    for v in &ids {
        k.c.delete_volume(req::delete(v)).await.unwrap();
    }
    ceph.assert_clean();
    drop(d);
}

#[tokio::test]
async fn rbd_changed_blocks_come_from_rbd_diffs() {
    let Some(ceph) = ceph("cbt") else { return };
    let d = ceph.driver("d", "node-a", &[]).start();
    let mut k = clients(&d).await;
    let v = block_volume(&mut k, &ceph, "pvc-b", 32 * MIB).await;
    let (staging, target) = stage_publish(&mut k, &ceph, &v, "pv-b", req::block_cap()).await;
    let write = |off: u64| {
        let f = std::fs::OpenOptions::new().write(true).open(&target).unwrap();
        f.write_all_at(&[0xab; 4096], off).unwrap();
        f.sync_all().unwrap();
    };
    write(MIB as u64);
    let s1 = snapshot(&mut k, "s1", &v).await;
    write(20 * MIB as u64);
    let s2 = snapshot(&mut k, "s2", &v).await;

    let covers = |ranges: &[(u64, u64)], off: u64| {
        ranges.iter().any(|(o, l)| *o <= off && off + 4096 <= o + l)
    };
    let collect = |msgs: Vec<csi::BlockMetadata>| {
        msgs.iter().map(|b| (b.byte_offset as u64, b.size_bytes as u64)).collect::<Vec<_>>()
    };
    let mut alloc = vec![];
    let mut s =
        k.m.get_metadata_allocated(csi::GetMetadataAllocatedRequest {
            snapshot_id: s1.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    while let Some(m) = s.message().await.unwrap() {
        assert_eq!(m.volume_capacity_bytes, 32 * MIB);
        alloc.extend(collect(m.block_metadata));
    }
    assert!(covers(&alloc, MIB as u64), "{alloc:?}");
    assert!(!covers(&alloc, 20 * MIB as u64), "{alloc:?}");
    let mut delta = vec![];
    let mut s =
        k.m.get_metadata_delta(csi::GetMetadataDeltaRequest {
            base_snapshot_id: s1.clone(),
            target_snapshot_id: s2.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    while let Some(m) = s.message().await.unwrap() {
        delta.extend(collect(m.block_metadata));
    }
    assert!(covers(&delta, 20 * MIB as u64), "{delta:?}");
    assert!(
        !delta.iter().any(|(o, l)| *o < MIB as u64 + 4096 && MIB as u64 <= o + l),
        "the unchanged block is not in the delta: {delta:?}"
    );

    k.n.node_unpublish_volume(unpublish_req(&v, &target)).await.unwrap();
    k.n.node_unstage_volume(unstage_req(&v, &staging)).await.unwrap();
    for s in [&s1, &s2] {
        k.c.delete_snapshot(req::delete_snapshot(s)).await.unwrap();
    }
    k.c.delete_volume(req::delete(&v)).await.unwrap();
    ceph.assert_clean();
    drop(d);
}

#[tokio::test]
async fn rbd_a_dead_nodes_lock_is_broken_when_the_volume_moves() {
    let Some(ceph) = ceph("fence") else { return };
    let d = ceph.driver("d", "node-a", &[]).start();
    let mut k = clients(&d).await;
    let v = new_volume(&mut k, &ceph, "pvc-f", 64 * MIB).await;
    let image = format!("{}/{}", ceph.pool, image_of(&v));
    let staging = ceph.staging("pv-f");
    publish_and_stage(&mut k, &v, "node-a", &staging).await;
    std::fs::write(staging.join("f"), b"x").unwrap();
    rustix::fs::sync();
    let owner = ceph.json("rbd", &["lock", "ls", &image]);
    assert_eq!(owner.as_array().map(Vec::len), Some(1), "the writer holds the lock: {owner}");

    // node-a dies with the image mapped: its helper is gone, its lock is
    // not. The CO moves the volume (unpublish, publish elsewhere).
    for pid in ceph.helpers() {
        rustix::process::kill_process(
            rustix::process::Pid::from_raw(pid).unwrap(),
            rustix::process::Signal::KILL,
        )
        .unwrap();
    }
    // node-a's driver (if it still ran) says so rather than "healthy".
    let stats = k.n.node_get_volume_stats(req::stats(&v, &staging)).await;
    let condition = stats.map(|s| s.into_inner().volume_condition.unwrap_or_default());
    assert!(
        condition.as_ref().map_or(true, |c| c.abnormal),
        "a dead helper is reported: {condition:?}"
    );
    ceph.release_host();
    let dead = owner[0]["address"].as_str().unwrap().to_string();
    k.c.controller_unpublish_volume(unpublish(&v, "node-a")).await.unwrap();
    let d2 = ceph.driver("d2", "node-b", &[]).start();
    let mut k2 = clients(&d2).await;
    let staging_b = ceph.staging("pv-f-b");
    publish_and_stage(&mut k2, &v, "node-b", &staging_b).await;
    let blocklist = ceph.tool("ceph", &["osd", "blocklist", "ls"]);
    assert!(blocklist.contains(&dead), "the dead client {dead} is fenced: {blocklist}");
    assert_eq!(std::fs::read(staging_b.join("f")).unwrap(), b"x");
    std::fs::write(staging_b.join("g"), b"y").unwrap();
    rustix::fs::sync();

    // A volume without the exclusive-lock feature has no lock to break:
    // it maps all the same.
    let plain = csi::CreateVolumeRequest {
        parameters: ceph.params("layering"),
        ..req::create("pvc-plain", 16 * MIB)
    };
    let plain = k2.c.create_volume(plain).await.unwrap().into_inner().volume.unwrap().volume_id;
    let staging_p = ceph.staging("pv-plain");
    publish_and_stage(&mut k2, &plain, "node-b", &staging_p).await;
    k2.n.node_unstage_volume(unstage_req(&plain, &staging_p)).await.unwrap();
    k2.c.controller_unpublish_volume(unpublish(&plain, "node-b")).await.unwrap();
    k2.c.delete_volume(req::delete(&plain)).await.unwrap();

    k2.n.node_unstage_volume(unstage_req(&v, &staging_b)).await.unwrap();
    // node-a's stale state dir is this test's to clear (a dead node's is
    // gone with it).
    let _ = std::fs::remove_dir_all(d.state_dir.join("rbd"));
    k2.c.controller_unpublish_volume(unpublish(&v, "node-b")).await.unwrap();
    k2.c.delete_volume(req::delete(&v)).await.unwrap();
    let _ = ceph.tool("ceph", &["osd", "blocklist", "rm", &dead]);
    ceph.assert_clean();
    drop((d, d2));
}

#[tokio::test]
async fn rbd_long_clone_chains_are_flattened_and_half_made_images_adopted() {
    let Some(ceph) = ceph("chain") else { return };
    let d =
        ceph.driver("d", "node-a", &["--mode", "controller", "--rbd-max-clone-depth", "1"]).start();
    let mut k = clients(&d).await;
    let a = new_volume(&mut k, &ceph, "pvc-0", 16 * MIB).await;
    let clone = |name: &str, from: &str| csi::CreateVolumeRequest {
        parameters: ceph.params("layering"),
        ..req::from_volume(name, from, 16 * MIB)
    };
    let b =
        k.c.create_volume(clone("pvc-1", &a)).await.unwrap().into_inner().volume.unwrap().volume_id;
    let c =
        k.c.create_volume(clone("pvc-2", &b)).await.unwrap().into_inner().volume.unwrap().volume_id;
    // A clone of pvc-2 while its flatten may run: ABORTED (retried) until
    // the flatten is done, never NOT_FOUND.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let d2 = loop {
        match k.c.create_volume(clone("pvc-3", &c)).await {
            Ok(r) => break r.into_inner().volume.unwrap().volume_id,
            Err(e) => assert_eq!(e.code(), Code::Aborted, "{e:?}"),
        }
        assert!(std::time::Instant::now() < deadline, "the flatten never ended");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    k.c.delete_volume(req::delete(&d2)).await.unwrap();
    let parent = |v: &str| {
        ceph.json("rbd", &["info", &format!("{}/{}", ceph.pool, image_of(v))])["parent"].clone()
    };
    assert!(parent(&b).is_object(), "depth 1 stays a clone");
    // Depth 2 is past the limit: flattened in the background. Waited for
    // (the condition itself), within a bound that only a hang exceeds.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while parent(&c).is_object() {
        assert!(std::time::Instant::now() < deadline, "never flattened: {}", parent(&c));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    // A crash after the image was made but before it was committed leaves
    // an image without our attributes: the retry finishes it.
    let image =
        format!("csi-vol-{}", uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, b"pvc-half").simple());
    ceph.tool("rbd", &["create", "--size", "16M", &format!("{}/{image}", ceph.pool)]);
    let listed = k.c.list_volumes(csi::ListVolumesRequest::default()).await.unwrap().into_inner();
    assert_eq!(listed.entries.len(), 3, "a half-made image is not a volume yet");
    let h = new_volume(&mut k, &ceph, "pvc-half", 16 * MIB).await;
    assert_eq!(image_of(&h), image);
    let listed = k.c.list_volumes(csi::ListVolumesRequest::default()).await.unwrap().into_inner();
    assert_eq!(listed.entries.len(), 4);

    for v in [&c, &b, &a, &h] {
        k.c.delete_volume(req::delete(v)).await.unwrap();
    }
    ceph.assert_clean();
    drop(d);
}

#[tokio::test]
async fn rbd_secrets_carry_the_credentials_and_are_never_logged() {
    let Some(ceph) = ceph("secrets") else { return };
    let d = ceph.driver("d", "node-a", &[]).start();
    let mut k = clients(&d).await;
    let key = ceph.tool("ceph", &["auth", "get-key", "client.admin"]);
    let with = |id: &str, key: &str| {
        let mut r = ceph.create("pvc-s", 16 * MIB);
        r.secrets = [("adminID", id), ("adminKey", key)]
            .into_iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        r
    };
    let v =
        k.c.create_volume(with("admin", key.trim()))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap()
            .volume_id;
    // A key the cluster refuses (malformed, or another's) is
    // UNAUTHENTICATED; a user whose caps do not reach the pool is
    // PERMISSION_DENIED; half a pair is the caller's to fix.
    let e =
        k.c.create_volume(with("admin", "AQBnotakeynotakeynotakeynotakeynotake=="))
            .await
            .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let stranger = std::process::Command::new("ceph-authtool").arg("--gen-print-key").output();
    let stranger = String::from_utf8_lossy(&stranger.unwrap().stdout).trim().to_string();
    let e = k.c.create_volume(with("admin", &stranger)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let capless = format!("client.t-capless-{}", std::process::id());
    let capless_key = ceph.tool(
        "ceph",
        &[
            "auth",
            "get-or-create-key",
            &capless,
            "mon",
            "profile rbd",
            "osd",
            "profile rbd pool=elsewhere",
        ],
    );
    let user = capless.trim_start_matches("client.").to_string();
    let e = k.c.create_volume(with(&user, capless_key.trim())).await.unwrap_err();
    ceph.tool("ceph", &["auth", "del", &capless]);
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let mut half = ceph.create("pvc-s", 16 * MIB);
    half.secrets = [("adminID".to_string(), "admin".to_string())].into();
    assert_eq!(k.c.create_volume(half).await.unwrap_err().code(), Code::InvalidArgument);
    // The node maps with the stage secret's user: the helper gets the key
    // in a file only root can read, never on its command line.
    let staging = ceph.staging("pv-s");
    let mut stage = stage_req(&v, &staging, req::mount_cap("ext4"));
    stage.secrets = [("userID", "admin"), ("userKey", key.trim())]
        .into_iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    k.n.node_stage_volume(stage).await.unwrap();
    let helpers = ceph.helpers();
    assert_eq!(helpers.len(), 1);
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", helpers[0])).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(!cmdline.contains(key.trim()) && cmdline.contains("--keyfile"), "{cmdline}");
    let keyfile = cmdline.split("--keyfile ").nth(1).unwrap().split(' ').next().unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(keyfile).unwrap().permissions().mode() & 0o777, 0o600);
    k.n.node_unstage_volume(unstage_req(&v, &staging)).await.unwrap();
    assert!(!Path::new(keyfile).exists(), "the key file goes with the mapping");

    // The pool's capacity as the mgr reports it; without a mgr (a cluster
    // started without --mgr) unknown, not zero.
    let capacity = k.c.get_capacity(csi::GetCapacityRequest {
        parameters: ceph.params("layering"),
        ..Default::default()
    });
    let mgr = ceph.json("ceph", &["mgr", "stat"])["available"] == true;
    match capacity.await {
        Ok(c) if mgr => assert!(c.get_ref().available_capacity > 0, "{c:?}"),
        Err(e) if !mgr => assert_eq!(e.code(), Code::Unavailable, "{e:?}"),
        other => panic!("capacity with a mgr {mgr}: {other:?}"),
    }

    let mut del = req::delete(&v);
    del.secrets = [("adminID", "admin"), ("adminKey", key.trim())]
        .into_iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    k.c.delete_volume(del).await.unwrap();
    assert!(!d.logs().contains(key.trim()), "a key reached the log");
    ceph.assert_clean();
    drop(d);
}

/// The controller's own client (Probe, listings, requests without
/// secrets) from the Secret the operator already made, mounted as files
/// (`--ceph-secret-dir`): the shipped manifests passed no credential, so
/// Probe connected as client.admin, failed, and the liveness probe
/// restarted the driver in a loop. A wrong key in it makes Probe fail
/// (it is the one used), and no key reaches the log.
#[tokio::test]
async fn rbd_the_controller_uses_the_mounted_secret_for_its_own_calls() {
    let Some(ceph) = ceph("secretdir") else { return };
    let user = format!("t-secretdir-{}", std::process::id());
    let pool_caps = format!("profile rbd pool={}", ceph.pool);
    let key = ceph.tool(
        "ceph",
        &[
            "auth",
            "get-or-create-key",
            &format!("client.{user}"),
            "mon",
            "profile rbd",
            "osd",
            &pool_caps,
        ],
    );
    let key = key.trim().to_string();
    let secret = |name: &str, key: &str| {
        let dir = ceph.root.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for (file, value) in [("adminID", user.as_str()), ("adminKey", key)] {
            std::fs::write(dir.join(file), value).unwrap();
        }
        dir.display().to_string()
    };
    let bad = secret("bad-secret", "AQBnotakeynotakeynotakeynotakeynotake==");
    let d = ceph.driver("b", "ctl", &["--mode", "controller", "--ceph-secret-dir", &bad]).start();
    let e = IdentityClient::new(d.channel().await).probe(csi::ProbeRequest {}).await;
    assert!(!matches!(e, Ok(ref r) if r.get_ref().ready != Some(false)), "{e:?}");
    drop(d);

    let good = secret("good-secret", &key);
    let d = ceph.driver("d", "ctl", &["--mode", "controller", "--ceph-secret-dir", &good]).start();
    let ch = d.channel().await;
    let probe = IdentityClient::new(ch.clone()).probe(csi::ProbeRequest {}).await.unwrap();
    assert_ne!(probe.into_inner().ready, Some(false));
    let mut c = ControllerClient::new(ch);
    let v = c.create_volume(ceph.create("pvc-d", 16 * MIB)).await.unwrap().into_inner().volume;
    let v = v.unwrap().volume_id;
    assert_eq!(ceph.images().len(), 1);
    c.delete_volume(req::delete(&v)).await.unwrap();
    // The purger (the same client) empties the trash while it runs.
    ceph.assert_clean();
    assert!(!d.logs().contains(&key), "a key reached the log");
    drop(d);
    ceph.tool("ceph", &["auth", "del", &format!("client.{user}")]);
}

/// `scripts/ceph-dev-cluster --addr` binds the cluster where pods can
/// reach it (it was 127.0.0.1 only, so the documented throw-away cluster
/// could serve no pod): the monitor listens on the address asked for and
/// not on 127.0.0.1, clients reach it there, and an address this host does
/// not have is refused at once.
#[tokio::test]
async fn rbd_the_dev_cluster_binds_the_address_asked_for() {
    if ceph("devaddr").is_none() {
        return;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/ceph-dev-cluster");
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("c");
    let run = |args: &[&str]| std::process::Command::new(script).args(args).output().unwrap();
    let refused = run(&["start", dir.to_str().unwrap(), "--addr", "192.0.2.77"]);
    assert!(!refused.status.success() && !dir.exists(), "{refused:?}");

    struct Stop<'a>(&'a Path, &'static str);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new(self.1).arg("stop").arg(self.0).status();
        }
    }
    let started = run(&["start", dir.to_str().unwrap(), "--addr", "127.0.0.2"]);
    let _stop = Stop(&dir, script);
    assert!(started.status.success(), "{}", String::from_utf8_lossy(&started.stderr));
    let conf = std::fs::read_to_string(dir.join("ceph.conf")).unwrap();
    let mon_host = conf.lines().find(|l| l.starts_with("mon host")).unwrap();
    assert!(mon_host.contains("v2:127.0.0.2:") && !mon_host.contains("127.0.0.1"), "{mon_host}");
    let port = mon_host.split("v2:127.0.0.2:").nth(1).unwrap().split(',').next().unwrap();
    let listening = std::process::Command::new("ss").args(["-Hltn"]).output().unwrap();
    let listening = String::from_utf8_lossy(&listening.stdout);
    assert!(listening.contains(&format!("127.0.0.2:{port} ")), "{listening}");
    assert!(!listening.contains(&format!("127.0.0.1:{port} ")), "{listening}");
    let status = std::process::Command::new("ceph")
        .args(["-c", dir.join("ceph.conf").to_str().unwrap(), "osd", "stat"])
        .output()
        .unwrap();
    assert!(status.status.success(), "{status:?}");
}

/// An image that holds data without a filesystem signature (random bytes
/// written through a raw block stage) is never formatted when staged as a
/// filesystem later: the image's own extents say it was written.
#[tokio::test]
async fn rbd_data_without_a_signature_is_never_formatted() {
    let Some(ceph) = ceph("noformat") else { return };
    let d = ceph.driver("d", "node-a", &[]).start();
    let mut k = clients(&d).await;
    let v = block_volume(&mut k, &ceph, "pvc-raw", 32 * MIB).await;
    let (staging, target) = stage_publish(&mut k, &ceph, &v, "pv-raw", req::block_cap()).await;
    let mut rng = common::Rng(7);
    let data: Vec<u8> = (0..MIB).map(|_| rng.next() as u8).collect();
    {
        let f = std::fs::OpenOptions::new().write(true).open(&target).unwrap();
        f.write_all_at(&data, 2 * MIB as u64).unwrap();
        f.sync_all().unwrap();
    }
    unmount(&mut k, &v, &staging, &target).await;

    let e = k.n.node_stage_volume(stage_req(&v, &staging, req::mount_cap("ext4"))).await;
    let e = e.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("no filesystem signature"), "{e:?}");
    // Still the same bytes, read back through a fresh raw stage.
    stage_publish(&mut k, &ceph, &v, "pv-raw", req::block_cap()).await;
    let mut back = vec![0u8; MIB as usize];
    std::fs::File::open(&target).unwrap().read_exact_at(&mut back, 2 * MIB as u64).unwrap();
    assert!(back == data, "the data is untouched");
    unmount(&mut k, &v, &staging, &target).await;
    k.c.delete_volume(req::delete(&v)).await.unwrap();
    ceph.assert_clean();
    drop(d);
}

/// Stops under load end cleanly: SIGTERM while creates, snapshots and
/// deletes (and so the purger) are in flight, again and again, and every
/// stop exits 0. The driver aborted in Ceph's own teardown (librados'
/// global state destroyed by the exit under calls still running) in about
/// 1 stop of 10.
#[tokio::test(flavor = "multi_thread")]
async fn rbd_stops_under_load_never_crash() {
    let Some(ceph) = ceph("stops") else { return };
    for round in 0..12 {
        let mut d = ceph.driver(&format!("d{round}"), "node-a", &["--mode", "controller"]).start();
        let ch = d.channel().await;
        let mut work = tokio::task::JoinSet::new();
        for k in 0..4 {
            let mut c = ControllerClient::new(ch.clone());
            let r = ceph.create(&format!("pvc-{round}-{k}"), 16 * MIB);
            work.spawn(async move {
                let v = c.create_volume(r).await?.into_inner().volume.unwrap().volume_id;
                let s = c.create_snapshot(req::snapshot(&format!("s-{v}"), &v)).await?;
                let s = s.into_inner().snapshot.unwrap().snapshot_id;
                c.delete_snapshot(req::delete_snapshot(&s)).await?;
                c.delete_volume(req::delete(&v)).await?;
                Ok::<_, tonic::Status>(())
            });
        }
        drop(ch);
        // Stopped once the first chain is through, the others in flight.
        let _ = work.join_next().await;
        // The clients go with the signal (as the sidecars' connections
        // do); the calls they started go on inside the driver.
        d.signal(rustix::process::Signal::TERM);
        work.abort_all();
        while work.join_next().await.is_some() {}
        let status = d.wait();
        assert!(status.success(), "round {round}: {status:?}\n{}", d.logs());
    }
    // What the stops cut short is finished by a driver that stays up.
    let d = ceph.driver("last", "node-a", &["--mode", "controller"]).start();
    let mut c = ControllerClient::new(d.channel().await);
    let listed = c.list_volumes(csi::ListVolumesRequest::default()).await.unwrap().into_inner();
    for e in listed.entries {
        c.delete_volume(req::delete(&e.volume.unwrap().volume_id)).await.unwrap();
    }
    let snaps = c.list_snapshots(csi::ListSnapshotsRequest::default()).await.unwrap();
    for e in snaps.into_inner().entries {
        c.delete_snapshot(req::delete_snapshot(&e.snapshot.unwrap().snapshot_id)).await.unwrap();
    }
    ceph.assert_clean();
    drop(d);
}

/// A request name is one volume, whatever the parameters: the same name
/// with another imageFeatures, dataPool or mounter answered OK with the old
/// volume, and with another pool or volumeNamePrefix made a second one.
/// Each is ALREADY_EXISTS now, nothing second is made, and once the volume
/// is deleted the name is free for any class.
#[tokio::test]
async fn rbd_one_name_is_one_volume_whatever_the_parameters() {
    let Some(ceph) = ceph("names") else { return };
    let other_pool = format!("{}-b", ceph.pool);
    ceph.tool("ceph", &["osd", "pool", "create", &other_pool, "4", "4"]);
    ceph.tool("ceph", &["osd", "pool", "set", &other_pool, "size", "1", "--yes-i-really-mean-it"]);
    ceph.tool("rbd", &["pool", "init", &other_pool]);
    let d = ceph.driver("d", "node-a", &["--mode", "controller"]).start();
    let mut c = ControllerClient::new(d.channel().await);
    let first = c.create_volume(ceph.create("pvc-one", 16 * MIB)).await.unwrap();
    let id = first.into_inner().volume.unwrap().volume_id;
    // The same request again: the same volume.
    let again = c.create_volume(ceph.create("pvc-one", 16 * MIB)).await.unwrap();
    assert_eq!(again.into_inner().volume.unwrap().volume_id, id);
    for (key, value) in [
        ("imageFeatures", "layering"),
        ("dataPool", ceph.pool.as_str()),
        ("mounter", "fuse"),
        ("volumeNamePrefix", "other-"),
        ("pool", other_pool.as_str()),
    ] {
        let mut r = ceph.create("pvc-one", 16 * MIB);
        r.parameters.insert(key.to_string(), value.to_string());
        let e = c.create_volume(r).await.unwrap_err();
        assert_eq!(e.code(), Code::AlreadyExists, "{key}: {e:?}");
    }
    assert_eq!(ceph.images().len(), 1, "no second volume");
    let in_other = ceph.tool("rbd", &["ls", "-p", &other_pool]);
    assert!(in_other.trim().is_empty(), "{in_other}");
    // Deleted, the name is anyone's: in the other pool now.
    c.delete_volume(req::delete(&id)).await.unwrap();
    let mut r = ceph.create("pvc-one", 16 * MIB);
    r.parameters.insert("pool".into(), other_pool.clone());
    let moved = c.create_volume(r).await.unwrap().into_inner().volume.unwrap().volume_id;
    assert!(moved.contains(&other_pool), "{moved}");
    c.delete_volume(req::delete(&moved)).await.unwrap();
    ceph.assert_clean();
    drop(d);
    ceph.tool(
        "ceph",
        &["osd", "pool", "delete", &other_pool, &other_pool, "--yes-i-really-really-mean-it"],
    );
}

/// A raw block volume grown by the controller reaches the pod: the answer
/// asks for the node's step (it said "node expansion not required", and a
/// device mapped through rbd-fuse and a loop device kept its old size for
/// ever), and the node's step makes the published device the new size.
#[tokio::test]
async fn rbd_raw_block_growth_reaches_the_device() {
    let Some(ceph) = ceph("blockgrow") else { return };
    let d = ceph.driver("d", "node-a", &[]).start();
    let mut k = clients(&d).await;
    let v = block_volume(&mut k, &ceph, "pvc-bg", 32 * MIB).await;
    let (staging, target) = stage_publish(&mut k, &ceph, &v, "pv-bg", req::block_cap()).await;
    let device_size = |p: &Path| ferrovol_host::node::fs::block_device_size(p).unwrap();
    assert_eq!(device_size(&target), 32 * MIB as u64);
    let grown =
        k.c.controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: v.clone(),
            capacity_range: req::range(64 * MIB, 0),
            volume_capability: Some(req::block_cap()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(grown.node_expansion_required, "the node must refresh its device");
    k.n.node_expand_volume(csi::NodeExpandVolumeRequest {
        volume_id: v.clone(),
        volume_path: target.display().to_string(),
        capacity_range: req::range(64 * MIB, 0),
        volume_capability: Some(req::block_cap()),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(device_size(&target), 64 * MIB as u64, "the pod's device is the new size");
    unmount(&mut k, &v, &staging, &target).await;
    k.c.delete_volume(req::delete(&v)).await.unwrap();
    ceph.assert_clean();
    drop(d);
}

/// A raw block RBD volume published read-only refuses writes through the
/// pod's device, while a read-write publish beside it writes.
#[tokio::test]
async fn rbd_a_read_only_raw_block_publish_refuses_writes() {
    let Some(ceph) = ceph("blockro") else { return };
    let d = ceph.driver("d", "node-a", &[]).start();
    let mut k = clients(&d).await;
    let v = block_volume(&mut k, &ceph, "pvc-bro", 16 * MIB).await;
    let (staging, rw) = stage_publish(&mut k, &ceph, &v, "pv-bro", req::block_cap()).await;
    let ro = ceph.target("reader", "pv-bro");
    k.n.node_publish_volume(publish_req(&v, &staging, &ro, req::block_cap(), true)).await.unwrap();
    common::assert_refuses_writes(&ro);
    common::write_pattern(&rw, 0, 4096, 7);
    assert_eq!(common::read_at(&ro, 0, 4096), common::read_at(&rw, 0, 4096));
    k.n.node_unpublish_volume(unpublish_req(&v, &ro)).await.unwrap();
    unmount(&mut k, &v, &staging, &rw).await;
    k.c.delete_volume(req::delete(&v)).await.unwrap();
    ceph.assert_clean();
    drop(d);
}

/// A node at its attach limit (`--max-volumes-per-node`, advertised in
/// NodeGetInfo and known to the controller too): one more ControllerPublish
/// there is RESOURCE_EXHAUSTED, as the spec says; a repeated publish and
/// other nodes are not held back.
#[tokio::test]
async fn rbd_publish_beyond_the_attach_limit_is_exhausted() {
    let Some(ceph) = ceph("attachlimit") else { return };
    let d = ceph.driver("d", "node-a", &["--mode", "controller", "--max-volumes-per-node", "2"]);
    let d = d.start();
    let mut c = ControllerClient::new(d.channel().await);
    let mut ids = Vec::new();
    for i in 0..3 {
        let v = c.create_volume(ceph.create(&format!("pvc-l{i}"), 16 * MIB)).await.unwrap();
        ids.push(v.into_inner().volume.unwrap().volume_id);
    }
    for id in &ids[..2] {
        c.controller_publish_volume(publish(id, "node-a", Mode::SingleNodeWriter, false))
            .await
            .unwrap();
    }
    let e = c
        .controller_publish_volume(publish(&ids[2], "node-a", Mode::SingleNodeWriter, false))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    c.controller_publish_volume(publish(&ids[0], "node-a", Mode::SingleNodeWriter, false))
        .await
        .expect("a repeated publish is not one more");
    c.controller_publish_volume(publish(&ids[2], "node-b", Mode::SingleNodeWriter, false))
        .await
        .expect("another node has room");
    for (id, node) in [(&ids[0], "node-a"), (&ids[1], "node-a"), (&ids[2], "node-b")] {
        c.controller_unpublish_volume(unpublish(id, node)).await.unwrap();
    }
    for id in &ids {
        c.delete_volume(req::delete(id)).await.unwrap();
    }
    ceph.assert_clean();
    drop(d);
}

/// A snapshot that outlives its volume is listed alike with and without a
/// source filter (filtered by its deleted source it was missing while the
/// unfiltered list showed it with that source).
#[tokio::test]
async fn rbd_snapshots_of_a_deleted_volume_list_alike_filtered_or_not() {
    let Some(ceph) = ceph("orphansnaps") else { return };
    let d = ceph.driver("d", "node-a", &["--mode", "controller"]).start();
    let mut k = clients(&d).await;
    let v = new_volume(&mut k, &ceph, "pvc-gone", 16 * MIB).await;
    let s = snapshot(&mut k, "snap-kept", &v).await;
    k.c.delete_volume(req::delete(&v)).await.unwrap();
    let list = |source: &str| csi::ListSnapshotsRequest {
        source_volume_id: source.to_string(),
        ..Default::default()
    };
    let all = k.c.list_snapshots(list("")).await.unwrap().into_inner().entries;
    let by_source = k.c.list_snapshots(list(&v)).await.unwrap().into_inner().entries;
    let ids = |e: &[csi::list_snapshots_response::Entry]| -> Vec<String> {
        e.iter().map(|e| e.snapshot.as_ref().unwrap().snapshot_id.clone()).collect()
    };
    assert_eq!(ids(&all), std::slice::from_ref(&s));
    assert_eq!(ids(&by_source), std::slice::from_ref(&s), "filtered by its deleted source");
    k.c.delete_snapshot(req::delete_snapshot(&s)).await.unwrap();
    ceph.assert_clean();
    drop(d);
}

/// A purge cut short leaves a trash entry whose image no longer opens (its
/// header went first): the start-up sweep removes it (it counted an entry
/// it could not open as purged, and left it for ever).
#[tokio::test]
async fn rbd_a_half_purged_trash_entry_goes_at_the_next_start() {
    let Some(ceph) = ceph("halfpurged") else { return };
    let image = format!("csi-vol-{}", uuid::Uuid::new_v4().simple());
    ceph.tool("rbd", &["create", "--size", "8M", &format!("{}/{image}", ceph.pool)]);
    ceph.tool("rbd", &["trash", "mv", &format!("{}/{image}", ceph.pool)]);
    let trash = ceph.json("rbd", &["trash", "ls", "-p", &ceph.pool]);
    let id = trash.as_array().unwrap()[0]["id"].as_str().unwrap().to_string();
    ceph.tool("rados", &["-p", &ceph.pool, "rm", &format!("rbd_header.{id}")]);
    let d = ceph.driver("d", "node-a", &["--mode", "controller"]).start();
    ceph.assert_clean();
    drop(d);
}

/// The engines' one conformance suite, on RBD (rbd-fuse and a loop device
/// on the node).
#[tokio::test]
async fn rbd_conformance() {
    let Some(ceph) = ceph("conformance") else { return };
    let d = ceph.driver("d", "node-a", &[]).start();
    let features = ceph.params("layering,exclusive-lock");
    let subject = common::Conforming {
        name: "rbd".into(),
        controller: d.channel().await,
        node: Some((d.channel().await, ceph.kubelet.clone())),
        create: Box::new(move |name, bytes, cap| csi::CreateVolumeRequest {
            volume_capabilities: vec![cap],
            parameters: features.clone(),
            ..req::create(name, bytes)
        }),
        volume_size: 320 * MIB,
        fs_type: "xfs".into(),
    };
    ferrovol_testkit::conformance::run(&subject).await;
    ceph.assert_clean();
    drop(d);
}
