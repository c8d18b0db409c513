//! `ferrovol bench --engine rbd`: the RBD engine against a Ceph cluster
//! (e.g. `scripts/ceph-dev-cluster start DIR`), each figure beside the bare
//! librbd calls it is made of (measured in this run, from this process)
//! and the reference Ceph CSI driver's figures (measured on this kind of
//! machine against the same kind of cluster in the issue that set the
//! goals: static numbers, not measured here).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ferrovol_ceph::{self as ceph, Cluster, ImageOptions, Pool};
use ferrovol_csi as csi;
use ferrovol_csi::controller_client::ControllerClient;
use ferrovol_csi::node_client::NodeClient;
use tonic::transport::Channel;

use ferrovol_tools::bench::limits::{cpu_seconds, report};
use ferrovol_tools::bench::{
    create, create_delete_pairs, create_request, delete, node_paths, off, percentiles, proc_kib,
    snapshot, start_engine, BenchArgs,
};

/// The image features every request of the run uses.
static FEATURES: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn features() -> &'static str {
    FEATURES.get().map_or("layering", String::as_str)
}

fn params(pool: &str) -> std::collections::HashMap<String, String> {
    [("pool".to_string(), pool.to_string()), ("imageFeatures".into(), features().to_string())]
        .into()
}

/// The same features as librbd bits, for the bare calls.
fn feature_bits() -> u64 {
    features().split(',').filter_map(|f| ceph::feature_bit(f.trim())).fold(0, |a, b| a | b)
}

fn rbd_request(
    pool: &str,
    name: String,
    bytes: i64,
    source: Option<csi::VolumeContentSource>,
) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest { parameters: params(pool), ..create_request(name, bytes, source) }
}

/// Waits until the purger has emptied the pool's trash (so the next
/// figures are not shared with it); answers how long that took.
async fn drain(pool: &Pool) -> Result<Duration, String> {
    let started = Instant::now();
    loop {
        let p = pool.clone();
        let left = off(move || p.trash_list()).await?.map_err(|e| e.to_string())?;
        if left.is_empty() {
            return Ok(started.elapsed());
        }
        if started.elapsed() > Duration::from_secs(600) {
            return Err(format!(
                "{} deleted images still in the trash after 10 minutes",
                left.len()
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    proc_kib(pid, "status", field)
}

fn p50(samples: &mut [Duration]) -> f64 {
    percentiles(samples).0
}

/// A blocking librbd sequence, timed, on the blocking pool.
async fn bare<T: Send + 'static>(
    f: impl FnOnce() -> ceph::Result<T> + Send + 'static,
) -> Result<(T, Duration), String> {
    off(move || {
        let t = Instant::now();
        f().map(|v| (v, t.elapsed())).map_err(|e| e.to_string())
    })
    .await?
}

fn image_count(pool: &Pool) -> usize {
    pool.list_images().map(|l| l.len()).unwrap_or(0)
}

pub async fn run(args: &BenchArgs) -> Result<(), String> {
    let conf = args
        .ceph_conf
        .clone()
        .ok_or("--engine rbd needs --ceph-conf (e.g. from scripts/ceph-dev-cluster start DIR)")?;
    let pool_name = args.rbd_pool.clone();
    let _ = FEATURES.set(args.rbd_image_features.clone());
    let args_: Vec<String> = [
        "--engine",
        "rbd",
        "--mode",
        "all",
        "--rbd-mapper",
        "fuse",
        "--rbd-pools",
        &pool_name,
        "--ceph-conf",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([conf.display().to_string()])
    .collect();
    let (scratch, channel, pid) = start_engine("bench-rbd", args_).await?;
    let idle = rss_kib(pid, "VmRSS:");
    let cluster = {
        let conf = conf.clone();
        off(move || {
            Cluster::connect(&ceph::Connect {
                conf: Some(&conf),
                op_timeout: 30,
                ..Default::default()
            })
        })
        .await?
        .map_err(|e| e.to_string())?
    };
    let pool = cluster.pool(&pool_name).map_err(|e| e.to_string())?;
    let libs = ceph::libraries()?;
    println!(
        "ferrovol bench --engine rbd: pool {pool_name} via {} (librbd {}.{}.{}; driver {})",
        conf.display(),
        libs.rbd_version.0,
        libs.rbd_version.1,
        libs.rbd_version.2,
        ferrovol_csi::build::version()
    );
    println!("(\"reference\": ceph-csi's RBD driver on this kind of machine and cluster; static figures, not measured here)");
    println!("imageFeatures: {}", args.rbd_image_features);
    let anon = proc_kib(pid, "smaps_rollup", "Anonymous:");
    report(
        "driver RSS idle, engine loaded",
        &format!("{:.1} MiB", idle as f64 / 1024.0),
        "≤ 20 MiB",
        "93 MiB",
    );
    println!(
        "    (of which {:.1} MiB private memory; the rest is library and program text mapped \
         from the page cache: libceph-common, librbd, libcrypto, ferrovol)",
        anon as f64 / 1024.0
    );

    let pairs = args.rbd_pairs;
    for (concurrency, goal, reference) in [(1usize, "≥ 59", "5.9"), (8, "≥ 194", "19.4")] {
        let cpu = cpu_seconds(pid);
        let rate = provisioning(&channel, &pool_name, concurrency, pairs).await?;
        let per_pair =
            (cpu_seconds(pid) - cpu) * 1e3 / (pairs.div_ceil(concurrency) * concurrency) as f64;
        // The purger removes the deleted images meanwhile and after: how
        // long until the trash is empty again (the reference leaves them
        // to the mgr).
        let drained = drain(&pool).await?;
        report(
            &format!("create+delete pairs/s, c={concurrency}"),
            &format!("{rate:.1}"),
            goal,
            reference,
        );
        println!(
            "    (trash empty {:.1} s after the last delete; reference: 130-148 images left to \
             the mgr, 7-39 s to drain)",
            drained.as_secs_f64()
        );
        let bare_rate = bare_pairs(&pool, concurrency, pairs).await?;
        println!(
            "    (bare librbd create4+remove: {bare_rate:.1} pairs/s; driver CPU {per_pair:.1} ms \
             per pair, reference ~35 ms)"
        );
    }

    for data_mib in [256u64, 1024] {
        drain(&pool).await?;
        cow(&channel, &pool, &pool_name, &conf, data_mib, args.samples.min(11)).await?;
    }
    member_restore(&channel, &pool_name, &conf).await?;
    node_cycle(&channel, &scratch.work, &pool_name, args.samples.min(7)).await?;
    if args.fio_seconds > 0 {
        data_path(&channel, &scratch.work, &pool_name, &conf, args.fio_seconds).await?;
    }
    drain(&pool).await?;
    report(
        "driver RSS peak",
        &format!("{:.1} MiB", rss_kib(pid, "VmHWM:") as f64 / 1024.0),
        "",
        "124 MiB",
    );
    let left = pool.list_images().map_err(|e| e.to_string())?;
    let trash = pool.trash_list().map_err(|e| e.to_string())?;
    println!("images left in {pool_name}: {} (trash: {})", left.len(), trash.len());
    Ok(())
}

async fn provisioning(
    channel: &Channel,
    pool: &str,
    concurrency: usize,
    pairs: usize,
) -> Result<f64, String> {
    let pool = pool.to_string();
    let request = move |name| rbd_request(&pool, name, 1 << 30, None);
    create_delete_pairs(channel, concurrency, pairs, request).await
}

async fn bare_pairs(pool: &Pool, concurrency: usize, pairs: usize) -> Result<f64, String> {
    let per_worker = pairs.div_ceil(concurrency);
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..concurrency {
        let pool = pool.clone();
        workers.push(off(move || {
            let opts = ImageOptions { features: feature_bits(), data_pool: None };
            for i in 0..per_worker {
                let name = format!("bench-bare-{concurrency}-{w}-{i}");
                pool.create_image(&name, 1 << 30, &opts).map_err(|e| e.to_string())?;
                pool.remove_image(&name).map_err(|e| e.to_string())?;
            }
            Ok::<_, String>(())
        }));
    }
    // The workers run side by side on the blocking pool.
    for outcome in futures_join(workers).await {
        outcome??;
    }
    Ok((per_worker * concurrency) as f64 / started.elapsed().as_secs_f64())
}

fn image_of(volume_id: &str) -> String {
    volume_id.rsplit(':').next().unwrap_or_default().to_string()
}

/// Writes `mib` of data into an image with Ceph's own `rbd bench`.
fn fill(conf: &Path, pool: &str, image: &str, mib: u64) -> Result<(), String> {
    let job = RbdBench { kind: "write", pattern: "seq", size: "4M", total: format!("{mib}M") };
    rbd_bench(conf, pool, image, &job).map(drop)
}

/// Snapshot, restore, clone and snapshot delete of a volume holding
/// `data_mib` of data, beside the bare librbd calls they are made of.
async fn cow(
    channel: &Channel,
    pool: &Pool,
    pool_name: &str,
    conf: &Path,
    data_mib: u64,
    samples: usize,
) -> Result<(), String> {
    use csi::volume_content_source::{SnapshotSource, Type, VolumeSource};
    let mut c = ControllerClient::new(channel.clone());
    let size = ((data_mib as i64) << 20).max(1 << 30);
    let src =
        create(&mut c, rbd_request(pool_name, format!("bench-src-{data_mib}"), size, None)).await?;
    let image = image_of(&src.volume_id);
    let (p, i) = (pool_name.to_string(), image.clone());
    let conf = conf.to_path_buf();
    off(move || fill(&conf, &p, &i, data_mib)).await??;

    let (mut snap_t, mut restore_t, mut clone_t, mut delsnap_t) = (vec![], vec![], vec![], vec![]);
    let (mut b_snap, mut b_clone, mut b_vclone, mut b_delsnap) = (vec![], vec![], vec![], vec![]);
    let mut extra_images = 0usize;
    for n in 0..samples {
        let before = image_count(pool);
        let t = Instant::now();
        let snap = snapshot(&mut c, format!("bench-snap-{data_mib}-{n}"), &src.volume_id).await?;
        snap_t.push(t.elapsed());
        let from_snapshot = csi::VolumeContentSource {
            r#type: Some(Type::Snapshot(SnapshotSource { snapshot_id: snap.snapshot_id.clone() })),
        };
        let t = Instant::now();
        let restored = create(
            &mut c,
            rbd_request(
                pool_name,
                format!("bench-restore-{data_mib}-{n}"),
                size,
                Some(from_snapshot),
            ),
        )
        .await?;
        restore_t.push(t.elapsed());
        let from_volume = csi::VolumeContentSource {
            r#type: Some(Type::Volume(VolumeSource { volume_id: src.volume_id.clone() })),
        };
        let t = Instant::now();
        let cloned = create(
            &mut c,
            rbd_request(pool_name, format!("bench-clone-{data_mib}-{n}"), size, Some(from_volume)),
        )
        .await?;
        clone_t.push(t.elapsed());
        extra_images += image_count(pool) - before - 2;
        for id in [restored.volume_id, cloned.volume_id] {
            delete(&mut c, id).await?;
        }
        let t = Instant::now();
        c.delete_snapshot(csi::DeleteSnapshotRequest {
            snapshot_id: snap.snapshot_id,
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
        delsnap_t.push(t.elapsed());

        // The same work as bare librbd calls: open + snap_create; clone3;
        // snap_create + clone3 + snap_remove; snap_remove; each image made
        // removed again (not timed).
        let (pl, img) = (pool.clone(), image.clone());
        let opts = ImageOptions { features: feature_bits(), data_pool: None };
        let (_, t) = bare({
            let (pl, img) = (pl.clone(), img.clone());
            move || pl.open(&img)?.snap_create("bare-snap")
        })
        .await?;
        b_snap.push(t);
        let (_, t) = bare({
            let (pl, img, o) = (pl.clone(), img.clone(), opts.clone());
            move || pl.clone_image(&img, "bare-snap", &pl, "bare-restore", &o)
        })
        .await?;
        b_clone.push(t);
        let (_, t) = bare({
            let (pl, img, o) = (pl.clone(), img.clone(), opts.clone());
            move || {
                let src = pl.open(&img)?;
                src.snap_create("bare-clone-snap")?;
                pl.clone_image(&img, "bare-clone-snap", &pl, "bare-clone", &o)?;
                src.snap_remove("bare-clone-snap")
            }
        })
        .await?;
        b_vclone.push(t);
        bare({
            let pl = pl.clone();
            move || {
                pl.remove_image("bare-restore")?;
                pl.remove_image("bare-clone")
            }
        })
        .await?;
        let (_, t) = bare(move || pl.open(&img)?.snap_remove("bare-snap")).await?;
        b_delsnap.push(t);
    }
    println!("{data_mib} MiB of data in the source ({samples} samples, p50):");
    for (what, ours, bare, reference) in [
        ("snapshot", &mut snap_t, &mut b_snap, "360-420"),
        ("restore", &mut restore_t, &mut b_clone, "230-240"),
        ("clone", &mut clone_t, &mut b_vclone, "320-370"),
        ("delete snapshot", &mut delsnap_t, &mut b_delsnap, "~120"),
    ] {
        let (o, b) = (p50(ours), p50(bare));
        report(
            &format!("  {what} ms (bare librbd {b:.1} ms, {:.2}×)", o / b),
            &format!("{o:.1}"),
            "≤ 1.5× bare",
            reference,
        );
    }
    println!("  images made per restore + clone beyond the two volumes: {extra_images}");
    delete(&mut c, src.volume_id).await?;
    Ok(())
}

/// Restoring a group snapshot member: on Pacific a full copy (the
/// documented exception), by clone where librbd has rbd_clone4.
async fn member_restore(channel: &Channel, pool_name: &str, conf: &Path) -> Result<(), String> {
    use csi::volume_content_source::{SnapshotSource, Type};
    use ferrovol_csi::group_controller_client::GroupControllerClient;

    let mut c = ControllerClient::new(channel.clone());
    let mut g = GroupControllerClient::new(channel.clone());
    let src =
        create(&mut c, rbd_request(pool_name, "bench-member-src".into(), 1 << 30, None)).await?;
    let (p, i) = (pool_name.to_string(), image_of(&src.volume_id));
    let conf = conf.to_path_buf();
    off(move || fill(&conf, &p, &i, 256)).await??;
    let t = Instant::now();
    let group = ferrovol_tools::bench::group_snapshot(
        &mut g,
        "bench-member-group".into(),
        std::slice::from_ref(&src.volume_id),
    )
    .await?;
    let group_ms = t.elapsed().as_secs_f64() * 1e3;
    let member = group.snapshots[0].snapshot_id.clone();
    let from = csi::VolumeContentSource {
        r#type: Some(Type::Snapshot(SnapshotSource { snapshot_id: member })),
    };
    let t = Instant::now();
    let restored =
        create(&mut c, rbd_request(pool_name, "bench-member-restore".into(), 1 << 30, Some(from)))
            .await?;
    let restore_ms = t.elapsed().as_secs_f64() * 1e3;
    let how = if ceph::libraries()?.has_clone_by_snap_id() {
        "clone (rbd_clone4)"
    } else {
        "full copy (Pacific)"
    };
    println!("group snapshot of 1 volume: {group_ms:.1} ms; restore of its member (256 MiB of data): {restore_ms:.1} ms, by {how}");
    delete(&mut c, restored.volume_id).await?;
    ferrovol_tools::bench::delete_group_snapshot(&mut g, group).await?;
    delete(&mut c, src.volume_id).await
}

fn stage_req(id: &str, staging: &Path, cap: csi::VolumeCapability) -> csi::NodeStageVolumeRequest {
    csi::NodeStageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(cap),
        ..Default::default()
    }
}

/// stage → publish → unpublish → unstage through the fuse mapper.
async fn node_cycle(
    channel: &Channel,
    work: &Path,
    pool_name: &str,
    samples: usize,
) -> Result<(), String> {
    let mut c = ControllerClient::new(channel.clone());
    let mut n = NodeClient::new(channel.clone());
    let id =
        create(&mut c, rbd_request(pool_name, "bench-node".into(), 1 << 30, None)).await?.volume_id;
    let (staging, target) = node_paths(work, "rbd-node")?;
    let mut times = vec![];
    for _ in 0..samples + 1 {
        let t = Instant::now();
        ferrovol_tools::bench::stage_publish(&mut n, &id, &staging, &target).await?;
        ferrovol_tools::bench::unpublish_unstage(&mut n, &id, &staging, &target).await?;
        times.push(t.elapsed());
    }
    let first = times.remove(0);
    let (p50, _, max) = percentiles(&mut times);
    println!(
        "node cycle through rbd-fuse + loop: first (mkfs) {:.1} ms; again p50 {p50:.1} ms max {max:.1} ms ({samples} samples)",
        first.as_secs_f64() * 1e3
    );
    delete(&mut c, id).await
}

/// One `rbd bench` job.
struct RbdBench {
    kind: &'static str,
    pattern: &'static str,
    /// Bytes per I/O, as rbd writes sizes (`4K`, `4M`).
    size: &'static str,
    total: String,
}

/// MiB/s and IOPS of `rbd bench` on the image.
fn rbd_bench(conf: &Path, pool: &str, image: &str, job: &RbdBench) -> Result<(f64, f64), String> {
    let t = Instant::now();
    let out = Command::new("rbd")
        .arg("-c")
        .arg(conf)
        .args(["bench", "--io-type", job.kind, "--io-pattern", job.pattern])
        .args(["--io-size", job.size, "--io-threads", "16"])
        .arg(format!("--io-total={}", job.total))
        .arg(format!("{pool}/{image}"))
        .output()
        .map_err(|e| format!("running rbd bench (ceph-common): {e}"))?;
    if !out.status.success() {
        return Err(format!("rbd bench: {}", String::from_utf8_lossy(&out.stderr)));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // "elapsed: 1   ops: 16384   ops/sec: 12345.6   bytes/sec: 50.2 MiB/s"
    let line = text.lines().find(|l| l.contains("elapsed:")).unwrap_or_default();
    let field = |k: &str| {
        line.split(k).nth(1).and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
    };
    let bytes_per_op = if job.size == "4K" { 4096.0 } else { 4.0 * 1048576.0 };
    let ops = match field("ops/sec:") {
        Some(o) if o > 0.0 => o,
        _ => field(" ops:").unwrap_or(0.0) / t.elapsed().as_secs_f64().max(0.001),
    };
    Ok((ops * bytes_per_op / 1048576.0, ops))
}

/// fio through the mapped volume (loop on rbd-fuse) vs `rbd bench` on the
/// same image.
async fn data_path(
    channel: &Channel,
    work: &Path,
    pool_name: &str,
    conf: &Path,
    seconds: u64,
) -> Result<(), String> {
    let mut c = ControllerClient::new(channel.clone());
    let mut n = NodeClient::new(channel.clone());
    let block = csi::VolumeCapability {
        access_mode: Some(csi::volume_capability::AccessMode {
            mode: csi::volume_capability::access_mode::Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(csi::volume_capability::AccessType::Block(
            csi::volume_capability::BlockVolume {},
        )),
    };
    let req = csi::CreateVolumeRequest {
        volume_capabilities: vec![block.clone()],
        ..rbd_request(pool_name, "bench-fio".into(), 1 << 30, None)
    };
    let id = create(&mut c, req).await?.volume_id;
    let (staging, target) = node_paths(work, "rbd-fio")?;
    n.node_stage_volume(stage_req(&id, &staging, block.clone()))
        .await
        .map_err(|e| e.to_string())?;
    n.node_publish_volume(csi::NodePublishVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(block),
        ..Default::default()
    })
    .await
    .map_err(|e| e.to_string())?;
    let jobs = [
        ("write", "4M", "seq write 4M"),
        ("read", "4M", "seq read 4M"),
        ("randwrite", "4k", "rand write 4k"),
        ("randread", "4k", "rand read 4k"),
    ];
    let mut ours = vec![];
    for (rw, bs, _) in jobs {
        let (kib, iops) = ferrovol_tools::bench::fio(&target, rw, bs, seconds)?;
        ours.push((kib / 1024.0, iops));
    }
    ferrovol_tools::bench::unpublish_unstage(&mut n, &id, &staging, &target).await?;
    let image = image_of(&id);
    let bare_jobs = [
        ("write", "seq", "4M"),
        ("read", "seq", "4M"),
        ("write", "rand", "4K"),
        ("read", "rand", "4K"),
    ];
    for ((_, _, label), ((kind, pattern, bs), (mibs, iops))) in
        jobs.iter().zip(bare_jobs.iter().zip(ours))
    {
        let total = if *bs == "4K" { "64M" } else { "512M" }.to_string();
        let job = RbdBench { kind, pattern, size: bs, total };
        let (bm, bi) = rbd_bench(conf, pool_name, &image, &job)?;
        println!(
            "fio {label:<14}: mapped (loop on rbd-fuse) {mibs:>7.1} MiB/s {iops:>7.0} IOPS | rbd bench {bm:>7.1} MiB/s {bi:>7.0} IOPS"
        );
    }
    delete(&mut c, id).await
}

/// Awaits every future, started together (each is spawned, so they run at
/// once rather than one after another).
async fn futures_join<T: Send + 'static>(
    all: Vec<impl std::future::Future<Output = T> + Send + 'static>,
) -> Vec<T> {
    let handles: Vec<_> = all.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.expect("a bench worker"));
    }
    out
}
