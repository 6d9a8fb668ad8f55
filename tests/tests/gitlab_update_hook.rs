//! A custom `update` hook (Gitaly's `[hooks] custom_hooks_dir`, `update.d`) that refuses
//! some refs, against a real etcd, three real votingd nodes, a real router, real git
//! over git's smart HTTP and a real HTTP server standing in for GitLab's internal API:
//!
//! - a push of two refs, one refused: the refused ref moves on no replica, the other
//!   lands on all three, the pusher reads the hook's words once and git's `hook
//!   declined` for that ref, `/post_receive` gets only the ref that landed, and the
//!   hook ran once per ref (on one voter) with Gitaly's arguments and environment;
//! - `UserCreateBranch` of a refused name answers as Gitaly's UpdaterWithHooks does
//!   (`internal/gitaly/hook/updateref/update_with_hooks.go`, "running update hooks:"
//!   and the hook's stderr; `internal/gitaly/service/operations/user_create_branch.go`,
//!   `PERMISSION_DENIED` "creation denied by custom hooks: …") with a `CustomHookError`
//!   of `hook_type` UPDATE carrying both streams — what the passing custom pre-receive
//!   hook printed first, as Gitaly's hooks share their buffers.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use prost::Message;
use refvote_proto::gitaly::operation_service_client::OperationServiceClient;
use refvote_proto::gitaly::{
    CustomHookError, Repository, User, UserCreateBranchError, UserCreateBranchRequest,
    custom_hook_error, user_create_branch_error,
};
use refvote_tests::cluster::Fixture;
use refvote_tests::git;
use refvote_tests::gitlab::{GitlabApi, allowing, respond};
use refvote_tests::node::NodeOptions;
use refvote_tests::smarthttp::{GitHttpProxy, GitlabIdentity, Target};
use tonic::Code;

const RELATIVE: &str = "@hashed/ab/cd/project.git";
const GL_REPOSITORY: &str = "project-42";
const ZERO: &str = "0000000000000000000000000000000000000000";

/// A global `update.d` hook that logs each run to `ran` and refuses every
/// `refs/heads/frozen*` with a line on each stream, and a `pre-receive.d` hook that
/// passes with a line on stdout.
fn freezing_update_hook(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let ran = dir.join("ran");
    let hooks = dir.join("global").join("update.d");
    std::fs::create_dir_all(&hooks)?;
    let script = hooks.join("freeze");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$1 $2 $3 $GL_ID $GL_PROTOCOL $GL_REPOSITORY\" >> {ran:?}\n\
             case \"$1\" in refs/heads/frozen*) echo \"checked $1\"; echo \"GL-HOOK-ERR: $1 is frozen\" >&2; exit 1;; esac\n"
        ),
    )?;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
    // And a pre-receive hook that passes, saying so on stdout.
    let pre = dir.join("global").join("pre-receive.d");
    std::fs::create_dir_all(&pre)?;
    let script = pre.join("look");
    std::fs::write(&script, "#!/bin/sh\necho \"looked at $GL_ID\"\n")?;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
    Ok((dir.join("global"), ran))
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_update_hook_refuses_its_refs_on_every_replica_and_answers_gitalys_error()
-> anyhow::Result<()> {
    let hooks = tempfile::tempdir()?;
    let (global, ran) = freezing_update_hook(hooks.path())?;
    let api_dir = tempfile::tempdir()?;
    let api = GitlabApi::start(api_dir.path(), respond(allowing)).await?;
    let opts =
        NodeOptions::default()
            .config(api.configure())
            .config(move |c: &mut votingd::Config| {
                c.hooks.custom_hooks_dir = Some(global.clone());
            });
    let c = Fixture::nodes(3)
        .node_options(opts)
        .seeded(RELATIVE)
        .router()
        .start()
        .await?;
    let revs = |refname: &str| -> Vec<Option<String>> {
        c.nodes
            .iter()
            .map(|n| git::rev(&n.repo(RELATIVE), refname))
            .collect()
    };
    let old = revs("refs/heads/main")[0].clone().expect("main is seeded");

    // One push: main moves on, frozen-1 is new; the hook refuses frozen-1 only.
    let work = c.work("w")?;
    let new = work.commit("main", "past the update hook")?;
    git::git(&work.path, &["branch", "frozen-1", &new])?;
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
            gl_project_path: "group/project".into(),
        },
    )
    .await?;
    let url = proxy.url(RELATIVE);
    let out = git::push(&work.path, Path::new(&url), &["main", "frozen-1"], &[]).await?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "one ref was refused:\n{text}");
    assert_eq!(
        text.matches("remote: GL-HOOK-ERR: refs/heads/frozen-1 is frozen")
            .count(),
        1,
        "{text}"
    );
    assert_eq!(
        text.matches("remote: looked at user-7").count(),
        1,
        "{text}"
    );
    assert!(
        text.contains("refs/heads/frozen-1:refs/heads/frozen-1\t[remote rejected] (hook declined)"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "refs/heads/main:refs/heads/main\t{}..{}",
            &old[..7],
            &new[..7]
        )),
        "{text}"
    );
    assert_eq!(revs("refs/heads/main"), vec![Some(new.clone()); 3]);
    assert_eq!(revs("refs/heads/frozen-1"), vec![None; 3]);
    // GitLab hears only of the ref that landed.
    let posted = api.calls("post_receive");
    assert_eq!(posted.len(), 1);
    assert_eq!(
        posted[0].json()["changes"],
        format!("{old} {new} refs/heads/main\n")
    );

    // UserCreateBranch of a frozen name: Gitaly's custom-hook answer for it.
    let mut client = OperationServiceClient::new(c.routers[0].channel().await?);
    let e = client
        .user_create_branch(UserCreateBranchRequest {
            repository: Some(Repository {
                storage_name: "default".into(),
                relative_path: RELATIVE.into(),
                gl_repository: GL_REPOSITORY.into(),
                gl_project_path: "group/project".into(),
                ..Default::default()
            }),
            branch_name: b"frozen-2".to_vec(),
            user: Some(User {
                gl_id: "user-7".into(),
                name: b"Jane Doe".to_vec(),
                email: b"jane@example.com".to_vec(),
                gl_username: "jane".into(),
                timezone: "UTC".into(),
            }),
            start_point: b"main".to_vec(),
        })
        .await
        .expect_err("the update hook refused");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert_eq!(
        e.message(),
        "creation denied by custom hooks: running update hooks: GL-HOOK-ERR: refs/heads/frozen-2 is frozen\n"
    );
    let rpc = RpcStatus::decode(e.details())?;
    assert_eq!(rpc.details.len(), 1, "{rpc:?}");
    assert_eq!(
        rpc.details[0].type_url,
        "type.googleapis.com/gitaly.UserCreateBranchError"
    );
    let d = UserCreateBranchError::decode(rpc.details[0].value.as_slice())?;
    assert_eq!(
        d.error,
        Some(user_create_branch_error::Error::CustomHook(
            CustomHookError {
                // Gitaly's pre-receive and update hooks share the buffers.
                stdout: b"looked at user-7\nchecked refs/heads/frozen-2\n".to_vec(),
                stderr: b"GL-HOOK-ERR: refs/heads/frozen-2 is frozen\n".to_vec(),
                hook_type: custom_hook_error::HookType::Update as i32,
            }
        ))
    );
    assert_eq!(revs("refs/heads/frozen-2"), vec![None; 3]);
    let view = c.store.repo_view(&c.repo_id(RELATIVE)).await?;
    assert_eq!(view.up_to_date_live().len(), 3, "every replica up to date");

    // The hook ran once per ref, on one voter, in the order git gave the push's
    // commands (the changes /allowed saw): ref, old, new as arguments, GitLab's
    // identity in the environment (protocol http for the push, web for the
    // operation).
    let allowed = api.calls("allowed");
    let pushed = allowed[0].json()["changes"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let mut expected: String = pushed
        .lines()
        .map(|l| {
            let [old, new, reference] = l.split(' ').collect::<Vec<_>>()[..] else {
                panic!("{l:?}")
            };
            format!("{reference} {old} {new} user-7 http {GL_REPOSITORY}\n")
        })
        .collect();
    assert_eq!(pushed.lines().count(), 2, "{pushed:?}");
    expected.push_str(&format!(
        "refs/heads/frozen-2 {ZERO} {new} user-7 web {GL_REPOSITORY}\n"
    ));
    assert_eq!(std::fs::read_to_string(&ran)?, expected);
    assert!(pushed.contains(&format!("{old} {new} refs/heads/main\n")));
    assert!(pushed.contains(&format!("{ZERO} {new} refs/heads/frozen-1\n")));
    assert_eq!(api.calls("allowed").len(), 2);
    assert_eq!(api.calls("post_receive").len(), 1);
    Ok(())
}
