//! `ferrovol ctl` against a live `ferrovol serve`: JSON output parsed and
//! checked, and an exit code per failure class.

use crate::common;

use std::process::{Command, Output, Stdio};

use common::{DriverBuilder, PoolFs, TestPool};

fn ctl(socket: &std::path::Path, args: &[&str]) -> Output {
    ctl_command(socket, args).output().expect("running ferrovol ctl")
}

fn ctl_command(socket: &std::path::Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(common::BIN);
    cmd.arg("ctl")
        .arg("--endpoint")
        .arg(format!("unix://{}", socket.display()))
        .args(args)
        .env_remove("FERROVOL_ENDPOINT")
        .env_remove("CSI_ENDPOINT");
    cmd
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
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
    assert!(err.contains("NOT_FOUND"), "{err}");
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
    if ferrovol_host::node::fs::has_capability(ferrovol_host::node::fs::CAP_SYS_RESOURCE) {
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

/// ctl as a Unix tool: pipes, one error line, JSON errors, exit codes,
/// tables, units, and hints.
#[tokio::test(flavor = "multi_thread")]
async fn ctl_behaves_like_a_unix_tool() {
    let pool = TestPool::new(PoolFs::Ext4).await;
    let root = tempfile::tempdir().unwrap();
    let driver = DriverBuilder::new(root.path()).pool(&pool).start();
    let sock = driver.socket.clone();

    // An empty list is a header alone.
    let empty = ctl(&sock, &["volume", "list"]);
    assert!(empty.status.success(), "{}", stderr(&empty));
    assert_eq!(
        stdout(&empty).split_whitespace().collect::<Vec<_>>(),
        ["ID", "NAME", "SIZE", "CONDITION", "AGE"]
    );

    // Decimal sizes in binary units; without --size the default is said.
    let made = json(&ctl(&sock, &["-o", "json", "volume", "create", "half", "--size", "1.5G"]));
    assert_eq!(made["capacity_bytes"], 3u64 << 29);
    assert_eq!(made["name"], "half", "the name, from ferrovol's facts header");
    let context = made["volume_context"].as_object().unwrap();
    assert!(
        !context.keys().any(|k| k.starts_with("csi.ferrovol.io/")),
        "nothing of ferrovol's own in the context Kubernetes copies into the PV: {context:?}"
    );
    let default = ctl(&sock, &["volume", "create", "defaulted"]);
    assert!(default.status.success(), "{}", stderr(&default));
    assert!(
        stderr(&default).contains("no --size given: the driver's default size was used"),
        "{}",
        stderr(&default)
    );
    for i in 0..40 {
        assert!(ctl(&sock, &["volume", "create", &format!("many-{i}"), "--size", "8M"])
            .status
            .success());
    }

    // The table: ID first, then name, human size, condition, age.
    let table = stdout(&ctl(&sock, &["volume", "list"]));
    let row = table.lines().find(|l| l.contains(" half ")).expect("half is listed");
    let id = made["volume_id"].as_str().unwrap();
    assert!(row.starts_with(id), "{row}");
    assert!(row.contains("1.5 GiB") && row.contains("healthy"), "{row}");
    let age = row.split_whitespace().last().unwrap();
    assert!(age.ends_with('s') && age[..age.len() - 1].parse::<u64>().is_ok(), "{row}");
    let exact = stdout(&ctl(&sock, &["volume", "list", "--bytes"]));
    assert!(exact.lines().any(|l| l.contains(&(3u64 << 29).to_string())), "{exact}");
    // RFC 3339 times.
    let created = made["created"].as_str().unwrap();
    assert!(humantime::parse_rfc3339(created).is_ok(), "{created}");
    let snap = json(&ctl(&sock, &["-o", "json", "snapshot", "create", "s", "--volume", id]));
    let at = snap["creation_time"].as_str().expect("a time string");
    assert!(humantime::parse_rfc3339(at).is_ok(), "{at}");

    // A reader that goes away is no error (`ctl volume list | head -1`).
    let mut child = ctl_command(&sock, &["volume", "list"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let closed = child.wait_with_output().unwrap();
    assert_eq!(closed.status.code(), Some(0), "{}", stderr(&closed));
    assert!(!stderr(&closed).contains("panicked"), "{}", stderr(&closed));

    // One error, said once; JSON when the output is JSON.
    let missing = "vol-00000000000000000000000000000000";
    let text = ctl(&sock, &["volume", "get", missing]);
    assert_eq!(text.status.code(), Some(5));
    assert_eq!(stderr(&text).lines().count(), 1, "{}", stderr(&text));
    assert!(stderr(&text).starts_with("ferrovol ctl: NOT_FOUND: "), "{}", stderr(&text));
    let as_json = ctl(&sock, &["-o", "json", "volume", "get", missing]);
    let err: serde_json::Value = serde_json::from_slice(&as_json.stderr).expect("a JSON error");
    assert_eq!(err["error"]["grpc_code"], "NOT_FOUND");
    assert_eq!(err["error"]["exit_code"], 5);
    assert!(as_json.stdout.is_empty());

    // Deleting what is not there says so, and succeeds (delete is idempotent).
    let nothing = ctl(&sock, &["volume", "delete", missing]);
    assert!(nothing.status.success());
    assert!(stderr(&nothing).contains("nothing to delete"), "{}", stderr(&nothing));
    let nothing = json(&ctl(&sock, &["-o", "json", "volume", "delete", missing]));
    assert_eq!(nothing["not_found"], missing);
    let nothing = ctl(&sock, &["snapshot", "delete", "snap-00000000000000000000000000000000"]);
    assert!(nothing.status.success() && stderr(&nothing).contains("nothing to delete"));

    // A driver that grows volumes on the node: the hint names node expand.
    let expand = ctl(&sock, &["volume", "expand", id, "--size", "2G"]);
    assert_eq!(expand.status.code(), Some(9));
    assert!(stderr(&expand).contains("ferrovol ctl node expand"), "{}", stderr(&expand));

    // Every exit code is documented, INTERNAL's among them.
    let help = stdout(&Command::new(common::BIN).args(["ctl", "--help"]).output().unwrap());
    for code in [
        "2 bad usage",
        "3 driver unreachable",
        "5 not found",
        "9 not supported",
        "10 the driver failed (INTERNAL",
    ] {
        assert!(help.contains(code), "{code} in {help}");
    }
    // Durations and sizes that make no sense are usage errors, not panics.
    for bad in [["--timeout", "100000000000000000000"], ["--timeout", "0"]] {
        let o = ctl(&sock, &[&bad[..], &["volume", "list"]].concat());
        assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
        assert!(!stderr(&o).contains("panicked"));
    }

    // The sidecars' names for the endpoint work too.
    let alias = Command::new(common::BIN)
        .args(["ctl", "probe", "--csi-address"])
        .arg(&sock)
        .output()
        .unwrap();
    assert!(alias.status.success(), "{}", stderr(&alias));
    let env = Command::new(common::BIN)
        .args(["ctl", "probe"])
        .env_remove("FERROVOL_ENDPOINT")
        .env("CSI_ENDPOINT", format!("unix://{}", sock.display()))
        .output()
        .unwrap();
    assert!(env.status.success(), "{}", stderr(&env));
}

/// What an unreachable endpoint says: missing, not a socket, or refusing.
#[test]
fn unreachable_endpoints_say_what_to_check() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("missing.sock", "no socket at"),
        ("file.sock", "is not a socket"),
        ("stale.sock", "refuses connections"),
    ];
    std::fs::write(dir.path().join("file.sock"), b"").unwrap();
    drop(std::os::unix::net::UnixListener::bind(dir.path().join("stale.sock")).unwrap());
    for (name, says) in cases {
        let o = ctl(&dir.path().join(name), &["volume", "list"]);
        assert_eq!(o.status.code(), Some(3), "{name}: {}", stderr(&o));
        assert!(stderr(&o).contains(says), "{name}: {}", stderr(&o));
        assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
    }
}

/// With no endpoint given, serve and ctl meet at one absolute socket, from
/// any directory (as root: /run/ferrovol/csi.sock).
#[tokio::test(flavor = "multi_thread")]
async fn the_default_endpoint_is_absolute_and_shared() {
    let default = ferrovol_csi::endpoint::default_socket();
    assert!(default.is_absolute(), "{}", default.display());
    let pool = TestPool::new(PoolFs::Ext4).await;
    let root = tempfile::tempdir().unwrap();
    let mut serve = Command::new(common::BIN);
    serve
        .args(["serve", "--node-id", "default-node", "--state-dir"])
        .arg(root.path().join("state"))
        .arg("--pool-dir")
        .arg(&pool.dir)
        .env_remove("FERROVOL_ENDPOINT")
        .env_remove("CSI_ENDPOINT");
    let mut driver = common::spawn_logged(serve, default.clone(), root.path().into());
    let ready = driver.wait_for_log(ferrovol_core::server::READY_MESSAGE);
    assert!(
        ready.as_deref().is_some_and(|l| l.contains(&default.display().to_string())),
        "serving on {} (another driver there?): {}",
        default.display(),
        driver.logs()
    );
    let elsewhere = tempfile::tempdir().unwrap();
    let o = Command::new(common::BIN)
        .args(["ctl", "-o", "json", "info"])
        .current_dir(elsewhere.path())
        .env_remove("FERROVOL_ENDPOINT")
        .env_remove("CSI_ENDPOINT")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(json(&o)["node"]["node_id"], "default-node");
    assert!(driver.terminate().success());
    assert!(!default.exists(), "the socket is removed at exit");
}

/// A call cut off by a driver crash exits with the retry code (it may
/// have happened; the retry finds out), not the generic failure.
#[tokio::test(flavor = "multi_thread")]
async fn a_call_cut_off_by_a_crash_is_retryable() {
    let pool = TestPool::new(PoolFs::Ext4).await;
    let root = tempfile::tempdir().unwrap();
    let (mut driver, _fifo) =
        common::driver_paused_at(root.path(), &pool, "create-volume-after-reserve");
    let socket = root.path().join("csi.sock");
    let call = ctl_command(&socket, &["volume", "create", "cut-off", "--size", "16M"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    driver.wait_for_log("failpoint reached").unwrap();
    driver.kill();
    let out = call.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    // The next start rolls the half-made volume back; the retry works.
    let driver = DriverBuilder::new(root.path()).pool(&pool).start();
    let again = ctl(&socket, &["volume", "create", "cut-off", "--size", "16M"]);
    assert!(again.status.success(), "{}", stderr(&again));
    drop(driver);
}
