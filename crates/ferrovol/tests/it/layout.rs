//! The architecture as the crates show it, kept true: the driver core
//! imports no engine and no Ceph code; the tools import neither; `unsafe`
//! lives in the host and Ceph crates alone; blocking work leaves the async
//! executor through the one helper (`ferrovol_host::offload`).

use std::path::{Path, PathBuf};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

/// The workspace crates a crate depends on (its `[dependencies]` alone).
fn dependencies(krate: &str) -> Vec<String> {
    let toml =
        std::fs::read_to_string(workspace().join("crates").join(krate).join("Cargo.toml")).unwrap();
    let section = toml.split("[dependencies]").nth(1).unwrap_or_default();
    let section = section.split("\n[").next().unwrap_or_default();
    section
        .lines()
        .filter_map(|l| l.split(['.', ' ', '=']).next())
        .filter(|name| name.starts_with("ferrovol"))
        .map(str::to_string)
        .collect()
}

fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(sources(&p));
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    out
}

#[test]
fn the_core_and_the_tools_import_no_engine_and_no_ceph() {
    let engines = [
        "ferrovol-local",
        "ferrovol-relay",
        "ferrovol-rbd",
        "ferrovol-cephfs",
        "ferrovol-cephclient",
        "ferrovol-block",
        "ferrovol-ceph",
    ];
    for (krate, also) in [("ferrovol-core", vec![]), ("ferrovol-tools", vec!["ferrovol-core"])] {
        let deps = dependencies(krate);
        assert!(!deps.is_empty(), "{krate} has workspace dependencies");
        for bad in engines.iter().chain(also.iter()) {
            assert!(!deps.iter().any(|d| d == bad), "{krate} depends on {bad}: {deps:?}");
        }
    }
}

#[test]
fn unsafe_lives_in_the_host_and_ceph_crates_alone() {
    for entry in std::fs::read_dir(workspace().join("crates")).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let root =
            ["src/lib.rs", "src/main.rs"].iter().map(|r| entry.path().join(r)).find(|p| p.exists());
        let Some(root) = root else { continue };
        let forbids = std::fs::read_to_string(&root).unwrap().contains("#![forbid(unsafe_code)]");
        match name.as_str() {
            "ferrovol-host" | "ferrovol-ceph" => {}
            _ => assert!(forbids, "{} does not forbid unsafe code", root.display()),
        }
    }
}

/// Engines stand side by side: none imports another (what two Ceph
/// engines share is a crate of its own, `ferrovol-cephclient`).
#[test]
fn no_engine_imports_another() {
    let engines = ["ferrovol-local", "ferrovol-rbd", "ferrovol-cephfs"];
    for krate in engines {
        let deps = dependencies(krate);
        assert!(!deps.is_empty(), "{krate} has workspace dependencies");
        for other in engines.iter().filter(|e| **e != krate) {
            assert!(!deps.iter().any(|d| d == other), "{krate} depends on {other}: {deps:?}");
        }
    }
}

#[test]
fn blocking_work_leaves_the_executor_through_one_helper() {
    // The helper itself, the quiesce module's own freeze threads, and a
    // thaw on drop where no async context may exist.
    let allowed = [
        "ferrovol-host/src/offload.rs",
        "ferrovol-host/src/node/quiesce.rs",
        "ferrovol-relay/src/agent.rs",
    ];
    let crates = workspace().join("crates");
    let mut found = Vec::new();
    for entry in std::fs::read_dir(&crates).unwrap().flatten() {
        let src = entry.path().join("src");
        if !src.exists() {
            continue;
        }
        for file in sources(&src) {
            let rel = file.strip_prefix(&crates).unwrap().display().to_string();
            if std::fs::read_to_string(&file).unwrap().contains("spawn_blocking")
                && !allowed.contains(&rel.as_str())
            {
                found.push(rel);
            }
        }
    }
    assert!(found.is_empty(), "spawn_blocking outside ferrovol_host::offload: {found:?}");
}

#[test]
fn the_wire_crate_holds_wire_types_and_errors_are_kinds_of_their_own_crate() {
    let csi = workspace().join("crates/ferrovol-csi/src");
    for source in sources(&csi) {
        let text = std::fs::read_to_string(&source).unwrap();
        assert!(!text.contains("pub mod error"), "{} declares errors", source.display());
        assert!(!text.contains("enum Error"), "{} declares errors", source.display());
    }
    // The host layer reports kinds too, and speaks no wire.
    let host = dependencies("ferrovol-host");
    assert!(host.iter().any(|d| d == "ferrovol-error"), "{host:?}");
    assert!(!host.iter().any(|d| d == "ferrovol-csi"), "{host:?}");
    // The kinds' crate is a leaf.
    assert_eq!(dependencies("ferrovol-error"), Vec::<String>::new());
}
