//! `[limits]` on a real router (three real nodes, real etcd, real git): 64 concurrent
//! clones of one repository with a limit of 8 — eight run, the rest wait in the queue
//! and get 429 with `Retry-After` (over gRPC: RESOURCE_EXHAUSTED with Gitaly's
//! `gitaly.LimitError` detail) once the queue wait is over, a real `git clone` that
//! waits is served when a slot frees, the refusals are counted, the router's RSS stays
//! bounded; pushes have their own limit; a slowloris client is cut at the header
//! timeout, a client that stops mid-body gets 408, an oversized body 413.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use refvote_proto::gitaly::smart_http_service_client::SmartHttpServiceClient;
use refvote_proto::gitaly::{PostUploadPackRequest, Repository};
use refvote_tests::cluster::{Fixture, VoteCluster};
use refvote_tests::git;
use refvote_tests::metrics::scrape;
use refvote_tests::proc::wait_until;
use refvote_tests::router::RouterOptions;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An upload-pack request body: want `sha`, then done (protocol v0, no capabilities).
fn upload_pack_body(sha: &str) -> Vec<u8> {
    format!("0032want {sha}\n00000009done\n").into_bytes()
}

/// An HTTP/1.1 exchange held open on a raw connection, for clients that stop halfway.
struct Raw {
    stream: TcpStream,
}

impl Raw {
    /// Sends a chunked POST's head and `first` as its first chunk; the rest later.
    async fn start_post(addr: SocketAddr, path: &str, first: &[u8]) -> anyhow::Result<Raw> {
        let mut stream = TcpStream::connect(addr).await?;
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
             Content-Type: application/x-git-upload-pack-request\r\n\
             Transfer-Encoding: chunked\r\n\r\n{:x}\r\n",
            first.len()
        );
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(first).await?;
        stream.write_all(b"\r\n").await?;
        Ok(Raw { stream })
    }

    /// Sends `rest` as the last chunk and ends the body.
    async fn finish(&mut self, rest: &[u8]) -> anyhow::Result<()> {
        let chunk = format!("{:x}\r\n", rest.len());
        self.stream.write_all(chunk.as_bytes()).await?;
        self.stream.write_all(rest).await?;
        self.stream.write_all(b"\r\n0\r\n\r\n").await?;
        Ok(())
    }

    /// The status and head of the answer, read to the end of the connection.
    async fn answer(mut self) -> anyhow::Result<(u16, String)> {
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(60), self.stream.read_to_end(&mut raw)).await??;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        Ok((status, text))
    }
}

/// `curl`'s status, headers and body for a POST of `body` (`-D -`: headers first).
async fn curl_post(url: &str, content_type: &str, body: Vec<u8>) -> anyhow::Result<(u16, String)> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("body");
    std::fs::write(&file, body)?;
    let out = tokio::process::Command::new("curl")
        .args(["-s", "--max-time", "60", "-D", "-", "-o", "/dev/null"])
        .args(["-w", "%{http_code}", "-H"])
        .arg(format!("Content-Type: {content_type}"))
        .arg("--data-binary")
        .arg(format!("@{}", file.display()))
        .arg(url)
        .kill_on_drop(true)
        .output()
        .await?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let code = text.get(text.len().saturating_sub(3)..).unwrap_or("0");
    Ok((code.parse().unwrap_or(0), text))
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

async fn in_progress(c: &VoteCluster) -> f64 {
    scrape(c.routers[0].metrics_addr())
        .await
        .ok()
        .and_then(|m| m.get("refvote_router_limit_in_progress").copied())
        .unwrap_or(-1.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_clones_with_a_limit_of_eight_queue_then_get_429() -> anyhow::Result<()> {
    let queue_wait = Duration::from_millis(3000);
    let c = Fixture::nodes(3)
        .seeded("p.git")
        .router_with(RouterOptions::http().config(move |cfg| {
            cfg.limits.upload_pack_per_repository = 8;
            cfg.limits.max_queue_size = 56;
            cfg.limits.max_queue_wait_ms = queue_wait.as_millis() as u64;
            cfg.limits.retry_after_secs = 2;
        }))
        .start()
        .await?;
    let router = &c.routers[0];
    let addr = router.http_addr();
    let pid = router.pid().expect("the router runs");
    let rss_before = rss_kib(pid);
    let main = git::rev(&c.node("node1").repo("p.git"), "refs/heads/main").expect("seeded");
    let body = upload_pack_body(&main);
    let (want, done) = body.split_at(0x32);

    // Eight clones take the eight slots and hold them: their bodies stop halfway.
    let mut holders = Vec::new();
    for _ in 0..8 {
        holders.push(Raw::start_post(addr, "/p.git/git-upload-pack", want).await?);
    }
    wait_until("the eight slots taken", Duration::from_secs(20), || async {
        in_progress(&c).await == 8.0
    })
    .await?;

    // 55 more over HTTP and one over gRPC queue, and are shed past the queue wait.
    let url = router.http_url("p.git/git-upload-pack");
    let started = Instant::now();
    let clients = (0..55).map(|_| {
        let (url, body) = (url.clone(), body.clone());
        async move { curl_post(&url, "application/x-git-upload-pack-request", body).await }
    });
    let grpc = async {
        let mut client = SmartHttpServiceClient::new(router.channel().await?);
        let first = PostUploadPackRequest {
            repository: Some(Repository {
                storage_name: "default".into(),
                relative_path: "p.git".into(),
                ..Default::default()
            }),
            data: body.clone(),
            ..Default::default()
        };
        let answer = client
            .post_upload_pack(tokio_stream::iter([first]))
            .await
            .map(|_| ());
        anyhow::Ok(answer)
    };
    let (answers, grpc) = tokio::join!(futures::future::join_all(clients), grpc);
    let shed_after = started.elapsed();
    for answer in answers {
        let (code, text) = answer?;
        assert_eq!(code, 429, "{text}");
        assert!(
            text.to_ascii_lowercase().contains("retry-after: 2"),
            "{text}"
        );
    }
    assert!(
        shed_after >= queue_wait,
        "shed after {shed_after:?}, before the queue wait"
    );
    let status = grpc?.expect_err("the gRPC clone is shed too");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(
        status
            .message()
            .starts_with("maximum time in concurrency queue reached (8 upload-pack calls of default/p.git at once"),
        "{status:?}"
    );
    let detail = refvote_router::limit::limit_error_of(&status).expect("a LimitError detail");
    assert_eq!(
        detail.error_message,
        "maximum time in concurrency queue reached"
    );
    assert_eq!(detail.retry_after.map(|d| d.seconds), Some(2));

    // What git shows of a shed clone: the reason, from the 429's body.
    let (code, text) = {
        let out = tokio::process::Command::new("curl")
            .args(["-s", "-w", "\n%{http_code}", "-H"])
            .arg("Content-Type: application/x-git-upload-pack-request")
            .arg("--data-binary")
            .arg(String::from_utf8(body.clone())?)
            .arg(&url)
            .output()
            .await?;
        let t = String::from_utf8_lossy(&out.stdout).into_owned();
        let (b, c) = t.rsplit_once('\n').unwrap_or(("", ""));
        (c.parse::<u16>().unwrap_or(0), b.to_owned())
    };
    assert_eq!(code, 429);
    assert!(
        text.starts_with("refvote: maximum time in concurrency queue reached"),
        "{text:?}"
    );

    // A real git clone waits in the queue and is served once a slot frees.
    let clone_dir = c.path("clone");
    let clone_url = router.http_url("p.git");
    let clone = tokio::process::Command::new("git")
        .args(["clone", "--quiet", &clone_url])
        .arg(&clone_dir)
        .kill_on_drop(true)
        .output();
    let clone = tokio::spawn(clone);
    wait_until("the git clone queued", Duration::from_secs(20), || async {
        scrape(router.metrics_addr())
            .await
            .ok()
            .and_then(|m| m.get("refvote_router_limit_queued").copied())
            == Some(1.0)
    })
    .await?;
    // The held clones finish: their packs come back whole.
    for mut h in holders {
        h.finish(done).await?;
        let (code, text) = h.answer().await?;
        assert_eq!(code, 200, "{}", &text[..text.len().min(400)]);
        assert!(text.contains("application/x-git-upload-pack-result"));
        assert!(text.contains("PACK"), "no pack in the answer");
    }
    let out = clone.await??;
    assert!(out.status.success(), "{out:?}\n{}", router.log_tail(30));
    assert_eq!(
        git::rev(&clone_dir, "refs/heads/main").as_deref(),
        Some(&*main)
    );

    // Counted; nothing left holding or waiting; memory bounded.
    let m = scrape(router.metrics_addr()).await?;
    let shed = m
        .get("refvote_router_limited_total{class=\"upload_pack\",reason=\"queue_timeout\"}")
        .copied();
    assert_eq!(shed, Some(57.0), "{m:?}");
    wait_until("the slots freed", Duration::from_secs(10), || async {
        in_progress(&c).await == 0.0
    })
    .await?;
    let rss_after = rss_kib(pid);
    println!(
        "router RSS: {rss_before} KiB before, {rss_after} KiB after 64 concurrent clones \
         (57 shed after {shed_after:?})"
    );
    assert!(
        rss_after < rss_before + 100 * 1024,
        "RSS grew from {rss_before} to {rss_after} KiB"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_refuses_at_once_and_pushes_have_their_own_limit() -> anyhow::Result<()> {
    let c = Fixture::nodes(3)
        .seeded("p.git")
        .router_with(RouterOptions::http().config(|cfg| {
            cfg.limits.upload_pack_per_repository = 1;
            cfg.limits.receive_pack_per_repository = 1;
            cfg.limits.max_queue_size = 0;
            cfg.limits.max_queue_wait_ms = 30_000;
        }))
        .start()
        .await?;
    let router = &c.routers[0];
    let main = git::rev(&c.node("node1").repo("p.git"), "refs/heads/main").expect("seeded");
    let body = upload_pack_body(&main);
    let mut holder =
        Raw::start_post(router.http_addr(), "/p.git/git-upload-pack", &body[..0x32]).await?;
    wait_until("the slot taken", Duration::from_secs(20), || async {
        in_progress(&c).await == 1.0
    })
    .await?;
    // No queue: refused at once, not after the 30 s wait.
    let started = Instant::now();
    let url = router.http_url("p.git/git-upload-pack");
    let (code, text) =
        curl_post(&url, "application/x-git-upload-pack-request", body.clone()).await?;
    assert_eq!(code, 429, "{text}");
    assert!(
        text.to_ascii_lowercase().contains("retry-after: 1"),
        "{text}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    // A push is a different class: the clone's slot does not hold it back.
    let work = c.work("w")?;
    work.commit("side", "x")?;
    let out = git::push(
        &work.path,
        std::path::Path::new(&router.http_url("p.git")),
        &["side"],
        &[],
    )
    .await?;
    assert!(out.status.success(), "{out:?}");
    holder.finish(&body[0x32..]).await?;
    assert_eq!(holder.answer().await?.0, 200);
    let m = scrape(router.metrics_addr()).await?;
    assert_eq!(
        m.get("refvote_router_limited_total{class=\"upload_pack\",reason=\"queue_full\"}")
            .copied(),
        Some(1.0)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_oversized_clients_are_cut_off() -> anyhow::Result<()> {
    let c = Fixture::nodes(3)
        .seeded("p.git")
        .router_with(RouterOptions::http().config(|cfg| {
            cfg.limits.header_timeout_secs = 2;
            cfg.limits.idle_timeout_secs = 2;
            cfg.limits.max_request_body_bytes = 4096;
        }))
        .start()
        .await?;
    let router = &c.routers[0];
    let addr = router.http_addr();

    // Slowloris: a header byte every 300 ms; the connection is closed at the header
    // timeout, long before the header ends.
    let mut slow = TcpStream::connect(addr).await?;
    slow.write_all(b"GET /p.git/info/refs?service=git-upload-pack HTTP/1.1\r\nX-Slow: ")
        .await?;
    let started = Instant::now();
    let mut closed_after = None;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        if slow.write_all(b"a").await.is_err() {
            closed_after = Some(started.elapsed());
            break;
        }
        let mut buf = [0u8; 512];
        match tokio::time::timeout(Duration::from_millis(1), slow.read(&mut buf)).await {
            Ok(Ok(_)) | Ok(Err(_)) => {
                closed_after = Some(started.elapsed());
                break;
            }
            Err(_) => {}
        }
    }
    let closed_after = closed_after.expect("the slow client was never cut off");
    assert!(
        closed_after >= Duration::from_millis(1500) && closed_after < Duration::from_secs(10),
        "cut off after {closed_after:?}"
    );

    // A body that stops: 408 once nothing came for idle_timeout_secs.
    let main = git::rev(&c.node("node1").repo("p.git"), "refs/heads/main").expect("seeded");
    let body = upload_pack_body(&main);
    let stalled = Raw::start_post(addr, "/p.git/git-upload-pack", &body[..0x32]).await?;
    let started = Instant::now();
    let (code, text) = stalled.answer().await?;
    assert_eq!(code, 408, "{text}");
    assert!(text.contains("limits.idle_timeout_secs"), "{text}");
    assert!(started.elapsed() >= Duration::from_millis(1500));

    // Too large: by its Content-Length at once, and chunked once past the limit.
    let url = router.http_url("p.git/git-receive-pack");
    let (code, text) = curl_post(
        &url,
        "application/x-git-receive-pack-request",
        vec![b'0'; 10_000],
    )
    .await?;
    assert_eq!(code, 413, "{text}");
    let file = c.path("big");
    std::fs::write(&file, vec![b'0'; 10_000])?;
    let out = tokio::process::Command::new("curl")
        .args([
            "-s",
            "-w",
            "\n%{http_code}",
            "-H",
            "Transfer-Encoding: chunked",
            "-H",
        ])
        .arg("Content-Type: application/x-git-upload-pack-request")
        .arg("--data-binary")
        .arg(format!("@{}", file.display()))
        .arg(router.http_url("p.git/git-upload-pack"))
        .output()
        .await?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (reason, code) = text.rsplit_once('\n').unwrap_or(("", ""));
    assert_eq!(code, "413", "{text}");
    assert!(
        reason.contains("larger than 4096 bytes (limits.max_request_body_bytes)"),
        "{reason}"
    );
    // The router serves on.
    let (code, _) = curl_post(
        &router.http_url("p.git/git-upload-pack"),
        "application/x-git-upload-pack-request",
        body,
    )
    .await?;
    assert_eq!(code, 200);
    Ok(())
}
