//! Generates the hook message always and, with the `grpc` feature, the Gitaly protocol
//! GitLab's clients use (messages, tonic servers and clients) plus a descriptor set the
//! router reads the `op_type` annotations from, and refvote's admin service.

fn main() {
    println!("cargo:rerun-if-changed=refvote/hook.proto");
    prost_build::Config::new()
        .compile_protos(&["refvote/hook.proto"], &["."])
        .expect("compiling refvote/hook.proto (is protoc installed? Debian: protobuf-compiler)");

    #[cfg(feature = "grpc")]
    gitaly();
}

#[cfg(feature = "grpc")]
fn gitaly() {
    const GITALY: &[&str] = &[
        "refvote/annotations.proto",
        "gitaly/shared.proto",
        "gitaly/errors.proto",
        "gitaly/server.proto",
        "gitaly/praefect.proto",
        "gitaly/repository.proto",
        "gitaly/ref.proto",
        "gitaly/commit.proto",
        "gitaly/blob.proto",
        "gitaly/diff.proto",
        "gitaly/conflicts.proto",
        "gitaly/analysis.proto",
        "gitaly/operations.proto",
        "gitaly/remote.proto",
        "gitaly/cleanup.proto",
        "gitaly/objectpool.proto",
        "gitaly/smarthttp.proto",
        "gitaly/ssh.proto",
    ];

    for file in GITALY {
        println!("cargo:rerun-if-changed={file}");
    }
    let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Methods a node does not implement yet answer UNIMPLEMENTED, so each RPC
        // family can land on its own, and streaming methods return one boxed stream type.
        .generate_default_stubs(true)
        .file_descriptor_set_path(out.join("gitaly_descriptor.bin"))
        .compile_protos(GITALY, &["."])
        .expect("compiling gitaly/*.proto (is protoc installed? Debian: protobuf-compiler)");

    // refvote's own admin service: not Gitaly's, so not in the registry's descriptors.
    println!("cargo:rerun-if-changed=refvote/admin.proto");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&["refvote/admin.proto"], &["."])
        .expect("compiling refvote/admin.proto");
}
