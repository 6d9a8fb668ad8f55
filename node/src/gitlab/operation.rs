//! GitLab's checks of an `OperationService` call (Rails, on behalf of a user): its one
//! ref update checked as a push of that change would be (protocol `web`), before the
//! update; a refusal answered with Gitaly's structured error for that RPC.

use std::sync::Arc;

use refvote_gitlab::{Changes, HookContext, Refusal};
use refvote_proto::gitaly::{
    AccessCheckError, CustomHookError, Repository, User, UserCherryPickError, UserCommitFilesError,
    UserCreateBranchError, UserCreateTagError, UserDeleteBranchError, UserFfBranchError,
    UserMergeBranchError, UserRebaseConfirmableError, UserRevertError, custom_hook_error,
    user_cherry_pick_error, user_commit_files_error, user_create_branch_error,
    user_create_tag_error, user_delete_branch_error, user_ff_branch_error, user_merge_branch_error,
    user_rebase_confirmable_error, user_revert_error,
};
use tonic::metadata::MetadataMap;
use tonic::{Code, Status};

use super::{GatedCall, GitlabSide, Prepared, change_line};
use crate::detail::status_with_detail;
use crate::tx::WriteContext;

/// Which operation, for its error's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    CreateBranch,
    DeleteBranch,
    CreateTag,
    DeleteTag,
    CommitFiles,
    MergeBranch,
    FFBranch,
    UpdateBranch,
    RebaseConfirmable,
    CherryPick,
    Revert,
}

/// An operation's part in GitLab's checks, prepared before its transaction is joined.
pub struct OperationHooks {
    side: Arc<GitlabSide>,
    prepared: Option<Prepared>,
    call: Option<Arc<GatedCall>>,
}

impl GitlabSide {
    /// Prepares the checks of an operation on `repository` by `user` (see
    /// [`GitlabSide::prepare`]).
    pub fn operation(
        self: &Arc<Self>,
        metadata: &MetadataMap,
        repository: Option<&Repository>,
        user: Option<&User>,
    ) -> Result<OperationHooks, Status> {
        let has_user = user.is_some_and(|u| !u.gl_id.is_empty());
        let prepared = self.prepare(metadata, has_user, |correlation| {
            HookContext::from_operation(repository, user, correlation)
        })?;
        Ok(OperationHooks {
            side: self.clone(),
            prepared,
            call: None,
        })
    }
}

impl OperationHooks {
    /// Joins the operation's transaction (`ctx`, already joined) on the repository at
    /// `repo_path`; nothing when the call is not gated.
    pub fn join(&mut self, ctx: &WriteContext, repo_path: &std::path::Path) {
        if let (Some(prepared), Some(tx)) = (self.prepared.take(), ctx.transaction()) {
            self.call = Some(self.side.register(prepared, tx, repo_path));
        }
    }

    /// GitLab's checks of updating `reference` from `old` to `new`: `Err` is the
    /// refusal, for [`refusal_status`]. Passes when the call is not gated.
    pub async fn check(&self, reference: &str, old: &str, new: &str) -> Result<(), Refusal> {
        let Some(call) = &self.call else {
            return Ok(());
        };
        let change = change_line(reference, old, new);
        let stdin = format!("{change}\n");
        let mut context = call.context.clone();
        context.object_directories = None;
        let checked = self
            .side
            .verdict(call, stdin.as_bytes(), context)
            .await
            .map_err(|message| Refusal::Internal { message })?;
        if let Some(refusal) = checked.refusal_of(reference) {
            return Err(refusal.clone());
        }
        if checked.changes != stdin {
            return Err(Refusal::Internal {
                message: "refvote: update rejected: this replica computed another update than the one GitLab's checks saw".into(),
            });
        }
        Ok(())
    }

    /// Records that the update of `reference` committed here, for post-receive.
    pub fn committed(&self, reference: &str, old: &str, new: &str) {
        if let Some(call) = &self.call {
            let line = format!("{}\n", change_line(reference, old, new));
            debug_assert!(Changes::parse(line.as_bytes()).is_ok());
            call.set_committed(line, Vec::new());
        }
    }
}

fn custom_hook(refusal: &Refusal) -> Option<CustomHookError> {
    let Refusal::CustomHook {
        hook,
        stdout,
        stderr,
        ..
    } = refusal
    else {
        return None;
    };
    use custom_hook_error::HookType;
    let hook_type = match hook {
        refvote_gitlab::HookKind::PreReceive => HookType::Prereceive,
        refvote_gitlab::HookKind::Update => HookType::Update,
        refvote_gitlab::HookKind::PostReceive => HookType::Postreceive,
    };
    Some(CustomHookError {
        stdout: stdout.clone().into_bytes(),
        stderr: stderr.clone().into_bytes(),
        hook_type: hook_type as i32,
    })
}

fn access_check(refusal: &Refusal) -> Option<AccessCheckError> {
    let Refusal::AccessCheck {
        message,
        user_id,
        protocol,
        changes,
    } = refusal
    else {
        return None;
    };
    Some(AccessCheckError {
        error_message: message.clone(),
        protocol: protocol.clone(),
        user_id: user_id.clone(),
        changes: changes.clone().into_bytes(),
    })
}

/// The error text Gitaly wraps a hook failure in: "running pre-receive hooks: <what
/// the hook said>" (`GitLab: <message>` for an access check).
fn hook_text(refusal: &Refusal) -> String {
    let said = match refusal {
        Refusal::CustomHook { message, .. } => message.trim_end().to_owned(),
        other => other.hook_stderr(),
    };
    let hook = match refusal {
        Refusal::CustomHook { hook, .. } => hook.name(),
        _ => "pre-receive",
    };
    format!("running {hook} hooks: {said}")
}

/// The status an operation answers for GitLab's refusal, as Gitaly words and shapes it
/// for that RPC: `PERMISSION_DENIED` with an `access_check` or `custom_hook` detail
/// where the RPC's error has that arm; without a detail where it has none; `INTERNAL`
/// for a failure on our side or GitLab's that was no refusal.
pub fn refusal_status(op: Op, refusal: &Refusal) -> Status {
    let denied = Code::PermissionDenied;
    let (access, custom) = (access_check(refusal), custom_hook(refusal));
    if let Refusal::Internal { message } = refusal {
        return Status::new(Code::Internal, format!("updating reference: {message}"));
    }
    let text = hook_text(refusal);
    match op {
        Op::CreateBranch => match custom {
            Some(c) => status_with_detail(
                denied,
                "creation denied by custom hooks",
                "gitaly.UserCreateBranchError",
                &UserCreateBranchError {
                    error: Some(user_create_branch_error::Error::CustomHook(c)),
                },
            ),
            // UserCreateBranchError has no access-check arm: Gitaly passes the hook's
            // error on as it is.
            None => Status::new(denied, text),
        },
        Op::DeleteBranch => {
            let (what, error) = match (access, custom) {
                (Some(a), _) => (
                    "access checks",
                    user_delete_branch_error::Error::AccessCheck(a),
                ),
                (_, Some(c)) => (
                    "custom hooks",
                    user_delete_branch_error::Error::CustomHook(c),
                ),
                (None, None) => unreachable!("an internal refusal returned above"),
            };
            status_with_detail(
                denied,
                format!("deletion denied by {what}: {text}"),
                "gitaly.UserDeleteBranchError",
                &UserDeleteBranchError { error: Some(error) },
            )
        }
        Op::CreateTag => match (access, custom) {
            (Some(a), _) => status_with_detail(
                denied,
                format!("reference update denied by access checks: {text}"),
                "gitaly.UserCreateTagError",
                &UserCreateTagError {
                    error: Some(user_create_tag_error::Error::AccessCheck(a)),
                },
            ),
            (_, Some(c)) => status_with_detail(
                denied,
                "reference update denied by custom hooks",
                "gitaly.UserCreateTagError",
                &UserCreateTagError {
                    error: Some(user_create_tag_error::Error::CustomHook(c)),
                },
            ),
            (None, None) => unreachable!("an internal refusal returned above"),
        },
        Op::CommitFiles => match (access, custom) {
            (Some(a), _) => status_with_detail(
                denied,
                format!("denied by access checks: {text}"),
                "gitaly.UserCommitFilesError",
                &UserCommitFilesError {
                    error: Some(user_commit_files_error::Error::AccessCheck(a)),
                },
            ),
            (_, Some(c)) => status_with_detail(
                denied,
                "denied by custom hooks",
                "gitaly.UserCommitFilesError",
                &UserCommitFilesError {
                    error: Some(user_commit_files_error::Error::CustomHook(c)),
                },
            ),
            (None, None) => unreachable!("an internal refusal returned above"),
        },
        Op::MergeBranch => {
            let error = match (access, custom) {
                (Some(a), _) => user_merge_branch_error::Error::AccessCheck(a),
                (_, Some(c)) => user_merge_branch_error::Error::CustomHook(c),
                (None, None) => unreachable!("an internal refusal returned above"),
            };
            status_with_detail(
                denied,
                text,
                "gitaly.UserMergeBranchError",
                &UserMergeBranchError { error: Some(error) },
            )
        }
        Op::FFBranch => match custom {
            Some(c) => status_with_detail(
                denied,
                text,
                "gitaly.UserFfBranchError",
                &UserFfBranchError {
                    error: Some(user_ff_branch_error::Error::CustomHook(c)),
                },
            ),
            // UserFfBranchError has no access-check arm.
            None => Status::new(denied, text),
        },
        // Gitaly reads every hook failure of a rebase as an access check, with the
        // hook's own words (its stderr, else its stdout).
        Op::RebaseConfirmable => {
            let said = match refusal {
                Refusal::CustomHook { message, .. } => message.clone(),
                other => other.hook_stderr(),
            };
            status_with_detail(
                denied,
                format!("access check: {said:?}"),
                "gitaly.UserRebaseConfirmableError",
                &UserRebaseConfirmableError {
                    error: Some(user_rebase_confirmable_error::Error::AccessCheck(
                        AccessCheckError {
                            error_message: said,
                            ..Default::default()
                        },
                    )),
                },
            )
        }
        // Gitaly reads every hook failure of a cherry-pick as a failed access check.
        Op::CherryPick => {
            let said = match refusal {
                Refusal::CustomHook { message, .. } => message.clone(),
                other => other.hook_stderr(),
            };
            status_with_detail(
                Code::FailedPrecondition,
                "access check failed",
                "gitaly.UserCherryPickError",
                &UserCherryPickError {
                    error: Some(user_cherry_pick_error::Error::AccessCheck(
                        AccessCheckError {
                            error_message: said.trim_end_matches('\n').to_owned(),
                            ..Default::default()
                        },
                    )),
                },
            )
        }
        // ...and of a revert as a custom hook's, GitLab's own check being one there.
        Op::Revert => {
            let hook = custom.unwrap_or_else(|| CustomHookError {
                stdout: Vec::new(),
                stderr: refusal.hook_stderr().into_bytes(),
                hook_type: custom_hook_error::HookType::Prereceive as i32,
            });
            status_with_detail(
                denied,
                "revert: custom hook error",
                "gitaly.UserRevertError",
                &UserRevertError {
                    error: Some(user_revert_error::Error::CustomHook(hook)),
                },
            )
        }
        // UserDeleteTag's error has no structured arm for hooks; UserUpdateBranch
        // answers the text in its response (its caller puts it there).
        Op::DeleteTag | Op::UpdateBranch => Status::new(denied, text),
    }
}

#[cfg(test)]
mod tests {
    use refvote_gitlab::HookKind;

    use super::*;
    use crate::detail::detail_of;

    fn access() -> Refusal {
        Refusal::AccessCheck {
            message: "You are not allowed to create a branch.".into(),
            user_id: "user-7".into(),
            protocol: "web".into(),
            changes: "a b refs/heads/x\n".into(),
        }
    }

    fn custom() -> Refusal {
        Refusal::CustomHook {
            hook: HookKind::PreReceive,
            exit_code: 1,
            stdout: "out\n".into(),
            stderr: "GL-HOOK-ERR: nope\n".into(),
            message: "GL-HOOK-ERR: nope\n".into(),
            note: None,
        }
    }

    #[test]
    fn access_checks_answer_with_the_rpcs_access_check_detail() {
        let s = refusal_status(Op::DeleteBranch, &access());
        assert_eq!(s.code(), Code::PermissionDenied);
        assert_eq!(
            s.message(),
            "deletion denied by access checks: running pre-receive hooks: GitLab: You are not allowed to create a branch."
        );
        let d: UserDeleteBranchError = detail_of(&s, "gitaly.UserDeleteBranchError").unwrap();
        let Some(user_delete_branch_error::Error::AccessCheck(a)) = d.error else {
            panic!("{d:?}")
        };
        assert_eq!(a.error_message, "You are not allowed to create a branch.");
        assert_eq!((a.user_id.as_str(), a.protocol.as_str()), ("user-7", "web"));
        assert_eq!(a.changes, b"a b refs/heads/x\n");
        for (op, name) in [
            (Op::CreateTag, "gitaly.UserCreateTagError"),
            (Op::CommitFiles, "gitaly.UserCommitFilesError"),
        ] {
            let s = refusal_status(op, &access());
            assert_eq!(s.code(), Code::PermissionDenied);
            assert!(
                detail_of::<UserCreateTagError>(&s, name).is_some(),
                "{op:?}"
            );
        }
        // No access-check arm: no detail, Gitaly's text.
        let s = refusal_status(Op::CreateBranch, &access());
        assert_eq!(s.code(), Code::PermissionDenied);
        assert_eq!(
            s.message(),
            "running pre-receive hooks: GitLab: You are not allowed to create a branch."
        );
        assert!(detail_of::<UserCreateBranchError>(&s, "gitaly.UserCreateBranchError").is_none());
    }

    #[test]
    fn custom_hooks_answer_with_the_rpcs_custom_hook_detail() {
        let s = refusal_status(Op::CreateBranch, &custom());
        assert_eq!(s.code(), Code::PermissionDenied);
        assert_eq!(s.message(), "creation denied by custom hooks");
        let d: UserCreateBranchError = detail_of(&s, "gitaly.UserCreateBranchError").unwrap();
        let Some(user_create_branch_error::Error::CustomHook(c)) = d.error else {
            panic!("{d:?}")
        };
        assert_eq!(
            (c.stdout, c.stderr, c.hook_type),
            (
                b"out\n".to_vec(),
                b"GL-HOOK-ERR: nope\n".to_vec(),
                custom_hook_error::HookType::Prereceive as i32
            )
        );
        let s = refusal_status(Op::DeleteBranch, &custom());
        assert_eq!(
            s.message(),
            "deletion denied by custom hooks: running pre-receive hooks: GL-HOOK-ERR: nope"
        );
        assert_eq!(
            refusal_status(Op::CommitFiles, &custom()).message(),
            "denied by custom hooks"
        );
        assert_eq!(
            refusal_status(Op::CreateTag, &custom()).message(),
            "reference update denied by custom hooks"
        );
    }

    #[test]
    fn failures_that_are_no_refusal_are_internal() {
        let s = refusal_status(
            Op::CreateTag,
            &Refusal::Internal {
                message: "GitLab's checks did not finish".into(),
            },
        );
        assert_eq!(s.code(), Code::Internal);
        assert_eq!(
            s.message(),
            "updating reference: GitLab's checks did not finish"
        );
    }
}
