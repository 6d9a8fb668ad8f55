//! Repository identity: a virtual storage plus a relative path, validated before it is
//! used in a key or joined to a directory.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A repository as clients name it: `<virtual storage>/<relative path>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RepoId {
    pub virtual_storage: String,
    pub relative_path: String,
}

/// Why a repository name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidRepo {
    #[error("storage name is empty")]
    EmptyStorage,
    #[error("storage name {0:?} may only contain letters, digits, '-', '_' and '.'")]
    BadStorage(String),
    #[error("relative path is empty")]
    EmptyPath,
    #[error("relative path {0:?} is absolute; it must be relative to the storage")]
    Absolute(String),
    #[error("relative path {0:?} leaves the storage (it has a '..', '.' or empty component)")]
    Traversal(String),
    #[error("relative path {0:?} contains a control character")]
    ControlChar(String),
    #[error("relative path is {0} bytes long; the limit is 4096")]
    TooLong(usize),
}

impl RepoId {
    /// Validates both parts: the storage is a plain name; the path is relative, has no
    /// `.`/`..`/empty components and no control characters.
    pub fn new(virtual_storage: &str, relative_path: &str) -> Result<RepoId, InvalidRepo> {
        validate_storage_name(virtual_storage)?;
        validate_relative_path(relative_path)?;
        Ok(RepoId {
            virtual_storage: virtual_storage.to_owned(),
            relative_path: relative_path.to_owned(),
        })
    }

    /// Parses `<virtual storage>/<relative path>`.
    pub fn parse(s: &str) -> Result<RepoId, InvalidRepo> {
        let (storage, path) = s.split_once('/').ok_or(InvalidRepo::EmptyPath)?;
        RepoId::new(storage, path)
    }

    /// The form used inside etcd keys: the relative path's `%` and `/` percent-encoded.
    pub fn key_segment(&self) -> String {
        let path = self.relative_path.replace('%', "%25").replace('/', "%2F");
        format!("{}/{}", self.virtual_storage, path)
    }

    /// Inverse of [`RepoId::key_segment`].
    pub fn from_key_segment(s: &str) -> Result<RepoId, InvalidRepo> {
        let (storage, path) = s.split_once('/').ok_or(InvalidRepo::EmptyPath)?;
        RepoId::new(storage, &path.replace("%2F", "/").replace("%25", "%"))
    }
}

impl fmt::Display for RepoId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.virtual_storage, self.relative_path)
    }
}

pub fn validate_storage_name(name: &str) -> Result<(), InvalidRepo> {
    if name.is_empty() {
        return Err(InvalidRepo::EmptyStorage);
    }
    let ok = name.len() <= 255
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(InvalidRepo::BadStorage(name.to_owned()))
    }
}

pub fn validate_relative_path(path: &str) -> Result<(), InvalidRepo> {
    if path.is_empty() {
        return Err(InvalidRepo::EmptyPath);
    }
    if path.len() > 4096 {
        return Err(InvalidRepo::TooLong(path.len()));
    }
    if path.starts_with('/') {
        return Err(InvalidRepo::Absolute(path.to_owned()));
    }
    if path.chars().any(|c| c.is_control()) {
        return Err(InvalidRepo::ControlChar(path.to_owned()));
    }
    let trimmed = path.strip_suffix('/').unwrap_or(path);
    if trimmed
        .split('/')
        .any(|part| part.is_empty() || part == "." || part == "..")
    {
        return Err(InvalidRepo::Traversal(path.to_owned()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_gitlab_paths() {
        RepoId::new("default", "@hashed/ab/cd/abcd.git").unwrap();
        RepoId::new("default", "group/sub/project.wiki.git").unwrap();
    }

    #[test]
    fn refuses_escapes() {
        assert!(matches!(
            RepoId::new("default", "../x.git"),
            Err(InvalidRepo::Traversal(_))
        ));
        assert!(matches!(
            RepoId::new("default", "a/../../x"),
            Err(InvalidRepo::Traversal(_))
        ));
        assert!(matches!(
            RepoId::new("default", "a//b"),
            Err(InvalidRepo::Traversal(_))
        ));
        assert!(matches!(
            RepoId::new("default", "/etc/passwd"),
            Err(InvalidRepo::Absolute(_))
        ));
        assert!(matches!(
            RepoId::new("default", "a\nb"),
            Err(InvalidRepo::ControlChar(_))
        ));
        assert!(matches!(
            RepoId::new("", "a.git"),
            Err(InvalidRepo::EmptyStorage)
        ));
        assert!(matches!(
            RepoId::new("../x", "a.git"),
            Err(InvalidRepo::BadStorage(_))
        ));
    }

    #[test]
    fn key_segment_round_trips() {
        let r = RepoId::new("default", "g/100%/p.git").unwrap();
        assert_eq!(r.key_segment(), "default/g%2F100%25%2Fp.git");
        assert_eq!(RepoId::from_key_segment(&r.key_segment()).unwrap(), r);
    }
}
