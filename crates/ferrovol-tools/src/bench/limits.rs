//! The local engine at its limits: start-up against pool size, the pool's
//! flush floor that durable provisioning is bounded by, the snapshot of a
//! mounted volume (freeze window and RPC latency), and the node cycle with
//! and without mkfs. Each figure is printed beside its goal and the
//! reference driver's figure (csi-driver-host-path, measured on this kind
//! of machine in the issue that set the goals: static numbers, not
//! measured here).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferrovol_csi as csi;
use ferrovol_csi::controller_client::ControllerClient;
use ferrovol_csi::node_client::NodeClient;
use tonic::transport::Channel;

use super::{create, create_request, delete, fs_volume, node_paths, percentiles};
use super::{stage_publish, unpublish_unstage};
use crate::endpoint::{self, Endpoint};

/// Prints one figure with its goal and the reference driver's.
pub fn report(what: &str, ours: &str, goal: &str, reference: &str) {
    println!("{what:<44} {ours:>14}   goal {goal:<14} reference {reference}");
}

fn exe() -> Result<PathBuf, String> {
    std::env::current_exe().map_err(|e| e.to_string())
}

fn run_quiet(cmd: &mut Command, what: &str) -> Result<(), String> {
    let out = cmd.stdin(Stdio::null()).output().map_err(|e| format!("{what}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{what}: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(())
}

/// CPU seconds (user + system) a process has used, from /proc.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at ")".
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 (1-based), 12 and 13 here.
    // /proc counts in USER_HZ, 100 per second on Linux whatever the kernel tick.
    let hz = 100.0;
    (ticks(11) + ticks(12)) / hz
}

/// Start-up to a ready socket (the first Probe that answers) of a driver
/// whose pool holds `counts` empty thin volumes each, on a fresh XFS pool.
pub async fn startup(work: &Path, counts: &[usize]) -> Result<(), String> {
    for &count in counts {
        let dir = work.join(format!("startup-{count}"));
        let (pool, image) = (dir.join("pool"), dir.join("pool.img"));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        run_quiet(
            Command::new(exe()?)
                .args(["pool", "init", "--fs", "xfs", "--size", "4G", "--dir"])
                .arg(&pool)
                .arg("--image")
                .arg(&image),
            "pool init",
        )?;
        let measured = async {
            let seeded = Instant::now();
            run_quiet(
                Command::new(exe()?)
                    .args(["pool", "seed", "--volumes", &count.to_string(), "--dir"])
                    .arg(&pool),
                "pool seed",
            )?;
            let seeded = seeded.elapsed();
            let socket = dir.join("csi.sock");
            let started = Instant::now();
            let mut child = Command::new(exe()?)
                .args(["serve", "--node-id", "bench", "--endpoint"])
                .arg(&socket)
                .arg("--state-dir")
                .arg(dir.join("state"))
                .arg("--pool-dir")
                .arg(&pool)
                .arg("--kubelet-dir")
                .arg(&dir)
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| e.to_string())?;
            let ready = wait_ready(&socket, Duration::from_secs(120)).await;
            let elapsed = started.elapsed();
            let cpu = cpu_seconds(child.id());
            let _ = rustix::process::kill_process(
                rustix::process::Pid::from_raw(child.id() as i32).expect("a child pid"),
                rustix::process::Signal::TERM,
            );
            let _ = child.wait();
            ready?;
            report(
                &format!("start-up to ready, {count} volumes"),
                &format!("{:.0} ms", elapsed.as_secs_f64() * 1000.0),
                if count >= 100_000 { "≤ 1000 ms" } else { "linear" },
                if count == 1000 { "23 ms at 2,000 (no journal)" } else { "-" },
            );
            println!(
                "    ({:.0} ms CPU, {:.1} µs CPU per volume; seeding took {:.1} s)",
                cpu * 1000.0,
                cpu * 1e6 / count as f64,
                seeded.as_secs_f64()
            );
            Ok::<_, String>(())
        }
        .await;
        let _ = Command::new(exe()?)
            .args(["pool", "release", "--dir"])
            .arg(&pool)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&dir);
        measured?;
    }
    Ok(())
}

/// Polls until a Probe answers (a measurement loop, not a test's wait).
async fn wait_ready(socket: &Path, limit: Duration) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(ch) = endpoint::connect(&Endpoint::Unix(socket.to_path_buf())).await {
            let mut id = csi::identity_client::IdentityClient::new(ch);
            if id.probe(csi::ProbeRequest {}).await.is_ok() {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            return Err(format!("the driver did not become ready within {limit:?}"));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// The pool's flush floor: a 4 KiB write made durable, and a new directory
/// entry made durable (what every durable create or delete pays at least
/// once, through XFS, the loop device and the host's filesystem).
pub fn flush_floor(pool_dir: &Path, samples: usize) -> Result<(f64, f64), String> {
    let dir = pool_dir.join("staging");
    let (mut data, mut entry) = (Vec::new(), Vec::new());
    for i in 0..samples {
        let path = dir.join(format!("bench-floor-{i}"));
        let mut f = std::fs::File::create(&path).map_err(|e| e.to_string())?;
        f.sync_all().map_err(|e| e.to_string())?;
        let t = Instant::now();
        f.write_all(&[7u8; 4096]).and_then(|()| f.sync_all()).map_err(|e| e.to_string())?;
        data.push(t.elapsed());
        // A new entry, not yet durable, made durable by the directory's
        // fsync alone.
        let entry_path = dir.join(format!("bench-floor-entry-{i}"));
        std::fs::File::create(&entry_path).map_err(|e| e.to_string())?;
        let t = Instant::now();
        std::fs::File::open(&dir).and_then(|d| d.sync_all()).map_err(|e| e.to_string())?;
        entry.push(t.elapsed());
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(&entry_path);
    }
    let (d50, _, _) = percentiles(&mut data);
    let (e50, _, _) = percentiles(&mut entry);
    report("flush floor: fsync of a 4 KiB write", &format!("{d50:.2} ms"), "-", "-");
    report("flush floor: fsync of a directory", &format!("{e50:.2} ms"), "-", "-");
    Ok((d50, e50))
}

/// CreateSnapshot of a mounted 1 GiB ext4 volume with fresh data in it,
/// until ready: the RPC's latency, and the freeze window the driver logs.
pub async fn mounted_snapshot(
    channel: &Channel,
    work: &Path,
    log: &Path,
    samples: usize,
) -> Result<(), String> {
    let mut c = ControllerClient::new(channel.clone());
    let mut n = NodeClient::new(channel.clone());
    let id = fs_volume(&mut c, "bench-mounted".into(), 1 << 30).await?;
    let (staging, target) = node_paths(work, "mounted")?;
    stage_publish(&mut n, &id, &staging, &target).await?;
    let mut snapshots = Vec::new();
    // With a pod's worth of fresh dirty data (the flush before the freeze
    // writes it, outside the window), and with none.
    for dirty_mib in [8usize, 0] {
        let before = std::fs::read_to_string(log).unwrap_or_default().len();
        let mut rpc = Vec::new();
        for i in 0..samples {
            if dirty_mib > 0 {
                std::fs::write(target.join("data"), vec![i as u8; dirty_mib << 20])
                    .map_err(|e| e.to_string())?;
            }
            let t = Instant::now();
            let s = super::snapshot(&mut c, format!("bench-mounted-{dirty_mib}-{i}"), &id).await?;
            rpc.push(t.elapsed());
            snapshots.push(s.snapshot_id);
        }
        let logged = std::fs::read_to_string(log).unwrap_or_default();
        let mut windows: Vec<Duration> = logged[before.min(logged.len())..]
            .lines()
            .filter(|l| l.contains("snapshot window"))
            .filter_map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).ok()?;
                v["window_ms"].as_f64().map(|ms| Duration::from_secs_f64(ms / 1000.0))
            })
            .collect();
        let (r50, r90, _) = percentiles(&mut rpc);
        report(
            &format!("mounted snapshot, {dirty_mib} MiB dirty, RPC (p50)"),
            &format!("{r50:.2} ms"),
            "≤ 10 ms",
            "57 s (tar of 1 GiB)",
        );
        println!("    (p90 {r90:.2} ms; 1 GiB ext4, {samples} samples)");
        if !windows.is_empty() {
            let (w50, w90, wmax) = percentiles(&mut windows);
            report("    its freeze window (p50)", &format!("{w50:.2} ms"), "-", "-");
            println!("    (p90 {w90:.2} ms, max {wmax:.2} ms)");
        }
    }
    for s in snapshots {
        c.delete_snapshot(csi::DeleteSnapshotRequest { snapshot_id: s, ..Default::default() })
            .await
            .map_err(|s| s.to_string())?;
    }
    unpublish_unstage(&mut n, &id, &staging, &target).await?;
    delete(&mut c, id).await?;
    Ok(())
}

/// The kubelet's full cycle on a new volume: create, stage (mkfs on first
/// use), publish, unpublish, unstage, delete; and the same on a volume
/// formatted before (no mkfs).
pub async fn node_full_cycle(channel: &Channel, work: &Path, samples: usize) -> Result<(), String> {
    let mut c = ControllerClient::new(channel.clone());
    let mut n = NodeClient::new(channel.clone());
    let mut first = Vec::new();
    for i in 0..samples {
        let (staging, target) = node_paths(work, &format!("full{i}"))?;
        let t = Instant::now();
        let id = fs_volume(&mut c, format!("bench-full-{i}"), 1 << 30).await?;
        stage_publish(&mut n, &id, &staging, &target).await?;
        unpublish_unstage(&mut n, &id, &staging, &target).await?;
        delete(&mut c, id).await?;
        first.push(t.elapsed());
    }
    // Formatted once, then the same cycle without mkfs (create and delete
    // excluded: the volume must keep its filesystem).
    let id = fs_volume(&mut c, "bench-full-again".into(), 1 << 30).await?;
    let (staging, target) = node_paths(work, "full-again")?;
    stage_publish(&mut n, &id, &staging, &target).await?;
    unpublish_unstage(&mut n, &id, &staging, &target).await?;
    let mut again = Vec::new();
    for _ in 0..samples {
        let t = Instant::now();
        stage_publish(&mut n, &id, &staging, &target).await?;
        unpublish_unstage(&mut n, &id, &staging, &target).await?;
        again.push(t.elapsed());
    }
    delete(&mut c, id).await?;
    let (f50, _, _) = percentiles(&mut first);
    let (a50, _, _) = percentiles(&mut again);
    report(
        "node full cycle, first use with mkfs (p50)",
        &format!("{f50:.2} ms"),
        "≤ 32 ms",
        "32 ms (no mkfs)",
    );
    report("node cycle, formatted volume (p50)", &format!("{a50:.2} ms"), "-", "-");
    Ok(())
}

/// The small RPCs, each timed alone: filesystem CreateVolume and
/// DeleteVolume, block NodeStage and NodeUnstage, NodeExpandVolume of a
/// staged block volume.
pub async fn small_rpcs(channel: &Channel, work: &Path, samples: usize) -> Result<(), String> {
    use csi::volume_capability::{access_mode::Mode, AccessMode, AccessType, BlockVolume};
    let mut c = ControllerClient::new(channel.clone());
    let mut n = NodeClient::new(channel.clone());
    let block = csi::VolumeCapability {
        access_mode: Some(AccessMode { mode: Mode::SingleNodeWriter as i32 }),
        access_type: Some(AccessType::Block(BlockVolume {})),
    };
    let (mut creates, mut deletes, mut stages, mut unstages, mut expands) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..samples {
        let t = Instant::now();
        let id = create(&mut c, create_request(format!("bench-small-{i}"), 1 << 30, None))
            .await?
            .volume_id;
        creates.push(t.elapsed());
        let t = Instant::now();
        delete(&mut c, id).await?;
        deletes.push(t.elapsed());
    }
    let id = create(
        &mut c,
        csi::CreateVolumeRequest {
            volume_capabilities: vec![block.clone()],
            ..create_request("bench-small-block".into(), 64 << 20, None)
        },
    )
    .await?
    .volume_id;
    let (staging, _) = node_paths(work, "small-block")?;
    let stage = csi::NodeStageVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(block.clone()),
        ..Default::default()
    };
    let unstage = csi::NodeUnstageVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: staging.display().to_string(),
    };
    for i in 0..samples {
        let t = Instant::now();
        n.node_stage_volume(stage.clone()).await.map_err(|e| e.to_string())?;
        stages.push(t.elapsed());
        let t = Instant::now();
        n.node_expand_volume(csi::NodeExpandVolumeRequest {
            volume_id: id.clone(),
            volume_path: staging.join("device").display().to_string(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: (64 << 20) + (i as i64 + 1) * 4096,
                limit_bytes: 0,
            }),
            volume_capability: Some(block.clone()),
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
        expands.push(t.elapsed());
        let t = Instant::now();
        n.node_unstage_volume(unstage.clone()).await.map_err(|e| e.to_string())?;
        unstages.push(t.elapsed());
    }
    delete(&mut c, id).await?;
    for (what, times) in [
        ("CreateVolume, filesystem (p50)", &mut creates),
        ("DeleteVolume (p50)", &mut deletes),
        ("NodeStageVolume, block (p50)", &mut stages),
        ("NodeUnstageVolume, block (p50)", &mut unstages),
        ("NodeExpandVolume, block (p50)", &mut expands),
    ] {
        let (p50, _, _) = percentiles(times);
        report(what, &format!("{p50:.2} ms"), "≤ 1 ms", "0.3-0.7 ms");
    }
    Ok(())
}
