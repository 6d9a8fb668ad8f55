//! The objects OperationService writes build, the same bytes on every replica: who
//! signs a commit and when ([`Signature`], from the request's user and time, settled
//! before the transaction), the tree of a merge of two commits (`git merge-tree
//! --write-tree`, as Gitaly asks for it) and the commit of a tree (`git commit-tree`,
//! never signed). Every write that makes commits (files, merges, squashes, rebases,
//! cherry-picks, reverts) builds them here.

use refvote_proto::gitaly::{CommitAuthor, GitCommit, User};
use tonic::Status;

use crate::catfile;
use crate::error::NodeError;
use crate::git::{Git, Run};
use crate::signature::{commit_time, git_date};
use crate::storage::RepoPath;
use crate::tx::{WriteContext, WriteIn};

/// Bound on `git merge-tree`'s answer: the tree, the conflicting names, git's messages.
const MERGE_TREE_OUTPUT: usize = 16 * 1024 * 1024;

/// Bound on `git commit-tree`'s answer: an object id.
const OID_OUTPUT: usize = 4096;

/// One side of a commit's signature as `git commit-tree` takes it from its environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Ident {
    pub name: String,
    pub email: String,
    /// `git_date` form: `@<seconds> <offset>`.
    pub date: String,
}

/// Who writes a commit, and when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Signature {
    pub author: Ident,
    pub committer: Ident,
    /// The time of the commit in Unix seconds, and the committer's offset.
    pub seconds: i64,
    pub zone: String,
}

impl Ident {
    /// `user` at `seconds` in offset `zone`.
    pub fn of(user: &User, seconds: i64, zone: &str) -> Result<Ident, Status> {
        Ok(Ident {
            name: lossy(&user.name)?,
            email: lossy(&user.email)?,
            date: git_date(seconds, zone),
        })
    }

    /// The author of an existing commit, kept as it was (Gitaly's
    /// `getSignatureFromCommitAuthor`: an offset it cannot read is UTC).
    pub fn of_commit_author(a: Option<&CommitAuthor>) -> Ident {
        let a = a.cloned().unwrap_or_default();
        let zone = String::from_utf8_lossy(&a.timezone).into_owned();
        let zone = match crate::signature::fixed_offset(&zone) {
            Ok(z) if z.len() == 5 => z,
            _ => "+0000".into(),
        };
        Ident {
            name: String::from_utf8_lossy(&a.name).into_owned(),
            email: String::from_utf8_lossy(&a.email).into_owned(),
            date: git_date(a.date.map_or(0, |d| d.seconds), &zone),
        }
    }
}

impl Signature {
    /// `user` as author and committer at the request's `timestamp`, else at the
    /// committer date of `fallback` (the fixed rule, `signature`), in the user's offset.
    pub fn by(
        user: &User,
        timestamp: Option<&prost_types::Timestamp>,
        fallback: Option<&GitCommit>,
    ) -> Result<Signature, Status> {
        let (seconds, zone) = commit_time(timestamp, committer_seconds(fallback), user)?;
        let ident = Ident::of(user, seconds, &zone)?;
        Ok(Signature {
            author: ident.clone(),
            committer: ident,
            seconds,
            zone,
        })
    }

    /// The same, with another author at the same instant in the author's own offset
    /// (UserSquash's `author`).
    pub fn authored_by(mut self, author: &User) -> Result<Signature, Status> {
        let zone = crate::signature::fixed_offset(&author.timezone)?;
        self.author = Ident::of(author, self.seconds, &zone)?;
        Ok(self)
    }
}

/// How `git merge-tree --write-tree` ended.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum MergeTree {
    Clean(String),
    /// The paths that conflict, each once.
    Conflict(Vec<Vec<u8>>),
}

/// Reads `git merge-tree --write-tree --name-only -z`'s stdout for exit code `code`:
/// the tree id, then (on a conflict) each conflicting path, then an empty field before
/// git's messages.
pub(super) fn read_merge_tree(out: &[u8], code: Option<i32>) -> Result<MergeTree, String> {
    let mut fields = out.split(|b| *b == 0);
    let tree = String::from_utf8_lossy(fields.next().unwrap_or_default()).into_owned();
    match code {
        Some(0) if catfile::is_object_id(&tree) => Ok(MergeTree::Clean(tree)),
        Some(1) if catfile::is_object_id(&tree) => Ok(MergeTree::Conflict(
            fields
                .take_while(|f| !f.is_empty())
                .map(<[u8]>::to_vec)
                .collect(),
        )),
        _ => Err(format!(
            "git merge-tree answered {:?} with exit code {code:?}",
            String::from_utf8_lossy(&out[..out.len().min(200)])
        )),
    }
}

/// Builds commits and merge trees with one node's git.
pub(super) struct Objects<'a> {
    pub git: &'a Git,
}

impl Objects<'_> {
    /// The merge of `theirs` into `ours`: its tree written (inside `ctx`), or the paths
    /// that conflict. `base` replaces the merge base git would find (a cherry-pick's
    /// or a rebase's parent; a revert's commit).
    pub(super) async fn merge_tree(
        &self,
        repo: &RepoPath,
        ctx: &WriteContext,
        ours: &str,
        theirs: &str,
        base: Option<&str>,
    ) -> Result<MergeTree, Status> {
        let mut cmd = self
            .git
            .command([
                "merge-tree",
                "--write-tree",
                "--allow-unrelated-histories",
                "--name-only",
                "-z",
            ])
            .git_dir(&repo.path)
            .write_in(ctx);
        if let Some(base) = base {
            cmd = cmd.arg(format!("--merge-base={base}"));
        }
        let (out, exit) = cmd.arg(ours).arg(theirs).output(MERGE_TREE_OUTPUT).await?;
        read_merge_tree(&out, exit.code()).map_err(Status::internal)
    }

    /// Writes the commit of `tree` with `parents` (inside `ctx`), never signed.
    pub(super) async fn commit_tree(
        &self,
        repo: &RepoPath,
        ctx: &WriteContext,
        tree: &str,
        parents: &[&str],
        who: &Signature,
        message: &[u8],
    ) -> Result<String, Status> {
        let mut cmd = self
            .git
            .command(["commit-tree", "--no-gpg-sign"])
            .git_dir(&repo.path)
            .write_in(ctx);
        for p in parents {
            cmd = cmd.arg("-p").arg(*p);
        }
        for (role, i) in [("AUTHOR", &who.author), ("COMMITTER", &who.committer)] {
            cmd = cmd
                .env(&format!("GIT_{role}_NAME"), i.name.clone())
                .env(&format!("GIT_{role}_EMAIL"), i.email.clone())
                .env(&format!("GIT_{role}_DATE"), i.date.clone());
        }
        oid_of(
            cmd.arg(tree)
                .stdin(Box::pin(tokio_stream::once(Ok(message.to_vec()))))
                .spawn()
                .map_err(NodeError::from)?,
        )
        .await
    }
}

/// The object id a git run prints.
pub(super) async fn oid_of(run: Run) -> Result<String, Status> {
    let (out, exit) = run.output(OID_OUTPUT).await.map_err(NodeError::from)?;
    exit.check().map_err(NodeError::from)?;
    let oid = String::from_utf8_lossy(&out).trim().to_owned();
    if !catfile::is_object_id(&oid) {
        return Err(Status::internal(format!(
            "git printed {oid:?}, not an object id"
        )));
    }
    Ok(oid)
}

pub(super) fn committer_seconds(commit: Option<&refvote_proto::gitaly::GitCommit>) -> Option<i64> {
    commit?.committer.as_ref()?.date.as_ref().map(|d| d.seconds)
}

pub(super) fn lossy(b: &[u8]) -> Result<String, Status> {
    String::from_utf8(b.to_vec())
        .map_err(|_| NodeError::invalid("user name and email must be UTF-8").into())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TREE: &str = "ce3637f50ccddc067010db673c40a8ad44984eb7";

    #[test]
    fn a_clean_merge_is_its_tree() {
        let out = format!("{TREE}\0");
        assert_eq!(
            read_merge_tree(out.as_bytes(), Some(0)),
            Ok(MergeTree::Clean(TREE.into()))
        );
    }

    #[test]
    fn a_conflict_names_each_path_once_and_leaves_git_messages_out() {
        // What git 2.47 prints for a content conflict in `f` and `d/g`.
        let out = format!(
            "{TREE}\0f\0d/g\0\x001\0f\0Auto-merging\0Auto-merging f\n\x001\0f\0CONFLICT (contents)\0CONFLICT (content): Merge conflict in f\n\0"
        );
        assert_eq!(
            read_merge_tree(out.as_bytes(), Some(1)),
            Ok(MergeTree::Conflict(vec![b"f".to_vec(), b"d/g".to_vec()]))
        );
    }

    #[test]
    fn anything_else_is_an_error() {
        assert!(read_merge_tree(b"fatal: bad revision\n", Some(128)).is_err());
        assert!(read_merge_tree(b"", Some(0)).is_err());
        assert!(read_merge_tree(b"notanoid\0", Some(1)).is_err());
    }

    fn user(zone: &str) -> User {
        User {
            name: b"Jane".to_vec(),
            email: b"jane@example.com".to_vec(),
            timezone: zone.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_signature_is_the_requests_time_else_the_fixed_rule() {
        let at = prost_types::Timestamp {
            seconds: 1000,
            nanos: 0,
        };
        let s = Signature::by(&user("+0100"), Some(&at), None).unwrap();
        assert_eq!(s.author, s.committer);
        assert_eq!(s.committer.date, "@1000 +0100");
        let parent = GitCommit {
            committer: Some(CommitAuthor {
                date: Some(prost_types::Timestamp {
                    seconds: 77,
                    nanos: 0,
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let s = Signature::by(&user(""), None, Some(&parent)).unwrap();
        assert_eq!(s.committer.date, "@77 +0000");
        // A squash's author: the same instant, the author's own offset.
        let s = Signature::by(&user("+0100"), Some(&at), None)
            .unwrap()
            .authored_by(&User {
                name: b"Ann".to_vec(),
                ..user("-0330")
            })
            .unwrap();
        assert_eq!(
            (s.author.name.as_str(), s.author.date.as_str()),
            ("Ann", "@1000 -0330")
        );
        assert_eq!(s.committer.date, "@1000 +0100");
    }

    #[test]
    fn a_kept_author_keeps_its_date_and_a_readable_offset() {
        let a = CommitAuthor {
            name: b"A".to_vec(),
            email: b"a@x".to_vec(),
            date: Some(prost_types::Timestamp {
                seconds: 5,
                nanos: 0,
            }),
            timezone: b"-0700".to_vec(),
        };
        assert_eq!(Ident::of_commit_author(Some(&a)).date, "@5 -0700");
        let odd = CommitAuthor {
            timezone: b"bogus".to_vec(),
            ..a
        };
        assert_eq!(Ident::of_commit_author(Some(&odd)).date, "@5 +0000");
    }
}
