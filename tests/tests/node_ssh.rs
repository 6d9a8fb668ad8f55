//! The node's git transports that carry a push's commands (PostReceivePack and the
//! SSHService RPCs) against real votingd processes, real etcd and real git: canonical
//! command order on every replica, real `git push`/`clone`/`archive --remote` over a
//! gRPC stand-in for ssh (`ssh-grpc`), and bad or oversized input.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Output;

use refvote_cluster::RepoId;
use refvote_cluster::records::VoteRecord;
use refvote_proto::gitaly::repository_service_client::RepositoryServiceClient;
use refvote_proto::gitaly::smart_http_service_client::SmartHttpServiceClient;
use refvote_proto::gitaly::ssh_service_client::SshServiceClient;
use refvote_proto::gitaly::{
    CreateRepositoryRequest, PostReceivePackRequest, RepositoryExistsRequest,
    SshReceivePackRequest, SshUploadArchiveRequest, SshUploadPackRequest,
};
use refvote_tests::cluster::VoteCluster;
use refvote_tests::git::{self, WorkRepo, rev};
use refvote_tests::grpc::{channel, repo};
use refvote_tests::node::{Node, bin};
use refvote_tests::smarthttp::{GitHttpProxy, Target};
use tonic::Code;

/// Creates `relative` on every node through CreateRepository and registers it in etcd
/// with a replica on each.
async fn create(c: &VoteCluster, relative: &str) -> anyhow::Result<RepoId> {
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
    Ok(id)
}

/// Per voter, the first ref of each vote it cast, in the order etcd stored them: the
/// order git on that replica ran its ref transactions.
async fn vote_order(c: &VoteCluster, tx: &str) -> anyhow::Result<BTreeMap<String, Vec<String>>> {
    let (entries, _) = c.store.get_prefix(&c.store.keys().all_votes(tx)).await?;
    let mut votes: Vec<(String, i64, String)> = Vec::new();
    for e in entries {
        let voter = e.key.rsplit('/').next().unwrap_or_default().to_owned();
        let v: VoteRecord = serde_json::from_slice(&e.value)?;
        votes.push((voter, e.create_revision, v.first_ref));
    }
    votes.sort();
    let mut order: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (voter, _, first_ref) in votes {
        order.entry(voter).or_default().push(first_ref);
    }
    Ok(order)
}

/// A real git client whose ssh is `ssh-grpc`, talking to `targets` (pushes go to all).
fn git_over_grpc(dir: &Path, targets: &[&Node], tx: Option<&str>) -> tokio::process::Command {
    let urls: Vec<String> = targets.iter().map(|n| n.grpc_url()).collect();
    let mut cmd = tokio::process::Command::new("git");
    cmd.current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", dir)
        .env("GIT_SSH_COMMAND", bin("ssh-grpc"))
        .env("GIT_SSH_VARIANT", "ssh")
        .env("REFVOTE_SSH_TARGETS", urls.join(","))
        .env("REFVOTE_SSH_TX", tx.unwrap_or(""))
        .kill_on_drop(true);
    cmd
}

fn show(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn objects(repo: &Path) -> String {
    let mut lines: Vec<String> = git::git(repo, &["rev-list", "--all", "--objects"])
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    lines.sort();
    lines.join("\n")
}

/// Two new branches, `zeta` and `alpha`: `git push <url> zeta alpha` sends their
/// commands in that (unsorted) order.
fn two_branches(c: &VoteCluster, name: &str) -> anyhow::Result<WorkRepo> {
    let work = c.work(name)?;
    work.commit("main", "base")?;
    work.commit("zeta", "on zeta")?;
    work.commit("alpha", "on alpha")?;
    Ok(work)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_receive_pack_feeds_every_replica_the_commands_sorted() -> anyhow::Result<()> {
    let c = VoteCluster::start(3, 1).await?;
    let relative = "group/sorted.git";
    let id = create(&c, relative).await?;
    let work = two_branches(&c, "w")?;
    let tx = c.begin(&id).await?;
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
    let out = tokio::process::Command::new("git")
        .current_dir(&work.path)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_TRACE_PACKET", "1")
        .args(["push", "--porcelain", &proxy.url(relative), "zeta", "alpha"])
        .output()
        .await?;
    assert!(out.status.success(), "push failed: {}", show(&out));
    // The client really sent them unsorted...
    let trace = String::from_utf8_lossy(&out.stderr);
    let sent: Vec<&str> = trace
        .lines()
        .filter_map(|l| l.split_once("git> ").map(|(_, pkt)| pkt))
        // A command: `<old> <new> <ref>`, the old oid (all zeros here) first.
        .filter(|pkt| pkt.starts_with(&"0".repeat(40)))
        .filter_map(|pkt| pkt.split(" refs/heads/").nth(1))
        .map(|r| r.split('\\').next().unwrap_or(r))
        .collect();
    assert_eq!(sent, ["zeta", "alpha"], "{trace}");
    // ...and every replica's git ran them sorted: one ref transaction per command.
    let order = vote_order(&c, &tx.id).await?;
    assert_eq!(order.len(), 3, "{order:?}");
    for (voter, refs) in &order {
        assert_eq!(
            refs,
            &["refs/heads/alpha", "refs/heads/zeta"],
            "order on {voter}"
        );
    }
    let outcome = c.finalize(&tx).await?;
    assert!(outcome.acknowledged && outcome.committed, "{outcome:?}");
    assert_eq!(outcome.promoted.len(), 3, "{outcome:?}");
    for n in &c.nodes {
        for b in ["zeta", "alpha"] {
            let r = format!("refs/heads/{b}");
            assert_eq!(rev(&n.repo(relative), &r), rev(&work.path, &r), "{b}");
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_post_receive_pack_is_refused_before_git_runs() -> anyhow::Result<()> {
    let c = VoteCluster::start(1, 1).await?;
    let relative = "bad-push.git";
    create(&c, relative).await?;
    let ch = channel(&c.nodes[0]).await;
    let oid = "1111111111111111111111111111111111111111";
    let zero = "0000000000000000000000000000000000000000";
    let line = format!("{zero} {oid} refs/heads/x\0report-status\n");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("not a pkt-line", b"zzzz".to_vec()),
        (
            "no flush",
            format!("{:04x}{line}", line.len() + 4).into_bytes(),
        ),
        (
            "not a command",
            format!("{:04x}garbage\n0000", "garbage\n".len() + 4).into_bytes(),
        ),
    ];
    for (what, data) in cases {
        let err = SmartHttpServiceClient::new(ch.clone())
            .post_receive_pack(tokio_stream::iter(vec![PostReceivePackRequest {
                repository: repo(relative),
                data,
                ..Default::default()
            }]))
            .await
            .map(|_| ())
            .expect_err(what);
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err:?}");
        assert!(
            err.message().contains("malformed receive-pack request"),
            "{what}: {}",
            err.message()
        );
    }
    assert_eq!(git::refs(&c.nodes[0].repo(relative)), "");
    // The service keeps serving.
    let exists = RepositoryServiceClient::new(ch)
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
async fn git_over_ssh_pushes_to_three_replicas_then_clones_and_archives() -> anyhow::Result<()> {
    let c = VoteCluster::start(3, 1).await?;
    let relative = "group/ssh.git";
    let id = create(&c, relative).await?;
    let work = two_branches(&c, "w")?;
    let tx = c.begin(&id).await?;
    let nodes: Vec<&Node> = c.nodes.iter().collect();
    let url = format!("ssh://node/{relative}");
    let out = git_over_grpc(&work.path, &nodes, Some(&tx.id))
        .args(["push", "--porcelain", &url, "main", "zeta", "alpha"])
        .output()
        .await?;
    assert!(out.status.success(), "push failed: {}", show(&out));
    // git's report came back through stdout, its progress through stderr.
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.contains("refs/heads/alpha") && report.contains("Done"),
        "{report}"
    );
    for (voter, refs) in vote_order(&c, &tx.id).await? {
        let mut sorted = refs.clone();
        sorted.sort();
        assert_eq!(refs, sorted, "order on {voter}");
        assert_eq!(refs.len(), 3, "{voter}: {refs:?}");
    }
    let outcome = c.finalize(&tx).await?;
    assert!(outcome.acknowledged && outcome.committed, "{outcome:?}");
    assert_eq!(outcome.promoted.len(), 3, "{outcome:?}");
    for n in &c.nodes {
        assert_eq!(git::refs(&n.repo(relative)), git::refs(&work.path));
    }

    // Clone through SSHUploadPack from one replica, protocol v2 and v0.
    for (name, protocol) in [("clone-v2", "2"), ("clone-v0", "0")] {
        let dest = c.path(name);
        let out = git_over_grpc(c.dir.path(), &nodes[1..2], None)
            .args(["-c", &format!("protocol.version={protocol}")])
            .args(["clone", "--bare", "--quiet", &url])
            .arg(&dest)
            .output()
            .await?;
        assert!(out.status.success(), "{name}: {}", show(&out));
        assert_eq!(
            git::refs(&dest),
            git::refs(&c.nodes[1].repo(relative)),
            "{name}"
        );
        assert_eq!(objects(&dest), objects(&work.path), "{name}");
        git::git(&dest, &["fsck", "--strict"])?;
    }

    // `git archive --remote` through SSHUploadArchive gives what a local archive gives.
    let out = git_over_grpc(&work.path, &nodes[2..], None)
        .args([
            "archive",
            "--format=tar",
            &format!("--remote={url}"),
            "zeta",
        ])
        .output()
        .await?;
    assert!(out.status.success(), "archive: {}", show(&out));
    let local = std::process::Command::new("git")
        .current_dir(&work.path)
        .args(["archive", "--format=tar", "zeta"])
        .output()?;
    assert!(out.stdout.len() > 1024);
    assert_eq!(out.stdout, local.stdout);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_rpcs_refuse_bad_input_with_clear_codes() -> anyhow::Result<()> {
    let c = VoteCluster::start(1, 1).await?;
    let relative = "ssh-bad.git";
    create(&c, relative).await?;
    let node = &c.nodes[0];
    let ch = channel(node).await;
    let mut ssh = SshServiceClient::new(ch.clone());

    // A missing repository, for each method.
    let missing = ssh
        .ssh_upload_pack(tokio_stream::iter(vec![SshUploadPackRequest {
            repository: repo("nope.git"),
            ..Default::default()
        }]))
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
    let missing = ssh
        .ssh_upload_archive(tokio_stream::iter(vec![SshUploadArchiveRequest {
            repository: repo("nope.git"),
            ..Default::default()
        }]))
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
    let traversal = ssh
        .ssh_receive_pack(tokio_stream::iter(vec![SshReceivePackRequest {
            repository: repo("../escape.git"),
            gl_id: "user-1".into(),
            ..Default::default()
        }]))
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(traversal.code(), Code::InvalidArgument, "{traversal:?}");
    // A push that names no user, as Gitaly refuses it.
    let no_user = ssh
        .ssh_receive_pack(tokio_stream::iter(vec![SshReceivePackRequest {
            repository: repo(relative),
            ..Default::default()
        }]))
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(no_user.code(), Code::InvalidArgument, "{no_user:?}");
    assert!(no_user.message().contains("gl_id"), "{}", no_user.message());
    // A config option that could skip the vote.
    let hooks = ssh
        .ssh_receive_pack(tokio_stream::iter(vec![SshReceivePackRequest {
            repository: repo(relative),
            gl_id: "user-1".into(),
            git_config_options: vec!["core.hooksPath=/tmp".into()],
            ..Default::default()
        }]))
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(hooks.code(), Code::InvalidArgument, "{hooks:?}");

    // Garbage where the commands belong, after git advertised its refs: git runs no
    // command, the call ends INVALID_ARGUMENT.
    let oid = "1111111111111111111111111111111111111111";
    let bad = format!("{oid} {oid}\n");
    let mut responses = ssh
        .ssh_receive_pack(tokio_stream::iter(vec![SshReceivePackRequest {
            repository: repo(relative),
            gl_id: "user-1".into(),
            stdin: format!("{:04x}{bad}0000", bad.len() + 4).into_bytes(),
            ..Default::default()
        }]))
        .await?
        .into_inner();
    let err = loop {
        match responses.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("a malformed push succeeded"),
            Err(e) => break e,
        }
    };
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("malformed receive-pack request"),
        "{}",
        err.message()
    );
    assert_eq!(git::refs(&node.repo(relative)), "");

    // A real client asking for an archive of a ref that does not exist: git's own
    // error and exit status reach it, through stderr and exit_status.
    let work = c.work("w")?;
    work.commit("main", "one")?;
    let out = git_over_grpc(&work.path, &[node], None)
        .args(["push", &format!("ssh://node/{relative}"), "main"])
        .output()
        .await?;
    assert!(out.status.success(), "{}", show(&out));
    let out = git_over_grpc(&work.path, &[node], None)
        .args([
            "archive",
            &format!("--remote=ssh://node/{relative}"),
            "no-such-ref",
        ])
        .output()
        .await?;
    assert!(!out.status.success());
    assert!(show(&out).contains("no-such-ref"), "{}", show(&out));

    // The service keeps serving.
    let exists = RepositoryServiceClient::new(ch)
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
async fn oversized_messages_are_refused_and_the_service_keeps_serving() -> anyhow::Result<()> {
    let c = VoteCluster::start(1, 1).await?;
    let relative = "big-message.git";
    create(&c, relative).await?;
    let ch = channel(&c.nodes[0]).await;
    // Over tonic's default 4 MiB limit on decoded messages: a unary request...
    let huge = "a".repeat(5 << 20);
    let err = RepositoryServiceClient::new(ch.clone())
        .repository_exists(RepositoryExistsRequest {
            repository: repo(&huge),
        })
        .await
        .unwrap_err();
    // tonic answers OUT_OF_RANGE where grpc-go (Gitaly) answers RESOURCE_EXHAUSTED.
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert!(err.message().contains("too large"), "{}", err.message());
    // ...and one frame of a push stream: nothing is written.
    let mut responses = SshServiceClient::new(ch.clone())
        .ssh_receive_pack(tokio_stream::iter(vec![
            SshReceivePackRequest {
                repository: repo(relative),
                gl_id: "user-1".into(),
                ..Default::default()
            },
            SshReceivePackRequest {
                stdin: vec![b'0'; 5 << 20],
                ..Default::default()
            },
        ]))
        .await?
        .into_inner();
    let err = loop {
        match responses.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("an oversized push frame was accepted"),
            Err(e) => break e,
        }
    };
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert_eq!(git::refs(&c.nodes[0].repo(relative)), "");
    // The service keeps serving.
    let exists = RepositoryServiceClient::new(ch)
        .repository_exists(RepositoryExistsRequest {
            repository: repo(relative),
        })
        .await?
        .into_inner()
        .exists;
    assert!(exists);
    Ok(())
}
