//! Several routers behind a real nginx (Debian's, with the shipped
//! `install/nginx/refvote.conf`), three real nodes, real etcd, real git: clone and
//! push through one address, concurrent pushers spread over both routers, every read
//! after a write seeing it whichever router it lands on, gRPC through `grpc_pass`;
//! health that tells the truth (a router cut off from etcd turns not ready and comes
//! back); one router SIGTERMed under load (it reports not ready at once, drains,
//! revokes its lease and exits 0, and no push that started before the signal fails)
//! and one SIGKILLed under load (only pushes in flight fail, every acknowledged push
//! is there).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use refvote_proto::gitaly::Repository;
use refvote_proto::gitaly::ref_service_client::RefServiceClient;
use refvote_proto::gitaly::repository_service_client::RepositoryServiceClient;
use refvote_proto::gitaly::{FindBranchRequest, RepositoryExistsRequest};
use refvote_tests::cluster::{Fixture, VoteCluster};
use refvote_tests::faultnet::{Link, LinkState};
use refvote_tests::git::{self, WorkRepo};
use refvote_tests::nginx::Nginx;
use refvote_tests::proc::wait_until;
use refvote_tests::router::{Router, RouterOptions};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

fn repo(relative: &str) -> Option<Repository> {
    Some(Repository {
        storage_name: "default".into(),
        relative_path: relative.into(),
        ..Default::default()
    })
}

/// `curl`'s status code and body for `GET url` (`-I`: HEAD).
async fn curl(args: &[&str], url: &str) -> anyhow::Result<(u16, String)> {
    let out = tokio::process::Command::new("curl")
        .args(["-s", "--max-time", "10", "-w", "\n%{http_code}"])
        .args(args)
        .arg(url)
        .kill_on_drop(true)
        .output()
        .await?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    Ok((code.trim().parse().unwrap_or(0), body.to_owned()))
}

fn readiness(r: &Router) -> String {
    format!("http://{}/-/readiness", r.http_addr())
}

async fn grpc_health(url: String) -> anyhow::Result<ServingStatus> {
    let ch = tonic::transport::Channel::from_shared(url)?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5))
        .connect()
        .await?;
    Ok(HealthClient::new(ch)
        .check(HealthCheckRequest::default())
        .await?
        .into_inner()
        .status())
}

/// Whether an access-log line (`$remote_addr "$request" $status $upstream_addr
/// $upstream_status $request_time`) is a request `upstream` answered with a 2xx.
fn served_by(line: &str, upstream: &str) -> bool {
    let Some((_, rest)) = line.rsplit_once('"') else {
        return false;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // One address and one status when nginx tried a single upstream; a retried
    // request lists every address it tried (`a, b`) and is not counted.
    matches!(fields.as_slice(), [_, addr, status, _] if *addr == upstream && status.starts_with('2'))
}

async fn start_nginx(c: &VoteCluster) -> anyhow::Result<Nginx> {
    let http: Vec<_> = c.routers.iter().map(Router::http_addr).collect();
    let grpc: Vec<_> = c.routers.iter().map(Router::addr).collect();
    Nginx::start(c.dir.path(), &http, &grpc).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_nginx_two_routers_serve_clones_concurrent_pushes_and_reads_after_writes()
-> anyhow::Result<()> {
    let c = Fixture::nodes(3)
        .seeded("p.git")
        .router()
        .router()
        .start()
        .await?;
    let nginx = start_nginx(&c).await?;
    let url = nginx.http_url("p.git");

    // A clone through nginx.
    let clone = c.path("clone");
    let out = std::process::Command::new("git")
        .args(["clone", "--quiet", &url])
        .arg(&clone)
        .output()?;
    assert!(out.status.success(), "{out:?}\n{}", nginx.log_tail(20));
    let seeded = git::rev(&c.node("node1").repo("p.git"), "refs/heads/main");
    assert_eq!(git::rev(&clone, "refs/heads/main"), seeded);

    // Read after write: each push is seen by the next request, whichever router it
    // lands on (nginx alternates).
    let work = c.work("w")?;
    for i in 0..6 {
        let branch = format!("raw{i}");
        let new = work.commit(&branch, "x")?;
        let out = git::push(&work.path, Path::new(&url), &[&branch], &[]).await?;
        assert!(out.status.success(), "push {i}: {out:?}");
        let seen = git::git(
            &work.path,
            &["ls-remote", &url, &format!("refs/heads/{branch}")],
        )?;
        assert!(seen.starts_with(&new), "push {i} not read back: {seen:?}");
    }

    // Eight pushers at once over the one address, three pushes each.
    let mut want = Vec::new();
    for i in 0..8 {
        git::git(&work.path, &["checkout", "--quiet", "main"])?;
        for round in 0..3 {
            let branch = format!("c{i}-{round}");
            want.push((branch.clone(), work.commit(&branch, "x")?));
        }
    }
    let pushers = (0..8).map(|i| {
        let (url, work) = (url.clone(), work.path.clone());
        async move {
            let mut outs = Vec::new();
            for round in 0..3 {
                let branch = format!("c{i}-{round}");
                outs.push(git::push(&work, Path::new(&url), &[&branch], &[]).await);
            }
            outs
        }
    });
    for (i, outs) in futures::future::join_all(pushers)
        .await
        .into_iter()
        .enumerate()
    {
        for out in outs {
            let out = out?;
            assert!(
                out.status.success(),
                "pusher {i}: {out:?}\n{}",
                nginx.log_tail(20)
            );
        }
    }
    for n in &c.nodes {
        for (branch, new) in &want {
            assert_eq!(
                git::rev(&n.repo("p.git"), &format!("refs/heads/{branch}")).as_ref(),
                Some(new),
                "{} {branch}",
                n.name
            );
        }
    }
    // Both routers served: nginx's log names the upstream of every request.
    let log = nginx.access_log();
    for r in &c.routers {
        let served = log.matches(&r.http_addr().to_string()).count();
        assert!(served >= 5, "{} served {served} requests:\n{log}", r.name);
    }

    // gRPC through grpc_pass: health, an accessor and a branch pushed above.
    assert_eq!(grpc_health(nginx.grpc_url()).await?, ServingStatus::Serving);
    let ch = tonic::transport::Channel::from_shared(nginx.grpc_url())?
        .connect()
        .await?;
    for _ in 0..4 {
        let exists = RepositoryServiceClient::new(ch.clone())
            .repository_exists(RepositoryExistsRequest {
                repository: repo("p.git"),
            })
            .await?
            .into_inner()
            .exists;
        assert!(exists);
        let found = RefServiceClient::new(ch.clone())
            .find_branch(FindBranchRequest {
                repository: repo("p.git"),
                name: b"c3-2".to_vec(),
            })
            .await?
            .into_inner()
            .branch
            .and_then(|b| b.target_commit)
            .map(|c| c.id);
        assert_eq!(
            found.as_ref(),
            want.iter().find(|(b, _)| b == "c3-2").map(|(_, s)| s)
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_cut_off_from_etcd_turns_not_ready_and_returns_when_etcd_does()
-> anyhow::Result<()> {
    let c = Fixture::nodes(3).seeded("p.git").start().await?;
    // The router reaches etcd only through a link the test can cut.
    let etcd_addr = c.etcd.endpoint(0).trim_start_matches("http://").parse()?;
    let link = Link::start("router1-etcd", etcd_addr).await?;
    let router = Router::start_with(
        "router1",
        c.dir.path(),
        &[format!("http://{}", link.addr())],
        &RouterOptions::http(),
    )
    .await?;
    let ready = readiness(&router);
    let live = format!("http://{}/-/liveness", router.http_addr());
    assert_eq!(curl(&[], &ready).await?, (200, "ok\n".into()));
    assert_eq!(curl(&[], &live).await?.0, 200);
    assert_eq!(
        grpc_health(router.grpc_url()).await?,
        ServingStatus::Serving
    );
    // HEAD like GET without a body; other methods 405 with Allow.
    let (code, head) = curl(&["-I"], &ready).await?;
    assert_eq!(code, 200);
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain"),
        "{head}"
    );
    let (code, head) = curl(&["-i", "-X", "POST"], &ready).await?;
    assert_eq!(code, 405);
    assert!(
        head.to_ascii_lowercase().contains("allow: get, head"),
        "{head}"
    );

    link.set(LinkState::Blackhole);
    let cut = Instant::now();
    // The probe's deadline is the etcd request timeout (1 s in the harness).
    wait_until(
        "not ready once etcd is cut off",
        Duration::from_secs(5),
        || {
            let ready = ready.clone();
            async move { matches!(curl(&[], &ready).await, Ok((503, _))) }
        },
    )
    .await?;
    eprintln!("not ready {:?} after the cut", cut.elapsed());
    let (code, body) = curl(&["-i"], &ready).await?;
    assert_eq!(code, 503);
    assert!(body.contains("etcd did not answer"), "{body}");
    assert!(
        body.to_ascii_lowercase().contains("retry-after: 1"),
        "{body}"
    );
    assert_eq!(curl(&[], &live).await?.0, 503);
    assert_eq!(
        grpc_health(router.grpc_url()).await?,
        ServingStatus::NotServing
    );

    link.set(LinkState::Up);
    wait_until(
        "ready again once etcd is back",
        Duration::from_secs(15),
        || {
            let ready = ready.clone();
            async move { matches!(curl(&[], &ready).await, Ok((200, _))) }
        },
    )
    .await?;
    assert_eq!(
        grpc_health(router.grpc_url()).await?,
        ServingStatus::Serving
    );
    Ok(())
}

/// One push of the load: when it ran and whether git took it.
#[derive(Debug)]
struct Op {
    pusher: usize,
    started: Instant,
    ended: Instant,
    ok: bool,
    commit: String,
    output: String,
}

/// `git args` in `dir`, without blocking the runtime; its stdout.
async fn git_async(dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = tokio::process::Command::new("git")
        .current_dir(dir)
        .args(args)
        .kill_on_drop(true)
        .output()
        .await?;
    anyhow::ensure!(out.status.success(), "git {args:?}: {out:?}");
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Pushes `load<i>` from the work repository `work` through `url` again and again, a
/// new commit each time, until `stop`; a failed push is recorded and the next builds
/// on top of it.
async fn pusher(
    i: usize,
    work: std::path::PathBuf,
    url: String,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<Vec<Op>> {
    let branch = format!("load{i}");
    let mut ops = Vec::new();
    // Bounded: a pusher never makes more than this many pushes.
    for n in 0..500 {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        tokio::fs::write(work.join(format!("load-{n}.txt")), format!("{i} {n}\n")).await?;
        git_async(&work, &["add", "-A"]).await?;
        git_async(&work, &["commit", "--quiet", "-m", "load"]).await?;
        let commit = git_async(&work, &["rev-parse", "HEAD"]).await?;
        let started = Instant::now();
        let out = git::push(&work, Path::new(&url), &[&branch], &[]).await?;
        ops.push(Op {
            pusher: i,
            started,
            ended: Instant::now(),
            ok: out.status.success(),
            commit,
            output: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        });
    }
    Ok(ops)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_load_a_sigtermed_router_drains_and_a_sigkilled_one_loses_no_acknowledged_push()
-> anyhow::Result<()> {
    let drain = |c: &mut refvote_router::Config| {
        c.drain_grace_secs = 2;
        c.drain_timeout_secs = 20;
    };
    let mut c = Fixture::nodes(3)
        .seeded("p.git")
        .router_with(RouterOptions::http().config(drain))
        .router_with(RouterOptions::http().config(drain))
        .start()
        .await?;
    let nginx = start_nginx(&c).await?;
    let url = nginx.http_url("p.git");
    let stop = Arc::new(AtomicBool::new(false));
    let mut works = Vec::new();
    for i in 0..8 {
        let w = WorkRepo::new(&c.path(&format!("w{i}")))?;
        // Each pusher's branch starts from the seeded main.
        git::git(&w.path, &["fetch", "--quiet", &url, "main"])?;
        git::git(
            &w.path,
            &[
                "checkout",
                "--quiet",
                "-B",
                &format!("load{i}"),
                "FETCH_HEAD",
            ],
        )?;
        works.push(w.path);
    }
    // Each pusher its own task, so the test's clock reads true while they run.
    let load = futures::future::join_all(
        works
            .into_iter()
            .enumerate()
            .map(|(i, w)| tokio::spawn(pusher(i, w, url.clone(), stop.clone()))),
    );
    let store = c.store.clone();
    let registration = store.keys().router("router1");
    let control = async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        // SIGTERM router1: not ready at once, while its port still accepts.
        c.routers[0].sigterm()?;
        let term = Instant::now();
        let ready = readiness(&c.routers[0]);
        wait_until(
            "router1 not ready after SIGTERM",
            Duration::from_secs(1),
            || {
                let ready = ready.clone();
                async move {
                    matches!(curl(&[], &ready).await, Ok((503, ref b)) if b.contains("draining"))
                }
            },
        )
        .await?;
        assert!(
            term.elapsed() < Duration::from_secs(2),
            "readiness turned false only after the grace"
        );
        wait_until("router1 exits", Duration::from_secs(30), || {
            let done = c.routers[0].exit_status().is_some();
            async move { done }
        })
        .await?;
        let status = c.routers[0].exit_status().expect("exited");
        assert!(
            status.success(),
            "router1 exited {status:?}:\n{}",
            c.routers[0].log_tail(30)
        );
        // Its lease was revoked on the way out, not left to expire.
        assert!(
            store.get(&registration).await?.is_none(),
            "router1's registration outlived its drain"
        );
        let drained = term.elapsed();
        c.routers[0].launch().await?;
        // nginx took router1 out for fail_timeout (5 s in the shipped config) when its
        // port closed, and takes it back only once a request to it succeeds: a rolling
        // restart waits out both (README) before stopping the next router. Killing
        // router2 earlier leaves nginx no live router, and it answers 502.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let router1 = c.routers[0].http_addr().to_string();
        let log_before = nginx.access_log().lines().count();
        wait_until(
            "nginx serves through router1 again",
            Duration::from_secs(20),
            || {
                let served = nginx
                    .access_log()
                    .lines()
                    .skip(log_before)
                    .any(|l| served_by(l, &router1));
                async move { served }
            },
        )
        .await?;
        // The clock starts before the kill: the call returns only once the process
        // is reaped, and a push that failed meanwhile was in flight at the kill.
        let kill = Instant::now();
        c.routers[1].kill()?;
        tokio::time::sleep(Duration::from_secs(4)).await;
        stop.store(true, Ordering::Relaxed);
        anyhow::Ok((term, drained, kill))
    };
    let (ops, times) = tokio::join!(load, control);
    let (term, drained, kill) = times?;
    let mut all = Vec::new();
    for joined in ops {
        all.extend(joined??);
    }
    let ops = all;
    let failed: Vec<&Op> = ops.iter().filter(|o| !o.ok).collect();
    eprintln!(
        "{} pushes, {} failed; router1 drained in {drained:?}",
        ops.len(),
        failed.len()
    );
    // Nothing that started before the SIGTERM fails, nor anything between the SIGTERM
    // and the kill (the drain hands every new request to the other router), nor after
    // the kill, with one exception: a push in flight at the kill may fail, and its
    // transaction stays open until the dead router's lease runs out, so the same
    // pusher's next pushes to its branch may be refused cleanly (`[remote rejected]`,
    // never a 502) until that outcome is settled. (A push that failed between the
    // SIGTERM and the kill was once let through here: it had been in flight at the
    // kill, read off a clock taken after the kill had reaped the process.)
    for i in 0..8 {
        let mut cut = false;
        for o in ops.iter().filter(|o| o.pusher == i && !o.ok) {
            let in_flight_at_kill = o.started < kill && o.ended > kill;
            let after_cut = cut && o.started > kill && o.output.contains("[remote rejected]");
            assert!(
                in_flight_at_kill || after_cut,
                "pusher {} push failed ({:?} after SIGTERM, {:?} from the kill): {}\nnginx:\n{}",
                o.pusher,
                o.started.saturating_duration_since(term),
                o.started.checked_duration_since(kill),
                o.output,
                nginx.problems()
            );
            if after_cut {
                eprintln!(
                    "pusher {i}: refused after its push cut by the kill: {}",
                    o.output.lines().next().unwrap_or_default()
                );
            }
            cut |= in_flight_at_kill;
        }
    }
    assert!(ops.len() >= 16, "too little load: {} pushes", ops.len());
    assert!(
        ops.iter()
            .any(|o| o.started < term && o.ended > term && o.ok),
        "no push was in flight at the SIGTERM"
    );
    assert!(
        ops.iter().any(|o| o.started > kill && o.ok),
        "no push went through router1 after router2 was killed"
    );
    // Every acknowledged push is there: each branch holds its last acknowledged commit
    // or a later one of the same pusher (a failed push may still have committed).
    for i in 0..8 {
        let Some(last) = ops.iter().rfind(|o| o.pusher == i && o.ok) else {
            continue;
        };
        let work = c.path(&format!("w{i}"));
        let remote = git::git(&work, &["ls-remote", &url, &format!("refs/heads/load{i}")])?;
        let tip = remote
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned();
        let ancestor = std::process::Command::new("git")
            .current_dir(&work)
            .args(["merge-base", "--is-ancestor", &last.commit, &tip])
            .status()?;
        assert!(
            ancestor.success(),
            "load{i}: acknowledged {} lost (tip {tip})",
            last.commit
        );
    }
    Ok(())
}
