//! Soak: thousands of mixed operations at concurrency 16 against one driver
//! on a copy pool (so snapshots, restores and clones really copy data), with
//! Probe sampled throughout. Checks that every operation succeeds, that the
//! driver's memory stays flat, and that everything is cleaned up; reports
//! throughput and latency percentiles per RPC (printed, and written to
//! `target/tmp/soak-report.txt`). Performance is reported, not asserted.
//!
//! Longer by hand: `FERROVOL_SOAK_ITERATIONS=2000 cargo test --release
//! --test soak -- --nocapture`.

use crate::common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::req::{self, publish_req, stage_req, unpublish_req, unstage_req, MIB};
use common::{DriverBuilder, Kubelet, PoolFs, Rng, TestPool};
use ferrovol_csi as csi;
use ferrovol_csi::controller_client::ControllerClient;
use ferrovol_csi::group_controller_client::GroupControllerClient;
use ferrovol_csi::identity_client::IdentityClient;
use ferrovol_csi::node_client::NodeClient;
use tonic::transport::Channel;

const WORKERS: u64 = 16;
/// Iterations per worker in CI; each is one to four RPCs.
const DEFAULT_ITERATIONS: u64 = 1500;
const WARMUP_ITERATIONS: u64 = 10;
/// Data in each worker's source volume: what every snapshot, restore and
/// clone copies on this pool.
const DATA: usize = 8 << 20;
/// Memory growth allowed between warm-up and the end. A leak of anything per
/// operation (a record, a buffer, a task) over thousands of operations
/// passes this; allocator noise does not.
const RSS_GROWTH_LIMIT: u64 = 48 << 20;
/// A Probe that waited behind a copy or a group snapshot would take as long
/// as they do; this is a failure bound, far above the 10 ms goal.
const PROBE_FAILURE_BOUND: Duration = Duration::from_secs(5);

type Latencies = Arc<Mutex<BTreeMap<&'static str, Vec<Duration>>>>;

struct Clients {
    c: ControllerClient<Channel>,
    g: GroupControllerClient<Channel>,
    n: NodeClient<Channel>,
    latencies: Latencies,
}

impl Clients {
    fn new(channel: &Channel, latencies: Latencies) -> Clients {
        Clients {
            c: ControllerClient::new(channel.clone()),
            g: GroupControllerClient::new(channel.clone()),
            n: NodeClient::new(channel.clone()),
            latencies,
        }
    }

    /// Runs one RPC, records its latency, and fails the test on any error.
    async fn timed<T, F>(&self, method: &'static str, call: F) -> T
    where
        F: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let start = Instant::now();
        let result = call.await;
        let took = start.elapsed();
        self.latencies.lock().unwrap().entry(method).or_default().push(took);
        match result {
            Ok(r) => r.into_inner(),
            Err(s) => panic!("{method} failed under load: {s:?}"),
        }
    }
}

/// What one worker owns: nothing is shared between workers, so every call
/// must succeed (no ABORTED is expected).
struct Worker {
    w: u64,
    data: String,
    volumes: Vec<String>,
    /// Those of `volumes` made empty: the ones a pod may format (the
    /// others hold the data volume's raw pattern, which no stage formats).
    empty: std::collections::HashSet<String>,
    snapshots: Vec<String>,
    rng: Rng,
    seq: u64,
}

impl Worker {
    fn name(&mut self, what: &str) -> String {
        self.seq += 1;
        format!("w{}-{what}-{}", self.w, self.seq)
    }

    async fn create(&mut self, k: &mut Clients, r: csi::CreateVolumeRequest) {
        let v = k.timed("CreateVolume", k.c.clone().create_volume(r)).await;
        self.volumes.push(v.volume.unwrap().volume_id);
    }

    async fn delete_volume(&mut self, k: &mut Clients) {
        let id = self.volumes.remove(0);
        k.timed("DeleteVolume", k.c.clone().delete_volume(req::delete(&id))).await;
    }

    async fn delete_snapshot(&mut self, k: &mut Clients) {
        let id = self.snapshots.remove(0);
        k.timed("DeleteSnapshot", k.c.clone().delete_snapshot(req::delete_snapshot(&id))).await;
    }

    async fn step(&mut self, k: &mut Clients, kubelet: &Kubelet) {
        let roll = self.rng.below(100);
        let size = (8 + self.rng.below(24) as i64) * MIB;
        match roll {
            _ if self.volumes.len() >= 6 => self.delete_volume(k).await,
            _ if self.snapshots.len() >= 4 => self.delete_snapshot(k).await,
            0..=21 => {
                let name = self.name("v");
                self.create(k, req::create(&name, size)).await;
                self.empty.extend(self.volumes.last().cloned());
            }
            22..=33 if !self.volumes.is_empty() => self.delete_volume(k).await,
            34..=45 => {
                let name = self.name("s");
                let r = req::snapshot(&name, &self.data);
                let s = k.timed("CreateSnapshot", k.c.clone().create_snapshot(r)).await;
                self.snapshots.push(s.snapshot.unwrap().snapshot_id);
            }
            46..=53 if !self.snapshots.is_empty() => {
                let name = self.name("restore");
                let from =
                    self.snapshots[self.rng.below(self.snapshots.len() as u64) as usize].clone();
                self.create(k, req::from_snapshot(&name, &from, 32 * MIB)).await
            }
            54..=57 => {
                let name = self.name("clone");
                let data = self.data.clone();
                self.create(k, req::from_volume(&name, &data, 32 * MIB)).await
            }
            58..=65 if !self.snapshots.is_empty() => self.delete_snapshot(k).await,
            66..=73 => {
                let r = csi::ListVolumesRequest { max_entries: 50, ..Default::default() };
                k.timed("ListVolumes", k.c.clone().list_volumes(r)).await;
            }
            74..=79 => {
                let r = csi::GetCapacityRequest::default();
                k.timed("GetCapacity", k.c.clone().get_capacity(r)).await;
            }
            80..=85 => {
                let r = csi::ControllerGetVolumeRequest { volume_id: self.data.clone() };
                k.timed("ControllerGetVolume", k.c.clone().controller_get_volume(r)).await;
            }
            86..=90 => {
                let mut members = vec![self.data.clone()];
                members.extend(self.volumes.first().cloned());
                let r = csi::CreateVolumeGroupSnapshotRequest {
                    name: self.name("g"),
                    source_volume_ids: members,
                    ..Default::default()
                };
                let g = k
                    .timed("CreateVolumeGroupSnapshot", k.g.clone().create_volume_group_snapshot(r))
                    .await;
                let g = g.group_snapshot.unwrap();
                let r = csi::DeleteVolumeGroupSnapshotRequest {
                    group_snapshot_id: g.group_snapshot_id,
                    snapshot_ids: g.snapshots.into_iter().map(|s| s.snapshot_id).collect(),
                    ..Default::default()
                };
                k.timed("DeleteVolumeGroupSnapshot", k.g.clone().delete_volume_group_snapshot(r))
                    .await;
            }
            91..=95 if self.volumes.iter().any(|v| self.empty.contains(v)) => {
                // A pod comes and goes: format on first use, mount, unmount.
                let id = self.volumes.iter().find(|v| self.empty.contains(*v)).unwrap().clone();
                let cap = req::mount_cap("ext4");
                let pv = self.name("pv");
                let (staging, target) = (kubelet.staging(&pv), kubelet.target(&pv, &pv));
                let n = k.n.clone();
                k.timed(
                    "NodeStageVolume",
                    n.clone().node_stage_volume(stage_req(&id, &staging, cap.clone())),
                )
                .await;
                let p = publish_req(&id, &staging, &target, cap, false);
                k.timed("NodePublishVolume", n.clone().node_publish_volume(p)).await;
                k.timed(
                    "NodeUnpublishVolume",
                    n.clone().node_unpublish_volume(unpublish_req(&id, &target)),
                )
                .await;
                k.timed(
                    "NodeUnstageVolume",
                    n.clone().node_unstage_volume(unstage_req(&id, &staging)),
                )
                .await;
            }
            _ => {
                let r = csi::ListSnapshotsRequest {
                    source_volume_id: self.data.clone(),
                    ..Default::default()
                };
                k.timed("ListSnapshots", k.c.clone().list_snapshots(r)).await;
            }
        }
    }

    async fn clean_up(&mut self, k: &mut Clients) {
        while !self.snapshots.is_empty() {
            self.delete_snapshot(k).await;
        }
        while !self.volumes.is_empty() {
            self.delete_volume(k).await;
        }
        k.timed("DeleteVolume", k.c.clone().delete_volume(req::delete(&self.data))).await;
    }
}

fn rss_bytes(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/pid/status");
    kib << 10
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Runs `iterations` steps on every worker at once; answers the wall time.
async fn phase(
    workers: Vec<Worker>,
    iterations: u64,
    channel: &Channel,
    latencies: &Latencies,
    kubelet: &Arc<Kubelet>,
) -> (Vec<Worker>, Duration) {
    let start = Instant::now();
    let tasks: Vec<_> = workers
        .into_iter()
        .map(|mut w| {
            let mut k = Clients::new(channel, latencies.clone());
            let kubelet = kubelet.clone();
            tokio::spawn(async move {
                for _ in 0..iterations {
                    w.step(&mut k, &kubelet).await;
                }
                w
            })
        })
        .collect();
    let mut done = Vec::new();
    for t in tasks {
        done.push(t.await.expect("a worker panicked"));
    }
    (done, start.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mixed_load_at_concurrency_16_stays_correct_flat_and_responsive() {
    let iterations: u64 = std::env::var("FERROVOL_SOAK_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_ITERATIONS);
    let pool = TestPool::new(PoolFs::Ext4).await;
    let kubelet = Arc::new(Kubelet::new(&pool));
    let root = tempfile::tempdir().unwrap();
    let mut driver = DriverBuilder::new(root.path()).pool(&pool).kubelet(&kubelet).start();
    let channel = driver.channel().await;
    let latencies: Latencies = Arc::default();

    // Each worker's source volume holds real data, so copies cost something.
    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let mut c = ControllerClient::new(channel.clone());
        let data =
            req::new_volume(&mut c, &format!("w{w}-data"), 32 * MIB, req::mount_cap("ext4")).await;
        common::write_pattern(&pool.volume_file(&data), 0, DATA, w as u8);
        let rng = Rng(0x50a4_0000 + w * 7919 + 1);
        let empty = Default::default();
        workers.push(Worker { w, data, volumes: vec![], empty, snapshots: vec![], rng, seq: 0 });
    }

    // Probe, sampled the whole time, from its own connection (as the
    // liveness sidecar has); GetPluginInfo beside it is the floor: an RPC
    // that does no work at all, under the same load.
    let stop = Arc::new(AtomicBool::new(false));
    let probes = {
        let (stop, ch) = (stop.clone(), driver.channel().await);
        tokio::spawn(async move {
            let mut id = IdentityClient::new(ch);
            let (mut probe, mut floor) = (Vec::new(), Vec::new());
            while !stop.load(Ordering::Relaxed) {
                let start = Instant::now();
                let r = id.probe(csi::ProbeRequest {}).await.expect("Probe failed under load");
                assert_eq!(r.into_inner().ready, Some(true));
                probe.push(start.elapsed());
                let start = Instant::now();
                id.get_plugin_info(csi::GetPluginInfoRequest {}).await.unwrap();
                floor.push(start.elapsed());
                // The sampling interval of a liveness prober, not a wait.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (probe, floor)
        })
    };

    let (workers, _) = phase(workers, WARMUP_ITERATIONS, &channel, &latencies, &kubelet).await;
    let rss_before = rss_bytes(driver.pid());
    latencies.lock().unwrap().clear();
    let (mut workers, elapsed) = phase(workers, iterations, &channel, &latencies, &kubelet).await;
    let rss_after = rss_bytes(driver.pid());
    stop.store(true, Ordering::Relaxed);
    let (mut probe_samples, mut floor) = probes.await.unwrap();

    for w in &mut workers {
        let mut k = Clients::new(&channel, Arc::default());
        w.clean_up(&mut k).await;
    }

    // The report.
    let mut report = String::new();
    let all = latencies.lock().unwrap().clone();
    let total: usize = all.values().map(Vec::len).sum();
    report += &format!(
        "soak: {WORKERS} workers x {iterations} iterations, {total} RPCs in {:.1} s = {:.0} RPC/s\n",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64()
    );
    report +=
        &format!("{:<28} {:>7} {:>9} {:>9} {:>9}\n", "rpc", "count", "p50 ms", "p99 ms", "max ms");
    for (method, mut v) in all {
        v.sort();
        report += &format!(
            "{method:<28} {:>7} {:>9.2} {:>9.2} {:>9.2}\n",
            v.len(),
            ms(percentile(&v, 0.5)),
            ms(percentile(&v, 0.99)),
            ms(*v.last().unwrap())
        );
    }
    probe_samples.sort();
    floor.sort();
    let probe_p99 = percentile(&probe_samples, 0.99);
    for (what, v) in
        [("Probe (during the load)", &probe_samples), ("GetPluginInfo (floor)", &floor)]
    {
        report += &format!(
            "{what:<28} {:>7} {:>9.2} {:>9.2} {:>9.2}\n",
            v.len(),
            ms(percentile(v, 0.5)),
            ms(percentile(v, 0.99)),
            ms(*v.last().unwrap())
        );
    }
    report += &format!(
        "Probe p99 goal (< 10 ms): {}\n",
        if probe_p99 < Duration::from_millis(10) { "met" } else { "NOT met" }
    );
    report += &format!(
        "driver RSS: {:.1} MiB after warm-up, {:.1} MiB at the end ({:+.1} MiB)\n",
        rss_before as f64 / MIB as f64,
        rss_after as f64 / MIB as f64,
        (rss_after as f64 - rss_before as f64) / MIB as f64
    );
    eprint!("{report}");
    std::fs::write(
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("soak-report.txt"),
        &report,
    )
    .unwrap();

    assert!(total as u64 >= WORKERS * iterations, "every iteration made a call");
    assert!(
        rss_after <= rss_before + RSS_GROWTH_LIMIT,
        "driver memory grew from {rss_before} to {rss_after} bytes"
    );
    assert!(*probe_samples.last().unwrap() < PROBE_FAILURE_BOUND, "Probe waited behind work");
    kubelet.assert_clean();
    assert!(pool.files("volumes").is_empty() && pool.files("snapshots").is_empty());
    drop(channel);
    assert!(driver.terminate().success());
    let (clean, text) = common::pool_check(&pool, false);
    assert!(clean, "{text}");
}
