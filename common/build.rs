//! Compiles `proto/*.proto` with protox (a pure-Rust protobuf compiler, so no system `protoc`)
//! and tonic-prost-build (prost messages plus tonic clients and servers for the services).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(
        [
            "proto/datapath.proto",
            "proto/manager.proto",
            "proto/manager_state.proto",
        ],
        ["proto"],
    )?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
