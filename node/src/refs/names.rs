//! Ref names, revisions and ref values: validation before git sees anything, and the
//! reads every ref update needs (DESIGN.md §2 "Votes": votingd always passes explicit
//! old object ids, so it reads the current values first).

use std::collections::{HashMap, HashSet};
use std::path::Path;

use crate::error::NodeError;
use crate::git::Git;

/// Bound on small answers read whole (one object id, one ref name).
const SMALL: usize = 64 * 1024;

/// git's ref-name rules (check-ref-format), for a branch below refs/heads/.
pub fn valid_branch_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('-')
        && !name.ends_with('/')
        && !name.ends_with(".lock")
        && !name.ends_with('.')
        && !name.contains("..")
        && !name.contains("@{")
        && !name.contains("//")
        && name != "@"
        && !name
            .chars()
            .any(|c| c.is_ascii_control() || " ~^:?*[\\".contains(c))
        && name
            .split('/')
            .all(|part| !part.is_empty() && !part.starts_with('.'))
}

/// A fully qualified ref name git would accept (`refs/...`, check-ref-format rules).
pub fn valid_ref_name(name: &str) -> bool {
    name.starts_with("refs/") && name.len() > "refs/".len() && valid_branch_name(name)
}

/// A request's ref name as UTF-8 that [`valid_ref_name`] accepts.
pub fn ref_name<'a>(what: &str, raw: &'a [u8]) -> Result<&'a str, NodeError> {
    std::str::from_utf8(raw)
        .ok()
        .filter(|n| valid_ref_name(n))
        .ok_or_else(|| {
            NodeError::invalid(format!(
                "invalid {what} {:?}: a fully qualified ref name is needed, e.g. refs/heads/main",
                String::from_utf8_lossy(raw)
            ))
        })
}

/// A revision safe to hand to git as an argument: not empty, no option, no whitespace
/// or control characters (Gitaly's revision rules).
pub fn revision<'a>(what: &str, raw: &'a [u8]) -> Result<&'a str, NodeError> {
    let text =
        std::str::from_utf8(raw).map_err(|_| NodeError::invalid(format!("{what} is not UTF-8")))?;
    if text.is_empty() {
        return Err(NodeError::invalid(format!("empty {what}")));
    }
    if text.starts_with('-') {
        return Err(NodeError::invalid(format!(
            "{what} {text:?} cannot start with '-'"
        )));
    }
    if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(NodeError::invalid(format!(
            "{what} {text:?} cannot contain whitespace or control characters"
        )));
    }
    Ok(text)
}

/// Whether `oid` is a full hex object id of `len` characters.
pub fn is_oid(oid: &str, len: usize) -> bool {
    oid.len() == len && oid.bytes().all(|b| b.is_ascii_hexdigit())
}

pub fn is_zero(oid: &str) -> bool {
    !oid.is_empty() && oid.bytes().all(|b| b == b'0')
}

/// The repository's object id length in hex (40 for SHA-1, 64 for SHA-256).
pub async fn oid_len(git: &Git, repo: &Path) -> Result<usize, NodeError> {
    let (out, exit) = git
        .command(["rev-parse", "--show-object-format"])
        .git_dir(repo)
        .spawn()?
        .output(SMALL)
        .await?;
    exit.check()?;
    match String::from_utf8_lossy(&out).trim() {
        "sha256" => Ok(64),
        _ => Ok(40),
    }
}

/// The object `rev` names (`rev^{object}`: not peeled), or `None` if it names nothing.
pub async fn resolve(git: &Git, repo: &Path, rev: &str) -> Result<Option<String>, NodeError> {
    let (out, exit) = git
        .command(["rev-parse", "--verify", "--quiet"])
        .arg(format!("{rev}^{{object}}"))
        .git_dir(repo)
        .spawn()?
        .output(SMALL)
        .await?;
    match exit.code() {
        Some(0) => Ok(Some(String::from_utf8_lossy(&out).trim().to_owned())),
        // --verify --quiet: 1 means "no such object"
        Some(1) => Ok(None),
        _ => Err(exit.into_error().into()),
    }
}

/// The current values of the refs in `names` that exist. Streams `for-each-ref`, so
/// the cost is one git run whatever the batch size.
pub async fn current_values(
    git: &Git,
    repo: &Path,
    names: &HashSet<String>,
) -> Result<HashMap<String, String>, NodeError> {
    let mut found = HashMap::new();
    if names.is_empty() {
        return Ok(found);
    }
    // One pass over every ref rather than one git run per name, and no argv limit.
    let mut run = git
        .command(["for-each-ref", "--format=%(objectname) %(refname)"])
        .git_dir(repo)
        .spawn()?;
    let mut partial = Vec::new();
    while let Some(chunk) = run.chunk().await {
        partial.extend_from_slice(&chunk?);
        let mut start = 0;
        while let Some(nl) = partial[start..].iter().position(|b| *b == b'\n') {
            let line = String::from_utf8_lossy(&partial[start..start + nl]);
            if let Some((oid, name)) = line.split_once(' ')
                && names.contains(name)
            {
                found.insert(name.to_owned(), oid.to_owned());
            }
            start += nl + 1;
        }
        partial.drain(..start);
    }
    run.wait().await?.check()?;
    Ok(found)
}

/// Gitaly's pseudo-revisions (`git.AllowPseudoRevision`), accepted as they are where
/// a revision list allows them.
pub fn is_pseudo_revision(rev: &[u8]) -> bool {
    matches!(
        rev,
        b"--all" | b"--not" | b"--branches" | b"--tags" | b"--alternate-refs"
    ) || rev.starts_with(b"--branches=")
        || rev.starts_with(b"--tags=")
        || rev.starts_with(b"--glob=")
}

/// A revision of a revision list: a pseudo-revision, or one [`revision`] accepts.
pub fn revision_or_pseudo(raw: &[u8]) -> Result<&str, NodeError> {
    if is_pseudo_revision(raw) {
        return std::str::from_utf8(raw).map_err(|_| NodeError::invalid("revision is not UTF-8"));
    }
    revision("revision", raw)
}

/// Like [`revision_or_pseudo`], and a `rev:path` is judged by its revision
/// (`git.AllowPathScopedRevision`).
pub fn path_revision_or_pseudo(raw: &[u8]) -> Result<&str, NodeError> {
    if is_pseudo_revision(raw) {
        return std::str::from_utf8(raw).map_err(|_| NodeError::invalid("revision is not UTF-8"));
    }
    let text = std::str::from_utf8(raw).map_err(|_| NodeError::invalid("revision is not UTF-8"))?;
    let rev = text.split_once(':').map_or(text, |(r, _)| r);
    if rev.is_empty() && text.contains(':') {
        // ":path" names the index, which a bare repository has not.
        return Err(NodeError::invalid(format!("revision {text:?} is empty")));
    }
    revision("revision", rev.as_bytes())?;
    if text.contains('\0') {
        return Err(NodeError::invalid(format!(
            "revision {text:?} can't contain NUL"
        )));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_revisions() {
        assert!(valid_ref_name("refs/heads/main"));
        assert!(valid_ref_name("refs/tags/v1.0"));
        for bad in [
            "main",
            "refs/",
            "refs/heads/a..b",
            "refs/heads/x.lock",
            "HEAD",
        ] {
            assert!(!valid_ref_name(bad), "{bad}");
        }
        assert!(revision("r", b"main~1").is_ok());
        for bad in [&b""[..], b"--all", b"a b", b"a\nb", b"\xff"] {
            assert!(revision("r", bad).is_err(), "{bad:?}");
        }
        assert!(is_oid(&"a".repeat(40), 40));
        assert!(!is_oid(&"g".repeat(40), 40));
        assert!(is_zero(&"0".repeat(40)));
        assert!(!is_zero(""));
    }
}
