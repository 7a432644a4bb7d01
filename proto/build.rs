//! Compiles `proto/cluster.proto` with protox (a pure-Rust protobuf compiler: no system
//! `protoc` needed) and generates the tonic/prost code.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/cluster.proto");
    let fds = protox::compile(["cluster.proto"], ["proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
