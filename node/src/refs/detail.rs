//! Gitaly's structured errors: a status whose `grpc-status-details-bin` carries a
//! `google.rpc.Status` with one typed detail (e.g. `gitaly.FindTagError`), so clients
//! that branch on the detail (GitLab Rails does) see what they expect.

use tonic::codegen::Bytes;
use tonic::{Code, Status};

/// `google.protobuf.Any`.
#[derive(Clone, PartialEq, prost::Message)]
struct Any {
    #[prost(string, tag = "1")]
    type_url: String,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
}

/// `google.rpc.Status`.
#[derive(Clone, PartialEq, prost::Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
    #[prost(message, repeated, tag = "3")]
    details: Vec<Any>,
}

/// A status with `detail` (a message of package `gitaly` named `type_name`) attached.
pub fn status(
    code: Code,
    message: String,
    type_name: &str,
    detail: &impl prost::Message,
) -> Status {
    let rpc = RpcStatus {
        code: code as i32,
        message: message.clone(),
        details: vec![Any {
            type_url: format!("type.googleapis.com/gitaly.{type_name}"),
            value: detail.encode_to_vec(),
        }],
    };
    Status::with_details(
        code,
        message,
        Bytes::from(prost::Message::encode_to_vec(&rpc)),
    )
}

/// The detail of a status made by [`status`], decoded.
#[cfg(test)]
pub fn decode<M: prost::Message + Default>(status: &Status) -> Option<M> {
    let rpc = <RpcStatus as prost::Message>::decode(status.details()).ok()?;
    M::decode(rpc.details.first()?.value.as_slice()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use refvote_proto::gitaly::{FindTagError, ReferenceNotFoundError, find_tag_error};

    #[test]
    fn detail_round_trips() {
        let d = FindTagError {
            error: Some(find_tag_error::Error::TagNotFound(ReferenceNotFoundError {
                reference_name: b"refs/tags/v1".to_vec(),
            })),
        };
        let s = status(
            Code::NotFound,
            "tag does not exist".into(),
            "FindTagError",
            &d,
        );
        assert_eq!(s.code(), Code::NotFound);
        assert_eq!(decode::<FindTagError>(&s), Some(d));
    }
}
