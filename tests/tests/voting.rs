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
