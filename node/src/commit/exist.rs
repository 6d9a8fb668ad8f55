//! Streams of requests naming objects, answered through the read engine in batches,
//! in the order asked; only the first request names the repository, as in Gitaly.
//! CheckObjectsExist: whether each revision names an object (one `info` each).
//! FilterShasWithSignatures: which of the ids name signed commits, one answer per
//! request (ids naming no commit are left out, as Gitaly does). A request that
//! names a push's quarantine (Rails asks for a push's new objects while GitLab checks
//! it) sees the quarantined objects: the engine reads through the quarantine's own
//! processes.

use refvote_proto::gitaly::check_objects_exist_response::RevisionExistence;
use refvote_proto::gitaly::{
    CheckObjectsExistRequest, CheckObjectsExistResponse, FilterShasWithSignaturesRequest,
    FilterShasWithSignaturesResponse, SignatureType,
};
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

/// FilterShasWithSignatures. An empty request stream fails as Gitaly's does (its first
/// receive's EOF comes back as UNKNOWN "EOF").
pub async fn filter_shas_with_signatures(
    node: &NodeState,
    mut requests: Streaming<FilterShasWithSignaturesRequest>,
) -> Result<BoxStream<FilterShasWithSignaturesResponse>, Status> {
    let Some(first) = requests.message().await? else {
        return Err(Status::unknown("EOF"));
    };
    let repo = node.storages.existing(first.repository.as_ref())?;
    let mut reader = node.reads.reader(&repo).await?;
    Ok(stream_from(move |tx| async move {
        let mut next = Some(first);
        while let Some(req) = next {
            // A name that is not UTF-8 names no object git could be asked for.
            let asked: Vec<String> = req
                .shas
                .iter()
                .map(|s| String::from_utf8(s.clone()).unwrap_or_default())
                .collect();
            let commits = reader.commits(&asked).await?;
            let shas = req
                .shas
                .into_iter()
                .zip(commits)
                .filter(|(_, c)| {
                    c.as_ref()
                        .is_some_and(|c| c.signature_type != SignatureType::None as i32)
                })
                .map(|(sha, _)| sha)
                .collect();
            if tx
                .send(Ok(FilterShasWithSignaturesResponse { shas }))
                .await
                .is_err()
            {
                return Ok(());
            }
            next = requests.message().await?;
        }
        Ok(())
    }))
}
