//! The dates and identities in the objects a node builds (commits and tags made by
//! OperationService writes). They must come out byte-identical on every replica, so
//! nothing here reads the node's clock or zone database: the date is the request's
//! `timestamp` (the router fills it in with its own clock when the client left it
//! unset) or, when a request still has none, a fixed rule the caller passes; the zone
//! is the user's `timezone` as the router resolved it, an offset (`+0530`). Every
//! write that builds objects (commits from files, tags, and merges, cherry-picks,
//! reverts, squashes, rebases, patches as they land) dates them here.

use refvote_proto::gitaly::User;
use tonic::Status;

use super::error::NodeError;

/// The date of the objects a write creates, in Unix seconds, and the offset it is
/// written in: the request's `timestamp`, else `fallback` (the fixed rule), else the
/// epoch; the user's zone as the router resolved it.
pub(crate) fn commit_time(
    timestamp: Option<&prost_types::Timestamp>,
    fallback: Option<i64>,
    user: &User,
) -> Result<(i64, String), Status> {
    let seconds = timestamp.map(|t| t.seconds).or(fallback).unwrap_or(0);
    if seconds < 0 {
        return Err(NodeError::invalid(format!(
            "timestamp {seconds} is before 1970: git cannot store such a date"
        ))
        .into());
    }
    Ok((seconds, fixed_offset(&user.timezone)?))
}

/// A zone as a node may apply it without a zone database: an offset (`+0530`,
/// `-0800`) or UTC (empty, `UTC`, `Etc/UTC`). The router turns a user's named zone
/// into its offset at the commit's time; a name that reaches a node is refused.
pub(crate) fn fixed_offset(zone: &str) -> Result<String, Status> {
    if matches!(zone, "" | "UTC" | "Etc/UTC") {
        return Ok("+0000".into());
    }
    let b = zone.as_bytes();
    let offset = b.len() == 5
        && matches!(b[0], b'+' | b'-')
        && b[1..].iter().all(u8::is_ascii_digit)
        && b[3] < b'6';
    if !offset {
        return Err(NodeError::invalid(format!(
            "time zone {zone:?} is not an offset: the router turns a user's zone into its offset (+HHMM) at the commit's time, as nodes keep no zone database; send the write through the router"
        ))
        .into());
    }
    Ok(zone.to_owned())
}

/// The date as `GIT_AUTHOR_DATE` / `GIT_COMMITTER_DATE` take it. `@` marks the number
/// as Unix seconds: git reads a bare number under 100000000 as something else and
/// refuses it ("invalid date format: 0 +0000").
pub(crate) fn git_date(seconds: i64, zone: &str) -> String {
    format!("@{seconds} {zone}")
}

/// `Name <email> <seconds> <zone>`, without the characters git's ident format forbids
/// (git's own commit-tree drops them the same way).
pub(crate) fn ident(user: &User, seconds: i64, zone: &str) -> Vec<u8> {
    let clean = |b: &[u8]| -> Vec<u8> {
        b.iter()
            .copied()
            .filter(|c| !matches!(c, b'<' | b'>' | b'\n' | 0))
            .collect()
    };
    let mut out = clean(&user.name);
    out.extend(b" <");
    out.extend(clean(&user.email));
    out.extend(format!("> {seconds} {zone}").as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn a_node_applies_offsets_and_refuses_zone_names() {
        assert_eq!(fixed_offset("").unwrap(), "+0000");
        assert_eq!(fixed_offset("UTC").unwrap(), "+0000");
        assert_eq!(fixed_offset("+0530").unwrap(), "+0530");
        assert_eq!(fixed_offset("-0800").unwrap(), "-0800");
        for zone in ["Europe/Berlin", "+05:30", "+0590", "0530", "+053"] {
            let e = fixed_offset(zone).unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "{zone}");
        }
        assert!(
            fixed_offset("Asia/Kolkata")
                .unwrap_err()
                .message()
                .contains("through the router")
        );
    }

    #[test]
    fn a_write_without_a_time_gets_the_fixed_rule() {
        let user = User {
            timezone: "+0200".into(),
            ..Default::default()
        };
        let at = prost_types::Timestamp {
            seconds: 1_700_000_000,
            nanos: 0,
        };
        assert_eq!(
            commit_time(Some(&at), Some(5), &user).unwrap(),
            (1_700_000_000, "+0200".to_owned())
        );
        assert_eq!(commit_time(None, Some(5), &user).unwrap().0, 5);
        assert_eq!(commit_time(None, None, &user).unwrap().0, 0);
        let before = prost_types::Timestamp {
            seconds: -1,
            nanos: 0,
        };
        assert_eq!(
            commit_time(Some(&before), None, &user).unwrap_err().code(),
            Code::InvalidArgument
        );
        let id = ident(
            &User {
                name: b"A <b>".to_vec(),
                email: b"a@b".to_vec(),
                ..Default::default()
            },
            7,
            "-0330",
        );
        assert_eq!(id, b"A b <a@b> 7 -0330");
        assert_eq!(git_date(0, "+0000"), "@0 +0000");
    }
}
