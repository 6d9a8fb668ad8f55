//! The voting core against real etcd, real votingd processes and real git: the hook
//! votes every ref update of a push, and it commits only where a majority agrees.

use std::time::{Duration, Instant};

use refvote_cluster::records::{ReplicaRecord, ReplicaState};
use refvote_cluster::tx::Begin;
use refvote_tests::cluster::VoteCluster;
use refvote_tests::git::{self, rev};
use refvote_tests::node::NodeOptions;
use refvote_tests::proc::wait_until;

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

async fn replica(c: &VoteCluster, repo: &refvote_cluster::RepoId, node: &str) -> ReplicaRecord {
    c.store
        .get(&c.store.keys().replica(repo, node))
        .await
        .unwrap()
        .unwrap()
        .decode()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_push_commits_on_all_three_replicas() -> anyhow::Result<()> {
    let c = VoteCluster::start(3, 3).await?;
    let repo = c.create_repo("group/project.git").await?;
    let work = c.work("w")?;
    let head = work.commit("main", "first")?;

    let tx = c.begin(&repo).await?;
    assert_eq!(tx.voters.len(), 3);
    assert_eq!(tx.threshold, 2);
    for (node, out) in c.push_all(&tx, &work, &["main"]).await? {
        assert!(
            out.status.success(),
            "push to {node} failed: {}",
            stderr(&out)
        );
    }
    let outcome = c.finalize(&tx).await?;
    assert!(outcome.acknowledged && outcome.committed, "{outcome:?}");
    assert_eq!(outcome.promoted.len(), 3);
    assert_eq!(outcome.generation, 1);
    for n in &c.nodes {
        assert_eq!(
            rev(&n.repo("group/project.git"), "refs/heads/main").as_deref(),
            Some(head.as_str())
        );
        let r = replica(&c, &repo, &n.name).await;
        assert_eq!((r.state, r.generation), (ReplicaState::UpToDate, 1));
    }
    // Finalize garbage-collected the transaction's keys and its index entry.
    let (left, _) = c.store.get_prefix(&c.store.keys().tx(&tx.id)).await?;
    assert!(left.is_empty(), "{left:?}");
    let (index, _) = c.store.get_prefix(&c.store.keys().txrepo(&repo)).await?;
    assert!(index.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drifted_replica_loses_the_vote_and_is_marked_outdated() -> anyhow::Result<()> {
    let c = VoteCluster::start(3, 3).await?;
    let repo = c.create_repo("drift.git").await?;
    let work = c.work("w")?;
    let base = work.commit("main", "base")?;
    let tx = c.begin(&repo).await?;
    c.push_all(&tx, &work, &["main"]).await?;
    assert!(c.finalize(&tx).await?.acknowledged);

    // node3's main drifts outside refvote (no transaction; require_transaction is off).
    let other = c.work("other")?;
    git::git(
        &other.path,
        &[
            "fetch",
            "--quiet",
            c.node("node1").repo("drift.git").to_str().unwrap(),
            "main",
        ],
    )?;
    git::git(&other.path, &["reset", "--quiet", "--hard", "FETCH_HEAD"])?;
    let drifted = other.commit("main", "drift")?;
    let out = git::push(
        &other.path,
        &c.node("node3").repo("drift.git"),
        &["main"],
        &[],
    )
    .await?;
    assert!(out.status.success(), "{}", stderr(&out));

    let next = work.commit("main", "next")?;
    let tx = c.begin(&repo).await?;
    // Forced, so git on node3 gets as far as voting: its old value differs from the
    // others', so its hash does (a plain push would fail node3's ref lock before any
    // vote, which finalize also handles: it would never confirm).
    let results = c.push_all(&tx, &work, &["+main"]).await?;
    for (node, out) in &results {
        if node == "node3" {
            assert!(!out.status.success());
            let e = stderr(out);
            assert!(
                e.contains(
                    "refvote: update rejected: this replica's refs differ from the majority"
                ),
                "{e}"
            );
        } else {
            assert!(out.status.success(), "push to {node}: {}", stderr(out));
        }
    }
    // Marked outdated by its own votingd before its hook exited.
    let r3 = replica(&c, &repo, "node3").await;
    assert_eq!(r3.state, ReplicaState::Outdated);
    let outcome = c.finalize(&tx).await?;
    assert!(outcome.acknowledged);
    assert_eq!(
        outcome.promoted,
        vec!["node1".to_string(), "node2".to_string()]
    );
    assert_eq!(outcome.outdated, vec!["node3".to_string()]);
    assert_eq!(
        rev(&c.node("node1").repo("drift.git"), "main").unwrap(),
        next
    );
    assert_eq!(
        rev(&c.node("node2").repo("drift.git"), "main").unwrap(),
        next
    );
    assert_eq!(
        rev(&c.node("node3").repo("drift.git"), "main").unwrap(),
        drifted
    );
    assert_ne!(base, next);
    // A repair job was queued for it.
    assert!(
        c.store
            .get(&c.store.keys().repair_job(&repo, "node3"))
            .await?
            .is_some()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_absent_the_other_two_commit() -> anyhow::Result<()> {
    let mut c = VoteCluster::start(3, 3).await?;
    let repo = c.create_repo("absent.git").await?;
    let work = c.work("w")?;
    let head = work.commit("main", "first")?;
    let tx = c.begin(&repo).await?;
    assert_eq!(tx.voters.len(), 3);
    // node3 dies after the transaction was created: its lease lapses after the TTL.
    c.nodes[2].kill()?;
    let started = Instant::now();
    let (a, b) = tokio::join!(
        c.push_as(&tx, "node1", &work, &["main"]),
        c.push_as(&tx, "node2", &work, &["main"])
    );
    assert!(a?.status.success() && b?.status.success());
    // Two agreeing votes are a majority: nobody waited for node3.
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    let outcome = c.finalize(&tx).await?;
    assert!(outcome.acknowledged, "{outcome:?}");
    assert_eq!(outcome.promoted.len(), 2);
    assert_eq!(outcome.outdated, vec!["node3".to_string()]);
    assert_eq!(
        rev(&c.node("node1").repo("absent.git"), "main").unwrap(),
        head
    );
    assert!(rev(&c.node("node3").repo("absent.git"), "main").is_none());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_absent_the_reaper_aborts_when_the_creator_lease_expires() -> anyhow::Result<()> {
    let c = VoteCluster::start(3, 3).await?;
    let repo = c.create_repo("reaped.git").await?;
    let work = c.work("w")?;
    work.commit("main", "first")?;
    // A creator whose lease is never renewed: it "dies" right after creating the
    // transaction and forwarding the push to node1 only.
    let mut client = c.store.client();
    let lease = client.lease_grant(2, None).await?.id();
    let tx = c
        .store
        .begin(
            &repo,
            &Begin {
                creator: "dying-router".into(),
                lease,
            },
        )
        .await?;
    let started = Instant::now();
    let out = c.push_as(&tx, "node1", &work, &["main"]).await?;
    let waited = started.elapsed();
    assert!(
        !out.status.success(),
        "the push must not commit without a majority"
    );
    let e = stderr(&out);
    assert!(
        e.contains("refvote: update rejected: 1 of 3 replicas agreed, 2 needed"),
        "{e}"
    );
    // Not before the lease (2 s) expired, and promptly after.
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(10),
        "{waited:?}"
    );
    for n in &c.nodes {
        assert!(
            rev(&n.repo("reaped.git"), "refs/heads/main").is_none(),
            "{} changed",
            n.name
        );
    }
    // The reaper (in votingd) finalizes it: nothing committed, nobody outdated.
    let store = c.store.clone();
    let id = tx.id.clone();
    wait_until(
        "the reaper finalizes the transaction",
        Duration::from_secs(10),
        || {
            let store = store.clone();
            let id = id.clone();
            async move { matches!(store.outcome(&id).await, Ok(Some(_))) }
        },
    )
    .await?;
    let outcome = c.store.outcome(&tx.id).await?.unwrap();
    assert!(
        outcome.reaped && !outcome.committed && !outcome.acknowledged,
        "{outcome:?}"
    );
    for n in c.node_names() {
        assert_eq!(replica(&c, &repo, &n).await.state, ReplicaState::UpToDate);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn votes_fail_closed_while_etcd_has_no_majority_and_recover_after() -> anyhow::Result<()> {
    let mut c = VoteCluster::start(3, 3).await?;
    let repo = c.create_repo("outage.git").await?;
    let work = c.work("w")?;
    let head = work.commit("main", "first")?;
    let tx = c.begin(&repo).await?;
    for s in c.nodes.iter().map(|n| n.name.clone()).collect::<Vec<_>>() {
        c.store.start_voter(&tx.id, &s).await?;
    }

    // Two of three etcd members stop: no leader, no quorum.
    c.etcd.stop(1)?;
    c.etcd.stop(2)?;
    let started = Instant::now();
    let pushes = c.nodes.iter().map(|n| {
        let env = n.tx_env(&tx.id);
        let target = n.repo("outage.git");
        let work = work.path.clone();
        async move { git::push(&work, &target, &["main"], &env).await }
    });
    for out in futures::future::join_all(pushes).await {
        let out = out?;
        assert!(!out.status.success(), "a vote must not commit without etcd");
        let e = stderr(&out);
        assert!(e.contains("refvote: update rejected:"), "{e}");
    }
    // Fail closed within the request timeout (1 s here), well before the vote deadline.
    let took = started.elapsed();
    assert!(took < Duration::from_secs(8), "took {took:?}");
    for n in &c.nodes {
        assert!(rev(&n.repo("outage.git"), "main").is_none());
    }

    // etcd comes back: the same votingd processes vote again, no restart.
    let pids: Vec<_> = c.nodes.iter().map(|n| n.pid()).collect();
    c.etcd.restart(1)?;
    c.etcd.restart(2)?;
    c.etcd.wait_healthy(Duration::from_secs(20)).await?;
    for n in &c.nodes {
        let socket = n.socket.clone();
        wait_until(
            &format!("{} holds a lease again", n.name),
            Duration::from_secs(20),
            || {
                let socket = socket.clone();
                async move {
                    votingd::client::status(&socket).is_ok_and(|s| s.lease.held && s.etcd.reachable)
                }
            },
        )
        .await?;
    }
    // As votingd's node service does once etcd takes writes again: the voters of the
    // first transaction report done (their git runs failed), so it can be finalized
    // and holds up nothing. Votes of it may have landed late: finalize must not count
    // an update nobody applied as committed.
    for n in c.node_names() {
        let (store, id) = (c.store.clone(), tx.id.clone());
        refvote_tests::proc::wait_for("voters report done", Duration::from_secs(20), || {
            let (store, id, n) = (store.clone(), id.clone(), n.clone());
            async move {
                match store
                    .done(&id, &n, false, "push failed during the outage")
                    .await
                {
                    Ok(()) | Err(refvote_cluster::Error::UnknownTx(_)) => Ok(()),
                    Err(e) => Err(e.into()),
                }
            }
        })
        .await?;
    }
    c.session.wait_for_lease(Duration::from_secs(20)).await;
    let store = c.store.clone();
    let repo2 = repo.clone();
    let lease = c.session.subscribe();
    let tx = refvote_tests::proc::wait_for(
        "a transaction can be created",
        Duration::from_secs(20),
        || {
            let store = store.clone();
            let repo = repo2.clone();
            let lease = *lease.borrow();
            async move {
                let lease = lease.ok_or_else(|| anyhow::anyhow!("no lease yet"))?;
                Ok(store
                    .begin(
                        &repo,
                        &Begin {
                            creator: "test".into(),
                            lease,
                        },
                    )
                    .await?)
            }
        },
    )
    .await?;
    for (node, out) in c.push_all(&tx, &work, &["main"]).await? {
        assert!(out.status.success(), "push to {node}: {}", stderr(&out));
    }
    assert!(c.finalize(&tx).await?.acknowledged);
    assert_eq!(pids, c.nodes.iter().map(|n| n.pid()).collect::<Vec<_>>());
    for n in &c.nodes {
        assert_eq!(rev(&n.repo("outage.git"), "main").unwrap(), head);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_atomic_pushes_in_different_orders_and_concurrent_transactions_all_commit()
-> anyhow::Result<()> {
    let c = VoteCluster::start(3, 3).await?;
    let repo = c.create_repo("orders.git").await?;
    let work = c.work("w")?;
    let base = work.commit("main", "base")?;
    let tx = c.begin(&repo).await?;
    c.push_all(&tx, &work, &["main"]).await?;
    assert!(c.finalize(&tx).await?.acknowledged);

    // One non-atomic push of four branches (one git ref transaction per branch). node1
    // and node2 apply it in push order; node3 gets the refs one at a time in the reverse
    // order. Votes meet by key, so node3's first vote (on d) simply waits until the
    // majority reaches d, and nothing is aborted. (When every replica applies a
    // different order, each can wait on a key the others reach last: votingd's node
    // service feeds git the commands in one canonical order, so that cannot happen.)
    let branches = ["a", "b", "c", "d"];
    let mut heads = Vec::new();
    for b in branches {
        git::git(&work.path, &["checkout", "--quiet", "-B", b, &base])?;
        heads.push(work.commit(b, &format!("on {b}"))?);
    }
    let tx = c.begin(&repo).await?;
    let runs = c.nodes.iter().map(|n| {
        let (c, tx, work) = (&c, &tx, &work);
        async move {
            c.store.start_voter(&tx.id, &n.name).await?;
            let target = n.repo("orders.git");
            if n.name == "node3" {
                for b in ["d", "c", "b", "a"] {
                    let out = git::push(&work.path, &target, &[b], &n.tx_env(&tx.id)).await?;
                    assert!(out.status.success(), "{} {b}: {}", n.name, stderr(&out));
                }
            } else {
                let out = git::push(&work.path, &target, &branches, &n.tx_env(&tx.id)).await?;
                assert!(out.status.success(), "{}: {}", n.name, stderr(&out));
            }
            c.store.done(&tx.id, &n.name, true, "").await?;
            anyhow::Ok(())
        }
    });
    for r in futures::future::join_all(runs).await {
        r?;
    }
    let outcome = c.finalize(&tx).await?;
    assert!(
        outcome.acknowledged && outcome.outdated.is_empty(),
        "{outcome:?}"
    );
    assert_eq!(outcome.promoted.len(), 3);

    // 16 concurrent transactions, each updating its own branch of the same repository.
    let txs = (0..16).map(|i| {
        let (c, repo, base) = (&c, &repo, &base);
        async move {
            let w = c.work(&format!("w{i}"))?;
            git::git(
                &w.path,
                &[
                    "fetch",
                    "--quiet",
                    c.node("node1").repo("orders.git").to_str().unwrap(),
                    "main",
                ],
            )?;
            git::git(&w.path, &["reset", "--quiet", "--hard", base])?;
            let branch = format!("topic-{i}");
            let head = w.commit(&branch, &format!("topic {i}"))?;
            let tx = c.begin(repo).await?;
            for (node, out) in c.push_all(&tx, &w, &[&branch]).await? {
                assert!(out.status.success(), "{branch} to {node}: {}", stderr(&out));
            }
            let outcome = c.finalize(&tx).await?;
            anyhow::Ok((branch, head, outcome))
        }
    });
    let results = futures::future::join_all(txs).await;
    for r in results {
        let (branch, head, outcome) = r?;
        assert!(outcome.acknowledged, "{branch}: {outcome:?}");
        assert!(outcome.outdated.is_empty(), "{branch}: {outcome:?}");
        for n in &c.nodes {
            assert_eq!(
                rev(&n.repo("orders.git"), &branch).as_deref(),
                Some(head.as_str())
            );
        }
    }
    for n in c.node_names() {
        let r = replica(&c, &repo, &n).await;
        assert_eq!((r.state, r.generation), (ReplicaState::UpToDate, 18), "{n}");
    }
    let refs: Vec<String> = c
        .nodes
        .iter()
        .map(|n| git::refs(&n.repo("orders.git")))
        .collect();
    assert!(refs.windows(2).all(|w| w[0] == w[1]));
    for (b, h) in branches.iter().zip(&heads) {
        assert_eq!(
            rev(&c.node("node2").repo("orders.git"), b).as_deref(),
            Some(h.as_str())
        );
    }
    Ok(())
}

/// Runs the hook binary as git would, with `stdin` and `env`.
fn run_hook(phase: &str, stdin: &[u8], env: &[(String, String)]) -> std::process::Output {
    use std::io::Write;
    let mut cmd = std::process::Command::new(refvote_tests::node::bin("reference-transaction"));
    cmd.arg(phase)
        .env_remove(refvote_proto::contract::ENV_TX)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("hook starts");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_error_commits_nothing_and_votingd_keeps_serving()
-> anyhow::Result<()> {
    use prost::Message;
    use refvote_proto::hook::{self, Response, response};
    use std::io::{Read, Write};

    let c = VoteCluster::start(3, 1).await?;
    let repo = c.create_repo("bad.git").await?;
    let work = c.work("w")?;
    work.commit("main", "first")?;
    let node1 = c.node("node1");
    let tx = c.begin(&repo).await?;
    c.store.start_voter(&tx.id, "node1").await?;
    let line = format!("{} {} refs/heads/main\n", "0".repeat(40), "1".repeat(40));

    // Malformed stdin: refused by the hook itself, nothing voted.
    for garbage in [
        &b"garbage\n"[..],
        b"",
        b"\xff\xfe\n",
        format!("{} zz refs/heads/x\n", "1".repeat(40)).as_bytes(),
    ] {
        let out = run_hook("prepared", garbage, &node1.tx_env(&tx.id));
        assert_eq!(out.status.code(), Some(1));
        let e = stderr(&out);
        assert!(
            e.starts_with("refvote: update rejected:") && e.lines().count() == 1,
            "{e:?}"
        );
    }
    let (votes, _) = c
        .store
        .get_prefix(&c.store.keys().all_votes(&tx.id))
        .await?;
    assert!(votes.is_empty(), "a malformed update must not be voted");

    // An unknown transaction: a real push is refused, nothing written.
    let out = git::push(
        &work.path,
        &node1.repo("bad.git"),
        &["main"],
        &node1.tx_env("0123456789abcdef"),
    )
    .await?;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("refvote: update rejected: unknown transaction 0123456789abcdef"),
        "{}",
        stderr(&out)
    );
    assert!(rev(&node1.repo("bad.git"), "main").is_none());

    // A voter not in the voter set: node3 is outdated, so a new transaction excludes it.
    c.store.mark_outdated(&repo, "node3", "test").await?;
    let tx2 = c.begin(&repo).await?;
    assert_eq!(tx2.voters, vec!["node1".to_string(), "node2".to_string()]);
    let node3 = c.node("node3");
    let out = git::push(
        &work.path,
        &node3.repo("bad.git"),
        &["main"],
        &node3.tx_env(&tx2.id),
    )
    .await?;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("\"node3\" is not a voter of transaction"),
        "{}",
        stderr(&out)
    );
    assert!(rev(&node3.repo("bad.git"), "main").is_none());

    // A hook asking node1's votingd to vote as node2.
    let mut wrong = node1.tx_env(&tx.id);
    wrong[1].1 = "node2".into();
    let out = run_hook("prepared", line.as_bytes(), &wrong);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("votes as \"node1\", not as \"node2\""),
        "{}",
        stderr(&out)
    );

    // Oversized and garbage frames straight on the socket.
    let mut s = std::os::unix::net::UnixStream::connect(&node1.socket)?;
    s.write_all(&(10u32 << 20).to_be_bytes())?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer)?;
    let resp = Response::decode(&answer[4..])?;
    let Some(response::Kind::Error(e)) = resp.kind else {
        panic!("expected an error, got {resp:?}")
    };
    assert_eq!(e.code, hook::error::Code::InvalidArgument as i32);
    assert!(e.message.contains("exceeds the limit"), "{}", e.message);
    let mut s = std::os::unix::net::UnixStream::connect(&node1.socket)?;
    s.write_all(&[0, 0, 0, 3, 0xff, 0xff, 0xff])?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer)?;
    let resp = Response::decode(&answer[4..])?;
    assert!(
        matches!(resp.kind, Some(response::Kind::Error(ref e)) if e.message.contains("malformed request")),
        "{resp:?}"
    );

    // Still serving: the first transaction commits on node1 and node2.
    let (a, b) = tokio::join!(
        c.push_as(&tx, "node1", &work, &["main"]),
        c.push_as(&tx, "node2", &work, &["main"])
    );
    for out in [a?, b?] {
        assert!(out.status.success(), "{}", stderr(&out));
    }
    c.store.done(&tx.id, "node3", false, "not run").await?;
    let outcome = c.finalize(&tx).await?;
    assert!(outcome.acknowledged, "{outcome:?}");
    let status = votingd::client::status(&node1.socket)?;
    assert!(
        status.counters.rejected_requests >= 4,
        "{:?}",
        status.counters
    );
    assert_eq!(status.counters.commits, 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_transaction_refuses_updates_outside_refvote_but_not_maintenance()
-> anyhow::Result<()> {
    let opts = NodeOptions {
        require_transaction: true,
        ..NodeOptions::default()
    };
    let c = VoteCluster::start_with(1, 1, opts).await?;
    c.create_repo("strict.git").await?;
    let node = c.node("node1");
    let work = c.work("w")?;
    let head = work.commit("main", "first")?;
    let out = git::push(&work.path, &node.repo("strict.git"), &["main"], &[]).await?;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("only accepts ref updates that come through a refvote router"),
        "{}",
        stderr(&out)
    );
    assert!(rev(&node.repo("strict.git"), "main").is_none());
    // A run votingd marks as its own (repair, maintenance) passes.
    let marked = refvote_proto::contract::maintenance_env();
    let out = git::push(&work.path, &node.repo("strict.git"), &["main"], &marked).await?;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(rev(&node.repo("strict.git"), "main").unwrap(), head);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn votingctl_status_reports_health_as_a_table_and_as_json() -> anyhow::Result<()> {
    let mut c = VoteCluster::start(3, 1).await?;
    let repo = c.create_repo("status.git").await?;
    let work = c.work("w")?;
    work.commit("main", "first")?;
    let tx = c.begin(&repo).await?;
    c.push_all(&tx, &work, &["main"]).await?;
    c.finalize(&tx).await?;
    // A repository on node1 without the hook shows up.
    git::git(
        &c.node("node1").storage,
        &["init", "--bare", "--quiet", "stray.git"],
    )?;

    let ctl = |args: &[&str]| {
        std::process::Command::new(refvote_tests::node::bin("votingctl"))
            .args(args)
            .output()
            .unwrap()
    };
    let socket = c.node("node2").socket.to_str().unwrap().to_owned();
    let out = ctl(&["status", "--socket", &socket]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("node node2") && text.contains("healthy"),
        "{text}"
    );
    assert!(text.contains("1 commits, 0 aborts"), "{text}");
    assert!(text.contains("1 repositories, 1 with the hook"), "{text}");

    let config = c.node("node1").config.to_str().unwrap().to_owned();
    let out = ctl(&["status", "--config", &config, "--json"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "stray.git has no hook: unhealthy"
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(doc["node"], "node1");
    assert_eq!(doc["lease"]["held"], true);
    assert_eq!(doc["etcd"]["reachable"], true);
    assert_eq!(doc["counters"]["commits"], 1);
    assert_eq!(doc["storages"][0]["repositories"], 2);
    assert_eq!(doc["storages"][0]["hooked"], 1);
    assert_eq!(doc["storages"][0]["missing"][0], "stray.git");

    c.nodes[1].stop()?;
    let out = ctl(&["status", "--socket", &socket]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("votingd is not answering"),
        "{out:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_majority_of_votes_that_no_replica_applied_does_not_advance_the_repository()
-> anyhow::Result<()> {
    let c = VoteCluster::start(3, 1).await?;
    let repo = c.create_repo("late.git").await?;
    let tx = c.begin(&repo).await?;
    // Two votes for the same update land (as a vote whose request timed out can land
    // after its voter aborted), but no replica applies it: nobody confirms.
    two_equal_votes(&c, &tx.id, "0123456789abcdef0123456789abcdef.0").await?;
    for n in c.node_names() {
        c.store.done(&tx.id, &n, false, "git aborted").await?;
    }
    let outcome = c.finalize(&tx).await?;
    assert!(!outcome.committed && !outcome.acknowledged, "{outcome:?}");
    assert_eq!(outcome.generation, 0);
    assert!(outcome.outdated.is_empty(), "{outcome:?}");
    for n in c.node_names() {
        let r = replica(&c, &repo, &n).await;
        assert_eq!((r.state, r.generation), (ReplicaState::UpToDate, 0), "{n}");
    }
    Ok(())
}

/// A voter reported done (a router does it at once for a call it saw fail) is fenced:
/// it can no longer start or vote, so finalize never has to wait for it and a late vote
/// cannot change a key everyone already counted it "no" on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_voter_reported_done_can_neither_start_nor_vote() -> anyhow::Result<()> {
    use refvote_cluster::Error;
    use refvote_cluster::records::VoteRecord;
    let c = VoteCluster::start(3, 1).await?;
    let repo = c.create_repo("fenced.git").await?;
    let tx = c.begin(&repo).await?;
    let vote = VoteRecord {
        hash: "cd".repeat(32),
        ref_count: 1,
        first_ref: "refs/heads/main".into(),
    };
    let key = "fedcba9876543210fedcba9876543210.0";

    // Reported failed before it started: the start is refused.
    c.store
        .fail_voter(
            &tx.id,
            "node3",
            "router1",
            "Unavailable: connection refused",
        )
        .await?;
    let started = c.store.start_voter(&tx.id, "node3").await;
    assert!(
        matches!(started, Err(Error::VoterDone { .. })),
        "{started:?}"
    );

    // Started, then reported failed: its vote is refused and stored nowhere.
    c.store.start_voter(&tx.id, "node2").await?;
    c.store
        .fail_voter(&tx.id, "node2", "router1", "Unavailable: stream reset")
        .await?;
    let voted = c
        .store
        .cast_vote(&tx.id, "node2", key, &vote, Duration::from_secs(2))
        .await;
    assert!(matches!(voted, Err(Error::VoterDone { .. })), "{voted:?}");
    let stored = c
        .store
        .get(&c.store.keys().vote(&tx.id, key, "node2"))
        .await?;
    assert!(stored.is_none(), "a fenced voter's vote was stored");

    // node1 alone cannot reach 2 of 3: the key aborts at once, nobody waits.
    c.store.start_voter(&tx.id, "node1").await?;
    let (d, _) = c
        .store
        .cast_vote(&tx.id, "node1", key, &vote, Duration::from_secs(5))
        .await?;
    assert!(!d.is_commit(), "{d:?}");
    c.store.done(&tx.id, "node1", true, "").await?;
    let outcome = c.finalize(&tx).await?;
    assert!(!outcome.committed && !outcome.acknowledged, "{outcome:?}");
    Ok(())
}

/// A voter that started but whose report never came (its node lives on, so its lease
/// never lapses) must not keep an abandoned transaction open forever: after the grace
/// the reaper reports it failed, which fences it, and the transaction ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reaper_gives_up_on_a_started_voter_that_never_reports() -> anyhow::Result<()> {
    use refvote_cluster::reaper;
    let opts = NodeOptions {
        reaper: false,
        ..Default::default()
    };
    let c = VoteCluster::start_with(3, 1, opts).await?;
    let repo = c.create_repo("silent.git").await?;
    let mut client = c.store.client();
    let creator = client.lease_grant(30, None).await?.id();
    let tx = c
        .store
        .begin(
            &repo,
            &Begin {
                creator: "dying-router".into(),
                lease: creator,
            },
        )
        .await?;
    c.store.start_voter(&tx.id, "node1").await?;
    client.lease_revoke(creator).await?;

    let lease = c.session.lease().expect("the test's lease");
    let grace = Duration::from_millis(800);
    let mut waiting = reaper::Waiting::new();
    let first = reaper::scan(&c.store, lease, "reaper:test", &mut waiting, grace).await?;
    assert_eq!(
        first, 0,
        "node1 started and holds its lease: the reaper waits"
    );
    assert!(c.store.tx_record(&tx.id).await.is_ok(), "still open");

    tokio::time::sleep(grace).await;
    let second = reaper::scan(&c.store, lease, "reaper:test", &mut waiting, grace).await?;
    assert_eq!(second, 1, "after the grace the transaction is reaped");
    let outcome = c.store.outcome(&tx.id).await?.expect("an outcome");
    assert!(!outcome.committed && !outcome.acknowledged, "{outcome:?}");
    assert!(waiting.is_empty(), "{waiting:?}");
    for n in c.node_names() {
        let r = replica(&c, &repo, &n).await;
        assert_eq!((r.state, r.generation), (ReplicaState::UpToDate, 0), "{n}");
    }
    Ok(())
}

/// etcd expires leases only while it has a leader, and a new leader extends them: an
/// outage of the etcd majority longer than the TTL must not cost the nodes their
/// leases. When each session gave its lease up on its own clock, every node of the
/// cluster re-registered under a new lease after such an outage, and the transactions
/// open meanwhile were finalized as if all their voters had failed (every replica of a
/// repository ended outdated in a fault run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_keep_their_leases_through_an_etcd_majority_outage_longer_than_the_ttl()
-> anyhow::Result<()> {
    let mut c = VoteCluster::start(3, 3).await?;
    let keys = c.store.keys();
    let mut before = Vec::new();
    for n in c.node_names() {
        let e = c.store.get(&keys.node(&n)).await?.expect("registered");
        before.push(e.lease);
    }
    c.etcd.stop(1)?;
    c.etcd.stop(2)?;
    // Twice the nodes' 3 s lease, with no leader to renew it with.
    tokio::time::sleep(Duration::from_secs(6)).await;
    c.etcd.restart(1)?;
    c.etcd.restart(2)?;
    c.etcd.wait_healthy(Duration::from_secs(20)).await?;
    let sockets: Vec<_> = c.nodes.iter().map(|n| n.socket.clone()).collect();
    wait_until(
        "every node reports its lease held again",
        Duration::from_secs(15),
        || {
            let sockets = sockets.clone();
            async move {
                sockets.iter().all(|s| {
                    votingd::client::status(s)
                        .map(|s| s.lease.held)
                        .unwrap_or(false)
                })
            }
        },
    )
    .await?;
    for (n, lease) in c.node_names().iter().zip(before) {
        let e = c.store.get(&keys.node(n)).await?.expect("registered");
        assert_eq!(e.lease, lease, "{n} registered under a new lease");
    }
    Ok(())
}

/// A router that saw a voter's call fail reports it failed at once; that voter may have
/// applied an update it had no time to confirm, so where nobody confirmed a key a
/// majority voted for, it is marked outdated (a voter that reported done itself, with
/// no confirmation, did not apply it: see
/// `a_majority_of_votes_that_no_replica_applied_does_not_advance_the_repository`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn voters_reported_failed_by_a_router_that_voted_for_an_unconfirmed_update_are_outdated()
-> anyhow::Result<()> {
    let c = VoteCluster::start(3, 1).await?;
    let repo = c.create_repo("suspect.git").await?;
    let tx = c.begin(&repo).await?;
    two_equal_votes(&c, &tx.id, "00112233445566778899aabbccddeeff.0").await?;
    // Their calls broke before they confirmed: the router reports both failed; node3
    // never started.
    for n in c.node_names() {
        c.store
            .fail_voter(&tx.id, &n, "router1", "Unknown: transport error")
            .await?;
    }
    let outcome = c.finalize(&tx).await?;
    assert!(!outcome.committed && !outcome.acknowledged, "{outcome:?}");
    assert_eq!(outcome.outdated, ["node1", "node2"], "{outcome:?}");
    let r = replica(&c, &repo, "node3").await;
    assert_eq!((r.state, r.generation), (ReplicaState::UpToDate, 0));
    for n in ["node1", "node2"] {
        assert_eq!(
            replica(&c, &repo, n).await.state,
            ReplicaState::Outdated,
            "{n}"
        );
    }
    Ok(())
}

/// node1 and node2 start in `tx` and vote the same hash on `key`: a majority of three,
/// so the key commits; nobody confirms applying it.
async fn two_equal_votes(c: &VoteCluster, tx: &str, key: &str) -> anyhow::Result<()> {
    let vote = refvote_cluster::records::VoteRecord {
        hash: "ab".repeat(32),
        ref_count: 1,
        first_ref: "refs/heads/main".into(),
    };
    for n in ["node1", "node2"] {
        c.store.start_voter(tx, n).await?;
    }
    let (a, b) = tokio::join!(
        c.store
            .cast_vote(tx, "node1", key, &vote, Duration::from_secs(5)),
        c.store
            .cast_vote(tx, "node2", key, &vote, Duration::from_secs(5)),
    );
    anyhow::ensure!(
        a?.0.is_commit() && b?.0.is_commit(),
        "two equal votes of three are a majority"
    );
    Ok(())
}
