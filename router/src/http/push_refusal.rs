//! The answer to a push refused as a whole (no quorum, outcome unknown): git shows
//! nothing of an HTTP error body on a POST, so the refusal becomes a report-status
//! git understands — the reason as `remote: refvote: …`, every ref rejected with a
//! short reason.

use tonic::{Code, Status};

/// Where the command section of a push ends (just past its flush packet), if it does
/// within `buf`.
pub(super) fn commands_end(buf: &[u8]) -> Option<usize> {
    let mut at = 0;
    loop {
        let len = pkt_len(buf.get(at..at + 4)?)?;
        if len == 0 {
            return Some(at + 4);
        }
        if len < 4 {
            // A delimiter or response-end packet: not in a push; stop looking.
            return Some(at + 4);
        }
        at += len;
        if at > buf.len() {
            return None;
        }
    }
}

pub(super) fn pkt_len(hex: &[u8]) -> Option<usize> {
    usize::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()
}

/// What a push asked for: its refs and the capabilities a refusal must follow.
#[derive(Debug, Default)]
pub(super) struct Commands {
    refs: Vec<String>,
    report_status: bool,
    side_band: Option<usize>,
}

impl Commands {
    /// Parses the command section at the start of `buf` (as far as it goes).
    pub(super) fn parse(buf: &[u8]) -> Commands {
        let mut out = Commands::default();
        let mut at = 0;
        let mut first = true;
        while let Some(len) = buf.get(at..at + 4).and_then(pkt_len) {
            if len < 4 || at + len > buf.len() {
                break;
            }
            let line = &buf[at + 4..at + len];
            at += len;
            let line = line.strip_suffix(b"\n").unwrap_or(line);
            let (command, caps) = match line.iter().position(|&b| b == 0) {
                Some(nul) => (&line[..nul], Some(&line[nul + 1..])),
                None => (line, None),
            };
            if first && let Some(caps) = caps {
                for cap in caps.split(|&b| b == b' ') {
                    match cap {
                        b"report-status" | b"report-status-v2" => out.report_status = true,
                        b"side-band-64k" => out.side_band = Some(65520),
                        b"side-band" if out.side_band.is_none() => out.side_band = Some(1000),
                        _ => {}
                    }
                }
            }
            first = false;
            let mut parts = command.splitn(3, |&b| b == b' ');
            if let (Some(old), Some(new), Some(name)) = (parts.next(), parts.next(), parts.next())
                && old.len() == new.len()
                && old.len() >= 40
                && let Ok(name) = std::str::from_utf8(name)
            {
                out.refs.push(name.to_owned());
            }
        }
        out
    }

    /// The answer git shows for a push refused as a whole: the reason on the side-band
    /// (`remote: refvote: …`), then every ref rejected with a short reason
    /// (`! [remote rejected] main -> main (…)`). `None` when the client did not ask for
    /// a report (then it gets a plain HTTP error).
    pub(super) fn rejection(&self, status: &Status) -> Option<Vec<u8>> {
        if !self.report_status || self.refs.is_empty() {
            return None;
        }
        let message = status.message().replace('\n', " ");
        let short = short_reason(status);
        let mut report = Vec::new();
        pkt(&mut report, b"unpack ok\n");
        for r in &self.refs {
            pkt(&mut report, format!("ng {r} {short}\n").as_bytes());
        }
        report.extend_from_slice(b"0000");
        let Some(max) = self.side_band else {
            return Some(report);
        };
        let mut out = Vec::new();
        let mut progress = vec![2u8];
        progress.extend_from_slice(format!("refvote: {message}\n").as_bytes());
        for piece in progress[1..].chunks(max - 5) {
            let mut p = vec![2u8];
            p.extend_from_slice(piece);
            pkt(&mut out, &p);
        }
        for piece in report.chunks(max - 5) {
            let mut p = vec![1u8];
            p.extend_from_slice(piece);
            pkt(&mut out, &p);
        }
        out.extend_from_slice(b"0000");
        Some(out)
    }
}

/// The reason in a rejected ref's line: short, no newlines.
pub(super) fn short_reason(status: &Status) -> String {
    let m = status.message();
    if let Some(i) = m.find("not enough replicas are up to date: ") {
        let rest = &m[i + "not enough replicas are up to date: ".len()..];
        return format!("no quorum: {}", rest.lines().next().unwrap_or(rest));
    }
    match status.code() {
        Code::NotFound => "repository not found".into(),
        Code::Unavailable => "cluster unavailable, retry".into(),
        Code::InvalidArgument => "invalid request".into(),
        Code::PermissionDenied | Code::Unauthenticated => "permission denied".into(),
        code => format!("refused ({code:?})"),
    }
}

pub(super) fn pkt(out: &mut Vec<u8>, payload: &[u8]) {
    out.extend_from_slice(format!("{:04x}", payload.len() + 4).as_bytes());
    out.extend_from_slice(payload);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command_section(caps: &str, refs: &[&str]) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, r) in refs.iter().enumerate() {
            let mut line = format!("{} {} {r}", "0".repeat(40), "1".repeat(40)).into_bytes();
            if i == 0 {
                line.push(0);
                line.extend_from_slice(caps.as_bytes());
            }
            line.push(b'\n');
            pkt(&mut out, &line);
        }
        out.extend_from_slice(b"0000PACK");
        out
    }

    #[test]
    fn reads_a_pushs_refs_and_capabilities() {
        let buf = command_section(
            "report-status-v2 side-band-64k quiet",
            &["refs/heads/main", "refs/tags/v1"],
        );
        let end = commands_end(&buf).unwrap();
        assert_eq!(&buf[end..], b"PACK");
        assert_eq!(commands_end(&buf[..end - 2]), None);
        let c = Commands::parse(&buf);
        assert_eq!(c.refs, ["refs/heads/main", "refs/tags/v1"]);
        assert!(c.report_status);
        assert_eq!(c.side_band, Some(65520));
    }

    #[test]
    fn a_refusal_is_a_report_git_understands() {
        let c = Commands::parse(&command_section("report-status", &["refs/heads/main"]));
        let status = Status::unavailable(
            "cannot write to default/p.git: not enough replicas are up to date: 1 of 3 up, 2 needed",
        );
        let report = c.rejection(&status).unwrap();
        assert_eq!(
            String::from_utf8(report).unwrap(),
            "000eunpack ok\n\
             0036ng refs/heads/main no quorum: 1 of 3 up, 2 needed\n0000"
        );
        let c = Commands::parse(&command_section(
            "report-status side-band-64k",
            &["refs/heads/x"],
        ));
        let report = c.rejection(&status).unwrap();
        assert!(
            report.starts_with(b"0065\x02refvote: cannot write"),
            "{report:?}"
        );
        assert!(report.ends_with(b"0000"));
        let c = Commands::parse(&command_section("side-band-64k", &["refs/heads/x"]));
        assert!(c.rejection(&status).is_none());
    }
}
