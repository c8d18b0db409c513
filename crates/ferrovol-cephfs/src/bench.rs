//! `ferrovol bench --engine cephfs`: the CephFS engine against a Ceph file
//! system (e.g. `scripts/ceph-dev-cluster start DIR --cephfs`), each figure
//! beside the bare calls it is made of, measured in the same run from this
//! process: the manager's subvolume commands, and for restores the
//! manager's own cloner copying the same snapshot.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use ferrovol_ceph::fs::FsMount;
use ferrovol_ceph::{self as ceph, Cluster, NewSubvolume, Subvolumes};
use ferrovol_csi as csi;
use ferrovol_csi::controller_client::ControllerClient;
use ferrovol_csi::node_client::NodeClient;
use ferrovol_tools::bench::limits::report;
use ferrovol_tools::bench::{
    create, create_delete_pairs, delete, fio_beside, node_paths, off, percentiles, proc_kib,
    snapshot, start_engine, BenchArgs,
};
use tonic::transport::Channel;

/// The group every volume of the run is made in.
const GROUP: &str = "ferrovol-bench";

fn params(fs: &str, view: bool) -> HashMap<String, String> {
    let mut p: HashMap<String, String> =
        [("fsName", fs), ("subvolumeGroup", GROUP), ("mounter", "fuse")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    if view {
        p.insert("backingSnapshot".into(), "true".into());
    }
    p
}

fn cap(mode: csi::volume_capability::access_mode::Mode) -> csi::VolumeCapability {
    use csi::volume_capability::{AccessMode, AccessType, MountVolume};
    csi::VolumeCapability {
        access_mode: Some(AccessMode { mode: mode as i32 }),
        access_type: Some(AccessType::Mount(MountVolume::default())),
    }
}

fn request(fs: &str, name: String, source: Option<&str>, view: bool) -> csi::CreateVolumeRequest {
    use csi::volume_capability::access_mode::Mode;
    let mode = if view { Mode::MultiNodeReaderOnly } else { Mode::MultiNodeMultiWriter };
    csi::CreateVolumeRequest {
        name,
        parameters: params(fs, view),
        capacity_range: Some(csi::CapacityRange { required_bytes: 1 << 30, limit_bytes: 0 }),
        volume_capabilities: vec![cap(mode)],
        volume_content_source: source.map(|s| csi::VolumeContentSource {
            r#type: Some(csi::volume_content_source::Type::Snapshot(
                csi::volume_content_source::SnapshotSource { snapshot_id: s.into() },
            )),
        }),
        ..Default::default()
    }
}

fn rss_mib(pid: u32, field: &str) -> f64 {
    proc_kib(pid, "status", field) as f64 / 1024.0
}

fn text(e: impl std::fmt::Display) -> String {
    e.to_string()
}

pub async fn run(args: &BenchArgs) -> Result<(), String> {
    let conf = args.ceph_conf.clone().ok_or(
        "--engine cephfs needs --ceph-conf (e.g. from scripts/ceph-dev-cluster start DIR --cephfs)",
    )?;
    let fs = args.cephfs_fs.clone();
    let args_: Vec<String> =
        ["--engine", "cephfs", "--mode", "all", "--cephfs-filesystems", &fs, "--ceph-conf"]
            .iter()
            .map(|s| s.to_string())
            .chain([conf.display().to_string()])
            .collect();
    let (scratch, channel, pid) = start_engine("bench-cephfs", args_).await?;
    println!(
        "ferrovol bench --engine cephfs: file system {fs} via {} (driver {})",
        conf.display(),
        ferrovol_csi::build::version()
    );
    report("driver RSS idle, engine loaded", &format!("{:.1} MiB", rss_mib(pid, "VmRSS:")), "", "");
    let c2 = conf.clone();
    let cluster = off(move || {
        Cluster::connect(&ceph::Connect { conf: Some(&c2), op_timeout: 30, ..Default::default() })
    })
    .await?
    .map_err(text)?;
    let sv = Subvolumes::new(cluster, &fs);
    let s = sv.clone();
    off(move || s.create_group(GROUP)).await?.map_err(text)?;

    for concurrency in [1usize, 8] {
        let rate = provisioning(&channel, &fs, concurrency, args.cephfs_pairs).await?;
        let bare = bare_pairs(&sv, concurrency, args.cephfs_pairs, false).await?;
        let calls = bare_pairs(&sv, concurrency, args.cephfs_pairs, true).await?;
        report(&format!("create+delete pairs/s, c={concurrency}"), &format!("{rate:.1}"), "", "");
        println!(
            "    (bare subvolume create+rm: {bare:.1} pairs/s; with getpath and metadata set, \
             the driver's manager calls: {calls:.1})"
        );
    }
    // The peak so far after each phase (it only grows): which phase
    // raises it.
    let peak_after = |phase: &str| {
        println!("    (driver RSS peak after {phase}: {:.1} MiB)", rss_mib(pid, "VmHWM:"));
    };
    peak_after("the pairs");
    snapshots(&channel, &sv, &fs, args.samples.min(11)).await?;
    let files = args.cephfs_files.max(1);
    for (what, count) in [("one file", 1usize), ("many files", files)] {
        restores(&channel, &sv, &conf, &fs, args.data_mib, count, what).await?;
        peak_after(&format!("the restores of {what}"));
    }
    node_cycle(&channel, &scratch.work, &fs, args.samples.min(11)).await?;
    if args.fio_seconds > 0 {
        data_path(&channel, &scratch.work, &conf, &fs, args.fio_seconds).await?;
    }
    report("driver RSS peak", &format!("{:.1} MiB", rss_mib(pid, "VmHWM:")), "", "");
    let s = sv.clone();
    let left = off(move || s.list(GROUP)).await?.unwrap_or_default();
    println!("subvolumes left in group {GROUP}: {}", left.len());
    if left.is_empty() {
        let _ = off(move || sv.remove_group(GROUP)).await;
    }
    Ok(())
}

async fn provisioning(
    channel: &Channel,
    fs: &str,
    concurrency: usize,
    pairs: usize,
) -> Result<f64, String> {
    let fs = fs.to_string();
    let make = move |name| request(&fs, name, None, false);
    create_delete_pairs(channel, concurrency, pairs, make).await
}

/// Bare subvolume create+rm pairs per second; `as_driver`: with the two
/// further manager calls a CreateVolume makes (getpath, metadata set).
async fn bare_pairs(
    sv: &Subvolumes,
    concurrency: usize,
    pairs: usize,
    as_driver: bool,
) -> Result<f64, String> {
    let per_worker = pairs.div_ceil(concurrency);
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..concurrency {
        let sv = sv.clone();
        workers.push(tokio::spawn(off(move || {
            let new = NewSubvolume { size: 1 << 30, pool_layout: None, mode: None };
            for i in 0..per_worker {
                let name = format!("bench-bare-{concurrency}-{w}-{i}");
                sv.create(GROUP, &name, &new).map_err(text)?;
                if as_driver {
                    sv.path(GROUP, &name).map_err(text)?;
                    sv.set_metadata(GROUP, &name, "bench", "x").map_err(text)?;
                }
                sv.remove(GROUP, &name, false).map_err(text)?;
            }
            Ok::<_, String>(())
        })));
    }
    for w in workers {
        w.await.map_err(text)???;
    }
    Ok((per_worker * concurrency) as f64 / started.elapsed().as_secs_f64())
}

/// CreateSnapshot+DeleteSnapshot of a volume, beside the bare subvolume
/// snapshot create+rm.
async fn snapshots(
    channel: &Channel,
    sv: &Subvolumes,
    fs: &str,
    samples: usize,
) -> Result<(), String> {
    let mut c = ControllerClient::new(channel.clone());
    let v = create(&mut c, request(fs, "bench-snap-src".into(), None, false)).await?;
    let (mut ours, mut bare) = (vec![], vec![]);
    let subvolume = v.volume_id.rsplit(':').next().unwrap_or_default().to_string();
    for i in 0..samples {
        let t = Instant::now();
        let s = snapshot(&mut c, format!("bench-snap-{i}"), &v.volume_id).await?;
        ours.push(t.elapsed());
        c.delete_snapshot(csi::DeleteSnapshotRequest {
            snapshot_id: s.snapshot_id,
            ..Default::default()
        })
        .await
        .map_err(text)?;
        let (s, name) = (sv.clone(), subvolume.clone());
        bare.push(
            off(move || {
                let t = Instant::now();
                s.snapshot(GROUP, &name, "bench-bare").map_err(text)?;
                let took = t.elapsed();
                s.remove_snapshot(GROUP, &name, "bench-bare").map_err(text)?;
                Ok::<_, String>(took)
            })
            .await??,
        );
    }
    let (p50, _, _) = percentiles(&mut ours);
    let (bare50, _, _) = percentiles(&mut bare);
    report("CreateSnapshot p50", &format!("{p50:.1} ms"), "", "");
    println!("    (bare subvolume snapshot create: {bare50:.1} ms; {samples} samples)");
    delete(&mut c, v.volume_id).await
}

/// Writes `mib` MiB into `count` files under `root` (a subvolume's path).
fn fill(m: &FsMount, root: &str, mib: u64, count: usize) -> ceph::Result<()> {
    let each = (mib << 20) / count as u64;
    let block: Vec<u8> =
        (0..1u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    for f in 0..count {
        let dir = format!("{root}/d{}", f / 1000);
        if f % 1000 == 0 {
            m.mkdir(&dir, 0o755)?;
        }
        let file = m.open(&format!("{dir}/f{f}"), libc::O_WRONLY | libc::O_CREAT, 0o644)?;
        let mut at = 0;
        while at < each {
            let n = (each - at).min(block.len() as u64) as usize;
            file.write_all_at(&block[..n], at)?;
            at += n as u64;
        }
    }
    m.sync()
}

/// A read-write restore of `mib` MiB in `count` files by ferrovol (until
/// CreateVolume answers the volume) beside the manager's cloner copying the
/// same snapshot (until its clone is complete), and a read-only view.
#[allow(clippy::too_many_arguments)]
async fn restores(
    channel: &Channel,
    sv: &Subvolumes,
    conf: &Path,
    fs: &str,
    mib: u64,
    count: usize,
    what: &str,
) -> Result<(), String> {
    let mut c = ControllerClient::new(channel.clone());
    let tag = count;
    let src = create(&mut c, request(fs, format!("bench-data-{tag}"), None, false)).await?;
    let root = src.volume_context.get("rootPath").cloned().unwrap_or_default();
    let (conf, fsname) = (conf.to_path_buf(), fs.to_string());
    let filled = off(move || {
        let m = FsMount::mount(
            &ceph::Connect { conf: Some(&conf), op_timeout: 30, ..Default::default() },
            &fsname,
        )?;
        let t = Instant::now();
        fill(&m, &root, mib, count).map(|()| t.elapsed())
    })
    .await?
    .map_err(text)?;
    println!(
        "restores of {mib} MiB in {what} ({count}; written in {:.1} s through libcephfs):",
        filled.as_secs_f64()
    );
    let snap = snapshot(&mut c, format!("bench-data-snap-{tag}"), &src.volume_id).await?;

    // Ours: until the claim would be bound (the provisioner's retries).
    let t = Instant::now();
    let restored = loop {
        let r = request(fs, format!("bench-restore-{tag}"), Some(&snap.snapshot_id), false);
        match c.create_volume(r).await {
            Ok(v) => break v.into_inner().volume.ok_or("no volume")?,
            Err(e) if e.code() == tonic::Code::Aborted => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => return Err(e.to_string()),
        }
    };
    let ours = t.elapsed().as_secs_f64();

    // The manager's cloner, same snapshot, until complete.
    let source = src.volume_id.rsplit(':').next().unwrap_or_default().to_string();
    let snap_name = format!("csi-snap-{}", snap.snapshot_id.rsplit(':').next().unwrap_or_default());
    let s = sv.clone();
    let manager = off(move || {
        let t = Instant::now();
        s.clone_snapshot(GROUP, &source, &snap_name, GROUP, "bench-mgr-clone", None)
            .map_err(text)?;
        loop {
            match s.clone_state(GROUP, "bench-mgr-clone").map_err(text)?.as_str() {
                "complete" => break,
                "failed" | "canceled" => return Err("the manager's clone failed".to_string()),
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
        let took = t.elapsed().as_secs_f64();
        s.remove(GROUP, "bench-mgr-clone", false).map_err(text)?;
        Ok(took)
    })
    .await??;
    let rate = |secs: f64| mib as f64 / secs;
    report(
        &format!("RW restore, {what}: MiB/s"),
        &format!("{:.1}", rate(ours)),
        "≥ 3× manager",
        &format!("manager's cloner {:.1}", rate(manager)),
    );
    println!(
        "    (bound after {ours:.1} s; the manager's clone complete after {manager:.1} s: {:.2}×)",
        manager / ours
    );

    // A read-only view: no copy, whatever the size.
    let mut views = vec![];
    for i in 0..5 {
        let t = Instant::now();
        let r = request(fs, format!("bench-view-{tag}-{i}"), Some(&snap.snapshot_id), true);
        let v = create(&mut c, r).await?;
        views.push(t.elapsed());
        delete(&mut c, v.volume_id).await?;
    }
    let (p50, _, _) = percentiles(&mut views);
    report(&format!("ROX view restore, {what}"), &format!("{p50:.1} ms"), "size-independent", "");

    delete(&mut c, restored.volume_id).await?;
    c.delete_snapshot(csi::DeleteSnapshotRequest {
        snapshot_id: snap.snapshot_id,
        ..Default::default()
    })
    .await
    .map_err(text)?;
    delete(&mut c, src.volume_id).await
}

/// Stages and publishes `v` (a read-write-many mount) as the kubelet does.
async fn stage_publish(
    n: &mut NodeClient<Channel>,
    v: &csi::Volume,
    staging: &Path,
    target: &Path,
) -> Result<(), String> {
    use csi::volume_capability::access_mode::Mode;
    n.node_stage_volume(csi::NodeStageVolumeRequest {
        volume_id: v.volume_id.clone(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(cap(Mode::MultiNodeMultiWriter)),
        volume_context: v.volume_context.clone(),
        ..Default::default()
    })
    .await
    .map_err(text)?;
    n.node_publish_volume(csi::NodePublishVolumeRequest {
        volume_id: v.volume_id.clone(),
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(cap(Mode::MultiNodeMultiWriter)),
        volume_context: v.volume_context.clone(),
        ..Default::default()
    })
    .await
    .map_err(text)?;
    Ok(())
}

/// Stage+publish+unpublish+unstage through ceph-fuse.
async fn node_cycle(
    channel: &Channel,
    work: &Path,
    fs: &str,
    samples: usize,
) -> Result<(), String> {
    let mut c = ControllerClient::new(channel.clone());
    let mut n = NodeClient::new(channel.clone());
    let v = create(&mut c, request(fs, "bench-node".into(), None, false)).await?;
    let (staging, target) = node_paths(work, "cephfs-node")?;
    let mut times = vec![];
    for _ in 0..samples {
        let t = Instant::now();
        stage_publish(&mut n, &v, &staging, &target).await?;
        ferrovol_tools::bench::unpublish_unstage(&mut n, &v.volume_id, &staging, &target).await?;
        times.push(t.elapsed());
    }
    let (p50, _, max) = percentiles(&mut times);
    report("node stage+publish+unpublish+unstage p50", &format!("{p50:.0} ms"), "", "");
    println!("    (through ceph-fuse; max {max:.0} ms, {samples} samples)");
    delete(&mut c, v.volume_id).await
}

/// fio through a volume the driver staged and published (its ceph-fuse,
/// its bind mounts) beside the same fio through a bare ceph-fuse mount of
/// the same subvolume with the same options: the limit the driver can
/// reach.
async fn data_path(
    channel: &Channel,
    work: &Path,
    conf: &Path,
    fs: &str,
    seconds: u64,
) -> Result<(), String> {
    let mut c = ControllerClient::new(channel.clone());
    let mut n = NodeClient::new(channel.clone());
    let mut r = request(fs, "bench-fio".into(), None, false);
    // Two fio files of 512 MiB each, side by side in the one subvolume.
    r.capacity_range = Some(csi::CapacityRange { required_bytes: 2 << 30, limit_bytes: 0 });
    let v = create(&mut c, r).await?;
    let (staging, target) = node_paths(work, "cephfs-fio")?;
    stage_publish(&mut n, &v, &staging, &target).await?;
    let root = v.volume_context.get("rootPath").cloned().unwrap_or_default();
    let bare = work.join("bare-ceph-fuse");
    std::fs::create_dir_all(&bare).map_err(text)?;
    let mounted = std::process::Command::new("ceph-fuse")
        .arg("-c")
        .arg(conf)
        .args(["--client_fs", fs, "-r", &root, "--fuse_disable_pagecache=true"])
        .arg(&bare)
        .output()
        .map_err(|e| format!("running ceph-fuse: {e}"))?;
    let (through, direct) = (target.join("fio.dat"), bare.join("fio-bare.dat"));
    let result = match mounted.status.success() {
        false => Err(format!(
            "a bare ceph-fuse mount failed: {}",
            String::from_utf8_lossy(&mounted.stderr)
        )),
        true => fio_beside(&through, &direct, "bare ceph-fuse", seconds),
    };
    let _ = std::fs::remove_file(&direct);
    let _ = std::fs::remove_file(&through);
    if mounted.status.success() {
        let _ = rustix::mount::unmount(&bare, rustix::mount::UnmountFlags::empty());
    }
    ferrovol_tools::bench::unpublish_unstage(&mut n, &v.volume_id, &staging, &target).await?;
    delete(&mut c, v.volume_id).await?;
    result
}
