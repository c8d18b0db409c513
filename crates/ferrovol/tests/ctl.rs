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

#[tokio::test(flavor = "multi_thread")]
async fn info_snapshots_groups_and_metadata() {
    let pool = TestPool::new(PoolFs::Xfs).await;
    let root = tempfile::tempdir().unwrap();
    let driver = DriverBuilder::new(root.path()).pool(&pool).start();
    let sock = driver.socket.clone();
    let j = |args: &[&str]| json(&ctl(&sock, &[&["-o", "json"], args].concat()));

    let info = j(&["info"]);
    assert_eq!(info["name"], "local.csi.ferrovol.io");
    let caps = info["controller_capabilities"].as_array().unwrap();
    assert!(caps.iter().any(|c| c == "CREATE_DELETE_VOLUME"));
    assert!(info["plugin_capabilities"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c == "GROUP_CONTROLLER_SERVICE"));
    assert_eq!(info["node"]["topology"]["local.csi.ferrovol.io/node"], "test-node");
    assert_eq!(info["group_controller_capabilities"][0], "CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT");
    assert_eq!(j(&["probe"])["ready"], true);
    assert!(j(&["capacity"])["available_capacity"].as_i64().unwrap() > 0);

    let v =
        j(&["volume", "create", "src", "--size", "16M"])["volume_id"].as_str().unwrap().to_string();
    let w = j(&["volume", "create", "other", "--size", "16M"])["volume_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(j(&["volume", "validate", &v, "--fs", "ext4"])["confirmed"], true);
    let multi = j(&["volume", "validate", &v, "--access-mode", "multi-node-multi-writer"]);
    assert_eq!(multi["confirmed"], false);
    assert_eq!(
        ctl(&sock, &["volume", "expand", &v, "--size", "32M"]).status.code(),
        Some(9),
        "unsupported"
    );

    let file = pool.volume_file(&v);
    let s1 = j(&["snapshot", "create", "s1", "--volume", &v]);
    common::write_pattern(&file, 4 << 20, 8192, 7);
    let s2 = j(&["snapshot", "create", "s2", "--volume", &v]);
    let (s1, s2) = (s1["snapshot_id"].as_str().unwrap(), s2["snapshot_id"].as_str().unwrap());
    assert_eq!(j(&["snapshot", "get", s1])["source_volume_id"], v.as_str());
    assert_eq!(j(&["snapshot", "list", "--volume", &v]).as_array().unwrap().len(), 2);
    let delta = j(&["metadata", "delta", s1, s2]);
    assert_eq!(delta["total_bytes"], 8192);
    assert_eq!(delta["ranges"][0]["byte_offset"], 4 << 20);
    assert!(j(&["metadata", "allocated", s2])["total_bytes"].as_i64().unwrap() >= 8192);

    let g = j(&["group-snapshot", "create", "both", &v, &w]);
    let gid = g["group_snapshot_id"].as_str().unwrap();
    assert_eq!(g["snapshots"].as_array().unwrap().len(), 2);
    assert_eq!(j(&["group-snapshot", "get", gid])["ready_to_use"], true);
    let yaml = ctl(&sock, &["-o", "yaml", "group-snapshot", "get", gid]);
    let text = String::from_utf8_lossy(&yaml.stdout);
    assert!(
        text.contains(&format!("group_snapshot_id: \"{gid}\""))
            && text.contains("snapshots:\n  - "),
        "{text}"
    );
    assert!(ctl(&sock, &["group-snapshot", "delete", gid]).status.success());
    for s in [s1, s2] {
        assert!(ctl(&sock, &["snapshot", "delete", s]).status.success());
    }
    assert!(j(&["snapshot", "list"]).as_array().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn node_commands_by_hand() {
    let e = common::env(PoolFs::Ext4).await;
    let sock = e.driver.socket.clone();
    let j = |args: &[&str]| json(&ctl(&sock, &[&["-o", "json"], args].concat()));
    let v = j(&["volume", "create", "hand", "--size", "64M", "--fs", "ext4"])["volume_id"]
        .as_str()
        .unwrap()
        .to_string();
    let staging = e.kubelet.staging("hand");
    let target = e.kubelet.target("pod", "hand");
    let (st, tg) = (staging.display().to_string(), target.display().to_string());
    j(&["node", "stage", &v, "--staging", &st, "--fs", "ext4"]);
    j(&["node", "publish", &v, "--staging", &st, "--target", &tg, "--fs", "ext4"]);
    let stats = j(&["node", "stats", &v, "--path", &tg]);
    assert_eq!(stats["usage"][0]["unit"], "BYTES");
    assert_eq!(stats["condition"]["abnormal"], false);
    let grown = ctl(&sock, &["-o", "json", "node", "expand", &v, "--path", &tg, "--size", "128M"]);
    if ferrovol::node::fs::has_capability(ferrovol::node::fs::CAP_SYS_RESOURCE) {
        assert_eq!(json(&grown)["capacity_bytes"], 128 << 20);
    } else {
        assert_eq!(
            grown.status.code(),
            Some(6),
            "ext4 growth without CAP_SYS_RESOURCE is a precondition"
        );
    }
    j(&["node", "unpublish", &v, "--target", &tg]);
    j(&["node", "unstage", &v, "--staging", &st]);
    e.kubelet.assert_clean();
}
