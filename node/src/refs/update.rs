//! One atomic ref update through `git update-ref --stdin -z`, every line with an
//! explicit old object id (DESIGN.md §2 "Votes": then git's packed-refs side
//! transaction of a delete is all `0…0 0…0 <ref>` and the hook does not vote on it),
//! and git's failures sorted into what the caller did wrong and what it may retry.

use std::path::Path;

use crate::git::{Git, GitError};
use crate::tx::{WriteContext, WriteIn};

/// One ref change. `old` is the value the ref must have now (all zeros: must not
/// exist); `new` all zeros deletes it.
#[derive(Debug, Clone)]
pub struct RefUpdate {
    pub name: String,
    pub old: String,
    pub new: String,
}

/// Why an update did not happen, sorted once from git's message; each RPC words its
/// answer from the kind and, where it quotes git, from [`UpdateFailure::stderr`].
#[derive(Debug)]
pub struct UpdateFailure {
    pub kind: FailureKind,
    /// git's own report (the command, its exit status, its stderr).
    pub git: GitError,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailureKind {
    /// Another writer holds the ref's lock file.
    Locked(String),
    /// The ref no longer holds the expected old value.
    Mismatch(String),
    /// The new value is not an object of the repository.
    MissingObject(String),
    /// The hook refused the update (the replicas did not agree); its one-line reason.
    Refused(String),
    /// git could not lock the ref for another reason (a directory or a ref in the way
    /// of its path, a read-only refs directory).
    Unlockable(String),
    /// Anything else: git did not run, or failed in a way not sorted above.
    Other,
}

impl UpdateFailure {
    /// What git printed on stderr (trimmed), or the failure itself if git printed
    /// nothing (it did not run).
    pub fn stderr(&self) -> String {
        match &self.git {
            GitError::Failed { stderr, .. } => stderr.clone(),
            other => other.to_string(),
        }
    }
}

impl std::fmt::Display for UpdateFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            FailureKind::Locked(r) => write!(f, "reference is locked by another writer: {r}"),
            FailureKind::Mismatch(r) => {
                write!(f, "reference does not point to the expected object: {r}")
            }
            FailureKind::MissingObject(r) => {
                write!(
                    f,
                    "the new value of {r} is not an object of this repository"
                )
            }
            FailureKind::Refused(m) => write!(f, "ref update refused: {m}"),
            FailureKind::Unlockable(_) | FailureKind::Other => write!(f, "{}", self.git),
        }
    }
}

/// Applies `updates` as one transaction: all or nothing.
pub async fn apply(
    git: &Git,
    repo: &Path,
    ctx: &WriteContext,
    updates: &[RefUpdate],
) -> Result<(), UpdateFailure> {
    if updates.is_empty() {
        return Ok(());
    }
    let mut input = Vec::new();
    for u in updates {
        // -z format: "update SP <ref> NUL <new> NUL <old> NUL"; a delete names no new.
        if crate::refs::names::is_zero(&u.new) {
            input.extend_from_slice(format!("delete {}\0{}\0", u.name, u.old).as_bytes());
        } else {
            input
                .extend_from_slice(format!("update {}\0{}\0{}\0", u.name, u.new, u.old).as_bytes());
        }
    }
    let other = |git| UpdateFailure {
        kind: FailureKind::Other,
        git,
    };
    let exit = git
        .command(["update-ref", "--stdin", "-z"])
        .git_dir(repo)
        .write_in(ctx)
        .stdin(Box::pin(tokio_stream::once(Ok(input))))
        .spawn()
        .map_err(other)?
        .wait()
        .await
        .map_err(other)?;
    if exit.success() {
        return Ok(());
    }
    Err(UpdateFailure {
        kind: classify(&exit.stderr),
        git: exit.into_error(),
    })
}

/// Sorts git's message into a failure the client can act on.
fn classify(stderr: &str) -> FailureKind {
    let refname = |s: &str| {
        s.split_once("cannot lock ref '")
            .or_else(|| s.split_once("cannot update ref '"))
            .or_else(|| s.split_once("for ref '"))
            .and_then(|(_, rest)| rest.split_once('\''))
            .map(|(name, _)| name.to_owned())
            .unwrap_or_default()
    };
    if stderr.contains("aborted by hook") {
        let why = stderr
            .lines()
            .find(|l| l.starts_with("refvote:"))
            .unwrap_or("the replicas did not agree");
        return FailureKind::Refused(why.trim().to_owned());
    }
    if stderr.contains(".lock': File exists") {
        return FailureKind::Locked(refname(stderr));
    }
    if stderr.contains("nonexistent object") {
        return FailureKind::MissingObject(refname(stderr));
    }
    if [
        "but expected",
        "reference already exists",
        "unable to resolve reference",
        "reference is missing",
    ]
    .iter()
    .any(|m| stderr.contains(m))
    {
        return FailureKind::Mismatch(refname(stderr));
    }
    if stderr.contains("cannot lock ref '") {
        return FailureKind::Unlockable(refname(stderr));
    }
    FailureKind::Other
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn git_messages_are_classified() {
        let m = "fatal: cannot lock ref 'refs/heads/a': is at 1111 but expected 2222";
        assert_eq!(classify(m), FailureKind::Mismatch("refs/heads/a".into()));
        let m = "fatal: cannot lock ref 'refs/heads/b': reference already exists";
        assert_eq!(classify(m), FailureKind::Mismatch("refs/heads/b".into()));
        let m = "fatal: cannot lock ref 'refs/heads/c': Unable to create '/r/refs/heads/c.lock': File exists.";
        assert_eq!(classify(m), FailureKind::Locked("refs/heads/c".into()));
        let m = "refvote: update rejected: 1 of 3 replicas agreed, 2 needed\nfatal: ref updates aborted by hook";
        assert!(matches!(classify(m), FailureKind::Refused(r) if r.contains("1 of 3")));
        let m = "fatal: cannot lock ref 'refs/heads/a/b': 'refs/heads/a' exists; cannot create 'refs/heads/a/b'";
        assert_eq!(
            classify(m),
            FailureKind::Unlockable("refs/heads/a/b".into())
        );
        let m = "fatal: cannot update ref 'refs/heads/n': trying to write ref 'refs/heads/n' with nonexistent object 1111";
        assert_eq!(
            classify(m),
            FailureKind::MissingObject("refs/heads/n".into())
        );
        // A path in the message that happens to say "refvote" is not the hook's refusal.
        let m = "fatal: cannot lock ref 'refs/heads/d': Unable to create '/tmp/refvote-1/refs/heads/d.lock': File exists.";
        assert_eq!(classify(m), FailureKind::Locked("refs/heads/d".into()));
        assert_eq!(classify("fatal: something else"), FailureKind::Other);
    }
}
