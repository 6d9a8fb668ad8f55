//! The time of a write's new commit or tag objects, settled once by the router before
//! the fan-out (DESIGN.md §2 step 3). Every replica must build byte-identical objects,
//! so no node may read its own clock or zone database; the router may. Gitaly dates
//! such objects with the request's `timestamp`, or its own clock when there is none,
//! in the user's configured zone (`SignatureFromRequest`). Here the router fills an
//! unset `timestamp` with its clock (whole seconds, as git stores them) and replaces
//! every `User.timezone` of that message with the zone's offset at that instant
//! (`+0530`), so a node only ever applies a fixed offset. Where the fields sit comes
//! from the registry ([`Stamp`]); every other byte of the frame is kept.
//!
//! It does not decide anything about the objects themselves (authors, messages), and
//! touches only the first frame: every such write names its time there.

use prost::Message;
use refvote_proto::gitaly::User;

use crate::frame::{self, FrameError};
use crate::registry::Stamp;
use crate::wire;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StampError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("malformed request: {0}")]
    Decode(String),
    /// Gitaly's answer to a zone it cannot load (Go's `time.LoadLocation` message).
    #[error("unknown time zone {0}")]
    UnknownZone(String),
    #[error("time: invalid location name {0:?}")]
    InvalidZoneName(String),
    #[error("timestamp {0} is out of range for a commit date")]
    OutOfRange(i64),
}

/// `first` with the write's time settled: its `timestamp` set to `now` (Unix seconds)
/// when the client left it unset, and each user's zone replaced by its offset at that
/// time. `None` when the first frame has no message at `stamp.at` (a stream that does
/// not open with its header; the node refuses it).
pub fn settle(first: &[u8], stamp: &Stamp, now: i64) -> Result<Option<Vec<u8>>, StampError> {
    let Some(message) = frame::locate(first, &stamp.at)? else {
        return Ok(None);
    };
    let fields = wire::fields(message).map_err(FrameError::from)?;
    let seconds = match merged(&fields, stamp.timestamp)? {
        Some(bytes) => {
            prost_types::Timestamp::decode(bytes.as_slice())
                .map_err(|e| StampError::Decode(format!("timestamp: {e}")))?
                .seconds
        }
        None => now,
    };
    let mut users = Vec::new();
    for &number in &stamp.users {
        let Some(bytes) = merged(&fields, number)? else {
            continue;
        };
        let mut user =
            User::decode(bytes.as_slice()).map_err(|e| StampError::Decode(format!("user: {e}")))?;
        user.timezone = offset(&user.timezone, seconds)?;
        users.push((number, user));
    }
    let replaced = |n: u32| n == stamp.timestamp || stamp.users.contains(&n);
    let mut out = Vec::with_capacity(message.len() + 16);
    for f in fields.iter().filter(|f| !replaced(f.number)) {
        out.extend_from_slice(&message[f.span.clone()]);
    }
    let timestamp = prost_types::Timestamp { seconds, nanos: 0 };
    wire::put_bytes_field(&mut out, stamp.timestamp, &timestamp.encode_to_vec());
    for (number, user) in users {
        wire::put_bytes_field(&mut out, number, &user.encode_to_vec());
    }
    Ok(Some(frame::replace(first, &stamp.at, &out)?))
}

/// The bytes of message field `number`, its occurrences concatenated (a decoder
/// merges repeated occurrences of a message field the same way); `None` when absent.
fn merged(fields: &[wire::Field<'_>], number: u32) -> Result<Option<Vec<u8>>, StampError> {
    let mut found = fields.iter().filter(|f| f.number == number).peekable();
    if found.peek().is_none() {
        return Ok(None);
    }
    let mut bytes = Vec::new();
    for f in found {
        match f.value {
            wire::Value::Bytes(b) => bytes.extend_from_slice(b),
            _ => return Err(FrameError::NotAMessage(number).into()),
        }
    }
    Ok(Some(bytes))
}

/// The offset of `zone` at `seconds`, as git writes it (`+0100`, `-0330`). Names are
/// read as Go's `time.LoadLocation` reads them: empty and `UTC` are UTC, `Local` is
/// the router's own zone, anything else a tz database name.
pub fn offset(zone: &str, seconds: i64) -> Result<String, StampError> {
    if zone.is_empty() || zone == "UTC" {
        return Ok("+0000".into());
    }
    // Go refuses names that could leave the zone database.
    if zone.contains("..") || zone.starts_with('/') || zone.contains('\\') {
        return Err(StampError::InvalidZoneName(zone.to_owned()));
    }
    let tz = if zone == "Local" {
        jiff::tz::TimeZone::system()
    } else {
        jiff::tz::TimeZone::get(zone).map_err(|_| StampError::UnknownZone(zone.to_owned()))?
    };
    let at = jiff::Timestamp::from_second(seconds).map_err(|_| StampError::OutOfRange(seconds))?;
    Ok(format_offset(tz.to_offset(at).seconds()))
}

/// `±HHMM` for an offset in seconds east of UTC (seconds of an offset dropped, as Go's
/// `-0700` layout drops them).
fn format_offset(seconds: i32) -> String {
    let sign = if seconds < 0 { '-' } else { '+' };
    let minutes = seconds.unsigned_abs() / 60;
    format!("{sign}{:02}{:02}", minutes / 60, minutes % 60)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Registry;
    use refvote_proto::gitaly::{
        Repository, UserCommitFilesRequest, UserCommitFilesRequestHeader, UserCreateTagRequest,
        UserSquashRequest, user_commit_files_request,
    };

    const NOW: i64 = 1_767_225_600; // 2026-01-01T00:00:00Z

    fn stamp_of(path: &str) -> Stamp {
        Registry::gitaly()
            .unwrap()
            .get(path)
            .unwrap()
            .stamp
            .clone()
            .unwrap()
    }

    fn user(zone: &str) -> Option<User> {
        Some(User {
            gl_id: "user-1".into(),
            name: b"Jane".to_vec(),
            email: b"jane@example.com".to_vec(),
            gl_username: "jane".into(),
            timezone: zone.into(),
        })
    }

    fn header(req: UserCommitFilesRequest) -> UserCommitFilesRequestHeader {
        match req.user_commit_files_request_payload {
            Some(user_commit_files_request::UserCommitFilesRequestPayload::Header(h)) => h,
            other => panic!("no header: {other:?}"),
        }
    }

    fn commit_files(timestamp: Option<i64>, zone: &str) -> UserCommitFilesRequest {
        UserCommitFilesRequest {
            user_commit_files_request_payload: Some(
                user_commit_files_request::UserCommitFilesRequestPayload::Header(
                    UserCommitFilesRequestHeader {
                        repository: Some(Repository {
                            storage_name: "default".into(),
                            relative_path: "a.git".into(),
                            ..Default::default()
                        }),
                        user: user(zone),
                        branch_name: b"main".to_vec(),
                        commit_message: b"first".to_vec(),
                        timestamp: timestamp
                            .map(|seconds| prost_types::Timestamp { seconds, nanos: 0 }),
                        ..Default::default()
                    },
                ),
            ),
        }
    }

    #[test]
    fn an_unset_time_becomes_the_routers_and_the_zone_its_offset() {
        let stamp = stamp_of("/gitaly.OperationService/UserCommitFiles");
        let req = commit_files(None, "Asia/Kolkata");
        let out = settle(&req.encode_to_vec(), &stamp, NOW).unwrap().unwrap();
        let h = header(UserCommitFilesRequest::decode(out.as_slice()).unwrap());
        assert_eq!(
            h.timestamp,
            Some(prost_types::Timestamp {
                seconds: NOW,
                nanos: 0
            })
        );
        let u = h.user.unwrap();
        assert_eq!(u.timezone, "+0530");
        // Everything else is as the client sent it.
        assert_eq!(u.name, b"Jane");
        assert_eq!(u.gl_id, "user-1");
        assert_eq!(h.repository.unwrap().relative_path, "a.git");
        assert_eq!(h.branch_name, b"main");
        assert_eq!(h.commit_message, b"first");
    }

    #[test]
    fn a_clients_time_is_kept_and_dates_the_zone() {
        let stamp = stamp_of("/gitaly.OperationService/UserCommitFiles");
        // Summer and winter in Berlin: the offset is the one at the commit's time.
        let summer = 1_751_371_200; // 2025-07-01T12:00:00Z
        for (at, want) in [(summer, "+0200"), (NOW, "+0100")] {
            let req = commit_files(Some(at), "Europe/Berlin");
            let out = settle(&req.encode_to_vec(), &stamp, NOW).unwrap().unwrap();
            let h = header(UserCommitFilesRequest::decode(out.as_slice()).unwrap());
            assert_eq!(h.timestamp.unwrap().seconds, at);
            assert_eq!(h.user.unwrap().timezone, want);
        }
    }

    #[test]
    fn every_user_of_the_message_gets_its_own_offset() {
        let stamp = stamp_of("/gitaly.OperationService/UserSquash");
        let req = UserSquashRequest {
            user: user("America/New_York"),
            author: user("Asia/Tokyo"),
            commit_message: b"squashed".to_vec(),
            ..Default::default()
        };
        let out = settle(&req.encode_to_vec(), &stamp, NOW).unwrap().unwrap();
        let back = UserSquashRequest::decode(out.as_slice()).unwrap();
        assert_eq!(back.user.unwrap().timezone, "-0500");
        assert_eq!(back.author.unwrap().timezone, "+0900");
        assert_eq!(back.timestamp.unwrap().seconds, NOW);
        assert_eq!(back.commit_message, b"squashed");
    }

    #[test]
    fn utc_and_an_empty_zone_are_utc() {
        assert_eq!(offset("", NOW).unwrap(), "+0000");
        assert_eq!(offset("UTC", NOW).unwrap(), "+0000");
        assert_eq!(offset("Etc/UTC", NOW).unwrap(), "+0000");
        assert_eq!(format_offset(-(3 * 3600 + 30 * 60)), "-0330");
        assert_eq!(format_offset(20 * 60 + 11), "+0020");
    }

    #[test]
    fn a_zone_gitaly_could_not_load_is_refused() {
        let stamp = stamp_of("/gitaly.OperationService/UserCreateTag");
        let req = UserCreateTagRequest {
            user: user("Mars/Olympus_Mons"),
            ..Default::default()
        };
        let err = settle(&req.encode_to_vec(), &stamp, NOW).unwrap_err();
        assert_eq!(err, StampError::UnknownZone("Mars/Olympus_Mons".into()));
        assert_eq!(err.to_string(), "unknown time zone Mars/Olympus_Mons");
        assert!(matches!(
            offset("../../etc/passwd", NOW),
            Err(StampError::InvalidZoneName(_))
        ));
        // An offset is not a zone name (Gitaly cannot load "+0100" either).
        assert!(offset("+0100", NOW).is_err());
    }

    #[test]
    fn a_stream_without_its_header_is_left_to_the_node() {
        let stamp = stamp_of("/gitaly.OperationService/UserCommitFiles");
        let req = UserCommitFilesRequest {
            user_commit_files_request_payload: None,
        };
        assert_eq!(settle(&req.encode_to_vec(), &stamp, NOW).unwrap(), None);
    }

    #[test]
    fn a_user_without_a_zone_is_utc_and_a_missing_user_stays_missing() {
        let stamp = stamp_of("/gitaly.OperationService/UserCreateTag");
        let req = UserCreateTagRequest {
            user: user(""),
            tag_name: b"v1".to_vec(),
            ..Default::default()
        };
        let out = settle(&req.encode_to_vec(), &stamp, NOW).unwrap().unwrap();
        let back = UserCreateTagRequest::decode(out.as_slice()).unwrap();
        assert_eq!(back.user.unwrap().timezone, "+0000");
        assert_eq!(back.tag_name, b"v1");
        let req = UserCreateTagRequest::default();
        let out = settle(&req.encode_to_vec(), &stamp, NOW).unwrap().unwrap();
        let back = UserCreateTagRequest::decode(out.as_slice()).unwrap();
        assert_eq!(back.user, None);
        assert_eq!(back.timestamp.unwrap().seconds, NOW);
    }
}
