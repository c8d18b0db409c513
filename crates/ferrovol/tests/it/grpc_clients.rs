//! The driver's socket as clients other than grpc-go use it: Python's
//! grpcio with its default channel options (which sends the socket path as
//! the HTTP/2 `:authority`, like grpc-java and the C++ client).
//!
//! Needs a Python with grpcio and grpcio-tools: `$FERROVOL_TEST_PYTHON`, or
//! the venv `.ci/run` makes (`target/ci-venv`).

use crate::common;

use std::path::PathBuf;
use std::process::Command;

use common::{DriverBuilder, PoolFs, TestPool};

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("FERROVOL_TEST_PYTHON") {
        return p.into();
    }
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    workspace.join("target/ci-venv/bin/python")
}

#[tokio::test(flavor = "multi_thread")]
async fn python_grpcio_with_default_options() {
    let python = python();
    assert!(
        python.exists(),
        "{} is missing: run .ci/run once, or set FERROVOL_TEST_PYTHON to a Python with grpcio \
         and grpcio-tools",
        python.display()
    );
    let pool = TestPool::new(PoolFs::Ext4).await;
    let root = tempfile::tempdir().unwrap();
    let driver = DriverBuilder::new(root.path()).pool(&pool).start();
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let stubs = root.path().join("stubs");
    std::fs::create_dir(&stubs).unwrap();
    let out = Command::new(&python)
        .arg(manifest.join("tests/python/csi_client.py"))
        .arg(manifest.join("../../proto"))
        .arg(&driver.socket)
        .arg(&stubs)
        .output()
        .expect("running the Python client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(out.status.success(), "Python client failed:\n{stdout}\n{stderr}\n{}", driver.logs());
    assert!(stdout.contains("GetPluginInfo: local.csi.ferrovol.io"), "{stdout}");
    assert!(stdout.contains("CreateVolume x5: 5 volumes"), "{stdout}");
    assert!(stdout.contains("CreateVolume without a name: INVALID_ARGUMENT"), "{stdout}");
    assert!(stdout.contains("ListVolumes after delete: 0 entries"), "{stdout}");
}
