//! What a fetching client asked for, read from the pkt-lines it sends `git
//! upload-pack` (wants, haves, shallows, capabilities, deepen, filter), as Gitaly
//! reports it in `PackfileNegotiationStatistics` (`internal/git/stats/
//! packfile_negotiation.go`), and whether the client has ended its negotiation with
//! `done` (Gitaly's `ReadMonitor` bounds the time until then).
//!
//! [`Negotiation`] is fed the client's bytes as they pass on to git, in pieces of any
//! size; it keeps at most one partial pkt-line and stops buffering once it knows all
//! it will learn. Counting follows Gitaly's parser: every pkt-line before the first
//! `done` line counts as a packet (flushes and delims too, the `done` itself not), the
//! payload size adds each line's data without its trailing newline (the `done` line
//! included), capabilities come from the first `want` line that has any, and a second
//! `want` line with capabilities, or a `want`/`have`/`shallow`/`deepen`/`filter` line
//! with the wrong number of words, ends the parse as malformed.

use crate::MAX_PKT_LEN;
use crate::decode::{self, Packet};

/// The exact pkt-line that ends a negotiation and starts the pack (Gitaly's
/// `pktline.PktDone()`).
pub const DONE_PACKET: &[u8] = b"0009done\n";

/// The statistics of one negotiation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NegotiationStats {
    /// Bytes of pkt-line data, headers and trailing newlines excluded.
    pub payload_size: i64,
    /// pkt-lines before the `done` line.
    pub packets: i64,
    /// The capabilities of the first `want` line.
    pub caps: Vec<String>,
    pub wants: i64,
    pub haves: i64,
    pub shallows: i64,
    /// The `deepen <n>`, `deepen-since <t>` or `deepen-not <ref>` line, if any.
    pub deepen: String,
    /// The object filter (`filter <spec>`), if any.
    pub filter: String,
    /// The protocol v2 command (`command=fetch`, `command=ls-refs`), if any.
    pub command: String,
    /// The client's `agent=` value, if it sent one.
    pub user_agent: String,
}

/// How far the parse got.
#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Still counting.
    Counting,
    /// The `done` line was read; the statistics are final.
    Done,
    /// The client's data did not parse; the statistics stop where it failed.
    Failed(String),
}

/// An incremental reader of a negotiation.
#[derive(Debug, Clone)]
pub struct Negotiation {
    stats: NegotiationStats,
    state: State,
    /// Whether [`DONE_PACKET`] itself has passed.
    done_packet: bool,
    /// A pkt-line not complete yet.
    partial: Vec<u8>,
    /// Whether the pkt-line stream itself is broken (nothing more can be scanned).
    broken: bool,
}

impl Default for Negotiation {
    fn default() -> Self {
        Negotiation::new()
    }
}

impl Negotiation {
    pub fn new() -> Negotiation {
        Negotiation {
            stats: NegotiationStats::default(),
            state: State::Counting,
            done_packet: false,
            partial: Vec::new(),
            broken: false,
        }
    }

    /// Reads the next bytes the client sent.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() && self.scanning() {
            // Complete a partial pkt-line first, one byte range at a time.
            let buf: &[u8] = if self.partial.is_empty() {
                bytes
            } else {
                let want = self.wanted().saturating_sub(self.partial.len()).max(1);
                let take = want.min(bytes.len());
                self.partial.extend_from_slice(&bytes[..take]);
                bytes = &bytes[take..];
                let partial = std::mem::take(&mut self.partial);
                match decode::packet(&partial) {
                    Ok(Some((packet, len))) => {
                        debug_assert_eq!(len, partial.len());
                        self.packet(packet, &partial[..len]);
                    }
                    Ok(None) => self.partial = partial,
                    Err(e) => self.fail_stream(e.to_string()),
                }
                continue;
            };
            let mut at = 0;
            loop {
                if !self.scanning() {
                    return;
                }
                match decode::packet(&buf[at..]) {
                    Ok(Some((packet, len))) => {
                        self.packet(packet, &buf[at..at + len]);
                        at += len;
                        if at == buf.len() {
                            return;
                        }
                    }
                    Ok(None) => {
                        self.partial.extend_from_slice(&buf[at..]);
                        return;
                    }
                    Err(e) => {
                        self.fail_stream(e.to_string());
                        return;
                    }
                }
            }
        }
    }

    /// The client's data ended (it closed its side).
    pub fn end(&mut self) {
        if self.scanning() && !self.partial.is_empty() {
            self.fail_stream(format!(
                "the data ended inside a pkt-line ({} bytes of it)",
                self.partial.len()
            ));
        }
        self.partial = Vec::new();
    }

    /// What was counted so far (final once [`Negotiation::is_complete`]).
    pub fn stats(&self) -> &NegotiationStats {
        &self.stats
    }

    /// Why the client's data did not parse, if it did not.
    pub fn error(&self) -> Option<&str> {
        match &self.state {
            State::Failed(why) => Some(why),
            _ => None,
        }
    }

    /// Whether the `done` line was read.
    pub fn is_complete(&self) -> bool {
        self.state == State::Done
    }

    /// Whether a deadline on the negotiation no longer applies: the exact
    /// [`DONE_PACKET`] passed, or the stream stopped being pkt-lines (git itself
    /// refuses it then), as Gitaly's `ReadMonitor` stops its timer.
    pub fn negotiation_over(&self) -> bool {
        self.done_packet || self.broken
    }

    /// Whether bytes still matter: for the statistics or for [`DONE_PACKET`].
    fn scanning(&self) -> bool {
        !self.broken && (self.state == State::Counting || !self.done_packet)
    }

    /// The length of the partial pkt-line once complete, as far as its header tells.
    fn wanted(&self) -> usize {
        match self.partial.first_chunk::<4>() {
            Some(h) => match decode::header(h, 0) {
                Ok(h) => h.packet_len(),
                Err(_) => 4,
            },
            None => 4,
        }
    }

    fn fail_stream(&mut self, why: String) {
        self.broken = true;
        self.partial = Vec::new();
        if self.state == State::Counting {
            self.state = State::Failed(why);
        }
    }

    fn packet(&mut self, packet: Packet<'_>, raw: &[u8]) {
        debug_assert!(raw.len() <= MAX_PKT_LEN);
        if raw == DONE_PACKET {
            self.done_packet = true;
        }
        if self.state != State::Counting {
            return;
        }
        let data = packet.data().unwrap_or_default();
        let data = data.strip_suffix(b"\n").unwrap_or(data);
        let text = String::from_utf8_lossy(data);
        self.stats.payload_size += data.len() as i64;
        match self.count(&text) {
            Ok(true) => self.state = State::Done,
            Ok(false) => self.stats.packets += 1,
            Err(why) => self.state = State::Failed(why),
        }
    }

    /// Counts one line; `Ok(true)` for the `done` line.
    fn count(&mut self, line: &str) -> Result<bool, String> {
        let words: Vec<&str> = line.split(' ').collect();
        let first = words[0];
        let n = self.stats.packets;
        if let Some(command) = first.strip_prefix("command=") {
            self.stats.command = command.to_owned();
            return Ok(false);
        }
        if let Some(agent) = first.strip_prefix("agent=") {
            self.stats.user_agent = agent.to_owned();
            return Ok(false);
        }
        let exactly_two = |what: &str| {
            if words.len() == 2 {
                Ok(())
            } else {
                Err(format!("invalid '{what}' for packet {n}: {line}"))
            }
        };
        match first {
            "want" => {
                if words.len() < 2 {
                    return Err(format!("invalid 'want' for packet {n}: {line}"));
                }
                if words.len() > 2 && !self.stats.caps.is_empty() {
                    return Err(format!(
                        "capabilities announced multiple times in packet {n}: {line}"
                    ));
                }
                self.stats.wants += 1;
                if words.len() > 2 {
                    self.stats.caps = words[2..].iter().map(|c| (*c).to_owned()).collect();
                    if let Some(agent) = words[2..].iter().find_map(|c| c.strip_prefix("agent=")) {
                        self.stats.user_agent = agent.to_owned();
                    }
                }
            }
            "shallow" => {
                exactly_two("shallow")?;
                self.stats.shallows += 1;
            }
            "deepen" | "deepen-since" | "deepen-not" => {
                exactly_two("deepen")?;
                self.stats.deepen = line.to_owned();
            }
            "filter" => {
                exactly_two("filter")?;
                self.stats.filter = words[1].to_owned();
            }
            "have" => {
                exactly_two("have")?;
                self.stats.haves += 1;
            }
            "done" => return Ok(true),
            _ => {}
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encode;

    const OID: &str = "1e292f8fedd741b75372e19097c76d327140c312";

    fn lines(parts: &[Option<&str>]) -> Vec<u8> {
        let mut out = Vec::new();
        for p in parts {
            match p {
                Some(text) => encode::data(&mut out, text.as_bytes()).unwrap(),
                None => encode::flush(&mut out),
            }
        }
        out
    }

    fn v0_clone() -> Vec<u8> {
        lines(&[
            Some(&format!(
                "want {OID} multi_ack_detailed side-band-64k thin-pack ofs-delta agent=git/2.47.0\n"
            )),
            Some(&format!("want {OID}\n")),
            Some("deepen 1\n"),
            None,
            Some(&format!("have {OID}\n")),
            Some("done\n"),
        ])
    }

    #[test]
    fn a_v0_fetch_is_counted_as_gitaly_counts_it() {
        let mut n = Negotiation::new();
        n.feed(&v0_clone());
        assert!(n.is_complete());
        assert!(n.negotiation_over());
        let s = n.stats();
        assert_eq!((s.wants, s.haves, s.shallows), (2, 1, 0));
        // Two wants, deepen, flush, have: the done line is not a packet.
        assert_eq!(s.packets, 5);
        assert_eq!(s.deepen, "deepen 1");
        assert_eq!(s.user_agent, "git/2.47.0");
        assert_eq!(
            s.caps,
            [
                "multi_ack_detailed",
                "side-band-64k",
                "thin-pack",
                "ofs-delta",
                "agent=git/2.47.0"
            ]
        );
        let payload: usize = [
            "want ".len()
                + 40
                + " multi_ack_detailed side-band-64k thin-pack ofs-delta agent=git/2.47.0".len(),
            "want ".len() + 40,
            "deepen 1".len(),
            0,
            "have ".len() + 40,
            "done".len(),
        ]
        .iter()
        .sum();
        assert_eq!(s.payload_size, payload as i64);
    }

    #[test]
    fn bytes_may_arrive_one_at_a_time() {
        let whole = v0_clone();
        let mut at_once = Negotiation::new();
        at_once.feed(&whole);
        let mut trickled = Negotiation::new();
        for b in &whole {
            trickled.feed(std::slice::from_ref(b));
        }
        assert_eq!(at_once.stats(), trickled.stats());
        assert!(trickled.negotiation_over());
        // Odd splits across headers and payloads.
        let mut split = Negotiation::new();
        for chunk in whole.chunks(7) {
            split.feed(chunk);
        }
        assert_eq!(at_once.stats(), split.stats());
    }

    #[test]
    fn a_v2_fetch_names_its_command_and_its_filter() {
        let mut data = lines(&[Some("command=fetch\n"), Some("agent=git/2.47.0\n")]);
        encode::delim(&mut data);
        data.extend(lines(&[
            Some("thin-pack\n"),
            Some(&format!("want {OID}\n")),
            Some("filter blob:none\n"),
            Some(&format!("shallow {OID}\n")),
            Some("done\n"),
        ]));
        encode::flush(&mut data);
        let mut n = Negotiation::new();
        n.feed(&data);
        let s = n.stats();
        assert_eq!(s.command, "fetch");
        assert_eq!(s.user_agent, "git/2.47.0");
        assert_eq!(s.filter, "blob:none");
        assert_eq!((s.wants, s.shallows), (1, 1));
        assert!(s.caps.is_empty(), "v2 capabilities are lines of their own");
        // command, agent, delim, thin-pack, want, filter, shallow.
        assert_eq!(s.packets, 7);
        assert!(n.is_complete());
    }

    #[test]
    fn without_done_the_negotiation_is_not_over() {
        // A fetch with nothing to fetch ends with a flush and no done.
        let mut n = Negotiation::new();
        n.feed(&lines(&[Some(&format!("want {OID} ofs-delta\n")), None]));
        n.end();
        assert!(!n.negotiation_over());
        assert!(!n.is_complete());
        assert_eq!(n.error(), None);
        assert_eq!(n.stats().packets, 2);
        // `done` without its newline ends the statistics but not the deadline's wait.
        let mut m = Negotiation::new();
        m.feed(b"0008done");
        assert!(m.is_complete());
        assert!(!m.negotiation_over());
        m.feed(DONE_PACKET);
        assert!(m.negotiation_over());
    }

    #[test]
    fn malformed_lines_stop_the_count_where_gitaly_stops() {
        let mut n = Negotiation::new();
        n.feed(&lines(&[
            Some(&format!("want {OID} a b\n")),
            Some(&format!("want {OID} c\n")),
            Some(&format!("have {OID}\n")),
        ]));
        let e = n.error().expect("second capabilities");
        assert!(
            e.contains("capabilities announced multiple times in packet 1"),
            "{e}"
        );
        assert_eq!(n.stats().wants, 1);
        assert_eq!(n.stats().haves, 0);
        // The deadline still waits for done: the stream itself is fine.
        assert!(!n.negotiation_over());
        n.feed(DONE_PACKET);
        assert!(n.negotiation_over());

        let mut bad = Negotiation::new();
        bad.feed(b"zzzzwhatever");
        assert!(bad.error().is_some());
        assert!(
            bad.negotiation_over(),
            "a broken stream disarms the deadline"
        );

        let mut cut = Negotiation::new();
        cut.feed(b"0010want");
        assert_eq!(cut.error(), None);
        cut.end();
        assert!(cut.error().unwrap().contains("inside a pkt-line"));
    }

    #[test]
    fn after_done_nothing_is_buffered() {
        let mut n = Negotiation::new();
        n.feed(&v0_clone());
        let before = n.stats().clone();
        n.feed(&vec![b'x'; 1 << 20]);
        assert_eq!(n.stats(), &before);
        assert!(n.partial.is_empty());
        assert_eq!(n.error(), None);
    }
}
