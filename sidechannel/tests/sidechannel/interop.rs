//! Interop with the implementation GitLab's clients use: `tests/go/backchannel_client.go`
//! (hashicorp-yamux and grpc-go, from Debian's packaged Go sources) against our
//! server. Go is required: without it this test fails, it does not skip.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use crate::support::TestServer;

/// Where Debian installs Go sources (golang-github-hashicorp-yamux-dev,
/// golang-google-grpc-dev); built in GOPATH mode, no module download.
const GOPATH: &str = "/usr/share/gocode";

fn go_client() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let missing = "Go and the packaged sources are needed: apt-get install golang-go \
                       golang-github-hashicorp-yamux-dev golang-google-grpc-dev (scripts/setup.sh does)";
        for dir in ["github.com/hashicorp/yamux", "google.golang.org/grpc"] {
            assert!(
                Path::new(GOPATH).join("src").join(dir).is_dir(),
                "{GOPATH}/src/{dir} is missing. {missing}"
            );
        }
        let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let out = tmp.join("backchannel_client");
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/go/backchannel_client.go");
        let built = Command::new("go")
            .arg("build")
            .arg("-o")
            .arg(&out)
            .arg(&src)
            .env("GO111MODULE", "off")
            .env("GOPATH", GOPATH)
            .env("GOCACHE", tmp.join("go-cache"))
            .env("GOFLAGS", "")
            .env("CGO_ENABLED", "0")
            .output()
            .unwrap_or_else(|e| panic!("running `go build`: {e}. {missing}"));
        assert!(
            built.status.success(),
            "go build failed:\n{}",
            String::from_utf8_lossy(&built.stderr)
        );
        out
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gitlab_shells_yamux_and_grpc_go_talk_to_our_server() {
    let program = tokio::task::spawn_blocking(go_client).await.unwrap();
    let server = TestServer::start(None).await;
    // 24 MiB: more than the server's 16 MiB window one way, 96 client windows the
    // other.
    let child = tokio::process::Command::new(program)
        .arg(server.addr.to_string())
        .arg("24")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(90), child)
        .await
        .expect("the Go client finishes within 90 s")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "Go client failed: {}\nstdout: {stdout}\nstderr: {stderr}",
        out.status
    );
    assert!(
        stdout.contains(&format!("ok echoed {} bytes", 24 << 20)),
        "{stdout}"
    );
    // The Go side's calls came over a backchannel session our server ran.
    assert!(!server.service.sessions.lock().unwrap().is_empty());
    server.stop().await;
}
