//! Gitaly's structured errors: a gRPC status whose details carry a `google.rpc.Status`
//! with one `Any`-wrapped per-RPC error message (e.g. `gitaly.UserCreateBranchError`),
//! which GitLab Rails decodes to tell, say, "branch exists" from "hook refused".

use prost::Message;
use tonic::{Code, Status};

/// `google.rpc.Status`, as much of it as the details need.
#[derive(Clone, PartialEq, Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
    #[prost(message, repeated, tag = "3")]
    details: Vec<prost_types::Any>,
}

/// A status with `detail` attached; `type_name` is the detail's full protobuf name
/// (e.g. "gitaly.UserCreateBranchError").
pub fn status_with_detail<M: Message>(
    code: Code,
    message: impl Into<String>,
    type_name: &str,
    detail: &M,
) -> Status {
    let message = message.into();
    let details = RpcStatus {
        code: code as i32,
        message: message.clone(),
        details: vec![prost_types::Any {
            type_url: format!("type.googleapis.com/{type_name}"),
            value: detail.encode_to_vec(),
        }],
    };
    tracing::debug!(%message, ?code, detail = type_name, "rpc refused");
    Status::with_details(code, message, details.encode_to_vec().into())
}

/// The detail of `status`, decoded, if it carries one named `type_name` (for tests and
/// clients).
pub fn detail_of<M: Message + Default>(status: &Status, type_name: &str) -> Option<M> {
    let s = RpcStatus::decode(status.details()).ok()?;
    s.details
        .iter()
        .find(|a| a.type_url.ends_with(&format!("/{type_name}")))
        .and_then(|a| M::decode(a.value.as_slice()).ok())
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
        let s = status_with_detail(
            Code::NotFound,
            "tag does not exist",
            "gitaly.FindTagError",
            &d,
        );
        assert_eq!(s.code(), Code::NotFound);
        assert_eq!(s.message(), "tag does not exist");
        assert_eq!(
            detail_of::<FindTagError>(&s, "gitaly.FindTagError"),
            Some(d)
        );
        assert_eq!(detail_of::<FindTagError>(&s, "gitaly.OtherError"), None);
    }
}
