//! The router's read path and its forwarding under faults, against a real etcd, three
//! real votingd nodes, real git and real routers (processes, and one in-process router
//! whose counters the test reads):
//!
//! - reads: concurrent reads share etcd round trips; a replica marked outdated in etcd
//!   is never chosen by the next read; with etcd stopped a read fails UNAVAILABLE within
//!   a bound, or is served from the watched view when `allow_stale_reads` is set;
//! - forwarding: a voter SIGSTOPped mid-push is dropped and the push succeeds on the
//!   other two; a client that breaks its push stream leaves nothing half-written and the
//!   router keeps serving; unary, client-, server- and bidi-streaming calls come back
//!   with the node's status unchanged; an answer over gRPC's default 4 MiB passes;
//!   a router SIGKILLed mid-push leaves the update on a majority of up-to-date replicas
//!   and visible, or nowhere visible.

use anyhow::Context;
use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use refvote_cluster::records::{ReplicaRecord, ReplicaState};
use refvote_cluster::store::encode;
use refvote_cluster::{RepoId, Store};
use refvote_launcher::config::RouterSpec;
use refvote_proto::gitaly::commit_service_client::CommitServiceClient;
use refvote_proto::gitaly::ref_service_client::RefServiceClient;
use refvote_proto::gitaly::smart_http_service_client::SmartHttpServiceClient;
use refvote_proto::gitaly::update_references_request::Update;
use refvote_proto::gitaly::{
    FindCommitRequest, FindDefaultBranchNameRequest, ListRefsRequest, PostReceivePackRequest,
    PostUploadPackRequest, RefExistsRequest, UpdateReferencesRequest,
};
use refvote_router::RouterServer;
use refvote_tests::cluster::{Fixture, VoteCluster};
use refvote_tests::git;
use refvote_tests::grpc::repo;
use refvote_tests::proc::wait_until;
use refvote_tests::router::{Router, RouterOptions};
use tonic::Code;
use tonic::transport::Channel;

async fn ref_exists(ch: &Channel, relative: &str, name: &str) -> Result<bool, tonic::Status> {
    Ok(RefServiceClient::new(ch.clone())
        .ref_exists(RefExistsRequest {
            repository: repo(relative),
            r#ref: name.as_bytes().to_vec(),
        })
        .await?
        .into_inner()
        .value)
}

async fn channel(url: String) -> anyhow::Result<Channel> {
    Ok(Channel::from_shared(url)?
        .tcp_nodelay(true)
        .connect()
        .await?)
}

/// A router in this process, so the test can read its counters: the launcher's
/// config, as a router process gets it.
async fn in_process_router(c: &VoteCluster) -> anyhow::Result<RouterServer> {
    let spec = RouterSpec {
        name: "inproc".into(),
        home: c.path("inproc"),
        listen: "127.0.0.1:0".parse()?,
        http: None,
        etcd: c.etcd.endpoints(),
        lease_ttl_secs: 3,
    };
    let mut config = spec.config();
    config.etcd.request_timeout_ms = 1000;
    Ok(RouterServer::start(&config).await?)
}

async fn set_replica_state(
    store: &Store,
    id: &RepoId,
    node: &str,
    state: ReplicaState,
) -> anyhow::Result<()> {
    let key = store.keys().replica(id, node);
    let mut r: ReplicaRecord = store
        .get(&key)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no replica record {key}"))?
        .decode()?;
    r.state = state;
    let value = encode(&r);
    store
        .request(|mut cl| {
            let (key, value) = (key.clone(), value.clone());
            async move { cl.put(key, value, None).await }
        })
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reads_share_etcd_round_trips_and_never_miss_a_replica_change()
-> anyhow::Result<()> {
    let c = Fixture::nodes(3).seeded("p.git").start().await?;
    let id = c.repo_id("p.git");
    // A ref each node's replica alone has: a read that sees it went to that node.
    let main = git::rev(&c.node("node1").repo("p.git"), "refs/heads/main").unwrap();
    for n in &c.nodes {
        let name = format!("refs/heads/only-on-{}", n.name);
        git::git(&n.repo("p.git"), &["update-ref", &name, &main])?;
    }
    let router = in_process_router(&c).await?;
    let ch = channel(format!("http://{}", router.local_addr())).await?;
    assert!(ref_exists(&ch, "p.git", "refs/heads/main").await?);

    // N reads at once cost fewer than N etcd round trips, and each is answered.
    const N: u64 = 64;
    let before = router.read_stats();
    let reads = (0..N).map(|_| {
        let ch = ch.clone();
        async move { ref_exists(&ch, "p.git", "refs/heads/main").await }
    });
    for r in futures::future::join_all(reads).await {
        assert!(r?);
    }
    let after = router.read_stats();
    assert_eq!(after.reads - before.reads, N);
    let rounds = after.confirm_rounds - before.confirm_rounds;
    assert!(
        (1..N).contains(&rounds),
        "{N} concurrent reads made {rounds} etcd confirm rounds"
    );
    eprintln!("{N} concurrent reads: {rounds} confirm rounds");

    // A replica marked outdated in etcd is never chosen by the next read, though the
    // router's watch may not have delivered the change yet.
    for i in 0..6 {
        let node = &c.nodes[i % 3].name;
        let only = format!("refs/heads/only-on-{node}");
        set_replica_state(&c.store, &id, node, ReplicaState::Outdated).await?;
        for j in 0..3 {
            assert!(
                !ref_exists(&ch, "p.git", &only).await?,
                "round {i}, read {j} went to {node}, which etcd says is outdated"
            );
        }
        set_replica_state(&c.store, &id, node, ReplicaState::UpToDate).await?;
        // And once it is up to date again, reads use it again (round robin: within 3).
        let mut seen = false;
        for _ in 0..3 {
            seen |= ref_exists(&ch, "p.git", &only).await?;
        }
        assert!(seen, "round {i}: {node} up to date again but never read");
    }
    router.shutdown(Duration::from_secs(5)).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_etcd_stopped_reads_fail_unavailable_in_bounded_time_unless_stale_reads_are_allowed()
-> anyhow::Result<()> {
    let mut c = Fixture::nodes(3).seeded("p.git").start().await?;
    let strict = Router::start("strict", c.dir.path(), &c.etcd.endpoints()).await?;
    let stale = Router::start_with(
        "stale",
        c.dir.path(),
        &c.etcd.endpoints(),
        &RouterOptions::default().config(|c| {
            c.allow_stale_reads = true;
            c.max_stale_read_secs = 10;
        }),
    )
    .await?;
    let (strict_ch, stale_ch) = (strict.channel().await?, stale.channel().await?);
    assert!(ref_exists(&strict_ch, "p.git", "refs/heads/main").await?);
    assert!(ref_exists(&stale_ch, "p.git", "refs/heads/main").await?);

    c.etcd.stop(0)?;
    // The harness's routers use a 1 s etcd request timeout: a read waits at most for a
    // round already running plus its own.
    let bound = Duration::from_millis(2 * 1000 + 1500);
    let t = Instant::now();
    let err = ref_exists(&strict_ch, "p.git", "refs/heads/main")
        .await
        .unwrap_err();
    let took = t.elapsed();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("allow_stale_reads"), "{err:?}");
    assert!(took < bound, "the strict read failed after {took:?}");

    let t = Instant::now();
    assert!(
        ref_exists(&stale_ch, "p.git", "refs/heads/main").await?,
        "stale read\n{}",
        stale.log_tail(30)
    );
    assert!(t.elapsed() < bound, "the stale read took {:?}", t.elapsed());
    // Still refused strictly, again within the bound: the router keeps serving.
    let t = Instant::now();
    let err = ref_exists(&strict_ch, "p.git", "refs/heads/main")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(t.elapsed() < bound);

    // Past max_stale_read_secs the stale router refuses too.
    tokio::time::sleep(Duration::from_secs(11)).await;
    let err = ref_exists(&stale_ch, "p.git", "refs/heads/main")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");

    // etcd back: both serve fresh reads again, no restart.
    c.etcd.restart(0)?;
    c.etcd.wait_healthy(Duration::from_secs(20)).await?;
    for ch in [&strict_ch, &stale_ch] {
        let ch = ch.clone();
        wait_until("reads work again", Duration::from_secs(20), || {
            let ch = ch.clone();
            async move { matches!(ref_exists(&ch, "p.git", "refs/heads/main").await, Ok(true)) }
        })
        .await?;
    }
    Ok(())
}

/// Commits `size` bytes of incompressible data on `branch`.
fn big_commit(
    work: &git::WorkRepo,
    branch: &str,
    size: usize,
    seed: u64,
) -> anyhow::Result<String> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut data = Vec::with_capacity(size);
    while data.len() < size {
        // xorshift: cheap bytes zlib cannot shrink.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    git::git(&work.path, &["checkout", "--quiet", "-B", branch])?;
    std::fs::write(work.path.join(format!("big-{branch}.bin")), &data)?;
    git::git(&work.path, &["add", "-A"])?;
    git::git(&work.path, &["commit", "--quiet", "-m", branch])?;
    git::git(&work.path, &["rev-parse", "HEAD"])
}

/// The id of an open transaction of `id`, once one appears (polled every 2 ms).
async fn open_transaction(store: &Store, id: &RepoId, within: Duration) -> anyhow::Result<String> {
    let prefix = store.keys().txrepo(id);
    let deadline = Instant::now() + within;
    loop {
        let (entries, _) = store.get_prefix(&prefix).await?;
        if let Some(e) = entries.first() {
            return Ok(e.key.strip_prefix(&prefix).unwrap_or(&e.key).to_owned());
        }
        anyhow::ensure!(Instant::now() < deadline, "no transaction of {id} appeared");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Waits until `id` has no open transaction (finalized by its router or the reaper).
async fn settled(store: &Store, id: &RepoId, within: Duration) -> anyhow::Result<()> {
    let prefix = store.keys().txrepo(id);
    wait_until("every transaction finalized", within, || {
        let (store, prefix) = (store.clone(), prefix.clone());
        async move { matches!(store.get_prefix(&prefix).await, Ok((e, _)) if e.is_empty()) }
    })
    .await
}

/// The invariant after a push whose outcome the client may not know: the up-to-date
/// replicas agree on `branch`; if they have it, at least a majority of the assigned
/// replicas are up to date with it; a read through `ch` sees exactly that. Returns
/// whether the update is visible.
async fn majority_or_nowhere(
    c: &VoteCluster,
    id: &RepoId,
    relative: &str,
    branch: &str,
    ch: &Channel,
) -> anyhow::Result<bool> {
    let view = c.store.repo_view(id).await?;
    let up: Vec<String> = view
        .replicas
        .iter()
        .filter(|(_, (r, _))| r.is_up_to_date(&view.record))
        .map(|(n, _)| n.clone())
        .collect();
    let refname = format!("refs/heads/{branch}");
    let values: BTreeSet<Option<String>> = up
        .iter()
        .map(|n| git::rev(&c.node(n).repo(relative), &refname))
        .collect();
    assert_eq!(
        values.len(),
        1,
        "up-to-date replicas {up:?} disagree on {branch}: {values:?}; {view:?}"
    );
    let visible = values.iter().next().expect("one").is_some();
    if visible {
        assert!(
            up.len() >= view.record.threshold(),
            "{branch} is on only {up:?} of {:?}",
            view.record.assigned
        );
    }
    let read = ref_exists(ch, relative, &refname).await?;
    assert_eq!(read, visible, "a read through the router disagrees");
    Ok(visible)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_voter_paused_mid_push_is_dropped_and_the_push_succeeds_on_the_other_two()
-> anyhow::Result<()> {
    let mut c = Fixture::nodes(3).seeded("p.git").router().start().await?;
    let (router, id) = (&c.routers[0], c.repo_id("p.git"));
    let work = c.work("w")?;
    let new = big_commit(&work, "big", 8 << 20, 1)?;
    let url = router.http_url("p.git");
    let path = work.path.clone();
    let started = Instant::now();
    let push = tokio::spawn(async move { git::push(&path, Path::new(&url), &["big"], &[]).await });
    open_transaction(&c.store, &id, Duration::from_secs(20)).await?;
    c.nodes[2].pause()?;
    let out = match tokio::time::timeout(Duration::from_secs(60), push).await {
        Ok(out) => out??,
        Err(_) => {
            c.nodes[2].resume()?;
            anyhow::bail!(
                "the push hangs\nrouter:\n{}\nnode1:\n{}\nnode3:\n{}",
                router.log_tail(60),
                c.nodes[0].log_tail(30),
                c.nodes[2].log_tail(30)
            );
        }
    };
    let took = started.elapsed();
    c.nodes[2].resume()?;
    assert!(out.status.success(), "{out:?}\n{}", router.log_tail(40));
    assert!(took < Duration::from_secs(30), "the push took {took:?}");
    for n in ["node1", "node2"] {
        assert_eq!(
            git::rev(&c.node(n).repo("p.git"), "refs/heads/big").as_deref(),
            Some(new.as_str()),
            "{n}"
        );
    }
    let view = c.store.repo_view(&id).await?;
    assert_eq!(
        view.up_to_date_live()
            .into_iter()
            .filter(|n| n != "node3")
            .count(),
        2,
        "{view:?}"
    );
    let (r3, _) = &view.replicas["node3"];
    assert!(
        !r3.is_up_to_date(&view.record),
        "the paused replica was promoted: {view:?}"
    );
    // Reads never go to it.
    let ch = router.channel().await?;
    for i in 0..6 {
        assert!(
            ref_exists(&ch, "p.git", "refs/heads/big").await?,
            "read {i}"
        );
    }
    Ok(())
}

/// The body git sends to receive-pack to move `refname` from `old` to `new`.
fn receive_pack_body(work: &Path, old: &str, new: &str, refname: &str) -> anyhow::Result<Vec<u8>> {
    let line = format!("{old} {new} {refname}\0report-status\n");
    let mut body = format!("{:04x}{line}0000", line.len() + 4).into_bytes();
    let mut child = std::process::Command::new("git")
        .current_dir(work)
        .args(["pack-objects", "--stdout", "--revs", "--quiet"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("piped");
        writeln!(stdin, "{new}\n^{old}")?;
    }
    let out = child.wait_with_output()?;
    anyhow::ensure!(out.status.success(), "pack-objects failed");
    body.extend_from_slice(&out.stdout);
    Ok(body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_breaks_its_push_stream_leaves_nothing_and_the_router_keeps_serving()
-> anyhow::Result<()> {
    let c = Fixture::nodes(3).seeded("p.git").router().start().await?;
    let (router, id) = (&c.routers[0], c.repo_id("p.git"));
    let ch = router.channel().await?;
    let work = c.work("w")?;
    // The same work repository that pushed `main` to every replica.
    let old = git::git(&work.path, &["rev-parse", "main"])?;
    let new = big_commit(&work, "broken", 2 << 20, 2)?;
    let body = receive_pack_body(&work.path, &old, &new, "refs/heads/broken")?;
    // Half the body, then the stream stays open until the call is dropped.
    let half = body[..body.len() / 2].to_vec();
    let frames = futures::stream::iter(
        half.chunks(64 * 1024)
            .map(|ch| ch.to_vec())
            .collect::<Vec<_>>(),
    )
    .enumerate()
    .map(|(i, data)| PostReceivePackRequest {
        repository: if i == 0 { repo("p.git") } else { None },
        data,
        gl_id: "user-1".into(),
        ..Default::default()
    });
    use futures::StreamExt;
    let frames = frames.chain(futures::stream::pending());
    let mut client = SmartHttpServiceClient::new(ch.clone());
    let call = tokio::spawn(async move { client.post_receive_pack(frames).await });
    open_transaction(&c.store, &id, Duration::from_secs(20)).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    call.abort();
    let _ = call.await;

    settled(&c.store, &id, Duration::from_secs(40)).await?;
    for n in &c.nodes {
        assert_eq!(
            git::rev(&n.repo("p.git"), "refs/heads/broken"),
            None,
            "{} has the half-sent push",
            n.name
        );
    }
    assert!(!majority_or_nowhere(&c, &id, "p.git", "broken", &ch).await?);
    let view = c.store.repo_view(&id).await?;
    assert_eq!(view.up_to_date_live(), c.node_names(), "{view:?}");

    // The router keeps serving: a whole push of the same update goes through.
    let out = git::push(
        &work.path,
        Path::new(&router.http_url("p.git")),
        &["broken"],
        &[],
    )
    .await?;
    assert!(out.status.success(), "{out:?}\n{}", router.log_tail(40));
    assert!(ref_exists(&ch, "p.git", "refs/heads/broken").await?);
    Ok(())
}

/// A call's outcome as a client sees it: the answer, or the code and message.
fn outcome<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> String {
    match r {
        Ok(v) => format!("ok {v:?}"),
        Err(s) => format!("{:?}: {}", s.code(), s.message()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_kind_passes_through_with_the_nodes_status_unchanged() -> anyhow::Result<()> {
    let c = Fixture::nodes(3).seeded("p.git").start().await?;
    // A commit whose subject alone is over gRPC's default 4 MiB message limit.
    let work = c.work("w")?;
    git::git(&work.path, &["checkout", "--quiet", "main"])?;
    let subject = "s".repeat(5 << 20);
    std::fs::write(work.path.join("msg"), &subject)?;
    git::git(
        &work.path,
        &["commit", "--quiet", "--allow-empty", "-F", "msg"],
    )?;
    for n in &c.nodes {
        let out = git::push(&work.path, &n.repo("p.git"), &["main:huge"], &[]).await?;
        anyhow::ensure!(out.status.success(), "{out:?}");
    }
    let router = Router::start("router1", c.dir.path(), &c.etcd.endpoints()).await?;
    let via = router.channel().await?;
    let direct = channel(c.node("node1").grpc_url()).await?;

    let mut compared = 0;
    // Unary: an answer and a node's refusal.
    let unary = |ch: Channel, name: &'static str| async move {
        outcome(
            RefServiceClient::new(ch)
                .ref_exists(RefExistsRequest {
                    repository: repo("p.git"),
                    r#ref: name.as_bytes().to_vec(),
                })
                .await
                .map(|r| r.into_inner()),
        )
    };
    for name in ["refs/heads/main", "refs/heads/nope", "not-a-ref"] {
        let (a, b) = (
            unary(via.clone(), name).await,
            unary(direct.clone(), name).await,
        );
        assert_eq!(a, b, "RefExists {name}");
        compared += 1;
    }
    assert!(
        unary(via.clone(), "not-a-ref")
            .await
            .starts_with("InvalidArgument")
    );
    let default = RefServiceClient::new(via.clone())
        .find_default_branch_name(FindDefaultBranchNameRequest {
            repository: repo("p.git"),
            head_only: false,
        })
        .await?
        .into_inner();
    assert_eq!(default.name, b"refs/heads/main");

    // Server streaming: every frame, and a refusal.
    let list = |ch: Channel, patterns: Vec<Vec<u8>>| async move {
        let r = RefServiceClient::new(ch)
            .list_refs(ListRefsRequest {
                repository: repo("p.git"),
                patterns,
                ..Default::default()
            })
            .await;
        match r {
            Ok(s) => {
                let mut s = s.into_inner();
                let mut all = Vec::new();
                loop {
                    match s.message().await {
                        Ok(Some(m)) => all.push(format!("{m:?}")),
                        Ok(None) => break,
                        Err(e) => {
                            all.push(outcome::<()>(Err(e)));
                            break;
                        }
                    }
                }
                all.join("\n")
            }
            Err(e) => outcome::<()>(Err(e)),
        }
    };
    for patterns in [vec![b"refs/heads/".to_vec()], vec![]] {
        let (a, b) = (
            list(via.clone(), patterns.clone()).await,
            list(direct.clone(), patterns.clone()).await,
        );
        assert_eq!(a, b, "ListRefs {patterns:?}");
        compared += 1;
    }
    let heads = list(via.clone(), vec![b"refs/heads/".to_vec()]).await;
    assert!(
        heads.contains("references") && !heads.contains("InvalidArgument"),
        "{heads}"
    );

    // Bidi streaming (an accessor): git's own refusal of a bad request.
    let upload = |ch: Channel| async move {
        let req = PostUploadPackRequest {
            repository: repo("p.git"),
            data: b"0010garbage-line0000".to_vec(),
            ..Default::default()
        };
        let r = SmartHttpServiceClient::new(ch)
            .post_upload_pack(futures::stream::iter([req]))
            .await;
        match r {
            Ok(s) => {
                let mut s = s.into_inner();
                let mut all = Vec::new();
                loop {
                    match s.message().await {
                        Ok(Some(m)) => all.push(format!("{m:?}")),
                        Ok(None) => break,
                        Err(e) => {
                            all.push(outcome::<()>(Err(e)));
                            break;
                        }
                    }
                }
                all.join("\n")
            }
            Err(e) => outcome::<()>(Err(e)),
        }
    };
    let (a, b) = (upload(via.clone()).await, upload(direct.clone()).await);
    assert_eq!(a, b, "PostUploadPack");
    compared += 1;

    // Client streaming (a mutator, voted): a refusal every replica gives alike comes
    // back as the node gives it.
    let update = |ch: Channel| async move {
        let req = UpdateReferencesRequest {
            repository: repo("p.git"),
            updates: vec![Update {
                reference: b"not a ref".to_vec(),
                old_object_id: vec![],
                new_object_id: b"0".repeat(40),
            }],
        };
        outcome(
            RefServiceClient::new(ch)
                .update_references(futures::stream::iter([req]))
                .await
                .map(|r| r.into_inner()),
        )
    };
    let (a, b) = (update(via.clone()).await, update(direct.clone()).await);
    assert_eq!(a, b, "UpdateReferences");
    assert!(!a.starts_with("ok"), "{a}");
    compared += 1;

    // An answer over 4 MiB: passes whole to a client that accepts it...
    let find = |ch: Channel, limit: usize| async move {
        CommitServiceClient::new(ch)
            .max_decoding_message_size(limit)
            .find_commit(FindCommitRequest {
                repository: repo("p.git"),
                revision: b"huge".to_vec(),
                trailers: false,
            })
            .await
            .map(|r| r.into_inner())
    };
    let a = find(via.clone(), 64 << 20).await?;
    let b = find(direct.clone(), 64 << 20).await?;
    assert_eq!(
        a.commit.as_ref().map(|c| c.subject.len()),
        Some(subject.len())
    );
    assert_eq!(a, b);
    // ...and one that does not gets the client library's clear limit error.
    let err = find(via.clone(), 4 << 20).await.unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert!(err.message().contains("too large"), "{err:?}");
    // The router still serves.
    assert!(ref_exists(&via, "p.git", "refs/heads/main").await?);
    assert_eq!(compared, 7);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_killed_mid_push_leaves_the_update_on_a_majority_or_nowhere() -> anyhow::Result<()>
{
    kill_router_mid_push(&[1, 2]).await
}

/// Found by this suite under heavy load, rarely: a router killed right after it created
/// the transaction left a voter that had started but never reported done, and the
/// reaper waited for it (over 40 s seen). Two causes are closed: a node whose call was
/// dropped while its join was in flight now reports through the join's guard, and the
/// reaper no longer waits forever for a started voter of an abandoned transaction (it
/// reports it failed after `reaper::VOTER_GRACE`, which fences it; see the voting test
/// `the_reaper_gives_up_on_a_started_voter_that_never_reports`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_killed_right_after_creating_the_transaction_leaves_nothing() -> anyhow::Result<()>
{
    kill_router_mid_push(&[0]).await
}

/// Pushes through router1 and SIGKILLs it at each kill point in `points`; after the
/// reaper finalized, checks [`majority_or_nowhere`] through router2.
async fn kill_router_mid_push(points: &[usize]) -> anyhow::Result<()> {
    let mut c = Fixture::nodes(3).seeded("p.git").start().await?;
    let id = c.repo_id("p.git");
    let mut r1 = Router::start_with(
        "router1",
        c.dir.path(),
        &c.etcd.endpoints(),
        &RouterOptions::http(),
    )
    .await?;
    let r2 = Router::start("router2", c.dir.path(), &c.etcd.endpoints()).await?;
    let ch2 = r2.channel().await?;
    let work = c.work("w")?;
    // Kill points: (0) as soon as the transaction exists; (1) once a replica reported
    // done (git finished, its confirmations written); (2) with node3 paused from the
    // start, once node1 and node2 reported done, so the transaction is still open (it
    // waits for node3) when the router dies.
    const NAMES: [&str; 3] = ["created", "one replica done", "two done, third paused"];
    for &i in points {
        let point = NAMES[i];
        let branch = format!("k{i}");
        // Under git's 1 MiB http.postBuffer: one PostReceivePack, no probe request first.
        big_commit(&work, &branch, 256 << 10, 10 + i as u64)?;
        let (path, url, b) = (work.path.clone(), r1.http_url("p.git"), branch.clone());
        let push = tokio::spawn(async move { git::push(&path, Path::new(&url), &[&b], &[]).await });
        let tx = open_transaction(&c.store, &id, Duration::from_secs(20)).await?;
        let (prefix, wanted) = match i {
            0 => (String::new(), 0),
            1 => (c.store.keys().all_done(&tx), 1),
            _ => {
                c.nodes[2].pause()?;
                (c.store.keys().all_done(&tx), 2)
            }
        };
        let waited = Instant::now();
        let deadline = waited + Duration::from_secs(20);
        while wanted > 0
            && c.store.get_prefix(&prefix).await?.0.len() < wanted
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let waited = waited.elapsed();
        r1.kill()?;
        if i == 2 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            c.nodes[2].resume()?;
        }
        let out = push.await??;
        if let Err(e) = settled(&c.store, &id, Duration::from_secs(40)).await {
            let (keys, _) = c.store.get_prefix("/refvote/").await?;
            let keys: Vec<_> = keys.iter().map(|k| k.key.as_str()).collect();
            anyhow::bail!(
                "{e:#} (router killed at '{point}')\netcd: {keys:#?}\nnode1:\n{}\nnode2:\n{}\nnode3:\n{}\nrouter1:\n{}",
                c.nodes[0].log_tail(40),
                c.nodes[1].log_tail(40),
                c.nodes[2].log_tail(40),
                r1.log_tail(20)
            );
        }
        let seen = majority_or_nowhere(&c, &id, "p.git", &branch, &ch2).await?;
        eprintln!(
            "router killed at '{point}' ({waited:?} after the transaction appeared): push ok={}, update visible={seen}",
            out.status.success()
        );
        if out.status.success() {
            assert!(seen, "an acknowledged push is not visible");
        }
        if i == 2 {
            assert!(seen, "two replicas finished, yet the update is not visible");
        }
        r1.launch().await?;
    }
    // The reads through the second router went on throughout.
    assert!(ref_exists(&ch2, "p.git", "refs/heads/main").await?);
    Ok(())
}

/// Regression, found by the fault suite: a transaction whose finalize failed (etcd did
/// not answer) must still end while its router lives, or it blocks every repair and
/// admin lock of the repository. This router fails its first finalize on purpose
/// (`fail-finalize`); it keeps its lease, so the reaper never takes the transaction and
/// only the router's own retry can end it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_finalize_is_retried_until_the_transaction_ends() -> anyhow::Result<()> {
    use refvote_cluster::faults;
    let c = Fixture::nodes(3).seeded("p.git").start().await?;
    let id = c.repo_id("p.git");
    let mut router = Router::start_with(
        "router1",
        c.dir.path(),
        &c.etcd.endpoints(),
        &RouterOptions::http(),
    )
    .await?;
    router.stop()?;
    router.env = vec![(faults::ENV.into(), faults::FAIL_FINALIZE.into())];
    router.launch().await?;
    let url = router.http_url("p.git");
    let work = c.work("w")?;
    let first = work.commit("f", "one")?;
    let out = git::push(&work.path, Path::new(&url), &["f"], &[]).await?;
    assert!(
        !out.status.success(),
        "the client must not hear success: {out:?}"
    );
    settled(&c.store, &id, Duration::from_secs(15))
        .await
        .with_context(|| format!("router log:\n{}", router.log_tail(30)))?;
    let view = c.store.repo_view(&id).await?;
    assert_eq!(view.up_to_date_live().len(), 3, "{:?}", view.replicas);
    for n in &c.nodes {
        assert_eq!(
            git::rev(&n.repo("p.git"), "refs/heads/f").as_deref(),
            Some(first.as_str()),
            "{}",
            n.name
        );
    }
    let second = work.commit("f", "two")?;
    let out = git::push(&work.path, Path::new(&url), &["f"], &[]).await?;
    assert!(out.status.success(), "{out:?}");
    for n in &c.nodes {
        assert_eq!(
            git::rev(&n.repo("p.git"), "refs/heads/f").as_deref(),
            Some(second.as_str())
        );
    }
    Ok(())
}

/// An interactive push (SSHReceivePack, gitlab-shell's way) gets its ref advertisement
/// through the router before the vote, but never its report: with the first finalize
/// failing (`fail-finalize`), git sees no `ok` and fails, though the write committed
/// (and its transaction ends) on every replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interactive_push_whose_outcome_is_unknown_is_never_reported_done() -> anyhow::Result<()>
{
    use refvote_cluster::faults;
    let c = Fixture::nodes(3).seeded("p.git").start().await?;
    let id = c.repo_id("p.git");
    let mut router = Router::start_with(
        "router1",
        c.dir.path(),
        &c.etcd.endpoints(),
        &RouterOptions::http(),
    )
    .await?;
    router.stop()?;
    router.env = vec![(faults::ENV.into(), faults::FAIL_FINALIZE.into())];
    router.launch().await?;
    let work = c.work("w")?;
    let first = work.commit("f", "one")?;
    let env = vec![
        (
            "GIT_SSH_COMMAND".to_owned(),
            refvote_tests::node::bin("ssh-grpc").display().to_string(),
        ),
        ("GIT_SSH_VARIANT".to_owned(), "ssh".to_owned()),
        ("REFVOTE_SSH_TARGETS".to_owned(), router.grpc_url()),
    ];
    let push = git::push(
        &work.path,
        Path::new("ssh://gitlab-shell/p.git"),
        &["f"],
        &env,
    );
    let out = tokio::time::timeout(Duration::from_secs(120), push)
        .await
        .context("the SSH push never ended")??;
    let shown = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "the client must not hear success: {shown}"
    );
    assert!(shown.contains("outcome unknown"), "{shown}");
    // git printed no ref as pushed (porcelain: a tab, then `f:refs/heads/f`).
    assert!(!shown.contains("refs/heads/f:refs/heads/f\t"), "{shown}");
    settled(&c.store, &id, Duration::from_secs(15))
        .await
        .with_context(|| format!("router log:\n{}", router.log_tail(30)))?;
    for n in &c.nodes {
        assert_eq!(
            git::rev(&n.repo("p.git"), "refs/heads/f").as_deref(),
            Some(first.as_str()),
            "{}",
            n.name
        );
    }
    Ok(())
}
