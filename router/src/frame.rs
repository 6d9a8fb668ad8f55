//! Finding and rewriting the target repository inside a request frame without decoding
//! the rest of it: the router reads one nested field of the first frame (the path of
//! field numbers comes from the [`registry`](crate::registry)), rewrites the storage
//! name for the node it forwards to, and leaves every other byte as the client sent it.

use prost::Message;
use refvote_proto::gitaly::Repository;

use crate::wire::{self, Value};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("malformed request: {0}")]
    Wire(#[from] wire::WireError),
    #[error("malformed request: field {0} should be a message")]
    NotAMessage(u32),
    #[error("malformed request: the repository field appears more than once")]
    Repeated,
    #[error("the request names no repository")]
    Missing,
    #[error("malformed repository in the request: {0}")]
    Decode(String),
}

/// The target repository of `frame`, found along `path`.
pub fn repository(frame: &[u8], path: &[u32]) -> Result<Repository, FrameError> {
    let bytes = locate(frame, path)?.ok_or(FrameError::Missing)?;
    Repository::decode(bytes).map_err(|e| FrameError::Decode(e.to_string()))
}

/// `frame` with the repository along `path` replaced by `f` applied to it; every other
/// byte is kept.
pub fn rewrite_repository(
    frame: &[u8],
    path: &[u32],
    f: impl FnOnce(&mut Repository),
) -> Result<Vec<u8>, FrameError> {
    let mut repo = repository(frame, path)?;
    f(&mut repo);
    replace(frame, path, &repo.encode_to_vec())
}

/// The string field at `path` (a storage-scoped request's storage name); empty when
/// it is absent, as protobuf reads it.
pub fn string(frame: &[u8], path: &[u32]) -> Result<String, FrameError> {
    let bytes = locate(frame, path)?.unwrap_or_default();
    String::from_utf8(bytes.to_vec())
        .map_err(|_| FrameError::Decode(format!("field {path:?} is not UTF-8")))
}

/// `frame` with the string field at `path` set to `value`; every other byte is kept.
pub fn rewrite_string(frame: &[u8], path: &[u32], value: &str) -> Result<Vec<u8>, FrameError> {
    string(frame, path)?;
    match replace(frame, path, value.as_bytes()) {
        // Absent (the empty string): appended.
        Err(FrameError::Missing) => {
            let (last, parents) = path.split_last().ok_or(FrameError::Missing)?;
            if !parents.is_empty() {
                return Err(FrameError::Missing);
            }
            let mut out = frame.to_vec();
            wire::put_bytes_field(&mut out, *last, value.as_bytes());
            Ok(out)
        }
        other => other,
    }
}

/// The bytes of the single message field at `path`, or `None` when it is absent.
pub(crate) fn locate<'a>(buf: &'a [u8], path: &[u32]) -> Result<Option<&'a [u8]>, FrameError> {
    let Some((&first, rest)) = path.split_first() else {
        return Ok(Some(buf));
    };
    let fields = wire::fields(buf)?;
    let mut found = fields.iter().filter(|f| f.number == first);
    let Some(field) = found.next() else {
        return Ok(None);
    };
    if found.next().is_some() {
        return Err(FrameError::Repeated);
    }
    match field.value {
        Value::Bytes(b) => locate(b, rest),
        _ => Err(FrameError::NotAMessage(first)),
    }
}

/// `buf` with the message field at `path` replaced by `new` (lengths re-encoded on the
/// way up).
pub(crate) fn replace(buf: &[u8], path: &[u32], new: &[u8]) -> Result<Vec<u8>, FrameError> {
    let Some((&first, rest)) = path.split_first() else {
        return Ok(new.to_vec());
    };
    let fields = wire::fields(buf)?;
    let field = fields
        .iter()
        .find(|f| f.number == first)
        .ok_or(FrameError::Missing)?;
    let Value::Bytes(inner) = field.value else {
        return Err(FrameError::NotAMessage(first));
    };
    let replaced = replace(inner, rest, new)?;
    let mut out = Vec::with_capacity(buf.len() + replaced.len());
    out.extend_from_slice(&buf[..field.span.start]);
    wire::put_bytes_field(&mut out, first, &replaced);
    out.extend_from_slice(&buf[field.span.end..]);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use refvote_proto::gitaly::{
        PostReceivePackRequest, UserCommitFilesRequest, UserCommitFilesRequestHeader,
        user_commit_files_request,
    };

    fn repo(storage: &str, path: &str) -> Repository {
        Repository {
            storage_name: storage.into(),
            relative_path: path.into(),
            ..Default::default()
        }
    }

    #[test]
    fn rewrites_the_storage_and_keeps_every_other_byte() {
        let req = PostReceivePackRequest {
            repository: Some(repo("default", "group/p.git")),
            data: b"0000 pack bytes".to_vec(),
            gl_id: "user-1".into(),
            ..Default::default()
        };
        let frame = req.encode_to_vec();
        assert_eq!(
            repository(&frame, &[1]).unwrap().relative_path,
            "group/p.git"
        );
        let out =
            rewrite_repository(&frame, &[1], |r| r.storage_name = "node2-storage".into()).unwrap();
        let back = PostReceivePackRequest::decode(out.as_slice()).unwrap();
        assert_eq!(back.repository.unwrap().storage_name, "node2-storage");
        assert_eq!(back.data, req.data);
        assert_eq!(back.gl_id, "user-1");
    }

    #[test]
    fn rewrites_a_repository_nested_in_a_header() {
        let req = UserCommitFilesRequest {
            user_commit_files_request_payload: Some(
                user_commit_files_request::UserCommitFilesRequestPayload::Header(
                    UserCommitFilesRequestHeader {
                        repository: Some(repo("default", "a.git")),
                        branch_name: b"main".to_vec(),
                        ..Default::default()
                    },
                ),
            ),
        };
        let out = rewrite_repository(&req.encode_to_vec(), &[1, 1], |r| {
            r.storage_name = "s".into()
        })
        .unwrap();
        let back = UserCommitFilesRequest::decode(out.as_slice()).unwrap();
        let Some(user_commit_files_request::UserCommitFilesRequestPayload::Header(h)) =
            back.user_commit_files_request_payload
        else {
            panic!("header lost")
        };
        assert_eq!(h.repository.unwrap().storage_name, "s");
        assert_eq!(h.branch_name, b"main");
    }

    #[test]
    fn rewrites_a_storage_name_and_keeps_the_rest() {
        use refvote_proto::gitaly::FindRemoteRepositoryRequest;
        let req = FindRemoteRepositoryRequest {
            remote: "https://example.com/a.git".into(),
            storage_name: "default".into(),
        };
        let frame = req.encode_to_vec();
        assert_eq!(string(&frame, &[2]).unwrap(), "default");
        let out = rewrite_string(&frame, &[2], "node-storage").unwrap();
        let back = FindRemoteRepositoryRequest::decode(out.as_slice()).unwrap();
        assert_eq!(back.storage_name, "node-storage");
        assert_eq!(back.remote, req.remote);
        // An absent storage reads as empty and is added.
        let bare = FindRemoteRepositoryRequest {
            remote: "x".into(),
            storage_name: String::new(),
        }
        .encode_to_vec();
        assert_eq!(string(&bare, &[2]).unwrap(), "");
        let out = rewrite_string(&bare, &[2], "s").unwrap();
        let back = FindRemoteRepositoryRequest::decode(out.as_slice()).unwrap();
        assert_eq!(
            (back.remote.as_str(), back.storage_name.as_str()),
            ("x", "s")
        );
    }

    #[test]
    fn bad_frames_are_errors() {
        assert_eq!(repository(&[], &[1]).unwrap_err(), FrameError::Missing);
        assert!(matches!(
            repository(&[0x0a, 9, 1], &[1]),
            Err(FrameError::Wire(_))
        ));
        assert_eq!(
            repository(&[0x08, 1], &[1]).unwrap_err(),
            FrameError::NotAMessage(1)
        );
        let twice = [0x0a, 0, 0x0a, 0];
        assert_eq!(repository(&twice, &[1]).unwrap_err(), FrameError::Repeated);
        // A repository field that does not decode as one.
        assert!(matches!(
            repository(&[0x0a, 2, 0x12, 9], &[1]),
            Err(FrameError::Decode(_))
        ));
    }
}
