//! CheckObjectsExist: whether each revision of a stream of requests names an object,
//! answered through the read engine (one `info` per revision, batched), in the order
//! asked. Only the first request names the repository, as in Gitaly. A request that
//! names a push's quarantine (Rails asks for a push's new objects while GitLab checks
//! it) sees the quarantined objects: the engine reads through the quarantine's own
//! processes.

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
