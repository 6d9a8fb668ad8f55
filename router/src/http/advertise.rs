//! The ref advertisement (`GET …/info/refs?service=…`), and with `create_on_push` the
//! creation of an unknown repository before its first push.

use std::sync::Arc;
use std::time::Duration;

use futures_util::stream;
use refvote_proto::gitaly::{CreateRepositoryRequest, InfoRefsRequest, InfoRefsResponse};
use tonic::{Code, Status};

use super::answer::streamed;
use super::body::grpc_frame;
use super::respond::{Refusal, git_response, refusal_from};
use super::route::Service;
use super::{GitHttp, Response, VIRTUAL_STORAGE, repository};

/// How long the advertisement before a push retries while a repository that another
/// client is creating at the same moment comes into being.
pub(super) const CREATION_SETTLE: Duration = Duration::from_secs(10);

impl GitHttp {
    pub(super) async fn info_refs(
        &self,
        relative: &str,
        service: Service,
        git_protocol: &str,
    ) -> Result<Response, Refusal> {
        let request = InfoRefsRequest {
            repository: Some(repository(relative)),
            git_config_options: Vec::new(),
            git_protocol: git_protocol.to_owned(),
        };
        let path = match service {
            Service::UploadPack => "/gitaly.SmartHTTPService/InfoRefsUploadPack",
            Service::ReceivePack => "/gitaly.SmartHTTPService/InfoRefsReceivePack",
        };
        let one = || stream::iter([Ok(grpc_frame(&request))]);
        let mut answer = self
            .call_stream::<InfoRefsResponse>(path, one(), None)
            .await;
        if service == Service::ReceivePack
            && self.create_on_push
            && matches!(&answer, Err(s) if s.code() == Code::NotFound)
        {
            self.create(relative).await?;
            // Another client may be creating it at this moment: its replicas exist only
            // once that creation's write finished.
            let deadline = tokio::time::Instant::now() + CREATION_SETTLE;
            loop {
                answer = self
                    .call_stream::<InfoRefsResponse>(path, one(), None)
                    .await;
                match &answer {
                    Err(s)
                        if s.code() == Code::NotFound && tokio::time::Instant::now() < deadline =>
                    {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    _ => break,
                }
            }
        }
        let answer = answer.map_err(|s| self.explain(&s, service))?;
        let content_type = match service {
            Service::UploadPack => "application/x-git-upload-pack-advertisement",
            Service::ReceivePack => "application/x-git-receive-pack-advertisement",
        };
        let body = streamed(answer, |m: InfoRefsResponse| m.data, None)
            .await
            .map_err(|s| refusal_from(&s))?;
        Ok(git_response(content_type, body))
    }

    /// A refusal that tells a person at a git prompt what to do.
    fn explain(&self, status: &Status, service: Service) -> Refusal {
        let mut refusal = refusal_from(status);
        if status.code() == Code::NotFound && service == Service::ReceivePack {
            if self.create_on_push {
                refusal
                    .message
                    .push_str(" (creating it on this push failed)");
            } else {
                refusal.message.push_str(
                    " (this router does not create repositories on push: create_on_push = false)",
                );
            }
        }
        refusal
    }

    /// CreateRepository through the router: placement, registration and a voted
    /// creation, as for a gRPC client. Someone else's creation winning is fine.
    async fn create(&self, relative: &str) -> Result<(), Refusal> {
        let turn = self
            .creating
            .lock()
            .expect("creations lock")
            .entry(relative.to_owned())
            .or_default()
            .clone();
        let result = {
            let _turn = turn.lock().await;
            self.create_once(relative).await
        };
        let mut creating = self.creating.lock().expect("creations lock");
        // The map holds one reference and `turn` another: nobody else is waiting.
        if Arc::strong_count(&turn) == 2 {
            creating.remove(relative);
        }
        result
    }

    async fn create_once(&self, relative: &str) -> Result<(), Refusal> {
        let request = CreateRepositoryRequest {
            repository: Some(repository(relative)),
            default_branch: Vec::new(),
            object_format: 0,
        };
        let result = async {
            let mut answer = self
                .call_stream::<()>(
                    "/gitaly.RepositoryService/CreateRepository",
                    stream::iter([Ok(grpc_frame(&request))]),
                    None,
                )
                .await?;
            while answer.message().await?.is_some() {}
            Ok::<_, Status>(())
        }
        .await;
        match result {
            Ok(()) => {
                tracing::info!(relative, "repository created on first push");
                Ok(())
            }
            Err(s) if s.code() == Code::AlreadyExists => Ok(()),
            Err(s) => {
                let mut refusal = refusal_from(&s);
                refusal.message = format!(
                    "cannot create {VIRTUAL_STORAGE}/{relative} for this push: {}",
                    refusal.message
                );
                Err(refusal)
            }
        }
    }
}
