//! `ferrovol ctl` against a live `ferrovol serve`: JSON output parsed and
//! checked, and an exit code per failure class.

mod common;

use std::process::{Command, Output};

use common::{DriverBuilder, PoolFs, TestPool};

fn ctl(socket: &std::path::Path, args: &[&str]) -> Output {
    Command::new(common::BIN)
        .arg("ctl")
        .arg("--endpoint")
        .arg(format!("unix://{}", socket.display()))
        .args(args)
        .output()
        .expect("running ferrovol ctl")
}

fn json(out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "ctl failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("ctl printed JSON")
}

#[tokio::test(flavor = "multi_thread")]
async fn volume_commands_and_exit_codes() {
    let pool = TestPool::new(PoolFs::Ext4).await;
    let root = tempfile::tempdir().unwrap();
    let driver = DriverBuilder::new(root.path()).pool(&pool).start();
    let sock = driver.socket.clone();

    let made = json(&ctl(
        &sock,
        &["-o", "json", "volume", "create", "static-1", "--size", "64M", "--fs", "xfs"],
    ));
    let id = made["volume_id"].as_str().unwrap().to_string();
    assert!(id.starts_with("vol-"));
    assert_eq!(made["capacity_bytes"], 300 << 20, "xfs volumes are at least 300 MiB");
    assert_eq!(made["accessible_topology"][0]["local.csi.ferrovol.io/node"], "test-node");

    let got = json(&ctl(&sock, &["-o", "json", "volume", "get", &id]));
    assert_eq!(got["volume_id"], id.as_str());
    assert_eq!(got["condition"]["abnormal"], false);
    let clone = json(&ctl(&sock, &["-o", "json", "volume", "create", "c", "--from-volume", &id]));
    assert_eq!(clone["content_source"]["volume_id"], id.as_str());
    let list = json(&ctl(&sock, &["-o", "json", "volume", "list"]));
    assert_eq!(list.as_array().unwrap().len(), 2);
    let table = ctl(&sock, &["volume", "list"]);
    assert!(String::from_utf8_lossy(&table.stdout).contains(&id), "table lists the volume");

    // Failure classes: not found 5, invalid 4, conflict 6, unreachable 3.
    let code = |o: Output| (o.status.code(), String::from_utf8_lossy(&o.stderr).into_owned());
    let (c, err) = code(ctl(&sock, &["volume", "get", "vol-00000000000000000000000000000000"]));
    assert_eq!(c, Some(5), "{err}");
    assert!(err.contains("NotFound"), "{err}");
    assert_eq!(code(ctl(&sock, &["volume", "create", "bad", "--param", "colour=blue"])).0, Some(4));
    assert_eq!(code(ctl(&sock, &["volume", "create", "static-1", "--size", "1G"])).0, Some(6));
    let gone = root.path().join("nobody.sock");
    assert_eq!(code(ctl(&gone, &["volume", "list"])).0, Some(3));

    for v in [clone["volume_id"].as_str().unwrap(), id.as_str()] {
        assert!(ctl(&sock, &["volume", "delete", v]).status.success());
    }
    assert!(json(&ctl(&sock, &["-o", "json", "volume", "list"])).as_array().unwrap().is_empty());
}
