//! Where repositories live: a request's (storage name, relative path) becomes a
//! directory under that storage, or a clear error before anything touches the disk.
//!
//! Each storage keeps a private area, `+refvote/` (Gitaly keeps `+gitaly/`), for
//! repositories being created or removed; clients cannot name paths inside it.
//!
//! A request may name a push's quarantine (`git_object_directory`,
//! `git_alternate_object_directories`): Rails does while GitLab checks a push, to see
//! its new objects. It is accepted only inside the repository's own quarantine area
//! (receive-pack's `objects/tmp_objdir-incoming-<name>`, `objects/incoming-<name>`
//! with older git; alternates at `objects` or below) and only while that directory
//! exists on this replica; readers of objects run git with it
//! ([`RepoPath::object_env`]).

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use refvote_proto::gitaly::Repository;

use super::error::NodeError;

/// First path component reserved for the node itself.
pub const PRIVATE_DIR: &str = "+refvote";

/// The node's storages, by name, with their canonical directories.
#[derive(Debug, Clone)]
pub struct Storages {
    roots: BTreeMap<String, PathBuf>,
}

/// A validated repository location.
#[derive(Debug, Clone)]
pub struct RepoPath {
    pub storage: String,
    pub relative: String,
    /// The storage's canonical directory.
    pub root: PathBuf,
    /// `root` joined with `relative`; may not exist yet.
    pub path: PathBuf,
    /// The push quarantine the request names, if any.
    pub quarantine: Option<Quarantine>,
}

/// A push's quarantine on this replica, as git's environment names it.
#[derive(Debug, Clone)]
pub struct Quarantine {
    /// `GIT_OBJECT_DIRECTORY`: the quarantine directory.
    pub objects: PathBuf,
    /// `GIT_ALTERNATE_OBJECT_DIRECTORIES`: the repository's own object directories.
    pub alternates: String,
}

impl crate::git::ObjectEnv for RepoPath {
    fn git_dir(&self) -> &std::path::Path {
        &self.path
    }

    fn object_env(&self) -> Vec<(String, String)> {
        RepoPath::object_env(self)
    }
}

impl RepoPath {
    /// The environment git reads the request's objects with: the quarantine, if any.
    pub fn object_env(&self) -> Vec<(String, String)> {
        match &self.quarantine {
            Some(q) => vec![
                (
                    "GIT_OBJECT_DIRECTORY".into(),
                    q.objects.to_string_lossy().into_owned(),
                ),
                (
                    "GIT_ALTERNATE_OBJECT_DIRECTORIES".into(),
                    q.alternates.clone(),
                ),
            ],
            None => Vec::new(),
        }
    }
}

impl std::fmt::Display for RepoPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.storage, self.relative)
    }
}

impl Storages {
    /// Creates missing storage directories (by name and path, as in the `[[storage]]`
    /// config) and their private area, and clears what a crash left in it
    /// (half-created or half-removed repositories).
    pub fn open<'a>(
        storages: impl IntoIterator<Item = (&'a str, &'a Path)>,
    ) -> std::io::Result<Storages> {
        let mut roots = BTreeMap::new();
        for (name, path) in storages {
            std::fs::create_dir_all(path)?;
            let root = path.canonicalize()?;
            let tmp = root.join(PRIVATE_DIR).join("tmp");
            if tmp.exists() {
                std::fs::remove_dir_all(&tmp)?;
            }
            std::fs::create_dir_all(&tmp)?;
            roots.insert(name.to_owned(), root);
        }
        Ok(Storages { roots })
    }

    pub fn names(&self) -> impl Iterator<Item = (&str, &Path)> {
        self.roots.iter().map(|(n, p)| (n.as_str(), p.as_path()))
    }

    /// The canonical directory of storage `name`.
    pub fn root(&self, name: &str) -> Result<&Path, NodeError> {
        if name.is_empty() {
            return Err(NodeError::invalid("storage name is empty"));
        }
        self.roots
            .get(name)
            .map(PathBuf::as_path)
            .ok_or_else(|| NodeError::StorageNotFound(name.to_owned()))
    }

    /// Where temporary directories of storage `root` go (same file system, so a rename
    /// into place is atomic).
    pub fn tmp_dir(root: &Path) -> PathBuf {
        root.join(PRIVATE_DIR).join("tmp")
    }

    /// Validates a request's repository and joins it to its storage. Refuses a missing
    /// repository message, an unknown storage, a path that is absolute, has `..`, `.`
    /// or empty components, names the private area, or resolves through a symlink to
    /// somewhere outside the storage.
    pub fn resolve(&self, repo: Option<&Repository>) -> Result<RepoPath, NodeError> {
        let repo = repo.ok_or_else(|| NodeError::invalid("repository not set"))?;
        let root = self.root(&repo.storage_name)?;
        let relative = repo.relative_path.as_str();
        refvote_cluster::repo::validate_relative_path(relative).map_err(|e| {
            NodeError::invalid(format!(
                "relative path escapes root directory or is malformed: {e}"
            ))
        })?;
        if Path::new(relative).components().next() == Some(Component::Normal(PRIVATE_DIR.as_ref()))
        {
            return Err(NodeError::invalid(format!(
                "relative path {relative:?} is inside the node's private {PRIVATE_DIR}/ area"
            )));
        }
        let path = root.join(relative.trim_end_matches('/'));
        check_symlinks(root, &path, relative)?;
        let quarantine = quarantine(repo, &path)?;
        Ok(RepoPath {
            storage: repo.storage_name.clone(),
            relative: relative.to_owned(),
            root: root.to_owned(),
            path,
            quarantine,
        })
    }

    /// Like [`Storages::resolve`], and the repository must exist.
    pub fn existing(&self, repo: Option<&Repository>) -> Result<RepoPath, NodeError> {
        let r = self.resolve(repo)?;
        if !is_repository(&r.path) {
            return Err(NodeError::RepositoryNotFound(r.to_string()));
        }
        Ok(r)
    }
}

/// The quarantine `repo` names for the repository at `path`, checked: inside the
/// repository's quarantine area (else INVALID_ARGUMENT) and present on this replica
/// (else NOT_FOUND: another replica holds it, and the router tries the next).
fn quarantine(repo: &Repository, path: &Path) -> Result<Option<Quarantine>, NodeError> {
    if repo.git_object_directory.is_empty() && repo.git_alternate_object_directories.is_empty() {
        return Ok(None);
    }
    let dirs = refvote_gitlab::ObjectDirectories {
        object_directory: repo.git_object_directory.clone(),
        alternate_object_directories: repo.git_alternate_object_directories.clone(),
    };
    dirs.check_inside_repository().map_err(|e| {
        NodeError::invalid(format!(
            "{e}: git_object_directory must be objects/incoming-<name> and every alternate objects or below it"
        ))
    })?;
    let (objects, alternates) = dirs.absolute(path);
    if !objects.is_dir() {
        return Err(NodeError::NotFound(format!(
            "quarantine directory {} not found on this replica",
            dirs.object_directory
        )));
    }
    let alternates = if dirs.alternate_object_directories.is_empty() {
        path.join("objects").to_string_lossy().into_owned()
    } else {
        alternates
    };
    Ok(Some(Quarantine {
        objects,
        alternates,
    }))
}

/// The longest existing prefix of `path` must canonicalize to somewhere inside `root`:
/// a symlink inside the storage may point within it, never out of it.
fn check_symlinks(root: &Path, path: &Path, relative: &str) -> Result<(), NodeError> {
    let mut existing = path;
    while std::fs::symlink_metadata(existing).is_err() {
        match existing.parent() {
            Some(p) if p.starts_with(root) => existing = p,
            _ => return Ok(()),
        }
    }
    let escapes = match existing.canonicalize() {
        Ok(real) => !real.starts_with(root),
        // A dangling symlink: where it would lead is unknown, so refuse it.
        Err(_) => true,
    };
    if escapes {
        return Err(NodeError::invalid(format!(
            "relative path escapes root directory: {relative:?} leads outside the storage through a symlink"
        )));
    }
    Ok(())
}

/// What git itself checks for a git directory: HEAD, objects/ and refs/.
pub fn is_repository(path: &Path) -> bool {
    path.join("HEAD").is_file() && path.join("objects").is_dir() && path.join("refs").is_dir()
}

/// A directory (under [`Storages::tmp_dir`]) removed when dropped, unless forgotten.
pub(crate) struct TempDir(pub(crate) PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn storages(dir: &Path) -> Storages {
        Storages::open([("default", dir.join("storage").as_path())]).unwrap()
    }

    fn repo(storage: &str, path: &str) -> Repository {
        Repository {
            storage_name: storage.into(),
            relative_path: path.into(),
            ..Default::default()
        }
    }

    fn code(r: Result<RepoPath, NodeError>) -> Code {
        tonic::Status::from(r.unwrap_err()).code()
    }

    #[test]
    fn a_quarantine_is_accepted_only_inside_the_repository_and_while_it_exists() {
        let dir = tempfile::tempdir().unwrap();
        let s = storages(dir.path());
        let root = s.root("default").unwrap().to_owned();
        std::fs::create_dir_all(root.join("p.git/objects/incoming-Ab1")).unwrap();
        let with = |objects: &str, alternates: &[&str]| Repository {
            git_object_directory: objects.into(),
            git_alternate_object_directories: alternates.iter().map(|a| a.to_string()).collect(),
            ..repo("default", "p.git")
        };
        let r = s
            .resolve(Some(&with("objects/incoming-Ab1", &["objects"])))
            .unwrap();
        let env = r.object_env();
        assert_eq!(env[0].0, "GIT_OBJECT_DIRECTORY");
        assert!(env[0].1.ends_with("p.git/objects/incoming-Ab1"), "{env:?}");
        assert!(env[1].1.ends_with("p.git/objects"), "{env:?}");
        assert!(
            s.resolve(Some(&repo("default", "p.git")))
                .unwrap()
                .object_env()
                .is_empty()
        );
        assert_eq!(
            code(s.resolve(Some(&with("objects/incoming-Other", &["objects"])))),
            Code::NotFound,
            "another replica's quarantine"
        );
        for (o, a) in [
            ("../q.git/objects/incoming-Ab1", &["objects"][..]),
            ("objects", &["objects"]),
            ("objects/incoming-Ab1", &["/srv/objects"]),
            ("", &["objects"]),
        ] {
            assert_eq!(
                code(s.resolve(Some(&with(o, a)))),
                Code::InvalidArgument,
                "{o} {a:?}"
            );
        }
    }

    #[test]
    fn resolves_inside_the_storage_and_refuses_escapes() {
        let dir = tempfile::tempdir().unwrap();
        let s = storages(dir.path());
        let ok = s.resolve(Some(&repo("default", "group/p.git"))).unwrap();
        assert!(ok.path.ends_with("storage/group/p.git"), "{:?}", ok.path);
        assert_eq!(code(s.resolve(None)), Code::InvalidArgument);
        assert_eq!(
            code(s.resolve(Some(&repo("nope", "p.git")))),
            Code::NotFound
        );
        assert_eq!(
            code(s.resolve(Some(&repo("", "p.git")))),
            Code::InvalidArgument
        );
        for bad in [
            "../x.git",
            "a/../../x",
            "/etc",
            "",
            "+refvote/tmp/x",
            "a//b",
        ] {
            assert_eq!(
                code(s.resolve(Some(&repo("default", bad)))),
                Code::InvalidArgument,
                "{bad}"
            );
        }
        // A symlink out of the storage is refused; one within it is fine.
        let root = s.root("default").unwrap().to_owned();
        std::os::unix::fs::symlink(dir.path(), root.join("out")).unwrap();
        std::fs::create_dir(root.join("real")).unwrap();
        std::os::unix::fs::symlink(root.join("real"), root.join("in")).unwrap();
        assert_eq!(
            code(s.resolve(Some(&repo("default", "out/p.git")))),
            Code::InvalidArgument
        );
        s.resolve(Some(&repo("default", "in/p.git"))).unwrap();
        assert_eq!(
            code(s.existing(Some(&repo("default", "in/p.git")))),
            Code::NotFound
        );
    }
}
