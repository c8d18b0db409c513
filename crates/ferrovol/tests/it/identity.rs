//! Identity service and server lifecycle, against the real binary.

use crate::common;

use common::DriverBuilder;
use ferrovol_csi as csi;
use ferrovol_csi::identity_client::IdentityClient;
use tonic::Code;

#[tokio::test(flavor = "multi_thread")]
async fn plugin_info_names_the_driver_and_version() {
    let root = tempfile::tempdir().unwrap();
    let driver = DriverBuilder::new(root.path()).args(["--driver-name", "x.example.io"]).start();
    let mut id = IdentityClient::new(driver.channel().await);

    let info = id.get_plugin_info(csi::GetPluginInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.name, "x.example.io");
    assert!(
        info.vendor_version.starts_with(env!("CARGO_PKG_VERSION")),
        "vendor_version {:?}",
        info.vendor_version
    );
    assert_eq!(info.manifest.get("mode").map(String::as_str), Some("all"));
}

#[tokio::test(flavor = "multi_thread")]
async fn capabilities_list_only_registered_services() {
    let root = tempfile::tempdir().unwrap();
    let driver = DriverBuilder::new(root.path()).args(["--mode", "node"]).start();
    let mut id = IdentityClient::new(driver.channel().await);
    let caps = id
        .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    let controller = csi::plugin_capability::service::Type::ControllerService as i32;
    assert!(
        !caps.iter().any(|c| matches!(
            &c.r#type,
            Some(csi::plugin_capability::Type::Service(s)) if s.r#type == controller
        )),
        "a node-only driver must not advertise the controller service: {caps:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn probe_reflects_a_writable_state_dir() {
    let root = tempfile::tempdir().unwrap();
    // The socket lives outside the state dir so the read-only mount below
    // affects only what Probe checks.
    let driver = DriverBuilder::new(root.path()).start();
    let mut id = IdentityClient::new(driver.channel().await);

    let ready = id.probe(csi::ProbeRequest {}).await.unwrap().into_inner().ready;
    assert_eq!(ready, Some(true));

    {
        let _ro = common::ReadOnly::new(&driver.state_dir);
        let err = id.probe(csi::ProbeRequest {}).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        assert!(err.message().contains("not writable"), "{}", err.message());
    }

    let ready = id.probe(csi::ProbeRequest {}).await.unwrap().into_inner().ready;
    assert_eq!(ready, Some(true), "ready again once the state dir is writable");
}

#[tokio::test(flavor = "multi_thread")]
async fn stale_socket_is_replaced() {
    let root = tempfile::tempdir().unwrap();
    let sock = root.path().join("csi.sock");
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap()); // leaves the file
    assert!(sock.exists());

    let mut driver = DriverBuilder::new(root.path()).start();
    assert!(driver.logs().contains("stale socket"), "{}", driver.logs());
    let mut id = IdentityClient::new(driver.channel().await);
    id.probe(csi::ProbeRequest {}).await.expect("serving on the replaced socket");
    assert!(driver.terminate().success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_live_socket_is_never_taken_over() {
    let root = tempfile::tempdir().unwrap();
    let first = DriverBuilder::new(root.path()).start();

    let other_state = root.path().join("other");
    std::fs::create_dir(&other_state).unwrap();
    let mut second = DriverBuilder::new(&other_state).socket(&first.socket).spawn();
    let status = second.wait();
    assert!(!status.success(), "second driver must refuse to start");
    assert!(second.logs().contains("live process"), "{}", second.logs());

    let mut id = IdentityClient::new(first.channel().await);
    id.probe(csi::ProbeRequest {}).await.expect("the first driver still serves");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_shuts_down_cleanly_and_removes_the_socket() {
    let root = tempfile::tempdir().unwrap();
    let mut driver = DriverBuilder::new(root.path()).start();
    assert!(driver.socket.exists());
    let mode = std::fs::metadata(&driver.socket).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o660,
        "socket must be owner+group only"
    );

    let status = driver.terminate();
    assert!(status.success(), "exit status {status:?}");
    assert!(!driver.socket.exists(), "socket must be removed on shutdown");
    assert!(driver.logs().contains("shutting down"));
}

#[tokio::test(flavor = "multi_thread")]
async fn json_logs_are_one_object_per_line() {
    let root = tempfile::tempdir().unwrap();
    let mut driver = DriverBuilder::new(root.path()).args(["--log-format", "json"]).start();
    let mut id = IdentityClient::new(driver.channel().await);
    id.probe(csi::ProbeRequest {}).await.unwrap();
    driver.terminate();
    let logs = driver.logs();
    let lines: Vec<&str> = logs.lines().filter(|l| !l.is_empty()).collect();
    assert!(!lines.is_empty());
    for l in &lines {
        assert!(l.starts_with('{') && l.ends_with('}'), "not a JSON object: {l}");
    }
    assert!(lines.iter().any(|l| l.contains("\"method\":\"Probe\"")), "{logs}");
}

/// The request's name has a key of its own in JSON logs: `name` is the
/// span's (two `name` keys in one object, and log stores kept the last, so
/// the volume's name was lost).
#[tokio::test(flavor = "multi_thread")]
async fn json_logs_keep_the_request_name() {
    use ferrovol_csi::controller_client::ControllerClient;
    let pool = common::TestPool::new(common::PoolFs::Ext4).await;
    let root = tempfile::tempdir().unwrap();
    let mut driver =
        DriverBuilder::new(root.path()).pool(&pool).args(["--log-format", "json"]).start();
    let mut c = ControllerClient::new(driver.channel().await);
    let v = c.create_volume(common::req::create("pvc-json", 1 << 20)).await.unwrap();
    c.delete_volume(common::req::delete(&v.into_inner().volume.unwrap().volume_id)).await.unwrap();
    driver.terminate();
    let logs = driver.logs();
    let line = logs
        .lines()
        .find(|l| l.contains("\"method\":\"CreateVolume\"") && l.contains("rpc done"))
        .unwrap_or_else(|| panic!("{logs}"));
    let parsed: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(parsed["span"]["object_name"], "pvc-json", "{line}");
    assert_eq!(parsed["span"]["name"], "rpc", "{line}");
    assert_eq!(line.matches("\"name\":\"pvc-json\"").count(), 0, "{line}");
}
