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

/// The sidechannel could not be opened. Gitaly (b229e9953e77):
/// `SSHUploadPackWithSidechannel` answers INTERNAL ("opening sidechannel",
/// `internal/gitaly/service/ssh/upload_pack.go`; older releases answered ABORTED,
/// changed in Gitaly's cfd43d354); `PostUploadPackWithSidechannel` answers UNAVAILABLE
/// when the connection failed (clients retry on it) and INTERNAL otherwise, for
/// example a call that did not come on a backchannel connection
/// (`internal/gitaly/service/smarthttp/upload_pack.go`).
pub fn open_failed(rpc: FetchRpc, e: &OpenError) -> Status {
    let msg = format!("opening sidechannel: {}", chain(e));
    match rpc {
        FetchRpc::SshUploadPack => Status::internal(msg),
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

/// Reading the client's data failed mid-call: it went away, or sent something that
/// is not sidechannel framing. In Gitaly this surfaces through git upload-pack, whose
/// stdin is the sidechannel behind a pipe that is closed on any read error, so git
/// sees its client hang up ("the remote end hung up unexpectedly"):
/// `SSHUploadPackWithSidechannel` answers CANCELED ("user canceled the request",
/// `internal/gitaly/service/ssh/upload_command.go`), whatever the read error was;
/// `PostUploadPackWithSidechannel` answers FAILED_PRECONDITION
/// (`internal/gitaly/service/smarthttp/upload_pack.go`, "waiting for upload-pack").
/// The message keeps what went wrong, for the operator.
pub fn transfer_failed(rpc: FetchRpc, e: &io::Error) -> Status {
    let detail = chain(e);
    match rpc {
        FetchRpc::SshUploadPack => {
            Status::cancelled(format!("user canceled the request: {detail}"))
        }
        FetchRpc::PostUploadPack => {
            Status::failed_precondition(format!("sidechannel transfer failed: {detail}"))
        }
    }
}

/// Writing the answer to the client failed mid-call. When the client went away
/// (reset, closed) this is the same hang-up as on the read side, and answers alike
/// (which side notices first is a race, in Gitaly too). Otherwise Gitaly's git fails
/// on its broken stdout: `SSHUploadPackWithSidechannel` answers INTERNAL,
/// `PostUploadPackWithSidechannel` FAILED_PRECONDITION ("copying stdout from
/// upload-pack").
pub fn write_failed(rpc: FetchRpc, e: &io::Error) -> Status {
    if client_went_away(e) {
        return transfer_failed(rpc, e);
    }
    let detail = chain(e);
    match rpc {
        FetchRpc::SshUploadPack => Status::internal(format!("sending the answer: {detail}")),
        FetchRpc::PostUploadPack => {
            Status::failed_precondition(format!("copying stdout from upload-pack: {detail}"))
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
            Code::Internal
        );
        assert_eq!(
            open_failed(FetchRpc::SshUploadPack, &plain).code(),
            Code::Internal
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
    fn transfer_failures_answer_as_gitalys_git_sees_them() {
        let hung_up = io::Error::new(io::ErrorKind::UnexpectedEof, FramingError::NoFlush);
        let garbage = io::Error::new(io::ErrorKind::InvalidData, FramingError::SpecialPacket('1'));
        let reset = io::Error::from(io::ErrorKind::ConnectionReset);
        assert!(client_went_away(&hung_up) && client_went_away(&reset));
        assert!(!client_went_away(&garbage));
        // git's stdin is closed on any read error: it reports a hang-up.
        for e in [&hung_up, &garbage, &reset] {
            assert_eq!(
                transfer_failed(FetchRpc::SshUploadPack, e).code(),
                Code::Cancelled
            );
            assert_eq!(
                transfer_failed(FetchRpc::PostUploadPack, e).code(),
                Code::FailedPrecondition
            );
        }
        let s = transfer_failed(FetchRpc::SshUploadPack, &garbage);
        assert!(s.message().contains("invalid header 1"), "{}", s.message());
        assert_eq!(
            write_failed(FetchRpc::SshUploadPack, &reset).code(),
            Code::Cancelled
        );
        let other = io::Error::other("disk on fire");
        assert_eq!(
            write_failed(FetchRpc::SshUploadPack, &other).code(),
            Code::Internal
        );
        assert_eq!(
            write_failed(FetchRpc::PostUploadPack, &reset).code(),
            Code::FailedPrecondition
        );
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
