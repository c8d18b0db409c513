//! The local engine across many nodes. Each node's ferrovol (an agent)
//! keeps its pool and serves the kubelet as before; a central controller
//! (the relay) serves the CO's controller sidecars and relays each call to
//! the agent of the node the volume lives on, over a mutual-TLS link the
//! agent dials (docs/kubernetes.md, docs/architecture.md).

#![forbid(unsafe_code)]

pub mod agent;
pub mod certs;
pub mod link;
pub mod relay;
pub mod tls;

/// The link's own calls (`proto/link.proto`).
pub mod proto {
    tonic::include_proto!("ferrovol.link.v1");
}
