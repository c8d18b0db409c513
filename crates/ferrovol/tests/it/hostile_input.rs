//! Property tests: hostile strings and arbitrary bytes against the ID and
//! path rules and against the real services on a scratch pool (the same
//! entry points the `fuzz/` targets drive). No input may panic the driver,
//! produce INTERNAL or UNKNOWN, or write outside the pool.

use crate::common;

use ferrovol_csi as csi;
use ferrovol_testkit::fuzz::{self, Harness};
use proptest::prelude::*;
use prost::Message;

/// Strings built to hurt: traversal, absolute paths, NUL, percent- and
/// backslash-encoded separators, control characters, over-long runs, IDs
/// that look almost right, and plain arbitrary Unicode.
fn hostile() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("../".to_string()),
        Just("..".to_string()),
        Just("/".to_string()),
        Just("/etc/passwd".to_string()),
        Just("%2e%2e%2f".to_string()),
        Just("%00".to_string()),
        Just("\0".to_string()),
        Just("\\..\\".to_string()),
        Just("vol-".to_string()),
        Just("snap-".to_string()),
        Just("group-".to_string()),
        Just("0123456789abcdef0123456789abcdef".to_string()),
        Just("pods/escape/".to_string()),
        Just("pods/pool/".to_string()),
        Just("\u{7f}\u{85}\u{202e}".to_string()),
        "[a-z0-9._/-]{0,12}",
        any::<String>(),
        (1usize..5000).prop_map(|n| "a".repeat(n)),
    ];
    prop::collection::vec(piece, 0..6).prop_map(|v| v.concat())
}

fn harness() -> (tempfile::TempDir, Harness) {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::new(&dir.path().join("scratch"));
    (dir, h)
}

fn cap(fs: String) -> csi::VolumeCapability {
    use csi::volume_capability::*;
    csi::VolumeCapability {
        access_mode: Some(AccessMode { mode: access_mode::Mode::SingleNodeWriter as i32 }),
        access_type: Some(AccessType::Mount(MountVolume { fs_type: fs, ..Default::default() })),
    }
}

/// A hostile path, half the time dressed as one under the kubelet dir.
fn hostile_path(kubelet: &str) -> impl Strategy<Value = String> {
    let kubelet = kubelet.to_string();
    prop_oneof![hostile(), hostile().prop_map(move |s| format!("{kubelet}/{s}"))]
}

/// Requests whose every string field is hostile, tagged with the harness's
/// RPC selector.
fn hostile_request(kubelet: &str) -> impl Strategy<Value = Vec<u8>> {
    let (b, c) = (hostile_path(kubelet), hostile_path(kubelet));
    (hostile(), b, c, any::<i64>(), any::<i64>(), 0u8..19).prop_map(
        |(a, b, c, required, limit, which)| {
            let range = Some(csi::CapacityRange { required_bytes: required, limit_bytes: limit });
            let body = match which {
                0 => csi::CreateVolumeRequest {
                    name: a,
                    capacity_range: range,
                    volume_capabilities: vec![cap(c.clone())],
                    parameters: [(b.clone(), c)].into(),
                    volume_content_source: Some(csi::VolumeContentSource {
                        r#type: Some(csi::volume_content_source::Type::Volume(
                            csi::volume_content_source::VolumeSource { volume_id: b },
                        )),
                    }),
                    ..Default::default()
                }
                .encode_to_vec(),
                5 => csi::CreateSnapshotRequest {
                    name: a,
                    source_volume_id: b,
                    ..Default::default()
                }
                .encode_to_vec(),
                10 => csi::CreateVolumeGroupSnapshotRequest {
                    name: a,
                    source_volume_ids: vec![b, c],
                    ..Default::default()
                }
                .encode_to_vec(),
                15 => csi::NodeStageVolumeRequest {
                    volume_id: a,
                    staging_target_path: b,
                    volume_capability: Some(cap(c)),
                    ..Default::default()
                }
                .encode_to_vec(),
                16 => csi::NodePublishVolumeRequest {
                    volume_id: a,
                    staging_target_path: b,
                    target_path: c,
                    volume_capability: Some(cap("ext4".into())),
                    ..Default::default()
                }
                .encode_to_vec(),
                17 => {
                    csi::NodeUnpublishVolumeRequest { volume_id: a, target_path: b }.encode_to_vec()
                }
                // The rest take one ID or name first (field 1) and a second
                // string (field 2): the same bytes suit every one of them.
                _ => csi::DeleteSnapshotRequest { snapshot_id: a, ..Default::default() }
                    .encode_to_vec(),
            };
            [vec![which], body].concat()
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn ids_names_and_paths_never_reach_outside(s in hostile()) {
        let dir = tempfile::tempdir().unwrap();
        let kubelet = dir.path().canonicalize().unwrap().join("kubelet");
        std::fs::create_dir_all(kubelet.join("pods")).unwrap();
        std::os::unix::fs::symlink("/", kubelet.join("pods/escape")).unwrap();
        fuzz::ids_and_paths(&kubelet, s.as_bytes());
        let prefixed = format!("{}/{s}", kubelet.display());
        fuzz::ids_and_paths(&kubelet, prefixed.as_bytes());
    }
}

#[test]
fn hostile_requests_get_clear_errors_and_touch_nothing_outside() {
    let (_dir, h) = harness();
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 3000,
        ..ProptestConfig::default()
    });
    let kubelet = h.kubelet_dir.display().to_string();
    let codes = std::cell::RefCell::new(std::collections::BTreeMap::new());
    runner
        .run(&hostile_request(&kubelet), |bytes| {
            // (Some RPCs' first field is no string: those bytes do not decode.)
            let outcome = h.request(&bytes).map_or("undecodable".into(), |c| format!("{c:?}"));
            *codes.borrow_mut().entry(outcome).or_insert(0) += 1;
            Ok(())
        })
        .unwrap();
    // Some got through validation to the engine: the test reaches past the
    // first check.
    let codes = codes.into_inner();
    eprintln!("outcomes: {codes:?}");
    assert!(codes.contains_key("NotFound") && codes.contains_key("InvalidArgument"), "{codes:?}");
}

#[test]
fn arbitrary_bytes_as_requests_never_panic() {
    let (_dir, h) = harness();
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 3000,
        ..ProptestConfig::default()
    });
    runner
        .run(&prop::collection::vec(any::<u8>(), 1..512), |bytes| {
            h.request(&bytes);
            Ok(())
        })
        .unwrap();
}

/// The seeds checked in for the fuzzers are replayed on every run.
#[test]
fn fuzz_corpus_seeds_replay_cleanly() {
    let (_dir, h) = harness();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds");
    let mut replayed = 0;
    for target in ["requests", "ids_and_paths"] {
        for e in std::fs::read_dir(root.join(target)).unwrap() {
            let bytes = std::fs::read(e.unwrap().path()).unwrap();
            match target {
                "requests" => drop(h.request(&bytes)),
                _ => fuzz::ids_and_paths(&h.kubelet_dir, &bytes),
            }
            replayed += 1;
        }
    }
    assert!(replayed >= 10, "the seed corpus is there ({replayed} files)");
}

/// Writes the seed corpus the fuzzers start from (run by hand with
/// `--ignored` when the request shapes change; the files are committed).
#[test]
#[ignore]
fn write_fuzz_seeds() {
    use proptest::strategy::ValueTree;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds");
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    for i in 0..24 {
        let request = hostile_request("/var/lib/kubelet").new_tree(&mut runner).unwrap().current();
        std::fs::write(root.join(format!("requests/seed-{i:02}")), request).unwrap();
        let s = hostile().new_tree(&mut runner).unwrap().current();
        std::fs::write(root.join(format!("ids_and_paths/seed-{i:02}")), s).unwrap();
    }
}

mod wire {
    //! Bytes no client library would send, over the real socket to the real
    //! binary: what decoding itself makes of them.
    use bytes::{Buf, BufMut};
    use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
    use tonic::Status;

    #[derive(Default, Clone)]
    pub struct Raw;
    pub struct RawEncoder;
    pub struct RawDecoder;

    impl Codec for Raw {
        type Encode = Vec<u8>;
        type Decode = Vec<u8>;
        type Encoder = RawEncoder;
        type Decoder = RawDecoder;
        fn encoder(&mut self) -> RawEncoder {
            RawEncoder
        }
        fn decoder(&mut self) -> RawDecoder {
            RawDecoder
        }
    }

    impl Encoder for RawEncoder {
        type Item = Vec<u8>;
        type Error = Status;
        fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
            dst.put_slice(&item);
            Ok(())
        }
    }

    impl Decoder for RawDecoder {
        type Item = Vec<u8>;
        type Error = Status;
        fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
            Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn undecodable_bytes_on_the_wire_are_invalid_argument() {
    let pool = common::TestPool::new(common::PoolFs::Ext4).await;
    let kubelet = common::Kubelet::new(&pool);
    let root = tempfile::tempdir().unwrap();
    let driver = common::DriverBuilder::new(root.path()).pool(&pool).kubelet(&kubelet).start();
    let mut grpc = tonic::client::Grpc::new(driver.channel().await);
    let cases: [(&str, &str, Vec<u8>); 4] = [
        // Field 1 (name), 2 bytes, not UTF-8.
        ("name not UTF-8", "/csi.v1.Controller/CreateVolume", vec![0x0a, 0x02, 0xff, 0xfe]),
        // Field 1 claims 16 bytes and has 1.
        ("truncated", "/csi.v1.Controller/CreateVolume", vec![0x0a, 0x10, 0x61]),
        // Field 2 (staging_target_path) not UTF-8.
        ("path not UTF-8", "/csi.v1.Node/NodeStageVolume", vec![0x12, 0x03, 0x2f, 0xc3, 0x28]),
        // A varint that never ends.
        (
            "endless varint",
            "/csi.v1.Controller/DeleteVolume",
            vec![0x08; 1].into_iter().chain([0xff; 11]).collect(),
        ),
    ];
    for (what, path, bytes) in cases {
        grpc.ready().await.unwrap();
        let path = tonic::codegen::http::uri::PathAndQuery::from_static(path);
        let status = grpc
            .unary::<Vec<u8>, Vec<u8>, _>(tonic::Request::new(bytes), path, wire::Raw)
            .await
            .expect_err(what);
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{what}: {status:?}");
    }
    assert!(pool.files("volumes").is_empty() && pool.files("staging").is_empty());
    kubelet.assert_clean();
}

/// A megabyte in a name, a parameter, a secret or a context: INVALID_ARGUMENT
/// by the spec's size limits (128 bytes for names and IDs and map keys,
/// 4 KiB for a map), with a short message that echoes at most 128 bytes of
/// it, and a log that stays small. It was logged whole (5 MB from nine
/// calls) and echoed into the status, whose trailer then broke the
/// client's metadata limit (RESOURCE_EXHAUSTED instead of the real error).
#[tokio::test(flavor = "multi_thread")]
async fn huge_input_is_refused_by_size_and_never_echoed_whole() {
    use ferrovol_csi::controller_client::ControllerClient;
    use ferrovol_csi::node_client::NodeClient;
    let pool = common::TestPool::new(common::PoolFs::Ext4).await;
    let kubelet = common::Kubelet::new(&pool);
    let root = tempfile::tempdir().unwrap();
    let driver = common::DriverBuilder::new(root.path()).pool(&pool).kubelet(&kubelet).start();
    let mut c = ControllerClient::new(driver.channel().await);
    let mut n = NodeClient::new(driver.channel().await);
    let huge = "x".repeat(1 << 20);
    let big_map = || std::collections::HashMap::from([("k".to_string(), huge.clone())]);
    let big_key = || std::collections::HashMap::from([(huge.clone(), "v".to_string())]);
    let log_before = driver.logs().len();
    let mut statuses = Vec::new();
    let create = |f: &dyn Fn(&mut csi::CreateVolumeRequest)| {
        let mut r = common::req::create("huge", 16 << 20);
        f(&mut r);
        r
    };
    for r in [
        create(&|r| r.name = huge.clone()),
        create(&|r| r.parameters = big_map()),
        create(&|r| r.parameters = big_key()),
        create(&|r| r.secrets = big_map()),
        create(&|r| r.mutable_parameters = big_map()),
    ] {
        statuses.push(c.create_volume(r).await.unwrap_err());
    }
    statuses.push(c.delete_volume(common::req::delete(&huge)).await.unwrap_err());
    let staging = kubelet.staging("pv-huge");
    let mut stage = common::req::stage_req("vol-x", &staging, common::req::mount_cap("ext4"));
    stage.volume_context = big_map();
    statuses.push(n.node_stage_volume(stage).await.unwrap_err());
    let mut stage = common::req::stage_req("vol-x", &staging, common::req::mount_cap("ext4"));
    stage.staging_target_path = format!("relative/{huge}");
    statuses.push(n.node_stage_volume(stage).await.unwrap_err());
    let snap = csi::CreateSnapshotRequest {
        name: "s".into(),
        source_volume_id: "vol-x".into(),
        parameters: big_map(),
        ..Default::default()
    };
    statuses.push(c.create_snapshot(snap).await.unwrap_err());
    for s in &statuses {
        assert_eq!(s.code(), tonic::Code::InvalidArgument, "{:?}", s.code());
        assert!(s.message().len() < 512, "echoed {} bytes", s.message().len());
    }
    let logged = driver.logs().len() - log_before;
    assert!(logged < 64 << 10, "{logged} bytes of log from {} calls", statuses.len());
    assert!(pool.files("volumes").is_empty());
    kubelet.assert_clean();
}
