//! The git smart HTTP front's status table (README, "Several routers behind nginx"),
//! row by row with curl against a real router in front of three real nodes and real
//! etcd: status, the headers that row promises and the `refvote: …` reason; git itself
//! where it prints the reason. (429 rows: tests/tests/limits.rs; readiness 503:
//! tests/tests/load_balancer.rs.)

use refvote_auth::{AuthSettings, ReadOnlySettings};
use refvote_tests::cluster::Fixture;
use refvote_tests::router::RouterOptions;

/// `curl` with `args` on `url`: status, lower-cased head, body.
async fn curl(args: &[&str], url: &str) -> anyhow::Result<(u16, String, String)> {
    let out = tokio::process::Command::new("curl")
        .args(["-s", "--max-time", "20", "-D", "/dev/stderr"])
        .args(args)
        .arg(url)
        .kill_on_drop(true)
        .output()
        .await?;
    let head = String::from_utf8_lossy(&out.stderr).to_ascii_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((
        status,
        head,
        String::from_utf8_lossy(&out.stdout).into_owned(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_row_of_the_status_table() -> anyhow::Result<()> {
    let c = Fixture::nodes(3)
        .seeded("p.git")
        .router_with(RouterOptions::http().config(|cfg| {
            cfg.auth = AuthSettings {
                token: Some("rw".into()),
                token_file: None,
                transitioning: false,
            };
            cfg.auth_read_only = ReadOnlySettings {
                token: Some("ro".into()),
                token_file: None,
            };
            cfg.limits.max_request_body_bytes = 1000;
        }))
        .start()
        .await?;
    let r = &c.routers[0];
    let url = |path: &str| r.http_url(path);
    let rw = ["-u", "git:rw"];

    // 200: the advertisement, with git's headers; the request id echoed.
    let (s, h, b) = curl(
        &[&rw[..], &["-H", "X-Request-Id: table-row-1"]].concat(),
        &url("p.git/info/refs?service=git-upload-pack"),
    )
    .await?;
    assert_eq!(s, 200, "{h}{b}");
    assert!(
        h.contains("content-type: application/x-git-upload-pack-advertisement"),
        "{h}"
    );
    assert!(h.contains("cache-control: no-cache"), "{h}");
    assert!(h.contains("x-request-id: table-row-1"), "{h}");
    assert!(b.starts_with("001e# service=git-upload-pack\n"), "{b:?}");

    // HEAD: as GET, no body.
    let (s, h, b) = curl(
        &[&rw[..], &["-I"]].concat(),
        &url("p.git/info/refs?service=git-upload-pack"),
    )
    .await?;
    assert_eq!(s, 200, "{h}");
    assert!(
        h.contains("application/x-git-upload-pack-advertisement"),
        "{h}"
    );
    assert!(b.is_empty() || b.starts_with("HTTP/"), "{b:?}");

    // 405 with Allow.
    let (s, h, b) = curl(
        &[&rw[..], &["-X", "POST"]].concat(),
        &url("p.git/info/refs?service=git-upload-pack"),
    )
    .await?;
    assert_eq!(s, 405, "{h}");
    assert!(h.contains("allow: get, head"), "{h}");
    assert!(
        b.starts_with("refvote: /info/refs takes GET, HEAD, not POST"),
        "{b}"
    );
    let (s, h, _) = curl(&rw, &url("p.git/git-upload-pack")).await?;
    assert_eq!(s, 405);
    assert!(h.contains("allow: post"), "{h}");

    // 404: unknown path, the dumb protocol's paths (its advertisement, info/refs
    // without ?service=, included), an unknown repository.
    for path in [
        "nothing-here",
        "p.git/HEAD",
        "p.git/objects/info/packs",
        "p.git/objects/info/alternates",
        "p.git/objects/pack/pack-0123.pack",
    ] {
        let (s, h, b) = curl(&rw, &url(path)).await?;
        assert_eq!(s, 404, "{path}: {h}");
        assert!(h.contains("content-type: text/plain"), "{h}");
        assert!(b.contains("is not a git smart HTTP URL"), "{path}: {b}");
        assert!(
            b.contains("dumb HTTP protocol is not served"),
            "{path}: {b}"
        );
    }
    let (s, h, b) = curl(&rw, &url("p.git/info/refs")).await?;
    assert_eq!(s, 404, "{h}");
    assert!(h.contains("content-type: text/plain"), "{h}");
    assert!(b.contains("dumb HTTP protocol is not served"), "{b}");
    let (s, _, b) = curl(&rw, &url("nope.git/info/refs?service=git-upload-pack")).await?;
    assert_eq!(s, 404, "{b}");
    assert!(b.contains("not registered"), "{b}");

    // 400: bad encoding, unknown service.
    for path in [
        "p%zz.git/info/refs?service=git-upload-pack",
        "p.git/info/refs?service=git-frob",
    ] {
        let (s, _, b) = curl(&rw, &url(path)).await?;
        assert_eq!(s, 400, "{path}: {b}");
        assert!(b.starts_with("refvote: "), "{b}");
    }

    // 401 with WWW-Authenticate: none, or wrong.
    for creds in [&[][..], &["-u", "git:wrong"][..]] {
        let (s, h, b) = curl(creds, &url("p.git/info/refs?service=git-upload-pack")).await?;
        assert_eq!(s, 401, "{h}");
        assert!(
            h.contains("www-authenticate: basic realm=\"refvote\""),
            "{h}"
        );
        assert!(b.starts_with("refvote: authentication required"), "{b}");
    }

    // 403: a read-only credential pushing.
    let (s, _, b) = curl(
        &["-u", "git:ro"],
        &url("p.git/info/refs?service=git-receive-pack"),
    )
    .await?;
    assert_eq!(s, 403, "{b}");
    assert!(b.contains("read-only"), "{b}");

    // 415: a POST without git's content type; an unknown encoding.
    let (s, _, b) = curl(
        &[
            &rw[..],
            &["-H", "Content-Type: text/plain", "--data-binary", "0000"],
        ]
        .concat(),
        &url("p.git/git-upload-pack"),
    )
    .await?;
    assert_eq!(s, 415, "{b}");
    assert!(b.contains("application/x-git-upload-pack-request"), "{b}");
    let (s, _, _) = curl(
        &[
            &rw[..],
            &[
                "-H",
                "Content-Type: application/x-git-upload-pack-request",
                "-H",
                "Content-Encoding: br",
                "--data-binary",
                "0000",
            ],
        ]
        .concat(),
        &url("p.git/git-upload-pack"),
    )
    .await?;
    assert_eq!(s, 415);

    // 413: over max_request_body_bytes.
    let big = "0".repeat(5000);
    let (s, _, b) = curl(
        &[
            &rw[..],
            &[
                "-H",
                "Content-Type: application/x-git-receive-pack-request",
                "--data-binary",
                &big,
            ],
        ]
        .concat(),
        &url("p.git/git-receive-pack"),
    )
    .await?;
    assert_eq!(s, 413, "{b}");
    assert!(b.contains("limits.max_request_body_bytes"), "{b}");

    // git prints the reason of a refused advertisement.
    let ro_url = url("p.git").replace("http://", "http://git:ro@");
    let out = std::process::Command::new("git")
        .env("GIT_TERMINAL_PROMPT", "0")
        .args(["ls-remote", "--heads"])
        .arg(url("nope.git").replace("http://", "http://git:rw@"))
        .output()?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("remote: refvote: "), "{stderr}");
    let out = std::process::Command::new("git")
        .env("GIT_TERMINAL_PROMPT", "0")
        .args(["ls-remote", "--heads", &ro_url])
        .output()?;
    assert!(out.status.success(), "{out:?}");

    // git speaking the dumb protocol (GIT_SMART_HTTP=0) is told the repository is not
    // there, as it would be by a server that serves only smart HTTP.
    let clone_into = tempfile::tempdir()?;
    let out = std::process::Command::new("git")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_SMART_HTTP", "0")
        .args(["clone", "--quiet"])
        .arg(url("p.git").replace("http://", "http://git:rw@"))
        .arg(clone_into.path().join("dumb"))
        .output()?;
    assert!(!out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not found"), "{stderr}");
    assert!(!clone_into.path().join("dumb").exists(), "{stderr}");
    Ok(())
}
