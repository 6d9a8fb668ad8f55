//! Bundles: streamed out of a repository (CreateBundle), streamed into a file in the
//! storage's private area and fetched from (CreateRepositoryFromBundle, and
//! ReplicateRepository, which gets its source's bundle through CreateBundle).

use std::path::{Path, PathBuf};

use tokio::io::AsyncWriteExt;
use tokio_stream::{Stream, StreamExt};
use tonic::Status;

use crate::error::NodeError;
use crate::git::{Git, Run};
use crate::storage::{Storages, TempDir};
use crate::tx::{WriteContext, WriteIn};

/// Refuses a repository with no refs: git cannot bundle nothing, and Gitaly answers
/// FAILED_PRECONDITION for it.
pub async fn ensure_not_empty(git: &Git, repo: &Path) -> Result<(), NodeError> {
    let (out, exit) = git
        .command(["for-each-ref", "--count=1", "--format=%(refname)"])
        .git_dir(repo)
        .output(4096)
        .await?;
    exit.check()?;
    if out.is_empty() {
        return Err(NodeError::FailedPrecondition(
            "refusing to create empty bundle: the repository has no refs".into(),
        ));
    }
    Ok(())
}

/// `git bundle create - --all`, its stdout to be streamed to the client.
pub fn create(git: &Git, repo: &Path) -> Result<Run, NodeError> {
    Ok(git
        .command(["bundle", "create", "-", "--all"])
        .git_dir(repo)
        .spawn()?)
}

/// A bundle on disk in a private directory removed on drop.
pub struct BundleFile {
    _dir: TempDir,
    pub path: PathBuf,
    /// Its size in bytes.
    pub len: u64,
}

/// Writes `chunks` to a new file under `root`'s private area, chunk by chunk (a large
/// bundle is never held in memory). Refuses an empty stream.
pub async fn receive<S>(root: &Path, mut chunks: S) -> Result<BundleFile, Status>
where
    S: Stream<Item = Result<Vec<u8>, Status>> + Unpin,
{
    let dir = TempDir(Storages::tmp_dir(root).join(format!("bundle-{}", uuid::Uuid::new_v4())));
    std::fs::create_dir_all(&dir.0)
        .map_err(|e| NodeError::io(format!("creating {}", dir.0.display()), e))?;
    let path = dir.0.join("repo.bundle");
    let mut file = tokio::fs::File::create(&path)
        .await
        .map_err(|e| NodeError::io(format!("creating {}", path.display()), e))?;
    let mut len = 0usize;
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk?;
        len += chunk.len();
        file.write_all(&chunk)
            .await
            .map_err(|e| NodeError::io(format!("writing {}", path.display()), e))?;
    }
    file.flush()
        .await
        .map_err(|e| NodeError::io(format!("writing {}", path.display()), e))?;
    if len == 0 {
        return Err(
            NodeError::invalid("the bundle is empty: stream a git bundle in `data`").into(),
        );
    }
    Ok(BundleFile {
        _dir: dir,
        path,
        len: len as u64,
    })
}

/// The refs a bundle carries, as (oid, name); refuses what is not a bundle.
pub async fn heads(git: &Git, bundle: &Path) -> Result<Vec<(String, String)>, NodeError> {
    let (out, exit) = git
        .command(["bundle", "list-heads"])
        .arg(bundle)
        .output(64 << 20)
        .await?;
    if !exit.success() {
        return Err(NodeError::invalid(format!(
            "the data is not a valid git bundle: {}",
            exit.stderr.trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out)
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(o, n)| (o.to_owned(), n.to_owned()))
        .collect())
}

/// The branch the bundle's HEAD points at: the branch with HEAD's object, preferring
/// main, then master, then the first by name. `None` without a HEAD line.
pub fn head_branch(heads: &[(String, String)]) -> Option<String> {
    let (head, _) = heads.iter().find(|(_, n)| n == "HEAD")?;
    let mut candidates: Vec<&str> = heads
        .iter()
        .filter(|(o, n)| o == head && n.starts_with("refs/heads/"))
        .map(|(_, n)| n.as_str())
        .collect();
    candidates.sort();
    ["refs/heads/main", "refs/heads/master"]
        .into_iter()
        .find(|p| candidates.contains(p))
        .or(candidates.first().copied())
        .map(|n| n.trim_start_matches("refs/heads/").to_owned())
}

/// Fetches every ref of `bundle` into `repo` in one transaction (`--atomic`), forced,
/// deleting refs the bundle does not have when `prune`.
pub async fn fetch(
    git: &Git,
    repo: &Path,
    bundle: &Path,
    ctx: &WriteContext,
    prune: bool,
) -> Result<(), NodeError> {
    let mut cmd = git
        .command([
            "fetch",
            "--quiet",
            "--atomic",
            "--no-tags",
            "--no-write-fetch-head",
        ])
        .git_dir(repo)
        .write_in(ctx);
    if prune {
        cmd = cmd.arg("--prune");
    }
    cmd.arg(bundle)
        .arg("+refs/*:refs/*")
        .status()
        .await?
        .check()?;
    Ok(())
}
