//! The relay: one `--mode relay` process (the controller Deployment) and
//! node agents (`--mode agent`, the DaemonSet) as separate processes, each
//! with its own pool and node ID, linked over real mutual TLS on loopback.
//! Every controller call goes to the relay's socket, every node call to the
//! agent's own socket, as the sidecars and the kubelet would make them.

use crate::common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use common::req::{self, publish_req, stage_req, unpublish_req, unstage_req, MIB};
use common::{last_seq, Driver, DriverBuilder, Kubelet, Lockstep, PoolFs, TestPool, BIN};
use ferrovol_csi as csi;
use ferrovol_csi::controller_client::ControllerClient;
use ferrovol_csi::group_controller_client::GroupControllerClient;
use ferrovol_csi::node_client::NodeClient;
use tonic::transport::Channel;
use tonic::Code;

const KEY: &str = "local.csi.ferrovol.io/node";

/// Makes a link CA and the relay's certificate under `dir` (`ca/`,
/// `relay/`), and the certificates of `nodes` (`nodes/<name>/`).
fn certs(dir: &Path, nodes: &[&str]) {
    let out = std::process::Command::new(BIN)
        .args(["link", "certs", "--out"])
        .arg(dir)
        .args(nodes.iter().flat_map(|n| ["--node", n]))
        .output()
        .expect("running ferrovol link certs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

struct Agent {
    // Field order is drop order: the process stops before its mounts are
    // forced away and its pool is unmounted.
    driver: Driver,
    kubelet: Kubelet,
    pool: TestPool,
    root: PathBuf,
    name: String,
}

impl Agent {
    async fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(self.driver.channel().await)
    }

    /// The agent's own controller services, as `--mode all` serves them.
    async fn local(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.driver.channel().await)
    }
}

struct Cluster {
    relay: Driver,
    agents: Vec<Agent>,
    link: String,
    certs: PathBuf,
    root: tempfile::TempDir,
}

fn start_relay(root: &Path, certs: &Path, listen: &str, envs: &[(&str, &str)]) -> (Driver, String) {
    let mut b = DriverBuilder::new(&root.join("relay")).node_id("controller").args([
        "--mode",
        "relay",
        "--link-listen",
        listen,
        "--link-tls",
        &certs.join("relay").display().to_string(),
    ]);
    for (k, v) in envs {
        b = b.env(k, v);
    }
    let mut relay = b.start();
    let line = relay.wait_for_log("link listening").expect("the relay listens for agents");
    (relay, common::logged_addr(&line))
}

impl Cluster {
    /// A relay and one agent per name, all connected.
    async fn start(names: &[&str], fs: PoolFs) -> Cluster {
        Cluster::start_with(names, fs, &[], |_| vec![]).await
    }

    async fn start_with(
        names: &[&str],
        fs: PoolFs,
        relay_env: &[(&str, &str)],
        agent_env: impl Fn(&Path) -> Vec<(String, String)>,
    ) -> Cluster {
        let root = tempfile::tempdir().unwrap();
        let certs_dir = root.path().join("certs");
        certs(&certs_dir, &[]);
        let (relay, link) = start_relay(root.path(), &certs_dir, "127.0.0.1:0", relay_env);
        let mut cluster = Cluster { relay, agents: vec![], link, certs: certs_dir, root };
        for name in names {
            let pool = TestPool::new(fs).await;
            let agent_root = cluster.root.path().join(name);
            let env = agent_env(&agent_root);
            cluster.add_agent(name, pool, &env);
        }
        cluster
    }

    fn agent_builder(
        &self,
        name: &str,
        root: &Path,
        pool: &TestPool,
        kubelet: &Kubelet,
    ) -> DriverBuilder {
        self.agent_with_certs(name, root, pool, kubelet, &self.node_certs(name))
    }

    /// An agent claiming node `name` with the link certificate in `certs`
    /// (its own, another node's, another CA's).
    fn agent_with_certs(
        &self,
        name: &str,
        root: &Path,
        pool: &TestPool,
        kubelet: &Kubelet,
        certs: &Path,
    ) -> DriverBuilder {
        DriverBuilder::new(root).node_id(name).pool(pool).kubelet(kubelet).args([
            "--mode",
            "agent",
            "--link-controller",
            &self.link,
            "--link-tls",
            &certs.display().to_string(),
        ])
    }

    /// The node's own link certificate, issued from the cluster's CA on
    /// first use.
    fn node_certs(&self, name: &str) -> PathBuf {
        let dir = self.certs.join("nodes").join(name);
        if !dir.exists() {
            certs(&self.certs, &[name]);
        }
        dir
    }

    fn add_agent(&mut self, name: &str, pool: TestPool, env: &[(String, String)]) {
        let kubelet = Kubelet::new(&pool);
        let root = self.root.path().join(name);
        std::fs::create_dir_all(&root).unwrap();
        let mut b = self.agent_builder(name, &root, &pool, &kubelet);
        for (k, v) in env {
            b = b.env(k, v);
        }
        let driver = b.start();
        self.wait_connected(name);
        self.agents.push(Agent { driver, kubelet, pool, root, name: name.into() });
    }

    /// Waits until the relay says the node's agent is connected.
    fn wait_connected(&mut self, name: &str) {
        let needle = format!("node agent connected node={name} ");
        self.relay
            .wait_for_log(&needle)
            .unwrap_or_else(|| panic!("{name} never connected; relay log:\n{}", self.relay.logs()));
    }

    /// Restarts agent `i` on its pool and state, and waits for its link.
    fn restart_agent(&mut self, i: usize) {
        self.restart_agent_with(i, &[]);
    }

    /// Restarts agent `i` with `env` added to its environment.
    fn restart_agent_with(&mut self, i: usize, env: &[(&str, &str)]) {
        self.agents[i].driver.kill();
        let agent = &self.agents[i];
        let needle = format!("node agent connected node={} ", agent.name);
        let before = self.relay.logs().matches(&needle).count();
        let mut b = self.agent_builder(&agent.name, &agent.root, &agent.pool, &agent.kubelet);
        for (k, v) in env {
            b = b.env(k, v);
        }
        let agent = &mut self.agents[i];
        agent.driver = b.start();
        assert!(
            self.relay.wait_for_log_count(&needle, before + 1),
            "the agent never reconnected:\n{}",
            self.relay.logs()
        );
    }

    async fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.relay.channel().await)
    }

    async fn groups(&self) -> GroupControllerClient<Channel> {
        GroupControllerClient::new(self.relay.channel().await)
    }
}

fn on_node(name: &str, node: &str, size: i64) -> csi::CreateVolumeRequest {
    let segment = csi::Topology { segments: [(KEY.to_string(), node.to_string())].into() };
    csi::CreateVolumeRequest {
        accessibility_requirements: Some(csi::TopologyRequirement {
            requisite: vec![segment.clone()],
            preferred: vec![segment],
        }),
        ..req::create(name, size)
    }
}

async fn create(c: &mut ControllerClient<Channel>, r: csi::CreateVolumeRequest) -> csi::Volume {
    c.create_volume(r).await.unwrap().into_inner().volume.unwrap()
}

async fn snapshot(c: &mut ControllerClient<Channel>, name: &str, source: &str) -> csi::Snapshot {
    c.create_snapshot(req::snapshot(name, source)).await.unwrap().into_inner().snapshot.unwrap()
}

fn node_of(v: &csi::Volume) -> String {
    v.accessible_topology[0].segments[KEY].clone()
}

async fn list_all_volumes(c: &mut ControllerClient<Channel>, page: i32) -> Vec<String> {
    let (mut ids, mut token) = (vec![], String::new());
    loop {
        let r = c
            .list_volumes(csi::ListVolumesRequest { max_entries: page, starting_token: token })
            .await
            .unwrap()
            .into_inner();
        assert!(page == 0 || r.entries.len() <= page as usize);
        ids.extend(r.entries.into_iter().map(|e| e.volume.unwrap().volume_id));
        if r.next_token.is_empty() {
            return ids;
        }
        token = r.next_token;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn each_call_reaches_the_node_that_holds_the_volume() {
    let cluster = Cluster::start(&["node-a", "node-b"], PoolFs::Ext4).await;
    let mut c = cluster.controller().await;
    let (a, b) = (&cluster.agents[0], &cluster.agents[1]);

    // Created where the accessibility requirements say (the scheduler's
    // pick under WaitForFirstConsumer), named by its node in the ID.
    let on_b = create(&mut c, on_node("pvc-b", "node-b", 16 * MIB)).await;
    assert_eq!(node_of(&on_b), "node-b");
    assert!(on_b.volume_id.ends_with("@node-b"), "{}", on_b.volume_id);
    assert!(b.pool.volume_file(&on_b.volume_id).exists());
    assert!(!a.pool.volume_file(&on_b.volume_id).exists());
    // A retry is the same volume; a preferred node that is not requisite
    // also decides.
    assert_eq!(
        create(&mut c, on_node("pvc-b", "node-b", 16 * MIB)).await.volume_id,
        on_b.volume_id
    );
    let on_a = create(&mut c, on_node("pvc-a", "node-a", 16 * MIB)).await;
    assert!(a.pool.volume_file(&on_a.volume_id).exists());

    // Snapshot, restore and clone stay on the source's node.
    let snap = snapshot(&mut c, "snap-b", &on_b.volume_id).await;
    assert!(
        snap.snapshot_id.ends_with("@node-b") && b.pool.snapshot_file(&snap.snapshot_id).exists()
    );
    let restored =
        create(&mut c, req::from_snapshot("restored-b", &snap.snapshot_id, 16 * MIB)).await;
    let cloned = create(&mut c, req::from_volume("cloned-b", &on_b.volume_id, 16 * MIB)).await;
    for v in [&restored, &cloned] {
        assert_eq!(node_of(v), "node-b");
        assert!(b.pool.volume_file(&v.volume_id).exists());
    }
    // The relay's answer is the node's own.
    let direct = b
        .local()
        .await
        .controller_get_volume(csi::ControllerGetVolumeRequest {
            volume_id: restored.volume_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let relayed = c
        .controller_get_volume(csi::ControllerGetVolumeRequest {
            volume_id: restored.volume_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(direct, relayed);

    // Capacity per node's topology segment is that node's; an unknown
    // node's segment cannot be answered yet.
    let capacity = |node: &str| csi::GetCapacityRequest {
        accessible_topology: Some(csi::Topology { segments: [(KEY.into(), node.into())].into() }),
        ..Default::default()
    };
    let relayed = c.get_capacity(capacity("node-a")).await.unwrap().into_inner();
    let direct = a.local().await.get_capacity(capacity("node-a")).await.unwrap().into_inner();
    // (Free space moves with the host's disk: the fixed figure is compared.)
    assert!(relayed.available_capacity > 0 && relayed.maximum_volume_size.unwrap() > 0);
    assert_eq!(relayed.minimum_volume_size, direct.minimum_volume_size);
    let e = c.get_capacity(capacity("node-z")).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");

    // Listings cover every node, a page at a time across node boundaries.
    let mut everything: Vec<String> =
        [&on_a, &on_b, &restored, &cloned].iter().map(|v| v.volume_id.clone()).collect();
    everything.sort();
    for page in [1, 2, 3, 0] {
        let mut listed = list_all_volumes(&mut c, page).await;
        listed.sort();
        assert_eq!(listed, everything, "page size {page}");
    }
    let snaps = c.list_snapshots(csi::ListSnapshotsRequest::default()).await.unwrap().into_inner();
    assert_eq!(snaps.entries.len(), 1);
    let bogus = csi::ListVolumesRequest { starting_token: "node-q/x".into(), ..Default::default() };
    assert_eq!(c.list_volumes(bogus).await.unwrap_err().code(), Code::Aborted);

    // An ID of a node that never connected is UNAVAILABLE, not NOT_FOUND
    // (a delete must not be taken as done); a malformed one is not found.
    let stray = on_b.volume_id.replace("@node-b", "@node-z");
    let e = c.delete_volume(req::delete(&stray)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    c.delete_volume(req::delete("vol-nonsense")).await.unwrap();

    // Deleting through the relay empties both pools.
    for v in [&restored, &cloned, &on_a, &on_b] {
        c.delete_volume(req::delete(&v.volume_id)).await.unwrap();
    }
    c.delete_snapshot(req::delete_snapshot(&snap.snapshot_id)).await.unwrap();
    for agent in &cluster.agents {
        assert!(agent.pool.files("volumes").is_empty(), "{:?}", agent.pool.files("volumes"));
        assert!(agent.pool.files("snapshots").is_empty());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn ids_minted_before_tags_are_found_by_asking_the_nodes() {
    // A pool holding a volume whose ID does not name its node.
    let pool = TestPool::new(PoolFs::Ext4).await;
    let seeded = std::process::Command::new(BIN)
        .args(["pool", "seed", "--volumes", "1", "--node-id", "node-a", "--legacy-ids", "--dir"])
        .arg(&pool.dir)
        .output()
        .unwrap();
    assert!(seeded.status.success(), "{}", String::from_utf8_lossy(&seeded.stderr));
    let mut cluster = Cluster::start(&["node-b"], PoolFs::Ext4).await;
    cluster.add_agent("node-a", pool, &[]);
    let legacy = cluster.agents[1]
        .local()
        .await
        .list_volumes(csi::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries[0]
        .volume
        .clone()
        .unwrap()
        .volume_id;
    assert!(!legacy.contains('@'), "{legacy}");

    let mut c = cluster.controller().await;
    let got = c
        .controller_get_volume(csi::ControllerGetVolumeRequest { volume_id: legacy.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.volume.unwrap().volume_id, legacy);
    let snap = snapshot(&mut c, "legacy-snap", &legacy).await;
    assert!(snap.snapshot_id.ends_with("@node-a"), "{}", snap.snapshot_id);
    c.delete_snapshot(req::delete_snapshot(&snap.snapshot_id)).await.unwrap();
    c.delete_volume(req::delete(&legacy)).await.unwrap();
    assert!(cluster.agents[1].pool.files("volumes").is_empty());
    // Gone everywhere: deleted again is fine; asked for, NOT_FOUND.
    c.delete_volume(req::delete(&legacy)).await.unwrap();
    let e = c
        .controller_get_volume(csi::ControllerGetVolumeRequest { volume_id: legacy.clone() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
}

/// One volume per agent, staged and published as a pod's.
async fn mounted(
    agent: &Agent,
    c: &mut ControllerClient<Channel>,
    name: &str,
) -> (String, PathBuf, PathBuf) {
    let cap = req::mount_cap("ext4");
    let v = create(
        c,
        csi::CreateVolumeRequest {
            volume_capabilities: vec![cap.clone()],
            ..on_node(name, &agent.name, 64 * MIB)
        },
    )
    .await;
    let (staging, target) = (agent.kubelet.staging(name), agent.kubelet.target("app", name));
    let mut n = agent.node().await;
    n.node_stage_volume(stage_req(&v.volume_id, &staging, cap.clone())).await.unwrap();
    n.node_publish_volume(publish_req(&v.volume_id, &staging, &target, cap, false)).await.unwrap();
    (v.volume_id, staging, target)
}

/// Two agents on XFS pools, node-b with `failpoint` pausing until its
/// gate (the returned FIFO) is written; the TempDir holds the gate.
async fn paused_on_node_b(failpoint: &str) -> (Cluster, tempfile::TempDir, PathBuf) {
    let gate_dir = tempfile::tempdir().unwrap();
    let fifo = gate_dir.path().join("gate");
    rustix::fs::mkfifoat(rustix::fs::CWD, &fifo, rustix::fs::Mode::from_raw_mode(0o600)).unwrap();
    let spec = format!("{failpoint}=pause:{}", fifo.display());
    let cluster = Cluster::start_with(&["node-a", "node-b"], PoolFs::Xfs, &[], |root| {
        match root.ends_with("node-b") {
            true => vec![("FERROVOL_FAILPOINTS".to_string(), spec.clone())],
            false => vec![],
        }
    })
    .await;
    (cluster, gate_dir, fifo)
}

/// A group snapshot of `ids` through the relay.
async fn take_group(cluster: &Cluster, name: &str, ids: &[String]) -> csi::VolumeGroupSnapshot {
    let request = csi::CreateVolumeGroupSnapshotRequest {
        name: name.into(),
        source_volume_ids: ids.to_vec(),
        ..Default::default()
    };
    let made = cluster.groups().await.create_volume_group_snapshot(request).await.unwrap();
    made.into_inner().group_snapshot.unwrap()
}

/// One mounted volume on each agent, in the agents' order.
async fn mounted_on_each(cluster: &Cluster) -> Vec<(String, PathBuf, PathBuf)> {
    let mut c = cluster.controller().await;
    let mut vols = Vec::new();
    for (i, agent) in cluster.agents.iter().enumerate() {
        vols.push(mounted(agent, &mut c, &format!("app-{i}")).await);
    }
    vols
}

/// Deletes the group through the relay, then unmounts and deletes each
/// agent's volume: nothing may be left in any pool or kubelet dir.
async fn delete_group_and_volumes(
    cluster: &Cluster,
    group: &csi::VolumeGroupSnapshot,
    vols: &[(String, PathBuf, PathBuf)],
) {
    cluster
        .groups()
        .await
        .delete_volume_group_snapshot(csi::DeleteVolumeGroupSnapshotRequest {
            group_snapshot_id: group.group_snapshot_id.clone(),
            snapshot_ids: group.snapshots.iter().map(|s| s.snapshot_id.clone()).collect(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut c = cluster.controller().await;
    for (agent, (id, staging, target)) in cluster.agents.iter().zip(vols) {
        let mut n = agent.node().await;
        n.node_unpublish_volume(unpublish_req(id, target)).await.unwrap();
        n.node_unstage_volume(unstage_req(id, staging)).await.unwrap();
        c.delete_volume(req::delete(id)).await.unwrap();
        assert!(agent.pool.files("snapshots").is_empty(), "{:?}", agent.pool.files("snapshots"));
        assert!(agent.pool.files("volumes").is_empty());
        agent.kubelet.assert_clean();
    }
}

/// Restores every member of `group` on its node and reads where its log
/// ended: (source volume, last sequence number).
async fn restored_ends(cluster: &Cluster, group: &csi::VolumeGroupSnapshot) -> Vec<(String, u64)> {
    let mut c = cluster.controller().await;
    let mut ends = Vec::new();
    let cap = req::mount_cap("ext4");
    for s in &group.snapshots {
        let name = format!("restored-{}-{}", group.group_snapshot_id, ends.len());
        let restored = create(&mut c, req::from_snapshot(&name, &s.snapshot_id, 64 * MIB)).await;
        let agent = cluster.agents.iter().find(|a| a.name == node_of(&restored)).unwrap();
        assert!(s.snapshot_id.ends_with(&format!("@{}", agent.name)));
        let staging = agent.kubelet.staging(&format!("restored{}", ends.len()));
        let mut n = agent.node().await;
        n.node_stage_volume(stage_req(&restored.volume_id, &staging, cap.clone())).await.unwrap();
        ends.push((s.source_volume_id.clone(), last_seq(&staging.join("log"))));
        n.node_unstage_volume(unstage_req(&restored.volume_id, &staging)).await.unwrap();
        c.delete_volume(req::delete(&restored.volume_id)).await.unwrap();
    }
    ends
}

/// The lockstep writers of the one-node group test, split across two
/// nodes: seq N goes to node-a's member, then node-b's, before N+1. Every
/// restored member must end within one step of the other.
#[tokio::test(flavor = "multi_thread")]
async fn a_group_across_two_nodes_is_one_instant() {
    let (lo, hi) = group_across_two_nodes(false).await;
    assert!(hi - lo <= 1, "members are from one instant: {lo} and {hi}");
}

/// The same writers and group with the relay's cross-node freeze switched
/// off (each node then takes its part at its own instant, one after the
/// other): the check above sees it. This keeps the consistency test honest.
#[tokio::test(flavor = "multi_thread")]
async fn without_the_cross_node_freeze_the_members_disagree() {
    let (lo, hi) = group_across_two_nodes(true).await;
    assert!(hi - lo > 1, "the parts were taken at different instants: {lo} and {hi}");
}

/// Answers the lowest and highest sequence number the restored members end at.
async fn group_across_two_nodes(unsafe_mode: bool) -> (u64, u64) {
    let relay_env: &[(&str, &str)] =
        if unsafe_mode { &[("FERROVOL_RELAY_UNSAFE_NO_GROUP_FREEZE", "1")] } else { &[] };
    let mut cluster =
        Cluster::start_with(&["node-a", "node-b"], PoolFs::Xfs, relay_env, |_| vec![]).await;
    let mut c = cluster.controller().await;
    let mut vols = Vec::new();
    for (i, agent) in cluster.agents.iter().enumerate() {
        vols.push(mounted(agent, &mut c, &format!("app-{i}")).await);
    }
    let writer = Lockstep::start(&vols);
    let ids: Vec<String> = vols.iter().map(|v| v.0.clone()).collect();
    let group = take_group(&cluster, "across", &ids).await;
    // Some steps after the instant, whatever the machine's load: a member
    // ending at the last step written would prove nothing.
    writer.advance(2);
    let written = writer.stop();
    let line = cluster.relay.wait_for_log("group snapshot across nodes taken").unwrap();
    eprintln!("{line}");
    assert!(line.contains("nodes=2"), "{line}");
    let frozen = cluster
        .agents
        .iter()
        .all(|a| a.driver.logs().contains("froze for a group snapshot across nodes"));
    assert!(frozen, "every node froze (without the shared freeze: each on its own)");
    assert!(group.group_snapshot_id.starts_with("xgroup-"), "{}", group.group_snapshot_id);
    assert_eq!(group.snapshots.len(), 2);

    for s in &group.snapshots {
        assert_eq!(s.group_snapshot_id, group.group_snapshot_id);
        // Every member names the one group, also when listed on its own.
        let listed = c
            .list_snapshots(csi::ListSnapshotsRequest {
                snapshot_id: s.snapshot_id.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            listed.entries[0].snapshot.as_ref().unwrap().group_snapshot_id,
            group.group_snapshot_id
        );
    }
    let ends = restored_ends(&cluster, &group).await;
    let seqs: Vec<u64> = ends.iter().map(|e| e.1).collect();
    let (lo, hi) = (*seqs.iter().min().unwrap(), *seqs.iter().max().unwrap());
    eprintln!("restored members end at {ends:?} of {written} steps");
    assert!(lo > 0 && hi < written, "{ends:?}");

    // Get and delete find every node's part; a member alone cannot go.
    let mut g = cluster.groups().await;
    let got = g
        .get_volume_group_snapshot(csi::GetVolumeGroupSnapshotRequest {
            group_snapshot_id: group.group_snapshot_id.clone(),
            snapshot_ids: group.snapshots.iter().map(|s| s.snapshot_id.clone()).collect(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.group_snapshot.unwrap().snapshots.len(), 2);
    let e =
        c.delete_snapshot(req::delete_snapshot(&group.snapshots[0].snapshot_id)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    delete_group_and_volumes(&cluster, &group, &vols).await;
    cluster.relay.terminate();
    (lo, hi)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_that_is_gone_fails_fast_and_rejoins() {
    let mut cluster = Cluster::start(&["node-a", "node-b"], PoolFs::Ext4).await;
    let mut c = cluster.controller().await;
    let on_a = create(&mut c, on_node("pvc-a", "node-a", 16 * MIB)).await;
    let on_b = create(&mut c, on_node("pvc-b", "node-b", 16 * MIB)).await;

    cluster.agents[1].driver.kill();
    cluster.relay.wait_for_log("node agent disconnected node=node-b").unwrap();
    let get = |id: &str| csi::ControllerGetVolumeRequest { volume_id: id.to_string() };
    let e = c.controller_get_volume(get(&on_b.volume_id)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("node-b"), "{e:?}");
    // Nothing about node-a waits for node-b.
    c.controller_get_volume(get(&on_a.volume_id)).await.unwrap();
    let more = create(&mut c, on_node("pvc-a2", "node-a", 16 * MIB)).await;
    // A volume for node-b cannot be made, and says why.
    let e = c.create_volume(on_node("pvc-b2", "node-b", 16 * MIB)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    // A listing over all nodes is not answered with one missing.
    let e = c.list_volumes(csi::ListVolumesRequest::default()).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");

    cluster.restart_agent(1);
    let got = c.controller_get_volume(get(&on_b.volume_id)).await.unwrap().into_inner();
    assert_eq!(got.volume.unwrap().volume_id, on_b.volume_id);
    assert_eq!(list_all_volumes(&mut c, 1).await.len(), 3);
    for v in [&on_a, &on_b, &more] {
        c.delete_volume(req::delete(&v.volume_id)).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_with_a_certificate_from_another_ca_is_refused() {
    let mut cluster = Cluster::start(&["node-a"], PoolFs::Ext4).await;
    let other = cluster.root.path().join("other-ca");
    certs(&other, &["intruder"]);
    let pool = TestPool::new(PoolFs::Ext4).await;
    let kubelet = Kubelet::new(&pool);
    let root = cluster.root.path().join("intruder");
    let certs = other.join("nodes/intruder");
    let mut intruder = cluster.agent_with_certs("intruder", &root, &pool, &kubelet, &certs).start();
    // Refused by the relay (its client certificate is not from the link
    // CA), and the agent does not trust the relay either.
    cluster.relay.wait_for_log("refused a link connection").unwrap();
    intruder.wait_for_log("cannot reach the relay").unwrap();
    let mut c = cluster.controller().await;
    let e = c.create_volume(on_node("pvc-x", "intruder", 16 * MIB)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(pool.files("volumes").is_empty());
    // The node that belongs is served.
    let v = create(&mut c, on_node("pvc-a", "node-a", 16 * MIB)).await;
    c.delete_volume(req::delete(&v.volume_id)).await.unwrap();
    intruder.kill();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_controller_restarted_mid_call_converges_on_retry() {
    let fifo_holder = tempfile::tempdir().unwrap();
    let fifo = fifo_holder.path().join("gate");
    rustix::fs::mkfifoat(rustix::fs::CWD, &fifo, rustix::fs::Mode::from_raw_mode(0o600)).unwrap();
    let spec = format!("create-snapshot-after-reserve=pause:{}", fifo.display());
    let mut cluster = Cluster::start_with(&["node-a"], PoolFs::Ext4, &[], |_| {
        vec![("FERROVOL_FAILPOINTS".to_string(), spec.clone())]
    })
    .await;
    let mut c = cluster.controller().await;
    let v = create(&mut c, on_node("pvc-a", "node-a", 16 * MIB)).await;

    // The snapshot is in flight on the node when the controller dies.
    let call = {
        let mut c = c.clone();
        let id = v.volume_id.clone();
        tokio::spawn(async move { c.create_snapshot(req::snapshot("mid-call", &id)).await })
    };
    cluster.agents[0].driver.wait_for_log("failpoint reached").unwrap();
    cluster.relay.kill();
    let lost = call.await.unwrap().unwrap_err();
    assert_ne!(lost.code(), Code::Ok);
    let root = cluster.root.path().to_path_buf();
    let (relay, addr) = start_relay(&root, &cluster.certs, &cluster.link, &[]);
    assert_eq!(addr, cluster.link);
    cluster.relay = relay;
    cluster.wait_connected("node-a");
    // The node finishes what it had begun.
    std::fs::write(&fifo, b"go").unwrap();

    // The sidecar's retry, through the new controller: the one snapshot.
    let mut c = cluster.controller().await;
    let request = req::snapshot("mid-call", &v.volume_id);
    let snap = retried(|| {
        let (mut c, r) = (c.clone(), request.clone());
        async move { c.create_snapshot(r).await }
    })
    .await
    .unwrap()
    .into_inner()
    .snapshot
    .unwrap();
    let all = c.list_snapshots(csi::ListSnapshotsRequest::default()).await.unwrap().into_inner();
    assert_eq!(all.entries.len(), 1);
    assert_eq!(all.entries[0].snapshot.as_ref().unwrap().snapshot_id, snap.snapshot_id);
    c.delete_snapshot(req::delete_snapshot(&snap.snapshot_id)).await.unwrap();
    c.delete_volume(req::delete(&v.volume_id)).await.unwrap();
    let agent = &mut cluster.agents[0];
    agent.driver.terminate();
    let (clean, report) = common::pool_check(&agent.pool, false);
    assert!(clean, "{report}");
    assert!(agent.pool.files("volumes").is_empty() && agent.pool.files("snapshots").is_empty());
}

/// A node lost between the freeze and the thaw of a group across nodes:
/// the relay thaws every other node at once and removes the parts already
/// made, the call is UNAVAILABLE, the lost node thaws what it left frozen
/// when it starts again, and the retried call converges.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_lost_inside_a_cross_node_freeze_leaves_nothing_frozen() {
    let (mut cluster, _gate, _fifo) = paused_on_node_b("create-group-before-commit").await;
    let vols = mounted_on_each(&cluster).await;
    let ids: Vec<String> = vols.iter().map(|v| v.0.clone()).collect();
    let request = csi::CreateVolumeGroupSnapshotRequest {
        name: "lost".into(),
        source_volume_ids: ids.clone(),
        ..Default::default()
    };
    let call = {
        let mut g = cluster.groups().await;
        let request = request.clone();
        tokio::spawn(async move { g.create_volume_group_snapshot(request).await })
    };
    // node-b has taken its part and stops before committing it: both
    // nodes' members are frozen by the relay's hold now.
    cluster.agents[1].driver.wait_for_log("failpoint reached").unwrap();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let on_a = vols[0].2.join("after-freeze");
    std::thread::spawn(move || {
        // Blocks while node-a's filesystem is frozen.
        std::fs::write(&on_a, b"written").unwrap();
        let _ = done_tx.send(());
    });
    cluster.agents[1].driver.kill();
    let e = call.await.unwrap().unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    // Thawed: the write goes through (the bound is a failure, not a wait).
    done_rx.recv_timeout(std::time::Duration::from_secs(60)).expect("node-a stayed frozen");
    assert!(cluster.agents[0].pool.files("snapshots").is_empty(), "node-a's part was removed");

    // node-b starts again: it thaws what the dead process left frozen and
    // rolls back its unfinished part; the sidecar's retry then converges.
    cluster.restart_agent(1);
    assert!(cluster.agents[1]
        .driver
        .logs()
        .contains("thawed a filesystem a previous run left frozen"));
    let group = cluster
        .groups()
        .await
        .create_volume_group_snapshot(request)
        .await
        .unwrap()
        .into_inner()
        .group_snapshot
        .unwrap();
    assert_eq!(group.snapshots.len(), 2);
    delete_group_and_volumes(&cluster, &group, &vols).await;
}

/// Two controller replicas: every agent keeps a link to each, so whichever
/// one the sidecars' leader election picks reaches every node, and losing
/// one replica loses no node.
#[tokio::test(flavor = "multi_thread")]
async fn every_agent_is_linked_to_every_controller_replica() {
    let mut cluster = Cluster::start(&[], PoolFs::Ext4).await;
    let root = cluster.root.path().join("second");
    let (mut second, second_link) = start_relay(&root, &cluster.certs, "127.0.0.1:0", &[]);
    cluster.link = format!("{},{second_link}", cluster.link);
    cluster.add_agent("node-a", TestPool::new(PoolFs::Ext4).await, &[]);
    second.wait_for_log("node agent connected node=node-a ").unwrap();

    let mut first_c = cluster.controller().await;
    let mut second_c = ControllerClient::new(second.channel().await);
    let v = create(&mut first_c, on_node("pvc-a", "node-a", 16 * MIB)).await;
    let get = csi::ControllerGetVolumeRequest { volume_id: v.volume_id.clone() };
    second_c.controller_get_volume(get.clone()).await.unwrap();
    cluster.relay.kill();
    // The other replica goes on serving the node.
    second_c.controller_get_volume(get).await.unwrap();
    second_c.delete_volume(req::delete(&v.volume_id)).await.unwrap();
    assert!(cluster.agents[0].pool.files("volumes").is_empty());
}

static RETRIES: AtomicU64 = AtomicU64::new(0);

/// The sidecars' retry: UNAVAILABLE (a node away), ABORTED (a call in
/// flight) and transport errors are tried again after a short backoff, as
/// the sidecars do; anything else is the answer.
async fn retried<T, F, Fut>(mut call: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    // As a sidecar retries, but not for ever: a call that never converges
    // is a failure to report, not a CI run that times out.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        match call().await {
            Err(e)
                if matches!(e.code(), Code::Unavailable | Code::Aborted | Code::Unknown)
                    && std::time::Instant::now() < deadline =>
            {
                RETRIES.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(std::time::Duration::from_millis(10)).await
            }
            other => return other,
        }
    }
}

/// Work through the relay while agents are killed (SIGKILL, mid-call) and
/// started again: every retried call converges, the relay's listing is
/// exactly what was answered, and neither pool needs repair.
#[tokio::test(flavor = "multi_thread")]
async fn work_through_the_relay_converges_while_agents_die() {
    let rounds: usize =
        std::env::var("FERROVOL_RELAY_CHAOS_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(4);
    let seed: u64 = std::env::var("FERROVOL_RELAY_CHAOS_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1717);
    let mut cluster = Cluster::start(&["node-a", "node-b"], PoolFs::Ext4).await;
    let mut rng = common::Rng(seed);
    let mut volumes: std::collections::BTreeMap<String, String> = Default::default();
    let mut snapshots: std::collections::BTreeMap<String, String> = Default::default();
    let done = Arc::new(AtomicU64::new(0));
    for round in 0..rounds {
        // A batch of work, and one agent killed once part of it is done.
        let plan: Vec<(u64, u64)> = (0..12).map(|_| (rng.below(4), rng.next())).collect();
        let victim = rng.below(2) as usize;
        let kill_after = done.load(Ordering::SeqCst) + 1 + rng.below(8);
        let c = cluster.controller().await;
        let (mut vols, mut snaps) = (volumes.clone(), snapshots.clone());
        let counter = done.clone();
        let work = tokio::spawn(async move {
            let c = c;
            for (i, (op, r)) in plan.into_iter().enumerate() {
                let node = if r % 2 == 0 { "node-a" } else { "node-b" };
                match op {
                    0 | 1 => {
                        let name = format!("chaos-{round}-{i}");
                        let v = retried(|| {
                            let (mut c, r) = (c.clone(), on_node(&name, node, 16 * MIB));
                            async move { c.create_volume(r).await }
                        })
                        .await
                        .unwrap();
                        vols.insert(name, v.into_inner().volume.unwrap().volume_id);
                    }
                    2 if !vols.is_empty() => {
                        let (_, id) = vols.iter().nth(r as usize % vols.len()).unwrap();
                        let name = format!("chaos-snap-{round}-{i}");
                        let s = retried(|| {
                            let (mut c, r) = (c.clone(), req::snapshot(&name, id));
                            async move { c.create_snapshot(r).await }
                        })
                        .await
                        .unwrap();
                        snaps.insert(name, s.into_inner().snapshot.unwrap().snapshot_id);
                    }
                    _ if !snaps.is_empty() && r % 3 == 0 => {
                        let name = snaps.keys().nth(r as usize % snaps.len()).unwrap().clone();
                        let id = snaps.remove(&name).unwrap();
                        retried(|| {
                            let (mut c, r) = (c.clone(), req::delete_snapshot(&id));
                            async move { c.delete_snapshot(r).await }
                        })
                        .await
                        .unwrap();
                    }
                    _ if !vols.is_empty() => {
                        let name = vols.keys().nth(r as usize % vols.len()).unwrap().clone();
                        let id = vols.remove(&name).unwrap();
                        retried(|| {
                            let (mut c, r) = (c.clone(), req::delete(&id));
                            async move { c.delete_volume(r).await }
                        })
                        .await
                        .unwrap();
                    }
                    _ => {}
                }
                counter.fetch_add(1, Ordering::SeqCst);
            }
            (vols, snaps)
        });
        // The kill lands between or inside calls, wherever the work is.
        while done.load(Ordering::SeqCst) < kill_after && !work.is_finished() {
            tokio::task::yield_now().await;
        }
        cluster.restart_agent(victim);
        (volumes, snapshots) = work.await.unwrap();
    }
    eprintln!("{} calls retried over {rounds} agent restarts", RETRIES.load(Ordering::Relaxed));
    let mut c = cluster.controller().await;
    let mut listed = list_all_volumes(&mut c, 3).await;
    listed.sort();
    let mut want: Vec<String> = volumes.values().cloned().collect();
    want.sort();
    assert_eq!(listed, want, "the relay lists exactly the volumes it answered");
    let snaps = c.list_snapshots(csi::ListSnapshotsRequest::default()).await.unwrap().into_inner();
    let mut listed: Vec<String> =
        snaps.entries.into_iter().map(|e| e.snapshot.unwrap().snapshot_id).collect();
    listed.sort();
    let mut want: Vec<String> = snapshots.values().cloned().collect();
    want.sort();
    assert_eq!(listed, want, "and exactly the snapshots");
    for id in snapshots.values() {
        c.delete_snapshot(req::delete_snapshot(id)).await.unwrap();
    }
    for id in volumes.values() {
        c.delete_volume(req::delete(id)).await.unwrap();
    }
    for agent in &mut cluster.agents {
        agent.driver.terminate();
        let (clean, report) = common::pool_check(&agent.pool, false);
        assert!(clean, "{}: {report}", agent.name);
        assert!(agent.pool.files("volumes").is_empty() && agent.pool.files("snapshots").is_empty());
    }
}

/// The relay lost while one node is about to take its part: that node's
/// freeze ends with its link, so its part is refused rather than taken at
/// an instant of its own; the retry through a new relay removes what the
/// other node made under the old freeze and takes the group anew, at one
/// instant (the lockstep writers ran throughout).
#[tokio::test(flavor = "multi_thread")]
async fn a_part_whose_freeze_ended_is_never_used() {
    let (mut cluster, _gate, fifo) = paused_on_node_b("create-group-before-clone").await;
    let vols = mounted_on_each(&cluster).await;
    let writer = Lockstep::start(&vols);
    let request = csi::CreateVolumeGroupSnapshotRequest {
        name: "retried".into(),
        source_volume_ids: vols.iter().map(|v| v.0.clone()).collect(),
        ..Default::default()
    };
    let call = {
        let mut g = cluster.groups().await;
        let request = request.clone();
        tokio::spawn(async move { g.create_volume_group_snapshot(request).await })
    };
    cluster.agents[1].driver.wait_for_log("failpoint reached").unwrap();
    cluster.relay.kill();
    assert!(call.await.unwrap().is_err());
    // Once node-b has thawed the freeze its link held (not merely seen the
    // link go: the thaw follows on another task), the part goes on, finds
    // its freeze over, and refuses.
    let thawed = cluster.agents[1].driver.wait_for_log("link closed with filesystems frozen");
    assert!(thawed.is_some(), "node-b thawed:\n{}", cluster.agents[1].driver.logs());
    std::fs::write(&fifo, b"go").unwrap();
    // Its answer is ABORTED, logged whether or not the link's stream was
    // reset before the part ended ("rpc failed" while the wait still
    // stood, "finished after the caller stopped waiting" once it was gone).
    let refused = cluster.agents[1].driver.wait_for_log(r#"code="ABORTED""#);
    let refused = refused.unwrap_or_else(|| {
        panic!("node-b refused no part outside the freeze:\n{}", cluster.agents[1].driver.logs())
    });
    assert!(refused.contains("CreateGroupPart"), "{refused}");

    let root = cluster.root.path().to_path_buf();
    let (relay, _) = start_relay(&root, &cluster.certs, &cluster.link, &[]);
    cluster.relay = relay;
    cluster.wait_connected("node-a");
    cluster.wait_connected("node-b");
    // node-b again, without the failpoint (its pool and mounts as they are).
    cluster.restart_agent(1);
    let g = cluster.groups().await;
    let group = retried(|| {
        let (mut g, r) = (g.clone(), request.clone());
        async move { g.create_volume_group_snapshot(r).await }
    })
    .await
    .unwrap()
    .into_inner()
    .group_snapshot
    .unwrap();
    let written = writer.stop();
    let ends = restored_ends(&cluster, &group).await;
    let (lo, hi) =
        (ends.iter().map(|e| e.1).min().unwrap(), ends.iter().map(|e| e.1).max().unwrap());
    eprintln!("restored members end at {ends:?} of {written} steps");
    assert!(hi - lo <= 1, "members are from one instant: {ends:?}");

    delete_group_and_volumes(&cluster, &group, &vols).await;
}

/// While a relay holds a node's members frozen for a group's instant, the
/// freeze holds their operation locks as a local snapshot does: a node call
/// that would change a member (here an unpublish, which would take the
/// pod's mount away mid-snapshot) is ABORTED until the thaw.
#[tokio::test(flavor = "multi_thread")]
async fn a_cross_node_freeze_holds_its_members_operation_locks() {
    let gate_dir = tempfile::tempdir().unwrap();
    let fifo = gate_dir.path().join("gate");
    rustix::fs::mkfifoat(rustix::fs::CWD, &fifo, rustix::fs::Mode::from_raw_mode(0o600)).unwrap();
    let spec = format!("relay-group-frozen=pause:{}", fifo.display());
    let mut cluster = Cluster::start_with(
        &["node-a", "node-b"],
        PoolFs::Xfs,
        &[("FERROVOL_FAILPOINTS", spec.as_str())],
        |_| vec![],
    )
    .await;
    let vols = mounted_on_each(&cluster).await;
    let call = {
        let mut g = cluster.groups().await;
        let request = csi::CreateVolumeGroupSnapshotRequest {
            name: "locked".into(),
            source_volume_ids: vols.iter().map(|v| v.0.clone()).collect(),
            ..Default::default()
        };
        tokio::spawn(async move { g.create_volume_group_snapshot(request).await })
    };
    // Both nodes frozen by the relay's hold, no part begun.
    cluster.relay.wait_for_log("failpoint reached").unwrap();
    for (agent, (id, _, target)) in cluster.agents.iter().zip(&vols) {
        let mut n = agent.node().await;
        let busy = n.node_unpublish_volume(unpublish_req(id, target)).await.unwrap_err();
        assert_eq!(busy.code(), Code::Aborted, "{busy:?}");
        assert!(common::is_mounted(target), "the pod keeps its mount through the freeze");
    }
    std::fs::write(&fifo, b"go").unwrap();
    let group = call.await.unwrap().unwrap().into_inner().group_snapshot.unwrap();
    delete_group_and_volumes(&cluster, &group, &vols).await;
}

/// A group across two nodes whose delete reaches one node's part but not
/// the other's (node-b's member is busy: a restore from it, started by
/// another controller replica, still runs there). The delete is ABORTED;
/// the sidecar's retry names both members, one of them already gone, and
/// must finish the delete rather than fail for ever on a mismatch (the
/// member VolumeSnapshot of node-b was left behind on a real cluster).
#[tokio::test(flavor = "multi_thread")]
async fn a_group_delete_cut_short_on_one_node_finishes_on_retry() {
    let mut cluster = Cluster::start(&["node-a", "node-b"], PoolFs::Xfs).await;
    let vols = mounted_on_each(&cluster).await;
    let ids: Vec<String> = vols.iter().map(|v| v.0.clone()).collect();
    let group = take_group(&cluster, "cut-short", &ids).await;
    let on_b = group.snapshots.iter().find(|s| s.snapshot_id.ends_with("@node-b")).unwrap();
    let delete = csi::DeleteVolumeGroupSnapshotRequest {
        group_snapshot_id: group.group_snapshot_id.clone(),
        snapshot_ids: group.snapshots.iter().map(|s| s.snapshot_id.clone()).collect(),
        ..Default::default()
    };
    // A member named that lives on outside the group is still a mismatch,
    // and so is a member left out.
    let mut c = cluster.controller().await;
    let loner = snapshot(&mut c, "loner", &vols[0].0).await;
    let mut extra = delete.clone();
    extra.snapshot_ids.push(loner.snapshot_id.clone());
    let mut short = delete.clone();
    short.snapshot_ids.pop();
    for bad in [extra, short] {
        let e = cluster.groups().await.delete_volume_group_snapshot(bad).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    }
    c.delete_snapshot(req::delete_snapshot(&loner.snapshot_id)).await.unwrap();

    // node-b again, a restore from its member paused inside node-b.
    let gate = tempfile::tempdir().unwrap();
    let fifo = gate.path().join("gate");
    rustix::fs::mkfifoat(rustix::fs::CWD, &fifo, rustix::fs::Mode::from_raw_mode(0o600)).unwrap();
    let spec = format!("create-volume-after-reserve=pause:{}", fifo.display());
    cluster.restart_agent_with(1, &[("FERROVOL_FAILPOINTS", &spec)]);
    let restore = {
        let mut own = cluster.agents[1].local().await;
        let r = req::from_snapshot("restore-on-b", &on_b.snapshot_id, 64 * MIB);
        tokio::spawn(async move { own.create_volume(r).await })
    };
    cluster.agents[1].driver.wait_for_log("failpoint reached").unwrap();

    let e = cluster.groups().await.delete_volume_group_snapshot(delete.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::Aborted, "{e:?}");
    assert!(cluster.agents[0].pool.files("snapshots").is_empty(), "node-a's part went");
    assert_eq!(cluster.agents[1].pool.files("snapshots").len(), 1, "node-b's part stayed");

    std::fs::write(&fifo, b"go").unwrap();
    let restored = restore.await.unwrap().unwrap().into_inner().volume.unwrap();
    // The sidecar's retry, with the same members.
    cluster.groups().await.delete_volume_group_snapshot(delete.clone()).await.unwrap();
    assert!(cluster.agents[1].pool.files("snapshots").is_empty(), "node-b's part went");
    let e = cluster
        .groups()
        .await
        .get_volume_group_snapshot(csi::GetVolumeGroupSnapshotRequest {
            group_snapshot_id: group.group_snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    c.delete_volume(req::delete(&restored.volume_id)).await.unwrap();
    delete_group_and_volumes(&cluster, &group, &vols).await;
}

/// The relay's Deployment runs the controller sidecars beside it, the
/// agents' DaemonSet the node ones: each starts (csi-resizer exited at
/// start beside the relay, which answered its NodeGetCapabilities with an
/// empty UNIMPLEMENTED, so a PVC edit never grew a volume).
#[tokio::test(flavor = "multi_thread")]
async fn the_sidecars_start_beside_the_relay_and_the_agents() {
    use crate::sidecars::{assert_start, assert_unserved_says_so, CONTROLLER, NODE};
    let cluster = Cluster::start(&["node-a"], PoolFs::Ext4).await;
    let relay = cluster.relay.channel().await;
    assert_start(&relay, CONTROLLER, "--mode relay").await;
    assert_unserved_says_so(&relay, true).await;
    let agent = cluster.agents[0].driver.channel().await;
    assert_start(&agent, CONTROLLER, "--mode agent").await;
    assert_start(&agent, NODE, "--mode agent").await;
}

/// A restore of a snapshot that lives on node-b, for a pod the scheduler
/// put on node-a: refused with what was asked for and where the snapshot
/// is (it named node-b's own topology only, and the claim stayed Pending
/// with nothing to go on). The same for a clone.
#[tokio::test(flavor = "multi_thread")]
async fn a_restore_for_another_node_says_where_its_source_lives() {
    let cluster = Cluster::start(&["node-a", "node-b"], PoolFs::Ext4).await;
    let mut c = cluster.controller().await;
    let source = create(&mut c, on_node("pvc-b", "node-b", 16 * MIB)).await;
    let snap = snapshot(&mut c, "snap-b", &source.volume_id).await;
    let pinned = on_node("restore", "node-a", 16 * MIB);
    let topology = pinned.accessibility_requirements.clone();
    for (noun, from) in [
        ("snapshot", req::from_snapshot("restore", &snap.snapshot_id, 16 * MIB)),
        ("volume", req::from_volume("clone", &source.volume_id, 16 * MIB)),
    ] {
        let r = csi::CreateVolumeRequest { accessibility_requirements: topology.clone(), ..from };
        let e = c.create_volume(r).await.unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
        let m = e.message();
        assert!(m.contains(&format!("{noun} ")) && m.contains("lives on node node-b"), "{m}");
        assert!(m.contains("allows only {local.csi.ferrovol.io/node=node-a}"), "{m}");
    }
    assert_eq!(cluster.agents[1].pool.files("volumes").len(), 1, "nothing made on node-b");
    c.delete_snapshot(req::delete_snapshot(&snap.snapshot_id)).await.unwrap();
    c.delete_volume(req::delete(&source.volume_id)).await.unwrap();
}

/// `link certs --out` where certificates already are: refused, naming them
/// and --force, the old CA untouched (replacing it silently broke every
/// agent at its next restart); with --force, replaced.
#[test]
fn link_certs_never_replaces_a_ca_unasked() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("link");
    certs(&dir, &[]);
    let ca = std::fs::read(dir.join("relay/ca.crt")).unwrap();
    let run = |extra: &[&str]| {
        std::process::Command::new(BIN)
            .args(["link", "certs", "--out"])
            .arg(&dir)
            .args(extra)
            .output()
            .unwrap()
    };
    let again = run(&[]);
    let said = String::from_utf8_lossy(&again.stderr);
    assert!(!again.status.success(), "{said}");
    assert!(said.contains("--force") && said.contains("ca.crt"), "{said}");
    assert_eq!(std::fs::read(dir.join("relay/ca.crt")).unwrap(), ca, "untouched");
    assert!(run(&["--force"]).status.success());
    assert_ne!(std::fs::read(dir.join("relay/ca.crt")).unwrap(), ca, "replaced");
}

/// One identity per node. An agent claiming node-a's ID with node-b's
/// certificate is refused; so is a second process with node-a's own
/// certificate while node-a's link is live (it replaced the link before:
/// the two flapped, node-a's volume was NOT_FOUND and its delete answered
/// OK with the data still there). The real node-a is served throughout,
/// and each refused agent backs off rather than redialling at once.
#[tokio::test(flavor = "multi_thread")]
async fn an_impostor_node_is_refused_and_the_real_one_unaffected() {
    let mut cluster = Cluster::start(&["node-a", "node-b"], PoolFs::Ext4).await;
    let mut c = cluster.controller().await;
    let vol = create(&mut c, on_node("pvc-a", "node-a", 16 * MIB)).await;
    let connected = "node agent connected node=node-a ";
    let before = cluster.relay.logs().matches(connected).count();

    let mut impostors = Vec::new();
    for (name, cert_of) in [("wrong-cert", "node-b"), ("second-link", "node-a")] {
        let pool = TestPool::new(PoolFs::Ext4).await;
        let kubelet = Kubelet::new(&pool);
        let root = cluster.root.path().join(name);
        let certs = cluster.node_certs(cert_of);
        let d = cluster.agent_with_certs("node-a", &root, &pool, &kubelet, &certs).start();
        impostors.push((d, kubelet, pool));
    }
    let refused = "refused a link connection";
    assert!(cluster.relay.wait_for_log_count(refused, 2), "{}", cluster.relay.logs());
    let logs = cluster.relay.logs();
    assert!(logs.contains("presented a certificate that is not node node-a's"), "{logs}");
    assert!(logs.contains("node node-a already has a live link"), "{logs}");
    // Each impostor backs off: by its third refusal it waits over a second.
    for (d, _, _) in &mut impostors {
        assert!(d.wait_for_log_count("link to the relay lost at once", 3));
        let third = d
            .logs()
            .lines()
            .filter(|l| l.contains("link to the relay lost at once"))
            .nth(2)
            .unwrap()
            .to_string();
        assert!(third.contains("retry_in=800ms") || third.contains("retry_in=1."), "{third}");
    }
    assert_eq!(cluster.relay.logs().matches(connected).count(), before, "node-a never replaced");

    // node-a is served as before: its volume is there, placed there, and a
    // new one for node-a lands in node-a's pool.
    let got = c
        .controller_get_volume(csi::ControllerGetVolumeRequest { volume_id: vol.volume_id.clone() })
        .await
        .unwrap();
    assert_eq!(got.into_inner().volume.unwrap().volume_id, vol.volume_id);
    let next = create(&mut c, on_node("pvc-a2", "node-a", 16 * MIB)).await;
    assert_eq!(cluster.agents[0].pool.files("volumes").len(), 2);
    for (_, _, pool) in &impostors {
        assert!(pool.files("volumes").is_empty(), "nothing placed on an impostor");
    }
    for v in [vol, next] {
        c.delete_volume(req::delete(&v.volume_id)).await.unwrap();
    }
    assert!(cluster.agents[0].pool.files("volumes").is_empty());
}

/// A node that never comes back: while it is merely gone, its objects
/// are UNAVAILABLE (never an OK for a delete that did not happen); once the
/// operator retires it (`--retired-node`, on a relay restart), deletes of
/// its volumes and snapshots answer OK, lookups and snapshots of them
/// NOT_FOUND, listings go on without it, and its link is refused should it
/// return. Every such answer is logged.
#[tokio::test(flavor = "multi_thread")]
async fn a_retired_node_s_objects_are_gone_as_the_spec_says() {
    let mut cluster = Cluster::start(&["node-a", "node-b"], PoolFs::Ext4).await;
    let mut c = cluster.controller().await;
    let on_a = create(&mut c, on_node("pvc-a", "node-a", 16 * MIB)).await;
    let on_b = create(&mut c, on_node("pvc-b", "node-b", 16 * MIB)).await;
    let snap_b = snapshot(&mut c, "snap-b", &on_b.volume_id).await;
    cluster.agents[1].driver.kill();
    cluster.relay.wait_for_log("node agent disconnected node=node-b").unwrap();
    let e = c.delete_volume(req::delete(&on_b.volume_id)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "merely gone is not retired: {e:?}");

    cluster.relay.kill();
    let root = cluster.root.path().to_path_buf();
    let (relay, _) =
        start_relay(&root, &cluster.certs, &cluster.link, &[("FERROVOL_RETIRED_NODES", "node-b")]);
    cluster.relay = relay;
    cluster.wait_connected("node-a");
    assert!(cluster.relay.logs().contains("node retired by the operator"));
    let mut c = cluster.controller().await;

    let get = |id: &str| csi::ControllerGetVolumeRequest { volume_id: id.to_string() };
    let e = c.controller_get_volume(get(&on_b.volume_id)).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = c.create_snapshot(req::snapshot("again", &on_b.volume_id)).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let validate = csi::ValidateVolumeCapabilitiesRequest {
        volume_id: on_b.volume_id.clone(),
        volume_capabilities: vec![req::mount_cap("ext4")],
        ..Default::default()
    };
    let e = c.validate_volume_capabilities(validate).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    c.delete_snapshot(req::delete_snapshot(&snap_b.snapshot_id)).await.unwrap();
    c.delete_volume(req::delete(&on_b.volume_id)).await.unwrap();
    let listed = list_all_volumes(&mut c, 0).await;
    assert_eq!(listed, std::slice::from_ref(&on_a.volume_id), "the listing goes on without node-b");
    assert!(cluster.relay.logs().contains("the object of a retired node is gone"));

    // node-b comes back after all: refused.
    let agent = &cluster.agents[1];
    let b = cluster.agent_builder(&agent.name, &agent.root, &agent.pool, &agent.kubelet);
    cluster.agents[1].driver = b.start();
    assert!(cluster.relay.wait_for_log("is retired (--retired-node)").is_some());
    c.delete_volume(req::delete(&on_a.volume_id)).await.unwrap();
}

/// The engines' one conformance suite, on the local engine through the
/// relay: the controller calls go to the relay, the node calls to the
/// agent that holds the volumes.
#[tokio::test(flavor = "multi_thread")]
async fn conformance_through_the_relay() {
    let cluster = Cluster::start(&["node-a"], PoolFs::Xfs).await;
    let agent = &cluster.agents[0];
    let subject = common::Conforming {
        name: "local through the relay".into(),
        controller: cluster.relay.channel().await,
        node: Some((agent.driver.channel().await, agent.kubelet.dir.clone())),
        create: Box::new(|name, bytes, cap| csi::CreateVolumeRequest {
            volume_capabilities: vec![cap],
            ..req::create(name, bytes)
        }),
        volume_size: 320 * MIB,
        fs_type: "xfs".into(),
    };
    ferrovol_testkit::conformance::run(&subject).await;
    agent.kubelet.assert_clean();
}
