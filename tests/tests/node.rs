//! The node's Gitaly-compatible gRPC service against real votingd processes, real etcd
//! and real git: clients built from `proto/`, pushes and clones by a real git client
//! through the SmartHTTP RPCs, bad input, and cancelled calls.

use std::path::Path;
use std::time::Duration;

use refvote_cluster::RepoId;
use refvote_cluster::records::DoneRecord;
use refvote_proto::gitaly::ref_service_client::RefServiceClient;
use refvote_proto::gitaly::repository_service_client::RepositoryServiceClient;
use refvote_proto::gitaly::server_service_client::ServerServiceClient;
use refvote_proto::gitaly::smart_http_service_client::SmartHttpServiceClient;
use refvote_proto::gitaly::{
    CreateRepositoryRequest, FindDefaultBranchNameRequest, InfoRefsRequest, PostReceivePackRequest,
    PostUploadPackRequest, RefExistsRequest, RemoveRepositoryRequest, Repository,
    RepositoryExistsRequest, ServerInfoRequest,
};
use refvote_tests::cluster::VoteCluster;
use refvote_tests::git::{self, rev};
use refvote_tests::grpc::{channel, repo, with_tx};
use refvote_tests::node::{Node, NodeOptions};
use refvote_tests::proc::{wait_for, wait_until};
use refvote_tests::smarthttp::{GitHttpProxy, Target};
use tonic::Code;

/// Pids of processes whose command line mentions `needle` (e.g. a repository path).
fn processes_mentioning(needle: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
        })
        .collect()
}

fn private_tmp_is_empty(node: &Node) -> bool {
    std::fs::read_dir(node.storage.join("+refvote/tmp"))
        .map(|mut d| d.next().is_none())
        .unwrap_or(false)
}

/// Every object reachable from any ref, sorted: two repositories with equal sets hold
/// the same history.
fn objects(repo: &Path) -> String {
    let mut lines: Vec<String> = git::git(repo, &["rev-list", "--all", "--objects"])
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    lines.sort();
    lines.join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_info_and_health_describe_the_node() -> anyhow::Result<()> {
    let c = VoteCluster::start(1, 1).await?;
    let node = &c.nodes[0];
    let ch = channel(node).await;

    let info = ServerServiceClient::new(ch.clone())
        .server_info(ServerInfoRequest {})
        .await?
        .into_inner();
    assert!(info.git_version.starts_with("2."), "{info:?}");
    assert!(info.server_version.contains(env!("CARGO_PKG_VERSION")));
    assert_eq!(info.storage_statuses.len(), 1);
    let s = &info.storage_statuses[0];
    assert_eq!(s.storage_name, "default");
    assert!(s.readable && s.writeable, "{s:?}");
    assert!(
        !s.fs_type.is_empty() && !s.filesystem_id.is_empty(),
        "{s:?}"
    );
    // The id is stable across calls.
    let again = ServerServiceClient::new(ch.clone())
        .server_info(ServerInfoRequest {})
        .await?
        .into_inner();
    assert_eq!(again.storage_statuses[0].filesystem_id, s.filesystem_id);

    let mut health = tonic_health::pb::health_client::HealthClient::new(ch.clone());
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await?
        .into_inner();
    assert_eq!(status.status, serving);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "gitaly.ServerService".into(),
        })
        .await?
        .into_inner();
    assert_eq!(status.status, serving);

    // The error path: a storage whose directory vanished is reported, not hidden.
    let aside = c.path("storage-aside");
    std::fs::rename(&node.storage, &aside)?;
    let info = ServerServiceClient::new(ch.clone())
        .server_info(ServerInfoRequest {})
        .await?
        .into_inner();
    std::fs::rename(&aside, &node.storage)?;
    let s = &info.storage_statuses[0];
    assert!(!s.readable && !s.writeable, "{s:?}");

    // The node registered its gRPC address in etcd.
    let record = c
        .store
        .get(&c.store.keys().node(&node.name))
        .await?
        .expect("registered");
    let record: refvote_cluster::records::NodeRecord = record.decode()?;
    assert_eq!(record.address, format!("tcp://{}", node.grpc_addr()));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repositories_are_created_checked_and_removed() -> anyhow::Result<()> {
    let c = VoteCluster::start(1, 1).await?;
    let node = &c.nodes[0];
    let ch = channel(node).await;
    let mut repos = RepositoryServiceClient::new(ch.clone());
    let mut refs = RefServiceClient::new(ch.clone());

    let exists = |r: Option<Repository>| RepositoryExistsRequest { repository: r };
    assert!(
        !repos
            .repository_exists(exists(repo("g/p.git")))
            .await?
            .into_inner()
            .exists
    );
    repos
        .create_repository(CreateRepositoryRequest {
            repository: repo("g/p.git"),
            default_branch: b"dev".to_vec(),
            ..Default::default()
        })
        .await?;
    assert!(
        repos
            .repository_exists(exists(repo("g/p.git")))
            .await?
            .into_inner()
            .exists
    );
    let path = node.repo("g/p.git");
    assert_eq!(
        git::git(&path, &["config", "core.hooksPath"])?,
        node.hooks.display().to_string()
    );
    assert_eq!(
        git::git(&path, &["symbolic-ref", "HEAD"])?,
        "refs/heads/dev"
    );
    assert!(private_tmp_is_empty(node));

    // HEAD names a branch that does not exist yet: only head_only reports it.
    let name = refs
        .find_default_branch_name(FindDefaultBranchNameRequest {
            repository: repo("g/p.git"),
            head_only: true,
        })
        .await?
        .into_inner()
        .name;
    assert_eq!(name, b"refs/heads/dev");
    let name = refs
        .find_default_branch_name(FindDefaultBranchNameRequest {
            repository: repo("g/p.git"),
            head_only: false,
        })
        .await?
        .into_inner()
        .name;
    assert!(name.is_empty(), "{}", String::from_utf8_lossy(&name));
    let ref_exists = |r: &str| RefExistsRequest {
        repository: repo("g/p.git"),
        r#ref: r.as_bytes().to_vec(),
    };
    assert!(
        !refs
            .ref_exists(ref_exists("refs/heads/dev"))
            .await?
            .into_inner()
            .value
    );

    // Creating it again is refused and changes nothing.
    let e = repos
        .create_repository(CreateRepositoryRequest {
            repository: repo("g/p.git"),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    assert_eq!(
        git::git(&path, &["symbolic-ref", "HEAD"])?,
        "refs/heads/dev"
    );

    // A default branch git would refuse: nothing is created.
    let e = repos
        .create_repository(CreateRepositoryRequest {
            repository: repo("bad-branch.git"),
            default_branch: b"a..b".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(!node.repo("bad-branch.git").exists());

    repos
        .remove_repository(RemoveRepositoryRequest {
            repository: repo("g/p.git"),
        })
        .await?;
    assert!(!path.exists());
    assert!(
        !repos
            .repository_exists(exists(repo("g/p.git")))
            .await?
            .into_inner()
            .exists
    );
    assert!(private_tmp_is_empty(node));
    let e = repos
        .remove_repository(RemoveRepositoryRequest {
            repository: repo("g/p.git"),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_codes_and_touch_nothing() -> anyhow::Result<()> {
    let c = VoteCluster::start(1, 1).await?;
    let node = &c.nodes[0];
    let ch = channel(node).await;
    let mut repos = RepositoryServiceClient::new(ch.clone());
    let mut refs = RefServiceClient::new(ch.clone());
    let mut http = SmartHttpServiceClient::new(ch.clone());
    repos
        .create_repository(CreateRepositoryRequest {
            repository: repo("p.git"),
            ..Default::default()
        })
        .await?;
    // A symlink inside the storage that leads out of it.
    std::os::unix::fs::symlink(c.path(""), node.storage.join("escape"))?;
    let outside = c.path("outside.git");

    let bad_repos: Vec<(Option<Repository>, Code)> = vec![
        (None, Code::InvalidArgument),
        (repo("../outside.git"), Code::InvalidArgument),
        (repo("a/../../outside.git"), Code::InvalidArgument),
        (repo("/etc"), Code::InvalidArgument),
        (repo("escape/outside.git"), Code::InvalidArgument),
        (repo("+refvote/tmp/x.git"), Code::InvalidArgument),
        (
            Some(Repository {
                storage_name: "nope".into(),
                relative_path: "p.git".into(),
                ..Default::default()
            }),
            Code::NotFound,
        ),
    ];
    for (r, code) in &bad_repos {
        let e = repos
            .create_repository(CreateRepositoryRequest {
                repository: r.clone(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), *code, "create {r:?}: {e:?}");
        assert!(!e.message().is_empty());
        let e = repos
            .repository_exists(RepositoryExistsRequest {
                repository: r.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), *code, "exists {r:?}: {e:?}");
    }
    assert!(
        !outside.exists(),
        "a traversal created something outside the storage"
    );

    // A repository that does not exist.
    let e = refs
        .find_default_branch_name(FindDefaultBranchNameRequest {
            repository: repo("missing.git"),
            head_only: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("repository not found"), "{e:?}");
    let e = http
        .info_refs_upload_pack(InfoRefsRequest {
            repository: repo("missing.git"),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");

    // Malformed fields.
    let e = refs
        .ref_exists(RefExistsRequest {
            repository: repo("p.git"),
            r#ref: b"main".to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = http
        .info_refs_receive_pack(InfoRefsRequest {
            repository: repo("p.git"),
            git_config_options: vec!["core.hooksPath=/tmp/elsewhere".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("core.hooksPath"), "{e:?}");
    let e = http
        .info_refs_upload_pack(InfoRefsRequest {
            repository: repo("p.git"),
            git_protocol: "version=9; rm -rf /".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    // An empty request stream names no repository.
    let e = http
        .post_upload_pack(tokio_stream::iter(Vec::<PostUploadPackRequest>::new()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    // A transaction that does not exist cannot be joined; nothing runs.
    let e = http
        .post_receive_pack(with_tx(
            tokio_stream::iter(vec![PostReceivePackRequest {
                repository: repo("p.git"),
                data: b"0000".to_vec(),
                ..Default::default()
            }]),
            "no-such-tx",
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let e = http
        .post_receive_pack(with_tx(
            tokio_stream::iter(vec![PostReceivePackRequest {
                repository: repo("p.git"),
                ..Default::default()
            }]),
            "not a tx id",
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    // Still serving, and still nothing left behind.
    assert!(
        repos
            .repository_exists(RepositoryExistsRequest {
                repository: repo("p.git")
            })
            .await?
            .into_inner()
            .exists
    );
    assert!(private_tmp_is_empty(node));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_git_push_through_post_receive_pack_commits_on_all_three_and_clones_back()
-> anyhow::Result<()> {
    let c = VoteCluster::start(3, 1).await?;
    let relative = "group/project.git";
    for n in &c.nodes {
        RepositoryServiceClient::new(channel(n).await)
            .create_repository(CreateRepositoryRequest {
                repository: repo(relative),
                ..Default::default()
            })
            .await?;
    }
    let id = RepoId::new("default", relative)?;
    c.store.create_repository(&id, &c.node_names(), "").await?;
    let work = c.work("w")?;
    work.commit("main", "first")?;
    let head = work.commit("main", "second")?;
    work.commit("topic", "on a topic")?;

    let tx = c.begin(&id).await?;
    assert_eq!(tx.voters.len(), 3);
    let proxy = GitHttpProxy::start(
        c.nodes
            .iter()
            .map(|n| Target {
                url: n.grpc_url(),
                storage: "default".into(),
                transaction: Some(tx.id.clone()),
            })
            .collect(),
    )
    .await?;
    let url = proxy.url(relative);
    let out = tokio::process::Command::new("git")
        .current_dir(&work.path)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .args(["push", "--porcelain", &url, "main", "topic"])
        .output()
        .await?;
    assert!(
        out.status.success(),
        "push failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let outcome = c.finalize(&tx).await?;
    assert!(outcome.acknowledged && outcome.committed, "{outcome:?}");
    assert_eq!(outcome.promoted.len(), 3, "{outcome:?}");
    let topic = rev(&work.path, "refs/heads/topic").unwrap();
    for n in &c.nodes {
        assert_eq!(
            rev(&n.repo(relative), "refs/heads/main").as_deref(),
            Some(head.as_str())
        );
        assert_eq!(
            rev(&n.repo(relative), "refs/heads/topic").as_deref(),
            Some(topic.as_str())
        );
    }

    // The refs are visible through the RPCs too.
    let mut refs = RefServiceClient::new(channel(&c.nodes[1]).await);
    let exists = refs
        .ref_exists(RefExistsRequest {
            repository: repo(relative),
            r#ref: b"refs/heads/topic".to_vec(),
        })
        .await?
        .into_inner()
        .value;
    assert!(exists);
    let name = refs
        .find_default_branch_name(FindDefaultBranchNameRequest {
            repository: repo(relative),
            head_only: false,
        })
        .await?
        .into_inner()
        .name;
    assert_eq!(name, b"refs/heads/main");

    // Clone back from one replica through InfoRefsUploadPack + PostUploadPack, with
    // git's default protocol (v2) and with v0.
    let reader = GitHttpProxy::start(vec![Target {
        url: c.nodes[2].grpc_url(),
        storage: "default".into(),
        transaction: None,
    }])
    .await?;
    for (name, protocol) in [("clone-v2", "2"), ("clone-v0", "0")] {
        let dest = c.path(name);
        let out = tokio::process::Command::new("git")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .args(["-c", &format!("protocol.version={protocol}")])
            .args(["clone", "--bare", "--quiet", &reader.url(relative)])
            .arg(&dest)
            .output()
            .await?;
        assert!(
            out.status.success(),
            "{name} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            git::refs(&dest),
            git::refs(&c.nodes[2].repo(relative)),
            "{name}"
        );
        assert_eq!(objects(&dest), objects(&work.path), "{name}");
        git::git(&dest, &["fsck", "--strict"])?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_mid_stream_leaves_no_git_behind() -> anyhow::Result<()> {
    let c = VoteCluster::start(1, 1).await?;
    let node = &c.nodes[0];
    let relative = "cancel-me.git";
    let ch = channel(node).await;
    RepositoryServiceClient::new(ch.clone())
        .create_repository(CreateRepositoryRequest {
            repository: repo(relative),
            ..Default::default()
        })
        .await?;
    let needle = node.repo(relative).display().to_string();
    let id = RepoId::new("default", relative)?;
    c.store.create_repository(&id, &c.node_names(), "").await?;

    // A read: a clone of a repository larger than every buffer on the way, whose
    // client stops reading, so git blocks writing the pack; then the client goes away.
    let work = c.work("big")?;
    let mut noise = vec![0u8; 6 << 20];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut noise))?;
    std::fs::write(work.path.join("noise.bin"), &noise)?;
    let head = work.commit("main", "big")?;
    let out = git::push(&work.path, &node.repo(relative), &["main"], &[]).await?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want = format!("want {head} side-band-64k ofs-delta\n");
    let request = format!("{:04x}{want}00000009done\n", want.len() + 4);
    let url = node.grpc_url();
    let call = tokio::spawn({
        let url = url.clone();
        let request = request.clone();
        async move {
            // Its own connection, which goes away with this task.
            let mut http = SmartHttpServiceClient::connect(url).await.expect("connect");
            let responses = http
                .post_upload_pack(tokio_stream::iter(vec![PostUploadPackRequest {
                    repository: repo(relative),
                    data: request.into_bytes(),
                    ..Default::default()
                }]))
                .await?
                .into_inner();
            // Never read: backpressure reaches git.
            std::future::pending::<()>().await;
            drop(responses);
            Ok::<(), tonic::Status>(())
        }
    });
    wait_until("git upload-pack runs", Duration::from_secs(10), || async {
        !processes_mentioning(&needle).is_empty()
    })
    .await?;
    // git fills every buffer on the way and blocks writing its pipe.
    wait_until(
        "git blocks on a full pipe",
        Duration::from_secs(10),
        || async {
            processes_mentioning(&needle).iter().any(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/wchan"))
                    .is_ok_and(|w| w.contains("pipe_write"))
            })
        },
    )
    .await?;
    call.abort();
    wait_until(
        "git upload-pack is gone",
        Duration::from_secs(10),
        || async { processes_mentioning(&needle).is_empty() },
    )
    .await?;

    // A write inside a transaction: git is not killed, its input ends, it exits, and
    // the voter is recorded done (failed: the push never completed). The client sends
    // a whole command section (git starts only once it has one) and the start of a
    // pack, then goes away.
    let tx = c.begin(&id).await?;
    let (send, requests) = tokio::sync::mpsc::channel(1);
    let command = format!("{} {head} refs/heads/cut\0report-status\n", "0".repeat(40));
    let mut data = format!("{:04x}{command}0000", command.len() + 4).into_bytes();
    data.extend_from_slice(b"PACK\0\0\0\x02\0\0\0\x05");
    send.send(PostReceivePackRequest {
        repository: repo(relative),
        data,
        ..Default::default()
    })
    .await?;
    let call = tokio::spawn({
        let tx = tx.id.clone();
        async move {
            let mut http = SmartHttpServiceClient::connect(url).await.expect("connect");
            let mut responses = http
                .post_receive_pack(with_tx(
                    tokio_stream::wrappers::ReceiverStream::new(requests),
                    &tx,
                ))
                .await?
                .into_inner();
            responses.message().await
        }
    });
    wait_until("git receive-pack runs", Duration::from_secs(10), || async {
        !processes_mentioning(&needle).is_empty()
    })
    .await?;
    call.abort();
    drop(send);
    wait_until(
        "git receive-pack is gone",
        Duration::from_secs(10),
        || async { processes_mentioning(&needle).is_empty() },
    )
    .await?;
    let done_key = c.store.keys().done(&tx.id, &node.name);
    let done: DoneRecord = wait_for(
        "the voter is recorded done",
        Duration::from_secs(10),
        || {
            let store = c.store.clone();
            let key = done_key.clone();
            async move {
                match store.get(&key).await? {
                    Some(e) => Ok(e.decode()?),
                    None => anyhow::bail!("not yet"),
                }
            }
        },
    )
    .await?;
    assert!(!done.ok, "{done:?}");

    // The service keeps serving.
    let exists = RepositoryServiceClient::new(channel(node).await)
        .repository_exists(RepositoryExistsRequest {
            repository: repo(relative),
        })
        .await?
        .into_inner()
        .exists;
    assert!(exists);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_without_a_transaction_follow_require_transaction() -> anyhow::Result<()> {
    let c = VoteCluster::start_with(
        1,
        1,
        NodeOptions {
            require_transaction: true,
            ..NodeOptions::default()
        },
    )
    .await?;
    let node = &c.nodes[0];
    let ch = channel(node).await;
    let e = RepositoryServiceClient::new(ch.clone())
        .create_repository(CreateRepositoryRequest {
            repository: repo("p.git"),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("require_transaction"), "{e:?}");
    assert!(!node.repo("p.git").exists());

    // Inside a transaction the same call works and the voter is recorded done.
    git::init_bare(&node.repo("registered.git"), &node.hooks)?;
    let id = RepoId::new("default", "registered.git")?;
    c.store.create_repository(&id, &c.node_names(), "").await?;
    let tx = c.begin(&id).await?;
    RepositoryServiceClient::new(ch.clone())
        .create_repository(with_tx(
            CreateRepositoryRequest {
                repository: repo("p.git"),
                ..Default::default()
            },
            &tx.id,
        ))
        .await?;
    assert!(node.repo("p.git").join("HEAD").is_file());
    let done: DoneRecord = c
        .store
        .get(&c.store.keys().done(&tx.id, &node.name))
        .await?
        .expect("done recorded")
        .decode()?;
    assert!(done.ok, "{done:?}");

    let e = SmartHttpServiceClient::new(ch.clone())
        .post_receive_pack(tokio_stream::iter(vec![PostReceivePackRequest {
            repository: repo("registered.git"),
            data: b"0000".to_vec(),
            ..Default::default()
        }]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_is_also_served_on_a_unix_socket() -> anyhow::Result<()> {
    let c = VoteCluster::start(1, 1).await?;
    let node = &c.nodes[0];
    let socket = node.grpc_socket();
    let ch = tonic::transport::Endpoint::try_from("http://local.socket")?
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let socket = socket.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(socket).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await?;
    let info = ServerServiceClient::new(ch.clone())
        .server_info(ServerInfoRequest {})
        .await?
        .into_inner();
    assert_eq!(info.storage_statuses.len(), 1);
    let exists = RepositoryServiceClient::new(ch)
        .repository_exists(RepositoryExistsRequest {
            repository: repo("missing.git"),
        })
        .await?
        .into_inner();
    assert!(!exists.exists);
    Ok(())
}
