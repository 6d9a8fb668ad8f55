//! The one place where sidechannel failures become gRPC statuses, with Gitaly's
//! codes for its two sidechannel RPCs. Where Gitaly's code differs by RPC, so does
//! ours; the messages are ours.

use std::error::Error;
use std::io;

use tonic::Status;

use crate::frame::FramingError;
use crate::proxy::ProxyError;
use crate::server::{OpenError, framing_error};

/// The RPCs that move their data over a sidechannel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchRpc {
    /// `gitaly.SSHService/SSHUploadPackWithSidechannel` (gitlab-shell).
    SshUploadPack,
    /// `gitaly.SmartHTTPService/PostUploadPackWithSidechannel` (workhorse).
    PostUploadPack,
}

/// An error and its sources, `: `-separated (the messages add context, not repeat).
pub fn chain(e: &dyn Error) -> String {
    let mut s = e.to_string();
    let mut next = e.source();
    while let Some(inner) = next {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        next = inner.source();
    }
    s
}

/// The sidechannel could not be opened. Gitaly: `SSHUploadPackWithSidechannel`
/// answers ABORTED (`internal/gitaly/service/ssh/upload_pack.go`);
/// `PostUploadPackWithSidechannel` answers UNAVAILABLE when the connection failed
/// (clients retry on it) and INTERNAL otherwise, for example a call that did not
/// come on a backchannel connection (`internal/gitaly/service/smarthttp/upload_pack.go`).
pub fn open_failed(rpc: FetchRpc, e: &OpenError) -> Status {
    let msg = format!("opening sidechannel: {}", chain(e));
    match rpc {
        FetchRpc::SshUploadPack => Status::aborted(msg),
        FetchRpc::PostUploadPack if e.is_retryable() => Status::unavailable(msg),
        FetchRpc::PostUploadPack => Status::internal(msg),
    }
}

/// Whether an I/O error on the sidechannel means the client went away (closed,
/// reset, or ended without its `0000`) rather than sent something malformed.
pub fn client_went_away(e: &io::Error) -> bool {
    match framing_error(e) {
        Some(FramingError::NoFlush | FramingError::Truncated { .. }) => true,
        Some(_) => false,
        None => matches!(
            e.kind(),
            io::ErrorKind::UnexpectedEof
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe
        ),
    }
}

/// Reading the client's data or writing the answer failed mid-call. In Gitaly this
/// surfaces through git upload-pack, whose stdin is the sidechannel:
/// `SSHUploadPackWithSidechannel` answers CANCELED ("user canceled the request")
/// when the client hung up and INTERNAL otherwise
/// (`internal/gitaly/service/ssh/upload_command.go`);
/// `PostUploadPackWithSidechannel` answers FAILED_PRECONDITION
/// (`internal/gitaly/service/smarthttp/upload_pack.go`, "waiting for upload-pack").
pub fn transfer_failed(rpc: FetchRpc, e: &io::Error) -> Status {
    let detail = chain(e);
    match rpc {
        FetchRpc::SshUploadPack if client_went_away(e) => {
            Status::cancelled(format!("user canceled the request: {detail}"))
        }
        FetchRpc::SshUploadPack => Status::internal(format!("sidechannel: {detail}")),
        FetchRpc::PostUploadPack => {
            Status::failed_precondition(format!("sidechannel transfer failed: {detail}"))
        }
    }
}

/// A proxied sidechannel failed while the node's call itself succeeded. Praefect
/// returns the proxy's error, which its status middleware makes INTERNAL.
pub fn proxy_failed(e: &ProxyError) -> Status {
    Status::internal(chain(e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn open_failures_follow_gitaly_per_rpc() {
        let timeout = OpenError::Timeout(std::time::Duration::from_secs(5));
        let plain = OpenError::NotMultiplexed;
        assert_eq!(
            open_failed(FetchRpc::SshUploadPack, &timeout).code(),
            Code::Aborted
        );
        assert_eq!(
            open_failed(FetchRpc::SshUploadPack, &plain).code(),
            Code::Aborted
        );
        assert_eq!(
            open_failed(FetchRpc::PostUploadPack, &timeout).code(),
            Code::Unavailable
        );
        let s = open_failed(FetchRpc::PostUploadPack, &plain);
        assert_eq!(s.code(), Code::Internal);
        assert!(s.message().contains("backchannel"), "{}", s.message());
    }

    #[test]
    fn transfer_failures_tell_a_hang_up_from_garbage() {
        let hung_up = io::Error::new(io::ErrorKind::UnexpectedEof, FramingError::NoFlush);
        let garbage = io::Error::new(io::ErrorKind::InvalidData, FramingError::SpecialPacket('1'));
        let reset = io::Error::from(io::ErrorKind::ConnectionReset);
        assert_eq!(
            transfer_failed(FetchRpc::SshUploadPack, &hung_up).code(),
            Code::Cancelled
        );
        assert_eq!(
            transfer_failed(FetchRpc::SshUploadPack, &reset).code(),
            Code::Cancelled
        );
        let s = transfer_failed(FetchRpc::SshUploadPack, &garbage);
        assert_eq!(s.code(), Code::Internal);
        assert!(s.message().contains("invalid header 1"), "{}", s.message());
        for e in [&hung_up, &garbage, &reset] {
            assert_eq!(
                transfer_failed(FetchRpc::PostUploadPack, e).code(),
                Code::FailedPrecondition
            );
        }
    }

    #[test]
    fn chains_name_every_cause() {
        let e = OpenError::Handshake(io::Error::other("connection reset by peer"));
        assert_eq!(
            chain(&e),
            "sidechannel: handshake with the client: connection reset by peer"
        );
    }
}
