//! GitLab's hooks inside the vote (DESIGN.md §8), against a real etcd, three real
//! votingd nodes, a real router, real git, and a real HTTP server standing in for
//! GitLab's internal API that asserts what it receives: a push by a GitLab user (over
//! git's smart HTTP the way workhorse sends it) is checked once and post-received once,
//! not once per replica; Rails' callbacks during `/allowed` read the push's quarantine
//! on the designated voter; a refusal by GitLab or by a custom hook refuses on every
//! replica with its message on the pusher's screen and moves no ref anywhere; the
//! designated voter killed during `/allowed` never lets the others commit. A push over
//! SSH goes the way gitlab-shell sends it (git's ssh replaced by `ssh-grpc`, one
//! interactive SSHReceivePack through the router): the ref advertisement reaches git
//! before the vote, GitLab's verdict and post-receive come once, and a refusal ends
//! with GitLab's message and a failed push.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use refvote_cluster::RepoId;
use refvote_proto::gitaly::commit_service_client::CommitServiceClient;
use refvote_proto::gitaly::{CheckObjectsExistRequest, Repository};
use refvote_tests::cluster::{Fixture, VoteCluster};
use refvote_tests::git::{self, WorkRepo};
use refvote_tests::gitlab::{GitlabApi, MESSAGE, Reply, Responder, allowing, respond};
use refvote_tests::node::{NodeOptions, bin};
use refvote_tests::smarthttp::{GitHttpProxy, GitlabIdentity, Target};
use serde_json::json;
use tokio::sync::Notify;

const RELATIVE: &str = "@hashed/ab/cd/project.git";
const GL_REPOSITORY: &str = "project-42";
const PROJECT_PATH: &str = "group/project";

/// A cluster of three nodes calling `api`, a router, and `RELATIVE` with `main` on
/// every replica (pushed outside refvote, so GitLab saw nothing yet).
struct Setup {
    c: VoteCluster,
    api: GitlabApi,
    work: WorkRepo,
    repo: RepoId,
    _api_dir: tempfile::TempDir,
}

async fn setup_with(
    responder: Responder,
    edit: impl Fn(&mut votingd::Config) + Send + Sync + 'static,
) -> anyhow::Result<Setup> {
    let api_dir = tempfile::tempdir()?;
    let api = GitlabApi::start(api_dir.path(), responder).await?;
    let opts = NodeOptions::default().config(api.configure()).config(edit);
    let c = Fixture::nodes(3)
        .node_options(opts)
        .seeded(RELATIVE)
        .router()
        .start()
        .await?;
    let repo = c.repo_id(RELATIVE);
    // The work repository the seed pushed `main` from.
    let work = c.work("w")?;
    Ok(Setup {
        c,
        api,
        work,
        repo,
        _api_dir: api_dir,
    })
}

async fn setup(responder: Responder) -> anyhow::Result<Setup> {
    setup_with(responder, |_| {}).await
}

impl Setup {
    /// A workhorse-like front for git's smart HTTP, naming the pusher `gl_id`.
    async fn http(&self, gl_id: &str) -> anyhow::Result<GitHttpProxy> {
        GitHttpProxy::start_as(
            vec![Target {
                url: self.c.routers[0].grpc_url(),
                storage: "default".into(),
                transaction: None,
            }],
            GitlabIdentity {
                gl_id: gl_id.into(),
                gl_username: "jane".into(),
                gl_repository: GL_REPOSITORY.into(),
                gl_project_path: PROJECT_PATH.into(),
            },
        )
        .await
    }

    /// `git push` through `proxy`; git's output.
    async fn push(
        &self,
        proxy: &GitHttpProxy,
        args: &[&str],
    ) -> anyhow::Result<std::process::Output> {
        let url = proxy.url(RELATIVE);
        git::push(&self.work.path, Path::new(&url), args, &[]).await
    }

    /// `git push` over SSH the way gitlab-shell carries it: git's ssh is `ssh-grpc`,
    /// which runs one SSHReceivePack through the router as the user `gl_id`; git's
    /// output.
    async fn push_ssh(&self, gl_id: &str, args: &[&str]) -> anyhow::Result<std::process::Output> {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        push_ssh(self.work.path.clone(), self.ssh_env(gl_id), args).await
    }

    /// What `ssh-grpc` needs to reach the router as gitlab-shell would for `gl_id`.
    fn ssh_env(&self, gl_id: &str) -> Vec<(String, String)> {
        [
            ("GIT_SSH_COMMAND", bin("ssh-grpc").display().to_string()),
            ("GIT_SSH_VARIANT", "ssh".into()),
            ("REFVOTE_SSH_TARGETS", self.c.routers[0].grpc_url()),
            ("REFVOTE_SSH_GL_ID", gl_id.into()),
            ("REFVOTE_SSH_GL_USERNAME", "jane".into()),
            ("REFVOTE_SSH_GL_REPOSITORY", GL_REPOSITORY.into()),
            ("REFVOTE_SSH_GL_PROJECT_PATH", PROJECT_PATH.into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    /// Where `refname` points on every node.
    fn revs(&self, refname: &str) -> Vec<Option<String>> {
        self.c
            .nodes
            .iter()
            .map(|n| git::rev(&n.repo(RELATIVE), refname))
            .collect()
    }

    /// Every replica up to date at the repository's generation.
    async fn all_up_to_date(&self) -> anyhow::Result<bool> {
        let view = self.c.store.repo_view(&self.repo).await?;
        Ok(view.up_to_date_live().len() == 3)
    }

    /// The nodes' and the router's last log lines, for a failure message.
    fn logs(&mut self) -> String {
        let mut out = String::new();
        for n in &self.c.nodes {
            out.push_str(&format!("--- {}\n{}\n", n.name, n.log_tail(30)));
        }
        out.push_str(&format!("--- router\n{}", self.c.routers[0].log_tail(30)));
        out
    }
}

/// `git push` from `work` over `ssh-grpc` with `env` (see `Setup::ssh_env`). Bounded:
/// an SSH session that never saw its advertisement would hang.
async fn push_ssh(
    work: std::path::PathBuf,
    env: Vec<(String, String)>,
    args: Vec<String>,
) -> anyhow::Result<std::process::Output> {
    let url = format!("ssh://gitlab-shell/{RELATIVE}");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let push = git::push(&work, Path::new(&url), &args, &env);
    tokio::time::timeout(Duration::from_secs(120), push)
        .await
        .map_err(|_| anyhow::anyhow!("the SSH push did not end in 120 s"))?
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The one `<old> <new> <ref>` line of `changes`.
fn line(old: &str, new: &str, reference: &str) -> String {
    format!("{old} {new} {reference}\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_over_http_by_a_gitlab_user_is_checked_once_and_post_received_once()
-> anyhow::Result<()> {
    let s = setup(respond(allowing)).await?;
    let old = git::rev(&s.work.path, "refs/heads/main").unwrap();
    let new = s.work.commit("main", "second")?;
    let proxy = s.http("user-7").await?;
    let out = s.push(&proxy, &["-o", "ci.skip", "main"]).await?;
    assert!(out.status.success(), "{}", text(&out));
    // GitLab's message on the pusher's screen, as git prints post-receive output.
    let first_line = MESSAGE.lines().next().unwrap();
    assert!(
        text(&out).contains(&format!("remote: {first_line}")),
        "{}",
        text(&out)
    );
    assert_eq!(s.revs("refs/heads/main"), vec![Some(new.clone()); 3]);
    assert!(s.all_up_to_date().await?);

    let allowed = s.api.calls("allowed");
    assert_eq!(allowed.len(), 1, "/allowed once, not once per replica");
    let a = &allowed[0];
    a.assert_jwt();
    assert_eq!(a.method, "POST");
    assert!(a.header("user-agent").unwrap_or("").starts_with("refvote/"));
    let body = a.json();
    assert_eq!(body["action"], "git-receive-pack");
    assert_eq!(body["changes"], line(&old, &new, "refs/heads/main"));
    assert_eq!(body["protocol"], "http");
    assert_eq!(body["gl_repository"], GL_REPOSITORY);
    assert_eq!(body["relative_path"], RELATIVE);
    assert_eq!(body["user_id"], "7");
    assert_eq!(body["push_options"], json!(["ci.skip"]));
    assert!(
        body["project"].as_str().unwrap().ends_with(RELATIVE),
        "{body}"
    );
    // The quarantine the check ran in, relative to the repository.
    let env: serde_json::Value = serde_json::from_str(body["env"].as_str().unwrap())?;
    let objects = env["GIT_OBJECT_DIRECTORY_RELATIVE"].as_str().unwrap();
    // git's receive-pack quarantine (`tmp_objdir-incoming-…` since git 2.35).
    assert!(
        objects.starts_with("objects/tmp_objdir-incoming-")
            || objects.starts_with("objects/incoming-"),
        "{env}"
    );
    assert_eq!(
        env["GIT_ALTERNATE_OBJECT_DIRECTORIES_RELATIVE"],
        json!(["objects"])
    );

    let pre = s.api.calls("pre_receive");
    assert_eq!(pre.len(), 1);
    pre[0].assert_jwt();
    assert_eq!(pre[0].json()["gl_repository"], GL_REPOSITORY);

    let post = s.api.calls("post_receive");
    assert_eq!(post.len(), 1, "/post_receive once, not once per replica");
    post[0].assert_jwt();
    let body = post[0].json();
    assert_eq!(body["changes"], line(&old, &new, "refs/heads/main"));
    assert_eq!(body["gl_repository"], GL_REPOSITORY);
    assert_eq!(body["identifier"], "user-7");
    assert_eq!(body["push_options"], json!(["ci.skip"]));
    // The post-receive it owed is done with: no marker left for a sweeper.
    assert!(s.c.store.pending_post_receives().await?.is_empty());
    // Every call of one push carries one correlation id.
    let ids: std::collections::BTreeSet<_> = s
        .api
        .requests()
        .iter()
        .map(|r| r.header("x-request-id").unwrap_or_default().to_owned())
        .collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
    Ok(())
}

/// What one Rails-style CheckObjectsExist call answered: whether the pushed commit
/// exists, or the gRPC code.
type Seen = Result<bool, tonic::Code>;

/// CheckObjectsExist of `commit` at `url`, reading `quarantine` when given, as Rails
/// calls it while it checks a push.
async fn exists(url: &str, quarantine: Option<&str>, commit: &str) -> Seen {
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
        .map_err(|_| tonic::Code::InvalidArgument)?
        .connect()
        .await
        .map_err(|_| tonic::Code::Unavailable)?;
    let request = CheckObjectsExistRequest {
        repository: Some(Repository {
            storage_name: "default".into(),
            relative_path: RELATIVE.into(),
            gl_repository: GL_REPOSITORY.into(),
            git_object_directory: quarantine.unwrap_or_default().into(),
            git_alternate_object_directories: if quarantine.is_some() {
                vec!["objects".into()]
            } else {
                Vec::new()
            },
            ..Default::default()
        }),
        revisions: vec![commit.as_bytes().to_vec()],
    };
    let mut answers = CommitServiceClient::new(channel)
        .check_objects_exist(tokio_stream::iter([request]))
        .await
        .map_err(|s| s.code())?
        .into_inner();
    let mut found = None;
    while let Some(r) = answers.message().await.map_err(|s| s.code())? {
        found = r.revisions.first().map(|r| r.exists).or(found);
    }
    found.ok_or(tonic::Code::Internal)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rails_callbacks_during_allowed_read_the_quarantine_of_the_designated_voter()
-> anyhow::Result<()> {
    let mut s = setup(respond(allowing)).await?;
    let router = s.c.routers[0].grpc_url();
    let nodes: Vec<(String, String)> =
        s.c.nodes
            .iter()
            .map(|n| (n.name.clone(), n.grpc_url()))
            .collect();
    let (store, repo) = (s.c.store.clone(), s.repo.clone());
    // (through the router with the quarantine, through the router without it, the
    // designated voter, each node straight with the quarantine)
    type Calls = (Seen, Seen, String, Vec<(String, Seen)>);
    let seen: Arc<std::sync::Mutex<Option<Calls>>> = Arc::default();
    let record = seen.clone();
    s.api.set_responder(Arc::new(move |req| {
        let (router, nodes, store, repo, record) = (
            router.clone(),
            nodes.clone(),
            store.clone(),
            repo.clone(),
            record.clone(),
        );
        Box::pin(async move {
            if req.path == "/api/v4/internal/allowed" {
                let body = req.json();
                let env: serde_json::Value =
                    serde_json::from_str(body["env"].as_str().unwrap_or("{}")).unwrap_or_default();
                let quarantine = env["GIT_OBJECT_DIRECTORY_RELATIVE"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                let changes = body["changes"].as_str().unwrap_or_default().to_owned();
                let commit = changes.split(' ').nth(1).unwrap_or_default().to_owned();
                let routed = exists(&router, Some(&quarantine), &commit).await;
                let plain = exists(&router, None, &commit).await;
                let designated = store
                    .gated_open_transactions(&repo)
                    .await
                    .ok()
                    .and_then(|open| open.first().and_then(|t| t.designated.clone()))
                    .unwrap_or_default();
                let mut straight = Vec::new();
                for (name, url) in &nodes {
                    straight.push((name.clone(), exists(url, Some(&quarantine), &commit).await));
                }
                *record.lock().unwrap() = Some((routed, plain, designated, straight));
            }
            allowing(&req)
        })
    }));
    let new = s.work.commit("main", "checked by rails")?;
    let proxy = s.http("user-7").await?;
    let out = s.push(&proxy, &["main"]).await?;
    assert!(
        out.status.success(),
        "{}
{}",
        text(&out),
        s.logs()
    );
    assert_eq!(s.revs("refs/heads/main"), vec![Some(new.clone()); 3]);
    let (routed, plain, designated, straight) =
        seen.lock().unwrap().take().expect("/allowed was called");
    // Routed to the voter that holds the quarantine, the new commit is seen there...
    assert_eq!(routed, Ok(true), "through the router, with the quarantine");
    // ...and nowhere else before the push is applied.
    assert_eq!(
        plain,
        Ok(false),
        "through the router, without the quarantine"
    );
    for (name, answer) in straight {
        if name == designated {
            assert_eq!(answer, Ok(true), "{name}, the designated voter");
        } else {
            // Another replica has a quarantine of its own under another name.
            assert_eq!(answer, Err(tonic::Code::NotFound), "{name}");
        }
    }
    // Once the push is over, no open push holds a quarantine: the router says so.
    let after = exists(
        &s.c.routers[0].grpc_url(),
        Some("objects/tmp_objdir-incoming-gone"),
        &new,
    )
    .await;
    assert_eq!(after, Err(tonic::Code::FailedPrecondition));
    // A node refuses a quarantine outside the repository's own area.
    let outside = exists(&s.c.nodes[0].grpc_url(), Some("../other.git/objects"), &new).await;
    assert_eq!(outside, Err(tonic::Code::InvalidArgument));
    Ok(())
}

/// Rails' answer to a push onto a protected branch.
const PROTECTED: &str = "You are not allowed to push code to protected branches on this project.";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_gitlab_refuses_is_refused_on_every_replica_with_its_message() -> anyhow::Result<()>
{
    let s = setup(respond(|r| match r.path.as_str() {
        // What Rails answers for a ForbiddenError (401, so the message is shown).
        "/api/v4/internal/allowed" => {
            Reply::json(401, json!({"status": false, "message": PROTECTED}))
        }
        _ => allowing(r),
    }))
    .await?;
    let before = s.revs("refs/heads/main");
    let new = s.work.commit("main", "not allowed")?;
    let proxy = s.http("user-7").await?;
    let out = s.push(&proxy, &["main"]).await?;
    assert!(!out.status.success(), "{}", text(&out));
    // One line on the pusher's screen, GitLab's, as with Gitaly.
    let shown = format!("remote: GitLab: {PROTECTED}");
    assert_eq!(
        text(&out).matches(&shown).count(),
        1,
        "{shown:?} once in:\n{}",
        text(&out)
    );
    assert!(
        text(&out).contains("pre-receive hook declined"),
        "{}",
        text(&out)
    );
    // Nothing written on any replica: the ref, and the new commit's objects.
    assert_eq!(s.revs("refs/heads/main"), before);
    for n in &s.c.nodes {
        assert!(
            git::git(&n.repo(RELATIVE), &["cat-file", "-e", &new]).is_err(),
            "{} holds the refused commit",
            n.name
        );
    }
    assert!(
        s.all_up_to_date().await?,
        "a refusal leaves every replica up to date"
    );
    assert_eq!(
        s.api.calls("allowed").len(),
        1,
        "checked once, by one voter"
    );
    assert_eq!(s.api.calls("pre_receive").len(), 0);
    assert_eq!(s.api.calls("post_receive").len(), 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_pre_receive_hook_that_refuses_refuses_on_every_replica() -> anyhow::Result<()> {
    // A global custom hook on every node (Gitaly's `[hooks] custom_hooks_dir`): it logs
    // where it ran (only the designated voter runs it) and refuses.
    let hooks = tempfile::tempdir()?;
    let ran = hooks.path().join("ran");
    let dir = hooks.path().join("global").join("pre-receive.d");
    std::fs::create_dir_all(&dir)?;
    let script = dir.join("freeze");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$GL_ID $GL_REPOSITORY $GL_PROTOCOL $(cat)\" >> {ran:?}\necho 'the repository is frozen' >&2\nexit 1\n"
        ),
    )?;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
    let global = hooks.path().join("global");
    let s = setup_with(respond(allowing), move |c| {
        c.hooks.custom_hooks_dir = Some(global.clone());
    })
    .await?;
    let before = s.revs("refs/heads/main");
    let old = before[0].clone().unwrap();
    let new = s.work.commit("main", "frozen")?;
    let proxy = s.http("user-7").await?;
    let out = s.push(&proxy, &["main"]).await?;
    assert!(!out.status.success(), "{}", text(&out));
    assert_eq!(
        text(&out)
            .matches("remote: the repository is frozen")
            .count(),
        1,
        "{}",
        text(&out)
    );
    assert_eq!(s.revs("refs/heads/main"), before);
    assert!(s.all_up_to_date().await?);
    // Run once, on one voter, with GitLab's environment and the changes on stdin.
    let log = std::fs::read_to_string(&ran)?;
    assert_eq!(
        log,
        format!(
            "user-7 {GL_REPOSITORY} http {}",
            line(&old, &new, "refs/heads/main")
        ),
    );
    // /allowed came first and allowed; /pre_receive never came, /post_receive neither.
    assert_eq!(s.api.calls("allowed").len(), 1);
    assert_eq!(s.api.calls("pre_receive").len(), 0);
    assert_eq!(s.api.calls("post_receive").len(), 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_designated_voter_killed_during_allowed_never_lets_the_others_commit()
-> anyhow::Result<()> {
    // /allowed is held until the test has killed the voter that called it.
    let arrived = Arc::new(Notify::new());
    let release = Arc::new(Notify::new());
    let (a, r) = (arrived.clone(), release.clone());
    let responder: Responder = Arc::new(move |req| {
        let (a, r) = (a.clone(), r.clone());
        Box::pin(async move {
            if req.path == "/api/v4/internal/allowed" {
                a.notify_one();
                let _ = tokio::time::timeout(Duration::from_secs(60), r.notified()).await;
            }
            allowing(&req)
        })
    });
    let mut s = setup(responder).await?;
    let before = s.revs("refs/heads/main");
    let new = s.work.commit("main", "unchecked")?;
    let proxy = s.http("user-7").await?;
    let url = proxy.url(RELATIVE);
    let work = s.work.path.clone();
    let push = tokio::spawn(async move { git::push(&work, Path::new(&url), &["main"], &[]).await });
    tokio::time::timeout(Duration::from_secs(60), arrived.notified())
        .await
        .map_err(|_| anyhow::anyhow!("/allowed never came\n{}", s.logs()))?;
    // The designated voter, as the transaction records it.
    let open = s.c.store.gated_open_transactions(&s.repo).await?;
    assert_eq!(open.len(), 1, "{open:?}");
    let designated = open[0].designated.clone().expect("a gated transaction");
    let victim =
        s.c.nodes
            .iter()
            .position(|n| n.name == designated)
            .expect("a node of the cluster");
    s.c.nodes[victim].kill()?;
    release.notify_one();
    let out = tokio::time::timeout(Duration::from_secs(90), push)
        .await
        .map_err(|_| anyhow::anyhow!("the push never ended\n{}", s.logs()))???;
    assert!(!out.status.success(), "{}\n{}", text(&out), s.logs());
    // No replica holds the unchecked update: neither the ref nor the objects on the
    // survivors, which agree with each other (nothing visible, nothing diverged).
    let after = s.revs("refs/heads/main");
    for (i, n) in s.c.nodes.iter().enumerate() {
        assert_eq!(after[i], before[i], "{} moved main", n.name);
        if i != victim {
            assert!(
                git::git(&n.repo(RELATIVE), &["cat-file", "-e", &new]).is_err(),
                "{} holds the unchecked commit",
                n.name
            );
        }
    }
    // Whatever the verdict became, it is no allow.
    let tx = &open[0].id;
    if let Some(v) = s.c.store.verdict(tx).await? {
        assert!(!v.allow, "{v:?}");
    }
    assert_eq!(s.api.calls("post_receive").len(), 0);
    // The survivors are still up to date: no write reached them.
    let view = s.c.store.repo_view(&s.repo).await?;
    let up: Vec<String> = view.up_to_date_live();
    for (i, n) in s.c.nodes.iter().enumerate() {
        if i != victim {
            assert!(up.contains(&n.name), "{} not up to date: {up:?}", n.name);
        }
    }
    // And the next push, with the designated voter back, goes through.
    s.c.nodes[victim].launch().await?;
    let out = s.push(&proxy, &["main"]).await?;
    assert!(out.status.success(), "{}\n{}", text(&out), s.logs());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_over_ssh_through_the_router_is_checked_once_and_post_received_once()
-> anyhow::Result<()> {
    let mut s = setup(respond(allowing)).await?;
    let old = git::rev(&s.work.path, "refs/heads/main").unwrap();
    let new = s.work.commit("main", "over ssh")?;
    let out = s.push_ssh("key-5", &["-o", "ci.skip", "main"]).await?;
    assert!(out.status.success(), "{}\n{}", text(&out), s.logs());
    // GitLab's post-receive message on the pusher's screen, once.
    let first_line = MESSAGE.lines().next().unwrap();
    assert_eq!(
        text(&out).matches(&format!("remote: {first_line}")).count(),
        1,
        "{}",
        text(&out)
    );
    assert_eq!(s.revs("refs/heads/main"), vec![Some(new.clone()); 3]);
    assert!(s.all_up_to_date().await?);

    let allowed = s.api.calls("allowed");
    assert_eq!(allowed.len(), 1, "/allowed once, not once per replica");
    allowed[0].assert_jwt();
    let body = allowed[0].json();
    assert_eq!(body["action"], "git-receive-pack");
    assert_eq!(body["changes"], line(&old, &new, "refs/heads/main"));
    assert_eq!(body["protocol"], "ssh");
    assert_eq!(body["gl_repository"], GL_REPOSITORY);
    assert_eq!(body["relative_path"], RELATIVE);
    assert_eq!(body["key_id"], "5");
    assert_eq!(body["push_options"], json!(["ci.skip"]));
    assert_eq!(s.api.calls("pre_receive").len(), 1);
    let post = s.api.calls("post_receive");
    assert_eq!(post.len(), 1, "/post_receive once, not once per replica");
    let body = post[0].json();
    assert_eq!(body["changes"], line(&old, &new, "refs/heads/main"));
    assert_eq!(body["identifier"], "key-5");
    assert_eq!(body["push_options"], json!(["ci.skip"]));

    // A second push in the same session layout: an up-to-date push answers at once.
    let out = s.push_ssh("key-5", &["main"]).await?;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(s.api.calls("allowed").len(), 1, "nothing to check");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_over_ssh_gitlab_refuses_fails_with_its_message_on_every_replica()
-> anyhow::Result<()> {
    let mut s = setup(respond(|r| match r.path.as_str() {
        "/api/v4/internal/allowed" => {
            Reply::json(401, json!({"status": false, "message": PROTECTED}))
        }
        _ => allowing(r),
    }))
    .await?;
    let before = s.revs("refs/heads/main");
    let new = s.work.commit("main", "not allowed over ssh")?;
    let out = s.push_ssh("user-7", &["main"]).await?;
    assert!(!out.status.success(), "{}\n{}", text(&out), s.logs());
    let shown = format!("remote: GitLab: {PROTECTED}");
    assert_eq!(
        text(&out).matches(&shown).count(),
        1,
        "{shown:?} once in:\n{}",
        text(&out)
    );
    assert!(
        text(&out).contains("pre-receive hook declined"),
        "{}",
        text(&out)
    );
    assert_eq!(s.revs("refs/heads/main"), before);
    for n in &s.c.nodes {
        assert!(
            git::git(&n.repo(RELATIVE), &["cat-file", "-e", &new]).is_err(),
            "{} holds the refused commit",
            n.name
        );
    }
    assert!(s.all_up_to_date().await?);
    assert_eq!(s.api.calls("allowed").len(), 1);
    assert_eq!(s.api.calls("post_receive").len(), 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_designated_voter_killed_during_allowed_over_ssh_fails_the_push() -> anyhow::Result<()>
{
    // The designated voter's session is the one passed on live (its advertisement);
    // then it dies, and the push must end failed, from the survivors' settled answer.
    let arrived = Arc::new(Notify::new());
    let release = Arc::new(Notify::new());
    let (a, r) = (arrived.clone(), release.clone());
    let responder: Responder = Arc::new(move |req| {
        let (a, r) = (a.clone(), r.clone());
        Box::pin(async move {
            if req.path == "/api/v4/internal/allowed" {
                a.notify_one();
                let _ = tokio::time::timeout(Duration::from_secs(60), r.notified()).await;
            }
            allowing(&req)
        })
    });
    let mut s = setup(responder).await?;
    let before = s.revs("refs/heads/main");
    let new = s.work.commit("main", "unchecked over ssh")?;
    let push = tokio::spawn(push_ssh(
        s.work.path.clone(),
        s.ssh_env("user-7"),
        vec!["main".into()],
    ));
    tokio::time::timeout(Duration::from_secs(60), arrived.notified())
        .await
        .map_err(|_| anyhow::anyhow!("/allowed never came\n{}", s.logs()))?;
    let open = s.c.store.gated_open_transactions(&s.repo).await?;
    assert_eq!(open.len(), 1, "{open:?}");
    let designated = open[0].designated.clone().expect("a gated transaction");
    let victim =
        s.c.nodes
            .iter()
            .position(|n| n.name == designated)
            .expect("a node of the cluster");
    s.c.nodes[victim].kill()?;
    release.notify_one();
    let out = tokio::time::timeout(Duration::from_secs(90), push)
        .await
        .map_err(|_| anyhow::anyhow!("the push never ended\n{}", s.logs()))???;
    assert!(!out.status.success(), "{}\n{}", text(&out), s.logs());
    let after = s.revs("refs/heads/main");
    for (i, n) in s.c.nodes.iter().enumerate() {
        assert_eq!(after[i], before[i], "{} moved main", n.name);
        if i != victim {
            assert!(
                git::git(&n.repo(RELATIVE), &["cat-file", "-e", &new]).is_err(),
                "{} holds the unchecked commit",
                n.name
            );
        }
    }
    assert_eq!(s.api.calls("post_receive").len(), 0);
    // With the designated voter back, the same push over SSH goes through.
    s.c.nodes[victim].launch().await?;
    let out = s.push_ssh("user-7", &["main"]).await?;
    assert!(out.status.success(), "{}\n{}", text(&out), s.logs());
    assert_eq!(s.revs("refs/heads/main"), vec![Some(new); 3]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_hooks_run_on_nodes_without_a_gitlab_url() -> anyhow::Result<()> {
    // Only `[hooks] custom_hooks_dir`, no `[gitlab]`: as in Gitaly, a GitLab user's push
    // still runs the custom hooks, once, on the designated voter, and their refusal
    // holds on every replica.
    let hooks = tempfile::tempdir()?;
    let ran = hooks.path().join("ran");
    let frozen = hooks.path().join("frozen");
    let dir = hooks.path().join("global").join("pre-receive.d");
    std::fs::create_dir_all(&dir)?;
    let script = dir.join("freeze");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$GL_ID $GL_PROTOCOL $(cat)\" >> {ran:?}\nif [ -e {frozen:?} ]; then echo 'frozen by a custom hook' >&2; exit 1; fi\n"
        ),
    )?;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
    std::fs::write(&frozen, "")?;
    let global = hooks.path().join("global");
    let opts = NodeOptions::default().config(move |c: &mut votingd::Config| {
        c.hooks.custom_hooks_dir = Some(global.clone());
    });
    let c = Fixture::nodes(3)
        .node_options(opts)
        .seeded(RELATIVE)
        .router()
        .start()
        .await?;
    let work = c.work("w")?;
    let revs = || -> Vec<Option<String>> {
        c.nodes
            .iter()
            .map(|n| git::rev(&n.repo(RELATIVE), "refs/heads/main"))
            .collect()
    };
    let before = revs();
    let old = before[0].clone().unwrap();
    let new = work.commit("main", "past the custom hook")?;
    let proxy = GitHttpProxy::start_as(
        vec![Target {
            url: c.routers[0].grpc_url(),
            storage: "default".into(),
            transaction: None,
        }],
        GitlabIdentity {
            gl_id: "user-7".into(),
            gl_username: "jane".into(),
            gl_repository: GL_REPOSITORY.into(),
            gl_project_path: PROJECT_PATH.into(),
        },
    )
    .await?;
    let url = proxy.url(RELATIVE);
    let out = git::push(&work.path, Path::new(&url), &["main"], &[]).await?;
    assert!(!out.status.success(), "{}", text(&out));
    assert_eq!(
        text(&out)
            .matches("remote: frozen by a custom hook")
            .count(),
        1,
        "{}",
        text(&out)
    );
    assert_eq!(revs(), before, "refused on every replica");
    // Unfrozen, the same push goes through everywhere.
    std::fs::remove_file(&frozen)?;
    let out = git::push(&work.path, Path::new(&url), &["main"], &[]).await?;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(revs(), vec![Some(new.clone()); 3]);
    // Run once per push (on one voter), with GitLab's environment and the changes.
    let log = std::fs::read_to_string(&ran)?;
    let once = format!("user-7 http {}", line(&old, &new, "refs/heads/main"));
    assert_eq!(log, format!("{once}{once}"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_receive_down_leaves_the_push_acknowledged_retried_and_logged() -> anyhow::Result<()> {
    // A gateway in front of GitLab answers 502: GitLab cannot have run post-receive, so
    // it is retried (three calls in all), logged, and the push stands. Over SSH, so the
    // interactive answer ends well without post-receive's messages.
    let mut s = setup(respond(|r| match r.path.as_str() {
        "/api/v4/internal/post_receive" => Reply::json(502, json!({"message": "502 Bad Gateway"})),
        _ => allowing(r),
    }))
    .await?;
    let new = s.work.commit("main", "post-receive is down")?;
    let out = s.push_ssh("user-7", &["main"]).await?;
    assert!(out.status.success(), "{}\n{}", text(&out), s.logs());
    let first_line = MESSAGE.lines().next().unwrap();
    assert!(!text(&out).contains(first_line), "{}", text(&out));
    assert_eq!(s.revs("refs/heads/main"), vec![Some(new); 3]);
    assert!(s.all_up_to_date().await?);
    assert_eq!(s.api.calls("allowed").len(), 1);
    assert_eq!(
        s.api.calls("post_receive").len(),
        3,
        "bounded retries of a call GitLab cannot have run"
    );
    let logs: String =
        s.c.nodes
            .iter()
            .map(|n| n.log_tail(400))
            .collect::<Vec<_>>()
            .join("\n");
    assert_eq!(
        logs.matches("post-receive failed; retrying").count(),
        2,
        "{logs}"
    );
    assert!(logs.contains("the push stands"), "{logs}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_receive_of_a_router_killed_before_asking_runs_once_on_another_router()
-> anyhow::Result<()> {
    // router1 stops (a fault hold) after finalizing an acknowledged gated push and
    // before asking a voter for post-receive, and is killed there by its pid; router2's
    // sweeper finds the pending marker written with the outcome and runs post-receive
    // once, with the changes as committed.
    use refvote_tests::hold::Hold;
    use refvote_tests::router::RouterOptions;
    let api_dir = tempfile::tempdir()?;
    let api = GitlabApi::start(api_dir.path(), respond(allowing)).await?;
    let opts = NodeOptions::default().config(api.configure());
    let mut c = Fixture::nodes(3)
        .node_options(opts)
        .seeded(RELATIVE)
        .router()
        .router_with(RouterOptions::default().config(|r| r.post_receive_grace_ms = 1000))
        .start()
        .await?;
    let hold = Hold::new(refvote_cluster::faults::BEFORE_POST_RECEIVE, 1)?;
    c.routers[0].stop()?;
    c.routers[0].env = hold.env();
    c.routers[0].launch().await?;
    let work = c.work("w")?;
    let old = git::rev(&work.path, "refs/heads/main").unwrap();
    let new = work.commit("main", "its router dies before post-receive")?;
    let proxy = GitHttpProxy::start_as(
        vec![Target {
            url: c.routers[0].grpc_url(),
            storage: "default".into(),
            transaction: None,
        }],
        GitlabIdentity {
            gl_id: "user-7".into(),
            gl_username: "jane".into(),
            gl_repository: GL_REPOSITORY.into(),
            gl_project_path: PROJECT_PATH.into(),
        },
    )
    .await?;
    let url = proxy.url(RELATIVE);
    let path = work.path.clone();
    let push = tokio::spawn(async move {
        git::push(&path, Path::new(&url), &["-o", "ci.skip", "main"], &[]).await
    });
    let logs = |c: &VoteCluster| {
        c.routers
            .iter()
            .map(|r| format!("--- {}\n{}", r.name, r.log_tail(40)))
            .collect::<Vec<_>>()
            .join("\n")
    };
    hold.wait_reached(Duration::from_secs(60))
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", logs(&c)))?;
    // Finalized and acknowledged: committed on every replica, post-receive owed.
    let pending = c.store.pending_post_receives().await?;
    assert_eq!(pending.len(), 1, "{pending:?}");
    assert_eq!(pending[0].finalized_by, "router1");
    assert_eq!(pending[0].promoted.len(), 3, "{pending:?}");
    assert_eq!(api.calls("post_receive").len(), 0, "not asked yet");
    let pid = c.routers[0].pid().expect("router1 runs");
    c.routers[0].kill()?;
    assert!(!c.routers[0].is_running(), "router1 (pid {pid}) is dead");
    let out = tokio::time::timeout(Duration::from_secs(60), push).await???;
    assert!(!out.status.success(), "its router died: {}", text(&out));
    let revs: Vec<_> = c
        .nodes
        .iter()
        .map(|n| git::rev(&n.repo(RELATIVE), "refs/heads/main"))
        .collect();
    assert_eq!(revs, vec![Some(new.clone()); 3]);

    // router2 runs it, once, and the marker goes.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !(api.calls("post_receive").len() == 1
        && c.store.pending_post_receives().await?.is_empty())
    {
        assert!(
            std::time::Instant::now() < deadline,
            "post-receive never swept: {} calls\n{}",
            api.calls("post_receive").len(),
            logs(&c)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Past router1's lease (3 s) and several sweeps: still once.
    let watch_until = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < watch_until {
        assert_eq!(api.calls("post_receive").len(), 1, "{}", logs(&c));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let post = api.calls("post_receive");
    post[0].assert_jwt();
    let body = post[0].json();
    assert_eq!(body["changes"], line(&old, &new, "refs/heads/main"));
    assert_eq!(body["gl_repository"], GL_REPOSITORY);
    assert_eq!(body["identifier"], "user-7");
    assert_eq!(body["push_options"], json!(["ci.skip"]));
    assert!(
        c.routers[1]
            .log_tail(400)
            .contains("running a post-receive its router did not ask for"),
        "{}",
        logs(&c)
    );
    assert_eq!(api.calls("allowed").len(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_receive_runs_once_from_its_marker_after_every_promoted_voter_restarted()
-> anyhow::Result<()> {
    // The router stops (a fault hold) after finalizing an acknowledged gated push and
    // before asking a voter for post-receive; meanwhile every promoted voter's votingd
    // is killed by its pid and started again, so no node remembers the call. Released,
    // the router asks the designated voter, which runs post-receive from what the
    // pending marker carries: once, with the committed changes, the pusher's identity
    // and push options, and the pusher reads GitLab's messages.
    use refvote_tests::hold::Hold;
    use refvote_tests::router::RouterOptions;
    let api_dir = tempfile::tempdir()?;
    let api = GitlabApi::start(api_dir.path(), respond(allowing)).await?;
    let opts = NodeOptions::default().config(api.configure());
    // The router's own sweeper waits a minute: the held ask is the one that runs it.
    let mut c = Fixture::nodes(3)
        .node_options(opts)
        .seeded(RELATIVE)
        .router_with(RouterOptions::default().config(|r| r.post_receive_grace_ms = 60_000))
        .start()
        .await?;
    let hold = Hold::new(refvote_cluster::faults::BEFORE_POST_RECEIVE, 1)?;
    c.routers[0].stop()?;
    c.routers[0].env = hold.env();
    c.routers[0].launch().await?;
    let work = c.work("w")?;
    let old = git::rev(&work.path, "refs/heads/main").unwrap();
    let new = work.commit("main", "every voter restarts before post-receive")?;
    let proxy = GitHttpProxy::start_as(
        vec![Target {
            url: c.routers[0].grpc_url(),
            storage: "default".into(),
            transaction: None,
        }],
        GitlabIdentity {
            gl_id: "user-7".into(),
            gl_username: "jane".into(),
            gl_repository: GL_REPOSITORY.into(),
            gl_project_path: PROJECT_PATH.into(),
        },
    )
    .await?;
    let url = proxy.url(RELATIVE);
    let path = work.path.clone();
    let push = tokio::spawn(async move {
        git::push(
            &path,
            Path::new(&url),
            &["-o", "ci.skip", "-o", "merge_request.create", "main"],
            &[],
        )
        .await
    });
    let logs = |c: &VoteCluster| {
        c.routers
            .iter()
            .map(|r| format!("--- {}\n{}", r.name, r.log_tail(40)))
            .chain(
                c.nodes
                    .iter()
                    .map(|n| format!("--- {}\n{}", n.name, n.log_tail(40))),
            )
            .collect::<Vec<_>>()
            .join("\n")
    };
    hold.wait_reached(Duration::from_secs(60))
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", logs(&c)))?;
    let changes = line(&old, &new, "refs/heads/main");
    let pending = c.store.pending_post_receives().await?;
    assert_eq!(pending.len(), 1, "{pending:?}");
    assert_eq!(pending[0].promoted.len(), 3, "{pending:?}");
    // The marker carries what the run needs, from a promoted voter's done record.
    let carried = &pending[0].post_receive;
    assert_eq!(carried["changes"], changes, "{carried}");
    assert_eq!(carried["gl_id"], "user-7", "{carried}");
    assert_eq!(carried["gl_repository"], GL_REPOSITORY, "{carried}");
    assert_eq!(
        carried["push_options"],
        json!(["ci.skip", "merge_request.create"])
    );
    assert_eq!(api.calls("post_receive").len(), 0, "not asked yet");

    // Every promoted voter restarts: killed by its pid, started again.
    for name in &pending[0].promoted {
        let node = c
            .nodes
            .iter_mut()
            .find(|n| &n.name == name)
            .expect("a promoted voter is a node of the cluster");
        let pid = node.pid().expect("the node runs");
        node.kill()?;
        assert!(!node.is_running(), "{name} (pid {pid}) is dead");
        node.launch().await?;
        assert_ne!(node.pid(), Some(pid), "{name} runs as a new process");
    }
    assert_eq!(api.calls("post_receive").len(), 0, "a restart runs nothing");
    hold.release();

    let out = tokio::time::timeout(Duration::from_secs(60), push).await???;
    assert!(out.status.success(), "{}\n{}", text(&out), logs(&c));
    assert!(
        text(&out).contains(MESSAGE.lines().next().unwrap()),
        "the pusher reads GitLab's messages: {}",
        text(&out)
    );
    let revs: Vec<_> = c
        .nodes
        .iter()
        .map(|n| git::rev(&n.repo(RELATIVE), "refs/heads/main"))
        .collect();
    assert_eq!(revs, vec![Some(new.clone()); 3]);
    assert!(c.store.pending_post_receives().await?.is_empty());
    // Several seconds more: still once.
    let watch_until = std::time::Instant::now() + Duration::from_secs(4);
    while std::time::Instant::now() < watch_until {
        assert_eq!(api.calls("post_receive").len(), 1, "{}", logs(&c));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let post = api.calls("post_receive");
    post[0].assert_jwt();
    let body = post[0].json();
    assert_eq!(body["changes"], changes);
    assert_eq!(body["gl_repository"], GL_REPOSITORY);
    assert_eq!(body["identifier"], "user-7");
    assert_eq!(
        body["push_options"],
        json!(["ci.skip", "merge_request.create"])
    );
    let allowed = api.calls("allowed");
    assert_eq!(allowed.len(), 1);
    assert_eq!(
        post[0].header("x-request-id"),
        allowed[0].header("x-request-id"),
        "the same correlation id as the checks"
    );
    assert!(
        c.nodes.iter().any(|n| n
            .log_tail(400)
            .contains("running post-receive from its pending marker")),
        "{}",
        logs(&c)
    );
    Ok(())
}
