//! GitLab's hooks for the `User*` operations Rails calls on behalf of a user (DESIGN.md
//! §8), through a real router in front of three real votingd nodes on a real etcd, with
//! real git and a real HTTP server standing in for GitLab's internal API that records
//! what it receives: an operation's one ref update is checked as a push of that change
//! (`/allowed` with protocol `web` and the change, once, not once per replica); a
//! refusal by GitLab or by a custom hook answers Gitaly's status for that RPC — code,
//! message and structured detail as Gitaly's `internal/gitaly/service/operations`
//! builds them — and moves no ref on any replica; an allowed operation is
//! post-received once.
//!
//! The details are decoded here from the status's bytes (`google.rpc.Status` with
//! `Any`-wrapped errors), without the code under test.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use prost::Message;
use refvote_cluster::RepoId;
use refvote_proto::gitaly::operation_service_client::OperationServiceClient;
use refvote_proto::gitaly::user_commit_files_action_header::ActionType;
use refvote_proto::gitaly::{
    AccessCheckError, CustomHookError, Repository, User, UserCommitFilesAction,
    UserCommitFilesActionHeader, UserCommitFilesError, UserCommitFilesRequest,
    UserCommitFilesRequestHeader, UserCreateBranchError, UserCreateBranchRequest,
    UserCreateTagError, UserCreateTagRequest, UserDeleteBranchError, UserDeleteBranchRequest,
    UserDeleteTagRequest, custom_hook_error, user_commit_files_action, user_commit_files_error,
    user_commit_files_request, user_create_branch_error, user_create_tag_error,
    user_delete_branch_error,
};
use refvote_tests::cluster::{Fixture, VoteCluster};
use refvote_tests::git;
use refvote_tests::gitlab::{GitlabApi, Reply, Responder, allowing, respond};
use refvote_tests::node::NodeOptions;
use serde_json::json;
use tonic::transport::Channel;
use tonic::{Code, Status};

const RELATIVE: &str = "@hashed/ab/cd/project.git";
const GL_REPOSITORY: &str = "project-42";
const ZERO: &str = "0000000000000000000000000000000000000000";
/// What Rails answers a user who may not touch a protected branch.
const PROTECTED: &str = "You are not allowed to push code to protected branches on this project.";

/// Three nodes calling `api` (and running the custom hooks under `custom_hooks_dir`,
/// if given), a router, and `RELATIVE` with `main` on every replica.
struct Setup {
    c: VoteCluster,
    api: GitlabApi,
    repo: RepoId,
    _api_dir: tempfile::TempDir,
}

async fn setup(responder: Responder, custom_hooks_dir: Option<PathBuf>) -> anyhow::Result<Setup> {
    let api_dir = tempfile::tempdir()?;
    let api = GitlabApi::start(api_dir.path(), responder).await?;
    let opts =
        NodeOptions::default()
            .config(api.configure())
            .config(move |c: &mut votingd::Config| {
                c.hooks.custom_hooks_dir = custom_hooks_dir.clone();
            });
    let c = Fixture::nodes(3)
        .node_options(opts)
        .seeded(RELATIVE)
        .router()
        .start()
        .await?;
    let repo = c.repo_id(RELATIVE);
    Ok(Setup {
        c,
        api,
        repo,
        _api_dir: api_dir,
    })
}

impl Setup {
    async fn client(&self) -> anyhow::Result<OperationServiceClient<Channel>> {
        Ok(OperationServiceClient::new(
            self.c.routers[0].channel().await?,
        ))
    }

    /// Where `refname` points on every node.
    fn revs(&self, refname: &str) -> Vec<Option<String>> {
        self.c
            .nodes
            .iter()
            .map(|n| git::rev(&n.repo(RELATIVE), refname))
            .collect()
    }

    /// `main` on the first node (every replica has the same).
    fn main(&self) -> String {
        git::rev(&self.c.nodes[0].repo(RELATIVE), "refs/heads/main").expect("main is seeded")
    }

    async fn all_up_to_date(&self) -> anyhow::Result<bool> {
        let view = self.c.store.repo_view(&self.repo).await?;
        Ok(view.up_to_date_live().len() == 3)
    }
}

/// The repository as Rails names it in an operation: with its GitLab identity.
fn repo(relative: &str) -> Option<Repository> {
    Some(Repository {
        storage_name: "default".into(),
        relative_path: relative.into(),
        gl_repository: GL_REPOSITORY.into(),
        gl_project_path: "group/project".into(),
        ..Default::default()
    })
}

/// Rails' user, as `Gitlab::Git::User#to_gitaly` sends it.
fn user() -> Option<User> {
    Some(User {
        gl_id: "user-7".into(),
        name: b"Jane Doe".to_vec(),
        email: b"jane@example.com".to_vec(),
        gl_username: "jane".into(),
        timezone: "UTC".into(),
    })
}

fn line(old: &str, new: &str, reference: &str) -> String {
    format!("{old} {new} {reference}\n")
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

/// The one detail of `status`, which must be named `gitaly.<type_name>`.
fn detail<M: Message + Default>(status: &Status, type_name: &str) -> M {
    let rpc = RpcStatus::decode(status.details())
        .unwrap_or_else(|e| panic!("{status:?} carries no google.rpc.Status: {e}"));
    assert_eq!(rpc.code, status.code() as i32);
    assert_eq!(rpc.message, status.message());
    assert_eq!(rpc.details.len(), 1, "{rpc:?}");
    assert_eq!(
        rpc.details[0].type_url,
        format!("type.googleapis.com/gitaly.{type_name}")
    );
    M::decode(rpc.details[0].value.as_slice()).expect("the detail decodes")
}

/// The access-check detail every refusal by `/allowed` carries.
fn refused_by_gitlab(changes: &str) -> AccessCheckError {
    AccessCheckError {
        error_message: PROTECTED.into(),
        protocol: "web".into(),
        user_id: "user-7".into(),
        changes: changes.as_bytes().to_vec(),
    }
}

fn commit_files(branch: &str, path: &str, content: &str) -> Vec<UserCommitFilesRequest> {
    let action = |payload| UserCommitFilesRequest {
        user_commit_files_request_payload: Some(
            user_commit_files_request::UserCommitFilesRequestPayload::Action(
                UserCommitFilesAction {
                    user_commit_files_action_payload: Some(payload),
                },
            ),
        ),
    };
    let header = UserCommitFilesRequestHeader {
        repository: repo(RELATIVE),
        user: user(),
        branch_name: branch.as_bytes().to_vec(),
        commit_message: b"edited in the web editor".to_vec(),
        ..Default::default()
    };
    vec![
        UserCommitFilesRequest {
            user_commit_files_request_payload: Some(
                user_commit_files_request::UserCommitFilesRequestPayload::Header(header),
            ),
        },
        action(
            user_commit_files_action::UserCommitFilesActionPayload::Header(
                UserCommitFilesActionHeader {
                    action: ActionType::Create as i32,
                    file_path: path.as_bytes().to_vec(),
                    ..Default::default()
                },
            ),
        ),
        action(
            user_commit_files_action::UserCommitFilesActionPayload::Content(
                content.as_bytes().to_vec(),
            ),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_gitlab_refuses_answer_gitalys_access_check_errors_and_move_no_replica()
-> anyhow::Result<()> {
    // What Rails answers for a ForbiddenError: 401 with the message.
    let s = setup(
        respond(|r| match r.path.as_str() {
            "/api/v4/internal/allowed" => {
                Reply::json(401, json!({"status": false, "message": PROTECTED}))
            }
            _ => allowing(r),
        }),
        None,
    )
    .await?;
    let mut client = s.client().await?;
    let main = s.main();

    // UserDeleteBranch: PERMISSION_DENIED with the access_check arm.
    let e = client
        .user_delete_branch(UserDeleteBranchRequest {
            repository: repo(RELATIVE),
            branch_name: b"main".to_vec(),
            user: user(),
            expected_old_oid: String::new(),
        })
        .await
        .expect_err("GitLab refused the deletion");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert_eq!(
        e.message(),
        format!("deletion denied by access checks: running pre-receive hooks: GitLab: {PROTECTED}")
    );
    let d: UserDeleteBranchError = detail(&e, "UserDeleteBranchError");
    assert_eq!(
        d.error,
        Some(user_delete_branch_error::Error::AccessCheck(
            refused_by_gitlab(&line(&main, ZERO, "refs/heads/main"))
        ))
    );
    assert_eq!(s.revs("refs/heads/main"), vec![Some(main.clone()); 3]);

    // UserCreateTag: PERMISSION_DENIED with its access_check arm.
    let e = client
        .user_create_tag(UserCreateTagRequest {
            repository: repo(RELATIVE),
            tag_name: b"v1.0".to_vec(),
            user: user(),
            target_revision: b"main".to_vec(),
            ..Default::default()
        })
        .await
        .expect_err("GitLab refused the tag");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert_eq!(
        e.message(),
        format!(
            "reference update denied by access checks: running pre-receive hooks: GitLab: {PROTECTED}"
        )
    );
    let d: UserCreateTagError = detail(&e, "UserCreateTagError");
    assert_eq!(
        d.error,
        Some(user_create_tag_error::Error::AccessCheck(
            refused_by_gitlab(&line(ZERO, &main, "refs/tags/v1.0"))
        ))
    );

    // UserCommitFiles: its error wraps the update's in "update reference: ".
    let requests = commit_files("main", "README.md", "hello\n");
    let e = client
        .user_commit_files(tokio_stream::iter(requests))
        .await
        .expect_err("GitLab refused the commit");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let prefix = "denied by access checks: update reference: running pre-receive hooks: GitLab: ";
    assert_eq!(e.message(), format!("{prefix}{PROTECTED}"));
    let d: UserCommitFilesError = detail(&e, "UserCommitFilesError");
    let Some(user_commit_files_error::Error::AccessCheck(a)) = d.error else {
        panic!("{d:?}")
    };
    // The change names the commit the operation built on main (the same on every
    // replica), which no ref reaches.
    let changes = String::from_utf8(a.changes.clone())?;
    let built = changes.split(' ').nth(1).unwrap_or_default().to_owned();
    assert_eq!(changes, line(&main, &built, "refs/heads/main"));
    assert_eq!(
        (
            a.error_message.as_str(),
            a.protocol.as_str(),
            a.user_id.as_str()
        ),
        (PROTECTED, "web", "user-7")
    );

    // UserCreateBranch: its error has no access_check arm, so Gitaly's catch-all
    // answers: INTERNAL, the hook's error, no detail.
    let e = client
        .user_create_branch(UserCreateBranchRequest {
            repository: repo(RELATIVE),
            branch_name: b"feature".to_vec(),
            user: user(),
            start_point: b"main".to_vec(),
        })
        .await
        .expect_err("GitLab refused the branch");
    assert_eq!(e.code(), Code::Internal, "{e:?}");
    assert_eq!(
        e.message(),
        format!("running pre-receive hooks: GitLab: {PROTECTED}")
    );
    assert!(
        RpcStatus::decode(e.details()).map_or(true, |r| r.details.is_empty()),
        "no structured detail"
    );

    // Nothing moved anywhere; checked once per operation, never post-received.
    assert_eq!(s.revs("refs/heads/main"), vec![Some(main.clone()); 3]);
    assert_eq!(s.revs("refs/heads/feature"), vec![None; 3]);
    assert_eq!(s.revs("refs/tags/v1.0"), vec![None; 3]);
    assert!(
        s.all_up_to_date().await?,
        "a refusal leaves every replica up to date"
    );
    let allowed = s.api.calls("allowed");
    assert_eq!(
        allowed.len(),
        4,
        "one check per operation, not one per replica"
    );
    for a in &allowed {
        a.assert_jwt();
        let body = a.json();
        assert_eq!(body["action"], "git-receive-pack");
        assert_eq!(body["protocol"], "web");
        assert_eq!(body["gl_repository"], GL_REPOSITORY);
        assert_eq!(body["relative_path"], RELATIVE);
        assert_eq!(body["user_id"], "7");
    }
    let changes: Vec<_> = allowed
        .iter()
        .map(|a| a.json()["changes"].clone())
        .collect();
    assert_eq!(
        changes,
        vec![
            json!(line(&main, ZERO, "refs/heads/main")),
            json!(line(ZERO, &main, "refs/tags/v1.0")),
            json!(line(&main, &built, "refs/heads/main")),
            json!(line(ZERO, &main, "refs/heads/feature")),
        ]
    );
    assert_eq!(s.api.calls("pre_receive").len(), 0);
    assert_eq!(s.api.calls("post_receive").len(), 0);
    Ok(())
}

/// A global custom pre-receive hook (`[hooks] custom_hooks_dir`) that logs each run
/// to `ran` and, while the file `frozen` exists, refuses with output on both streams.
fn freezing_hook(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf, PathBuf)> {
    let (ran, frozen) = (dir.join("ran"), dir.join("frozen"));
    let hooks = dir.join("global").join("pre-receive.d");
    std::fs::create_dir_all(&hooks)?;
    let script = hooks.join("freeze");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$GL_ID $GL_PROTOCOL $(cat)\" >> {ran:?}\nif [ -e {frozen:?} ]; then echo \"checked $GL_ID\"; echo 'GL-HOOK-ERR: the repository is frozen' >&2; exit 1; fi\n"
        ),
    )?;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
    Ok((dir.join("global"), ran, frozen))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_a_custom_hook_refuses_answer_gitalys_custom_hook_errors() -> anyhow::Result<()>
{
    let hooks = tempfile::tempdir()?;
    let (global, ran, frozen) = freezing_hook(hooks.path())?;
    let s = setup(respond(allowing), Some(global)).await?;
    let mut client = s.client().await?;
    let main = s.main();
    // A tag made while the hook lets everything pass, to delete later.
    client
        .user_create_tag(UserCreateTagRequest {
            repository: repo(RELATIVE),
            tag_name: b"v1.0".to_vec(),
            user: user(),
            target_revision: b"main".to_vec(),
            ..Default::default()
        })
        .await?;
    assert_eq!(s.revs("refs/tags/v1.0"), vec![Some(main.clone()); 3]);
    std::fs::write(&frozen, "")?;

    let hook_error = CustomHookError {
        stdout: b"checked user-7\n".to_vec(),
        stderr: b"GL-HOOK-ERR: the repository is frozen\n".to_vec(),
        hook_type: custom_hook_error::HookType::Prereceive as i32,
    };
    // UserCreateBranch: PERMISSION_DENIED, the hook's stderr as it is, the custom_hook
    // arm with both streams.
    let e = client
        .user_create_branch(UserCreateBranchRequest {
            repository: repo(RELATIVE),
            branch_name: b"feature".to_vec(),
            user: user(),
            start_point: b"main".to_vec(),
        })
        .await
        .expect_err("the custom hook refused");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert_eq!(
        e.message(),
        "creation denied by custom hooks: running pre-receive hooks: GL-HOOK-ERR: the repository is frozen\n"
    );
    let d: UserCreateBranchError = detail(&e, "UserCreateBranchError");
    assert_eq!(
        d.error,
        Some(user_create_branch_error::Error::CustomHook(
            hook_error.clone()
        ))
    );

    // UserDeleteBranch: its custom_hook arm.
    let e = client
        .user_delete_branch(UserDeleteBranchRequest {
            repository: repo(RELATIVE),
            branch_name: b"main".to_vec(),
            user: user(),
            expected_old_oid: String::new(),
        })
        .await
        .expect_err("the custom hook refused");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert_eq!(
        e.message(),
        "deletion denied by custom hooks: running pre-receive hooks: GL-HOOK-ERR: the repository is frozen\n"
    );
    let d: UserDeleteBranchError = detail(&e, "UserDeleteBranchError");
    assert_eq!(
        d.error,
        Some(user_delete_branch_error::Error::CustomHook(
            hook_error.clone()
        ))
    );

    // UserDeleteTag: Gitaly answers OK with the hook's output in pre_receive_error.
    let answer = client
        .user_delete_tag(UserDeleteTagRequest {
            repository: repo(RELATIVE),
            tag_name: b"v1.0".to_vec(),
            user: user(),
            expected_old_oid: String::new(),
        })
        .await?
        .into_inner();
    assert_eq!(
        answer.pre_receive_error,
        "GL-HOOK-ERR: the repository is frozen\n"
    );

    // Nothing moved anywhere, every replica up to date.
    assert_eq!(s.revs("refs/heads/main"), vec![Some(main.clone()); 3]);
    assert_eq!(s.revs("refs/heads/feature"), vec![None; 3]);
    assert_eq!(s.revs("refs/tags/v1.0"), vec![Some(main.clone()); 3]);
    assert!(s.all_up_to_date().await?);
    // The hook ran once per operation (on one voter), with GitLab's environment and
    // the operation's change on stdin.
    let log = std::fs::read_to_string(&ran)?;
    assert_eq!(
        log,
        [
            line(ZERO, &main, "refs/tags/v1.0"),
            line(ZERO, &main, "refs/heads/feature"),
            line(&main, ZERO, "refs/heads/main"),
            line(&main, ZERO, "refs/tags/v1.0"),
        ]
        .iter()
        .map(|l| format!("user-7 web {l}"))
        .collect::<String>()
    );
    // /allowed passed each time; /pre_receive only for the one that got past the hook.
    assert_eq!(s.api.calls("allowed").len(), 4);
    assert_eq!(s.api.calls("pre_receive").len(), 1);
    assert_eq!(s.api.calls("post_receive").len(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowed_operation_is_checked_once_and_post_received_once() -> anyhow::Result<()> {
    let s = setup(respond(allowing), None).await?;
    let mut client = s.client().await?;
    let main = s.main();
    let answer = client
        .user_create_branch(UserCreateBranchRequest {
            repository: repo(RELATIVE),
            branch_name: b"feature".to_vec(),
            user: user(),
            start_point: b"main".to_vec(),
        })
        .await?
        .into_inner();
    let branch = answer.branch.expect("the branch");
    assert_eq!(branch.name, b"feature");
    assert_eq!(s.revs("refs/heads/feature"), vec![Some(main.clone()); 3]);
    assert!(s.all_up_to_date().await?);

    let change = line(ZERO, &main, "refs/heads/feature");
    let allowed = s.api.calls("allowed");
    assert_eq!(allowed.len(), 1, "/allowed once, not once per replica");
    allowed[0].assert_jwt();
    let body = allowed[0].json();
    assert_eq!(body["changes"], change);
    assert_eq!(body["protocol"], "web");
    assert_eq!(body["user_id"], "7");
    let pre = s.api.calls("pre_receive");
    assert_eq!(pre.len(), 1);
    assert_eq!(pre[0].json()["gl_repository"], GL_REPOSITORY);
    let post = s.api.calls("post_receive");
    assert_eq!(post.len(), 1, "/post_receive once, not once per replica");
    post[0].assert_jwt();
    let body = post[0].json();
    assert_eq!(body["changes"], change);
    assert_eq!(body["gl_repository"], GL_REPOSITORY);
    assert_eq!(body["identifier"], "user-7");
    // One correlation id for the operation's calls.
    let ids: std::collections::BTreeSet<_> = s
        .api
        .requests()
        .iter()
        .map(|r| r.header("x-request-id").unwrap_or_default().to_owned())
        .collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
    Ok(())
}
