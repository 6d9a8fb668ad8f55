//! The router's forwarding core against a real etcd, three real votingd nodes, real
//! git and a real `refvote-router` process: accessors answered through it from
//! up-to-date replicas only, spread over them, failed over from a dead node, and bad
//! calls refused with clear codes; writes voted on every replica through the router
//! by a real git client, refused at once without a quorum, and git's own refusal
//! passed back unchanged; repositories created through the router on the
//! least-loaded nodes; and two routers sharing nothing but etcd: read after write
//! across them, concurrent pushes to different branches all succeeding, and two
//! pushes to one branch with exactly one winner everywhere.

use std::collections::BTreeSet;

use refvote_cluster::RepoId;
use refvote_proto::gitaly::operation_service_client::OperationServiceClient;
use refvote_proto::gitaly::ref_service_client::RefServiceClient;
use refvote_proto::gitaly::repository_service_client::RepositoryServiceClient;
use refvote_proto::gitaly::smart_http_service_client::SmartHttpServiceClient;
use refvote_proto::gitaly::{
    CalculateChecksumRequest, CreateRepositoryFromBundleRequest, CreateRepositoryRequest,
    FindBranchRequest, FindDefaultBranchNameRequest, PostReceivePackRequest, RefExistsRequest,
    RepositoryExistsRequest, User, UserCreateBranchRequest,
};
use refvote_tests::cluster::{Fixture, VoteCluster};
use refvote_tests::git;
use refvote_tests::grpc::repo;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accessors_are_answered_through_the_router() -> anyhow::Result<()> {
    let c = Fixture::nodes(3)
        .seeded("group/p.git")
        .router()
        .start()
        .await?;
    let router = &c.routers[0];
    let ch = router.channel().await?;

    let exists = RepositoryServiceClient::new(ch.clone())
        .repository_exists(RepositoryExistsRequest {
            repository: repo("group/p.git"),
        })
        .await?
        .into_inner();
    assert!(exists.exists);
    let name = RefServiceClient::new(ch.clone())
        .find_default_branch_name(FindDefaultBranchNameRequest {
            repository: repo("group/p.git"),
            head_only: false,
        })
        .await?
        .into_inner()
        .name;
    assert_eq!(name, b"refs/heads/main");
    assert!(ref_exists(&ch, "group/p.git", "refs/heads/main").await?);
    assert!(!ref_exists(&ch, "group/p.git", "refs/heads/nope").await?);
    // A node's own error comes back with its code and message.
    let err = ref_exists(&ch, "group/p.git", "not-a-ref")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_calls_get_clear_codes_and_the_router_keeps_serving() -> anyhow::Result<()> {
    let c = Fixture::nodes(3).seeded("p.git").router().start().await?;
    let router = &c.routers[0];
    let ch = router.channel().await?;

    // A method refvote does not serve.
    let mut raw = tonic::client::Grpc::new(ch.clone());
    raw.ready().await?;
    let err = raw
        .unary::<_, RepositoryExistsRequest, _>(
            tonic::Request::new(RepositoryExistsRequest {
                repository: repo("p.git"),
            }),
            "/gitaly.NoSuchService/NoSuchMethod".parse()?,
            tonic_prost::ProstCodec::<_, RepositoryExistsRequest>::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");
    assert!(
        err.message().contains("/gitaly.NoSuchService/NoSuchMethod"),
        "{err:?}"
    );

    // A path leaving the storage never reaches etcd or a node.
    let err = RepositoryServiceClient::new(ch.clone())
        .repository_exists(RepositoryExistsRequest {
            repository: repo("../../etc/p.git"),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("leaves the storage"), "{err:?}");

    // No repository in the request at all.
    let err = RepositoryServiceClient::new(ch.clone())
        .repository_exists(RepositoryExistsRequest { repository: None })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("names no repository"), "{err:?}");

    // A repository etcd does not know.
    let err = RefServiceClient::new(ch.clone())
        .find_default_branch_name(FindDefaultBranchNameRequest {
            repository: repo("elsewhere.git"),
            head_only: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(err.message().contains("default/elsewhere.git"), "{err:?}");

    assert!(ref_exists(&ch, "p.git", "refs/heads/main").await?);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_spread_over_replicas_and_never_go_to_an_outdated_one() -> anyhow::Result<()> {
    let c = Fixture::nodes(3).seeded("p.git").router().start().await?;
    let router = &c.routers[0];
    let id = c.repo_id("p.git");
    let ch = router.channel().await?;
    // A ref only node1's replica has: a read that sees it went to node1.
    let main = git::rev(&c.node("node1").repo("p.git"), "refs/heads/main").unwrap();
    git::git(
        &c.node("node1").repo("p.git"),
        &["update-ref", "refs/heads/only-on-node1", &main],
    )?;
    let mut seen = BTreeSet::new();
    for _ in 0..6 {
        seen.insert(ref_exists(&ch, "p.git", "refs/heads/only-on-node1").await?);
    }
    // Round robin over three replicas: node1 answered some reads, the others the rest.
    assert_eq!(seen, BTreeSet::from([false, true]));

    c.store
        .mark_outdated(&id, "node1", "test: diverged")
        .await?;
    for i in 0..9 {
        assert!(
            !ref_exists(&ch, "p.git", "refs/heads/only-on-node1").await?,
            "read {i} went to the outdated replica"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_fails_over_from_a_dead_node_to_another_replica() -> anyhow::Result<()> {
    let mut c = Fixture::nodes(3).seeded("p.git").router().start().await?;
    let router = &c.routers[0];
    let ch = router.channel().await?;
    // Killed, its lease still counts it live for a few seconds: the router tries it,
    // gets UNAVAILABLE, and must answer from another replica.
    c.nodes[1].kill()?;
    for i in 0..6 {
        assert!(
            ref_exists(&ch, "p.git", "refs/heads/main").await?,
            "read {i}"
        );
    }
    let log = router.log_tail(200);
    assert!(
        log.contains("trying another"),
        "no read was retried:\n{log}"
    );
    Ok(())
}

#[test]
fn a_bad_config_exits_64_naming_the_key() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("router.toml");
    std::fs::write(&config, "listen_addr = \"nowhere\"\n")?;
    let out = std::process::Command::new(refvote_tests::node::bin("refvote-router"))
        .arg("--config")
        .arg(&config)
        .arg("--check-config")
        .output()?;
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("listen_addr"),
        "{out:?}"
    );
    std::fs::write(
        &config,
        "router_id = \"r1\"\nlisten_addr = \"127.0.0.1:0\"\n",
    )?;
    let out = std::process::Command::new(refvote_tests::node::bin("refvote-router"))
        .arg("--config")
        .arg(&config)
        .arg("--check-config")
        .output()?;
    assert!(out.status.success(), "{out:?}");
    Ok(())
}

/// Every replica's `main`, in node order.
fn mains(c: &VoteCluster, relative: &str) -> Vec<Option<String>> {
    c.nodes
        .iter()
        .map(|n| git::rev(&n.repo(relative), "refs/heads/main"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_git_push_through_the_router_commits_on_every_replica() -> anyhow::Result<()> {
    let c = Fixture::nodes(3)
        .seeded("group/p.git")
        .router()
        .start()
        .await?;
    let router = &c.routers[0];
    let id = c.repo_id("group/p.git");
    // The router's transactions hang on its lease, registered under routers/<id> (the
    // registration follows the lease grant; the router may listen a moment before).
    let key = c.store.keys().router("router1");
    refvote_tests::proc::wait_until(
        "router1 registered under its lease",
        std::time::Duration::from_secs(10),
        || {
            let (store, key) = (c.store.clone(), key.clone());
            async move { matches!(store.get(&key).await, Ok(Some(e)) if e.lease != 0) }
        },
    )
    .await?;
    let work = c.work("w")?;
    let new = work.commit("main", "second")?;

    let url = router.http_url("group/p.git");
    let out = git::push(&work.path, std::path::Path::new(&url), &["main"], &[]).await?;
    assert!(
        out.status.success(),
        "{out:?}\nrouter log:\n{}",
        router.log_tail(40)
    );
    assert_eq!(mains(&c, "group/p.git"), vec![Some(new.clone()); 3]);
    let view = c.store.repo_view(&id).await?;
    assert_eq!(view.record.generation, 1, "{view:?}");
    for (node, (replica, _)) in &view.replicas {
        assert_eq!(replica.generation, 1, "{node}: {replica:?}");
    }
    assert_eq!(view.up_to_date_live(), c.node_names());

    // A clone through the router sees the write.
    let clone = c.path("clone");
    git::git(
        c.dir.path(),
        &["clone", "--quiet", &url, clone.to_str().unwrap()],
    )?;
    assert_eq!(git::rev(&clone, "refs/remotes/origin/main"), Some(new));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_quorum_a_write_fails_fast_saying_how_many_are_up() -> anyhow::Result<()> {
    let mut c = Fixture::nodes(3).seeded("p.git").router().start().await?;
    let router = &c.routers[0];
    let id = c.repo_id("p.git");
    let before = mains(&c, "p.git");
    c.nodes[1].kill()?;
    c.nodes[2].kill()?;
    // Their leases would lapse within seconds; marking them outdated says the same now.
    for n in ["node2", "node3"] {
        c.store.mark_outdated(&id, n, "test: node killed").await?;
    }
    let ch = router.channel().await?;
    let started = std::time::Instant::now();
    let err = SmartHttpServiceClient::new(ch.clone())
        .post_receive_pack(futures::stream::iter([PostReceivePackRequest {
            repository: repo("p.git"),
            ..Default::default()
        }]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("1 of 3"), "{err:?}");
    assert!(err.message().contains("2 needed"), "{err:?}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    // Reads still work from the survivor, and nothing was written.
    assert!(ref_exists(&ch, "p.git", "refs/heads/main").await?);
    assert_eq!(c.store.repo_view(&id).await?.record.generation, 0);
    assert_eq!(
        git::rev(&c.nodes[0].repo("p.git"), "refs/heads/main"),
        before[0]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_git_rejects_comes_back_with_gits_reason_and_changes_nothing() -> anyhow::Result<()>
{
    let c = Fixture::nodes(3).seeded("p.git").router().start().await?;
    let router = &c.routers[0];
    let id = c.repo_id("p.git");
    // Every replica refuses non-fast-forward updates, as a protected branch would.
    for n in &c.nodes {
        git::git(
            &n.repo("p.git"),
            &["config", "receive.denyNonFastForwards", "true"],
        )?;
    }
    let before = mains(&c, "p.git");
    // A history that does not contain what the replicas have.
    let other = c.work("other")?;
    other.commit("main", "unrelated")?;
    let url = router.http_url("p.git");
    let out = git::push(
        &other.path,
        std::path::Path::new(&url),
        &["--force", "main"],
        &[],
    )
    .await?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("non-fast-forward"),
        "{said}\nrouter log:\n{}",
        router.log_tail(40)
    );
    assert_eq!(mains(&c, "p.git"), before);
    let view = c.store.repo_view(&id).await?;
    assert_eq!(view.record.generation, 0, "{view:?}");
    assert_eq!(view.up_to_date_live(), c.node_names());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_one_node_killed_a_push_succeeds_and_its_replica_is_outdated() -> anyhow::Result<()> {
    let mut c = Fixture::nodes(3).seeded("p.git").router().start().await?;
    let router = &c.routers[0];
    let id = c.repo_id("p.git");
    let work = c.work("w")?;
    let new = work.commit("main", "second")?;
    // Killed while its lease still counts it live: it is a voter whose call fails, and
    // the others must not wait on it beyond its lease.
    c.nodes[2].kill()?;
    let url = router.http_url("p.git");
    let started = std::time::Instant::now();
    let out = git::push(&work.path, std::path::Path::new(&url), &["main"], &[]).await?;
    assert!(
        out.status.success(),
        "{out:?}\nrouter log:\n{}",
        router.log_tail(40)
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    let m = mains(&c, "p.git");
    assert_eq!(m[..2], [Some(new.clone()), Some(new)]);
    let view = c.store.repo_view(&id).await?;
    assert_eq!(view.record.generation, 1, "{view:?}");
    assert_eq!(view.replicas["node1"].0.generation, 1);
    assert_eq!(view.replicas["node2"].0.generation, 1);
    assert!(
        !view.replicas["node3"].0.is_up_to_date(&view.record),
        "{view:?}"
    );
    Ok(())
}

/// A node killed with a long lease still counts as live, so it is a voter; its call
/// fails at once, and the push must not wait for its lease (or any fixed time) before
/// finishing on the other two. Before the router reported a failed call's voter done
/// at once, this push took the router's 10 s finalize wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_does_not_hold_up_a_push_while_its_lease_lasts() -> anyhow::Result<()> {
    let opts = refvote_tests::node::NodeOptions {
        lease_ttl_secs: 60,
        ..Default::default()
    };
    let mut c = Fixture::nodes(3)
        .node_options(opts)
        .seeded("p.git")
        .router()
        .start()
        .await?;
    let (router, id) = (&c.routers[0], c.repo_id("p.git"));
    let work = c.work("w")?;
    let url = router.http_url("p.git");
    c.nodes[2].kill()?;
    for round in 0..3 {
        let new = work.commit("main", &format!("after the kill {round}"))?;
        let started = std::time::Instant::now();
        let out = git::push(&work.path, std::path::Path::new(&url), &["main"], &[]).await?;
        let took = started.elapsed();
        assert!(
            out.status.success(),
            "{out:?}\nrouter log:\n{}",
            router.log_tail(40)
        );
        assert!(
            took < std::time::Duration::from_secs(5),
            "push {round} took {took:?}: it waited for the dead voter"
        );
        assert_eq!(mains(&c, "p.git")[..2], [Some(new.clone()), Some(new)]);
    }
    // The dead node's lease has not lapsed: nothing above waited for it.
    let registration = c.store.get(&c.store.keys().node("node3")).await?;
    assert!(registration.is_some(), "node3's lease lapsed already");
    let view = c.store.repo_view(&id).await?;
    assert_eq!(view.record.generation, 3, "{view:?}");
    for up in ["node1", "node2"] {
        assert!(view.replicas[up].0.is_up_to_date(&view.record), "{view:?}");
    }
    assert!(
        !view.replicas["node3"].0.is_up_to_date(&view.record),
        "{view:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unary_mutator_is_voted_and_a_refusal_alike_everywhere_comes_back_as_is()
-> anyhow::Result<()> {
    let c = Fixture::nodes(3).seeded("p.git").router().start().await?;
    let router = &c.routers[0];
    let id = c.repo_id("p.git");
    let ch = router.channel().await?;
    let mut ops = OperationServiceClient::new(ch.clone());
    let create = || UserCreateBranchRequest {
        repository: repo("p.git"),
        branch_name: b"feature".to_vec(),
        user: Some(User {
            gl_id: "user-1".into(),
            name: b"Jane Doe".to_vec(),
            email: b"jane@example.com".to_vec(),
            gl_username: "jane".into(),
            timezone: "UTC".into(),
        }),
        start_point: b"main".to_vec(),
    };
    let branch = ops.user_create_branch(create()).await?.into_inner().branch;
    assert_eq!(branch.map(|b| b.name), Some(b"feature".to_vec()));
    let main = mains(&c, "p.git")[0].clone();
    for n in &c.nodes {
        assert_eq!(git::rev(&n.repo("p.git"), "refs/heads/feature"), main);
    }
    assert_eq!(c.store.repo_view(&id).await?.record.generation, 1);

    // Every replica refuses the second create the same way: the client gets the
    // node's own code and message, and nothing changes.
    let err = ops.user_create_branch(create()).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let view = c.store.repo_view(&id).await?;
    assert_eq!(view.record.generation, 1);
    assert_eq!(view.up_to_date_live(), c.node_names());
    Ok(())
}

fn create_request(relative: &str) -> CreateRepositoryRequest {
    CreateRepositoryRequest {
        repository: repo(relative),
        default_branch: b"main".to_vec(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_repository_through_the_router_places_it_on_three_of_four_nodes()
-> anyhow::Result<()> {
    let c = Fixture::nodes(4).router().start().await?;
    let router = &c.routers[0];
    let ch = router.channel().await?;
    let mut repos = RepositoryServiceClient::new(ch.clone());
    repos.create_repository(create_request("a.git")).await?;
    let on = |relative: &str| -> Vec<String> {
        c.nodes
            .iter()
            .filter(|n| n.repo(relative).exists())
            .map(|n| n.name.clone())
            .collect()
    };
    // Every node is empty: ties by name.
    assert_eq!(on("a.git"), ["node1", "node2", "node3"]);
    let a = RepoId::new("default", "a.git")?;
    let view = c.store.repo_view(&a).await?;
    assert_eq!(view.record.assigned, ["node1", "node2", "node3"]);
    assert_eq!(view.up_to_date_live(), view.record.assigned);

    // The next one goes to the least loaded node first.
    repos.create_repository(create_request("b.git")).await?;
    assert_eq!(on("b.git"), ["node1", "node2", "node4"]);

    // Creating it again: ALREADY_EXISTS, and nothing changes.
    let err = repos
        .create_repository(create_request("a.git"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    assert_eq!(on("a.git"), ["node1", "node2", "node3"]);

    // A push and a clone through the router.
    let work = c.work("w")?;
    let new = work.commit("main", "first")?;
    let url = router.http_url("a.git");
    let out = git::push(&work.path, std::path::Path::new(&url), &["main"], &[]).await?;
    assert!(
        out.status.success(),
        "{out:?}\nrouter log:\n{}",
        router.log_tail(40)
    );
    for n in ["node1", "node2", "node3"] {
        assert_eq!(
            git::rev(&c.node(n).repo("a.git"), "refs/heads/main"),
            Some(new.clone()),
            "{n}"
        );
    }
    let view = c.store.repo_view(&a).await?;
    assert_eq!(view.up_to_date_live(), view.record.assigned, "{view:?}");
    let clone = c.path("clone");
    git::git(
        c.dir.path(),
        &["clone", "--quiet", &url, clone.to_str().unwrap()],
    )?;
    assert_eq!(git::rev(&clone, "refs/remotes/origin/main"), Some(new));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_repository_with_fewer_live_nodes_than_replicas_is_unavailable() -> anyhow::Result<()>
{
    let c = Fixture::nodes(2).router().start().await?;
    let router = &c.routers[0];
    let ch = router.channel().await?;
    let err = RepositoryServiceClient::new(ch)
        .create_repository(create_request("a.git"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("2 live nodes, 3 needed"), "{err:?}");
    let id = RepoId::new("default", "a.git")?;
    assert!(c.store.get(&c.store.keys().repo(&id)).await?.is_none());
    Ok(())
}

/// Every replica is up to date at the repository's generation, with one checksum, and
/// the same refs on disk.
async fn replicas_level(c: &VoteCluster, id: &RepoId, relative: &str) -> anyhow::Result<()> {
    let view = c.store.repo_view(id).await?;
    assert_eq!(view.up_to_date_live(), c.node_names(), "{view:?}");
    // A recorded checksum is empty when finalize could not vouch for it (another write
    // was in flight); the ones recorded must agree. The refs on disk are compared below.
    let sums: BTreeSet<_> = view
        .replicas
        .values()
        .map(|(r, _)| &r.checksum)
        .filter(|c| !c.is_empty())
        .collect();
    assert!(sums.len() <= 1, "{view:?}");
    let refs: BTreeSet<_> = c
        .nodes
        .iter()
        .map(|n| git::refs(&n.repo(relative)))
        .collect();
    assert_eq!(refs.len(), 1, "{refs:#?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_acknowledged_by_one_router_is_read_at_once_through_the_other() -> anyhow::Result<()>
{
    let c = Fixture::nodes(3)
        .seeded("p.git")
        .router()
        .router()
        .start()
        .await?;
    let [r1, r2] = [&c.routers[0], &c.routers[1]];
    let id = c.repo_id("p.git");
    let ch2 = r2.channel().await?;
    let work = c.work("w")?;
    let url = r1.http_url("p.git");
    for i in 0..5 {
        let branch = format!("b{i}");
        let new = work.commit(&branch, "x")?;
        let out = git::push(&work.path, std::path::Path::new(&url), &[&branch], &[]).await?;
        assert!(out.status.success(), "{out:?}\n{}", r1.log_tail(40));
        assert!(
            ref_exists(&ch2, "p.git", &format!("refs/heads/{branch}")).await?,
            "push {i} not seen through router2"
        );
        let found = RefServiceClient::new(ch2.clone())
            .find_branch(FindBranchRequest {
                repository: repo("p.git"),
                name: branch.as_bytes().to_vec(),
            })
            .await?
            .into_inner()
            .branch
            .and_then(|b| b.target_commit)
            .map(|c| c.id);
        assert_eq!(found, Some(new), "push {i}");
    }
    replicas_level(&c, &id, "p.git").await
}

const CONCURRENT_PUSHES: usize = 32;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pushes_to_different_branches_through_two_routers_all_succeed()
-> anyhow::Result<()> {
    let c = Fixture::nodes(3)
        .seeded("p.git")
        .router()
        .router()
        .start()
        .await?;
    let (routers, id) = (&c.routers, c.repo_id("p.git"));
    let work = c.work("w")?;
    let mut want = Vec::new();
    for i in 0..CONCURRENT_PUSHES {
        git::git(&work.path, &["checkout", "--quiet", "main"])?;
        let branch = format!("b{i}");
        want.push((branch.clone(), work.commit(&branch, "x")?));
    }
    let started = std::time::Instant::now();
    let pushes = want.iter().enumerate().map(|(i, (branch, _))| {
        let url = routers[i % 2].http_url("p.git");
        let work = work.path.clone();
        let branch = branch.clone();
        async move { git::push(&work, std::path::Path::new(&url), &[&branch], &[]).await }
    });
    let outs = futures::future::join_all(pushes).await;
    let took = started.elapsed();
    for (i, out) in outs.into_iter().enumerate() {
        let out = out?;
        assert!(
            out.status.success(),
            "push {i}: {out:?}\nrouter1:\n{}\nrouter2:\n{}",
            routers[0].log_tail(30),
            routers[1].log_tail(30)
        );
    }
    eprintln!("{CONCURRENT_PUSHES} concurrent pushes took {took:?}");
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
    replicas_level(&c, &id, "p.git").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_pushes_to_one_branch_through_two_routers_one_wins_everywhere()
-> anyhow::Result<()> {
    let c = Fixture::nodes(3)
        .seeded("p.git")
        .router()
        .router()
        .start()
        .await?;
    let (routers, id) = (&c.routers, c.repo_id("p.git"));
    // Both start from the replicas' main and add a different commit.
    let main = mains(&c, "p.git")[0].clone().unwrap();
    let mut works = Vec::new();
    let mut commits = Vec::new();
    for i in 0..2 {
        let w = c.work(&format!("w{i}"))?;
        let node1 = c.nodes[0].repo("p.git");
        git::git(
            &w.path,
            &["fetch", "--quiet", node1.to_str().unwrap(), "main"],
        )?;
        git::git(&w.path, &["reset", "--quiet", "--hard", "FETCH_HEAD"])?;
        commits.push(w.commit("main", &format!("writer {i}"))?);
        works.push(w);
    }
    let pushes = (0..2).map(|i| {
        let url = routers[i].http_url("p.git");
        let work = works[i].path.clone();
        async move { git::push(&work, std::path::Path::new(&url), &["main"], &[]).await }
    });
    let outs: Vec<_> = futures::future::join_all(pushes)
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    let ok: Vec<usize> = (0..2).filter(|&i| outs[i].status.success()).collect();
    assert_eq!(
        ok.len(),
        1,
        "{outs:#?}\nrouter1:\n{}\nrouter2:\n{}",
        routers[0].log_tail(40),
        routers[1].log_tail(40)
    );
    let (winner, loser) = (ok[0], 1 - ok[0]);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&outs[loser].stdout),
        String::from_utf8_lossy(&outs[loser].stderr)
    );
    eprintln!("the losing push said:\n{said}");
    assert!(
        said.contains("rejected") || said.contains("refvote"),
        "{said}"
    );
    assert_ne!(commits[winner], main);
    assert_eq!(mains(&c, "p.git"), vec![Some(commits[winner].clone()); 3]);
    replicas_level(&c, &id, "p.git").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_repository_from_bundle_through_the_router_lands_on_every_replica()
-> anyhow::Result<()> {
    let c = Fixture::nodes(3).router().start().await?;
    let router = &c.routers[0];
    let work = c.work("w")?;
    let main = work.commit("main", "first")?;
    let bundle = c.path("b.bundle");
    git::git(
        &work.path,
        &[
            "bundle",
            "create",
            "--quiet",
            bundle.to_str().unwrap(),
            "--all",
        ],
    )?;
    let data = std::fs::read(&bundle)?;
    // The bundle across several frames, the repository in the first only.
    let frames: Vec<_> = data
        .chunks(data.len().div_ceil(3))
        .enumerate()
        .map(|(i, chunk)| CreateRepositoryFromBundleRequest {
            repository: if i == 0 { repo("b.git") } else { None },
            data: chunk.to_vec(),
        })
        .collect();
    RepositoryServiceClient::new(router.channel().await?)
        .create_repository_from_bundle(futures::stream::iter(frames))
        .await?;
    assert_eq!(mains(&c, "b.git"), vec![Some(main); 3]);
    let id = RepoId::new("default", "b.git")?;
    // The repository's record keeps its checksum at creation, as a replica computes it.
    let node_sum = RepositoryServiceClient::new(refvote_tests::grpc::channel(&c.nodes[0]).await)
        .calculate_checksum(CalculateChecksumRequest {
            repository: repo("b.git"),
        })
        .await?
        .into_inner()
        .checksum;
    let view = c.store.repo_view(&id).await?;
    assert_eq!(view.record.creation_checksum, node_sum, "{view:?}");
    replicas_level(&c, &id, "b.git").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_creation_every_node_refuses_leaves_no_registration() -> anyhow::Result<()> {
    let c = Fixture::nodes(3).router().start().await?;
    let router = &c.routers[0];
    // On disk everywhere, unknown to etcd: every node refuses to create it.
    for n in &c.nodes {
        git::init_bare(&n.repo("orphan.git"), &n.hooks)?;
    }
    let started = std::time::Instant::now();
    let err = RepositoryServiceClient::new(router.channel().await?)
        .create_repository(create_request("orphan.git"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    // The nodes refuse inside the transaction, so finalize does not wait them out.
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    let id = RepoId::new("default", "orphan.git")?;
    assert!(
        c.store.get(&c.store.keys().repo(&id)).await?.is_none(),
        "{}",
        router.log_tail(30)
    );
    let (replicas, _) = c.store.get_prefix(&c.store.keys().replicas(&id)).await?;
    assert!(replicas.is_empty(), "{replicas:?}");

    // The same from a bundle.
    let work = c.work("w")?;
    work.commit("main", "first")?;
    let bundle = c.path("b.bundle");
    git::git(
        &work.path,
        &[
            "bundle",
            "create",
            "--quiet",
            bundle.to_str().unwrap(),
            "--all",
        ],
    )?;
    let started = std::time::Instant::now();
    let err = RepositoryServiceClient::new(router.channel().await?)
        .create_repository_from_bundle(futures::stream::iter([CreateRepositoryFromBundleRequest {
            repository: repo("orphan.git"),
            data: std::fs::read(&bundle)?,
        }]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert!(c.store.get(&c.store.keys().repo(&id)).await?.is_none());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_repository_created_through_two_routers_at_once_exists_once() -> anyhow::Result<()> {
    let c = Fixture::nodes(3).router().router().start().await?;
    let [r1, r2] = [&c.routers[0], &c.routers[1]];
    let mut a = RepositoryServiceClient::new(r1.channel().await?);
    let mut b = RepositoryServiceClient::new(r2.channel().await?);
    let (x, y) = tokio::join!(
        a.create_repository(create_request("p.git")),
        b.create_repository(create_request("p.git"))
    );
    let codes = [x.err().map(|e| e.code()), y.err().map(|e| e.code())];
    assert!(
        codes.contains(&None) && codes.contains(&Some(Code::AlreadyExists)),
        "{codes:?}"
    );
    let id = RepoId::new("default", "p.git")?;
    replicas_level(&c, &id, "p.git").await
}
