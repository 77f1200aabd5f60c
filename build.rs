//! Compiles `proto/` into Rust with protox, a pure-Rust protobuf compiler, so
//! building plugvisor never needs a system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/plugvisor/v1/plugin.proto",
        "proto/plugvisor/v1/control.proto",
        "proto/plugvisor/v1/registry.proto",
    ];
    for proto in &protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(protos, ["proto"])
        .map_err(|e| format!("compiling {}: {e}", protos.join(", ")))?;
    tonic_prost_build::configure()
        .build_transport(false)
        .bytes(".plugvisor.v1")
        .compile_fds(fds)?;
    Ok(())
}
