//! Gitaly's repository checksum of a replica on disk: `git show-ref --head` read as a
//! stream and folded line by line into [`refvote_cluster::checksum::Checksum`], which
//! says what counts and how (bit for bit Gitaly's, so operators can compare a refvote
//! replica with a Gitaly one).

use std::path::Path;

use refvote_cluster::checksum::{Checksum, EMPTY};

use crate::error::NodeError;
use crate::git::Git;
use crate::storage::is_repository;

/// The checksum of the repository at `path`. Reads `git show-ref` as a stream, so a
/// repository with millions of refs costs no memory.
pub async fn calculate(git: &Git, path: &Path) -> Result<String, NodeError> {
    let mut run = git.command(["show-ref", "--head"]).git_dir(path).spawn()?;
    let mut sum = Checksum::default();
    let mut partial: Vec<u8> = Vec::new();
    while let Some(chunk) = run.chunk().await {
        partial.extend_from_slice(&chunk?);
        let mut start = 0;
        while let Some(nl) = partial[start..].iter().position(|b| *b == b'\n') {
            sum.add_line(&partial[start..start + nl]);
            start += nl + 1;
        }
        partial.drain(..start);
    }
    if !partial.is_empty() {
        sum.add_line(&partial);
    }
    let exit = run.wait().await?;
    // 1: no refs at all (an empty repository); anything else is a failure.
    if !matches!(exit.code(), Some(0 | 1)) {
        return Err(exit.into_error().into());
    }
    match sum.finish() {
        Some(s) => Ok(s),
        None if is_repository(path) => Ok(EMPTY.into()),
        None => Err(NodeError::DataLoss(format!(
            "not a git repository: {}",
            path.display()
        ))),
    }
}
