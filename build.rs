//! Compiles the wire protocols (odin.v1, and KServe v2 / the Open Inference
//! Protocol) and the official ONNX protobuf with tonic-prost-build.
//!
//! protoc comes from the `protoc-bin-vendored` crate so a fresh machine needs
//! nothing installed; a `PROTOC` set in the environment still wins.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if env::var_os("PROTOC").is_none() {
        // SAFETY: build scripts are single-threaded; nothing reads the
        // environment concurrently. tonic-prost-build only reads PROTOC
        // from the environment, so this is the one place that sets one.
        #[allow(clippy::disallowed_methods)]
        unsafe {
            env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?)
        };
    }
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        // A malformed message is the client's error (see src/wire/codec.rs).
        .codec_path("crate::wire::codec::StrictCodec")
        .file_descriptor_set_path(out_dir.join("odin_v1_descriptor.bin"))
        .compile_protos(&["proto/odin/v1/detector.proto"], &["proto"])?;
    // KServe v2 / Open Inference Protocol, with Triton's streaming RPC:
    // served beside odin.v1 on the same port (src/server/inference.rs). Its
    // descriptor set is served by reflection and checked against
    // tritonclient's by tests/kserve.rs.
    tonic_prost_build::configure()
        .codec_path("crate::wire::codec::StrictCodec")
        .file_descriptor_set_path(out_dir.join("kserve_v2_descriptor.bin"))
        .compile_protos(&["proto/kserve/v2/grpc_service.proto"], &["proto"])?;
    // The official ONNX model format, for the gradient pass: messages only.
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        .compile_protos(&["proto/onnx/onnx.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
