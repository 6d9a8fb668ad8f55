//! SmartHTTPService: git's smart HTTP protocol, the bytes of `git upload-pack` and
//! `git receive-pack --stateless-rpc` carried in gRPC streams with backpressure.
//!
//! PostReceivePack is a push: inside a refvote transaction its one git run is the
//! node's whole part, so the voter is recorded done when that git exits; it joins the
//! transaction and its commands reach git in canonical order as every push does
//! ([`super::push`]).

use std::sync::Arc;

use refvote_pktline::encode;
use refvote_proto::gitaly::smart_http_service_server::SmartHttpService;
use refvote_proto::gitaly::{
    InfoRefsRequest, InfoRefsResponse, PostReceivePackRequest, PostReceivePackResponse,
    PostUploadPackRequest, PostUploadPackResponse,
};
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status, Streaming};

use super::error::NodeError;
use super::push::{self, canonical_input};
use crate::state::NodeState;
use crate::stream::{first_message, stdout_stream, stream_input};

pub struct SmartHttpSvc {
    node: Arc<NodeState>,
}

impl SmartHttpSvc {
    pub fn new(node: Arc<NodeState>) -> SmartHttpSvc {
        SmartHttpSvc { node }
    }

    /// The ref advertisement of `git <service> --advertise-refs`, preceded (outside
    /// protocol v2, as `git http-backend` does) by the `# service=` pkt-line and a flush.
    fn info_refs(
        &self,
        service: &str,
        req: &InfoRefsRequest,
    ) -> Result<Response<BoxStream<InfoRefsResponse>>, Status> {
        let repo = self.node.storages.existing(req.repository.as_ref())?;
        let run = self
            .node
            .git
            .command([service, "--stateless-rpc", "--advertise-refs"])
            .request_config(&req.git_config_options)?
            .protocol(&req.git_protocol)?
            .arg(&repo.path)
            .spawn()
            .map_err(NodeError::from)?;
        let prefix = (!req.git_protocol.contains("version=2")).then(|| {
            let mut out = Vec::new();
            encode::text(&mut out, &format!("# service=git-{service}"))
                .expect("a service name fits in a pkt-line");
            encode::flush(&mut out);
            out
        });
        Ok(Response::new(stdout_stream(run, prefix, |data| {
            InfoRefsResponse { data }
        })))
    }
}

#[tonic::async_trait]
impl SmartHttpService for SmartHttpSvc {
    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn info_refs_upload_pack(
        &self,
        request: Request<InfoRefsRequest>,
    ) -> Result<Response<BoxStream<InfoRefsResponse>>, Status> {
        self.info_refs("upload-pack", request.get_ref())
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn info_refs_receive_pack(
        &self,
        request: Request<InfoRefsRequest>,
    ) -> Result<Response<BoxStream<InfoRefsResponse>>, Status> {
        self.info_refs("receive-pack", request.get_ref())
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn post_upload_pack(
        &self,
        request: Request<Streaming<PostUploadPackRequest>>,
    ) -> Result<Response<BoxStream<PostUploadPackResponse>>, Status> {
        let mut stream = request.into_inner();
        let first = first_message(&mut stream).await?;
        let repo = self.node.storages.existing(first.repository.as_ref())?;
        let run = self
            .node
            .git
            .command(["upload-pack", "--stateless-rpc"])
            .request_config(&first.git_config_options)?
            .protocol(&first.git_protocol)?
            .arg(&repo.path)
            .stdin(stream_input(first.data, stream, |m| m.data))
            .spawn()
            .map_err(NodeError::from)?;
        Ok(Response::new(stdout_stream(run, None, |data| {
            PostUploadPackResponse { data }
        })))
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn post_receive_pack(
        &self,
        request: Request<Streaming<PostReceivePackRequest>>,
    ) -> Result<Response<BoxStream<PostReceivePackResponse>>, Status> {
        let (metadata, _, mut stream) = request.into_parts();
        let first = first_message(&mut stream).await?;
        let repo = self.node.storages.existing(first.repository.as_ref())?;
        let cmd = self
            .node
            .git
            .command(["receive-pack", "--stateless-rpc"])
            .request_config(&first.git_config_options)?
            .protocol(&first.git_protocol)?
            .arg(&repo.path);
        // The whole command section is read and checked before anything runs, so a
        // malformed push is refused without git or the transaction seeing it.
        let input = canonical_input(stream_input(first.data, stream, |m| m.data)).await?;
        let run = push::join(&self.node, &metadata, cmd, &repo.path)
            .await?
            .stdin(input)
            .spawn()
            .map_err(NodeError::from)?;
        Ok(Response::new(stdout_stream(run, None, |data| {
            PostReceivePackResponse { data }
        })))
    }
}
