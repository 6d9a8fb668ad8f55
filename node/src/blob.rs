//! BlobService: blob contents streamed out of one `git cat-file --batch` in bounded
//! chunks, never held whole.

use std::sync::Arc;

use refvote_proto::gitaly::blob_service_server::BlobService;
use refvote_proto::gitaly::{
    GetBlobRequest, GetBlobResponse, GetBlobsRequest, GetBlobsResponse, ObjectType,
};
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status};

use super::catfile::{self, CatFile, TreeItem};
use super::commit::{MODE_SUBMODULE, MODE_TREE, lookup, send_data, stream_from};
use super::error::NodeError;
use super::refs::names;
use crate::state::NodeState;

pub struct BlobSvc {
    node: Arc<NodeState>,
}

impl BlobSvc {
    pub fn new(node: Arc<NodeState>) -> BlobSvc {
        BlobSvc { node }
    }
}

/// Bytes to send of an object of `size` under Gitaly's limit rule: negative = all.
fn read_limit(limit: i64, size: u64) -> u64 {
    if limit < 0 {
        size
    } else {
        size.min(limit as u64)
    }
}

#[tonic::async_trait]
impl BlobService for BlobSvc {
    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn get_blob(
        &self,
        request: Request<GetBlobRequest>,
    ) -> Result<Response<BoxStream<GetBlobResponse>>, Status> {
        let req = request.into_inner();
        let repo = self.node.storages.existing(req.repository.as_ref())?;
        let oid = names::revision("oid", req.oid.as_bytes())?;
        let mut cat = CatFile::start(&self.node.git, &repo)?;
        let header = match cat.header(oid).await? {
            // Gitaly's answer for a missing blob: one empty message.
            None => {
                return Ok(Response::new(Box::pin(tokio_stream::once(Ok(
                    GetBlobResponse::default(),
                )))));
            }
            Some(h) if h.kind != "blob" => {
                return Err(NodeError::invalid(format!(
                    "object {oid} is a {}, not a blob",
                    h.kind
                ))
                .into());
            }
            Some(h) => h,
        };
        let limit = read_limit(req.limit, header.size);
        let first = GetBlobResponse {
            size: header.size as i64,
            oid: header.oid.clone(),
            data: Vec::new(),
        };
        Ok(Response::new(stream_from(move |tx| async move {
            send_data(&mut cat, limit, &tx, Some(first), |first, data| {
                let mut m = first.unwrap_or_default();
                m.data = data;
                m
            })
            .await?;
            Ok(())
        })))
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn get_blobs(
        &self,
        request: Request<GetBlobsRequest>,
    ) -> Result<Response<BoxStream<GetBlobsResponse>>, Status> {
        let req = request.into_inner();
        let repo = self.node.storages.existing(req.repository.as_ref())?;
        let mut pairs = Vec::with_capacity(req.revision_paths.len());
        for rp in &req.revision_paths {
            let rev = names::revision("revision", rp.revision.as_bytes())?.to_owned();
            let path = if rp.path.is_empty() {
                String::new()
            } else {
                catfile::validate_tree_path(&rp.path, "path")?
            };
            pairs.push((rev, path, rp.path.clone()));
        }
        let mut cat = CatFile::start(&self.node.git, &repo)?;
        let limit = req.limit;
        Ok(Response::new(stream_from(move |tx| async move {
            for (rev, path, raw_path) in pairs {
                let named = GetBlobsResponse {
                    revision: rev.clone(),
                    path: raw_path,
                    ..Default::default()
                };
                let item = if path.is_empty() {
                    // The root tree itself.
                    cat.header(&format!("{rev}^{{tree}}"))
                        .await?
                        .map(|h| TreeItem {
                            mode: MODE_TREE,
                            name: Vec::new(),
                            oid: h.oid,
                        })
                } else {
                    lookup(&mut cat, &rev, &path).await?
                };
                let Some(item) = item else {
                    // Matched nothing: only the names go back.
                    if tx.send(Ok(named)).await.is_err() {
                        return Ok(());
                    }
                    continue;
                };
                let mut first = GetBlobsResponse {
                    oid: item.oid.clone(),
                    mode: item.mode as i32,
                    ..named
                };
                if item.mode == MODE_SUBMODULE {
                    first.is_submodule = true;
                    first.r#type = ObjectType::Commit as i32;
                    if tx.send(Ok(first)).await.is_err() {
                        return Ok(());
                    }
                    continue;
                }
                let Some(h) = cat.header(&item.oid).await? else {
                    if tx.send(Ok(first)).await.is_err() {
                        return Ok(());
                    }
                    continue;
                };
                first.size = h.size as i64;
                let send = if h.kind == "blob" {
                    first.r#type = ObjectType::Blob as i32;
                    read_limit(limit, h.size)
                } else {
                    first.r#type = ObjectType::Tree as i32;
                    0
                };
                let more = send_data(&mut cat, send, &tx, Some(first), |first, data| {
                    let mut m = first.unwrap_or_default();
                    m.data = data;
                    m
                })
                .await?;
                if !more {
                    return Ok(());
                }
            }
            Ok(())
        })))
    }
}
