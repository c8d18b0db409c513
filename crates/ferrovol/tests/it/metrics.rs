//! /metrics and /healthz of `ferrovol serve`, and the `ferrovol probe`
//! liveness prober following a driver that dies and comes back.

use crate::common;

use std::process::Command;

use common::req::{self, MIB};
use common::{http_get, logged_addr, DriverBuilder, PoolFs, TestPool};
use ferrovol_csi::controller_client::ControllerClient;

/// Every sample line of Prometheus text format: name{labels} value.
fn assert_prometheus_text(body: &str) {
    for line in body.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line}"));
        assert!(value.parse::<f64>().is_ok() || value == "+Inf", "bad value in {line}");
        let name = series.split('{').next().unwrap();
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad name in {line}"
        );
        if let Some(labels) = series.strip_prefix(name) {
            assert!(
                labels.is_empty() || (labels.starts_with('{') && labels.ends_with('}')),
                "{line}"
            );
        }
    }
    // Asked for nothing in particular, the classic format: no OpenMetrics
    // terminator (tests/prometheus.rs runs Prometheus' own parsers).
    assert!(!body.contains("# EOF"), "classic text has no # EOF");
}

fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_move_with_real_rpcs() {
    let pool = TestPool::new(PoolFs::Xfs).await;
    let root = tempfile::tempdir().unwrap();
    let mut driver =
        DriverBuilder::new(root.path()).pool(&pool).args(["--metrics-addr", "127.0.0.1:0"]).start();
    let addr = logged_addr(&driver.wait_for_log("metrics listening").unwrap());

    let mut c = ControllerClient::new(driver.channel().await);
    c.create_volume(req::create("measured", 8 * MIB)).await.unwrap();
    c.create_volume(req::create("", 8 * MIB)).await.unwrap_err();

    let (status, body) = http_get(&addr, "/metrics").await;
    assert_eq!(status, 200);
    assert_prometheus_text(&body);
    let ok = r#"ferrovol_rpc_requests_total{method="CreateVolume",code="OK"}"#;
    let bad = r#"ferrovol_rpc_requests_total{method="CreateVolume",code="INVALID_ARGUMENT"}"#;
    assert_eq!(sample(&body, ok), Some(1.0), "{body}");
    assert_eq!(sample(&body, bad), Some(1.0));
    let count = r#"ferrovol_rpc_duration_seconds_count{method="CreateVolume"}"#;
    assert_eq!(sample(&body, count), Some(2.0));
    assert_eq!(sample(&body, "ferrovol_volumes"), Some(1.0));
    assert_eq!(sample(&body, r#"ferrovol_cow_method{method="reflink"}"#), Some(1.0));
    assert!(sample(&body, "ferrovol_pool_capacity_bytes").unwrap() > 1e9);
    assert_eq!(sample(&body, "ferrovol_pool_provisioned_bytes"), Some(8.0 * 1048576.0));
    assert!(body.contains("ferrovol_build_info{"), "build info");

    // The counters move with the next call.
    c.create_volume(req::create("measured-2", 8 * MIB)).await.unwrap();
    let (_, body) = http_get(&addr, "/metrics").await;
    assert_eq!(sample(&body, ok), Some(2.0));
    assert_eq!(sample(&body, "ferrovol_volumes"), Some(2.0));

    let (status, body) = http_get(&addr, "/healthz").await;
    assert_eq!((status, body.trim()), (200, "ok"));
}

#[tokio::test(flavor = "multi_thread")]
async fn prober_follows_the_driver_down_and_up() {
    let pool = TestPool::new(PoolFs::Ext4).await;
    let root = tempfile::tempdir().unwrap();
    let mut driver = DriverBuilder::new(root.path()).pool(&pool).start();
    let socket = driver.socket.clone();

    let mut cmd = Command::new(common::BIN);
    cmd.args(["probe", "--metrics-addr", "127.0.0.1:0", "--interval", "50ms", "--timeout", "2s"])
        .arg("--csi-address")
        .arg(format!("unix://{}", socket.display()))
        .env("RUST_LOG", "info");
    let mut prober = common::spawn_logged(cmd, socket.clone(), root.path().into());
    let addr = logged_addr(&prober.wait_for_log("prober listening").unwrap());

    assert!(prober.wait_for_log("driver is ready").is_some());
    let (_, body) = http_get(&addr, "/metrics").await;
    assert_prometheus_text(&body);
    assert_eq!(sample(&body, "csi_liveness"), Some(1.0));
    assert_eq!(http_get(&addr, "/healthz").await.0, 200);

    driver.kill();
    assert!(prober.wait_for_new_log("driver is not ready").is_some());
    let (_, body) = http_get(&addr, "/metrics").await;
    assert_eq!(sample(&body, "csi_liveness"), Some(0.0));
    assert!(sample(&body, "csi_liveness_probe_failures_total").unwrap() >= 1.0);
    assert_eq!(http_get(&addr, "/healthz").await.0, 503);

    let _back = DriverBuilder::new(root.path()).pool(&pool).start();
    assert!(prober.wait_for_new_log("driver is ready").is_some());
    let (_, body) = http_get(&addr, "/metrics").await;
    assert_eq!(sample(&body, "csi_liveness"), Some(1.0));
    assert_eq!(http_get(&addr, "/healthz").await.0, 200);
}

/// The prober's flags as an operator types them: `:port` for every
/// interface (like Go exporters), the shared endpoint flag, and durations
/// that are refused rather than panicking.
#[tokio::test(flavor = "multi_thread")]
async fn prober_flags() {
    let pool = TestPool::new(PoolFs::Ext4).await;
    let root = tempfile::tempdir().unwrap();
    let driver = DriverBuilder::new(root.path()).pool(&pool).start();

    let mut cmd = Command::new(common::BIN);
    cmd.args(["probe", "--metrics-addr", ":0", "--interval", "50ms", "--endpoint"])
        .arg(&driver.socket)
        .env("RUST_LOG", "info");
    let mut prober = common::spawn_logged(cmd, driver.socket.clone(), root.path().into());
    let addr = logged_addr(&prober.wait_for_log("prober listening").unwrap());
    let port = addr.rsplit(':').next().unwrap();
    assert!(addr.starts_with("[::]") || addr.starts_with("0.0.0.0"), "all interfaces: {addr}");
    assert!(prober.wait_for_log("driver is ready").is_some());
    assert_eq!(http_get(&format!("127.0.0.1:{port}"), "/healthz").await.0, 200);

    for bad in ["100000000000000000000", "0", "soon"] {
        let o = Command::new(common::BIN)
            .args(["probe", "--endpoint", "/nowhere.sock", "--interval", bad])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "--interval {bad}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}
