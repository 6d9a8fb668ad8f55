//! CheckObjectsExist: whether each revision a stream of requests names resolves to an
//! object, answered per request message (Rails asks it for a push's new objects, on its
//! quarantine, while GitLab checks the push).

use refvote_proto::gitaly::{
    CheckObjectsExistRequest, CheckObjectsExistResponse, check_objects_exist_response,
};
use tonic::codegen::BoxStream;
use tonic::{Status, Streaming};

use crate::catfile::CatFile;
use crate::error::NodeError;
use crate::state::NodeState;

pub async fn check_objects_exist(
    node: &NodeState,
    mut stream: Streaming<CheckObjectsExistRequest>,
) -> Result<BoxStream<CheckObjectsExistResponse>, Status> {
    let Some(first) = stream.message().await? else {
        return Err(NodeError::invalid("empty request stream: send the repository first").into());
    };
    let repo = node.storages.existing(first.repository.as_ref())?;
    let mut cat = CatFile::start(&node.git, &repo)?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let answers = tx.clone();
    let work = async move {
        let mut next = Some(first);
        while let Some(req) = next {
            let mut revisions = Vec::with_capacity(req.revisions.len());
            for name in req.revisions {
                let rev = crate::refs::names::revision("revision", &name)
                    .map_err(|e| Status::invalid_argument(format!("invalid revision: {e}")))?;
                let exists = cat.header(rev).await?.is_some();
                revisions.push(check_objects_exist_response::RevisionExistence { name, exists });
            }
            if tx
                .send(Ok(CheckObjectsExistResponse { revisions }))
                .await
                .is_err()
            {
                return Ok(());
            }
            next = stream.message().await?;
        }
        Ok::<(), Status>(())
    };
    tokio::spawn(async move {
        if let Err(status) = work.await {
            let _ = answers.send(Err(status)).await;
        }
    });
    Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
}
