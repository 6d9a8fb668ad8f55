//! git's `pre-receive`, `update` and `post-receive` hooks of a gated push, as votingd's
//! vote socket passes them on: the checks (or the wait for their verdict), the per-ref
//! answer, and the record of what git updated.

use std::collections::HashMap;

use refvote_gitlab::{HookContext, ObjectDirectories};
use refvote_proto::hook::{HookAnswer, ReceiveHook, error::Code, receive_hook::Kind};

use super::GitlabSide;

/// An answer that refuses with `message`.
fn refuse(message: String) -> HookAnswer {
    let mut stderr = message.into_bytes();
    stderr.push(b'\n');
    HookAnswer {
        exit_code: 1,
        stdout: Vec::new(),
        stderr,
    }
}

fn ok() -> HookAnswer {
    HookAnswer {
        exit_code: 0,
        stdout: Vec::new(),
        stderr: Vec::new(),
    }
}

impl GitlabSide {
    /// Answers one receive hook of a gated push. `Err`: a request this node must refuse
    /// outright (malformed, another voter's, no such gated call here).
    pub async fn receive_hook(&self, req: ReceiveHook) -> Result<HookAnswer, (Code, String)> {
        let kind = req.check()?;
        if req.voter != self.node {
            return Err((
                Code::FailedPrecondition,
                format!(
                    "this votingd votes as {:?}, not as {:?}",
                    self.node, req.voter
                ),
            ));
        }
        let Some(call) = self.call(&req.transaction) else {
            return Err((
                Code::FailedPrecondition,
                format!(
                    "this node runs no call gated by GitLab's checks in transaction {}",
                    req.transaction
                ),
            ));
        };
        let env = |k: &str| req.env.get(k).cloned();
        Ok(match kind {
            Kind::PreReceive => {
                let mut context = call.context.clone();
                context.push_options = HookContext::push_options_from_env(env);
                context.object_directories = quarantine(&call.repo_path, &req.env);
                match self.verdict(&call, &req.stdin, context).await {
                    Ok(checked) => checked.pre_receive_answer(&req.stdin),
                    Err(message) => refuse(message),
                }
            }
            Kind::Update => match call.checked() {
                Some(checked) => checked.update_answer(&req.args[0]),
                // git runs update only after pre-receive succeeded here.
                None => refuse(format!(
                    "refvote: update rejected: no verdict of GitLab's checks for transaction {}",
                    call.tx
                )),
            },
            Kind::PostReceive => {
                call.set_committed(
                    String::from_utf8_lossy(&req.stdin).into_owned(),
                    HookContext::push_options_from_env(env),
                );
                ok()
            }
            Kind::Unspecified => unreachable!("check refuses it"),
        })
    }
}

/// The quarantine git's pre-receive hook runs in, relative to the repository, as
/// GitLab is told it (`None` outside quarantine, or if it cannot be resolved: GitLab
/// then checks against the repository's own objects, which cannot see the new ones).
fn quarantine(repo: &std::path::Path, env: &HashMap<String, String>) -> Option<ObjectDirectories> {
    let dirs = ObjectDirectories::from_git_env(
        repo,
        env.get("GIT_OBJECT_DIRECTORY").map(String::as_str),
        env.get("GIT_ALTERNATE_OBJECT_DIRECTORIES")
            .map(String::as_str),
    );
    match dirs {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(repo = %repo.display(), error = %e, "cannot resolve the push's quarantine");
            None
        }
    }
}
