//! Where things live in the bucket, and what their names say.
//!
//! Under the configured prefix, each repository has a folder named by the base64url of
//! its relative path (`R`), holding for each sequence number `N` (20 digits, so names
//! sort in sequence order):
//!
//! ```text
//! <prefix><R>/<N>.manifest                  sealed JSON: the sequence's refs, sizes, data name
//! <prefix><R>/<N>/<H…>/bundle               the sealed bundle
//! ```
//!
//! `H` is the base64url of the sequence's [`Header`] as compact JSON (repository,
//! sequence, base and tip checksums, bundle format, full or incremental, key id, and a
//! random upload id so two attempts never share a name), cut into 200-character
//! folders because a local-directory bucket cannot have longer file names. A listing
//! alone tells what each object is. Nothing secret is in a name: checksums are of ref
//! lists, and the key id is a label.
//!
//! The manifest is written last and only if absent, so it is the commit point: a
//! sequence without one (an upload cut short) is never consumed, and two producers
//! cannot both write sequence N.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

/// The longest repository path the naming can hold (its base64url must fit one file
/// name of a local-directory bucket).
pub const MAX_REPOSITORY_LEN: usize = 180;
/// The longest object key S3 accepts.
pub const MAX_KEY_LEN: usize = 1024;
const SEGMENT: usize = 200;
const SEQ_DIGITS: usize = 20;

/// What a sequence is, as its data object's name says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    #[serde(rename = "r")]
    pub repository: String,
    #[serde(rename = "s")]
    pub sequence: u64,
    /// Gitaly checksum of the refs before this sequence (the previous one's tip).
    #[serde(rename = "b")]
    pub base: String,
    /// Gitaly checksum of the refs this sequence carries.
    #[serde(rename = "t")]
    pub tip: String,
    #[serde(rename = "f")]
    pub format: BundleFormat,
    #[serde(rename = "x")]
    pub kind: Kind,
    #[serde(rename = "k")]
    pub key_id: String,
    #[serde(rename = "u")]
    pub upload: String,
}

/// The git bundle format: v2 (SHA-1 repositories) or v3 (`@object-format=sha256`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BundleFormat {
    V2,
    V3,
}

/// A full bundle needs nothing on the target; an incremental one needs the previous
/// sequence applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Full,
    Incremental,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::Full => "full",
            Kind::Incremental => "incremental",
        })
    }
}

/// Checks a repository's relative path before it is used in a name.
pub fn check_repository(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err("the path is empty".into());
    }
    if path.len() > MAX_REPOSITORY_LEN {
        return Err(format!(
            "the path is {} bytes; at most {MAX_REPOSITORY_LEN} fit the bucket's names",
            path.len()
        ));
    }
    if path.starts_with('/') || path.ends_with('/') {
        return Err("a relative path neither starts nor ends with /".into());
    }
    if path
        .split('/')
        .any(|s| s.is_empty() || s == "." || s == "..")
    {
        return Err("a path has no empty, . or .. segments".into());
    }
    if path.chars().any(|c| c.is_control() || c == '\\') {
        return Err("a path has no control characters or backslashes".into());
    }
    Ok(())
}

/// Names under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    prefix: String,
}

/// What a listed name is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Manifest { repository: String, sequence: u64 },
    Data(Header),
}

impl Layout {
    /// `prefix` is a folder path (`team-a/to-isolated`); empty for the bucket's root.
    pub fn new(prefix: &str) -> Result<Layout, String> {
        let trimmed = prefix.trim_matches('/');
        if trimmed.is_empty() {
            return Ok(Layout {
                prefix: String::new(),
            });
        }
        if trimmed
            .split('/')
            .any(|s| s.is_empty() || s == "." || s == "..")
        {
            return Err("a prefix has no empty, . or .. segments".into());
        }
        if trimmed.len() > 200 {
            return Err("a prefix is at most 200 bytes".into());
        }
        Ok(Layout {
            prefix: format!("{trimmed}/"),
        })
    }

    /// The prefix every name starts with (empty, or ending in `/`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The repository's folder, ending in `/`.
    pub fn repo_dir(&self, repository: &str) -> String {
        format!(
            "{}{}/",
            self.prefix,
            URL_SAFE_NO_PAD.encode(repository.as_bytes())
        )
    }

    pub fn manifest(&self, repository: &str, sequence: u64) -> String {
        format!(
            "{}{sequence:0width$}.manifest",
            self.repo_dir(repository),
            width = SEQ_DIGITS
        )
    }

    pub fn data(&self, header: &Header) -> String {
        let json = serde_json::to_vec(header).expect("a header serializes");
        let encoded = URL_SAFE_NO_PAD.encode(json);
        let segments: Vec<&str> = encoded
            .as_bytes()
            .chunks(SEGMENT)
            .map(|c| std::str::from_utf8(c).expect("base64 is ASCII"))
            .collect();
        format!(
            "{}{:0width$}/{}/bundle",
            self.repo_dir(&header.repository),
            header.sequence,
            segments.join("/"),
            width = SEQ_DIGITS
        )
    }

    /// The repository a folder (`<prefix><R>/`, as a delimited listing returns it)
    /// belongs to.
    pub fn parse_repo_dir(&self, dir: &str) -> Option<String> {
        let rest = dir.strip_prefix(&self.prefix)?.trim_end_matches('/');
        if rest.is_empty() || rest.contains('/') {
            return None;
        }
        decode_repository(rest)
    }

    /// What a listed name is; `None` for anything not ours.
    pub fn parse(&self, key: &str) -> Option<Entry> {
        let rest = key.strip_prefix(&self.prefix)?;
        let (dir, rest) = rest.split_once('/')?;
        let repository = decode_repository(dir)?;
        if let Some(seq) = rest.strip_suffix(".manifest") {
            let sequence = parse_seq(seq)?;
            return Some(Entry::Manifest {
                repository,
                sequence,
            });
        }
        let (seq, rest) = rest.split_once('/')?;
        let sequence = parse_seq(seq)?;
        let encoded: String = rest.strip_suffix("/bundle")?.split('/').collect();
        let json = URL_SAFE_NO_PAD.decode(encoded).ok()?;
        let header: Header = serde_json::from_slice(&json).ok()?;
        (header.repository == repository && header.sequence == sequence)
            .then_some(Entry::Data(header))
    }
}

fn decode_repository(encoded: &str) -> Option<String> {
    let raw = URL_SAFE_NO_PAD.decode(encoded).ok()?;
    let path = String::from_utf8(raw).ok()?;
    check_repository(&path).ok()?;
    Some(path)
}

fn parse_seq(s: &str) -> Option<u64> {
    (s.len() == SEQ_DIGITS && s.bytes().all(|b| b.is_ascii_digit()))
        .then(|| s.parse().ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(repo: &str, seq: u64) -> Header {
        Header {
            repository: repo.into(),
            sequence: seq,
            base: "0".repeat(40),
            tip: "f".repeat(40),
            format: BundleFormat::V2,
            kind: Kind::Incremental,
            key_id: "2026-01".into(),
            upload: "0123456789abcdef".into(),
        }
    }

    #[test]
    fn names_round_trip() {
        let l = Layout::new("/to-isolated/").unwrap();
        assert_eq!(l.prefix(), "to-isolated/");
        let h = header("group/project.git", 7);
        let data = l.data(&h);
        assert!(data.starts_with("to-isolated/Z3JvdXAvcHJvamVjdC5naXQ/00000000000000000007/"));
        assert!(data.ends_with("/bundle"));
        assert_eq!(l.parse(&data), Some(Entry::Data(h)));
        let m = l.manifest("group/project.git", 7);
        assert_eq!(
            m,
            "to-isolated/Z3JvdXAvcHJvamVjdC5naXQ/00000000000000000007.manifest"
        );
        assert_eq!(
            l.parse(&m),
            Some(Entry::Manifest {
                repository: "group/project.git".into(),
                sequence: 7
            })
        );
        assert_eq!(
            l.parse_repo_dir("to-isolated/Z3JvdXAvcHJvamVjdC5naXQ/"),
            Some("group/project.git".into())
        );
        assert_eq!(l.parse("other/x.manifest"), None);
        assert_eq!(
            l.parse("to-isolated/Z3JvdXAvcHJvamVjdC5naXQ/7.manifest"),
            None
        );
    }

    #[test]
    fn long_names_fit_local_directories_and_s3() {
        let l = Layout::new("a/b").unwrap();
        let repo = format!("@hashed/{}", "x".repeat(MAX_REPOSITORY_LEN - 8));
        check_repository(&repo).unwrap();
        let h = header(&repo, u64::MAX);
        let data = l.data(&h);
        assert!(data.len() <= MAX_KEY_LEN, "{}", data.len());
        assert!(data.split('/').all(|s| s.len() <= 255));
        assert_eq!(l.parse(&data), Some(Entry::Data(h)));
    }

    #[test]
    fn a_moved_data_object_does_not_parse() {
        let l = Layout::new("").unwrap();
        let data = l.data(&header("a.git", 3));
        let moved = data.replace("00000000000000000003", "00000000000000000004");
        assert_eq!(l.parse(&moved), None);
    }

    #[test]
    fn repository_paths_are_checked() {
        assert!(check_repository("group/p.git").is_ok());
        for bad in ["", "/abs.git", "a/../b", "a//b", "a/", "a\\b", "a\nb"] {
            assert!(check_repository(bad).is_err(), "{bad:?}");
        }
        assert!(check_repository(&"x".repeat(MAX_REPOSITORY_LEN + 1)).is_err());
        assert!(Layout::new("a/../b").is_err());
    }
}
