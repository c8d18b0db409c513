//! Arbitrary bytes as IDs, names and node paths: whatever is accepted must
//! stay inside the pool or the kubelet directory.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

static KUBELET: OnceLock<PathBuf> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let kubelet = KUBELET.get_or_init(|| {
        let root = std::env::temp_dir().join(format!("ferrovol-fuzz-paths-{}", std::process::id()));
        let kubelet = root.join("kubelet");
        std::fs::create_dir_all(kubelet.join("pods")).unwrap();
        let _ = std::os::unix::fs::symlink("/", kubelet.join("pods/escape"));
        kubelet.canonicalize().unwrap()
    });
    ferrovol_testkit::fuzz::ids_and_paths(kubelet, data);
});
