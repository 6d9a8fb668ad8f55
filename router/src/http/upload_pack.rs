//! A fetch or clone (`POST …/git-upload-pack`): a routed read, streamed both ways.

use bytes::Bytes;
use refvote_proto::gitaly::{PostUploadPackRequest, PostUploadPackResponse};

use super::answer::streamed;
use super::body::request_stream;
use super::respond::{Refusal, git_response, refusal_from};
use super::{GitHttp, Request, Response, repository};

impl GitHttp {
    pub(super) async fn upload_pack(
        &self,
        relative: &str,
        request: Request,
    ) -> Result<Response, Refusal> {
        let first = PostUploadPackRequest {
            repository: Some(repository(relative)),
            git_protocol: request.git_protocol.clone(),
            ..Default::default()
        };
        let data = |data: Bytes| PostUploadPackRequest {
            data: data.to_vec(),
            ..Default::default()
        };
        let body = request_stream(first, Bytes::new(), request.body.clone(), data);
        let answer = self
            .call_stream::<PostUploadPackResponse>(
                "/gitaly.SmartHTTPService/PostUploadPack",
                body,
                Some(request.broken.clone()),
            )
            .await
            .map_err(|s| refusal_from(&s))?;
        let body = streamed(
            answer,
            |m: PostUploadPackResponse| m.data,
            Some(request.broken.clone()),
        )
        .await
        .map_err(|s| refusal_from(&s))?;
        Ok(git_response("application/x-git-upload-pack-result", body))
    }
}
