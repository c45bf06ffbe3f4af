//! Compiles the `.proto` files with `protox` (pure Rust), so building credlet
//! needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/csi.proto",
        "proto/cri.proto",
        "proto/ca.proto",
        "proto/pluginregistration.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Messages that carry secrets get a hand-written, redacting Debug
        // (proto/src/redact.rs).
        .skip_debug([
            ".runtime.v1.AuthConfig",
            ".credlet.ca.v1.IssueAgentCertificateRequest",
            ".credlet.ca.v1.IssuePodCertificateRequest",
        ])
        .compile_fds(descriptors)?;
    Ok(())
}
