//! Read-only credentials (`[auth_read_only]`) on a real router in front of three real
//! nodes and real etcd, with real git: a token signed with the read-only secret may
//! call accessors and is refused PERMISSION_DENIED, with a reason, on mutators, which
//! then happen nowhere; over git HTTP the read-only secret as the password clones and
//! fetches, and a push gets 403 (git prints the reason) and reaches no node; the
//! read-write secret still does everything.

use std::path::Path;

use refvote_auth::{AuthSettings, ReadOnlySettings, Secret};
use refvote_cluster::RepoId;
use refvote_proto::gitaly::ref_service_client::RefServiceClient;
use refvote_proto::gitaly::repository_service_client::RepositoryServiceClient;
use refvote_proto::gitaly::{CreateRepositoryRequest, RefExistsRequest, WriteRefRequest};
use refvote_tests::cluster::VoteCluster;
use refvote_tests::git;
use refvote_tests::grpc::repo;
use refvote_tests::node::NodeOptions;
use refvote_tests::router::{Router, RouterOptions};
use tonic::Code;
use tonic::metadata::MetadataValue;

const RW: &str = "read-write-secret";
const RO: &str = "read-only-secret";

fn auth() -> AuthSettings {
    AuthSettings {
        token: Some(RW.into()),
        token_file: None,
        transitioning: false,
    }
}

fn signed<T>(message: T, secret: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    let token = Secret::new(secret).unwrap().bearer_now();
    r.metadata_mut()
        .insert("authorization", MetadataValue::try_from(token).unwrap());
    r
}

fn create(relative: &str) -> CreateRepositoryRequest {
    CreateRepositoryRequest {
        repository: repo(relative),
        ..Default::default()
    }
}

fn git_no_prompt(dir: &Path, args: &[&str]) -> std::io::Result<std::process::Output> {
    std::process::Command::new("git")
        .current_dir(dir)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .args(args)
        .output()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_token_reads_and_is_refused_writes_on_grpc_and_git_http() -> anyhow::Result<()>
{
    let c =
        VoteCluster::start_with(3, 1, NodeOptions::default().config(|c| c.auth = auth())).await?;
    let router = Router::start_with(
        "router1",
        c.dir.path(),
        &c.etcd.endpoints(),
        &RouterOptions::http().config(|c| {
            c.auth = auth();
            c.auth_read_only = ReadOnlySettings {
                token: Some(RO.into()),
                token_file: None,
            };
        }),
    )
    .await?;
    let ch = router.channel().await?;
    let mut repos = RepositoryServiceClient::new(ch.clone());
    let mut refs = RefServiceClient::new(ch.clone());

    // The read-write token creates and pushes.
    repos
        .create_repository(signed(create("ro/p.git"), RW))
        .await?;
    let plain = router.http_url("ro/p.git");
    let rw_url = plain.replace("http://", &format!("http://git:{RW}@"));
    let ro_url = plain.replace("http://", &format!("http://git:{RO}@"));
    let work = c.work("w")?;
    let head = work.commit("main", "first")?;
    let out = git::push(&work.path, Path::new(&rw_url), &["main"], &[]).await?;
    assert!(out.status.success(), "{out:?}\n{}", router.log_tail(30));

    // gRPC, read-only: an accessor is served...
    let exists = refs
        .ref_exists(signed(
            RefExistsRequest {
                repository: repo("ro/p.git"),
                r#ref: b"refs/heads/main".to_vec(),
            },
            RO,
        ))
        .await?
        .into_inner();
    assert!(exists.value);
    // ...mutators are refused with the reason, and happen nowhere.
    let err = repos
        .create_repository(signed(create("ro/new.git"), RO))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message()
            .contains("/gitaly.RepositoryService/CreateRepository")
            && err.message().contains("op_type MUTATOR")
            && err.message().contains("read-only"),
        "{err:?}"
    );
    let id = RepoId::new("default", "ro/new.git")?;
    assert!(c.store.get(&c.store.keys().repo(&id)).await?.is_none());
    for n in &c.nodes {
        assert!(!n.repo("ro/new.git").exists(), "{}", n.name);
    }
    let err = repos
        .write_ref(signed(
            WriteRefRequest {
                repository: repo("ro/p.git"),
                r#ref: b"refs/heads/sneaky".to_vec(),
                revision: head.as_bytes().to_vec(),
                ..Default::default()
            },
            RO,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    for n in &c.nodes {
        assert_eq!(git::rev(&n.repo("ro/p.git"), "refs/heads/sneaky"), None);
    }
    // A token of neither secret is still unauthenticated.
    let err = repos
        .create_repository(signed(create("ro/new.git"), "neither"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");

    // git HTTP, read-only: clone and fetch work...
    let clone = c.path("clone");
    let out = git_no_prompt(
        c.dir.path(),
        &["clone", "--quiet", &ro_url, clone.to_str().unwrap()],
    )?;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        git::rev(&clone, "refs/remotes/origin/main"),
        Some(head.clone())
    );
    let out = git_no_prompt(&clone, &["fetch", "--quiet", "origin"])?;
    assert!(out.status.success(), "{out:?}");
    // ...a push is refused 403 with a reason git prints, and reaches no node.
    let side = work.commit("side", "second")?;
    let out = git_no_prompt(&work.path, &["push", &ro_url, "side"])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        stderr.contains("remote: refvote: this credential is read-only") && stderr.contains("403"),
        "{stderr}"
    );
    for n in &c.nodes {
        assert_eq!(
            git::rev(&n.repo("ro/p.git"), "refs/heads/side"),
            None,
            "{}",
            n.name
        );
    }
    // The push itself, not only its advertisement, is refused too.
    let out = tokio::process::Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-u"])
        .arg(format!("git:{RO}"))
        .args(["-H", "Content-Type: application/x-git-receive-pack-request"])
        .args(["--data-binary", "0000"])
        .arg(router.http_url("ro/p.git/git-receive-pack"))
        .output()
        .await?;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "403");
    // The read-write secret pushes the same branch.
    let out = git::push(&work.path, Path::new(&rw_url), &["side"], &[]).await?;
    assert!(out.status.success(), "{out:?}");
    for n in &c.nodes {
        assert_eq!(
            git::rev(&n.repo("ro/p.git"), "refs/heads/side"),
            Some(side.clone()),
            "{}",
            n.name
        );
    }
    Ok(())
}
