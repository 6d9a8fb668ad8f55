//! The git smart HTTP front's status table (README, "Several routers behind nginx"),
//! row by row, twice: directly against a real router (three real nodes, real etcd) and
//! through a real nginx running the shipped `install/nginx/refvote.conf` in front of
//! it. Each row checks the status, the headers it promises and the `refvote: …` reason
//! with curl (a raw connection for a body that stalls), and real git where git prints
//! the reason (refused advertisements: 401, 403, 404, 503) or sends the body itself
//! (gzip, chunked). Where nginx answers itself (a URL or chunked body it cannot parse,
//! a body over its own limit, no router reachable) the answer is asserted in the same
//! `text/plain` form, which the shipped config's `error_page` gives it. One cluster
//! serves every row; the rows that stop parts of it (503 for no quorum, no readable
//! replica and etcd unreachable, readiness, nginx's 502) run last.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use refvote_auth::{AuthSettings, ReadOnlySettings};
use refvote_tests::cluster::{Fixture, VoteCluster};
use refvote_tests::git::{self, WorkRepo};
use refvote_tests::metrics::scrape;
use refvote_tests::nginx::Nginx;
use refvote_tests::proc::wait_until;
use refvote_tests::router::RouterOptions;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The router's body limit: above git's smallest `http.postBuffer` (64 KiB, past which
/// git sends its pack chunked), so a chunked push fits under it.
const MAX_BODY: usize = 100_000;
/// The router's idle timeout: how long the 408 rows stall.
const IDLE_SECS: u64 = 2;
/// The router's `Retry-After` for a shed call (429), unlike the 1 s of a 503.
const RETRY_AFTER_SECS: u64 = 3;

/// Where the rows are sent: the router itself, or nginx in front of it.
struct Front {
    name: &'static str,
    addr: SocketAddr,
    nginx: bool,
}

impl Front {
    fn url(&self, path: &str) -> String {
        format!("http://{}/{path}", self.addr)
    }

    /// The URL with `user:password@` in it, for git.
    fn git_url(&self, creds: &str, path: &str) -> String {
        format!("http://{creds}@{}/{path}", self.addr)
    }
}

/// One HTTP answer: the status of the final response, every head curl saw (interim
/// `100 Continue` ones too), lower-cased, and the body.
#[derive(Debug)]
struct Answer {
    status: u16,
    head: String,
    body: String,
}

impl Answer {
    fn parse_head(head: String, body: String) -> Answer {
        let status = head
            .lines()
            .filter(|l| l.starts_with("http/"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
            .next_back()
            .unwrap_or(0);
        Answer { status, head, body }
    }

    /// The row's refusal as the table promises it: `status`, `text/plain`,
    /// `Cache-Control: no-cache`, an `X-Request-Id`, and `refvote: …` naming `reason`.
    fn refused(&self, status: u16, reason: &str) {
        assert_eq!(self.status, status, "{self:#?}");
        assert!(self.head.contains("content-type: text/plain"), "{self:#?}");
        assert!(self.head.contains("cache-control: no-cache"), "{self:#?}");
        assert!(self.head.contains("x-request-id: "), "{self:#?}");
        assert!(self.body.starts_with("refvote: "), "{self:#?}");
        assert!(self.body.contains(reason), "want {reason:?}: {self:#?}");
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().rev().find_map(|l| {
            l.strip_prefix(name)
                .and_then(|rest| rest.strip_prefix(':'))
                .map(str::trim)
        })
    }
}

/// `curl` with `args` on `url`.
async fn curl(args: &[&str], url: &str) -> anyhow::Result<Answer> {
    let out = tokio::process::Command::new("curl")
        .args(["-s", "--max-time", "20", "-D", "/dev/stderr"])
        .args(args)
        .arg(url)
        .kill_on_drop(true)
        .output()
        .await?;
    Ok(Answer::parse_head(
        String::from_utf8_lossy(&out.stderr).to_ascii_lowercase(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    ))
}

/// A POST of `body` (from a file, so it may be binary) with `args` (headers...).
async fn post(args: &[&str], body: &[u8], url: &str) -> anyhow::Result<Answer> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("body");
    std::fs::write(&file, body)?;
    let data = format!("@{}", file.display());
    curl(&[args, &["--data-binary", &data]].concat(), url).await
}

/// git with `args` (in `dir`), never prompting: whether it succeeded, and what it
/// printed (stderr, then stdout).
async fn git_run(dir: Option<&Path>, args: &[&str]) -> anyhow::Result<(bool, String)> {
    let mut cmd = tokio::process::Command::new("git");
    cmd.env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .args(args)
        .kill_on_drop(true);
    if let Some(d) = dir {
        cmd.current_dir(d);
    }
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output()).await??;
    Ok((
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        ),
    ))
}

/// An upload-pack request body: want `sha`, then done (protocol v0, no capabilities).
fn upload_pack_body(sha: &str) -> Vec<u8> {
    format!("0032want {sha}\n00000009done\n").into_bytes()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(data).expect("gzip into memory");
    gz.finish().expect("gzip into memory")
}

/// A chunked POST to upload-pack on a raw connection whose body stops after its first
/// chunk: what a stalled client sends.
async fn stalled_post(addr: SocketAddr, path: &str, first: &[u8]) -> anyhow::Result<TcpStream> {
    let mut stream = TcpStream::connect(addr).await?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Basic {}\r\n\
         Connection: close\r\nContent-Type: application/x-git-upload-pack-request\r\n\
         Transfer-Encoding: chunked\r\n\r\n{:x}\r\n",
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, "git:rw"),
        first.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(first).await?;
    stream.write_all(b"\r\n").await?;
    Ok(stream)
}

/// The answer on a raw connection, read to its end.
async fn raw_answer(mut stream: TcpStream) -> anyhow::Result<Answer> {
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut raw)).await??;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    Ok(Answer::parse_head(
        head.to_ascii_lowercase(),
        body.to_owned(),
    ))
}

async fn in_progress(c: &VoteCluster) -> f64 {
    scrape(c.routers[0].metrics_addr())
        .await
        .ok()
        .and_then(|m| m.get("refvote_router_limit_in_progress").copied())
        .unwrap_or(-1.0)
}

/// A commit of `size` bytes that do not compress on a new branch `branch`, so its push
/// is larger than git's smallest `http.postBuffer` and goes out chunked.
fn large_commit(work: &WorkRepo, branch: &str, size: usize) -> anyhow::Result<String> {
    git::git(&work.path, &["checkout", "--quiet", "-B", branch, "main"])?;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ branch.len() as u64;
    let bytes: Vec<u8> = (0..size)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .chain(branch.bytes())
        .collect();
    std::fs::write(work.path.join(format!("{branch}.bin")), bytes)?;
    git::git(&work.path, &["add", "-A"])?;
    git::git(&work.path, &["commit", "--quiet", "-m", branch])?;
    git::git(&work.path, &["rev-parse", "HEAD"])
}

/// The rows that need nothing but a serving cluster, against `f`.
async fn serving_rows(f: &Front, main: &str, work: &WorkRepo) -> anyhow::Result<()> {
    let rw = ["-u", "git:rw"];
    let adv = f.url("p.git/info/refs?service=git-upload-pack");
    let upload_pack = f.url("p.git/git-upload-pack");
    let want_main = upload_pack_body(main);
    let git_type = ["-H", "Content-Type: application/x-git-upload-pack-request"];

    // 200: the advertisement, with git's headers. The request id is echoed: the
    // client's directly, nginx's own ($request_id, which replaces the client's) behind
    // nginx.
    let a = curl(
        &[&rw[..], &["-H", "X-Request-Id: table-row-1"]].concat(),
        &adv,
    )
    .await?;
    assert_eq!(a.status, 200, "{a:#?}");
    assert_eq!(
        a.header("content-type"),
        Some("application/x-git-upload-pack-advertisement"),
        "{a:#?}"
    );
    assert_eq!(a.header("cache-control"), Some("no-cache"), "{a:#?}");
    let id = a.header("x-request-id").unwrap_or_default();
    if f.nginx {
        assert!(
            id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
            "{a:#?}"
        );
    } else {
        assert_eq!(id, "table-row-1", "{a:#?}");
    }
    assert!(
        a.body.starts_with("001e# service=git-upload-pack\n"),
        "{a:#?}"
    );
    assert!(a.body.contains(main), "{a:#?}");
    let a = curl(&rw, &f.url("p.git/info/refs?service=git-receive-pack")).await?;
    assert_eq!(a.status, 200, "{a:#?}");
    assert_eq!(
        a.header("content-type"),
        Some("application/x-git-receive-pack-advertisement"),
        "{a:#?}"
    );

    // HEAD: as GET, no body.
    let a = curl(&[&rw[..], &["-I"]].concat(), &adv).await?;
    assert_eq!(a.status, 200, "{a:#?}");
    assert_eq!(
        a.header("content-type"),
        Some("application/x-git-upload-pack-advertisement"),
        "{a:#?}"
    );
    // curl -I prints the head on stdout too: nothing may follow it.
    assert!(
        a.body.ends_with("\r\n\r\n") && a.body.matches("HTTP/").count() == 1,
        "{a:#?}"
    );

    // 200 for a clone's POST: plain, gzipped, chunked, and after `Expect:
    // 100-continue` (the front, router or nginx, sends `100 Continue` first).
    for (what, args, body) in [
        ("plain", vec![], want_main.clone()),
        (
            "gzip",
            vec!["-H", "Content-Encoding: gzip"],
            gzip(&want_main),
        ),
        (
            "chunked",
            vec!["-H", "Transfer-Encoding: chunked"],
            want_main.clone(),
        ),
        (
            "expect",
            vec!["-H", "Expect: 100-continue"],
            want_main.clone(),
        ),
    ] {
        let a = post(&[&rw[..], &git_type, &args].concat(), &body, &upload_pack).await?;
        assert_eq!(a.status, 200, "{what}: {a:#?}");
        assert_eq!(
            a.header("content-type"),
            Some("application/x-git-upload-pack-result"),
            "{what}: {a:#?}"
        );
        assert_eq!(a.header("cache-control"), Some("no-cache"), "{what}");
        assert!(a.body.starts_with("0008NAK\nPACK"), "{what}: {a:#?}");
        if what == "expect" {
            assert!(a.head.starts_with("http/1.1 100 continue"), "{a:#?}");
        }
    }

    // 405 with Allow.
    let a = curl(&[&rw[..], &["-X", "POST"]].concat(), &adv).await?;
    a.refused(405, "/info/refs takes GET, HEAD, not POST");
    assert_eq!(a.header("allow"), Some("get, head"), "{a:#?}");
    let a = curl(&rw, &upload_pack).await?;
    a.refused(405, "/git-upload-pack takes POST, not GET");
    assert_eq!(a.header("allow"), Some("post"), "{a:#?}");

    // 404: unknown path, the dumb protocol's paths (its advertisement, info/refs
    // without ?service=, included), an unknown repository.
    for path in [
        "nothing-here",
        "p.git/HEAD",
        "p.git/objects/info/packs",
        "p.git/objects/info/alternates",
        "p.git/objects/pack/pack-0123.pack",
    ] {
        let a = curl(&rw, &f.url(path)).await?;
        a.refused(404, "is not a git smart HTTP URL");
        assert!(
            a.body.contains("dumb HTTP protocol is not served"),
            "{a:#?}"
        );
    }
    curl(&rw, &f.url("p.git/info/refs"))
        .await?
        .refused(404, "dumb HTTP protocol is not served");
    curl(&rw, &f.url("nope.git/info/refs?service=git-upload-pack"))
        .await?
        .refused(404, "default/nope.git is not registered");

    // 400: an unknown service; a body that is not the gzip it claims; a URL that is
    // not valid percent-encoding, which nginx refuses itself (its answer in the
    // table's form, from the shipped error_page) before any router sees it.
    curl(&rw, &f.url("p.git/info/refs?service=git-frob"))
        .await?
        .refused(400, "unknown service \"git-frob\"");
    post(
        &[&rw[..], &git_type, &["-H", "Content-Encoding: gzip"]].concat(),
        b"this is not gzip",
        &upload_pack,
    )
    .await?
    .refused(400, "the gzip request body is invalid");
    // A chunked body that breaks (a chunk size that is not hex). nginx reads the
    // chunks itself and refuses it first.
    let mut broken = stalled_post(f.addr, "/p.git/git-upload-pack", &want_main[..0x32]).await?;
    broken.write_all(b"zz\r\n").await?;
    let a = raw_answer(broken).await?;
    match f.nginx {
        false => a.refused(400, "the request body broke off"),
        true => a.refused(400, "nginx could not parse the request"),
    }
    // A push's command section that is not pkt-lines: the router reads it first.
    post(
        &[
            &rw[..],
            &["-H", "Content-Type: application/x-git-receive-pack-request"],
        ]
        .concat(),
        b"garbage!garbage!\n",
        &f.url("p.git/git-receive-pack"),
    )
    .await?
    .refused(
        400,
        "malformed receive-pack request: bad pkt-line length \"garb\" at byte 0",
    );
    let a = curl(&rw, &f.url("p%zz.git/info/refs?service=git-upload-pack")).await?;
    match f.nginx {
        false => a.refused(400, "the URL path is not valid percent-encoded UTF-8"),
        true => a.refused(400, "nginx could not parse the request"),
    }

    // A clone that git on the node ends after its first bytes (a want it does not
    // have): the answer is cut short after git's own `ERR` line, which the client
    // gets, every time.
    for _ in 0..3 {
        let a = post(
            &[&rw[..], &git_type].concat(),
            &upload_pack_body(&"1".repeat(40)),
            &upload_pack,
        )
        .await?;
        assert_eq!(a.status, 200, "{a:#?}");
        assert!(
            a.body.starts_with("0049ERR upload-pack: not our ref 1111"),
            "{a:#?}"
        );
    }
    let (ok, out) = git_run(
        Some(&work.path),
        &["fetch", &f.git_url("git:rw", "p.git"), &"1".repeat(40)],
    )
    .await?;
    assert!(!ok);
    assert!(
        out.contains("remote error: upload-pack: not our ref 1111"),
        "{out}"
    );

    // 500: a clone's body that is not git's protocol reaches git on a node, which
    // fails before its first byte; its status (INTERNAL) and message pass unchanged.
    post(&[&rw[..], &git_type].concat(), b"garbage!garbage!\n", &upload_pack)
        .await?
        .refused(
            500,
            "git upload-pack failed (exit status: 128): fatal: protocol error: bad line length character: garb",
        );

    // 401 with WWW-Authenticate: none, or wrong.
    for creds in [&[][..], &["-u", "git:wrong"][..]] {
        let a = curl(creds, &adv).await?;
        a.refused(401, "authentication required");
        assert_eq!(
            a.header("www-authenticate"),
            Some("basic realm=\"refvote\""),
            "{a:#?}"
        );
    }
    // Refused before its body is asked for: no `100 Continue` from the router.
    let a = post(
        &[&git_type[..], &["-H", "Expect: 100-continue"]].concat(),
        &want_main,
        &upload_pack,
    )
    .await?;
    a.refused(401, "authentication required");
    if !f.nginx {
        assert!(!a.head.contains("100 continue"), "{a:#?}");
    }

    // 403: a read-only credential pushing.
    curl(
        &["-u", "git:ro"],
        &f.url("p.git/info/refs?service=git-receive-pack"),
    )
    .await?
    .refused(403, "read-only");

    // 415: a POST without git's content type; an unknown encoding.
    post(
        &[&rw[..], &["-H", "Content-Type: text/plain"]].concat(),
        b"0000",
        &upload_pack,
    )
    .await?
    .refused(
        415,
        "this POST takes Content-Type: application/x-git-upload-pack-request",
    );
    post(
        &[&rw[..], &git_type, &["-H", "Content-Encoding: br"]].concat(),
        b"0000",
        &upload_pack,
    )
    .await?
    .refused(415, "encoded as \"br\" are not accepted (only gzip)");

    // 413: over max_request_body_bytes, by Content-Length at once and chunked once
    // past it. Behind nginx the router decides too (nginx's client_max_body_size is
    // larger), so the reason names the router's limit.
    let big = vec![b'0'; MAX_BODY + 1];
    let receive_type = ["-H", "Content-Type: application/x-git-receive-pack-request"];
    let receive_pack = f.url("p.git/git-receive-pack");
    for args in [&[][..], &["-H", "Transfer-Encoding: chunked"][..]] {
        post(
            &[&rw[..], &receive_type, args].concat(),
            &big,
            &receive_pack,
        )
        .await?
        .refused(
            413,
            &format!("larger than {MAX_BODY} bytes (limits.max_request_body_bytes)"),
        );
    }

    // git: served through either front; the reason of a refused advertisement shown
    // as `remote: refvote: …` (404, 401 with wrong credentials, 403).
    let (ok, out) = git_run(None, &["ls-remote", &f.git_url("git:rw", "p.git")]).await?;
    assert!(ok, "{out}");
    assert!(out.contains(&format!("{main}\trefs/heads/main")), "{out}");
    let (ok, out) = git_run(None, &["ls-remote", &f.git_url("git:rw", "nope.git")]).await?;
    assert!(!ok);
    assert!(
        out.contains("remote: refvote: ") && out.contains("default/nope.git is not registered"),
        "{out}"
    );
    let (ok, out) = git_run(None, &["ls-remote", &f.git_url("git:wrong", "p.git")]).await?;
    assert!(!ok);
    assert!(
        out.contains("remote: refvote: authentication required"),
        "{out}"
    );
    let ro = f.git_url("git:ro", "p.git");
    let (ok, out) = git_run(None, &["ls-remote", &ro]).await?;
    assert!(ok, "a read-only credential reads: {out}");
    let (ok, out) = git_run(Some(&work.path), &["push", &ro, "main:refs/heads/ro"]).await?;
    assert!(!ok);
    assert!(
        out.contains("remote: refvote: this credential is read-only"),
        "{out}"
    );

    // git's own chunked body (a pack larger than http.postBuffer): accepted, never 411.
    let branch = format!("chunked-{}", f.name);
    let new = large_commit(work, &branch, 80 * 1024)?;
    let (ok, out) = git_run(
        Some(&work.path),
        &[
            "-c",
            "http.postBuffer=65536",
            "push",
            "-v",
            "-v",
            &f.git_url("git:rw", "p.git"),
            &branch,
        ],
    )
    .await?;
    assert!(ok, "{out}");
    assert!(out.contains("POST git-receive-pack (chunked)"), "{out}");
    let (_, seen) = git_run(
        None,
        &[
            "ls-remote",
            &f.git_url("git:rw", "p.git"),
            &format!("refs/heads/{branch}"),
        ],
    )
    .await?;
    assert!(seen.starts_with(&new), "{seen}");
    // A push over the limit, chunked as git sends every pack over http.postBuffer
    // (1 MiB by default): refused once its body passes the limit, and git shows why
    // (the refusal is a report-status, since git prints nothing of a POST's error
    // body). A smaller pack goes with a Content-Length and gets a bare 413 (above).
    let branch = format!("too-large-{}", f.name);
    large_commit(work, &branch, MAX_BODY + 20 * 1024)?;
    let (ok, out) = git_run(
        Some(&work.path),
        &[
            "-c",
            "http.postBuffer=65536",
            "push",
            &f.git_url("git:rw", "p.git"),
            &branch,
        ],
    )
    .await?;
    assert!(!ok, "{out}");
    assert!(
        out.contains(&format!(
            "remote: refvote: the request body is larger than {MAX_BODY} bytes \
             (limits.max_request_body_bytes)"
        )),
        "{out}"
    );
    assert!(out.contains("[remote rejected]"), "{out}");
    Ok(())
}

/// 429 and 408 against `f`: a clone whose body stalls holds the repository's one
/// upload-pack slot, so another clone is shed at once (no queue) with the configured
/// `Retry-After`; the stalled one gets 408 after the idle timeout.
async fn shed_and_stalled_rows(
    c: &VoteCluster,
    f: &Front,
    holder: &Front,
    main: &str,
) -> anyhow::Result<()> {
    let body = upload_pack_body(main);
    let stalled = stalled_post(holder.addr, "/p.git/git-upload-pack", &body[..0x32]).await?;
    let started = Instant::now();
    wait_until(
        "the stalled clone holds the slot",
        Duration::from_secs(10),
        || async { in_progress(c).await == 1.0 },
    )
    .await?;
    let a = post(
        &[
            "-u",
            "git:rw",
            "-H",
            "Content-Type: application/x-git-upload-pack-request",
        ],
        &body,
        &f.url("p.git/git-upload-pack"),
    )
    .await?;
    a.refused(429, "maximum queue size reached");
    assert_eq!(
        a.header("retry-after"),
        Some(RETRY_AFTER_SECS.to_string().as_str()),
        "{a:#?}"
    );
    let a = raw_answer(stalled).await?;
    let waited = started.elapsed();
    a.refused(
        408,
        &format!("the client sent nothing for {IDLE_SECS} s in the middle of the request body (limits.idle_timeout_secs)"),
    );
    assert!(
        waited >= Duration::from_millis(IDLE_SECS * 1000 - 500) && waited < Duration::from_secs(20),
        "408 after {waited:?}"
    );
    wait_until("the slot freed", Duration::from_secs(10), || async {
        in_progress(c).await == 0.0
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_row_of_the_status_table_directly_and_through_nginx() -> anyhow::Result<()> {
    let mut c = Fixture::nodes(3)
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
            cfg.limits.max_request_body_bytes = MAX_BODY as u64;
            cfg.limits.idle_timeout_secs = IDLE_SECS;
            // One clone of a repository at a time and no queue: the 429 row.
            cfg.limits.upload_pack_per_repository = 1;
            cfg.limits.max_queue_size = 0;
            cfg.limits.retry_after_secs = RETRY_AFTER_SECS;
        }))
        .start()
        .await?;
    let r = &c.routers[0];
    let nginx = Nginx::start(c.dir.path(), &[r.http_addr()], &[r.addr()]).await?;
    let fronts = [
        Front {
            name: "router",
            addr: r.http_addr(),
            nginx: false,
        },
        Front {
            name: "nginx",
            addr: nginx.http,
            nginx: true,
        },
    ];
    let main = git::rev(&c.node("node1").repo("p.git"), "refs/heads/main").expect("seeded");
    // The work repository the push rows push from: a clone through the router.
    let work_path = c.path("rows");
    let (ok, out) = git_run(
        None,
        &[
            "clone",
            "--quiet",
            &fronts[0].git_url("git:rw", "p.git"),
            &work_path.display().to_string(),
        ],
    )
    .await?;
    assert!(ok, "{out}");
    let work = WorkRepo::new(&work_path)?;

    for f in &fronts {
        serving_rows(f, &main, &work)
            .await
            .map_err(|e| e.context(format!("through {}\n{}", f.name, nginx.problems())))?;
    }
    // The stalled clone through one front, the shed one through the other: each
    // refusal passes nginx unchanged, and nginx's own client_body_timeout (300 s) is
    // not what answers.
    shed_and_stalled_rows(&c, &fronts[1], &fronts[0], &main).await?;
    shed_and_stalled_rows(&c, &fronts[0], &fronts[1], &main)
        .await
        .map_err(|e| e.context(nginx.problems()))?;

    // An nginx whose client_max_body_size is below the router's limit answers 413
    // itself, by Content-Length and chunked, in the table's form (error_page).
    let shipped = "client_max_body_size 2g;";
    let mut small = Nginx::start_edited(
        &c.path("nginx-small-body"),
        &[fronts[0].addr],
        &[c.routers[0].addr()],
        |site| {
            assert_eq!(site.matches(shipped).count(), 2, "{site}");
            site.replacen(shipped, "client_max_body_size 50k;", 1)
        },
    )
    .await?;
    let url = format!("http://{}/p.git/git-receive-pack", small.http);
    for args in [&[][..], &["-H", "Transfer-Encoding: chunked"][..]] {
        post(
            &[
                &["-u", "git:rw"][..],
                &["-H", "Content-Type: application/x-git-receive-pack-request"],
                args,
            ]
            .concat(),
            &vec![b'0'; MAX_BODY + 1],
            &url,
        )
        .await?
        .refused(413, "the request body is over nginx's client_max_body_size");
    }
    small.stop();

    // Last, the rows that stop parts of the cluster. 503 with Retry-After: a push with
    // two of p.git's three replicas on stopped nodes (SIGKILLed: seen once their
    // leases lapse) has no quorum; reads go on from the third.
    c.nodes[2].kill()?;
    c.nodes[1].kill()?;
    let no_quorum = "not enough replicas are up to date: 1 of 3 up, 2 needed";
    let zero = "0".repeat(40);
    let mut command = format!("{zero} {main} refs/heads/nq\n");
    command = format!("{:04x}{command}0000", command.len() + 4);
    for f in &fronts {
        let push = || async {
            post(
                &[
                    "-u",
                    "git:rw",
                    "-H",
                    "Content-Type: application/x-git-receive-pack-request",
                ],
                command.as_bytes(),
                &f.url("p.git/git-receive-pack"),
            )
            .await
        };
        // Until their leases lapse the router still tries them, and says so ("not
        // enough replicas answered": 503 too); then etcd says they are gone.
        wait_until(
            "the stopped nodes' leases lapsed",
            Duration::from_secs(20),
            || async { push().await.is_ok_and(|a| a.body.contains(no_quorum)) },
        )
        .await?;
        let a = push().await?;
        a.refused(503, no_quorum);
        assert_eq!(a.header("retry-after"), Some("1"), "{a:#?}");
        let a = curl(
            &["-u", "git:rw"],
            &f.url("p.git/info/refs?service=git-receive-pack"),
        )
        .await?;
        // The push's advertisement is a read, served from the replica left.
        assert_eq!(a.status, 200, "{a:#?}");
        let (ok, out) = git_run(
            Some(&work.path),
            &["push", &f.git_url("git:rw", "p.git"), "main:refs/heads/nq"],
        )
        .await?;
        // git asked for a report: the refusal is one (200), naming the reason.
        assert!(!ok);
        assert!(
            out.contains("remote: refvote: cannot write to default/p.git: ")
                && out.contains(no_quorum),
            "{out}"
        );
        assert!(
            out.contains("! [remote rejected] main -> nq (no quorum: 1 of 3 up, 2 needed)"),
            "{out}"
        );
        let (ok, out) = git_run(None, &["ls-remote", &f.git_url("git:rw", "p.git")]).await?;
        assert!(ok, "reads go on: {out}");
    }

    // No replica left: reads are refused too, and git shows why.
    c.nodes[0].kill()?;
    for f in &fronts {
        let adv = f.url("p.git/info/refs?service=git-upload-pack");
        wait_until(
            "the last node seen stopped",
            Duration::from_secs(20),
            || async {
                curl(&["-u", "git:rw"], &adv)
                    .await
                    .is_ok_and(|a| a.body.contains("no replica of default/p.git"))
            },
        )
        .await?;
        let a = curl(&["-u", "git:rw"], &adv).await?;
        a.refused(503, "no replica of default/p.git can serve reads");
        assert_eq!(a.header("retry-after"), Some("1"), "{a:#?}");
        let (ok, out) = git_run(None, &["ls-remote", &f.git_url("git:rw", "p.git")]).await?;
        assert!(!ok);
        assert!(
            out.contains("remote: refvote: no replica of default/p.git can serve reads"),
            "{out}"
        );
    }

    // etcd unreachable: the router says it is not ready, and a read, which confirms
    // its replicas with etcd first, is refused for it.
    c.etcd.stop(0)?;
    for f in &fronts {
        let ready = f.url("-/readiness");
        wait_until(
            "not ready without etcd",
            Duration::from_secs(20),
            || async { curl(&[], &ready).await.is_ok_and(|a| a.status == 503) },
        )
        .await?;
        let a = curl(&[], &ready).await?;
        a.refused(503, "not ready: etcd");
        assert_eq!(a.header("retry-after"), Some("1"), "{a:#?}");
        let a = curl(
            &["-u", "git:rw"],
            &f.url("p.git/info/refs?service=git-upload-pack"),
        )
        .await?;
        let etcd = "cannot confirm the replicas of default/p.git with etcd";
        a.refused(503, etcd);
        assert_eq!(a.header("retry-after"), Some("1"), "{a:#?}");
        let (ok, out) = git_run(None, &["ls-remote", &f.git_url("git:rw", "p.git")]).await?;
        assert!(!ok);
        assert!(out.contains(&format!("remote: refvote: {etcd}")), "{out}");
    }

    // No router: nginx answers 502 itself, in the table's form, and git shows it.
    c.routers[0].kill()?;
    let a = curl(
        &["-u", "git:rw"],
        &fronts[1].url("p.git/info/refs?service=git-upload-pack"),
    )
    .await?;
    a.refused(502, "no router answered");
    assert_eq!(a.header("retry-after"), Some("1"), "{a:#?}");
    let (ok, out) = git_run(None, &["ls-remote", &fronts[1].git_url("git:rw", "p.git")]).await?;
    assert!(!ok);
    assert!(out.contains("remote: refvote: no router answered"), "{out}");
    Ok(())
}
