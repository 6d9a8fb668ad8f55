//! Repair against a real etcd, three real votingd nodes, real git and real
//! `refvote-router` processes: a killed node's replica falls behind while pushes go on,
//! and the routers' repair worker brings it back level soon after the node returns,
//! with pushes still running; with two nodes down writes fail fast and reads go on;
//! a copy made while a write moved the repository is never recorded as current; a
//! repair that keeps failing shows in `votingctl status`; a router reaps a
//! transaction whose creator died; a repair that loses etcd right after its copy does
//! not keep its claim once etcd is back; a replica that missed pushes fetches only
//! what it lacks (the bytes moved are asserted), and one whose objects were lost gets
//! the whole copy.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use refvote_cluster::RepoId;
use refvote_cluster::records::ReplicaState;
use refvote_cluster::repair::Finish;
use refvote_cluster::session::Session;
use refvote_cluster::tx::Begin;
use refvote_proto::gitaly::ref_service_client::RefServiceClient;
use refvote_proto::gitaly::repository_service_client::RepositoryServiceClient;
use refvote_proto::gitaly::smart_http_service_client::SmartHttpServiceClient;
use refvote_proto::gitaly::{CalculateChecksumRequest, PostReceivePackRequest, RefExistsRequest};
use refvote_tests::cluster::{Fixture, VoteCluster};
use refvote_tests::git;
use refvote_tests::grpc::{channel, repo};
use refvote_tests::node::{NodeOptions, bin};
use refvote_tests::proc::wait_until;
use refvote_tests::router::{Router, RouterOptions};
use tonic::Code;

/// Each node's CalculateChecksum of `relative`, asked of the node directly.
async fn checksums(c: &VoteCluster, relative: &str) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for n in &c.nodes {
        let sum = RepositoryServiceClient::new(channel(n).await)
            .calculate_checksum(CalculateChecksumRequest {
                repository: repo(relative),
            })
            .await?
            .into_inner()
            .checksum;
        out.push(sum);
    }
    Ok(out)
}

async fn up_to_date(c: &VoteCluster, id: &RepoId, node: &str) -> bool {
    match c.store.repo_view(id).await {
        Ok(v) => v
            .replicas
            .get(node)
            .is_some_and(|(r, _)| r.is_up_to_date(&v.record)),
        Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_is_repaired_automatically_while_pushes_continue() -> anyhow::Result<()> {
    let mut c = Fixture::nodes(3).seeded("p.git").router().start().await?;
    let (router, id) = (c.routers.remove(0), c.repo_id("p.git"));
    let url = router.http_url("p.git");
    let work = c.work("w")?;
    let stop = Arc::new(AtomicBool::new(false));
    let acked = std::cell::RefCell::new(Vec::<(String, String)>::new());

    // One client pushes a new branch after another the whole time.
    let pusher = async {
        let mut failures = Vec::new();
        let mut i = 0;
        while !stop.load(Ordering::Relaxed) && i < 400 {
            let branch = format!("p{i}");
            let commit = work.commit(&branch, "x")?;
            let t = Instant::now();
            let out = git::push(&work.path, std::path::Path::new(&url), &[&branch], &[]).await?;
            if out.status.success() {
                acked.borrow_mut().push((branch, commit));
            } else {
                failures.push(format!(
                    "{branch} after {:?}: {}",
                    t.elapsed(),
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            i += 1;
        }
        anyhow::Ok(failures)
    };
    let control = async {
        let result = async {
            let pushed = |n: usize| {
                let acked = &acked;
                async move { acked.borrow().len() >= n }
            };
            wait_until("2 pushes", Duration::from_secs(30), || pushed(2)).await?;
            c.nodes[2].kill()?;
            // Pushes go on without node3; its replica falls behind.
            wait_until("node3 outdated", Duration::from_secs(30), || async {
                !up_to_date(&c, &id, "node3").await
            })
            .await?;
            let n = acked.borrow().len();
            wait_until("3 more pushes", Duration::from_secs(30), || pushed(n + 3)).await?;
            c.nodes[2].launch().await?;
            let back = Instant::now();
            wait_until("node3 repaired", Duration::from_secs(10), || async {
                up_to_date(&c, &id, "node3").await
            })
            .await?;
            let repaired_in = back.elapsed();
            // Writes after the repair include node3 again.
            let n = acked.borrow().len();
            wait_until("2 more pushes", Duration::from_secs(30), || pushed(n + 2)).await?;
            anyhow::Ok(repaired_in)
        }
        .await;
        stop.store(true, Ordering::Relaxed);
        result
    };
    let (failures, repaired_in) = tokio::join!(pusher, control);
    let repaired_in = repaired_in.map_err(|e| e.context(router.log_tail(60)))?;
    let failures = failures?;
    eprintln!("node3 repaired {repaired_in:?} after it came back");
    assert!(
        failures.is_empty(),
        "pushes failed: {failures:#?}\nrouter log:\n{}",
        router.log_tail(60)
    );

    // Every acknowledged push is on every replica; all level and up to date.
    let acked = acked.into_inner();
    assert!(acked.len() >= 7, "{acked:?}");
    wait_until(
        "every replica up to date",
        Duration::from_secs(15),
        || async {
            c.store
                .repo_view(&id)
                .await
                .is_ok_and(|v| v.up_to_date_live().len() == 3)
        },
    )
    .await?;
    for n in &c.nodes {
        for (branch, commit) in &acked {
            assert_eq!(
                git::rev(&n.repo("p.git"), &format!("refs/heads/{branch}")).as_ref(),
                Some(commit),
                "{} lacks {branch}",
                n.name
            );
        }
    }
    let sums = checksums(&c, "p.git").await?;
    assert_eq!(sums.iter().collect::<BTreeSet<_>>().len(), 1, "{sums:?}");
    let view = c.store.repo_view(&id).await?;
    assert!(view.replicas["node3"].0.repair_epoch >= 1, "{view:?}");
    let (jobs, _) = c.store.get_prefix(&c.store.keys().repair_jobs()).await?;
    assert!(jobs.is_empty(), "{jobs:?}");
    // node3 kept its base: every copy, racing the pushes, was an incremental fetch.
    let repairs = repairs_in_log(&c.nodes[2]);
    assert!(
        !repairs.is_empty() && repairs.iter().all(|(mode, _)| mode == "fetch"),
        "{repairs:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_nodes_killed_writes_fail_fast_and_reads_go_on() -> anyhow::Result<()> {
    let mut c = Fixture::nodes(3).seeded("p.git").router().start().await?;
    let (router, id) = (&c.routers[0], c.repo_id("p.git"));
    c.nodes[1].kill()?;
    c.nodes[2].kill()?;
    // Once their leases lapse (3 s), nobody can count them live.
    wait_until("two leases lapse", Duration::from_secs(15), || async {
        c.store
            .repo_view(&id)
            .await
            .is_ok_and(|v| v.live_nodes.len() == 1)
    })
    .await?;
    let ch = router.channel().await?;
    let started = Instant::now();
    let err = SmartHttpServiceClient::new(ch.clone())
        .post_receive_pack(futures::stream::iter([PostReceivePackRequest {
            repository: repo("p.git"),
            ..Default::default()
        }]))
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("1 of 3 up, 2 needed"), "{err:?}");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    // The survivor is up to date: reads go on.
    let exists = RefServiceClient::new(ch)
        .ref_exists(RefExistsRequest {
            repository: repo("p.git"),
            r#ref: b"refs/heads/main".to_vec(),
        })
        .await?
        .into_inner()
        .value;
    assert!(exists);
    Ok(())
}

/// The etcd side alone (no router runs here): a copy planned at one generation is not
/// recorded once a write moved the repository, and a lock's fencing token is checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_overtaken_by_a_write_is_not_recorded_as_current() -> anyhow::Result<()> {
    let c = VoteCluster::start(3, 1).await?;
    let id = c.create_repo("p.git").await?;
    let lease = c.session.lease().expect("test lease");
    c.store.mark_outdated(&id, "node3", "test: behind").await?;
    let jobs = c.store.repair_jobs().await?;
    assert_eq!(jobs.len(), 1, "marking outdated queues a job: {jobs:?}");
    let mut plan = c.store.repair_plan(&id, "node3").await?;
    let mut second = plan.clone();
    let claim = c
        .store
        .claim_repair(&jobs[0], &mut plan, "test", lease)
        .await?
        .expect("claimed");
    assert_eq!(
        plan.target.as_ref().map(|(r, _)| r.state),
        Some(ReplicaState::Repairing)
    );
    assert!(
        c.store
            .claim_repair(&jobs[0], &mut second, "other", lease)
            .await?
            .is_none(),
        "a second claim must fail"
    );
    assert_eq!(plan.generation(), 0);
    assert_eq!(plan.sources("node3"), ["node1", "node2"]);

    // A write commits on node1 and node2 while "the copy runs".
    let work = c.work("w")?;
    work.commit("main", "new")?;
    let tx = c.begin(&id).await?;
    assert_eq!(tx.voters, ["node1", "node2"]);
    c.push_all(&tx, &work, &["main"]).await?;
    let outcome = c.finalize(&tx).await?;
    assert!(
        outcome.acknowledged && outcome.generation == 1,
        "{outcome:?}"
    );

    // The copy was made from generation 0: it must not be recorded.
    assert_eq!(
        c.store.finish_repair(&plan, &claim, "stale", None).await?,
        Finish::Moved
    );
    let view = c.store.repo_view(&id).await?;
    let (node3, _) = &view.replicas["node3"];
    assert_eq!(node3.state, ReplicaState::Repairing, "{view:?}");
    assert!(!node3.is_up_to_date(&view.record));
    assert_eq!(c.store.repair_jobs().await?.len(), 1, "the job stays");

    // Under a lock, a stale fencing token is refused too.
    let lock = c.store.lock_repo(&id, "test", "repair", lease).await?;
    let err = c.begin(&id).await.unwrap_err().to_string();
    assert!(err.contains("locked by repair"), "{err}");
    c.store.unlock(&lock).await?;
    let plan = c.store.repair_plan(&id, "node3").await?;
    assert_eq!(
        c.store
            .finish_repair(&plan, &claim, "x", Some(&lock))
            .await?,
        Finish::Moved,
        "an unlocked lock's token must not pass"
    );

    // Planned after the write, with nothing moving: recorded at generation 1.
    assert_eq!(
        c.store.finish_repair(&plan, &claim, "sum", None).await?,
        Finish::Done
    );
    let view = c.store.repo_view(&id).await?;
    let (node3, _) = &view.replicas["node3"];
    assert!(node3.is_up_to_date(&view.record), "{view:?}");
    assert_eq!((node3.generation, node3.checksum.as_str()), (1, "sum"));
    assert!(c.store.repair_jobs().await?.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repair_that_keeps_failing_shows_in_votingctl_status() -> anyhow::Result<()> {
    let c = VoteCluster::start(3, 1).await?;
    // Registered, but on disk nowhere: every copy fails at its source.
    let id = RepoId::new("default", "ghost.git")?;
    c.store.create_repository(&id, &c.node_names(), "").await?;
    c.store.mark_outdated(&id, "node3", "test: lost").await?;
    let router = Router::start("router1", c.dir.path(), &c.etcd.endpoints()).await?;
    let ctl = |json: bool| {
        let mut cmd = std::process::Command::new(bin("votingctl"));
        cmd.args(["status", "--socket"]).arg(&c.nodes[0].socket);
        if json {
            cmd.arg("--json");
        }
        cmd.output()
    };
    wait_until(
        "the repair failed twice",
        Duration::from_secs(20),
        || async {
            c.store
                .repair_jobs()
                .await
                .is_ok_and(|j| j.first().is_some_and(|j| j.job.attempts >= 2))
        },
    )
    .await
    .map_err(|e| e.context(router.log_tail(40)))?;
    let out = ctl(true)?;
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let jobs = doc["cluster"]["repair_jobs"]
        .as_array()
        .expect("jobs listed");
    assert_eq!(jobs.len(), 1, "{doc:#}");
    assert_eq!(jobs[0]["repo"], "default/ghost.git");
    assert_eq!(jobs[0]["node"], "node3");
    assert!(jobs[0]["attempts"].as_u64() >= Some(2), "{doc:#}");
    let error = jobs[0]["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("copy from node"), "{error}");
    let table = String::from_utf8(ctl(false)?.stdout)?;
    assert!(table.contains("repair jobs"), "{table}");
    assert!(table.contains("FAILING"), "{table}");
    assert!(table.contains("default/ghost.git on node3"), "{table}");
    // The router keeps serving meanwhile.
    let err = RefServiceClient::new(router.channel().await?)
        .ref_exists(RefExistsRequest {
            repository: repo("nope.git"),
            r#ref: b"refs/heads/main".to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    Ok(())
}

/// With every votingd's reaper off, a router finalizes a transaction whose creator's
/// lease expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_reaps_a_transaction_whose_creator_died() -> anyhow::Result<()> {
    let opts = NodeOptions {
        reaper: false,
        ..NodeOptions::default()
    };
    let c = VoteCluster::start_with(3, 1, opts).await?;
    let id = c.create_repo("p.git").await?;
    // A creator with a lease of its own that dies (is revoked) mid-transaction.
    let creator = Session::start(c.store.clone(), Duration::from_secs(3), |_| async {
        Ok(())
    });
    let lease = creator
        .wait_for_lease(Duration::from_secs(5))
        .await
        .expect("lease");
    let tx = c
        .store
        .begin(
            &id,
            &Begin {
                creator: "doomed".into(),
                lease,
            },
        )
        .await?;
    let work = c.work("w")?;
    work.commit("main", "x")?;
    c.push_all(&tx, &work, &["main"]).await?;
    creator.close().await;
    let router = Router::start("router1", c.dir.path(), &c.etcd.endpoints()).await?;
    wait_until("the router reaps it", Duration::from_secs(15), || async {
        c.store
            .get(&c.store.keys().tx_record(&tx.id))
            .await
            .is_ok_and(|e| e.is_none())
    })
    .await
    .map_err(|e| e.context(router.log_tail(40)))?;
    let role = c
        .store
        .get(&c.store.keys().reaper())
        .await?
        .expect("role held");
    assert_eq!(String::from_utf8_lossy(&role.value), "reaper:router1");
    // Every voter confirmed: the write is promoted on all three.
    let view = c.store.repo_view(&id).await?;
    assert_eq!(view.record.generation, 1, "{view:?}");
    assert_eq!(view.up_to_date_live().len(), 3, "{view:?}");
    Ok(())
}

/// Writes to a repository under an administrative lock wait for it (`lock_wait_ms`),
/// then fail UNAVAILABLE naming the operation; once it is released they go through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_wait_for_a_locked_repository_then_fail_saying_who_holds_it() -> anyhow::Result<()> {
    // A short wait for this test.
    let c = Fixture::nodes(3)
        .seeded("p.git")
        .router_with(RouterOptions::default().config(|c| c.lock_wait_ms = 1500))
        .start()
        .await?;
    let (router, id) = (&c.routers[0], c.repo_id("p.git"));
    let url = router.http_url("p.git");
    let work = c.work("w")?;
    git::git(
        &work.path,
        &["fetch", "--quiet", "--update-head-ok", &url, "main:main"],
    )?;
    let lease = c.session.lease().expect("test lease");

    let lock = c.store.lock_repo(&id, "test", "an-upgrade", lease).await?;
    let new = work.commit("main", "x")?;
    let t = Instant::now();
    let err = SmartHttpServiceClient::new(router.channel().await?)
        .post_receive_pack(futures::stream::iter([PostReceivePackRequest {
            repository: repo("p.git"),
            ..Default::default()
        }]))
        .await
        .unwrap_err();
    let took = t.elapsed();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message()
            .contains("repository default/p.git is locked by an-upgrade (test) since")
            && err.message().contains("retry later"),
        "{err:?}"
    );
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_secs(6),
        "took {took:?}"
    );

    // Released while a push waits: the push goes through.
    let push = git::push(&work.path, std::path::Path::new(&url), &["main"], &[]);
    let release = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        c.store.unlock(&lock).await
    };
    let (out, released) = tokio::join!(push, release);
    released?;
    let out = out?;
    assert!(out.status.success(), "{out:?}");
    for n in &c.nodes {
        assert_eq!(
            git::rev(&n.repo("p.git"), "refs/heads/main"),
            Some(new.clone())
        );
    }
    Ok(())
}

/// A transaction that began before its repository was removed and created again
/// changes nothing in the new one when it finalizes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finalize_does_not_resurrect_a_removed_repository() -> anyhow::Result<()> {
    let c = VoteCluster::start(3, 1).await?;
    let id = c.create_repo("p.git").await?;
    let tx = c.begin(&id).await?;
    let work = c.work("w")?;
    work.commit("main", "x")?;
    c.push_all(&tx, &work, &["main"]).await?;
    // Removed and registered again while the transaction is open.
    let old = c
        .store
        .get(&c.store.keys().repo(&id))
        .await?
        .expect("registered");
    assert!(
        c.store
            .unregister_repository(&id, old.create_revision)
            .await?
    );
    c.store
        .create_repository(&id, &c.node_names(), "fresh")
        .await?;
    let outcome = c.finalize(&tx).await?;
    assert!(!outcome.committed && !outcome.acknowledged, "{outcome:?}");
    let view = c.store.repo_view(&id).await?;
    assert_eq!(view.record.generation, 0, "{view:?}");
    assert_eq!(view.record.creation_checksum, "fresh");
    assert!(
        view.replicas
            .values()
            .all(|(r, _)| r.generation == 0 && r.checksum == "fresh"),
        "{view:?}"
    );
    Ok(())
}

/// A repair whose etcd writes fail right after its copy (the router cut off from etcd
/// for a moment, its lease living on) must not keep holding its claim: once etcd
/// answers again the failure is recorded, the claim released, and the job taken again
/// until the replica is level. (Giving up after one failed write left the claim, and
/// under the repair's lock every write refused, for as long as the router lived.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repair_that_loses_etcd_after_its_copy_is_taken_again() -> anyhow::Result<()> {
    use refvote_tests::faultnet::{Link, LinkState};
    use refvote_tests::hold::Hold;

    let relative = "cut.git";
    let mut c = Fixture::nodes(3).seeded(relative).start().await?;
    let id = c.repo_id(relative);
    let work = c.work("w")?;
    let etcd_addr = c.etcd.endpoints()[0]
        .trim_start_matches("http://")
        .parse()?;
    let link = Link::start("router1->etcd", etcd_addr).await?;
    let router = Router::start_with(
        "router1",
        c.dir.path(),
        &[format!("http://{}", link.addr())],
        &RouterOptions::http(),
    )
    .await?;

    // node3 misses a push: outdated, with a repair job nobody takes while it is down.
    c.nodes[2].stop()?;
    work.commit("next", "second")?;
    let out = git::push(
        &work.path,
        std::path::Path::new(&router.http_url(relative)),
        &["next"],
        &[],
    )
    .await?;
    anyhow::ensure!(out.status.success(), "{out:?}");
    anyhow::ensure!(!up_to_date(&c, &id, "node3").await);

    // node3 comes back; the router's repair holds in the middle of the copy.
    let hold = Hold::new(refvote_cluster::faults::MID_REPAIR, 1)?;
    c.nodes[2].env = hold.env();
    c.nodes[2].launch().await?;
    hold.wait_reached(Duration::from_secs(20)).await?;
    // The router loses etcd; the copy finishes, and recording it fails.
    link.set(LinkState::Reset);
    hold.release();
    let log = router.dir.join("router1.log");
    wait_until(
        "the router fails to record the repair",
        Duration::from_secs(15),
        || {
            let log = log.clone();
            async move {
                std::fs::read_to_string(&log)
                    .is_ok_and(|t| t.contains("cannot record the failed repair"))
            }
        },
    )
    .await?;
    // The release of the claim comes next; it fails within the router's etcd request
    // timeout (1 s), well inside its lease (3 s, renewed every second).
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    link.set(LinkState::Up);

    wait_until(
        "node3 is repaired by the same router",
        Duration::from_secs(20),
        || up_to_date(&c, &id, "node3"),
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e:#}\nrouter log:\n{}", router.log_tail(30)))?;
    let text = std::fs::read_to_string(&log)?;
    anyhow::ensure!(
        !text.contains("etcd lease lost"),
        "the router's lease lapsed during the cut, so its claim went with it and this \
         test proved nothing; the cut must be shorter"
    );
    assert_eq!(
        git::rev(&c.nodes[2].repo(relative), "refs/heads/next"),
        Some(git::rev(&work.path, "refs/heads/next").expect("work has next")),
    );
    Ok(())
}

/// Every replica outdated at the repository's generation, none left to copy from (what
/// an etcd outage leaves when late votes form a majority nobody confirmed): those whose
/// refs are still what their records' checksums say are recorded up to date without a
/// copy, and one changed on disk behind the cluster's back is then copied from them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_all_outdated_but_intact_are_restored_without_a_source() -> anyhow::Result<()> {
    let c = Fixture::nodes(3).seeded("p.git").router().start().await?;
    let (router, id) = (&c.routers[0], c.repo_id("p.git"));
    let work = c.work("w")?;
    work.commit("main", "one")?;
    let url = router.http_url("p.git");
    let out = git::push(&work.path, std::path::Path::new(&url), &["main"], &[]).await?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let view = c.store.repo_view(&id).await?;
    let generation = view.record.generation;
    let before = checksums(&c, "p.git").await?;
    for (node, (rep, _)) in &view.replicas {
        assert!(rep.is_up_to_date(&view.record), "{view:?}");
        assert!(
            !rep.checksum.is_empty(),
            "{node}: a lone write records its checksum"
        );
    }

    // node3's branch moves behind the cluster's back, then every replica is outdated.
    let node3 = c.node("node3").repo("p.git");
    let moved = std::process::Command::new("git")
        .arg("-C")
        .arg(&node3)
        .args(["update-ref", "refs/heads/main", "refs/heads/main~1"])
        .status()?;
    assert!(moved.success());
    assert_ne!(checksums(&c, "p.git").await?[2], before[2]);
    for node in c.node_names() {
        c.store
            .mark_outdated(&id, &node, "test: may hold an update no replica confirmed")
            .await?;
    }

    wait_until(
        "every replica up to date",
        Duration::from_secs(30),
        || async {
            let mut all = true;
            for node in c.node_names() {
                all &= up_to_date(&c, &id, &node).await;
            }
            all
        },
    )
    .await
    .map_err(|e| e.context(router.log_tail(40)))?;
    assert_eq!(checksums(&c, "p.git").await?, before, "node3 copied back");
    let view = c.store.repo_view(&id).await?;
    assert_eq!(view.record.generation, generation, "no write happened");
    let epochs: Vec<u64> = ["node1", "node2", "node3"]
        .iter()
        .map(|n| view.replicas[*n].0.repair_epoch)
        .collect();
    assert!(
        epochs.iter().all(|e| *e >= 1),
        "each was repaired: {epochs:?}"
    );
    assert!(c.store.repair_jobs().await?.is_empty());
    let log = router.log_tail(400);
    assert_eq!(
        log.matches("holds the repository's generation already")
            .count(),
        2,
        "node1 and node2 without a copy, node3 by one: {log}"
    );
    Ok(())
}

/// The repairs a node's log reports, oldest first: (`fetch` or `bundle`, bytes the
/// source sent).
fn repairs_in_log(node: &refvote_tests::node::Node) -> Vec<(String, u64)> {
    let field = |line: &str, name: &str| -> Option<String> {
        let rest = &line[line.find(&format!("{name}="))? + name.len() + 1..];
        let value: String = rest
            .trim_start_matches('"')
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .collect();
        Some(value)
    };
    // Without the terminal colours the log may carry.
    let plain = |line: &str| {
        let mut out = String::new();
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                for c in chars.by_ref() {
                    if c == 'm' {
                        break;
                    }
                }
            } else {
                out.push(c);
            }
        }
        out
    };
    node.log_tail(1_000_000)
        .lines()
        .map(plain)
        .filter_map(|l| {
            let l = l.as_str();
            let mode = field(l, "repair_mode")?;
            let bytes = field(l, "bytes_from_source")?.parse().ok()?;
            Some((mode, bytes))
        })
        .collect()
}

/// `size` bytes nobody can compress (xorshift), so a pack carrying them is that big.
fn noise(size: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..size)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The size of a pack holding what `tip` has and `base` lacks, as git makes it.
fn pack_size(work: &std::path::Path, base: &str, tip: &str) -> anyhow::Result<u64> {
    let out = std::process::Command::new("sh")
        .current_dir(work)
        .arg("-c")
        .arg(format!(
            "git rev-list --objects {base}..{tip} | git pack-objects --quiet --stdout | wc -c"
        ))
        .output()?;
    anyhow::ensure!(out.status.success(), "{out:?}");
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}

/// Pushes a commit holding `size` bytes of noise on `main` through `url`.
async fn push_noise(
    work: &git::WorkRepo,
    url: &str,
    size: usize,
    seed: u64,
) -> anyhow::Result<String> {
    git::git(&work.path, &["checkout", "--quiet", "main"])?;
    std::fs::write(
        work.path.join(format!("noise-{seed}.bin")),
        noise(size, seed),
    )?;
    git::git(&work.path, &["add", "-A"])?;
    git::git(&work.path, &["commit", "--quiet", "-m", "noise"])?;
    let out = git::push(&work.path, std::path::Path::new(url), &["main"], &[]).await?;
    anyhow::ensure!(out.status.success(), "{out:?}");
    git::git(&work.path, &["rev-parse", "HEAD"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_missed_pushes_fetches_only_what_it_lacks() -> anyhow::Result<()> {
    let c = Fixture::nodes(3).seeded("p.git").router().start().await?;
    let id = c.repo_id("p.git");
    let url = c.routers[0].http_url("p.git");
    let work = c.work("big")?;
    git::git(&work.path, &["fetch", "--quiet", &url, "main"])?;
    git::git(&work.path, &["reset", "--quiet", "--hard", "FETCH_HEAD"])?;
    // A repository of 8 MiB that cannot be compressed.
    let base = push_noise(&work, &url, 8 << 20, 1).await?;
    let mut c = c;
    c.nodes[2].kill()?;
    // Three small pushes node3 misses.
    let mut tip = base.clone();
    for i in 0..3 {
        tip = push_noise(&work, &url, 2000, 10 + i).await?;
    }
    wait_until("node3 outdated", Duration::from_secs(30), || async {
        !up_to_date(&c, &id, "node3").await
    })
    .await?;
    let missed = pack_size(&work.path, &base, &tip)?;
    let before = repairs_in_log(&c.nodes[2]).len();
    c.nodes[2].launch().await?;
    wait_until("node3 repaired", Duration::from_secs(30), || async {
        up_to_date(&c, &id, "node3").await
    })
    .await
    .map_err(|e| e.context(c.nodes[2].log_tail(40)))?;
    let repairs = repairs_in_log(&c.nodes[2]);
    let new = &repairs[before..];
    eprintln!("missed pushes' pack {missed} bytes; repairs {new:?}");
    assert_eq!(
        new.len(),
        1,
        "one repair: {new:?}\n{}",
        c.nodes[2].log_tail(40)
    );
    let (mode, bytes) = &new[0];
    assert_eq!(mode, "fetch", "{new:?}");
    // The advertisement (a few refs) and the missed objects; nowhere near the 8 MiB.
    assert!(
        *bytes >= missed / 2 && *bytes <= 3 * missed + 4096,
        "moved {bytes} bytes for a {missed}-byte pack of missed pushes"
    );
    assert_eq!(
        git::rev(&c.nodes[2].repo("p.git"), "refs/heads/main").as_deref(),
        Some(tip.as_str())
    );
    let sums = checksums(&c, "p.git").await?;
    assert_eq!(sums.iter().collect::<BTreeSet<_>>().len(), 1, "{sums:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_objects_were_lost_gets_the_whole_copy() -> anyhow::Result<()> {
    let mut c = Fixture::nodes(3).seeded("p.git").router().start().await?;
    let id = c.repo_id("p.git");
    let url = c.routers[0].http_url("p.git");
    let work = c.work("big")?;
    git::git(&work.path, &["fetch", "--quiet", &url, "main"])?;
    git::git(&work.path, &["reset", "--quiet", "--hard", "FETCH_HEAD"])?;
    push_noise(&work, &url, 1 << 20, 1).await?;
    c.nodes[2].kill()?;
    let tip = push_noise(&work, &url, 2000, 2).await?;
    // node3's objects are gone; its refs still name them.
    let objects = c.nodes[2].repo("p.git").join("objects");
    std::fs::remove_dir_all(&objects)?;
    std::fs::create_dir_all(objects.join("pack"))?;
    std::fs::create_dir_all(objects.join("info"))?;
    let before = repairs_in_log(&c.nodes[2]).len();
    c.nodes[2].launch().await?;
    wait_until("node3 repaired", Duration::from_secs(30), || async {
        up_to_date(&c, &id, "node3").await
    })
    .await
    .map_err(|e| e.context(c.nodes[2].log_tail(40)))?;
    let repairs = repairs_in_log(&c.nodes[2]);
    let new = &repairs[before..];
    eprintln!("repairs {new:?}");
    assert_eq!(
        new.len(),
        1,
        "one repair: {new:?}\n{}",
        c.nodes[2].log_tail(40)
    );
    assert_eq!(new[0].0, "bundle", "{new:?}");
    assert!(new[0].1 > 1 << 20, "the whole repository came: {new:?}");
    let repo = c.nodes[2].repo("p.git");
    assert_eq!(
        git::rev(&repo, "refs/heads/main").as_deref(),
        Some(tip.as_str())
    );
    git::git(&repo, &["fsck", "--connectivity-only", "--no-dangling"])?;
    let sums = checksums(&c, "p.git").await?;
    assert_eq!(sums.iter().collect::<BTreeSet<_>>().len(), 1, "{sums:?}");
    Ok(())
}
