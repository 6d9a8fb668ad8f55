//! RefService: questions about refs, answered by git.

use std::sync::Arc;

use refvote_proto::gitaly::ref_service_server::RefService;
use refvote_proto::gitaly::{
    FindDefaultBranchNameRequest, FindDefaultBranchNameResponse, RefExistsRequest,
    RefExistsResponse,
};
use tonic::{Request, Response, Status};

use super::NodeState;
use super::error::NodeError;
use super::storage::RepoPath;

/// Bound on the small answers read whole here (a few ref names).
const SMALL_OUTPUT: usize = 64 * 1024;

pub struct RefSvc {
    node: Arc<NodeState>,
}

impl RefSvc {
    pub fn new(node: Arc<NodeState>) -> RefSvc {
        RefSvc { node }
    }
}

#[tonic::async_trait]
impl RefService for RefSvc {
    /// Gitaly's rule: with `head_only`, whatever HEAD names; otherwise HEAD's branch if
    /// it exists, else the only branch, else `main`, else `master`, else the first
    /// branch; empty when there is no branch at all.
    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn find_default_branch_name(
        &self,
        request: Request<FindDefaultBranchNameRequest>,
    ) -> Result<Response<FindDefaultBranchNameResponse>, Status> {
        let req = request.into_inner();
        let repo = self.node.storages.existing(req.repository.as_ref())?;
        let head = self.head_target(&repo).await?;
        let name = if req.head_only {
            head.unwrap_or_default()
        } else {
            self.default_branch(&repo, head).await?
        };
        Ok(Response::new(FindDefaultBranchNameResponse {
            name: name.into_bytes(),
        }))
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn ref_exists(
        &self,
        request: Request<RefExistsRequest>,
    ) -> Result<Response<RefExistsResponse>, Status> {
        let req = request.into_inner();
        let repo = self.node.storages.existing(req.repository.as_ref())?;
        let name = std::str::from_utf8(&req.r#ref)
            .ok()
            .filter(|r| r.starts_with("refs/") && !r.chars().any(|c| c.is_ascii_control()))
            .ok_or_else(|| {
                NodeError::invalid(
                    "invalid refname: ref must be fully qualified, e.g. refs/heads/main",
                )
            })?;
        let exit = self
            .node
            .git
            .command(["show-ref", "--verify", "--quiet"])
            .arg(name)
            .git_dir(&repo.path)
            .spawn()
            .map_err(NodeError::from)?
            .wait()
            .await
            .map_err(NodeError::from)?;
        let value = match exit.code() {
            Some(0) => true,
            Some(1) => false,
            _ => return Err(NodeError::from(exit.into_error()).into()),
        };
        Ok(Response::new(RefExistsResponse { value }))
    }
}

impl RefSvc {
    /// The ref HEAD points at, or `None` for a detached HEAD.
    async fn head_target(&self, repo: &RepoPath) -> Result<Option<String>, NodeError> {
        let (out, exit) = self
            .node
            .git
            .command(["symbolic-ref", "--quiet", "HEAD"])
            .git_dir(&repo.path)
            .spawn()?
            .output(SMALL_OUTPUT)
            .await?;
        match exit.code() {
            Some(0) => Ok(Some(String::from_utf8_lossy(&out).trim().to_owned())),
            Some(1) => Ok(None),
            _ => Err(exit.into_error().into()),
        }
    }

    async fn default_branch(
        &self,
        repo: &RepoPath,
        head: Option<String>,
    ) -> Result<String, NodeError> {
        // At most two branches tell "none", "the only one" and "the first one" apart.
        let first_two = self.branches(repo, &["--count=2", "refs/heads/"]).await?;
        if first_two.len() <= 1 {
            return Ok(first_two.into_iter().next().unwrap_or_default());
        }
        let mut wanted: Vec<&str> = Vec::new();
        if let Some(h) = head.as_deref().filter(|h| h.starts_with("refs/heads/")) {
            wanted.push(h);
        }
        wanted.extend(["refs/heads/main", "refs/heads/master"]);
        let present = self.branches(repo, &wanted).await?;
        Ok(wanted
            .iter()
            .find(|w| present.iter().any(|p| p == *w))
            .map(|w| (*w).to_owned())
            .unwrap_or_else(|| first_two[0].clone()))
    }

    /// Branch names from `git for-each-ref` with `args` (options, then patterns).
    async fn branches(&self, repo: &RepoPath, args: &[&str]) -> Result<Vec<String>, NodeError> {
        let mut cmd = self
            .node
            .git
            .command(["for-each-ref", "--format=%(refname)"])
            .git_dir(&repo.path);
        for a in args {
            cmd = cmd.arg(*a);
        }
        let (out, exit) = cmd.spawn()?.output(SMALL_OUTPUT).await?;
        exit.check()?;
        Ok(String::from_utf8_lossy(&out)
            .lines()
            .map(str::to_owned)
            .collect())
    }
}
