//! Compiles `proto/link.proto` (the relay–agent link) with protox.

use std::path::PathBuf;

fn main() {
    let proto_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let proto = proto_dir.join("link.proto");
    println!("cargo:rerun-if-changed={}", proto.display());
    let descriptors =
        protox::compile([&proto], [&proto_dir]).expect("proto/link.proto must compile");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)
        .expect("generating Rust from link.proto");
}
