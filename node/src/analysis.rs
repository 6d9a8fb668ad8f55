//! AnalysisService.CheckBlobsGenerated: whether each blob is generated code, by
//! linguist's rules ([`crate::linguist::is_generated`]) on its path and first 2 KiB,
//! as Gitaly decides it. A bidirectional stream: each request message is answered by
//! one response message for its blobs, in order, read through one `git cat-file`.

use std::sync::Arc;

use refvote_proto::gitaly::analysis_service_server::AnalysisService;
use refvote_proto::gitaly::{
    CheckBlobsGeneratedRequest, CheckBlobsGeneratedResponse, check_blobs_generated_response,
};
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status, Streaming};

use crate::catfile::CatFile;
use crate::error::NodeError;
use crate::linguist;
use crate::refs::names;
use crate::respond::stream_from;
use crate::state::NodeState;
use crate::stream::first_message;

/// Bytes of a blob that decide (Gitaly reads 2,048).
const SNIFF: usize = 2048;

pub struct AnalysisSvc {
    node: Arc<NodeState>,
}

impl AnalysisSvc {
    pub fn new(node: Arc<NodeState>) -> AnalysisSvc {
        AnalysisSvc { node }
    }
}

/// Up to `n` bytes of the start of the object `cat` just found (the rest is skipped by
/// the next lookup).
pub(crate) async fn read_prefix(cat: &mut CatFile, n: usize) -> Result<Vec<u8>, NodeError> {
    let mut out = Vec::new();
    while out.len() < n {
        let piece = cat.read(n - out.len()).await?;
        if piece.is_empty() {
            break;
        }
        out.extend(piece);
    }
    Ok(out)
}

fn validate(req: &CheckBlobsGeneratedRequest) -> Result<(), NodeError> {
    if req.blobs.is_empty() {
        return Err(NodeError::invalid("validating request: empty blobs"));
    }
    for b in &req.blobs {
        names::path_scoped_revision("revision", &b.revision)
            .map(str::to_owned)
            .map_err(|e| NodeError::invalid(format!("validating request: {e}")))?;
        if b.path.is_empty() {
            return Err(NodeError::invalid("validating request: empty path"));
        }
    }
    Ok(())
}

#[tonic::async_trait]
impl AnalysisService for AnalysisSvc {
    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn check_blobs_generated(
        &self,
        request: Request<Streaming<CheckBlobsGeneratedRequest>>,
    ) -> Result<Response<BoxStream<CheckBlobsGeneratedResponse>>, Status> {
        let mut stream = request.into_inner();
        let first = first_message(&mut stream).await?;
        let repo = self.node.storages.existing(first.repository.as_ref())?;
        let mut cat = CatFile::start(&self.node.git, &repo)?;
        Ok(Response::new(stream_from(move |tx| async move {
            let mut next = Some(first);
            while let Some(req) = next.take() {
                validate(&req)?;
                let mut blobs = Vec::with_capacity(req.blobs.len());
                for b in req.blobs {
                    let rev = String::from_utf8_lossy(&b.revision).into_owned();
                    let header = cat.header(&rev).await?.ok_or_else(|| {
                        NodeError::NotFound(format!("reading object: object not found: {rev:?}"))
                    })?;
                    if header.kind != "blob" {
                        return Err(NodeError::invalid("object is not a blob").into());
                    }
                    let content = read_prefix(&mut cat, SNIFF).await?;
                    let path = String::from_utf8_lossy(&b.path);
                    blobs.push(check_blobs_generated_response::Blob {
                        revision: b.revision,
                        generated: linguist::is_generated(&path, &content),
                    });
                }
                if tx
                    .send(Ok(CheckBlobsGeneratedResponse { blobs }))
                    .await
                    .is_err()
                {
                    return Ok(());
                }
                next = stream.message().await?;
            }
            Ok(())
        })))
    }
}
