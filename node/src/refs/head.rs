//! HEAD and the default branch, as Gitaly's `HeadReference` and `GetDefaultBranch`
//! find them: HEAD's branch if it exists, else `refs/heads/main`, else
//! `refs/heads/master`, else the first branch by name; nothing without branches.
//!
//! The common case starts no process: HEAD is read from its file (the files backend
//! keeps it there) and the candidates are resolved through the read engine. Only a
//! repository on the reftable backend, a detached or odd HEAD, or one whose candidates
//! all miss asks git itself.

use std::path::Path;

use crate::engine::Reader;
use crate::error::NodeError;
use crate::git::Git;

/// Bound on the small answers read whole here.
const SMALL: usize = 64 * 1024;

/// What HEAD points at: a ref name, or `None` if HEAD is detached.
pub async fn head_target(git: &Git, repo: &Path) -> Result<Option<String>, NodeError> {
    if let Some(target) = head_from_file(repo) {
        return Ok(Some(target));
    }
    let (out, exit) = git
        .command(["symbolic-ref", "--quiet", "HEAD"])
        .git_dir(repo)
        .spawn()?
        .output(SMALL)
        .await?;
    match exit.code() {
        Some(0) => Ok(Some(String::from_utf8_lossy(&out).trim().to_owned())),
        Some(1) => Ok(None),
        _ => Err(exit.into_error().into()),
    }
}

/// The default branch (a full ref name), or `None` when there is no branch.
pub async fn default_branch(
    git: &Git,
    repo: &Path,
    reader: &mut Reader,
) -> Result<Option<String>, NodeError> {
    let head = head_target(git, repo).await?;
    let mut candidates: Vec<String> = head.into_iter().collect();
    for c in ["refs/heads/main", "refs/heads/master"] {
        if !candidates.iter().any(|h| h == c) {
            candidates.push(c.to_owned());
        }
    }
    let found = reader.infos(&candidates).await?;
    if let Some((name, _)) = candidates
        .iter()
        .zip(found)
        .find(|(name, info)| info.is_some() && !name.is_empty())
    {
        return Ok(Some(name.clone()));
    }
    let (out, exit) = git
        .command([
            "for-each-ref",
            "--count=1",
            "--format=%(refname)",
            "refs/heads/",
        ])
        .git_dir(repo)
        .spawn()?
        .output(SMALL)
        .await?;
    exit.check()?;
    let first = String::from_utf8_lossy(&out).trim().to_owned();
    Ok((!first.is_empty()).then_some(first))
}

/// HEAD's target read from the file, when the repository keeps refs as files and
/// HEAD is a plain symref below refs/.
fn head_from_file(repo: &Path) -> Option<String> {
    if repo.join("reftable").exists() {
        return None;
    }
    let raw = std::fs::read(repo.join("HEAD")).ok()?;
    let text = std::str::from_utf8(&raw).ok()?;
    let target = text.strip_prefix("ref: ")?.trim_end_matches(['\n', '\r']);
    let plain = target.starts_with("refs/")
        && !target.contains(char::is_whitespace)
        && crate::refs::names::valid_ref_name(target);
    plain.then(|| target.to_owned())
}
