//! GitLab's hooks inside the vote (DESIGN.md §8), against a real etcd, three real
//! votingd nodes, a real router, real git, and a real HTTP server standing in for
//! GitLab's internal API that asserts what it receives: a push by a GitLab user (over
//! git's smart HTTP the way workhorse sends it, and over SSHReceivePack the way
//! gitlab-shell does) is checked once and post-received once, not once per replica; a
//! refusal by GitLab or by a custom hook refuses on every replica with its message on
//! the pusher's screen; Rails' callbacks during `/allowed` read the push's quarantine;
//! the designated voter killed during `/allowed` never lets the others commit;
//! `/post_receive` failures leave the push standing, retried and logged; operations by
//! a user run the same checks and answer Gitaly's structured errors.

use std::sync::Arc;
use std::time::Duration;

use refvote_cluster::RepoId;
use refvote_proto::gitaly::commit_service_client::CommitServiceClient;
use refvote_proto::gitaly::operation_service_client::OperationServiceClient;
use refvote_proto::gitaly::{
    AccessCheckError, CheckObjectsExistRequest, ListCommitsRequest, Repository, User,
    UserCommitFilesError, UserCommitFilesRequest, UserCommitFilesRequestHeader,
    UserCreateBranchRequest, UserCreateTagError, UserCreateTagRequest, UserDeleteBranchError,
    UserDeleteBranchRequest, custom_hook_error, user_commit_files_action,
    user_commit_files_action_header, user_commit_files_request, user_create_tag_error,
    user_delete_branch_error,
};
use refvote_tests::cluster::VoteCluster;
use refvote_tests::git::{self, WorkRepo};
use refvote_tests::gitlab::{GitlabApi, MESSAGE, Recorded, Reply, Responder, allowing, respond};
use refvote_tests::node::{NodeOptions, bin};
use refvote_tests::router::Router;
use refvote_tests::smarthttp::{GitHttpProxy, GitlabIdentity, Target};
use serde_json::json;
use tonic::Code;

const RELATIVE: &str = "@hashed/ab/cd/project.git";
const GL_REPOSITORY: &str = "project-42";
const PROJECT_PATH: &str = "group/project";

/// A cluster of three nodes calling `api`, a router, and `RELATIVE` with `main` on
/// every replica (pushed outside refvote, so GitLab saw nothing yet).
struct Setup {
    c: VoteCluster,
    router: Router,
    api: GitlabApi,
    work: WorkRepo,
    repo: RepoId,
    _api_dir: tempfile::TempDir,
}

async fn setup_with(responder: Responder, node_config: &str) -> anyhow::Result<Setup> {
    let api_dir = tempfile::tempdir()?;
    let api = GitlabApi::start(api_dir.path(), responder).await?;
    let opts = NodeOptions {
        extra_config: format!("{}{node_config}", api.node_config()),
        ..NodeOptions::default()
    };
    let c = VoteCluster::start_with(3, 1, opts).await?;
    let repo = c.create_repo(RELATIVE).await?;
    let work = c.work("w")?;
    work.commit("main", "first")?;
    for n in &c.nodes {
        let out = git::push(&work.path, &n.repo(RELATIVE), &["main"], &[]).await?;
        anyhow::ensure!(out.status.success(), "{out:?}");
    }
    let router = Router::start("router1", c.dir.path(), &c.etcd.endpoints()).await?;
    Ok(Setup {
        c,
        router,
        api,
        work,
        repo,
        _api_dir: api_dir,
    })
}

async fn setup(responder: Responder) -> anyhow::Result<Setup> {
    setup_with(responder, "").await
}

impl Setup {
    /// A workhorse-like front for git's smart HTTP, naming the pusher `gl_id`.
    async fn http(&self, gl_id: &str) -> anyhow::Result<GitHttpProxy> {
        GitHttpProxy::start_as(
            vec![Target {
                url: self.router.grpc_url(),
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
    async fn push(&self, proxy: &GitHttpProxy, args: &[&str]) -> anyhow::Result<std::process::Output> {
        let url = proxy.url(RELATIVE);
        git::push(&self.work.path, std::path::Path::new(&url), args, &[]).await
    }

    /// Where `refname` points on every node.
    fn revs(&self, refname: &str) -> Vec<Option<String>> {
        self.c
            .nodes
            .iter()
            .map(|n| git::rev(&n.repo(RELATIVE), refname))
            .collect()
    }

    fn repository(&self) -> Option<Repository> {
        Some(Repository {
            storage_name: "default".into(),
            relative_path: RELATIVE.into(),
            gl_repository: GL_REPOSITORY.into(),
            gl_project_path: PROJECT_PATH.into(),
            ..Default::default()
        })
    }

    /// Every replica up to date at the repository's generation.
    async fn all_up_to_date(&self) -> anyhow::Result<bool> {
        let view = self.c.store.repo_view(&self.repo).await?;
        Ok(view.up_to_date_live().len() == 3)
    }
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
    assert!(objects.starts_with("objects/incoming-"), "{env}");
    assert_eq!(env["GIT_ALTERNATE_OBJECT_DIRECTORIES_RELATIVE"], json!(["objects"]));

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
