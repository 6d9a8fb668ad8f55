//! gitattributes of paths at a revision, from one long-lived `git check-attr --stdin
//! -z --source=<revision>` per call ([`CheckAttr`]), and RepositoryService's
//! GetFileAttributes on top of it: every (path, attribute, value) git reports that is
//! not "unspecified", in request order, as Gitaly answers.

use std::sync::Arc;

use refvote_proto::gitaly::{
    GetFileAttributesRequest, GetFileAttributesResponse, get_file_attributes_response,
};
use tokio::sync::mpsc;
use tonic::{Response, Status};

use crate::error::NodeError;
use crate::git::{Git, Run};
use crate::refs::names;
use crate::state::NodeState;
use crate::storage::RepoPath;

pub const UNSPECIFIED: &str = "unspecified";

/// One `git check-attr` answering path after path.
pub struct CheckAttr {
    paths: mpsc::Sender<Result<Vec<u8>, Status>>,
    /// Taken once git has stopped answering.
    run: Option<Run>,
    buf: Vec<u8>,
    names: usize,
}

/// (attribute, state) pairs git reports for one path, unspecified ones left out.
pub type Attributes = Vec<(String, String)>;

impl CheckAttr {
    /// Starts git for `names` at `revision` (attributes read from that tree).
    pub fn start(
        git: &Git,
        repo: &RepoPath,
        revision: &str,
        names: &[String],
    ) -> Result<CheckAttr, NodeError> {
        if names.is_empty() {
            return Err(NodeError::invalid("empty list of attribute names"));
        }
        for n in names {
            if n.is_empty() || n.starts_with('-') || n.contains(['\0', ' ', '\t', '\n']) {
                return Err(NodeError::invalid(format!("invalid attribute name {n:?}")));
            }
        }
        let (paths, rx) = mpsc::channel(16);
        let mut cmd = git
            .command(["check-attr", "--stdin", "-z"])
            .arg(format!("--source={revision}"))
            .repo(repo);
        for n in names {
            cmd = cmd.arg(n);
        }
        let run = cmd
            .stdin(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
            .spawn()?;
        Ok(CheckAttr {
            paths,
            run: Some(run),
            buf: Vec::new(),
            names: names.len(),
        })
    }

    /// The attributes of `path`.
    pub async fn check(&mut self, path: &[u8]) -> Result<Attributes, NodeError> {
        if path.contains(&0) {
            return Err(NodeError::invalid("path with NUL byte not allowed"));
        }
        let mut line = path.to_vec();
        line.push(0);
        if self.paths.send(Ok(line)).await.is_err() {
            return Err(self.broken().await);
        }
        let mut attrs = Vec::new();
        for _ in 0..self.names {
            let got_path = self.field().await?;
            let name = self.field().await?;
            let state = self.field().await?;
            if got_path != path {
                return Err(NodeError::io(
                    "reading git check-attr",
                    std::io::Error::other(format!(
                        "wrong path name detected, expected {:?}, got {:?}",
                        String::from_utf8_lossy(path),
                        String::from_utf8_lossy(&got_path)
                    )),
                ));
            }
            let state = String::from_utf8_lossy(&state).into_owned();
            if state != UNSPECIFIED {
                attrs.push((String::from_utf8_lossy(&name).into_owned(), state));
            }
        }
        Ok(attrs)
    }

    async fn field(&mut self) -> Result<Vec<u8>, NodeError> {
        loop {
            if let Some(i) = self.buf.iter().position(|b| *b == 0) {
                let mut f: Vec<u8> = self.buf.drain(..=i).collect();
                f.pop();
                return Ok(f);
            }
            let Some(run) = self.run.as_mut() else {
                return Err(self.broken().await);
            };
            match run.chunk().await {
                Some(chunk) => self.buf.extend(chunk?),
                None => return Err(self.broken().await),
            }
        }
    }

    /// git stopped answering: its own reason (e.g. an unknown revision) if it has one.
    async fn broken(&mut self) -> NodeError {
        let stopped = || {
            NodeError::io(
                "reading git check-attr",
                std::io::Error::other("git check-attr stopped answering"),
            )
        };
        let Some(run) = self.run.take() else {
            return stopped();
        };
        match run.wait().await {
            Ok(exit) if !exit.success() => NodeError::from(exit.into_error()),
            Ok(_) => stopped(),
            Err(e) => e.into(),
        }
    }
}

/// State of `name` in `attrs`, if git reported one.
pub fn state<'a>(attrs: &'a Attributes, name: &str) -> Option<&'a str> {
    attrs
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, s)| s.as_str())
}

pub(crate) async fn get_file_attributes(
    node: &Arc<NodeState>,
    req: GetFileAttributesRequest,
) -> Result<Response<GetFileAttributesResponse>, Status> {
    let repo = node.storages.existing(req.repository.as_ref())?;
    if req.revision.is_empty() {
        return Err(NodeError::invalid("revision is required").into());
    }
    if req.paths.is_empty() {
        return Err(NodeError::invalid("file paths are required").into());
    }
    if req.attributes.is_empty() {
        return Err(NodeError::invalid("attributes are required").into());
    }
    let revision = names::revision("revision", &req.revision).map(str::to_owned)?;
    let mut check = CheckAttr::start(&node.git, &repo, &revision, &req.attributes)?;
    let mut attribute_infos = Vec::new();
    for path in &req.paths {
        for (attribute, value) in check.check(path.as_bytes()).await? {
            attribute_infos.push(get_file_attributes_response::AttributeInfo {
                path: path.clone(),
                attribute,
                value,
            });
        }
    }
    Ok(Response::new(GetFileAttributesResponse { attribute_infos }))
}
