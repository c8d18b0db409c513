//! `ferrovol bench`: numbers, not assertions. Starts the real driver (this
//! binary) on a fresh XFS pool and measures it over its unix socket, the way
//! the sidecars reach it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ferrovol_csi as csi;
use ferrovol_csi::controller_client::ControllerClient;
use ferrovol_csi::group_controller_client::GroupControllerClient;
use ferrovol_csi::node_client::NodeClient;
use tonic::transport::Channel;

use crate::endpoint::{self, Endpoint};
use crate::scratch::{Options, Scratch};

pub mod limits;
mod relay;

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Which engine to measure: `local` (a temporary XFS pool), `rbd` or
    /// `cephfs` (a Ceph cluster, --ceph-conf; e.g. scripts/ceph-dev-cluster).
    #[arg(long, value_enum, default_value_t = BenchEngine::Local)]
    pub engine: BenchEngine,
    /// The RBD engine's cluster.
    #[arg(long)]
    pub ceph_conf: Option<PathBuf>,
    /// The RBD engine's pool.
    #[arg(long, default_value = "rbd")]
    pub rbd_pool: String,
    /// RBD create+delete pairs per concurrency level.
    #[arg(long, default_value_t = 200)]
    pub rbd_pairs: usize,
    /// The CephFS engine's file system.
    #[arg(long, default_value = "cephfs")]
    pub cephfs_fs: String,
    /// CephFS create+delete pairs per concurrency level.
    #[arg(long, default_value_t = 40)]
    pub cephfs_pairs: usize,
    /// CephFS: the files the many-files restore spreads --data-mib over.
    #[arg(long, default_value_t = 10_000)]
    pub cephfs_files: usize,
    /// The RBD StorageClass's imageFeatures (ceph-csi's default: layering).
    #[arg(long, default_value = "layering")]
    pub rbd_image_features: String,
    /// Use this pool directory instead of making a temporary XFS pool.
    #[arg(long)]
    pub pool_dir: Option<PathBuf>,
    /// Create+delete pairs per concurrency level.
    #[arg(long, default_value_t = 4000)]
    pub pairs: usize,
    /// Data written into the source volume before snapshot/restore/clone.
    #[arg(long, default_value_t = 1024)]
    pub data_mib: u64,
    /// Samples per latency measurement.
    #[arg(long, default_value_t = 21)]
    pub samples: usize,
    /// Run only these sections (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub only: Vec<Section>,
    /// Seconds per fio run (0 skips the data-path comparison).
    #[arg(long, default_value_t = 3)]
    pub fio_seconds: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchEngine {
    Local,
    Rbd,
    Cephfs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Section {
    /// A no-op RPC (GetPluginInfo): the floor under every call.
    Rpc,
    Provisioning,
    Cow,
    Node,
    Group,
    Delta,
    Fio,
    /// Start-up to a ready socket at 1,000, 10,000 and 100,000 volumes.
    Startup,
    /// The pool's flush floor (fsync of a write, of a directory).
    Floor,
    /// CreateSnapshot of a mounted volume: RPC latency and freeze window.
    Mounted,
    /// The kubelet's full node cycle, with and without mkfs.
    Cycle,
    /// Small RPCs: filesystem CreateVolume/DeleteVolume, block
    /// stage/unstage, NodeExpandVolume.
    Small,
    /// What the relay adds per call (local vs relayed, p50/p99), and the
    /// freeze window of a group snapshot across two nodes.
    Relay,
}

fn mount_cap() -> csi::VolumeCapability {
    use csi::volume_capability::{access_mode::Mode, AccessMode, AccessType, MountVolume};
    csi::VolumeCapability {
        access_mode: Some(AccessMode { mode: Mode::SingleNodeWriter as i32 }),
        access_type: Some(AccessType::Mount(MountVolume::default())),
    }
}

pub fn create_request(
    name: String,
    bytes: i64,
    source: Option<csi::VolumeContentSource>,
) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name,
        capacity_range: Some(csi::CapacityRange { required_bytes: bytes, limit_bytes: 0 }),
        volume_capabilities: vec![mount_cap()],
        volume_content_source: source,
        ..Default::default()
    }
}

/// CreateVolume, answering the volume or the error as text.
pub async fn create(
    c: &mut ControllerClient<Channel>,
    r: csi::CreateVolumeRequest,
) -> Result<csi::Volume, String> {
    c.create_volume(r)
        .await
        .map_err(|e| e.to_string())?
        .into_inner()
        .volume
        .ok_or_else(|| "no volume".into())
}

/// CreateSnapshot named `name` of `source`, answering the snapshot or the
/// error as text.
pub async fn snapshot(
    c: &mut ControllerClient<Channel>,
    name: String,
    source: &str,
) -> Result<csi::Snapshot, String> {
    c.create_snapshot(csi::CreateSnapshotRequest {
        name,
        source_volume_id: source.to_string(),
        ..Default::default()
    })
    .await
    .map_err(|e| e.to_string())?
    .into_inner()
    .snapshot
    .ok_or_else(|| "no snapshot".into())
}

/// A new ext4 volume of `size` bytes, for the node sections: its ID.
async fn fs_volume(
    c: &mut ControllerClient<Channel>,
    name: String,
    size: i64,
) -> Result<String, String> {
    let request = csi::CreateVolumeRequest {
        volume_capabilities: vec![node_cap()],
        ..create_request(name, size, None)
    };
    Ok(create(c, request).await?.volume_id)
}

pub async fn delete(c: &mut ControllerClient<Channel>, volume_id: String) -> Result<(), String> {
    c.delete_volume(csi::DeleteVolumeRequest { volume_id, ..Default::default() })
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

/// A Ceph engine's bench: this binary started as the driver with `args`
/// (its own scratch directory), connected to and probed (the engine loads
/// its libraries and connects on its first call). Answers the scratch,
/// the channel and the driver's pid.
pub async fn start_engine(
    name: &'static str,
    args: Vec<String>,
) -> Result<(Scratch, Channel, u32), String> {
    let options =
        Options { local_pool: false, name, pool_dir: None, pool_size: 0, rust_log: "warn", args };
    let scratch = Scratch::start(options).await?;
    let channel = endpoint::connect(&Endpoint::Unix(scratch.socket.clone()))
        .await
        .map_err(|e| format!("connecting: {e}"))?;
    let pid = scratch.driver_pid().unwrap_or(0);
    csi::identity_client::IdentityClient::new(channel.clone())
        .probe(csi::ProbeRequest {})
        .await
        .map_err(|e| format!("Probe: {e}"))?;
    Ok((scratch, channel, pid))
}

/// Create+delete pairs per second over the driver, `concurrency` callers
/// at once, `pairs` in all; `request` makes the CreateVolume for a name.
pub async fn create_delete_pairs(
    channel: &Channel,
    concurrency: usize,
    pairs: usize,
    request: impl Fn(String) -> csi::CreateVolumeRequest + Clone + Send + 'static,
) -> Result<f64, String> {
    let per_worker = pairs.div_ceil(concurrency);
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..concurrency {
        let mut c = ControllerClient::new(channel.clone());
        let request = request.clone();
        workers.push(tokio::spawn(async move {
            for i in 0..per_worker {
                let v = create(&mut c, request(format!("bench-{concurrency}-{w}-{i}"))).await?;
                delete(&mut c, v.volume_id).await?;
            }
            Ok::<_, String>(())
        }));
    }
    for w in workers {
        w.await.map_err(|e| e.to_string())??;
    }
    Ok((per_worker * concurrency) as f64 / started.elapsed().as_secs_f64())
}

/// A kB field of /proc/<pid>/<file> (`status`, `smaps_rollup`), in KiB.
pub fn proc_kib(pid: u32, file: &str, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/{file}")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// Blocking bench work, off the executor through the one off-executor
/// helper, to its end.
pub async fn off<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
    ferrovol_host::offload::to_completion("bench work", move || Ok(f()))
        .await
        .map_err(|e| e.message().to_string())
}

/// p50, p90 and max of a set of durations, in milliseconds.
pub fn percentiles(samples: &mut [Duration]) -> (f64, f64, f64) {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let at = |q: f64| ms(samples[((samples.len() - 1) as f64 * q).round() as usize]);
    (at(0.5), at(0.9), ms(*samples.last().unwrap()))
}

pub async fn run(args: BenchArgs) -> Result<(), String> {
    if args.engine != BenchEngine::Local {
        // Beside the bare librbd calls it is made of: the RBD engine's own
        // crate runs it (this crate links no engine and no Ceph).
        return Err(
            "the Ceph engines' benches run from the ferrovol binary (ferrovol bench --engine rbd|cephfs)".into()
        );
    }
    let others = args.only.is_empty() || args.only.iter().any(|s| *s != Section::Relay);
    if others {
        one_driver(&args).await?;
    }
    if args.only.is_empty() || args.only.contains(&Section::Relay) {
        relay::run(args.samples).await?;
    }
    Ok(())
}

/// Every section but the relay's, on one driver.
async fn one_driver(args: &BenchArgs) -> Result<(), String> {
    let scratch = Scratch::start(Options {
        local_pool: true,
        name: "bench",
        pool_dir: args.pool_dir.clone(),
        pool_size: 16 << 30,
        // The freeze window of group snapshots is read back from this log.
        rust_log: "warn,ferrovol_core::services::group_controller=info,ferrovol_local=debug",
        args: vec![],
    })
    .await?;
    bench(args, &scratch).await
}

async fn bench(args: &BenchArgs, scratch: &Scratch) -> Result<(), String> {
    let (work, pool_dir) = (scratch.work.as_path(), scratch.pool_dir.as_path());
    let channel = endpoint::connect(&Endpoint::Unix(scratch.socket.clone()))
        .await
        .map_err(|e| format!("connecting: {e}"))?;
    println!(
        "ferrovol bench: pool {} (driver {})",
        pool_dir.display(),
        ferrovol_csi::build::version()
    );

    let run = |s: Section| args.only.is_empty() || args.only.contains(&s);
    println!(
        "(\"reference\": csi-driver-host-path, which keeps nothing durable; static figures \
         measured elsewhere, not in this run)"
    );
    let mut floor = None;
    if run(Section::Floor) {
        floor = Some(limits::flush_floor(pool_dir, 200)?);
    }
    if run(Section::Rpc) {
        noop_rpc_latency(&channel, 20_000).await?;
    }
    if run(Section::Provisioning) {
        for (concurrency, goal, reference) in [(1usize, "≥ 422", "422"), (8, "≥ 2000", "705")] {
            let pid = scratch.driver_pid().unwrap_or(0);
            let cpu = (limits::cpu_seconds(pid), limits::cpu_seconds(std::process::id()));
            let rate = provisioning(&channel, concurrency, args.pairs).await?;
            let pairs = args.pairs.div_ceil(concurrency) * concurrency;
            let per_pair =
                |before: f64, pid: u32| (limits::cpu_seconds(pid) - before) * 1e6 / pairs as f64;
            let (driver_us, bench_us) = (per_pair(cpu.0, pid), per_pair(cpu.1, std::process::id()));
            limits::report(
                &format!("create+delete pairs/s, durable, c={concurrency}"),
                &format!("{rate:.0}"),
                goal,
                &format!("{reference} (no durability)"),
            );
            if let Some((data, _)) = floor {
                // One pair, one after the other: the create's durable
                // commit and the delete's. Concurrent pairs share them
                // (group commit).
                let bound = 1000.0 / (2.0 * data);
                println!(
                    "    ({:.2}× the two-flush bound of {bound:.0} pairs/s one at a time)",
                    rate / bound
                );
            }
            // On 2 cores the client's and the driver's CPU share the machine:
            // their sum per pair bounds the rate as surely as the flushes do.
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
            println!(
                "    (CPU per pair: driver {driver_us:.0} µs, bench client {bench_us:.0} µs; \
                 the {cores:.0} cores allow at most {:.0} pairs/s)",
                cores * 1e6 / (driver_us + bench_us)
            );
        }
    }
    if run(Section::Cow) {
        copy_on_write_latency(&channel, pool_dir, args).await?;
    }
    if run(Section::Node) {
        node_cycles(&channel, work, args.samples).await?;
    }
    if run(Section::Group) {
        group_snapshots(&channel, work, args.samples.min(11)).await?;
    }
    if run(Section::Delta) {
        changed_blocks(&channel, pool_dir).await?;
    }
    if run(Section::Mounted) {
        limits::mounted_snapshot(&channel, work, &scratch.log_path(), args.samples).await?;
    }
    if run(Section::Cycle) {
        limits::node_full_cycle(&channel, work, args.samples).await?;
    }
    if run(Section::Small) {
        limits::small_rpcs(&channel, work, args.samples.max(51)).await?;
    }
    if run(Section::Startup) {
        limits::startup(work, &[1000, 10_000, 100_000]).await?;
    }
    if run(Section::Fio) && args.fio_seconds > 0 {
        data_path(&channel, work, pool_dir, args.fio_seconds).await?;
    }
    Ok(())
}

fn node_cap() -> csi::VolumeCapability {
    mount_cap_fs("ext4")
}

fn mount_cap_fs(fs: &str) -> csi::VolumeCapability {
    let mut c = mount_cap();
    if let Some(csi::volume_capability::AccessType::Mount(m)) = &mut c.access_type {
        m.fs_type = fs.into();
    }
    c
}

/// Paths of one volume's staging and target dirs under the bench's kubelet.
pub fn node_paths(work: &Path, tag: &str) -> Result<(PathBuf, PathBuf), String> {
    let staging = work.join("kubelet/plugins/staging").join(tag);
    let target = work.join("kubelet/pods").join(tag).join("mount");
    std::fs::create_dir_all(&staging).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(target.parent().unwrap()).map_err(|e| e.to_string())?;
    Ok((staging, target))
}

pub async fn stage_publish(
    n: &mut NodeClient<Channel>,
    id: &str,
    staging: &Path,
    target: &Path,
) -> Result<(), String> {
    n.node_stage_volume(csi::NodeStageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(node_cap()),
        ..Default::default()
    })
    .await
    .map_err(|e| e.to_string())?;
    n.node_publish_volume(csi::NodePublishVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(node_cap()),
        ..Default::default()
    })
    .await
    .map_err(|e| e.to_string())?;
    Ok(())
}

pub async fn unpublish_unstage(
    n: &mut NodeClient<Channel>,
    id: &str,
    staging: &Path,
    target: &Path,
) -> Result<(), String> {
    n.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
        volume_id: id.into(),
        target_path: target.display().to_string(),
    })
    .await
    .map_err(|e| e.to_string())?;
    n.node_unstage_volume(csi::NodeUnstageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.display().to_string(),
    })
    .await
    .map_err(|e| e.to_string())?;
    Ok(())
}

/// stage → publish → unpublish → unstage of a fresh 1 GiB ext4 volume
/// (includes mkfs), then of the same volume again (already formatted).
async fn node_cycles(channel: &Channel, work: &Path, samples: usize) -> Result<(), String> {
    let mut c = ControllerClient::new(channel.clone());
    let mut n = NodeClient::new(channel.clone());
    let (mut first, mut again) = (Vec::new(), Vec::new());
    for i in 0..samples {
        let id = fs_volume(&mut c, format!("bench-node-{i}"), 1 << 30).await?;
        let (staging, target) = node_paths(work, &format!("n{i}"))?;
        for times in [&mut first, &mut again] {
            let t = Instant::now();
            stage_publish(&mut n, &id, &staging, &target).await?;
            unpublish_unstage(&mut n, &id, &staging, &target).await?;
            times.push(t.elapsed());
        }
        delete(&mut c, id).await?;
    }
    for (what, samples) in [("first use (mkfs)", &mut first), ("re-stage", &mut again)] {
        let (p50, p90, max) = percentiles(samples);
        println!(
            "node cycle {what:<16}: p50 {p50:.2} ms  p90 {p90:.2} ms  max {max:.2} ms  (1 GiB ext4, {} samples)",
            samples.len()
        );
    }
    Ok(())
}

const FIO_ROUNDS: usize = 3;

fn median(v: &mut [(f64, f64)]) -> (f64, f64) {
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    v[v.len() / 2]
}

/// Group snapshots of 4 mounted ext4 volumes holding 256 MiB of data each:
/// total latency, and the freeze window the driver logs.
async fn group_snapshots(channel: &Channel, work: &Path, samples: usize) -> Result<(), String> {
    let mut c = ControllerClient::new(channel.clone());
    let mut n = NodeClient::new(channel.clone());
    let mut members = Vec::new();
    for i in 0..4 {
        let id = fs_volume(&mut c, format!("bench-member-{i}"), 320 << 20).await?;
        let (staging, target) = node_paths(work, &format!("g{i}"))?;
        stage_publish(&mut n, &id, &staging, &target).await?;
        fill_new(&target.join("data"), 256 << 20).map_err(|e| format!("writing data: {e}"))?;
        members.push((id, staging, target));
    }
    let ids: Vec<String> = members.iter().map(|m| m.0.clone()).collect();
    let mut totals = timed_group_snapshots(channel, &ids, "bench-group", samples).await?;
    let log = std::fs::read_to_string(work.join("driver.log")).unwrap_or_default();
    let logged = |field: &str| -> Vec<Duration> {
        let key = format!("\"{field}\":");
        log.lines()
            .filter_map(|l| l.split(key.as_str()).nth(1))
            .filter_map(|v| v.split([',', '}']).next()?.parse::<f64>().ok())
            .map(|ms| Duration::from_secs_f64(ms / 1000.0))
            .collect()
    };
    let mut windows = logged("freeze_window_ms");
    let (mut quiesce, mut clones) = (logged("quiesce_ms"), logged("clone_ms"));
    let (p50, p90, max) = percentiles(&mut totals);
    println!("group snapshot 4 x 256 MiB : p50 {p50:.2} ms  p90 {p90:.2} ms  max {max:.2} ms  ({samples} samples)");
    if !windows.is_empty() {
        let (p50, p90, max) = percentiles(&mut windows);
        println!("  freeze window            : p50 {p50:.2} ms  p90 {p90:.2} ms  max {max:.2} ms");
    }
    if !quiesce.is_empty() && !clones.is_empty() {
        let (q50, _, qmax) = percentiles(&mut quiesce);
        let (c50, _, cmax) = percentiles(&mut clones);
        println!(
            "    of which freezing p50 {q50:.2} ms (max {qmax:.2}), cloning p50 {c50:.2} ms (max {cmax:.2})"
        );
    }
    for (id, staging, target) in members {
        unpublish_unstage(&mut n, &id, &staging, &target).await?;
        delete(&mut c, id).await?;
    }
    Ok(())
}

/// `samples` group snapshots of `ids`, each deleted again: how long each
/// CreateVolumeGroupSnapshot took.
async fn timed_group_snapshots(
    channel: &Channel,
    ids: &[String],
    prefix: &str,
    samples: usize,
) -> Result<Vec<Duration>, String> {
    let mut g = GroupControllerClient::new(channel.clone());
    let mut totals = Vec::with_capacity(samples);
    for i in 0..samples {
        let t = Instant::now();
        let group = group_snapshot(&mut g, format!("{prefix}-{i}"), ids).await?;
        totals.push(t.elapsed());
        delete_group_snapshot(&mut g, group).await?;
    }
    Ok(totals)
}

/// CreateVolumeGroupSnapshot named `name` of `ids`.
pub async fn group_snapshot(
    g: &mut GroupControllerClient<Channel>,
    name: String,
    ids: &[String],
) -> Result<csi::VolumeGroupSnapshot, String> {
    g.create_volume_group_snapshot(csi::CreateVolumeGroupSnapshotRequest {
        name,
        source_volume_ids: ids.to_vec(),
        ..Default::default()
    })
    .await
    .map_err(|e| e.to_string())?
    .into_inner()
    .group_snapshot
    .ok_or_else(|| "no group".into())
}

/// DeleteVolumeGroupSnapshot of a group and exactly its members.
pub async fn delete_group_snapshot(
    g: &mut GroupControllerClient<Channel>,
    group: csi::VolumeGroupSnapshot,
) -> Result<(), String> {
    g.delete_volume_group_snapshot(csi::DeleteVolumeGroupSnapshotRequest {
        group_snapshot_id: group.group_snapshot_id,
        snapshot_ids: group.snapshots.into_iter().map(|s| s.snapshot_id).collect(),
        ..Default::default()
    })
    .await
    .map(drop)
    .map_err(|e| e.to_string())
}

/// GetMetadataDelta between two snapshots of a 10 GiB volume full of data,
/// 1% of whose 4 KiB blocks changed in between.
async fn changed_blocks(channel: &Channel, pool_dir: &Path) -> Result<(), String> {
    use ferrovol_csi::snapshot_metadata_client::SnapshotMetadataClient;
    const SIZE: u64 = 10 << 30;
    let mut c = ControllerClient::new(channel.clone());
    let v = create(&mut c, create_request("bench-cbt".into(), SIZE as i64, None)).await?;
    let file = pool_dir.join("volumes").join(format!("{}.img", v.volume_id));
    fill(&file, SIZE).map_err(|e| format!("writing 10 GiB: {e}"))?;
    let snap = |name: &str| csi::CreateSnapshotRequest {
        name: name.into(),
        source_volume_id: v.volume_id.clone(),
        ..Default::default()
    };
    let base =
        c.create_snapshot(snap("bench-cbt-base")).await.map_err(|e| e.to_string())?.into_inner();
    let blocks = SIZE / 4096;
    let changed = blocks / 100;
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&file).map_err(|e| e.to_string())?;
        // A fixed-seed generator: the same blocks every run.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..changed {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            f.write_all_at(&[0xEE; 4096], (x % blocks) * 4096).map_err(|e| e.to_string())?;
        }
        f.sync_all().map_err(|e| e.to_string())?;
    }
    let target =
        c.create_snapshot(snap("bench-cbt-target")).await.map_err(|e| e.to_string())?.into_inner();
    let (base, target) =
        (base.snapshot.ok_or("no snapshot")?, target.snapshot.ok_or("no snapshot")?);
    let mut m = SnapshotMetadataClient::new(channel.clone());
    let mut times = Vec::new();
    let mut found = 0u64;
    for _ in 0..5 {
        let t = Instant::now();
        let mut stream = m
            .get_metadata_delta(csi::GetMetadataDeltaRequest {
                base_snapshot_id: base.snapshot_id.clone(),
                target_snapshot_id: target.snapshot_id.clone(),
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?
            .into_inner();
        found = 0;
        while let Some(msg) = stream.message().await.map_err(|e| e.to_string())? {
            found += msg.block_metadata.iter().map(|b| b.size_bytes as u64).sum::<u64>();
        }
        times.push(t.elapsed());
    }
    let (p50, p90, max) = percentiles(&mut times);
    println!(
        "delta 10 GiB, 1% changed   : p50 {p50:.2} ms  p90 {p90:.2} ms  max {max:.2} ms  ({} MiB reported changed)",
        found >> 20
    );
    for id in [base.snapshot_id, target.snapshot_id] {
        c.delete_snapshot(csi::DeleteSnapshotRequest { snapshot_id: id, ..Default::default() })
            .await
            .map_err(|e| e.to_string())?;
    }
    delete(&mut c, v.volume_id).await
}

/// One fio job; answers (KiB/s, IOPS).
pub fn fio(file: &Path, rw: &str, bs: &str, seconds: u64) -> Result<(f64, f64), String> {
    let out = Command::new("fio")
        .args(["--name=bench", "--size=512M", "--direct=1", "--ioengine=libaio", "--iodepth=16"])
        .arg(format!("--filename={}", file.display()))
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={bs}"))
        .arg(format!("--runtime={seconds}"))
        .args(["--time_based", "--output-format=terse", "--randrepeat=0"])
        .output()
        .map_err(|e| format!("running fio (install the fio package): {e}"))?;
    if !out.status.success() {
        return Err(format!("fio failed: {}", String::from_utf8_lossy(&out.stderr)));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let f: Vec<&str> = text.lines().last().unwrap_or_default().split(';').collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Terse v3: read bw/iops are fields 7/8, write bw/iops 48/49 (1-based).
    Ok(if rw.contains("read") { (num(6), num(7)) } else { (num(47), num(48)) })
}

/// The fio jobs a data path is measured with, on `ours` beside `limit`
/// (named `what`): printed per job, volume then limit and their ratio.
pub fn fio_beside(ours: &Path, limit: &Path, what: &str, seconds: u64) -> Result<(), String> {
    let jobs = [
        ("read", "1M", "seq read 1M"),
        ("write", "1M", "seq write 1M"),
        ("randread", "4k", "rand read 4k"),
        ("randwrite", "4k", "rand write 4k"),
    ];
    for (rw, bs, label) in jobs {
        // This machine's I/O rate drifts between runs as much as the gap
        // we measure: alternate the two sides and keep medians.
        let (mut vol, mut lim) = (Vec::new(), Vec::new());
        for _ in 0..FIO_ROUNDS {
            vol.push(fio(ours, rw, bs, seconds)?);
            lim.push(fio(limit, rw, bs, seconds)?);
        }
        let ((vol_bw, vol_iops), (lim_bw, lim_iops)) = (median(&mut vol), median(&mut lim));
        let pct = if lim_bw > 0.0 { vol_bw / lim_bw * 100.0 } else { 0.0 };
        println!(
            "fio {label:<14}: volume {:>8.1} MiB/s {:>8.0} IOPS | {what} {:>8.1} MiB/s {:>8.0} IOPS | {pct:.0}%",
            vol_bw / 1024.0,
            vol_iops,
            lim_bw / 1024.0,
            lim_iops
        );
    }
    Ok(())
}

/// fio through a published volume vs the same fio on a file in the pool.
async fn data_path(
    channel: &Channel,
    work: &Path,
    pool_dir: &Path,
    seconds: u64,
) -> Result<(), String> {
    let mut c = ControllerClient::new(channel.clone());
    let mut n = NodeClient::new(channel.clone());
    let id = fs_volume(&mut c, "bench-fio".into(), 2 << 30).await?;
    let (staging, target) = node_paths(work, "fio")?;
    stage_publish(&mut n, &id, &staging, &target).await?;
    let through = target.join("fio.dat");
    let direct = pool_dir.join("fio-direct.dat");
    let result = fio_beside(&through, &direct, "pool file", seconds);
    let _ = std::fs::remove_file(&direct);
    let _ = std::fs::remove_file(&through);
    unpublish_unstage(&mut n, &id, &staging, &target).await?;
    delete(&mut c, id).await?;
    result
}

/// Pairs of CreateVolume+DeleteVolume per second with `concurrency` clients.
/// GetPluginInfo, one call after another on one connection: what the socket,
/// HTTP/2 and the RPC plumbing cost before any work.
async fn noop_rpc_latency(channel: &Channel, calls: usize) -> Result<(), String> {
    let mut id = csi::identity_client::IdentityClient::new(channel.clone());
    let mut times = Vec::with_capacity(calls);
    for _ in 0..calls {
        let started = Instant::now();
        id.get_plugin_info(csi::GetPluginInfoRequest {}).await.map_err(|s| s.to_string())?;
        times.push(started.elapsed());
    }
    times.sort();
    let us = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e6;
    println!(
        "no-op RPC (GetPluginInfo, {calls} calls): p50 {:.0} µs  p99 {:.0} µs",
        us(0.5),
        us(0.99)
    );
    Ok(())
}

async fn provisioning(channel: &Channel, concurrency: usize, pairs: usize) -> Result<f64, String> {
    let per_worker = pairs.div_ceil(concurrency);
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..concurrency {
        let mut c = ControllerClient::new(channel.clone());
        workers.push(tokio::spawn(async move {
            for i in 0..per_worker {
                let name = format!("bench-{concurrency}-{w}-{i}");
                let v = create(&mut c, create_request(name, 1 << 30, None)).await?;
                delete(&mut c, v.volume_id).await?;
            }
            Ok::<_, String>(())
        }));
    }
    for w in workers {
        w.await.map_err(|e| e.to_string())??;
    }
    Ok((per_worker * concurrency) as f64 / started.elapsed().as_secs_f64())
}

async fn copy_on_write_latency(
    channel: &Channel,
    pool_dir: &Path,
    args: &BenchArgs,
) -> Result<(), String> {
    use csi::volume_content_source::{SnapshotSource, Type, VolumeSource};
    let mut c = ControllerClient::new(channel.clone());
    let size = ((args.data_mib << 20) as i64).max(1 << 30);
    let src = create(&mut c, create_request("bench-source".into(), size, None)).await?;
    let file = pool_dir.join("volumes").join(format!("{}.img", src.volume_id));
    fill(&file, args.data_mib << 20).map_err(|e| format!("writing data: {e}"))?;
    println!("source volume: {} MiB of data written", args.data_mib);

    let (mut snap_t, mut restore_t, mut clone_t) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..args.samples {
        let t = Instant::now();
        let snap = snapshot(&mut c, format!("bench-snap-{i}"), &src.volume_id).await?;
        snap_t.push(t.elapsed());

        let from_snapshot = csi::VolumeContentSource {
            r#type: Some(Type::Snapshot(SnapshotSource { snapshot_id: snap.snapshot_id.clone() })),
        };
        let t = Instant::now();
        let restored =
            create(&mut c, create_request(format!("bench-restore-{i}"), size, Some(from_snapshot)))
                .await?;
        restore_t.push(t.elapsed());

        let from_volume = csi::VolumeContentSource {
            r#type: Some(Type::Volume(VolumeSource { volume_id: src.volume_id.clone() })),
        };
        let t = Instant::now();
        let cloned =
            create(&mut c, create_request(format!("bench-clone-{i}"), size, Some(from_volume)))
                .await?;
        clone_t.push(t.elapsed());

        for id in [restored.volume_id, cloned.volume_id] {
            delete(&mut c, id).await?;
        }
        c.delete_snapshot(csi::DeleteSnapshotRequest {
            snapshot_id: snap.snapshot_id,
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    }
    for (what, samples) in
        [("snapshot", &mut snap_t), ("restore", &mut restore_t), ("clone", &mut clone_t)]
    {
        let (p50, p90, max) = percentiles(samples);
        println!(
            "{what:<8} of {} MiB: p50 {p50:.2} ms  p90 {p90:.2} ms  max {max:.2} ms  ({} samples)",
            args.data_mib,
            samples.len()
        );
    }
    delete(&mut c, src.volume_id).await?;
    Ok(())
}

/// Creates a file of `bytes` non-zero data and syncs it.
fn fill_new(path: &Path, bytes: u64) -> std::io::Result<()> {
    std::fs::File::create(path)?;
    fill(path, bytes)
}

/// Writes `bytes` of non-zero data (so nothing is a hole) and syncs.
fn fill(path: &Path, bytes: u64) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().write(true).open(path)?;
    let block: Vec<u8> = (0..(1usize << 20)).map(|i| (i % 251) as u8 + 1).collect();
    for _ in 0..bytes >> 20 {
        f.write_all(&block)?;
    }
    f.sync_all()
}
