//! Compiles the contract in `proto/` with protox (pure Rust), so building needs no system `protoc`.

use std::{env, fs, path::PathBuf};

use prost::Message;

const PROTO: &str = "proto/cache_money/v1/cache_money.proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile([PROTO], ["proto"])?;
    // Server reflection serves this set, so grpcurl needs no proto file.
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("cache_money_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        // Values travel as `bytes::Bytes`: a hit is handed from the store to the wire uncopied.
        .bytes(".")
        // Buffers sized for cache traffic rather than tonic's 8 KiB per message (client/codec.rs).
        .codec_path("crate::codec::Codec")
        .compile_fds(descriptors)?;
    Ok(())
}
