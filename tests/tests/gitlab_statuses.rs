//! GitLab's internal API answering something other than yes or no — 429 from its rate
//! limiters, a 5xx, a body that is not JSON — handled as Gitaly handles it
//! (`refvote_gitlab::wire` writes down how, with Gitaly's file names), against a real
//! etcd, three real votingd nodes, a real router, real git over git's smart HTTP, and a
//! real HTTP server on loopback standing in for the internal API:
//!
//! - `/allowed` throttled (Rack::Attack's plain-text 429 with `Retry-After`) or
//!   failing (503 with a JSON message): the push is refused on every replica, the
//!   pusher reads `GitLab: Internal API error (429)` or GitLab's message, no ref and
//!   no object lands anywhere, and `/allowed` was called once (Gitaly never repeats
//!   it, `Retry-After` or not); over SSH (gitlab-shell's way) the same under Rails' own
//!   rate limiter's JSON, whose `message` is no string;
//! - `/post_receive` throttled once with `Retry-After: 3`: the push stands, the call is
//!   repeated after GitLab's wait, and its messages reach the pusher once; failing
//!   with a 500, it is not repeated, the push stands, and the pusher reads Gitaly's
//!   `GitLab: http post to gitlab api /post_receive endpoint: …`;
//! - the `User*` operations under Rails' own rate limiter's answer: Gitaly's codes and
//!   structured errors (UserDeleteBranch `PERMISSION_DENIED` with `AccessCheckError`,
//!   UserCreateBranch `INTERNAL` without a detail), nothing moved.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message;
use refvote_cluster::RepoId;
use refvote_proto::gitaly::operation_service_client::OperationServiceClient;
use refvote_proto::gitaly::{
    AccessCheckError, Repository, User, UserCreateBranchRequest, UserDeleteBranchError,
    UserDeleteBranchRequest, user_delete_branch_error,
};
use refvote_tests::cluster::{Fixture, VoteCluster};
use refvote_tests::git::{self, WorkRepo};
use refvote_tests::gitlab::{GitlabApi, MESSAGE, Reply, Responder, allowing, respond};
use refvote_tests::node::{NodeOptions, bin};
use refvote_tests::smarthttp::{GitHttpProxy, GitlabIdentity, Target};
use serde_json::json;
use tonic::Code;

const RELATIVE: &str = "@hashed/ab/cd/project.git";
const GL_REPOSITORY: &str = "project-42";
const ZERO: &str = "0000000000000000000000000000000000000000";
const ALLOWED: &str = "/api/v4/internal/allowed";
const POST_RECEIVE: &str = "/api/v4/internal/post_receive";

/// Rails' answer from `check_rate_limit!` (lib/api/helpers/rate_limiter.rb): the text
/// nested under `error`, so `message` is no string and Gitaly's decode fails.
fn rails_rate_limited() -> Reply {
    Reply::json(
        429,
        json!({"message": {"error": "This endpoint has been requested too many times. Try again later."}}),
    )
}

/// Rack::Attack's throttled answer as GitLab configures it.
fn rack_attack_throttled() -> Reply {
    Reply::text(429, "text/plain", "Retry later\n").retry_after("60")
}

/// `ok` or `failed`, then git's output.
fn outcome(out: &std::process::Output) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        format!("ok\n{text}")
    } else {
        format!("failed\n{text}")
    }
}

/// Three nodes calling `api`, a router, and `RELATIVE` with `main` on every replica.
struct Setup {
    c: VoteCluster,
    api: GitlabApi,
    work: WorkRepo,
    repo: RepoId,
    _api_dir: tempfile::TempDir,
}

async fn setup(responder: Responder) -> anyhow::Result<Setup> {
    let api_dir = tempfile::tempdir()?;
    let api = GitlabApi::start(api_dir.path(), responder).await?;
    let c = Fixture::nodes(3)
        .node_options(NodeOptions::default().config(api.configure()))
        .seeded(RELATIVE)
        .router()
        .start()
        .await?;
    let repo = c.repo_id(RELATIVE);
    let work = c.work("w")?;
    Ok(Setup {
        c,
        api,
        work,
        repo,
        _api_dir: api_dir,
    })
}

impl Setup {
    /// A workhorse-like front for git's smart HTTP, naming the pusher `user-7`.
    async fn http(&self) -> anyhow::Result<GitHttpProxy> {
        GitHttpProxy::start_as(
            vec![Target {
                url: self.c.routers[0].grpc_url(),
                storage: "default".into(),
                transaction: None,
            }],
            GitlabIdentity {
                gl_id: "user-7".into(),
                gl_username: "jane".into(),
                gl_repository: GL_REPOSITORY.into(),
                gl_project_path: "group/project".into(),
            },
        )
        .await
    }

    /// `git push origin main` through `proxy`: `ok` or `failed`, then git's output.
    async fn push(&self, proxy: &GitHttpProxy) -> anyhow::Result<String> {
        let url = proxy.url(RELATIVE);
        let out = git::push(&self.work.path, Path::new(&url), &["main"], &[]).await?;
        Ok(outcome(&out))
    }

    /// `git push` of `main` over SSH the way gitlab-shell carries it: git's ssh is
    /// `ssh-grpc`, one SSHReceivePack through the router as `user-7`. Bounded.
    async fn push_ssh(&self) -> anyhow::Result<String> {
        let env: Vec<(String, String)> = [
            ("GIT_SSH_COMMAND", bin("ssh-grpc").display().to_string()),
            ("GIT_SSH_VARIANT", "ssh".into()),
            ("REFVOTE_SSH_TARGETS", self.c.routers[0].grpc_url()),
            ("REFVOTE_SSH_GL_ID", "user-7".into()),
            ("REFVOTE_SSH_GL_USERNAME", "jane".into()),
            ("REFVOTE_SSH_GL_REPOSITORY", GL_REPOSITORY.into()),
            ("REFVOTE_SSH_GL_PROJECT_PATH", "group/project".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let url = format!("ssh://gitlab-shell/{RELATIVE}");
        let push = git::push(&self.work.path, Path::new(&url), &["main"], &env);
        let out = tokio::time::timeout(Duration::from_secs(120), push)
            .await
            .map_err(|_| anyhow::anyhow!("the SSH push did not end in 120 s"))??;
        Ok(outcome(&out))
    }

    fn revs(&self, refname: &str) -> Vec<Option<String>> {
        self.c
            .nodes
            .iter()
            .map(|n| git::rev(&n.repo(RELATIVE), refname))
            .collect()
    }

    async fn all_up_to_date(&self) -> anyhow::Result<bool> {
        let view = self.c.store.repo_view(&self.repo).await?;
        Ok(view.up_to_date_live().len() == 3)
    }

    /// Refused with `shown` on the pusher's screen, once; nothing of `commit` anywhere.
    async fn assert_refused(
        &self,
        out: &str,
        shown: &str,
        commit: &str,
        before: &[Option<String>],
    ) {
        assert!(out.starts_with("failed\n"), "{out}");
        let line = format!("remote: GitLab: {shown}");
        assert_eq!(out.matches(&line).count(), 1, "{line:?} once in:\n{out}");
        assert!(out.contains("pre-receive hook declined"), "{out}");
        assert_eq!(self.revs("refs/heads/main"), before);
        for n in &self.c.nodes {
            assert!(
                git::git(&n.repo(RELATIVE), &["cat-file", "-e", commit]).is_err(),
                "{} holds the refused commit",
                n.name
            );
        }
        assert!(
            self.all_up_to_date().await.unwrap(),
            "a refusal leaves every replica up to date"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_gitlab_throttles_or_fails_is_refused_everywhere_and_a_throttled_post_receive_waits()
-> anyhow::Result<()> {
    let s = setup(respond(|r| match r.path.as_str() {
        ALLOWED => rack_attack_throttled(),
        _ => allowing(r),
    }))
    .await?;
    let proxy = s.http().await?;
    let before = s.revs("refs/heads/main");
    let new = s.work.commit("main", "throttled")?;

    // Rack::Attack's 429: not JSON, so Gitaly's text; asked once, Retry-After or not.
    let out = s.push(&proxy).await?;
    s.assert_refused(&out, "Internal API error (429)", &new, &before)
        .await;
    assert_eq!(s.api.calls("allowed").len(), 1, "not repeated");
    assert_eq!(s.api.calls("pre_receive").len(), 0);
    assert_eq!(s.api.calls("post_receive").len(), 0);

    // A 5xx with a JSON message: the message, as for a denial.
    s.api.clear();
    s.api.set_responder(respond(|r| match r.path.as_str() {
        ALLOWED => Reply::json(503, json!({"message": "GitLab is undergoing maintenance"})),
        _ => allowing(r),
    }));
    let out = s.push(&proxy).await?;
    s.assert_refused(&out, "GitLab is undergoing maintenance", &new, &before)
        .await;
    assert_eq!(s.api.calls("allowed").len(), 1, "not repeated");
    assert_eq!(s.api.calls("pre_receive").len(), 0);

    // Over SSH as gitlab-shell carries it (one SSHReceivePack through the router),
    // Rails' own rate limiter: the same hook, the same words.
    s.api.clear();
    s.api.set_responder(respond(|r| match r.path.as_str() {
        ALLOWED => rails_rate_limited(),
        _ => allowing(r),
    }));
    let out = s.push_ssh().await?;
    s.assert_refused(&out, "Internal API error (429)", &new, &before)
        .await;
    assert_eq!(s.api.calls("allowed").len(), 1, "not repeated");
    assert_eq!(s.api.calls("pre_receive").len(), 0);

    // Allowed now, /post_receive throttled once: the push stands, and the call comes
    // again after the 3 s GitLab asked for (longer than the 1 s backoff).
    s.api.clear();
    let seen: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let times = seen.clone();
    s.api.set_responder(respond(move |r| match r.path.as_str() {
        POST_RECEIVE => {
            let mut t = times.lock().unwrap();
            t.push(Instant::now());
            if t.len() == 1 {
                Reply::text(429, "text/plain", "Retry later\n").retry_after("3")
            } else {
                allowing(r)
            }
        }
        _ => allowing(r),
    }));
    let out = s.push(&proxy).await?;
    assert!(out.starts_with("ok\n"), "{out}");
    assert_eq!(s.revs("refs/heads/main"), vec![Some(new.clone()); 3]);
    let first_line = MESSAGE.lines().next().unwrap();
    assert_eq!(out.matches(first_line).count(), 1, "{out}");
    let times = seen.lock().unwrap().clone();
    assert_eq!(times.len(), 2, "throttled once, then served");
    let gap = times[1] - times[0];
    assert!(
        gap >= Duration::from_secs(3) && gap < Duration::from_secs(10),
        "repeated after {gap:?}, not after Retry-After's 3 s"
    );
    assert_eq!(s.api.calls("allowed").len(), 1);
    assert_eq!(s.api.calls("pre_receive").len(), 1);
    let posted = s.api.calls("post_receive");
    assert_eq!(posted[0].json(), posted[1].json(), "the same call again");

    // /post_receive failing with a 500 (GitLab may have acted: not repeated): the push
    // stands and the pusher reads Gitaly's post-receive error once.
    s.api.clear();
    s.api.set_responder(respond(|r| match r.path.as_str() {
        POST_RECEIVE => Reply::json(500, json!({"message": "500 Internal Server Error"})),
        _ => allowing(r),
    }));
    let newer = s.work.commit("main", "post-receive fails")?;
    let out = s.push(&proxy).await?;
    assert!(out.starts_with("ok\n"), "{out}");
    assert_eq!(s.revs("refs/heads/main"), vec![Some(newer); 3]);
    let shown =
        "remote: GitLab: http post to gitlab api /post_receive endpoint: 500 Internal Server Error";
    assert_eq!(out.matches(shown).count(), 1, "{shown:?} once in:\n{out}");
    assert!(!out.contains(first_line), "{out}");
    assert_eq!(s.api.calls("post_receive").len(), 1);
    Ok(())
}

/// `google.rpc.Status`, as far as Gitaly's details need it.
#[derive(Clone, PartialEq, Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
    #[prost(message, repeated, tag = "3")]
    details: Vec<prost_types::Any>,
}

fn repo() -> Option<Repository> {
    Some(Repository {
        storage_name: "default".into(),
        relative_path: RELATIVE.into(),
        gl_repository: GL_REPOSITORY.into(),
        gl_project_path: "group/project".into(),
        ..Default::default()
    })
}

fn user() -> Option<User> {
    Some(User {
        gl_id: "user-7".into(),
        name: b"Jane Doe".to_vec(),
        email: b"jane@example.com".to_vec(),
        gl_username: "jane".into(),
        timezone: "UTC".into(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_gitlab_throttles_answer_gitalys_access_check_errors() -> anyhow::Result<()> {
    let s = setup(respond(|r| match r.path.as_str() {
        ALLOWED => rails_rate_limited(),
        _ => allowing(r),
    }))
    .await?;
    let mut client = OperationServiceClient::new(s.c.routers[0].channel().await?);
    let main = s.revs("refs/heads/main")[0]
        .clone()
        .expect("main is seeded");
    let shown = "Internal API error (429)";

    // UserDeleteBranch: PERMISSION_DENIED with the access_check arm, as for a denial.
    let e = client
        .user_delete_branch(UserDeleteBranchRequest {
            repository: repo(),
            branch_name: b"main".to_vec(),
            user: user(),
            expected_old_oid: String::new(),
        })
        .await
        .expect_err("throttled");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert_eq!(
        e.message(),
        format!("deletion denied by access checks: running pre-receive hooks: GitLab: {shown}")
    );
    let rpc = RpcStatus::decode(e.details())?;
    assert_eq!(
        (rpc.code, rpc.message.as_str()),
        (e.code() as i32, e.message())
    );
    assert_eq!(rpc.details.len(), 1);
    assert_eq!(
        rpc.details[0].type_url,
        "type.googleapis.com/gitaly.UserDeleteBranchError"
    );
    let d = UserDeleteBranchError::decode(rpc.details[0].value.as_slice())?;
    assert_eq!(
        d.error,
        Some(user_delete_branch_error::Error::AccessCheck(
            AccessCheckError {
                error_message: shown.into(),
                protocol: "web".into(),
                user_id: "user-7".into(),
                changes: format!("{main} {ZERO} refs/heads/main\n").into_bytes(),
            }
        ))
    );

    // UserCreateBranch under a 5xx that is not JSON: no access_check arm, so
    // Gitaly's catch-all, INTERNAL with the hook's error and no detail.
    s.api.set_responder(respond(|r| match r.path.as_str() {
        ALLOWED => Reply::text(
            502,
            "text/html",
            "<html><body><h1>502 Bad Gateway</h1></body></html>",
        ),
        _ => allowing(r),
    }));
    let e = client
        .user_create_branch(UserCreateBranchRequest {
            repository: repo(),
            branch_name: b"feature".to_vec(),
            user: user(),
            start_point: b"main".to_vec(),
        })
        .await
        .expect_err("GitLab failed");
    assert_eq!(e.code(), Code::Internal, "{e:?}");
    assert_eq!(
        e.message(),
        "running pre-receive hooks: GitLab: Internal API error (502)"
    );
    assert!(
        RpcStatus::decode(e.details()).map_or(true, |r| r.details.is_empty()),
        "no structured detail"
    );

    // Nothing moved; each operation asked once, never counted in or out.
    assert_eq!(s.revs("refs/heads/main"), vec![Some(main.clone()); 3]);
    assert_eq!(s.revs("refs/heads/feature"), vec![None; 3]);
    assert!(s.all_up_to_date().await?);
    assert_eq!(s.api.calls("allowed").len(), 2);
    assert_eq!(s.api.calls("pre_receive").len(), 0);
    assert_eq!(s.api.calls("post_receive").len(), 0);
    Ok(())
}
