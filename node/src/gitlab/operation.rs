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
    CommitFiles,
    MergeBranch,
    FFBranch,
    DeleteTag,
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
            return Err(with_shared_buffers(
                refusal,
                &checked.stdout,
                &checked.stderr,
            ));
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

/// An update hook's refusal of an operation as Gitaly's UpdaterWithHooks reports it:
/// it hands the pre-receive and update hooks the same two buffers
/// (`internal/gitaly/hook/updateref/update_with_hooks.go`), so the update hook's
/// `CustomHookError` carries what the custom pre-receive hooks printed before it, and
/// its text is that stderr, else that stdout. `stdout`/`stderr`: all the checks
/// printed, in order (an operation has one ref, so one update hook run).
fn with_shared_buffers(refusal: &Refusal, stdout: &str, stderr: &str) -> Refusal {
    let Refusal::CustomHook {
        hook: refvote_gitlab::HookKind::Update,
        exit_code,
        message,
        note,
        ..
    } = refusal
    else {
        return refusal.clone();
    };
    let message = [stderr, stdout]
        .into_iter()
        .find(|s| !s.trim().is_empty())
        .unwrap_or(message)
        .to_owned();
    Refusal::CustomHook {
        hook: refvote_gitlab::HookKind::Update,
        exit_code: *exit_code,
        stdout: stdout.to_owned(),
        stderr: stderr.to_owned(),
        message,
        note: note.clone(),
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

/// The error Gitaly's `UpdateReference` returns for a refusal, as its text reads:
/// "running pre-receive hooks: GitLab: <message>" for an access check, "running
/// <hook> hooks: <stderr, else stdout>" for a custom hook (its words untouched: Rails
/// shows text starting `GitLab:` or `GL-HOOK-ERR:` verbatim), and our failure's text
/// after "running pre-receive hooks: " otherwise.
fn hook_error(refusal: &Refusal) -> String {
    match refusal {
        Refusal::CustomHook { hook, message, .. } => {
            format!("running {} hooks: {message}", hook.name())
        }
        other => format!("running pre-receive hooks: {}", other.hook_stderr()),
    }
}

/// The status an operation answers for GitLab's refusal, exactly as Gitaly words,
/// codes and shapes it for that RPC (`internal/gitaly/service/operations/`): where
/// the RPC's error type has an `access_check` or `custom_hook` arm, `PERMISSION_DENIED`
/// with that detail; an access check the RPC has no arm for goes through Gitaly's
/// catch-all (`INTERNAL`, its text wrapped as that RPC wraps it); a failure that is no
/// refusal is `INTERNAL` the same way. UserDeleteTag and UserUpdateBranch answer some
/// refusals in their response instead: see [`delete_tag_refused`] and
/// [`update_branch_refused`].
pub fn refusal_status(op: Op, refusal: &Refusal) -> Status {
    let denied = Code::PermissionDenied;
    let internal =
        |prefix: &str| Status::new(Code::Internal, format!("{prefix}{}", hook_error(refusal)));
    let (access, custom) = (access_check(refusal), custom_hook(refusal));
    let text = hook_error(refusal);
    match op {
        // UserCreateBranchError has no access-check arm: Gitaly returns the hook's
        // error as it is, which its status handler makes INTERNAL.
        Op::CreateBranch => match custom {
            Some(c) => status_with_detail(
                denied,
                format!("creation denied by custom hooks: {text}"),
                "gitaly.UserCreateBranchError",
                &UserCreateBranchError {
                    error: Some(user_create_branch_error::Error::CustomHook(c)),
                },
            ),
            None => internal(""),
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
                (None, None) => return internal("deleting reference: "),
            };
            status_with_detail(
                denied,
                format!("deletion denied by {what}: {text}"),
                "gitaly.UserDeleteBranchError",
                &UserDeleteBranchError { error: Some(error) },
            )
        }
        Op::CreateTag => {
            let (what, error) = match (access, custom) {
                (Some(a), _) => (
                    "access checks",
                    user_create_tag_error::Error::AccessCheck(a),
                ),
                (_, Some(c)) => ("custom hooks", user_create_tag_error::Error::CustomHook(c)),
                (None, None) => return internal("updating reference: "),
            };
            status_with_detail(
                denied,
                format!("reference update denied by {what}: {text}"),
                "gitaly.UserCreateTagError",
                &UserCreateTagError { error: Some(error) },
            )
        }
        // Gitaly's UserCommitFiles wraps the update's error in "update reference: ".
        Op::CommitFiles => {
            let (what, error) = match (access, custom) {
                (Some(a), _) => (
                    "access checks",
                    user_commit_files_error::Error::AccessCheck(a),
                ),
                (_, Some(c)) => (
                    "custom hooks",
                    user_commit_files_error::Error::CustomHook(c),
                ),
                (None, None) => return internal("update reference: "),
            };
            status_with_detail(
                denied,
                format!("denied by {what}: update reference: {text}"),
                "gitaly.UserCommitFilesError",
                &UserCommitFilesError { error: Some(error) },
            )
        }
        // UserMergeBranch answers the refusal's own text: "GitLab: <message>", or the
        // custom hook's output.
        Op::MergeBranch => {
            let error = match (access, custom) {
                (Some(a), _) => user_merge_branch_error::Error::AccessCheck(a),
                (_, Some(c)) => user_merge_branch_error::Error::CustomHook(c),
                (None, None) => return internal("target update: "),
            };
            status_with_detail(
                denied,
                refusal_text(refusal),
                "gitaly.UserMergeBranchError",
                &UserMergeBranchError { error: Some(error) },
            )
        }
        // UserFFBranchError has no access-check arm.
        Op::FFBranch => match custom {
            Some(c) => status_with_detail(
                denied,
                refusal_text(refusal),
                "gitaly.UserFfBranchError",
                &UserFfBranchError {
                    error: Some(user_ff_branch_error::Error::CustomHook(c)),
                },
            ),
            None => internal("updating ref with hooks: "),
        },
        // Gitaly reads every hook failure of a rebase as an access check, with the
        // hook's own words (its stderr, else its stdout).
        Op::RebaseConfirmable => {
            let said = refusal_text(refusal);
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
            let said = refusal_text(refusal);
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
        // Both answer a custom hook's refusal in their response, and their callers
        // word every refusal through [`delete_tag_refused`] / [`update_branch_refused`];
        // this is Gitaly's catch-all for either.
        Op::DeleteTag | Op::UpdateBranch => internal(""),
    }
}

/// The refusal's own error text in Gitaly: `NotAllowedError` reads "GitLab:
/// <message>", `CustomHookError` the hook's stderr, else its stdout.
fn refusal_text(refusal: &Refusal) -> String {
    match refusal {
        Refusal::CustomHook { message, .. } => message.clone(),
        other => other.hook_stderr(),
    }
}

/// UserDeleteTag's answer to a refusal: `Ok(text)` is an OK response carrying `text`
/// in `pre_receive_error` (a custom hook refused: its output); `Err` the status
/// (Gitaly's catch-all: `INTERNAL` with the hook's error; it has no structured arm).
pub fn delete_tag_refused(refusal: &Refusal) -> Result<String, Status> {
    match refusal {
        Refusal::CustomHook { message, .. } => Ok(message.clone()),
        other => Err(Status::new(Code::Internal, hook_error(other))),
    }
}

/// UserUpdateBranch's answer to a refusal of updating `branch` (the name as the
/// request gave it): `Ok(text)` for `pre_receive_error` in an OK response (a custom
/// hook refused); otherwise Gitaly's answer for every other failure of the update,
/// `FAILED_PRECONDITION` "Could not update <branch>. Please refresh and try again."
pub fn update_branch_refused(branch: &str, refusal: &Refusal) -> Result<String, Status> {
    match refusal {
        Refusal::CustomHook { message, .. } => Ok(message.clone()),
        _ => Err(Status::new(
            Code::FailedPrecondition,
            format!("Could not update {branch}. Please refresh and try again."),
        )),
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
    fn an_update_hooks_error_carries_what_pre_receive_printed_before_it() {
        let update = Refusal::CustomHook {
            hook: HookKind::Update,
            exit_code: 1,
            stdout: "checked\n".into(),
            stderr: String::new(),
            message: "checked\n".into(),
            note: None,
        };
        // The custom pre-receive hook said something on each stream and passed.
        let shared = with_shared_buffers(&update, "pre\nchecked\n", "warning\n");
        let Refusal::CustomHook {
            stdout,
            stderr,
            message,
            ..
        } = &shared
        else {
            panic!("{shared:?}")
        };
        assert_eq!(
            (stdout.as_str(), stderr.as_str(), message.as_str()),
            ("pre\nchecked\n", "warning\n", "warning\n")
        );
        let s = refusal_status(Op::CreateBranch, &shared);
        assert_eq!(
            s.message(),
            "creation denied by custom hooks: running update hooks: warning\n"
        );
        // Nothing printed but the update hook's stdout: its stdout.
        let alone = with_shared_buffers(&update, "checked\n", "");
        assert_eq!(alone, update);
        // Other refusals are as they were.
        assert_eq!(with_shared_buffers(&custom(), "x", "y"), custom());
        assert_eq!(with_shared_buffers(&access(), "x", "y"), access());
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
        let s = refusal_status(Op::CreateTag, &access());
        assert_eq!(s.code(), Code::PermissionDenied);
        assert_eq!(
            s.message(),
            "reference update denied by access checks: running pre-receive hooks: GitLab: You are not allowed to create a branch."
        );
        let d: UserCreateTagError = detail_of(&s, "gitaly.UserCreateTagError").unwrap();
        assert!(matches!(
            d.error,
            Some(user_create_tag_error::Error::AccessCheck(_))
        ));
        let s = refusal_status(Op::CommitFiles, &access());
        assert_eq!(s.code(), Code::PermissionDenied);
        assert_eq!(
            s.message(),
            "denied by access checks: update reference: running pre-receive hooks: GitLab: You are not allowed to create a branch."
        );
        let d: UserCommitFilesError = detail_of(&s, "gitaly.UserCommitFilesError").unwrap();
        assert!(matches!(
            d.error,
            Some(user_commit_files_error::Error::AccessCheck(_))
        ));
        let s = refusal_status(Op::MergeBranch, &access());
        assert_eq!(
            (s.code(), s.message()),
            (
                Code::PermissionDenied,
                "GitLab: You are not allowed to create a branch."
            )
        );
        let d: UserMergeBranchError = detail_of(&s, "gitaly.UserMergeBranchError").unwrap();
        assert!(matches!(
            d.error,
            Some(user_merge_branch_error::Error::AccessCheck(_))
        ));
        // No access-check arm: Gitaly's catch-all, INTERNAL, no detail.
        let s = refusal_status(Op::CreateBranch, &access());
        assert_eq!(s.code(), Code::Internal);
        assert_eq!(
            s.message(),
            "running pre-receive hooks: GitLab: You are not allowed to create a branch."
        );
        assert!(detail_of::<UserCreateBranchError>(&s, "gitaly.UserCreateBranchError").is_none());
        let s = refusal_status(Op::FFBranch, &access());
        assert_eq!(
            (s.code(), s.message()),
            (
                Code::Internal,
                "updating ref with hooks: running pre-receive hooks: GitLab: You are not allowed to create a branch."
            )
        );
        let s = delete_tag_refused(&access()).unwrap_err();
        assert_eq!(
            (s.code(), s.message()),
            (
                Code::Internal,
                "running pre-receive hooks: GitLab: You are not allowed to create a branch."
            )
        );
        let s = update_branch_refused("feature", &access()).unwrap_err();
        assert_eq!(
            (s.code(), s.message()),
            (
                Code::FailedPrecondition,
                "Could not update feature. Please refresh and try again."
            )
        );
    }

    #[test]
    fn custom_hooks_answer_with_the_rpcs_custom_hook_detail() {
        let s = refusal_status(Op::CreateBranch, &custom());
        assert_eq!(s.code(), Code::PermissionDenied);
        // The hook's output as it is, trailing newline included (Gitaly's own test:
        // "creation denied by custom hooks: running pre-receive hooks: GL_ID=user-123\n").
        assert_eq!(
            s.message(),
            "creation denied by custom hooks: running pre-receive hooks: GL-HOOK-ERR: nope\n"
        );
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
            "deletion denied by custom hooks: running pre-receive hooks: GL-HOOK-ERR: nope\n"
        );
        assert_eq!(
            refusal_status(Op::CommitFiles, &custom()).message(),
            "denied by custom hooks: update reference: running pre-receive hooks: GL-HOOK-ERR: nope\n"
        );
        assert_eq!(
            refusal_status(Op::CreateTag, &custom()).message(),
            "reference update denied by custom hooks: running pre-receive hooks: GL-HOOK-ERR: nope\n"
        );
        for op in [Op::MergeBranch, Op::FFBranch] {
            let s = refusal_status(op, &custom());
            assert_eq!(
                (s.code(), s.message()),
                (Code::PermissionDenied, "GL-HOOK-ERR: nope\n"),
                "{op:?}"
            );
        }
        // An update hook's refusal names its hook.
        let update = Refusal::CustomHook {
            hook: HookKind::Update,
            exit_code: 1,
            stdout: "frozen\n".into(),
            stderr: String::new(),
            message: "frozen\n".into(),
            note: None,
        };
        let s = refusal_status(Op::CreateTag, &update);
        assert_eq!(
            s.message(),
            "reference update denied by custom hooks: running update hooks: frozen\n"
        );
        let d: UserCreateTagError = detail_of(&s, "gitaly.UserCreateTagError").unwrap();
        let Some(user_create_tag_error::Error::CustomHook(c)) = d.error else {
            panic!("{d:?}")
        };
        assert_eq!(c.hook_type, custom_hook_error::HookType::Update as i32);
        // UserDeleteTag and UserUpdateBranch: an OK answer with the hook's output.
        assert_eq!(
            delete_tag_refused(&custom()).unwrap(),
            "GL-HOOK-ERR: nope\n"
        );
        assert_eq!(
            update_branch_refused("feature", &custom()).unwrap(),
            "GL-HOOK-ERR: nope\n"
        );
    }

    #[test]
    fn failures_that_are_no_refusal_are_internal() {
        let failure = Refusal::Internal {
            message: "GitLab's checks did not finish".into(),
        };
        let s = refusal_status(Op::CreateTag, &failure);
        assert_eq!(s.code(), Code::Internal);
        assert_eq!(
            s.message(),
            "updating reference: running pre-receive hooks: GitLab's checks did not finish"
        );
        for (op, prefix) in [
            (Op::CreateBranch, ""),
            (Op::DeleteBranch, "deleting reference: "),
            (Op::CommitFiles, "update reference: "),
            (Op::MergeBranch, "target update: "),
            (Op::FFBranch, "updating ref with hooks: "),
        ] {
            let s = refusal_status(op, &failure);
            assert_eq!(
                (s.code(), s.message().to_owned()),
                (
                    Code::Internal,
                    format!("{prefix}running pre-receive hooks: GitLab's checks did not finish")
                ),
                "{op:?}"
            );
        }
    }
}
