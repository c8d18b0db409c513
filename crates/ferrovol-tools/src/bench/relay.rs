//! `ferrovol bench --only relay`: what the relay adds to each call, and the
//! freeze window of a group snapshot across nodes. One relay and two node
//! agents (each `--mode agent` on its own XFS pool), linked over mutual TLS
//! on loopback. Every call is timed on an agent's own socket (local) and
//! through the relay (relayed), on the same node's volumes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferrovol_csi as csi;
use ferrovol_csi::controller_client::ControllerClient;
use ferrovol_csi::node_client::NodeClient;
use tonic::transport::Channel;

use super::{
    create, create_request, delete, fill_new, node_paths, stage_publish, unpublish_unstage,
};
use crate::endpoint::{self, Endpoint};
use crate::scratch::{Options, Scratch};

const KEY: &str = "local.csi.ferrovol.io/node";

/// The relay process and its work directory, stopped and removed on drop.
struct Relay {
    child: Child,
    work: PathBuf,
    socket: PathBuf,
    link: String,
}

impl Relay {
    async fn start(exe: &Path) -> Result<Relay, String> {
        let work =
            std::env::temp_dir().join(format!("ferrovol-bench-relay-{}", std::process::id()));
        std::fs::create_dir_all(&work).map_err(|e| e.to_string())?;
        let certs = Command::new(exe)
            .args(["link", "certs", "--node", "relay-a", "--node", "relay-b", "--out"])
            .arg(work.join("certs"))
            .output()
            .map_err(|e| e.to_string())?;
        if !certs.status.success() {
            return Err(String::from_utf8_lossy(&certs.stderr).into_owned());
        }
        let log = std::fs::File::create(work.join("relay.log")).map_err(|e| e.to_string())?;
        let child = Command::new(exe)
            .args(["serve", "--mode", "relay", "--node-id", "bench-relay", "--endpoint"])
            .arg(work.join("relay.sock"))
            .args(["--link-listen", "127.0.0.1:0", "--link-tls"])
            .arg(work.join("certs/relay"))
            .env("RUST_LOG", "warn,ferrovol_relay=info,ferrovol=info")
            .env("FERROVOL_LOG_FORMAT", "json")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting the relay: {e}"))?;
        let mut relay = Relay { child, socket: work.join("relay.sock"), work, link: String::new() };
        let line = relay.wait_for_log("link listening", 1).await?;
        relay.link = line
            .split("\"addr\":\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .ok_or("no address in the relay's log")?
            .to_string();
        Ok(relay)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.work.join("relay.log")).unwrap_or_default()
    }

    /// A tool may poll its own child's log: it measures, it does not assert.
    async fn wait_for_log(&self, needle: &str, times: usize) -> Result<String, String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let log = self.log();
            let hits: Vec<&str> = log.lines().filter(|l| l.contains(needle)).collect();
            if hits.len() >= times {
                return Ok(hits[times - 1].to_string());
            }
            if Instant::now() > deadline {
                return Err(format!("the relay never logged {needle:?}:\n{log}"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

fn on_node(name: String, node: &str, size: i64) -> csi::CreateVolumeRequest {
    let t = csi::Topology { segments: [(KEY.to_string(), node.to_string())].into() };
    csi::CreateVolumeRequest {
        accessibility_requirements: Some(csi::TopologyRequirement {
            requisite: vec![t.clone()],
            preferred: vec![t],
        }),
        ..create_request(name, size, None)
    }
}

/// p50 and p99 in milliseconds.
fn p50_p99(samples: &mut [Duration]) -> (f64, f64) {
    samples.sort();
    let at =
        |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1000.0;
    (at(0.5), at(0.99))
}

fn report(what: &str, local: &mut [Duration], relayed: &mut [Duration]) {
    let (l50, l99) = p50_p99(local);
    let (r50, r99) = p50_p99(relayed);
    println!(
        "  {what:<34} local p50 {l50:6.2} p99 {l99:6.2} ms | relayed p50 {r50:6.2} p99 {r99:6.2} ms | \
         added p50 {:+.2} p99 {:+.2} ms",
        r50 - l50,
        r99 - l99
    );
}

/// Times `call` on both channels, alternating, `samples` times each.
async fn compare<F, Fut>(
    what: &str,
    samples: usize,
    local: &Channel,
    relayed: &Channel,
    call: F,
) -> Result<(), String>
where
    F: Fn(Channel, usize) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let (mut l, mut r) = (Vec::with_capacity(samples), Vec::with_capacity(samples));
    for i in 0..samples {
        let t = Instant::now();
        call(local.clone(), 2 * i).await?;
        l.push(t.elapsed());
        let t = Instant::now();
        call(relayed.clone(), 2 * i + 1).await?;
        r.push(t.elapsed());
    }
    report(what, &mut l, &mut r);
    Ok(())
}

pub async fn run(samples: usize) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let relay = Relay::start(&exe).await?;
    // Each agent with its own node's certificate.
    let agent_args = |node: &str| {
        vec![
            "--mode".to_string(),
            "agent".into(),
            "--link-controller".into(),
            relay.link.clone(),
            "--link-tls".into(),
            relay.work.join("certs/nodes").join(node).display().to_string(),
        ]
    };
    let log = "warn,ferrovol_core::services::group_controller=info,ferrovol_local=debug";
    let a = Scratch::start(Options {
        local_pool: true,
        name: "relay-a",
        pool_dir: None,
        pool_size: 8 << 30,
        rust_log: log,
        args: agent_args("relay-a"),
    })
    .await?;
    let b = Scratch::start(Options {
        local_pool: true,
        name: "relay-b",
        pool_dir: None,
        pool_size: 8 << 30,
        rust_log: log,
        args: agent_args("relay-b"),
    })
    .await?;
    relay.wait_for_log("node agent connected", 2).await?;
    let connect = |p: &Path| {
        let p = p.to_path_buf();
        async move {
            endpoint::connect(&Endpoint::Unix(p)).await.map_err(|e| format!("connecting: {e}"))
        }
    };
    let (local, relayed) = (connect(&a.socket).await?, connect(&relay.socket).await?);
    let b_local = connect(&b.socket).await?;
    let samples = samples.max(200);
    println!("relay: one relay, two agents (relay-a, relay-b), mutual TLS on loopback; {samples} samples per call");

    // A volume on relay-a to ask about.
    let mut c = ControllerClient::new(local.clone());
    let probe =
        create(&mut c, on_node("bench-relay-probe".into(), "relay-a", 16 << 20)).await?.volume_id;
    let snap_source = probe.clone();
    let get_id = probe.clone();
    compare("ControllerGetVolume", samples, &local, &relayed, |ch, _| {
        let id = get_id.clone();
        async move {
            ControllerClient::new(ch)
                .controller_get_volume(csi::ControllerGetVolumeRequest { volume_id: id })
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        }
    })
    .await?;
    compare("GetCapacity (relay-a's segment)", samples, &local, &relayed, |ch, _| async move {
        let t = csi::Topology { segments: [(KEY.to_string(), "relay-a".to_string())].into() };
        ControllerClient::new(ch)
            .get_capacity(csi::GetCapacityRequest {
                accessible_topology: Some(t),
                ..Default::default()
            })
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    })
    .await?;
    compare("CreateVolume+DeleteVolume (16 MiB)", samples, &local, &relayed, |ch, i| async move {
        let mut c = ControllerClient::new(ch);
        let v =
            create(&mut c, on_node(format!("bench-relay-pair-{i}"), "relay-a", 16 << 20)).await?;
        delete(&mut c, v.volume_id).await
    })
    .await?;
    compare("CreateSnapshot+DeleteSnapshot", samples / 4, &local, &relayed, |ch, i| {
        let source = snap_source.clone();
        async move {
            let mut c = ControllerClient::new(ch);
            let s = super::snapshot(&mut c, format!("bench-relay-snap-{i}"), &source).await?;
            c.delete_snapshot(csi::DeleteSnapshotRequest {
                snapshot_id: s.snapshot_id,
                ..Default::default()
            })
            .await
            .map(drop)
            .map_err(|e| e.to_string())
        }
    })
    .await?;
    delete(&mut c, probe).await?;

    // A group across both nodes: one mounted member on each, holding data.
    let mut members = Vec::new();
    for (scratch, channel, node) in [(&a, &local, "relay-a"), (&b, &b_local, "relay-b")] {
        let mut c = ControllerClient::new(channel.clone());
        let mut n = NodeClient::new(channel.clone());
        let request = csi::CreateVolumeRequest {
            volume_capabilities: vec![super::node_cap()],
            ..on_node(format!("bench-relay-member-{node}"), node, 320 << 20)
        };
        let id = create(&mut c, request).await?.volume_id;
        let (staging, target) = node_paths(&scratch.work, "member")?;
        stage_publish(&mut n, &id, &staging, &target).await?;
        fill_new(&target.join("data"), 256 << 20).map_err(|e| format!("writing data: {e}"))?;
        members.push((channel.clone(), id, staging, target));
    }
    let ids: Vec<String> = members.iter().map(|m| m.1.clone()).collect();
    let group_samples = samples.min(21);
    let mut totals =
        super::timed_group_snapshots(&relayed, &ids, "bench-relay-group", group_samples).await?;
    let mut windows: Vec<Duration> = relay
        .log()
        .lines()
        .filter(|l| l.contains("group snapshot across nodes taken"))
        .filter_map(|l| {
            l.split("\"window_ms\":").nth(1)?.split([',', '}']).next()?.parse::<f64>().ok()
        })
        .map(|ms| Duration::from_secs_f64(ms / 1000.0))
        .collect();
    let (t50, t99) = p50_p99(&mut totals);
    println!("  group snapshot across 2 nodes (2 x 256 MiB, mounted): RPC p50 {t50:.2} ms p99 {t99:.2} ms ({group_samples} samples)");
    if !windows.is_empty() {
        let (w50, w99) = p50_p99(&mut windows);
        let max = windows.last().map_or(0.0, |d| d.as_secs_f64() * 1000.0);
        println!("    freeze window (the longest any node kept its member frozen, as the node measured it): p50 {w50:.2} ms p99 {w99:.2} ms max {max:.2} ms");
    }
    for (channel, id, staging, target) in members {
        let mut n = NodeClient::new(channel.clone());
        unpublish_unstage(&mut n, &id, &staging, &target).await?;
        delete(&mut ControllerClient::new(channel), id).await?;
    }
    Ok(())
}
