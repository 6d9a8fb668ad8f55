//! The report-status a push ends with, when the client asked for `report-status`:
//! `unpack ok` (or `unpack <why>`), then `ok <ref>` or `ng <ref> <reason>` per command,
//! then a flush. git prints `ng` lines as `! [remote rejected] <ref> (<reason>)`. With
//! a side-band the report travels on band 1, progress text before it on band 2.

use crate::decode::{self, DecodeError, Packet};
use crate::encode;
use crate::sideband::{self, Band, SideBand};

/// A report being written. Lines are cut to fit one pkt-line (a ref name that came in
/// a command line always fits; a long reason is shortened).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    out: Vec<u8>,
}

impl Report {
    /// A report whose pack was unpacked.
    pub fn unpack_ok() -> Report {
        let mut r = Report { out: Vec::new() };
        r.line(&[b"unpack ok"]);
        r
    }

    /// A report whose pack could not be unpacked, and why.
    pub fn unpack_failed(reason: &str) -> Report {
        let mut r = Report { out: Vec::new() };
        r.line(&[b"unpack ", one_line(reason).as_bytes()]);
        r
    }

    /// `ok <ref>`: the ref was updated.
    pub fn ok(&mut self, refname: &str) -> &mut Report {
        self.line(&[b"ok ", refname.as_bytes()]);
        self
    }

    /// `ng <ref> <reason>`: the ref was refused.
    pub fn ng(&mut self, refname: &str, reason: &str) -> &mut Report {
        self.line(&[
            b"ng ",
            refname.as_bytes(),
            b" ",
            one_line(reason).as_bytes(),
        ]);
        self
    }

    fn line(&mut self, parts: &[&[u8]]) {
        let mut line: Vec<u8> = parts.concat();
        // Room for the newline; cut on a character boundary where the text is UTF-8.
        let mut max = crate::MAX_DATA_LEN - 1;
        if line.len() > max {
            while max > 0 && (line[max] & 0xc0) == 0x80 {
                max -= 1;
            }
            line.truncate(max);
        }
        encode::parts(&mut self.out, &[&line, b"\n"]).expect("the line was cut to fit");
    }

    /// The report as it goes out without a side-band: its lines and the flush.
    pub fn finish(mut self) -> Vec<u8> {
        encode::flush(&mut self.out);
        self.out
    }

    /// The end of a push's answer: with a side-band, `progress` on band 2 (git shows it
    /// as `remote: …`), the report on band 1, and the side-band's flush; without one,
    /// the report alone (progress has nowhere to go).
    pub fn finish_within(self, side_band: Option<SideBand>, progress: &[u8]) -> Vec<u8> {
        let report = self.finish();
        let Some(side_band) = side_band else {
            return report;
        };
        let mut out = Vec::with_capacity(report.len() + progress.len() + 16);
        sideband::write(&mut out, side_band, Band::Progress, progress);
        sideband::write(&mut out, side_band, Band::Data, &report);
        encode::flush(&mut out);
        out
    }
}

/// Reasons are one line: git reads the rest of a report line as the reason.
fn one_line(reason: &str) -> std::borrow::Cow<'_, str> {
    if reason.contains('\n') {
        reason.replace('\n', " ").into()
    } else {
        reason.into()
    }
}

/// A report-status as the client reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// `Ok` for `unpack ok`, otherwise what followed `unpack `.
    pub unpack: Result<(), String>,
    /// Each ref in the order reported, `Err(reason)` for `ng`.
    pub refs: Vec<(String, Result<(), String>)>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("report-status does not start with an unpack line")]
    NoUnpack,
    #[error("report-status line {index} is not 'ok <ref>' or 'ng <ref> <reason>'")]
    BadLine { index: usize },
    #[error("report-status ends before its flush")]
    MissingFlush,
}

/// Reads a report-status (without side-band: take it out of band 1 first with
/// [`sideband::demux`]).
pub fn parse(buf: &[u8]) -> Result<Parsed, ParseError> {
    let mut packets = decode::packets(buf);
    let unpack = packets
        .next()
        .transpose()?
        .and_then(|p| p.line())
        .and_then(|l| l.strip_prefix(b"unpack "))
        .ok_or(ParseError::NoUnpack)?;
    let mut parsed = Parsed {
        unpack: match unpack {
            b"ok" => Ok(()),
            why => Err(String::from_utf8_lossy(why).into_owned()),
        },
        refs: Vec::new(),
    };
    for (i, packet) in packets.enumerate() {
        let index = i + 1;
        let line = match packet? {
            Packet::Flush => return Ok(parsed),
            p => p.line().ok_or(ParseError::BadLine { index })?,
        };
        let text = String::from_utf8_lossy(line);
        let entry = if let Some(name) = text.strip_prefix("ok ") {
            (name.to_owned(), Ok(()))
        } else if let Some((name, reason)) = text
            .strip_prefix("ng ")
            .and_then(|rest| rest.split_once(' '))
        {
            (name.to_owned(), Err(reason.to_owned()))
        } else {
            return Err(ParseError::BadLine { index });
        };
        parsed.refs.push(entry);
    }
    Err(ParseError::MissingFlush)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_what_receive_pack_writes() {
        let mut r = Report::unpack_ok();
        r.ok("refs/heads/main")
            .ng("refs/tags/v1", "no quorum: 1 of 3 up, 2 needed");
        assert_eq!(
            String::from_utf8(r.finish()).unwrap(),
            "000eunpack ok\n\
             0017ok refs/heads/main\n\
             0033ng refs/tags/v1 no quorum: 1 of 3 up, 2 needed\n\
             0000"
        );
        let r = Report::unpack_failed("index-pack abnormal exit\nmore");
        assert_eq!(
            r.finish(),
            b"0029unpack index-pack abnormal exit more\n0000"
        );
    }

    #[test]
    fn round_trips_with_and_without_side_band() {
        let mut r = Report::unpack_ok();
        r.ok("refs/heads/a").ng("refs/heads/b", "multi\nline");
        let want = Parsed {
            unpack: Ok(()),
            refs: vec![
                ("refs/heads/a".into(), Ok(())),
                ("refs/heads/b".into(), Err("multi line".into())),
            ],
        };
        assert_eq!(parse(&r.clone().finish()).unwrap(), want);
        assert_eq!(r.clone().finish_within(None, b"lost"), r.clone().finish());
        for side_band in [SideBand::Small, SideBand::Large] {
            let out = r.clone().finish_within(Some(side_band), b"refvote: why\n");
            let d = sideband::demux(&out).unwrap();
            assert_eq!(d.progress, b"refvote: why\n");
            assert_eq!(d.end, Some(out.len()));
            assert_eq!(parse(&d.data).unwrap(), want);
        }
        let failed = parse(&Report::unpack_failed("disk full").finish()).unwrap();
        assert_eq!(failed.unpack, Err("disk full".into()));
    }

    #[test]
    fn long_lines_are_cut_to_fit() {
        let mut r = Report::unpack_ok();
        r.ng("refs/heads/x", &"é".repeat(40_000));
        let out = r.finish();
        let parsed = parse(&out).unwrap();
        let (_, reason) = &parsed.refs[0];
        let reason = reason.clone().unwrap_err();
        assert!(reason.len() < crate::MAX_DATA_LEN && reason.ends_with('é'));
        assert!(!reason.contains('\u{fffd}'), "cut inside a character");
    }

    #[test]
    fn malformed_reports_are_refused() {
        assert_eq!(parse(b"0000"), Err(ParseError::NoUnpack));
        assert_eq!(parse(b"0009nope\n0000"), Err(ParseError::NoUnpack));
        assert_eq!(
            parse(b"000eunpack ok\n0008bad\n0000"),
            Err(ParseError::BadLine { index: 1 })
        );
        assert_eq!(parse(b"000eunpack ok\n"), Err(ParseError::MissingFlush));
        assert!(matches!(parse(b"000eunpack"), Err(ParseError::Decode(_))));
    }
}
