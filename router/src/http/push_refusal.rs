//! The answer to a push refused as a whole (no quorum, outcome unknown): git shows
//! nothing of an HTTP error body on a POST, so the refusal becomes a report-status
//! git understands — the reason as `remote: refvote: …`, every ref rejected with a
//! short reason.

use refvote_pktline::command;
use refvote_pktline::report::Report;
use refvote_pktline::section::section_end;
use refvote_pktline::sideband::SideBand;
use tonic::{Code, Status};

/// How far to read a push ahead: to just past its command section's flush, or to a
/// malformed packet (the node refuses such a push; there is nothing more to learn).
/// `None` while more is needed.
pub(super) fn commands_end(buf: &[u8]) -> Option<usize> {
    section_end(buf).unwrap_or(Some(buf.len()))
}

/// What a push asked for: its refs and the capabilities a refusal must follow.
#[derive(Debug, Default)]
pub(super) struct Commands {
    refs: Vec<String>,
    report_status: bool,
    side_band: Option<SideBand>,
}

impl Commands {
    /// Reads the command section at the start of `buf` (as far as it goes).
    pub(super) fn parse(buf: &[u8]) -> Commands {
        let scan = command::scan(buf);
        Commands {
            refs: scan
                .commands
                .iter()
                .filter_map(|c| std::str::from_utf8(c.refname).ok())
                .map(str::to_owned)
                .collect(),
            report_status: scan.capabilities.report_status(),
            side_band: scan.capabilities.side_band(),
        }
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
        let mut report = Report::unpack_ok();
        for r in &self.refs {
            report.ng(r, &short);
        }
        let progress = format!("refvote: {message}\n");
        Some(report.finish_within(self.side_band, progress.as_bytes()))
    }
}

/// The reason in a rejected ref's line: short, no newlines.
pub(super) fn short_reason(status: &Status) -> String {
    let m = status.message();
    // Too few replicas, whether etcd said so before the write began or the write found
    // it out (a node died before its lease ran out): the counts, up to the details.
    for lead in [
        "not enough replicas are up to date: ",
        "not enough replicas answered: ",
    ] {
        if let Some(i) = m.find(lead) {
            let rest = &m[i + lead.len()..];
            let counts = rest.split([';', '\n']).next().unwrap_or(rest);
            return format!("no quorum: {counts}");
        }
    }
    // Cut by the router's drain (RouteError::DrainCut): not the cluster's fault, and
    // the write may have landed, so "retry" alone would mislead.
    if m.starts_with("refvote-router is shutting down") {
        return "router shutting down: may or may not have been applied, check then retry".into();
    }
    match status.code() {
        Code::NotFound => "repository not found".into(),
        Code::Unavailable => "cluster unavailable, retry".into(),
        Code::InvalidArgument => "invalid request".into(),
        Code::PermissionDenied | Code::Unauthenticated => "permission denied".into(),
        code => format!("refused ({code:?})"),
    }
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
            refvote_pktline::encode::data(&mut out, &line).unwrap();
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
        assert_eq!(c.side_band.map(SideBand::max_packet_len), Some(65520));
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

    #[test]
    fn a_push_cut_by_the_drain_says_the_router_shuts_down_and_the_outcome_is_open() {
        let status = Status::from(crate::respond::RouteError::DrainCut {
            secs: 55,
            write: true,
        });
        let short = short_reason(&status);
        assert!(short.starts_with("router shutting down"), "{short}");
        assert!(
            short.contains("may or may not have been applied"),
            "{short}"
        );
    }

    #[test]
    fn a_dead_replica_is_a_missing_quorum_too() {
        let status = Status::unavailable(
            "cannot write to default/p.git: not enough replicas answered: 1 of 3 answered, 2 needed; \
             unreachable: node1 (cannot reach node node1: connection refused)",
        );
        assert_eq!(
            short_reason(&status),
            "no quorum: 1 of 3 answered, 2 needed"
        );
    }
}
