//! A repository's refs as partition sync carries them, and the values computed from
//! them: Gitaly's checksum (what a refvote target's `CalculateChecksum` answers), the
//! fingerprint a git target is compared by, and the patterns that choose which refs
//! are carried and pushed. Pure: the git module reads the refs, this decides.

use std::collections::BTreeMap;

use refvote_cluster::checksum::Checksum;
use serde::{Deserialize, Serialize};
use sha2::Digest;

/// Gitaly's checksum of a repository with no counted ref (an empty, valid one).
pub use refvote_cluster::checksum::EMPTY as EMPTY_CHECKSUM;

/// Refs by name, and where HEAD points.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefSet {
    /// Ref name → object id.
    pub refs: BTreeMap<String, String>,
    /// HEAD's symbolic target (`refs/heads/main`), when HEAD is a symref.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<String>,
}

impl RefSet {
    /// Parses `git for-each-ref --format='%(objectname) %(refname)'` output.
    pub fn parse(for_each_ref: &str, head: Option<String>) -> Result<RefSet, String> {
        let mut refs = BTreeMap::new();
        for line in for_each_ref.lines().filter(|l| !l.is_empty()) {
            let (oid, name) = line
                .split_once(' ')
                .ok_or_else(|| format!("unexpected for-each-ref line {line:?}"))?;
            if !is_oid(oid) {
                return Err(format!("unexpected object id in {line:?}"));
            }
            refs.insert(name.to_owned(), oid.to_owned());
        }
        Ok(RefSet { refs, head })
    }

    /// The object HEAD resolves to, if its target exists.
    pub fn head_oid(&self) -> Option<&str> {
        self.head
            .as_deref()
            .and_then(|h| self.refs.get(h))
            .map(String::as_str)
    }

    /// The refs `patterns` select (HEAD kept if its target is kept).
    pub fn filtered(&self, patterns: &RefPatterns) -> RefSet {
        RefSet {
            refs: self
                .refs
                .iter()
                .filter(|(name, _)| patterns.matches(name))
                .map(|(n, o)| (n.clone(), o.clone()))
                .collect(),
            head: self.head.clone(),
        }
    }

    /// Gitaly's `CalculateChecksum` of a repository holding exactly these refs (and
    /// HEAD): the `show-ref --head` lines it would have, folded as the node folds a
    /// replica's ([`refvote_cluster::checksum`]).
    pub fn checksum(&self) -> String {
        let mut sum = Checksum::default();
        if let Some(oid) = self.head_oid() {
            sum.add_line(format!("{oid} HEAD").as_bytes());
        }
        for (name, oid) in &self.refs {
            sum.add_line(format!("{oid} {name}").as_bytes());
        }
        sum.finish().unwrap_or_else(|| EMPTY_CHECKSUM.to_owned())
    }

    /// SHA-256 over the sorted `<oid> <name>` lines: equal exactly when the refs are
    /// (HEAD is left out: a plain git remote's HEAD cannot be set by a push).
    pub fn fingerprint(&self) -> String {
        let mut h = sha2::Sha256::new();
        for (name, oid) in &self.refs {
            h.update(oid.as_bytes());
            h.update(b" ");
            h.update(name.as_bytes());
            h.update(b"\n");
        }
        hex::encode(h.finalize())
    }

    /// The distinct object ids the refs point at, sorted.
    pub fn tips(&self) -> Vec<String> {
        let mut v: Vec<String> = self.refs.values().cloned().collect();
        v.sort();
        v.dedup();
        v
    }
}

pub fn is_oid(s: &str) -> bool {
    (s.len() == 40 || s.len() == 64) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Which refs are carried and pushed: exact names (`refs/heads/main`) or namespaces
/// (`refs/heads/*`; `refs/*` is every ref).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefPatterns(Vec<String>);

impl RefPatterns {
    pub fn all() -> RefPatterns {
        RefPatterns(vec!["refs/*".into()])
    }

    /// Checks each pattern; the error says which one and why.
    pub fn new(patterns: &[String]) -> Result<RefPatterns, (usize, String)> {
        if patterns.is_empty() {
            return Err((0, "at least one pattern is needed, e.g. \"refs/*\"".into()));
        }
        for (i, p) in patterns.iter().enumerate() {
            if !p.starts_with("refs/") {
                return Err((i, format!("{p:?} must start with refs/")));
            }
            let stem = p.strip_suffix("/*").unwrap_or(p);
            if stem.contains('*') || stem.contains("..") || stem.contains(' ') {
                return Err((
                    i,
                    format!("{p:?}: use an exact ref name or a namespace ending in /*"),
                ));
            }
        }
        Ok(RefPatterns(patterns.to_vec()))
    }

    pub fn matches(&self, name: &str) -> bool {
        self.0.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => name == p,
        })
    }

    /// Forced refspecs mapping each pattern onto itself, for fetch and push.
    pub fn refspecs(&self) -> Vec<String> {
        self.0.iter().map(|p| format!("+{p}:{p}")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "1111111111111111111111111111111111111111";
    const B: &str = "2222222222222222222222222222222222222222";

    fn set(lines: &[(&str, &str)], head: Option<&str>) -> RefSet {
        RefSet {
            refs: lines
                .iter()
                .map(|(n, o)| (n.to_string(), o.to_string()))
                .collect(),
            head: head.map(str::to_owned),
        }
    }

    #[test]
    fn parses_for_each_ref() {
        let s = RefSet::parse(
            &format!("{A} refs/heads/main\n{B} refs/tags/v1\n"),
            Some("refs/heads/main".into()),
        )
        .unwrap();
        assert_eq!(s.head_oid(), Some(A));
        assert_eq!(s.tips(), vec![A.to_owned(), B.to_owned()]);
        assert!(RefSet::parse("zz refs/heads/x", None).is_err());
    }

    #[test]
    fn checksum_follows_gitaly() {
        // One counted line: the checksum is its SHA-1 with leading zeros dropped.
        let one = set(&[("refs/heads/main", A)], None);
        let digest = hex::encode(sha1::Sha1::digest(format!("{A} refs/heads/main")));
        assert_eq!(one.checksum(), digest.trim_start_matches('0'));
        // HEAD counts; refs outside Gitaly's namespaces do not.
        let with_head = set(&[("refs/heads/main", A)], Some("refs/heads/main"));
        assert_ne!(with_head.checksum(), one.checksum());
        let extra = set(&[("refs/heads/main", A), ("refs/pipelines/1", B)], None);
        assert_eq!(extra.checksum(), one.checksum());
        assert_eq!(RefSet::default().checksum(), EMPTY_CHECKSUM);
    }

    #[test]
    fn fingerprint_sees_every_ref_but_not_head() {
        let a = set(&[("refs/heads/main", A)], Some("refs/heads/main"));
        let b = set(&[("refs/heads/main", A)], None);
        assert_eq!(a.fingerprint(), b.fingerprint());
        let c = set(&[("refs/heads/main", A), ("refs/pipelines/1", B)], None);
        assert_ne!(a.fingerprint(), c.fingerprint());
    }

    #[test]
    fn patterns_select_refs() {
        let p = RefPatterns::new(&["refs/heads/*".into(), "refs/tags/v1".into()]).unwrap();
        assert!(p.matches("refs/heads/a/b"));
        assert!(p.matches("refs/tags/v1"));
        assert!(!p.matches("refs/tags/v10"));
        assert!(!p.matches("refs/merge-requests/1/head"));
        assert!(RefPatterns::all().matches("refs/anything"));
        assert_eq!(p.refspecs()[0], "+refs/heads/*:refs/heads/*");
        assert_eq!(RefPatterns::new(&["heads/*".into()]).unwrap_err().0, 0);
        assert_eq!(
            RefPatterns::new(&["refs/*".into(), "refs/h*ds".into()])
                .unwrap_err()
                .0,
            1
        );
        let s = set(&[("refs/heads/main", A), ("refs/keep-around/x", B)], None);
        assert_eq!(s.filtered(&p).refs.len(), 1);
    }
}
