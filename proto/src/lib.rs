//! refvote's wire definitions, generated from the `.proto` files in this folder.
//!
//! Always: the message between the `reference-transaction` hook and votingd ([`hook`])
//! and its framing, and the rest of the wire contract between the parts
//! ([`contract`]: the transaction metadata key, the transaction-id rule, the hook's
//! environment). With the `grpc` feature: Gitaly's protocol as GitLab's clients use
//! it, every service they call declared whole (matched to Gitaly b229e9953e77), which
//! the storage node serves (methods it does not implement answer UNIMPLEMENTED) and the
//! router forwards ([`gitaly`], package `gitaly`, tonic servers and clients), and its
//! descriptor set; refvote's admin service the router serves ([`admin`]). The hook
//! builds without that feature, so it stays free of an async runtime and a gRPC stack.
#![forbid(unsafe_code)]

pub mod contract;

/// Gitaly's protocol as we serve it (`gitaly/*.proto`, `refvote/annotations.proto`):
/// messages, `*_server` and `*_client` modules for every service.
#[cfg(feature = "grpc")]
pub mod gitaly {
    // Generated code: clippy's style lints do not apply to it.
    #![allow(clippy::all, clippy::pedantic)]
    include!(concat!(env!("OUT_DIR"), "/gitaly.rs"));

    /// The encoded `FileDescriptorSet` of every gitaly file, method options (`op_type`)
    /// included: what the router builds its registry from.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/gitaly_descriptor.bin"));
}

/// refvote's administrative service (`refvote/admin.proto`, package `refvote.admin`),
/// served by the router: replicas of a repository, their synchronization, removal.
#[cfg(feature = "grpc")]
pub mod admin {
    #![allow(clippy::all, clippy::pedantic)]
    include!(concat!(env!("OUT_DIR"), "/refvote.admin.rs"));
}

/// The hook <-> votingd message (`refvote/hook.proto`).
pub mod hook {
    include!(concat!(env!("OUT_DIR"), "/refvote.hook.rs"));

    /// Largest frame either side accepts. A hook request is a few hundred bytes; a
    /// status document a few KiB. Anything larger is a bug or an attack.
    pub const MAX_FRAME: usize = 64 * 1024;

    /// Encodes `msg` as one frame: a 4-byte big-endian length, then the message.
    pub fn encode_frame<M: prost::Message>(msg: &M) -> Vec<u8> {
        let len = msg.encoded_len();
        let mut buf = Vec::with_capacity(4 + len);
        buf.extend_from_slice(&(len as u32).to_be_bytes());
        msg.encode(&mut buf).expect("a Vec grows as needed");
        buf
    }

    /// Reads the length from a frame header, refusing frames over [`MAX_FRAME`].
    pub fn frame_len(header: [u8; 4]) -> Result<usize, FrameTooLarge> {
        let len = u32::from_be_bytes(header) as usize;
        if len > MAX_FRAME {
            Err(FrameTooLarge(len))
        } else {
            Ok(len)
        }
    }

    /// A frame header announced more bytes than [`MAX_FRAME`].
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct FrameTooLarge(pub usize);

    impl std::fmt::Display for FrameTooLarge {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(
                f,
                "frame of {} bytes exceeds the limit of {MAX_FRAME} bytes",
                self.0
            )
        }
    }

    impl std::error::Error for FrameTooLarge {}

    /// Decodes a request body (the bytes after the frame header). Anything prost cannot
    /// decode is an error saying so; nothing is half-read.
    pub fn decode_request(body: &[u8]) -> Result<Request, String> {
        <Request as prost::Message>::decode(body).map_err(|e| format!("malformed request: {e}"))
    }

    impl Vote {
        /// Checks the fields every vote must have right, whoever receives it: a known
        /// phase, a well-formed transaction id, a 32-hex-digit key base and a SHA-256
        /// hash. Whether the voter is this node is the receiver's business.
        pub fn check(&self) -> Result<Phase, (error::Code, String)> {
            let phase = Phase::try_from(self.phase).unwrap_or(Phase::Unspecified);
            if phase == Phase::Unspecified {
                return Err((
                    error::Code::InvalidArgument,
                    format!("unknown phase {}", self.phase),
                ));
            }
            let id = &self.transaction;
            if !crate::contract::is_transaction_id(id) {
                return Err((
                    error::Code::InvalidArgument,
                    format!("malformed transaction id {id:?}"),
                ));
            }
            if self.key_base.len() != 32 || !self.key_base.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err((error::Code::InvalidArgument, "malformed vote key".into()));
            }
            if self.hash.len() != 32 {
                return Err((
                    error::Code::InvalidArgument,
                    "the update hash must be 32 bytes (SHA-256)".into(),
                ));
            }
            Ok(phase)
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use prost::Message;

        #[test]
        fn frame_round_trip() {
            let req = Request {
                kind: Some(request::Kind::Vote(Vote {
                    phase: Phase::Prepared as i32,
                    transaction: "t1".into(),
                    voter: "node1".into(),
                    key_base: "ab".into(),
                    hash: vec![1; 32],
                    ref_count: 1,
                    first_ref: "refs/heads/main".into(),
                })),
            };
            let frame = encode_frame(&req);
            let len = frame_len(frame[..4].try_into().unwrap()).unwrap();
            assert_eq!(len, frame.len() - 4);
            assert_eq!(Request::decode(&frame[4..]).unwrap(), req);
        }

        #[test]
        fn oversized_frames_are_refused() {
            let header = ((MAX_FRAME + 1) as u32).to_be_bytes();
            assert_eq!(frame_len(header), Err(FrameTooLarge(MAX_FRAME + 1)));
        }
    }
}
