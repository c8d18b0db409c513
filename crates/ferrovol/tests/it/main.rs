//! Every root-tier integration test in one test crate (one link of the
//! harness, not one per file): real loop devices, real filesystems, the real
//! binary over a real socket. Each module is one area; see README.md.

mod capacity;
mod cephfs;
mod chaos;
mod common;
mod controller;
mod ctl;
mod demo;
mod faults;
mod group;
mod grpc_clients;
mod hostile_input;
mod identity;
mod layout;
mod metadata;
mod metrics;
mod node;
mod node_ownership;
mod pool_tools;
mod prometheus;
mod rbd;
mod recovery;
mod relay;
mod secrets;
mod sidecars;
mod soak;
mod split;
mod startup;
