//! refvote's admin service through a real `refvote-router` process, against a real
//! etcd, real votingd nodes and real git: a repository's replicas listed, removed,
//! added back (also while pushes run), synchronized after one diverged on disk, and
//! the repository removed and created again; bad input refused with clear codes.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use refvote_cluster::RepoId;
use refvote_proto::admin::admin_service_client::AdminServiceClient;
use refvote_proto::admin::{
    CreateRepositoryReplicasRequest, GetRepositoryReplicasRequest, RemoveRepositoryReplicasRequest,
    RemoveRepositoryRequest, RepositoryName, SynchronizeRepositoryReplicasRequest,
};
use refvote_proto::gitaly::ref_service_client::RefServiceClient;
use refvote_proto::gitaly::repository_service_client::RepositoryServiceClient;
use refvote_proto::gitaly::{CalculateChecksumRequest, RefExistsRequest};
use refvote_tests::cluster::Fixture;
use refvote_tests::git;
use refvote_tests::grpc::{channel, repo};
use refvote_tests::node::Node;
use refvote_tests::proc::wait_until;
use tonic::Code;
use tonic::transport::Channel;

fn name(relative: &str) -> Option<RepositoryName> {
    Some(RepositoryName {
        virtual_storage: "default".into(),
        relative_path: relative.into(),
    })
}

async fn node_checksum(node: &Node, relative: &str) -> anyhow::Result<String> {
    Ok(RepositoryServiceClient::new(channel(node).await)
        .calculate_checksum(CalculateChecksumRequest {
            repository: repo(relative),
        })
        .await?
        .into_inner()
        .checksum)
}

async fn get(
    admin: &Channel,
    relative: &str,
) -> Result<Vec<(String, bool, String)>, tonic::Status> {
    let r = AdminServiceClient::new(admin.clone())
        .get_repository_replicas(GetRepositoryReplicasRequest {
            repository: name(relative),
        })
        .await?
        .into_inner();
    Ok(r.replicas
        .into_iter()
        .map(|r| (r.node, r.up_to_date && r.live, r.checksum))
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_listed_removed_added_back_and_the_repository_removed_and_recreated()
-> anyhow::Result<()> {
    let c = Fixture::nodes(3).router().start().await?;
    let router = &c.routers[0];
    let ch = router.channel().await?;
    let mut admin = AdminServiceClient::new(ch.clone());
    c.create_and_push(router, "a.git").await?;

    // Listed, with the creation checksum (an empty repository's) recorded.
    let got = admin
        .get_repository_replicas(GetRepositoryReplicasRequest {
            repository: name("a.git"),
        })
        .await?
        .into_inner();
    assert_eq!(got.replication_factor, 3);
    assert_eq!(got.threshold, 2);
    assert_eq!(got.generation, 1, "{got:?}");
    assert_eq!(
        got.creation_checksum, "0000000000000000000000000000000000000000",
        "{got:?}"
    );
    assert!(got.locked_by.is_empty());
    let nodes: Vec<_> = got.replicas.iter().map(|r| r.node.as_str()).collect();
    assert_eq!(nodes, ["node1", "node2", "node3"]);
    assert!(
        got.replicas.iter().all(|r| r.up_to_date && r.live),
        "{got:?}"
    );

    // Bad input: clear codes, nothing changed.
    let err = admin
        .get_repository_replicas(GetRepositoryReplicasRequest {
            repository: name("nope.git"),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(
        err.message().contains("default/nope.git is not registered"),
        "{err:?}"
    );
    let err = admin
        .get_repository_replicas(GetRepositoryReplicasRequest {
            repository: name("../etc.git"),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = admin
        .synchronize_repository_replicas(SynchronizeRepositoryReplicasRequest {
            repository: name("nope.git"),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = admin
        .create_repository_replicas(CreateRepositoryReplicasRequest {
            repository: name("a.git"),
            replica_count: 0,
            nodes: vec!["node9".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(err.message().contains("node9"), "{err:?}");
    let err = admin
        .remove_repository_replicas(RemoveRepositoryReplicasRequest {
            repository: name("a.git"),
            nodes: vec!["node9".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    // Remove one replica: records first, then the copy on disk.
    let removed = admin
        .remove_repository_replicas(RemoveRepositoryReplicasRequest {
            repository: name("a.git"),
            nodes: vec!["node3".into()],
        })
        .await?
        .into_inner();
    assert_eq!(removed.removed, ["node3"]);
    assert!(removed.left_on_disk.is_empty());
    assert_eq!(removed.replicas.len(), 2, "{removed:?}");
    assert!(!c.nodes[2].repo("a.git").exists());
    // Below a write's threshold: refused, saying why.
    let err = admin
        .remove_repository_replicas(RemoveRepositoryReplicasRequest {
            repository: name("a.git"),
            nodes: vec!["node2".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("would leave 1 up to date")
            && err.message().contains("2 a write needs"),
        "{err:?}"
    );
    assert_eq!(get(&ch, "a.git").await?.len(), 2);
    // A write now needs both remaining replicas, and works.
    let work = c.work("w")?;
    git::git(
        &work.path,
        &[
            "fetch",
            "--quiet",
            "--update-head-ok",
            &router.http_url("a.git"),
            "main:main",
        ],
    )?;
    let second = work.commit("main", "second")?;
    let out = git::push(
        &work.path,
        std::path::Path::new(&router.http_url("a.git")),
        &["main"],
        &[],
    )
    .await?;
    assert!(out.status.success(), "{out:?}");

    // Added back on a named node: copied before it may vote, then level.
    let added = admin
        .create_repository_replicas(CreateRepositoryReplicasRequest {
            repository: name("a.git"),
            replica_count: 0,
            nodes: vec!["node3".into()],
        })
        .await?
        .into_inner();
    assert_eq!(added.added, ["node3"]);
    assert_eq!(
        git::rev(&c.nodes[2].repo("a.git"), "refs/heads/main"),
        Some(second.clone())
    );
    let replicas = get(&ch, "a.git").await?;
    assert_eq!(replicas.len(), 3);
    assert!(replicas.iter().all(|(_, ok, _)| *ok), "{replicas:?}");
    let err = admin
        .create_repository_replicas(CreateRepositoryReplicasRequest {
            repository: name("a.git"),
            replica_count: 0,
            nodes: vec!["node1".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    let err = admin
        .create_repository_replicas(CreateRepositoryReplicasRequest {
            repository: name("a.git"),
            replica_count: 4,
            nodes: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::FailedPrecondition,
        "only 3 nodes: {err:?}"
    );

    // Removed: reads get NOT_FOUND, the copies are gone, and it can be created again.
    let gone = admin
        .remove_repository(RemoveRepositoryRequest {
            repository: name("a.git"),
        })
        .await?
        .into_inner();
    assert_eq!(gone.removed_from.len(), 3, "{gone:?}");
    let err = RefServiceClient::new(ch.clone())
        .ref_exists(RefExistsRequest {
            repository: repo("a.git"),
            r#ref: b"refs/heads/main".to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    for n in &c.nodes {
        assert!(!n.repo("a.git").exists(), "{} still has it", n.name);
    }
    let id = RepoId::new("default", "a.git")?;
    let (left, _) = c.store.get_prefix(&c.store.keys().replicas(&id)).await?;
    assert!(left.is_empty(), "{left:?}");
    let err = admin
        .remove_repository(RemoveRepositoryRequest {
            repository: name("a.git"),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    c.create_and_push(router, "a.git").await?;
    assert_eq!(get(&ch, "a.git").await?.len(), 3);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_added_while_pushes_run_holds_every_acknowledged_push() -> anyhow::Result<()> {
    let c = Fixture::nodes(4).router().start().await?;
    let router = &c.routers[0];
    let ch = router.channel().await?;
    c.create_and_push(router, "p.git").await?;
    let url = router.http_url("p.git");
    let work = c.work("w")?;
    git::git(
        &work.path,
        &["fetch", "--quiet", "--update-head-ok", &url, "main:main"],
    )?;
    let stop = AtomicBool::new(false);
    let acked = std::cell::RefCell::new(Vec::<(String, String)>::new());
    let pusher = async {
        let mut failures = Vec::new();
        let mut i = 0;
        while !stop.load(Ordering::Relaxed) && i < 300 {
            git::git(&work.path, &["checkout", "--quiet", "main"])?;
            let branch = format!("b{i}");
            let commit = work.commit(&branch, "x")?;
            let out = git::push(&work.path, std::path::Path::new(&url), &[&branch], &[]).await?;
            if out.status.success() {
                acked.borrow_mut().push((branch, commit));
            } else {
                failures.push(String::from_utf8_lossy(&out.stderr).into_owned());
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
            wait_until("3 pushes", Duration::from_secs(30), || pushed(3)).await?;
            let t = Instant::now();
            let added = AdminServiceClient::new(ch.clone())
                .create_repository_replicas(CreateRepositoryReplicasRequest {
                    repository: name("p.git"),
                    replica_count: 4,
                    nodes: vec![],
                })
                .await?
                .into_inner();
            let took = t.elapsed();
            let n = acked.borrow().len();
            wait_until("3 more pushes", Duration::from_secs(30), || pushed(n + 3)).await?;
            anyhow::Ok((added, took))
        }
        .await;
        stop.store(true, Ordering::Relaxed);
        result
    };
    let (failures, added) = tokio::join!(pusher, control);
    let (added, took) = added.map_err(|e| e.context(router.log_tail(60)))?;
    eprintln!("the replica was added in {took:?}");
    assert_eq!(added.added, ["node4"]);
    assert!(
        failures?.is_empty(),
        "every push is acknowledged\n{}",
        router.log_tail(40)
    );
    let acked = acked.into_inner();
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
    let replicas = get(&ch, "p.git").await?;
    assert_eq!(replicas.len(), 4);
    assert!(replicas.iter().all(|(_, ok, _)| *ok), "{replicas:?}");
    let mut sums = BTreeSet::new();
    for n in &c.nodes {
        sums.insert(node_checksum(n, "p.git").await?);
    }
    assert_eq!(sums.len(), 1, "{sums:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synchronize_brings_a_replica_diverged_on_disk_back_to_the_majority() -> anyhow::Result<()>
{
    let c = Fixture::nodes(3).router().start().await?;
    let router = &c.routers[0];
    let ch = router.channel().await?;
    let (_, first) = c.create_and_push(router, "s.git").await?;
    let work = c.work("w")?;
    let url = router.http_url("s.git");
    git::git(
        &work.path,
        &["fetch", "--quiet", "--update-head-ok", &url, "main:main"],
    )?;
    let second = work.commit("main", "second")?;
    let out = git::push(&work.path, std::path::Path::new(&url), &["main"], &[]).await?;
    assert!(out.status.success(), "{out:?}");

    // node2's main goes back and it grows a branch nobody pushed, behind refvote's back.
    let diverged = c.nodes[1].repo("s.git");
    git::git(&diverged, &["update-ref", "refs/heads/main", &first])?;
    git::git(&diverged, &["update-ref", "refs/heads/stray", &first])?;
    let before = node_checksum(&c.nodes[1], "s.git").await?;
    assert_ne!(before, node_checksum(&c.nodes[0], "s.git").await?);

    let sync = AdminServiceClient::new(ch.clone())
        .synchronize_repository_replicas(SynchronizeRepositoryReplicasRequest {
            repository: name("s.git"),
        })
        .await?
        .into_inner();
    assert_eq!(sync.synchronized, ["node2"], "{sync:?}");
    assert_ne!(sync.source, "node2");
    assert_eq!(git::rev(&diverged, "refs/heads/main"), Some(second));
    assert_eq!(git::rev(&diverged, "refs/heads/stray"), None);
    let mut sums = BTreeSet::new();
    for n in &c.nodes {
        sums.insert(node_checksum(n, "s.git").await?);
    }
    assert_eq!(sums.len(), 1, "{sums:?}");
    // Recorded too: every replica up to date with that checksum.
    let replicas = get(&ch, "s.git").await?;
    assert!(
        replicas
            .iter()
            .all(|(_, ok, sum)| *ok && sums.contains(sum)),
        "{replicas:?}"
    );
    // Nothing left to do: a second run copies nothing.
    let again = AdminServiceClient::new(ch)
        .synchronize_repository_replicas(SynchronizeRepositoryReplicasRequest {
            repository: name("s.git"),
        })
        .await?
        .into_inner();
    assert!(again.synchronized.is_empty(), "{again:?}");
    Ok(())
}
