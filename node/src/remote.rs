//! RemoteService: FindRemoteRepository, whether a URL answers as a git repository
//! (Rails asks before an import or a mirror). Storage-scoped: the router sends it to
//! any live node. Like Gitaly it runs `git ls-remote <url> HEAD` and answers
//! `exists: true` only for one `<object id>\tHEAD` line; any failure of git is
//! `exists: false`. The other RemoteService methods are not served yet.

use std::sync::Arc;

use refvote_proto::gitaly::remote_service_server::RemoteService;
use refvote_proto::gitaly::{FindRemoteRepositoryRequest, FindRemoteRepositoryResponse};
use tonic::{Request, Response, Status};

use super::error::NodeError;
use crate::state::NodeState;

/// More than any `ls-remote HEAD` answer needs.
const OUTPUT_LIMIT: usize = 64 * 1024;

pub struct RemoteSvc {
    node: Arc<NodeState>,
}

impl RemoteSvc {
    pub fn new(node: Arc<NodeState>) -> RemoteSvc {
        RemoteSvc { node }
    }
}

/// Whether `git ls-remote <url> HEAD` printed a HEAD with an object id of SHA-1 or
/// SHA-256 length (ls-remote cannot say the remote's object format).
fn names_head(output: &[u8]) -> bool {
    let Some(tab) = output.iter().position(|b| *b == b'\t') else {
        return false;
    };
    let (oid, rest) = (&output[..tab], &output[tab + 1..]);
    rest == b"HEAD\n" && matches!(oid.len(), 40 | 64) && oid.iter().all(u8::is_ascii_hexdigit)
}

#[tonic::async_trait]
impl RemoteService for RemoteSvc {
    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn find_remote_repository(
        &self,
        request: Request<FindRemoteRepositoryRequest>,
    ) -> Result<Response<FindRemoteRepositoryResponse>, Status> {
        let remote = &request.get_ref().remote;
        if remote.is_empty() {
            return Err(NodeError::invalid("empty remote can't be checked.").into());
        }
        // An option in place of the URL (`--upload-pack=…`) would run a command.
        if remote.starts_with('-') {
            return Err(NodeError::invalid(format!(
                "remote {remote:?} starts with '-': give a URL"
            ))
            .into());
        }
        let run = self
            .node
            .git
            .command(["ls-remote", "--", remote.as_str(), "HEAD"])
            .spawn()
            .map_err(NodeError::from)?;
        let exists = match run.output(OUTPUT_LIMIT).await {
            Ok((out, exit)) => exit.success() && names_head(&out),
            Err(e) => {
                tracing::debug!(error = %e, "ls-remote failed");
                false
            }
        };
        Ok(Response::new(FindRemoteRepositoryResponse { exists }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_one_head_line_with_an_object_id_counts() {
        let oid = "58fbff2e0d3b620f591a748c158799ead87b51cd";
        assert!(names_head(format!("{oid}\tHEAD\n").as_bytes()));
        let sha256 = format!("{oid}{oid}")[..64].to_owned() + "\tHEAD\n";
        assert!(names_head(sha256.as_bytes()));
        assert!(!names_head(b""));
        assert!(!names_head(format!("{oid}\trefs/heads/main\n").as_bytes()));
        assert!(!names_head(
            format!("{oid}\tHEAD\n{oid}\tHEAD\n").as_bytes()
        ));
        assert!(!names_head(b"abc\tHEAD\n"));
    }
}
