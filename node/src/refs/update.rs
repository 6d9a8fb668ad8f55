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

/// Why an update did not happen.
#[derive(Debug)]
pub enum UpdateFailure {
    /// Another writer holds the ref's lock file.
    Locked(String),
    /// The ref no longer holds the expected old value.
    Mismatch(String),
    /// The new value is not an object of the repository.
    MissingObject(String),
    /// The hook refused the update (the replicas did not agree).
    Refused(String),
    Git(GitError),
}

impl std::fmt::Display for UpdateFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpdateFailure::Locked(r) => write!(f, "reference is locked by another writer: {r}"),
            UpdateFailure::Mismatch(r) => {
                write!(f, "reference does not point to the expected object: {r}")
            }
            UpdateFailure::MissingObject(r) => {
                write!(
                    f,
                    "the new value of {r} is not an object of this repository"
                )
            }
            UpdateFailure::Refused(m) => write!(f, "ref update refused: {m}"),
            UpdateFailure::Git(e) => write!(f, "{e}"),
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
    let exit = git
        .command(["update-ref", "--stdin", "-z"])
        .git_dir(repo)
        .write_in(ctx)
        .stdin(Box::pin(tokio_stream::once(Ok(input))))
        .spawn()
        .map_err(UpdateFailure::Git)?
        .wait()
        .await
        .map_err(UpdateFailure::Git)?;
    if exit.success() {
        return Ok(());
    }
    Err(classify(&exit.stderr).unwrap_or_else(|| UpdateFailure::Git(exit.into_error())))
}

/// Sorts git's message into a failure the client can act on.
fn classify(stderr: &str) -> Option<UpdateFailure> {
    let refname = |s: &str| {
        s.split_once("cannot lock ref '")
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
        return Some(UpdateFailure::Refused(why.trim().to_owned()));
    }
    if stderr.contains(".lock': File exists") {
        return Some(UpdateFailure::Locked(refname(stderr)));
    }
    if stderr.contains("nonexistent object") {
        return Some(UpdateFailure::MissingObject(refname(stderr)));
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
        return Some(UpdateFailure::Mismatch(refname(stderr)));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn git_messages_are_classified() {
        let m = "fatal: cannot lock ref 'refs/heads/a': is at 1111 but expected 2222";
        assert!(matches!(classify(m), Some(UpdateFailure::Mismatch(r)) if r == "refs/heads/a"));
        let m = "fatal: cannot lock ref 'refs/heads/b': reference already exists";
        assert!(matches!(classify(m), Some(UpdateFailure::Mismatch(r)) if r == "refs/heads/b"));
        let m = "fatal: cannot lock ref 'refs/heads/c': Unable to create '/r/refs/heads/c.lock': File exists.";
        assert!(matches!(classify(m), Some(UpdateFailure::Locked(r)) if r == "refs/heads/c"));
        let m = "refvote: update rejected: 1 of 3 replicas agreed, 2 needed\nfatal: ref updates aborted by hook";
        assert!(matches!(classify(m), Some(UpdateFailure::Refused(r)) if r.contains("1 of 3")));
        assert!(classify("fatal: something else").is_none());
    }
}
