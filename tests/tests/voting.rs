//! The voting core against real etcd, real votingd processes and real git: the hook
//! votes every ref update of a push, and it commits only where a majority agrees.

use std::time::{Duration, Instant};

use refvote_cluster::records::{ReplicaRecord, ReplicaState};
use refvote_cluster::tx::Begin;
use refvote_tests::cluster::VoteCluster;
use refvote_tests::git::{self, rev};
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
