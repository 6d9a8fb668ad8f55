//! RepositoryService.SearchFilesByName and SearchFilesByContent, as Gitaly runs them.
//!
//! - By name: `git ls-tree --full-tree --name-status -r -z <ref> -- <query>`, paths
//!   kept when the optional `filter` regular expression (at most 1,000 characters)
//!   matches, then `offset` skipped and at most `limit` (0: all) answered in one
//!   message.
//! - By content: `git grep --ignore-case -I --line-number --null --before-context 2
//!   --after-context 2 --perl-regexp -e <query> <ref>`; each match block (between
//!   git's `--` separators) is sent in messages of at most 128 KiB followed by one
//!   `end_of_match` message, so only one block is held at a time.
//!
//! Like Gitaly, a ref git cannot resolve or a query that matches nothing answers an
//! empty result, not an error.

use std::sync::Arc;

use refvote_proto::gitaly::{
    SearchFilesByContentRequest, SearchFilesByContentResponse, SearchFilesByNameRequest,
    SearchFilesByNameResponse,
};
use tonic::codegen::BoxStream;
use tonic::{Response, Status};

use crate::error::NodeError;
use crate::respond::stream_from;
use crate::state::NodeState;

const FILTER_MAX_LENGTH: usize = 1000;
/// Gitaly's `streamio.WriteBufferSize`.
const MATCH_CHUNK: usize = 128 * 1024;

fn validate(query: &str, r#ref: &[u8]) -> Result<String, NodeError> {
    if query.is_empty() {
        return Err(NodeError::invalid("no query given"));
    }
    if r#ref.is_empty() {
        return Err(NodeError::invalid("no ref given"));
    }
    if r#ref.starts_with(b"-") {
        return Err(NodeError::invalid("invalid ref argument"));
    }
    let r = std::str::from_utf8(r#ref).map_err(|_| NodeError::invalid("ref is not UTF-8"))?;
    if r.contains(['\0', '\n']) {
        return Err(NodeError::invalid("invalid ref argument"));
    }
    Ok(r.to_owned())
}

pub(crate) async fn by_name(
    node: &Arc<NodeState>,
    req: SearchFilesByNameRequest,
) -> Result<Response<BoxStream<SearchFilesByNameResponse>>, Status> {
    let repo = node.storages.existing(req.repository.as_ref())?;
    let r#ref = validate(&req.query, &req.r#ref)?;
    let filter = if req.filter.is_empty() {
        None
    } else {
        if req.filter.len() > FILTER_MAX_LENGTH {
            return Err(NodeError::invalid("filter exceeds maximum length").into());
        }
        Some(
            regex::bytes::Regex::new(&req.filter)
                .map_err(|e| NodeError::invalid(format!("filter did not compile: {e}")))?,
        )
    };
    if req.query.contains('\0') {
        return Err(NodeError::invalid("query contains NUL").into());
    }
    let mut run = node
        .git
        .command([
            "ls-tree",
            "--full-tree",
            "--name-status",
            "-r",
            "-z",
            "--end-of-options",
        ])
        .arg(&r#ref)
        .arg("--")
        .arg(&req.query)
        .repo(&repo)
        .spawn()
        .map_err(NodeError::from)?;
    let (offset, limit) = (req.offset as usize, req.limit as usize);
    let mut files = Vec::new();
    let mut index = 0usize;
    let mut buf = Vec::new();
    'read: while let Some(chunk) = run.chunk().await {
        buf.extend(chunk.map_err(NodeError::from)?);
        while let Some(nul) = buf.iter().position(|b| *b == 0) {
            let path: Vec<u8> = buf.drain(..=nul).take(nul).collect();
            if filter.as_ref().is_some_and(|f| !f.is_match(&path)) {
                continue;
            }
            index += 1;
            if index > offset {
                files.push(path);
            }
            if limit > 0 && files.len() >= limit {
                break 'read;
            }
        }
    }
    // Stops git if the limit was reached; its exit status is not judged (Gitaly's
    // answer for an unknown ref is an empty list).
    drop(run);
    Ok(Response::new(Box::pin(tokio_stream::once(Ok(
        SearchFilesByNameResponse { files },
    )))))
}

pub(crate) async fn by_content(
    node: &Arc<NodeState>,
    req: SearchFilesByContentRequest,
) -> Result<Response<BoxStream<SearchFilesByContentResponse>>, Status> {
    let repo = node.storages.existing(req.repository.as_ref())?;
    let r#ref = validate(&req.query, &req.r#ref)?;
    let mut run = node
        .git
        .command([
            "grep",
            "--ignore-case",
            "-I",
            "--line-number",
            "--null",
            "--before-context",
            "2",
            "--after-context",
            "2",
            "--perl-regexp",
            "-e",
        ])
        .arg(&req.query)
        .arg("--end-of-options")
        .arg(&r#ref)
        .repo(&repo)
        .spawn()
        .map_err(NodeError::from)?;
    Ok(Response::new(stream_from(move |tx| async move {
        let mut block: Vec<u8> = Vec::new();
        let mut line: Vec<u8> = Vec::new();
        let send_block = |block: Vec<u8>| {
            let tx = tx.clone();
            async move {
                for piece in block.chunks(MATCH_CHUNK) {
                    let m = SearchFilesByContentResponse {
                        match_data: piece.to_vec(),
                        end_of_match: false,
                    };
                    if tx.send(Ok(m)).await.is_err() {
                        return false;
                    }
                }
                let end = SearchFilesByContentResponse {
                    match_data: Vec::new(),
                    end_of_match: true,
                };
                tx.send(Ok(end)).await.is_ok()
            }
        };
        while let Some(chunk) = run.chunk().await {
            let chunk = chunk.map_err(NodeError::from)?;
            let mut rest = chunk.as_slice();
            while let Some(nl) = rest.iter().position(|b| *b == b'\n') {
                line.extend_from_slice(&rest[..=nl]);
                rest = &rest[nl + 1..];
                if line == b"--\n" {
                    line.clear();
                    if !send_block(std::mem::take(&mut block)).await {
                        return Ok(());
                    }
                } else {
                    block.append(&mut line);
                }
            }
            line.extend_from_slice(rest);
        }
        // A last line without a newline is dropped, as Gitaly's line reader does.
        if !block.is_empty() {
            send_block(block).await;
        }
        Ok(())
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_checked_like_gitaly() {
        assert_eq!(
            validate("", b"main").unwrap_err().to_string(),
            "no query given"
        );
        assert_eq!(validate("x", b"").unwrap_err().to_string(), "no ref given");
        assert_eq!(
            validate("x", b"--output=/tmp/x").unwrap_err().to_string(),
            "invalid ref argument"
        );
        assert_eq!(validate("x", b"main").unwrap(), "main");
    }
}
