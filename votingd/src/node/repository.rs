//! RepositoryService: existence, creation and removal of whole repositories.
//!
//! Creation and removal never leave a half-done repository where clients look: a new
//! repository is built in the storage's private area and renamed into place; a removed
//! one is renamed away first and deleted afterwards.

use std::path::PathBuf;
use std::sync::Arc;

use refvote_proto::gitaly::repository_service_server::RepositoryService;
use refvote_proto::gitaly::{
    CreateRepositoryRequest, CreateRepositoryResponse, ObjectFormat, RemoveRepositoryRequest,
    RemoveRepositoryResponse, RepositoryExistsRequest, RepositoryExistsResponse,
};
use tonic::{Request, Response, Status};

use super::NodeState;
use super::error::NodeError;
use super::storage::{RepoPath, Storages, is_repository};
use super::tx::WriteContext;

pub struct RepositorySvc {
    node: Arc<NodeState>,
}

impl RepositorySvc {
    pub fn new(node: Arc<NodeState>) -> RepositorySvc {
        RepositorySvc { node }
    }
}

#[tonic::async_trait]
impl RepositoryService for RepositorySvc {
    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn repository_exists(
        &self,
        request: Request<RepositoryExistsRequest>,
    ) -> Result<Response<RepositoryExistsResponse>, Status> {
        let repo = self
            .node
            .storages
            .resolve(request.get_ref().repository.as_ref())?;
        Ok(Response::new(RepositoryExistsResponse {
            exists: is_repository(&repo.path),
        }))
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name, repo))]
    async fn create_repository(
        &self,
        request: Request<CreateRepositoryRequest>,
    ) -> Result<Response<CreateRepositoryResponse>, Status> {
        let repo = self
            .node
            .storages
            .resolve(request.get_ref().repository.as_ref())?;
        tracing::Span::current().record("repo", tracing::field::display(&repo));
        let req = request.get_ref();
        let branch = default_branch(&req.default_branch)?;
        let object_format = match ObjectFormat::try_from(req.object_format) {
            Ok(ObjectFormat::Unspecified | ObjectFormat::Sha1) => "sha1",
            Ok(ObjectFormat::Sha256) => "sha256",
            Err(_) => {
                return Err(NodeError::invalid(format!(
                    "unknown object_format {}",
                    req.object_format
                ))
                .into());
            }
        };
        if repo.path.exists() {
            return Err(NodeError::RepositoryExists(repo.to_string()).into());
        }
        let ctx = WriteContext::from_metadata(&self.node.tx, request.metadata()).await?;
        let result = self.create(&repo, &branch, object_format).await;
        ctx.finish(result.is_ok(), &error_detail(&result)).await;
        result?;
        tracing::info!("repository created");
        Ok(Response::new(CreateRepositoryResponse {}))
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name, repo))]
    async fn remove_repository(
        &self,
        request: Request<RemoveRepositoryRequest>,
    ) -> Result<Response<RemoveRepositoryResponse>, Status> {
        let repo = self
            .node
            .storages
            .existing(request.get_ref().repository.as_ref())?;
        tracing::Span::current().record("repo", tracing::field::display(&repo));
        let ctx = WriteContext::from_metadata(&self.node.tx, request.metadata()).await?;
        let result = remove(&repo).await;
        ctx.finish(result.is_ok(), &error_detail(&result)).await;
        result?;
        tracing::info!("repository removed");
        Ok(Response::new(RemoveRepositoryResponse {}))
    }
}

impl RepositorySvc {
    /// `git init --bare` in a private directory, the hook wired in through
    /// `core.hooksPath`, then one rename into place.
    async fn create(&self, repo: &RepoPath, branch: &str, format: &str) -> Result<(), NodeError> {
        let git = &self.node.git;
        let tmp =
            TempDir(Storages::tmp_dir(&repo.root).join(format!("create-{}", uuid::Uuid::new_v4())));
        // Plain runs: the repository is not visible yet and has no hook to vote with.
        git.command(["init", "--bare", "--quiet"])
            .arg(format!("--initial-branch={branch}"))
            .arg(format!("--object-format={format}"))
            .arg(&tmp.0)
            .spawn()?
            .wait()
            .await?
            .check()?;
        let hooks = git.hooks_dir().to_owned();
        for (key, value) in [
            ("core.hooksPath", hooks.as_os_str()),
            // Also for git runs that do not come through votingd (an operator's).
            ("receive.autogc", "false".as_ref()),
            ("gc.auto", "0".as_ref()),
        ] {
            git.command(["config", key])
                .arg(value)
                .git_dir(&tmp.0)
                .spawn()?
                .wait()
                .await?
                .check()?;
        }
        let parent = repo.path.parent().unwrap_or(&repo.root);
        std::fs::create_dir_all(parent)
            .map_err(|e| NodeError::io(format!("creating {}", parent.display()), e))?;
        // rename(2) replaces an empty directory but never a non-empty one, so of two
        // concurrent creations exactly one wins.
        if is_repository(&repo.path) {
            return Err(NodeError::RepositoryExists(repo.to_string()));
        }
        match std::fs::rename(&tmp.0, &repo.path) {
            Ok(()) => {
                std::mem::forget(tmp);
                Ok(())
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::DirectoryNotEmpty | std::io::ErrorKind::AlreadyExists
                ) =>
            {
                Err(NodeError::RepositoryExists(repo.to_string()))
            }
            Err(e) => Err(NodeError::io(
                format!("moving the new repository to {}", repo.path.display()),
                e,
            )),
        }
    }
}

/// Renames the repository into the private area (clients stop seeing it at once), then
/// deletes it.
async fn remove(repo: &RepoPath) -> Result<(), NodeError> {
    let aside = Storages::tmp_dir(&repo.root).join(format!("remove-{}", uuid::Uuid::new_v4()));
    std::fs::rename(&repo.path, &aside)
        .map_err(|e| NodeError::io(format!("moving {} aside", repo.path.display()), e))?;
    let gone = aside.clone();
    tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&gone))
        .await
        .map_err(|e| NodeError::io("deleting the removed repository", std::io::Error::other(e)))?
        .map_err(|e| NodeError::io(format!("deleting {}", aside.display()), e))
}

/// A directory removed when dropped, unless forgotten.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The branch HEAD of a new repository points at: the request's, or `main`.
fn default_branch(requested: &[u8]) -> Result<String, NodeError> {
    if requested.is_empty() {
        return Ok("main".into());
    }
    let name = std::str::from_utf8(requested)
        .map_err(|_| NodeError::invalid("default_branch is not UTF-8"))?;
    let name = name.strip_prefix("refs/heads/").unwrap_or(name);
    if !valid_branch_name(name) {
        return Err(NodeError::invalid(format!(
            "default_branch {name:?} is not a valid branch name"
        )));
    }
    Ok(name.to_owned())
}

/// git's ref-name rules (check-ref-format), for a branch below refs/heads/.
pub(super) fn valid_branch_name(name: &str) -> bool {
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

fn error_detail<T>(result: &Result<T, NodeError>) -> String {
    match result {
        Ok(_) => String::new(),
        Err(e) => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn branch_names() {
        assert_eq!(default_branch(b"").unwrap(), "main");
        assert_eq!(default_branch(b"refs/heads/dev").unwrap(), "dev");
        assert_eq!(default_branch(b"feature/x").unwrap(), "feature/x");
        for bad in [
            "-x", "a..b", "a b", "x.lock", "a//b", ".hidden", "a/", "@", "a~1",
        ] {
            assert!(default_branch(bad.as_bytes()).is_err(), "{bad}");
        }
    }
}
