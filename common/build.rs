//! Compiles `proto/*.proto` with protox (a pure-Rust protobuf compiler, so no system `protoc`)
//! and prost-build.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["proto/datapath.proto"], ["proto"])?;
    prost_build::Config::new().compile_fds(fds)?;
    Ok(())
}
