fn main() {
    println!("cargo:rerun-if-changed=refvote/hook.proto");
    prost_build::Config::new()
        .compile_protos(&["refvote/hook.proto"], &["."])
        .expect("compiling refvote/hook.proto (is protoc installed? Debian: protobuf-compiler)");
}
