//! The metrics endpoints against the tools operators scrape them with:
//! Prometheus' own parsers (`promtool check metrics`, and a real Prometheus
//! server scraping the driver and the prober), not a parser of ours.
//!
//! Needs Debian's `prometheus` package (promtool and the server); `.ci/run`
//! installs it.

use crate::common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::req::{self, MIB};
use common::{http_get, http_get_accepting, logged_addr, Driver, DriverBuilder, PoolFs, TestPool};
use ferrovol_csi::controller_client::ControllerClient;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const CLASSIC: &str = "text/plain; version=0.0.4; charset=utf-8";

/// `promtool check metrics` on a body: the classic text parser and linter
/// that Prometheus ships. Err with what it printed.
fn promtool_check_metrics(body: &str) -> Result<(), String> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; .ci/run installs it)");
    child.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let said =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.success() && said.trim().is_empty() {
        Ok(())
    } else {
        Err(said)
    }
}

fn start_driver(pool: &TestPool, root: &std::path::Path) -> (Driver, String) {
    let mut driver =
        DriverBuilder::new(root).pool(pool).args(["--metrics-addr", "127.0.0.1:0"]).start();
    let addr = logged_addr(&driver.wait_for_log("metrics listening").unwrap());
    (driver, addr)
}

fn start_prober(driver: &Driver, root: &std::path::Path) -> (Driver, String) {
    let mut cmd = Command::new(common::BIN);
    cmd.args(["probe", "--metrics-addr", "127.0.0.1:0", "--interval", "100ms"])
        .arg("--csi-address")
        .arg(format!("unix://{}", driver.socket.display()))
        .env("RUST_LOG", "info");
    let mut prober = common::spawn_logged(cmd, driver.socket.clone(), root.into());
    let addr = logged_addr(&prober.wait_for_log("prober listening").unwrap());
    assert!(prober.wait_for_log("driver is ready").is_some());
    (prober, addr)
}

#[tokio::test(flavor = "multi_thread")]
async fn both_formats_pass_prometheus_parsers() {
    let pool = TestPool::new(PoolFs::Xfs).await;
    let root = tempfile::tempdir().unwrap();
    let (driver, addr) = start_driver(&pool, root.path());
    let mut c = ControllerClient::new(driver.channel().await);
    c.create_volume(req::create("scraped", 8 * MIB)).await.unwrap();
    let (_prober, probe_addr) = start_prober(&driver, root.path());

    for target in [&addr, &probe_addr] {
        // No Accept header (curl, older scrapers): the classic format, which
        // promtool's parser and linter accept as is.
        let (status, content_type, body) = http_get_accepting(target, "/metrics", None).await;
        assert_eq!((status, content_type.as_str()), (200, CLASSIC));
        assert!(!body.contains("# EOF") && !body.contains(" info\n"), "{body}");
        promtool_check_metrics(&body).unwrap_or_else(|e| panic!("{target}: {e}\n{body}"));

        // Asked for OpenMetrics, as Prometheus asks: OpenMetrics under its
        // own content type; promtool's classic parser rightly refuses it.
        let accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5";
        let (status, content_type, body) =
            http_get_accepting(target, "/metrics", Some(accept)).await;
        assert_eq!((status, content_type.as_str()), (200, OPENMETRICS));
        assert!(body.ends_with("# EOF\n"), "{body}");
    }
    let (_, _, classic) = http_get_accepting(&addr, "/metrics", None).await;
    assert!(classic.contains("# TYPE ferrovol_build_info gauge\n"), "{classic}");
    assert!(classic.contains("# TYPE ferrovol_rpc_requests_total counter\n"), "{classic}");
    assert!(
        classic.contains(r#"ferrovol_rpc_requests_total{method="CreateVolume",code="OK"} 1"#),
        "{classic}"
    );
    let (_, _, om) = http_get_accepting(&addr, "/metrics", Some(OPENMETRICS)).await;
    assert!(promtool_check_metrics(&om).is_err(), "the old answer fails promtool");
}

/// A free TCP port on loopback for a server that cannot be told port 0.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Percent-encodes a PromQL query for a URL.
fn query_escape(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The result vector of an instant query: (labels, value) per series.
async fn query(prometheus: &str, promql: &str) -> Vec<(serde_json::Value, f64)> {
    let path = format!("/api/v1/query?query={}", query_escape(promql));
    let (status, _, body) = http_get_accepting(prometheus, &path, None).await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("Prometheus answers JSON");
    assert_eq!(v["status"], "success", "{body}");
    v["data"]["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["metric"].clone(), s["value"][1].as_str().unwrap().parse().unwrap()))
        .collect()
}

/// Polls a query until `done` holds (scrapes are periodic; there is no
/// event to wait on), failing after a generous bound.
async fn until<F>(prometheus: &str, promql: &str, done: F) -> Vec<(serde_json::Value, f64)>
where
    F: Fn(&[(serde_json::Value, f64)]) -> bool,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let result = query(prometheus, promql).await;
        if done(&result) {
            return result;
        }
        assert!(Instant::now() < deadline, "{promql} never held: {result:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_real_prometheus_scrapes_driver_and_prober() {
    let pool = TestPool::new(PoolFs::Xfs).await;
    let root = tempfile::tempdir().unwrap();
    let (driver, addr) = start_driver(&pool, root.path());
    let (_prober, probe_addr) = start_prober(&driver, root.path());
    let mut c = ControllerClient::new(driver.channel().await);
    for i in 0..3 {
        c.create_volume(req::create(&format!("prom-{i}"), 8 * MIB)).await.unwrap();
    }

    let config = root.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  \
             - job_name: ferrovol\n    static_configs:\n      - targets: ['{addr}']\n  \
             - job_name: prober\n    static_configs:\n      - targets: ['{probe_addr}']\n"
        ),
    )
    .unwrap();
    let web = format!("127.0.0.1:{}", free_port());
    let mut cmd = Command::new("prometheus");
    cmd.arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", root.path().join("tsdb").display()))
        .arg(format!("--web.listen-address={web}"));
    let mut prometheus = common::spawn_logged(cmd, root.path().join("none"), root.path().into());
    assert!(
        prometheus.wait_for_log("Server is ready to receive web requests").is_some(),
        "prometheus did not start: {}",
        prometheus.logs()
    );

    let up = until(&web, "up", |r| r.len() == 2 && r.iter().all(|(_, v)| *v == 1.0)).await;
    println!("Prometheus /api/v1/query?query=up: {up:?}");
    let created = r#"ferrovol_rpc_requests_total{method="CreateVolume",code="OK"}"#;
    let series = until(&web, created, |r| r.len() == 1 && r[0].1 == 3.0).await;
    assert_eq!(series[0].0["job"], "ferrovol");
    println!("Prometheus {created}: {series:?}");
    until(&web, "csi_liveness", |r| r.len() == 1 && r[0].1 == 1.0).await;
    until(&web, "ferrovol_build_info", |r| r.len() == 1).await;
    // Nothing the scrapes returned was refused.
    let dropped = query(&web, "scrape_samples_post_metric_relabeling").await;
    assert!(dropped.iter().all(|(_, v)| *v > 0.0), "{dropped:?}");

    let (status, body) = http_get(&addr, "/healthz").await;
    assert_eq!((status, body.trim()), (200, "ok"));
}
