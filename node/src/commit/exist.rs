//! CheckObjectsExist: whether each revision of a stream of requests names an object,
//! answered through the read engine (one `info` per revision, batched), in the order
//! asked. Only the first request names the repository, as in Gitaly. A request that
//! names a push's quarantine (Rails asks for a push's new objects while GitLab checks
//! it) is answered by a `git cat-file` of its own that sees the quarantine: the
//! engine's pooled processes see only the repository's own objects.

use refvote_proto::gitaly::check_objects_exist_response::RevisionExistence;
use refvote_proto::gitaly::{CheckObjectsExistRequest, CheckObjectsExistResponse};
use tonic::codegen::BoxStream;
use tonic::{Status, Streaming};

use crate::engine::WINDOW;
use crate::refs::names;
use crate::respond::{Batches, stream_from};
use crate::state::NodeState;

pub async fn check_objects_exist(
    node: &NodeState,
    mut requests: Streaming<CheckObjectsExistRequest>,
) -> Result<BoxStream<CheckObjectsExistResponse>, Status> {
    let Some(first) = requests.message().await? else {
        return Err(Status::invalid_argument("empty request stream"));
    };
    let repo = node.storages.existing(first.repository.as_ref())?;
    if repo.quarantine.is_some() {
        return in_quarantine(node, &repo, first, requests);
    }
    let mut reader = node.reads.reader(&repo).await?;
    Ok(stream_from(move |tx| async move {
        let mut out = Batches::new(tx, |revisions| CheckObjectsExistResponse { revisions });
        let mut next = Some(first);
        while let Some(req) = next {
            for window in req.revisions.chunks(WINDOW) {
                let mut asked = Vec::with_capacity(window.len());
                for r in window {
                    let rev = names::revision("revision", r)
                        .map_err(|e| Status::invalid_argument(format!("invalid revision: {e}")))?;
                    asked.push(rev.to_owned());
                }
                let found = reader.infos(&asked).await?;
                for (name, info) in window.iter().zip(found) {
                    let answer = RevisionExistence {
                        name: name.clone(),
                        exists: info.is_some(),
                    };
                    if out.push(answer).await.is_err() {
                        return Ok(());
                    }
                }
            }
            next = requests.message().await?;
        }
        let _ = out.finish().await;
        Ok(())
    }))
}

/// CheckObjectsExist on a push's quarantine: one `git cat-file` run with the
/// quarantine's environment, one header lookup per revision.
fn in_quarantine(
    node: &NodeState,
    repo: &crate::storage::RepoPath,
    first: CheckObjectsExistRequest,
    mut requests: Streaming<CheckObjectsExistRequest>,
) -> Result<BoxStream<CheckObjectsExistResponse>, Status> {
    let mut cat = crate::catfile::CatFile::start(&node.git, repo)?;
    Ok(stream_from(move |tx| async move {
        let mut out = Batches::new(tx, |revisions| CheckObjectsExistResponse { revisions });
        let mut next = Some(first);
        while let Some(req) = next {
            for name in req.revisions {
                let rev = names::revision("revision", &name)
                    .map_err(|e| Status::invalid_argument(format!("invalid revision: {e}")))?;
                let exists = cat.header(rev).await?.is_some();
                if out.push(RevisionExistence { name, exists }).await.is_err() {
                    return Ok(());
                }
            }
            next = requests.message().await?;
        }
        let _ = out.finish().await;
        Ok(())
    }))
}
