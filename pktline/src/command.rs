//! A push's command lines and capabilities, as `git send-pack` writes them: optional
//! `shallow <oid>` lines, then `<old> <new> <ref>` per ref, the first one followed by
//! `\0<capabilities>` (space-separated), or a push certificate instead; then a flush.

use crate::decode::{self, Packet};
use crate::sideband::SideBand;

/// One `<old> <new> <ref>` command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Command<'a> {
    pub old: &'a [u8],
    pub new: &'a [u8],
    pub refname: &'a [u8],
}

/// A command line taken apart: git chomps one trailing newline off a pkt-line and
/// reads the capabilities from after the first NUL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Line<'a> {
    pub command: Command<'a>,
    /// `<old> <new> <ref>`, as it was written.
    pub text: &'a [u8],
    /// What followed the NUL, if there was one.
    pub capabilities: Option<Capabilities<'a>>,
    /// The payload ended with a newline.
    pub newline: bool,
}

/// An object id in hex: SHA-1 or SHA-256.
pub fn is_oid(s: &[u8]) -> bool {
    (s.len() == 40 || s.len() == 64) && s.iter().all(u8::is_ascii_hexdigit)
}

fn chomp(payload: &[u8]) -> (&[u8], bool) {
    match payload.strip_suffix(b"\n") {
        Some(p) => (p, true),
        None => (payload, false),
    }
}

/// Parses a data pkt-line's payload as a command line; `None` if it is not one (git
/// refuses such a push with "protocol error: expected old/new/ref").
pub fn parse_line(payload: &[u8]) -> Option<Line<'_>> {
    let (body, newline) = chomp(payload);
    let (text, capabilities) = match body.iter().position(|&b| b == 0) {
        Some(nul) => (&body[..nul], Some(Capabilities(&body[nul + 1..]))),
        None => (body, None),
    };
    let mut parts = text.splitn(3, |&b| b == b' ');
    let (Some(old), Some(new), Some(refname)) = (parts.next(), parts.next(), parts.next()) else {
        return None;
    };
    if !is_oid(old) || !is_oid(new) || refname.is_empty() {
        return None;
    }
    Some(Line {
        command: Command { old, new, refname },
        text,
        capabilities,
        newline,
    })
}

/// Whether the payload is a `shallow <oid>` line.
pub fn is_shallow(payload: &[u8]) -> bool {
    chomp(payload)
        .0
        .strip_prefix(b"shallow ")
        .is_some_and(is_oid)
}

/// Whether the payload opens a push certificate (`push-cert\0<capabilities>`).
pub fn is_push_cert(payload: &[u8]) -> bool {
    let body = chomp(payload).0;
    let line = body.split(|&b| b == 0).next().unwrap_or(body);
    line == b"push-cert"
}

/// The capabilities a push asked for: space-separated words, some `name=value`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capabilities<'a>(pub &'a [u8]);

impl<'a> Capabilities<'a> {
    /// Each capability as written (`report-status`, `agent=git/2.47.0`).
    pub fn iter(self) -> impl Iterator<Item = &'a [u8]> {
        self.0.split(|&b| b == b' ').filter(|c| !c.is_empty())
    }

    /// Whether the capability `name` (without a value) was asked for.
    pub fn has(self, name: &str) -> bool {
        self.iter().any(|c| c == name.as_bytes())
    }

    /// The value of `name=value`.
    pub fn value(self, name: &str) -> Option<&'a [u8]> {
        self.iter().find_map(|c| {
            c.strip_prefix(name.as_bytes())
                .and_then(|rest| rest.strip_prefix(b"="))
        })
    }

    /// Whether the client wants a report of the push (`report-status` or
    /// `report-status-v2`).
    pub fn report_status(self) -> bool {
        self.has("report-status") || self.has("report-status-v2")
    }

    /// The side-band the client asked for; `side-band-64k` wins over `side-band`.
    pub fn side_band(self) -> Option<SideBand> {
        if self.has("side-band-64k") {
            Some(SideBand::Large)
        } else if self.has("side-band") {
            Some(SideBand::Small)
        } else {
            None
        }
    }
}

/// What [`scan`] found in the start of a push.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scan<'a> {
    /// Every command line, in the client's order (for a signed push, those inside its
    /// certificate).
    pub commands: Vec<Command<'a>>,
    /// The capabilities of the first command line, or of the certificate's opening.
    pub capabilities: Capabilities<'a>,
    /// The section's flush was reached within the input.
    pub complete: bool,
}

/// Reads the commands and capabilities of a push from the start of `buf`, as far as
/// `buf` holds its command section, for a caller that wants to name a push's refs
/// before the request has arrived whole (or when it is malformed: the scan ends at a
/// framing error and skips lines that are not commands; git refuses such a push
/// anyway). [`crate::canonical_section`] is the strict reading.
pub fn scan(buf: &[u8]) -> Scan<'_> {
    let mut out = Scan::default();
    let mut first = true;
    for packet in decode::packets(buf) {
        let payload = match packet {
            Ok(Packet::Data(payload)) => payload,
            Ok(Packet::Flush) => {
                out.complete = true;
                break;
            }
            Ok(Packet::Delim | Packet::ResponseEnd) | Err(_) => break,
        };
        if is_shallow(payload) {
            continue;
        }
        if first {
            first = false;
            if is_push_cert(payload) {
                let body = chomp(payload).0;
                if let Some(nul) = body.iter().position(|&b| b == 0) {
                    out.capabilities = Capabilities(&body[nul + 1..]);
                }
                continue;
            }
        }
        if let Some(line) = parse_line(payload) {
            if out.commands.is_empty()
                && let Some(caps) = line.capabilities
            {
                out.capabilities = caps;
            }
            out.commands.push(line.command);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encode;

    const A: &str = "1111111111111111111111111111111111111111";
    const B: &str = "2222222222222222222222222222222222222222";

    fn section(lines: &[String], flush: bool) -> Vec<u8> {
        let mut out = Vec::new();
        for l in lines {
            encode::data(&mut out, l.as_bytes()).unwrap();
        }
        if flush {
            encode::flush(&mut out);
        }
        out
    }

    #[test]
    fn command_lines() {
        let line = format!("{A} {B} refs/heads/main\0report-status side-band-64k\n");
        let l = parse_line(line.as_bytes()).unwrap();
        assert_eq!(l.command.refname, b"refs/heads/main");
        assert_eq!(l.command.old, A.as_bytes());
        assert_eq!(l.text, format!("{A} {B} refs/heads/main").as_bytes());
        assert!(l.newline);
        let caps = l.capabilities.unwrap();
        assert!(caps.report_status());
        assert_eq!(caps.side_band(), Some(SideBand::Large));
        // SHA-256 ids and ref names with spaces (git refuses those later) parse.
        let sha256 = "a".repeat(64);
        let line = format!("{sha256} {sha256} refs/heads/a b");
        let l = parse_line(line.as_bytes()).unwrap();
        assert_eq!(l.command.refname, b"refs/heads/a b");
        assert!(!l.newline && l.capabilities.is_none());
        for bad in [
            String::new(),
            format!("{A} {B}"),
            format!("{A} {B} "),
            format!("{A} xyz refs/heads/a"),
            format!("{} {B} refs/heads/a", "1".repeat(41)),
        ] {
            assert!(parse_line(bad.as_bytes()).is_none(), "{bad:?}");
        }
        assert!(is_shallow(format!("shallow {A}\n").as_bytes()));
        assert!(!is_shallow(b"shallow nothex"));
        assert!(is_push_cert(b"push-cert\0report-status"));
        assert!(!is_push_cert(b"push-certificate"));
    }

    #[test]
    fn capabilities() {
        let caps =
            Capabilities(b"report-status-v2  side-band quiet object-format=sha256 agent=git/2.47");
        assert!(caps.report_status());
        assert_eq!(caps.side_band(), Some(SideBand::Small));
        assert!(caps.has("quiet") && !caps.has("side-band-64k") && !caps.has("object-format"));
        assert_eq!(caps.value("object-format"), Some(&b"sha256"[..]));
        assert_eq!(caps.value("agent"), Some(&b"git/2.47"[..]));
        assert_eq!(caps.value("quiet"), None);
        assert_eq!(caps.iter().count(), 5);
        assert!(!Capabilities(b"").report_status());
        assert_eq!(Capabilities::default().side_band(), None);
    }

    #[test]
    fn scan_names_the_refs_of_a_partial_section() {
        let s = section(
            &[
                format!("shallow {A}"),
                format!("{A} {B} refs/heads/z\0report-status side-band-64k"),
                "garbage".into(),
                format!("{A} {B} refs/heads/a\n"),
            ],
            true,
        );
        let scan = scan(&s);
        assert!(scan.complete);
        let refs: Vec<&[u8]> = scan.commands.iter().map(|c| c.refname).collect();
        assert_eq!(refs, [&b"refs/heads/z"[..], b"refs/heads/a"]);
        assert!(scan.capabilities.report_status());
        assert_eq!(scan.capabilities.side_band(), Some(SideBand::Large));
        // Cut short: what arrived is read; nothing panics at any cut.
        for cut in 0..s.len() {
            let partial = super::scan(&s[..cut]);
            assert!(!partial.complete);
            assert!(partial.commands.len() <= 2);
        }
        // A delimiter ends the scan; it is not a push's.
        let mut odd = section(&[format!("{A} {B} refs/heads/x")], false);
        encode::delim(&mut odd);
        let scan = super::scan(&odd);
        assert_eq!(scan.commands.len(), 1);
        assert!(!scan.complete);
    }

    #[test]
    fn scan_reads_a_signed_push() {
        let s = section(
            &[
                "push-cert\0report-status side-band".into(),
                "certificate version 0.1\n".into(),
                "pusher someone 1700000000 +0000\n".into(),
                "\n".into(),
                format!("{A} {B} refs/heads/z\n"),
                "push-cert-end\n".into(),
            ],
            true,
        );
        let scan = scan(&s);
        assert_eq!(scan.commands.len(), 1);
        assert_eq!(scan.commands[0].refname, b"refs/heads/z");
        assert_eq!(scan.capabilities.side_band(), Some(SideBand::Small));
    }
}
