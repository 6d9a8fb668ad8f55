//! A consumer target that is any git remote (another GitLab, a bare repository on a
//! file server): each sequence is fetched from its bundle into a local mirror of the
//! target repository, then pushed on in one atomic, forced push that also deletes the
//! remote's refs the sequence no longer has. The record of what was applied is the
//! state file; the fingerprint is the SHA-256 of the pushed refs as `git ls-remote`
//! shows them.
//!
//! A remote's HEAD cannot be set by a push: only a target that is a local directory
//! gets HEAD set (and missing repositories created).

use std::path::{Path, PathBuf};

use crate::catalog;
use crate::consume::Target;
use crate::context::now;
use crate::error::SyncError;
use crate::fault;
use crate::git::{Git, GitError};
use crate::manifest::Manifest;
use crate::mirror::{self, Mirror};
use crate::naming::Kind;
use crate::plan::Applied;
use crate::refs::{RefPatterns, RefSet};
use crate::state::FileState;

pub struct GitTarget {
    base: String,
    local: Option<PathBuf>,
    /// `None` for a remote whose record is kept elsewhere (a refvote cluster's etcd).
    state: Option<FileState>,
    mirrors: PathBuf,
    git: Git,
    patterns: RefPatterns,
}

impl GitTarget {
    /// Pushes to `base` + relative path; keeps mirrors under `mirrors` and the record
    /// in `state`.
    pub fn new(
        base: &str,
        state: &Path,
        mirrors: &Path,
        git: Git,
        patterns: RefPatterns,
    ) -> GitTarget {
        GitTarget {
            state: Some(FileState::new(state)),
            ..GitTarget::remote(base, mirrors, git, patterns)
        }
    }

    /// Pushes to `base` + relative path, with no state file: for a caller that keeps
    /// the record itself (a refvote target: in its etcd) and asks this one only for
    /// `current`, `fingerprint` and `apply`.
    pub fn remote(base: &str, mirrors: &Path, git: Git, patterns: RefPatterns) -> GitTarget {
        GitTarget {
            base: base.to_owned(),
            local: catalog::local_dir(base),
            state: None,
            mirrors: mirrors.to_owned(),
            git,
            patterns,
        }
    }

    /// Fetches an applied `bundle` into the local mirror of `repository` as well, so the
    /// next incremental apply fetches only what is new from the target (after the
    /// target got the sequence some other way, e.g. `CreateRepositoryFromBundle`).
    pub async fn keep_locally(
        &self,
        repository: &str,
        manifest: &Manifest,
        bundle: &Path,
    ) -> Result<(), SyncError> {
        let local = Mirror::open_or_init(
            &self.git,
            &self.mirror_path(repository),
            &manifest.object_format,
        )
        .await?;
        local.fetch_bundle(bundle, &self.patterns).await?;
        Ok(())
    }

    fn state(&self) -> Result<&FileState, SyncError> {
        self.state
            .as_ref()
            .ok_or_else(|| SyncError::Target(format!("{} keeps no state file", self.describe())))
    }

    fn url(&self, repository: &str) -> String {
        catalog::join_url(&self.base, repository)
    }

    fn local_path(&self, repository: &str) -> Option<PathBuf> {
        self.local.as_ref().map(|d| d.join(repository))
    }

    fn mirror_path(&self, repository: &str) -> PathBuf {
        use base64::Engine;
        let name = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(repository.as_bytes());
        self.mirrors.join(format!("{name}.git"))
    }

    fn unavailable(&self, repository: &str, e: GitError) -> SyncError {
        SyncError::TargetUnavailable(format!("{}: {e}", self.url(repository)))
    }
}

impl Target for GitTarget {
    fn describe(&self) -> String {
        format!("git remote {}", self.base)
    }

    async fn applied(&self, repository: &str) -> Result<Option<Applied>, SyncError> {
        self.state()?.applied(repository)
    }

    async fn current(&self, repository: &str) -> Result<Option<String>, SyncError> {
        if let Some(path) = self.local_path(repository)
            && !path.join("objects").is_dir()
        {
            return Ok(None);
        }
        let out = self
            .git
            .output(None, ["ls-remote", &self.url(repository)], None)
            .await
            .map_err(|e| self.unavailable(repository, e))?;
        let refs = mirror::parse_ls_remote(&out).map_err(SyncError::Target)?;
        Ok(Some(self.fingerprint(&refs)))
    }

    fn fingerprint(&self, refs: &RefSet) -> String {
        refs.filtered(&self.patterns).fingerprint()
    }

    async fn apply(
        &self,
        repository: &str,
        manifest: &Manifest,
        bundle: &Path,
    ) -> Result<(), SyncError> {
        let url = self.url(repository);
        if let Some(path) = self.local_path(repository)
            && !path.join("objects").is_dir()
        {
            Mirror::open_or_init(&self.git, &path, &manifest.object_format).await?;
        }
        let local = Mirror::open_or_init(
            &self.git,
            &self.mirror_path(repository),
            &manifest.object_format,
        )
        .await?;
        if manifest.kind() == Kind::Incremental {
            // The bundle's prerequisites are what the target holds: make sure the
            // mirror has them (a no-op when it kept them from the last run).
            local
                .fetch_from(&url, &self.patterns, false)
                .await
                .map_err(|e| self.unavailable(repository, e))?;
        }
        let refs = manifest.refs.filtered(&self.patterns);
        if refs.refs.is_empty() {
            local.clear_refs(&self.patterns).await?;
        } else {
            local
                .verify_bundle(bundle)
                .await
                .map_err(|e| SyncError::Diverged {
                    sequence: manifest.header.sequence,
                    reason: format!("the bundle does not verify against the target's objects: {e}"),
                })?;
            local.fetch_bundle(bundle, &self.patterns).await?;
        }
        fault::point(fault::BEFORE_APPLY);
        local.push_to(&url, &self.patterns).await?;
        Ok(())
    }

    async fn follow_head(&self, repository: &str, manifest: &Manifest) -> Result<(), SyncError> {
        let refs = manifest.refs.filtered(&self.patterns);
        if let (Some(path), Some(head)) = (self.local_path(repository), &refs.head)
            && refs.refs.contains_key(head)
        {
            Mirror::open_or_init(&self.git, &path, &manifest.object_format)
                .await?
                .set_head(head)
                .await?;
        }
        Ok(())
    }

    async fn record(&self, repository: &str, applied: &Applied) -> Result<(), SyncError> {
        self.state()?.record(repository, applied, now())
    }
}
