//! Compiles `proto/csi.proto` with protox (pure Rust), so building ferrovol
//! never needs a system `protoc`.

use std::path::PathBuf;

fn main() {
    let proto_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let proto = proto_dir.join("csi.proto");
    println!("cargo:rerun-if-changed={}", proto.display());

    let descriptors =
        protox::compile([&proto], [&proto_dir]).expect("proto/csi.proto must compile");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .codec_path("crate::codec::CsiCodec")
        .compile_fds(descriptors)
        .expect("generating Rust from csi.proto");
}
