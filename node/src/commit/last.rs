//! The last commit that changed a path: LastCommitForPath and ListLastCommitsForTree.
//!
//! The answer is what `git log -1 --format=%H <rev> -- <path>` prints, found without
//! starting a process per path: with git's default history simplification, a path's
//! history from `<rev>` is one chain. At a commit whose path is as in one of its
//! parents (TREESAME), git follows the first such parent and shows nothing; the first
//! commit where the path differs from every parent (absent in a root commit counts as
//! differing only if the path exists) is the answer. [`Walk`] follows every requested
//! path's chain at once through the read engine, comparing tree entries, and reads a
//! directory's entries only when the directory itself changed. A chain longer than
//! [`MAX_STEPS`] commits is left to `git log -1` itself.

use std::collections::HashMap;

use refvote_proto::gitaly::list_last_commits_for_tree_response::CommitForTree;
use refvote_proto::gitaly::{
    GitCommit, LastCommitForPathRequest, LastCommitForPathResponse, ListLastCommitsForTreeRequest,
    ListLastCommitsForTreeResponse, tree_entry,
};
use tonic::Status;
use tonic::codegen::BoxStream;

use crate::engine::{Kind, MAX_OBJECT, Reader};
use crate::error::NodeError;
use crate::object::{self, TreeItem};
use crate::refs::names;
use crate::respond::stream_from;
use crate::state::NodeState;
use crate::storage::RepoPath;

/// Commits visited per call before the rest is left to `git log`.
pub const MAX_STEPS: usize = 20_000;
/// Commits per ListLastCommitsForTree message (Gitaly's batch).
const PER_MESSAGE: usize = 10;

/// What a path is in one commit: its mode and object, or absent.
type Entry = Option<(u32, String)>;

/// Per-call caches over the read engine.
struct Walk<'a> {
    reader: &'a mut Reader,
    parents: HashMap<String, Vec<String>>,
    dirs: HashMap<(String, String), Option<String>>,
    trees: HashMap<String, Vec<TreeItem>>,
    steps: usize,
}

impl<'a> Walk<'a> {
    fn new(reader: &'a mut Reader) -> Walk<'a> {
        Walk {
            reader,
            parents: HashMap::new(),
            dirs: HashMap::new(),
            trees: HashMap::new(),
            steps: 0,
        }
    }

    async fn parents(&mut self, commit: &str) -> Result<Vec<String>, NodeError> {
        if let Some(p) = self.parents.get(commit) {
            return Ok(p.clone());
        }
        let parents = match self.reader.object(commit, MAX_OBJECT).await? {
            Some(o) if o.info.kind == Kind::Commit => {
                object::parse_commit(&o.info.oid, &o.data).commit.parent_ids
            }
            _ => Vec::new(),
        };
        self.parents.insert(commit.to_owned(), parents.clone());
        Ok(parents)
    }

    /// The tree object `dir` is in `commit`, if it is a tree there.
    async fn dir(&mut self, commit: &str, dir: &str) -> Result<Option<String>, NodeError> {
        let key = (commit.to_owned(), dir.to_owned());
        if let Some(d) = self.dirs.get(&key) {
            return Ok(d.clone());
        }
        let oid = self
            .reader
            .info(&format!("{commit}:{dir}"))
            .await?
            .filter(|i| i.kind == Kind::Tree)
            .map(|i| i.oid);
        self.dirs.insert(key, oid.clone());
        Ok(oid)
    }

    async fn entry(&mut self, dir_tree: Option<&str>, name: &str) -> Result<Entry, NodeError> {
        let Some(tree) = dir_tree else {
            return Ok(None);
        };
        if !self.trees.contains_key(tree) {
            let items = self
                .reader
                .tree(tree)
                .await?
                .map(|(_, items)| items)
                .unwrap_or_default();
            self.trees.insert(tree.to_owned(), items);
        }
        Ok(self.trees[tree]
            .iter()
            .find(|i| i.name == name.as_bytes())
            .map(|i| (i.mode, i.oid.clone())))
    }

    /// The last commit of each of `paths` (full paths, no empty or dot components;
    /// `""` is the root) from `start`: `Some(commit)`, or `None` where git finds none,
    /// or where the chain was longer than [`MAX_STEPS`] (`unfinished` says which).
    async fn last_commits(
        &mut self,
        start: &str,
        paths: &[String],
    ) -> Result<(Vec<Option<String>>, Vec<usize>), NodeError> {
        let mut found: Vec<Option<String>> = vec![None; paths.len()];
        // Where each unresolved path's chain stands.
        let mut at: HashMap<String, Vec<usize>> = HashMap::new();
        at.insert(start.to_owned(), (0..paths.len()).collect());
        let mut unfinished = Vec::new();
        while let Some(commit) = at.keys().next().cloned() {
            let group = at.remove(&commit).unwrap_or_default();
            self.steps += 1;
            if self.steps > MAX_STEPS {
                unfinished.extend(group);
                unfinished.extend(at.drain().flat_map(|(_, g)| g));
                break;
            }
            let parents = self.parents(&commit).await?;
            // Paths grouped by directory, so one tree read serves a directory.
            let mut by_dir: HashMap<String, Vec<usize>> = HashMap::new();
            for i in group {
                let (dir, _) = split(&paths[i]);
                by_dir.entry(dir.to_owned()).or_default().push(i);
            }
            for (dir, members) in by_dir {
                let here = self.dir(&commit, &dir).await?;
                let mut left = members;
                for parent in &parents {
                    if left.is_empty() {
                        break;
                    }
                    let there = self.dir(parent, &dir).await?;
                    if here == there {
                        // The whole directory is as in this parent: so is every path.
                        at.entry(parent.clone()).or_default().append(&mut left);
                        break;
                    }
                    let mut still = Vec::new();
                    for i in left {
                        let (_, name) = split(&paths[i]);
                        let mine = self.entry_of(here.as_deref(), &paths[i], name).await?;
                        let theirs = self.entry_of(there.as_deref(), &paths[i], name).await?;
                        if mine == theirs {
                            at.entry(parent.clone()).or_default().push(i);
                        } else {
                            still.push(i);
                        }
                    }
                    left = still;
                }
                // Different from every parent (or a root commit): changed here, if the
                // path is here at all (a root commit lacking it shows nothing).
                for i in left {
                    let (_, name) = split(&paths[i]);
                    let present = self.entry_of(here.as_deref(), &paths[i], name).await?;
                    if !parents.is_empty() || present.is_some() {
                        found[i] = Some(commit.clone());
                    }
                }
            }
        }
        Ok((found, unfinished))
    }

    /// The root "path" is the directory itself.
    async fn entry_of(
        &mut self,
        dir_tree: Option<&str>,
        path: &str,
        name: &str,
    ) -> Result<Entry, NodeError> {
        if path.is_empty() {
            return Ok(dir_tree.map(|t| (object::MODE_TREE, t.to_owned())));
        }
        self.entry(dir_tree, name).await
    }
}

/// `a/b/c` → (`a/b`, `c`); `c` → (``, `c`); `` → (``, ``).
fn split(path: &str) -> (&str, &str) {
    path.rsplit_once('/').unwrap_or(("", path))
}

/// A request path as git reads a pathspec of one path: cleaned lexically (as Go's
/// `path.Clean`: `a//b`, `./a` and `a/x/..` become `a/b`, `a`, `a`), `""`, `"/"` and
/// `"."` the root, a trailing slash dropped. `None` if it climbs out of the tree.
fn clean_path(raw: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for c in raw.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            c => parts.push(c),
        }
    }
    Some(parts.join("/"))
}

/// `git log -1 --format=%H <rev> -- <path>` for a path the walk did not finish.
async fn log_one(
    node: &NodeState,
    repo: &RepoPath,
    rev: &str,
    path: &str,
    literal: bool,
) -> Result<Option<String>, NodeError> {
    let mut cmd = node
        .git
        .command(["log", "--format=%H", "--max-count=1", "--end-of-options"])
        .arg(rev)
        .arg("--")
        .arg(if path.is_empty() { "." } else { path })
        .repo(repo);
    if literal {
        cmd = cmd.env("GIT_LITERAL_PATHSPECS", "1");
    }
    let (out, exit) = cmd.spawn()?.output(4096).await?;
    if !exit.success() {
        return Ok(None);
    }
    let oid = String::from_utf8_lossy(&out).trim().to_owned();
    Ok((!oid.is_empty()).then_some(oid))
}

/// Last commits of `paths` from `rev`, as commits; `None` where there is none.
async fn resolve(
    node: &NodeState,
    repo: &crate::storage::RepoPath,
    reader: &mut Reader,
    start: &str,
    paths: &[String],
    literal: bool,
) -> Result<Vec<Option<GitCommit>>, NodeError> {
    let (mut found, unfinished) = Walk::new(reader).last_commits(start, paths).await?;
    for i in unfinished {
        found[i] = log_one(node, repo, start, &paths[i], literal).await?;
    }
    let oids: Vec<String> = found
        .iter()
        .map(|f| f.clone().unwrap_or_else(|| "\u{1}".to_owned()))
        .collect();
    let commits = reader.commits(&oids).await?;
    Ok(found
        .iter()
        .zip(commits)
        .map(|(f, c)| f.as_ref().and(c))
        .collect())
}

pub async fn last_commit_for_path(
    node: &NodeState,
    req: LastCommitForPathRequest,
) -> Result<LastCommitForPathResponse, Status> {
    let repo = node.storages.existing(req.repository.as_ref())?;
    let rev = names::revision("revision", &req.revision)?.to_owned();
    let raw = String::from_utf8_lossy(&req.path).into_owned();
    if raw.starts_with('/') && raw != "/" {
        return Err(Status::invalid_argument("path is an absolute path"));
    }
    let Some(path) = clean_path(&raw) else {
        return Err(Status::invalid_argument("path escapes repository"));
    };
    let literal = req.literal_pathspec
        || req
            .global_options
            .as_ref()
            .is_some_and(|o| o.literal_pathspecs);
    let mut reader = node.reads.reader(&repo).await?;
    let Some(start) = reader.info(&format!("{rev}^{{commit}}")).await? else {
        return Ok(LastCommitForPathResponse { commit: None });
    };
    let mut commits = resolve(node, &repo, &mut reader, &start.oid, &[path], literal).await?;
    Ok(LastCommitForPathResponse {
        commit: commits.pop().flatten(),
    })
}

/// The entries `git ls-tree --full-name <rev> -- <path>` lists: a directory's entries
/// when the path is the root or ends in `/`, else the entry at the path itself.
async fn listed_entries(
    reader: &mut Reader,
    rev: &str,
    raw: &str,
) -> Result<Vec<(String, tree_entry::EntryType)>, Status> {
    let listing_dir = raw.is_empty() || raw == "/" || raw == "." || raw.ends_with('/');
    let Some(path) = clean_path(raw) else {
        return Ok(Vec::new());
    };
    let (dir, only) = if listing_dir {
        (path.clone(), None)
    } else {
        let (d, n) = split(&path);
        (d.to_owned(), Some(n.to_owned()))
    };
    let Some((_, items)) = reader.tree(&format!("{rev}:{dir}")).await? else {
        return Ok(Vec::new());
    };
    let prefix = if dir.is_empty() {
        String::new()
    } else {
        format!("{dir}/")
    };
    let mut out: Vec<(String, tree_entry::EntryType)> = items
        .into_iter()
        .filter(|i| only.as_ref().is_none_or(|n| i.name == n.as_bytes()))
        .map(|i| {
            (
                format!("{prefix}{}", String::from_utf8_lossy(&i.name)),
                object::mode_kind(i.mode),
            )
        })
        .collect();
    // Gitaly's order: trees, then blobs, then submodules, each as git lists them.
    out.sort_by_key(|(_, kind)| match kind {
        tree_entry::EntryType::Tree => 0,
        tree_entry::EntryType::Blob => 1,
        tree_entry::EntryType::Commit => 2,
    });
    Ok(out)
}

pub async fn list_last_commits_for_tree(
    node: &NodeState,
    req: ListLastCommitsForTreeRequest,
) -> Result<BoxStream<ListLastCommitsForTreeResponse>, Status> {
    let repo = node.storages.existing(req.repository.as_ref())?;
    let rev = names::revision("revision", req.revision.as_bytes())?.to_owned();
    if req.offset < 0 {
        return Err(Status::invalid_argument("offset negative"));
    }
    if req.limit < 0 {
        return Err(Status::invalid_argument("limit negative"));
    }
    let raw = String::from_utf8_lossy(&req.path).into_owned();
    if (raw.starts_with('/') && raw != "/") || clean_path(&raw).is_none() {
        // git ls-tree refuses a path outside the repository.
        return Err(Status::internal("exit status 128"));
    }
    let literal = req
        .global_options
        .as_ref()
        .is_some_and(|o| o.literal_pathspecs);
    let mut reader = node.reads.reader(&repo).await?;
    let Some(start) = reader.info(&format!("{rev}^{{commit}}")).await? else {
        return Err(Status::internal("exit status 128"));
    };
    let mut entries = listed_entries(&mut reader, &start.oid, &raw).await?;
    let offset = req.offset as usize;
    if offset >= entries.len() {
        entries.clear();
    } else {
        let end = (offset + req.limit as usize).min(entries.len());
        entries = entries[offset..end].to_vec();
    }
    let paths: Vec<String> = entries.into_iter().map(|(p, _)| p).collect();
    let commits = resolve(node, &repo, &mut reader, &start.oid, &paths, literal).await?;
    drop(reader);
    let mut items = Vec::with_capacity(paths.len());
    for (path, commit) in paths.into_iter().zip(commits) {
        let Some(commit) = commit else {
            return Err(Status::internal(format!(
                "commit not resolved for {path:?}"
            )));
        };
        items.push(CommitForTree {
            commit: Some(commit),
            path_bytes: path.into_bytes(),
        });
    }
    Ok(stream_from(move |tx| async move {
        for batch in items.chunks(PER_MESSAGE) {
            let msg = ListLastCommitsForTreeResponse {
                commits: batch.to_vec(),
            };
            if tx.send(Ok(msg)).await.is_err() {
                break;
            }
        }
        Ok(())
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_read_as_one_pathspec() {
        assert_eq!(clean_path(""), Some(String::new()));
        assert_eq!(clean_path("/"), Some(String::new()));
        assert_eq!(clean_path("dir/"), Some("dir".into()));
        assert_eq!(clean_path("a/b"), Some("a/b".into()));
        assert_eq!(clean_path("../x"), None);
        assert_eq!(clean_path("a/../.."), None);
        assert_eq!(clean_path("a//b"), Some("a/b".into()));
        assert_eq!(clean_path("./a/x/.."), Some("a".into()));
        assert_eq!(split("a/b/c"), ("a/b", "c"));
        assert_eq!(split("c"), ("", "c"));
    }
}
