//! The root-free tier: the real services and RPC plumbing over an
//! in-process channel, on the in-memory engine in both shapes (storage on
//! the node; storage attached by the controller). Runs in seconds as any
//! user; `.ci/run` runs it as `nobody`.

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

use ferrovol_core::cli::Mode;
use ferrovol_core::engine::ControllerEngine;
use ferrovol_csi as csi;
use ferrovol_csi::controller_client::ControllerClient;
use ferrovol_csi::controller_service_capability::rpc::Type as Cap;
use ferrovol_csi::identity_client::IdentityClient;
use ferrovol_csi::node_client::NodeClient;
use ferrovol_csi::volume_capability::access_mode::Mode as AccessMode;
use ferrovol_csi::volume_capability::{AccessType, BlockVolume, MountVolume};
use ferrovol_testkit::harness::{serve, Harness};
use ferrovol_testkit::mem::{Shape, PANIC, TOPOLOGY_KEY};
use tonic::transport::Channel;
use tonic::Code;

const MIB: i64 = 1 << 20;

fn cap(mode: AccessMode, block: bool) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_mode: Some(csi::volume_capability::AccessMode { mode: mode as i32 }),
        access_type: Some(match block {
            true => AccessType::Block(BlockVolume {}),
            false => {
                AccessType::Mount(MountVolume { fs_type: "ext4".into(), ..Default::default() })
            }
        }),
    }
}

fn create(name: &str, size: i64, cap: csi::VolumeCapability) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(csi::CapacityRange { required_bytes: size, limit_bytes: 0 }),
        volume_capabilities: vec![cap],
        ..Default::default()
    }
}

fn controller(h: &Harness) -> ControllerClient<Channel> {
    ControllerClient::new(h.channel.clone())
}

async fn new_volume(c: &mut ControllerClient<Channel>, name: &str, block: bool) -> String {
    let r = create(name, 64 * MIB, cap(AccessMode::SingleNodeWriter, block));
    c.create_volume(r).await.unwrap().into_inner().volume.unwrap().volume_id
}

async fn controller_caps(h: &Harness) -> Vec<Cap> {
    let caps = controller(h)
        .controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    caps.iter()
        .filter_map(|c| match &c.r#type {
            Some(csi::controller_service_capability::Type::Rpc(r)) => Cap::try_from(r.r#type).ok(),
            None => None,
        })
        .collect()
}

/// (services, online expansion) of GetPluginCapabilities.
async fn plugin_caps(h: &Harness) -> (Vec<i32>, bool) {
    use csi::plugin_capability::Type;
    let caps = IdentityClient::new(h.channel.clone())
        .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    let services = caps
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(Type::Service(s)) => Some(s.r#type),
            _ => None,
        })
        .collect();
    let online = caps.iter().any(|c| matches!(c.r#type, Some(Type::VolumeExpansion(_))));
    (services, online)
}

#[tokio::test]
async fn capabilities_are_exactly_what_the_engine_shape_supports() {
    use csi::plugin_capability::service::Type as Service;
    let local = serve(Shape::NodeLocal, Mode::All).await;
    let caps = controller_caps(&local).await;
    for absent in [Cap::PublishUnpublishVolume, Cap::ListVolumesPublishedNodes, Cap::ExpandVolume] {
        assert!(!caps.contains(&absent), "node-local engine advertises {absent:?}: {caps:?}");
    }
    assert!(caps.contains(&Cap::CreateDeleteVolume) && caps.contains(&Cap::SingleNodeMultiWriter));
    let (services, online) = plugin_caps(&local).await;
    assert!(services.contains(&(Service::VolumeAccessibilityConstraints as i32)));
    assert!(online, "the node grows node-local volumes: online expansion is advertised");
    let mut c = controller(&local);
    let id = new_volume(&mut c, "pv-local", false).await;
    let publish = csi::ControllerPublishVolumeRequest {
        volume_id: id.clone(),
        node_id: "mem-node".into(),
        volume_capability: Some(cap(AccessMode::SingleNodeWriter, false)),
        ..Default::default()
    };
    assert_eq!(c.controller_publish_volume(publish).await.unwrap_err().code(), Code::Unimplemented);
    let expand = csi::ControllerExpandVolumeRequest {
        volume_id: id,
        capacity_range: Some(csi::CapacityRange { required_bytes: 128 * MIB, limit_bytes: 0 }),
        ..Default::default()
    };
    assert_eq!(c.controller_expand_volume(expand).await.unwrap_err().code(), Code::Unimplemented);

    let attached = serve(Shape::Attached, Mode::Controller).await;
    let caps = controller_caps(&attached).await;
    for present in [Cap::PublishUnpublishVolume, Cap::ListVolumesPublishedNodes, Cap::ExpandVolume]
    {
        assert!(caps.contains(&present), "attached engine lacks {present:?}: {caps:?}");
    }
    let (services, online) = plugin_caps(&attached).await;
    assert!(!services.contains(&(Service::VolumeAccessibilityConstraints as i32)));
    assert!(services.contains(&(Service::ControllerService as i32)));
    assert!(online, "the controller grows attached volumes");

    // A node-only process of the attached shape takes no part in growing.
    let node = serve(Shape::Attached, Mode::Node).await;
    let (services, online) = plugin_caps(&node).await;
    assert!(!services.contains(&(Service::ControllerService as i32)) && !online, "{services:?}");
}

#[tokio::test]
async fn publish_keeps_single_node_volumes_on_one_node_and_reports_where() {
    let h = serve(Shape::Attached, Mode::Controller).await;
    let mut c = controller(&h);
    let id = new_volume(&mut c, "pv-rwo", true).await;
    let publish = |node: &str, mode: AccessMode| csi::ControllerPublishVolumeRequest {
        volume_id: id.clone(),
        node_id: node.into(),
        volume_capability: Some(cap(mode, true)),
        secrets: HashMap::from([("userKey".into(), "pub-secret".into())]),
        ..Default::default()
    };
    let ctx = c
        .controller_publish_volume(publish("node-a", AccessMode::SingleNodeWriter))
        .await
        .unwrap()
        .into_inner()
        .publish_context;
    assert_eq!(ctx.get("mem.csi.ferrovol.io/device"), Some(&id), "{ctx:?}");
    // Idempotent on the same node; refused on another.
    c.controller_publish_volume(publish("node-a", AccessMode::SingleNodeWriter)).await.unwrap();
    let other = c
        .controller_publish_volume(publish("node-b", AccessMode::SingleNodeWriter))
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::FailedPrecondition, "{other:?}");

    let listed = c.list_volumes(csi::ListVolumesRequest::default()).await.unwrap().into_inner();
    let status = listed.entries[0].status.clone().unwrap();
    assert_eq!(status.published_node_ids, vec!["node-a".to_string()]);
    let got = c
        .controller_get_volume(csi::ControllerGetVolumeRequest { volume_id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.status.unwrap().published_node_ids, vec!["node-a".to_string()]);

    let unpublish = |node: &str| csi::ControllerUnpublishVolumeRequest {
        volume_id: id.clone(),
        node_id: node.into(),
        ..Default::default()
    };
    c.controller_unpublish_volume(unpublish("node-a")).await.unwrap();
    c.controller_unpublish_volume(unpublish("node-a")).await.expect("unpublished is fine");
    c.controller_publish_volume(publish("node-b", AccessMode::SingleNodeWriter)).await.unwrap();

    // The spec's codes, in its order.
    let mut bad = publish("", AccessMode::SingleNodeWriter);
    assert_eq!(
        c.controller_publish_volume(bad.clone()).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    bad.node_id = "node-c".into();
    bad.volume_capability = None;
    assert_eq!(c.controller_publish_volume(bad).await.unwrap_err().code(), Code::InvalidArgument);
    let mut unknown = publish("node-a", AccessMode::SingleNodeWriter);
    unknown.volume_id = "mem-vol-999".into();
    assert_eq!(c.controller_publish_volume(unknown).await.unwrap_err().code(), Code::NotFound);
    let no_node = publish("unknown-node", AccessMode::SingleNodeWriter);
    assert_eq!(c.controller_publish_volume(no_node).await.unwrap_err().code(), Code::NotFound);

    // Several nodes for raw block volumes only, as the engine says.
    let shared = create("pv-rwx", 64 * MIB, cap(AccessMode::MultiNodeMultiWriter, true));
    let shared = c.create_volume(shared).await.unwrap().into_inner().volume.unwrap().volume_id;
    for node in ["node-a", "node-b"] {
        let mut p = publish(node, AccessMode::MultiNodeMultiWriter);
        p.volume_id = shared.clone();
        c.controller_publish_volume(p).await.unwrap();
    }
    let fs = create("pv-rwx-fs", 64 * MIB, cap(AccessMode::MultiNodeMultiWriter, false));
    let e = c.create_volume(fs).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("filesystem"), "{e:?}");

    // A controller-only process keeps no state of its own on disk: it can
    // run where no node state exists at all.
    IdentityClient::new(h.channel.clone()).probe(csi::ProbeRequest {}).await.unwrap();
    let written: Vec<_> = std::fs::read_dir(&h.state_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(written, vec!["kubelet".to_string()], "the controller wrote to its state dir");
}

#[tokio::test]
async fn codes_and_idempotency() {
    let h = serve(Shape::NodeLocal, Mode::All).await;
    let mut c = controller(&h);
    let id = new_volume(&mut c, "pv-1", false).await;
    assert_eq!(
        new_volume(&mut c, "pv-1", false).await,
        id,
        "a retried create answers the same volume"
    );
    let bigger = create("pv-1", 128 * MIB, cap(AccessMode::SingleNodeWriter, false));
    assert_eq!(c.create_volume(bigger).await.unwrap_err().code(), Code::AlreadyExists);

    let mut nameless = create("", MIB, cap(AccessMode::SingleNodeWriter, false));
    assert_eq!(c.create_volume(nameless.clone()).await.unwrap_err().code(), Code::InvalidArgument);
    nameless.name = "pv-2".into();
    nameless.volume_capabilities.clear();
    assert_eq!(c.create_volume(nameless).await.unwrap_err().code(), Code::InvalidArgument);
    let mut params = create("pv-3", MIB, cap(AccessMode::SingleNodeWriter, false));
    params.parameters.insert("colour".into(), "blue".into());
    assert_eq!(c.create_volume(params).await.unwrap_err().code(), Code::InvalidArgument);
    let mut elsewhere = create("pv-4", MIB, cap(AccessMode::SingleNodeWriter, false));
    elsewhere.accessibility_requirements = Some(csi::TopologyRequirement {
        requisite: vec![csi::Topology {
            segments: HashMap::from([(TOPOLOGY_KEY.into(), "another-node".into())]),
        }],
        preferred: vec![],
    });
    assert_eq!(c.create_volume(elsewhere).await.unwrap_err().code(), Code::ResourceExhausted);

    let capacity = |node: &str| csi::GetCapacityRequest {
        accessible_topology: Some(csi::Topology {
            segments: HashMap::from([(TOPOLOGY_KEY.into(), node.into())]),
        }),
        ..Default::default()
    };
    let here = c.get_capacity(capacity("mem-node")).await.unwrap().into_inner();
    let there = c.get_capacity(capacity("another-node")).await.unwrap().into_inner();
    assert!(here.available_capacity > 0 && there.available_capacity == 0, "{here:?} {there:?}");

    let delete = |id: &str| csi::DeleteVolumeRequest { volume_id: id.into(), ..Default::default() };
    c.delete_volume(delete("mem-vol-404")).await.expect("an unknown volume is already deleted");
    assert_eq!(c.delete_volume(delete("")).await.unwrap_err().code(), Code::InvalidArgument);
    let get = csi::GetSnapshotRequest { snapshot_id: "mem-snap-404".into(), ..Default::default() };
    assert_eq!(c.get_snapshot(get).await.unwrap_err().code(), Code::NotFound);
    let snap = |source: &str| csi::CreateSnapshotRequest {
        name: "snap-1".into(),
        source_volume_id: source.into(),
        ..Default::default()
    };
    assert_eq!(c.create_snapshot(snap("mem-vol-404")).await.unwrap_err().code(), Code::NotFound);
    let s1 = c.create_snapshot(snap(&id)).await.unwrap().into_inner().snapshot.unwrap();
    let s2 = c.create_snapshot(snap(&id)).await.unwrap().into_inner().snapshot.unwrap();
    assert_eq!(s1.snapshot_id, s2.snapshot_id);
    c.delete_volume(delete(&id)).await.unwrap();
}

#[tokio::test]
async fn a_busy_name_is_aborted_and_the_retry_converges() {
    let h = serve(Shape::Attached, Mode::Controller).await;
    h.engine.hold_creates(true);
    let entered = h.engine.entered.notified();
    let mut first = controller(&h);
    let running = tokio::spawn(async move { new_volume(&mut first, "pv-busy", true).await });
    entered.await;
    let mut c = controller(&h);
    let req = create("pv-busy", 64 * MIB, cap(AccessMode::SingleNodeWriter, true));
    let busy = c.create_volume(req.clone()).await.unwrap_err();
    assert_eq!(busy.code(), Code::Aborted, "{busy:?}");
    h.engine.hold_creates(false);
    h.engine.release.notify_one();
    let id = running.await.unwrap();
    let retried = c.create_volume(req).await.unwrap().into_inner().volume.unwrap().volume_id;
    assert_eq!(retried, id);
}

#[tokio::test]
async fn listings_page_and_refuse_foreign_tokens() {
    let h = serve(Shape::NodeLocal, Mode::Controller).await;
    let mut c = controller(&h);
    let mut made = Vec::new();
    for i in 0..5 {
        made.push(new_volume(&mut c, &format!("pv-{i}"), false).await);
    }
    let (mut seen, mut token, mut pages) = (Vec::new(), String::new(), 0);
    loop {
        let req = csi::ListVolumesRequest { max_entries: 2, starting_token: token.clone() };
        let page = c.list_volumes(req).await.unwrap().into_inner();
        pages += 1;
        assert!(page.entries.len() <= 2);
        seen.extend(page.entries.into_iter().map(|e| e.volume.unwrap().volume_id));
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    made.sort();
    seen.sort();
    assert_eq!((seen, pages), (made, 3));
    let foreign = csi::ListVolumesRequest { max_entries: 2, starting_token: "zzz".into() };
    assert_eq!(c.list_volumes(foreign).await.unwrap_err().code(), Code::Aborted);
    let negative = csi::ListVolumesRequest { max_entries: -1, ..Default::default() };
    assert_eq!(c.list_volumes(negative).await.unwrap_err().code(), Code::InvalidArgument);
}

/// Every log line of this test process, for the secrets check.
fn captured() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOG: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOG.get_or_init(|| {
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || Sink(sink.clone()))
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("one subscriber");
        log
    })
}

struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn secrets_reach_the_engine_and_never_a_log() {
    const SECRET: &str = "AQD9-the-ceph-user-key==";
    let log = captured();
    let h = serve(Shape::Attached, Mode::Controller).await;
    let mut c = controller(&h);
    let secrets = HashMap::from([("userKey".to_string(), SECRET.to_string())]);
    let mut req = create("pv-secret", 64 * MIB, cap(AccessMode::SingleNodeWriter, true));
    req.secrets = secrets.clone();
    let id = c.create_volume(req).await.unwrap().into_inner().volume.unwrap().volume_id;
    c.controller_publish_volume(csi::ControllerPublishVolumeRequest {
        volume_id: id.clone(),
        node_id: "node-a".into(),
        volume_capability: Some(cap(AccessMode::SingleNodeWriter, true)),
        secrets: secrets.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    c.controller_expand_volume(csi::ControllerExpandVolumeRequest {
        volume_id: id.clone(),
        capacity_range: Some(csi::CapacityRange { required_bytes: 128 * MIB, limit_bytes: 0 }),
        secrets: secrets.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    c.create_snapshot(csi::CreateSnapshotRequest {
        name: "snap-secret".into(),
        source_volume_id: id.clone(),
        secrets: secrets.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    c.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
        volume_id: id.clone(),
        node_id: "node-a".into(),
        secrets: secrets.clone(),
    })
    .await
    .unwrap();
    c.delete_volume(csi::DeleteVolumeRequest { volume_id: id, secrets }).await.unwrap();

    let text = String::from_utf8_lossy(&log.lock().unwrap()).into_owned();
    // The engine got the secrets (and logged its requests whole), the
    // services logged each call: a secret in any of them would be here.
    assert!(text.contains("Secrets(1 redacted)"), "the engine saw no secrets:\n{text}");
    assert!(text.contains("CreateVolume"), "no RPC was logged:\n{text}");
    assert!(!text.contains(SECRET), "a secret reached the log:\n{text}");
}

#[tokio::test]
async fn a_node_mode_process_never_calls_the_controller_half() {
    let h = serve(Shape::NodeLocal, Mode::Node).await;
    // Made by a controller elsewhere (the same in-memory storage).
    let made = h
        .engine
        .create_volume(ferrovol_core::engine::NewVolume {
            name: "pv-node".into(),
            required_bytes: 64 << 20,
            limit_bytes: 0,
            access: ferrovol_core::engine::AccessType::Block,
            modes: vec![ferrovol_core::engine::AccessMode::SingleNodeWriter],
            parameters: Default::default(),
            source: None,
            accessibility: None,
            secrets: Default::default(),
        })
        .await
        .unwrap();
    let before = h.engine.controller_calls().len();

    let mut n = NodeClient::new(h.channel.clone());
    let info = n.node_get_info(csi::NodeGetInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.node_id, "mem-node");
    let segments = info.accessible_topology.unwrap().segments;
    assert_eq!(segments.get(TOPOLOGY_KEY).map(String::as_str), Some("mem-node"));
    n.node_get_capabilities(csi::NodeGetCapabilitiesRequest {}).await.unwrap();
    let stats = |id: &str| csi::NodeGetVolumeStatsRequest {
        volume_id: id.into(),
        volume_path: h.kubelet_dir.join("pods/p/volumes/v").display().to_string(),
        ..Default::default()
    };
    // Known (from the node half alone) but not attached here; unknown.
    let e = n.node_get_volume_stats(stats(&made.id)).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("not staged or published"), "{e:?}");
    let e = n.node_get_volume_stats(stats("mem-vol-404")).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("does not exist"), "{e:?}");
    IdentityClient::new(h.channel.clone()).probe(csi::ProbeRequest {}).await.unwrap();
    // No Controller service here at all.
    let e = controller(&h)
        .controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented);

    assert_eq!(
        h.engine.controller_calls()[before..],
        [] as [&str; 0],
        "node calls used the controller half"
    );
}

#[tokio::test]
async fn a_panicking_handler_answers_internal_and_the_server_goes_on() {
    let h = serve(Shape::NodeLocal, Mode::Controller).await;
    let mut c = controller(&h);
    // Detached (CreateVolume) and inline (GetCapacity) calls alike.
    let e = c.create_volume(create(PANIC, MIB, cap(AccessMode::SingleNodeWriter, false))).await;
    assert_eq!(e.unwrap_err().code(), Code::Internal);
    let capacity = csi::GetCapacityRequest {
        parameters: HashMap::from([(PANIC.into(), "yes".into())]),
        ..Default::default()
    };
    let e = c.get_capacity(capacity).await.unwrap_err();
    assert_eq!(e.code(), Code::Internal, "{e:?}");
    assert!(e.message().contains("panic"), "{e:?}");
    new_volume(&mut c, "pv-after", false).await;
}

/// The in-memory engine as a conformance subject; `node` where the node
/// checks run too.
struct Mem(Harness, bool);

#[tonic::async_trait]
impl ferrovol_testkit::conformance::Subject for Mem {
    fn name(&self) -> String {
        format!("mem {:?}", self.0.engine)
    }
    async fn controller(&self) -> Channel {
        self.0.channel.clone()
    }
    async fn node(&self) -> Option<(Channel, std::path::PathBuf)> {
        self.1.then(|| (self.0.channel.clone(), self.0.kubelet_dir.clone()))
    }
    fn create(
        &self,
        name: &str,
        bytes: i64,
        cap: csi::VolumeCapability,
    ) -> csi::CreateVolumeRequest {
        create(name, bytes, cap)
    }
}

/// The conformance suite's controller checks on the in-memory engine's
/// three shapes.
#[tokio::test]
async fn conformance_of_the_in_memory_shapes() {
    for shape in [Shape::NodeLocal, Shape::Attached, Shape::SharedFs] {
        let subject = Mem(serve(shape, Mode::All).await, false);
        ferrovol_testkit::conformance::run(&subject).await;
    }
}

/// The whole suite, node checks included, on the shared-filesystem shape:
/// a tmpfs per volume, no block device anywhere; the core's node service
/// unchanged serves a filesystem engine. Without root, the test runs
/// itself again as root of a user and mount namespace of its own (real
/// mounts, read-only enforced by the kernel, none of the host's touched).
#[test]
fn the_shared_filesystem_shape_conforms_on_the_node() {
    if !rustix::process::geteuid().is_root() {
        ferrovol_testkit::userns::run_as_namespace_root(
            "the_shared_filesystem_shape_conforms_on_the_node",
        );
        return;
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let subject = Mem(serve(Shape::SharedFs, Mode::All).await, true);
        ferrovol_testkit::conformance::run(&subject).await;
    });
}
