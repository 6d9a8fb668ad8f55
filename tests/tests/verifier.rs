//! The routers' background verifier against a real etcd, three real votingd nodes,
//! real git and two real `refvote-router` processes: the routers split the shards
//! between them; a ref rewritten with plain git on one node's disk, behind the
//! cluster's back, is found within the pass interval, the replica is outdated and
//! repair restores it, and `votingctl status` and the metrics say so; under pushes that
//! never stop, the verifier (passes every second) never outdates a replica.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use refvote_cluster::RepoId;
use refvote_cluster::decide::verify::SHARDS;
use refvote_cluster::verifier::VerifierStatus;
use refvote_tests::cluster::{Fixture, VoteCluster};
use refvote_tests::git;
use refvote_tests::node::bin;
use refvote_tests::proc::wait_until;
use refvote_tests::router::RouterOptions;

/// Routers whose verifier starts at once and begins a pass every `interval_secs`.
fn fast(interval_secs: u64) -> RouterOptions {
    RouterOptions::default().config(move |c| {
        c.verifier.interval_secs = interval_secs;
        c.verifier.rate = 200.0;
        c.verifier.start_delay_secs = 0;
    })
}

async fn statuses(c: &VoteCluster) -> Vec<VerifierStatus> {
    c.store.verifier_statuses().await.unwrap_or_default()
}

/// The reason on `node`'s replica of `id` when it is not up to date.
async fn not_current(c: &VoteCluster, id: &RepoId, node: &str) -> Option<String> {
    let v = c.store.repo_view(id).await.ok()?;
    let (r, _) = v.replicas.get(node)?;
    (!r.is_up_to_date(&v.record)).then(|| r.reason.clone())
}

/// A commit made in a bare repository on disk with plain git, no hook.
fn rewrite_on_disk(repo: &Path) -> anyhow::Result<String> {
    let commit = git::git(
        repo,
        &[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "commit-tree",
            "main^{tree}",
            "-p",
            "main",
            "-m",
            "behind the cluster's back",
        ],
    )?;
    let commit = commit.trim().to_owned();
    git::git(
        repo,
        &[
            "-c",
            "core.hooksPath=/dev/null",
            "update-ref",
            "refs/heads/main",
            &commit,
        ],
    )?;
    Ok(commit)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ref_rewritten_on_disk_is_found_outdated_and_repaired() -> anyhow::Result<()> {
    let interval = 3;
    let c = Fixture::nodes(3)
        .router_with(fast(interval))
        .router_with(fast(interval))
        .start()
        .await?;
    let router = &c.routers[0];
    c.create_and_push(router, "a.git").await?;
    c.create_and_push(router, "b.git").await?;
    let id = c.repo_id("a.git");
    let head = git::rev(&c.node("node1").repo("a.git"), "refs/heads/main");

    // The two routers share the shards, every shard held once, and each finishes a
    // pass over its share without finding anything.
    wait_until(
        "the shards split and a clean pass each",
        Duration::from_secs(30),
        || async {
            let s = statuses(&c).await;
            s.len() == 2
                && s.iter().all(|v| v.shards.len() == SHARDS as usize / 2)
                && s.iter().map(|v| v.shards.len()).sum::<usize>() == SHARDS as usize
                && s.iter().all(|v| v.last_full_pass_unix_ms > 0)
                && s.iter().map(|v| v.replicas_checked).sum::<u64>() >= 6
        },
    )
    .await?;
    assert!(statuses(&c).await.iter().all(|v| v.mismatches == 0));
    for n in ["node1", "node2", "node3"] {
        assert_eq!(not_current(&c, &id, n).await, None, "{n}");
    }

    let changed = rewrite_on_disk(&c.node("node2").repo("a.git"))?;
    assert_ne!(Some(changed), head);
    let t = Instant::now();
    // Found within one pass interval (plus the pass itself and the poll).
    wait_until(
        "node2 outdated by the verifier",
        Duration::from_secs(interval + 5),
        || async {
            not_current(&c, &id, "node2")
                .await
                .is_some_and(|why| why.contains("verifier"))
                || statuses(&c).await.iter().any(|v| v.mismatches > 0)
        },
    )
    .await?;
    let found_in = t.elapsed();
    wait_until("node2 repaired", Duration::from_secs(30), || async {
        not_current(&c, &id, "node2").await.is_none()
            && git::rev(&c.node("node2").repo("a.git"), "refs/heads/main") == head
    })
    .await?;
    let s = statuses(&c).await;
    assert_eq!(s.iter().map(|v| v.mismatches).sum::<u64>(), 1, "{s:?}");
    let recent: Vec<&String> = s.iter().flat_map(|v| &v.recent_mismatches).collect();
    assert!(
        recent.len() == 1 && recent[0].contains("default/a.git node2"),
        "{recent:?}"
    );
    // Neither the other replicas nor the other repository were touched.
    for n in ["node1", "node3"] {
        assert_eq!(not_current(&c, &id, n).await, None, "{n}");
    }

    // votingctl status shows it, as text and JSON.
    let status = |json: bool| {
        let mut cmd = std::process::Command::new(bin("votingctl"));
        cmd.args(["status", "--socket"]).arg(&c.nodes[0].socket);
        if json {
            cmd.arg("--json");
        }
        cmd.output()
    };
    let text = String::from_utf8(status(false)?.stdout)?;
    assert!(
        text.contains("verifier")
            && text.contains("1 mismatches")
            && text.contains("default/a.git node2"),
        "{text}"
    );
    let doc: serde_json::Value = serde_json::from_slice(&status(true)?.stdout)?;
    let verifiers = doc["cluster"]["verifiers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(verifiers.len(), 2, "{doc:#}");
    assert_eq!(
        verifiers
            .iter()
            .map(|v| v["mismatches"].as_u64().unwrap_or(0))
            .sum::<u64>(),
        1,
        "{doc:#}"
    );
    eprintln!("found in {found_in:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_that_never_stop_never_get_a_replica_outdated() -> anyhow::Result<()> {
    let c = Fixture::nodes(3).router_with(fast(1)).start().await?;
    let router = &c.routers[0];
    let (work, _) = c.create_and_push(router, "busy.git").await?;
    let id = c.repo_id("busy.git");
    let url = router.http_url("busy.git");
    wait_until("a first pass", Duration::from_secs(20), || async {
        statuses(&c)
            .await
            .iter()
            .any(|v| v.last_full_pass_unix_ms > 0)
    })
    .await?;
    let before = statuses(&c).await[0].clone();
    let stop = AtomicBool::new(false);
    let pusher = async {
        let mut pushed = 0;
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(25) && pushed < 300 {
            // Alternate a new branch and the same branch moved again.
            let branch = if pushed % 2 == 0 {
                format!("b{pushed}")
            } else {
                "main".to_string()
            };
            work.commit(&branch, "x")?;
            let out = git::push(&work.path, Path::new(&url), &[&branch], &[]).await?;
            anyhow::ensure!(
                out.status.success(),
                "push {pushed}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            pushed += 1;
        }
        stop.store(true, Ordering::Relaxed);
        anyhow::Ok(pushed)
    };
    let watcher = async {
        let mut seen = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            for n in ["node1", "node2", "node3"] {
                if let Some(why) = not_current(&c, &id, n).await
                    && why.contains("verifier")
                {
                    seen.push(format!("{n}: {why}"));
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        seen
    };
    let (pushed, outdated) = tokio::join!(pusher, watcher);
    let pushed = pushed?;
    let after = statuses(&c).await[0].clone();
    assert!(outdated.is_empty(), "the verifier outdated: {outdated:?}");
    assert_eq!(after.mismatches, 0, "{after:?}");
    // It did compare during the pushes: the assertion above could have failed.
    assert!(
        after.pass >= before.pass + 5 && after.replicas_checked >= before.replicas_checked + 6,
        "the verifier barely ran during {pushed} pushes: before {before:?}, after {after:?}"
    );
    for n in ["node1", "node2", "node3"] {
        assert_eq!(not_current(&c, &id, n).await, None, "{n}");
    }
    eprintln!(
        "{pushed} pushes; verifier passes {} -> {}, replicas checked {} -> {}, busy skipped {} -> {}",
        before.pass,
        after.pass,
        before.replicas_checked,
        after.replicas_checked,
        before.busy_skipped,
        after.busy_skipped
    );
    Ok(())
}
