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
            .all(|part| !part.is_empty() && !part.starts_with('.') && !part.ends_with(".lock"))
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

/// A revision safe to hand to git as an argument, by Gitaly's rule
/// (`git.ValidateRevision`, without its options): not empty, no leading '-' (it would
/// be an option), no NUL, no whitespace (space, tab, newline, carriage return), no ':'
/// (a path-scoped revision) and no '\\'. The one validator every RPC uses.
pub fn revision<'a>(what: &str, raw: &'a [u8]) -> Result<&'a str, NodeError> {
    let rev =
        std::str::from_utf8(raw).map_err(|_| NodeError::invalid(format!("{what} is not UTF-8")))?;
    let problem = if rev.starts_with('-') {
        Some("can't start with '-'")
    } else if rev.contains('\0') {
        Some("can't contain NUL")
    } else if rev.is_empty() {
        Some("is empty")
    } else if rev.contains([' ', '\t', '\n', '\r']) {
        Some("can't contain whitespace")
    } else if rev.contains(':') {
        Some("can't contain ':'")
    } else if rev.contains('\\') {
        Some("can't contain '\\'")
    } else {
        None
    };
    match problem {
        Some(p) => Err(NodeError::invalid(format!("{what} {rev:?} {p}"))),
        None => Ok(rev),
    }
}

/// A revision that may name a path in it (`rev:path`, Gitaly's
/// `git.AllowPathScopedRevision`): the part before the first ':' must pass
/// [`revision`], and the whole has no NUL.
pub fn path_scoped_revision<'a>(what: &str, raw: &'a [u8]) -> Result<&'a str, NodeError> {
    let text =
        std::str::from_utf8(raw).map_err(|_| NodeError::invalid(format!("{what} is not UTF-8")))?;
    let rev = text.split_once(':').map_or(text, |(r, _)| r);
    revision(what, rev.as_bytes())?;
    if text.contains('\0') {
        return Err(NodeError::invalid(format!(
            "{what} {text:?} can't contain NUL"
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
        .output(SMALL)
        .await?;
    // --verify --quiet: 1 means "no such object".
    Ok(exit
        .answer()?
        .then(|| String::from_utf8_lossy(&out).trim().to_owned()))
}

/// The current value of the ref `name`, or `None` if it does not exist. git walks
/// only that ref's part of the namespace (`name` is its pattern: itself and anything
/// below it), so the cost does not grow with the repository's other refs.
pub async fn current_value(
    git: &Git,
    repo: &Path,
    name: &str,
) -> Result<Option<String>, NodeError> {
    let names = HashSet::from([name.to_owned()]);
    Ok(scan(git, repo, Some(name), &names).await?.remove(name))
}

/// The current values of the refs in `names` that exist. Streams `for-each-ref`, so
/// the cost is one git run whatever the batch size.
pub async fn current_values(
    git: &Git,
    repo: &Path,
    names: &HashSet<String>,
) -> Result<HashMap<String, String>, NodeError> {
    if names.is_empty() {
        return Ok(HashMap::new());
    }
    // One pass over every ref rather than one git run per name, and no argv limit.
    scan(git, repo, None, names).await
}

/// Streams `for-each-ref` (below `pattern`, if given) and keeps the refs in `names`.
async fn scan(
    git: &Git,
    repo: &Path,
    pattern: Option<&str>,
    names: &HashSet<String>,
) -> Result<HashMap<String, String>, NodeError> {
    let mut found = HashMap::new();
    let mut cmd = git
        .command(["for-each-ref", "--format=%(objectname) %(refname)"])
        .git_dir(repo);
    if let Some(p) = pattern {
        cmd = cmd.arg(p);
    }
    let mut run = cmd.spawn()?;
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

    /// What `git check-ref-format` (2.47) answers for each name.
    #[test]
    fn ref_names_follow_check_ref_format() {
        let git_says = [
            ("refs/heads/a.lock/b", false),
            ("refs/heads/a.lock", false),
            ("refs/heads/-x", true),
            ("refs/heads/a..b", false),
            ("refs/heads/.a", false),
            ("refs/heads/a/.b", false),
            ("refs/heads/a.", false),
            ("refs/heads/a@{b", false),
            ("refs/heads/@", true),
            ("refs/heads/a b", false),
            ("refs/heads/a\\b", false),
            ("refs/heads/a*", false),
            ("refs/heads/a//b", false),
            ("refs/heads/a/", false),
            ("refs/heads/\u{e9}", true),
            ("refs/heads/a~1", false),
            ("refs/heads/a^", false),
            ("refs/heads/a:b", false),
            ("refs/heads/a?", false),
            ("refs/heads/a[", false),
            ("refs/heads/a\x7f", false),
            ("refs/heads/@a", true),
            ("refs/heads/a@", true),
            ("refs/heads/.lock", false),
            ("refs/heads/a.lock.b", true),
            ("refs/x", true),
            ("refs/heads/a/b.lock/c", false),
            ("refs/heads/HEAD", true),
            ("refs/heads/a..lock", false),
        ];
        for (name, valid) in git_says {
            assert_eq!(valid_ref_name(name), valid, "{name:?}");
        }
    }

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
        for good in [
            &b"main~1"[..],
            b"refs/heads/a^{commit}",
            b"HEAD@{1}",
            b"a\x01b",
        ] {
            assert!(revision("r", good).is_ok(), "{good:?}");
        }
        for bad in [
            &b""[..],
            b"--all",
            b"a b",
            b"a\nb",
            b"a\tb",
            b"a\rb",
            b"a\0b",
            b"main:README",
            b"a\\b",
            b"\xff",
        ] {
            assert!(revision("r", bad).is_err(), "{bad:?}");
        }
        let e = revision("start_point", b"-x").unwrap_err().to_string();
        assert_eq!(e, r#"start_point "-x" can't start with '-'"#);
        assert!(is_oid(&"a".repeat(40), 40));
        assert!(!is_oid(&"g".repeat(40), 40));
        assert!(is_zero(&"0".repeat(40)));
        assert!(!is_zero(""));
    }
}
