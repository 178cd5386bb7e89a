//! Compiles `proto/` with protox (a pure-Rust protobuf compiler), so `cargo build` needs no
//! `protoc` on the machine, and writes the descriptor set that gRPC reflection serves.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/tollgate/v1/quota.proto";
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile([proto], ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let bytes = prost::Message::encode_to_vec(&descriptors);
    std::fs::write(out_dir.join("tollgate_descriptor.bin"), bytes)?;
    // The messages and servers, with a codec whose decoder answers an undecodable request
    // INVALID_ARGUMENT (src/server/codec.rs).
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        .codec_path("crate::server::codec::RequestCodec")
        .compile_fds(descriptors.clone())?;
    // The clients, over the same messages, with prost's own codec: an answer that does not
    // decode is the server's fault, not the caller's.
    let clients = out_dir.join("clients");
    std::fs::create_dir_all(&clients)?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .extern_path(".tollgate.v1", "crate::proto")
        .out_dir(&clients)
        .compile_fds(descriptors)?;
    Ok(())
}
