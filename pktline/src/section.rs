//! Reading a receive-pack request's command section (protocol v0/v1): data pkt-lines
//! up to a flush, nothing else, within [`Limits`]. [`SectionReader`] takes the bytes as
//! they arrive and never takes one past the section's flush, so whatever follows
//! (push options, the packfile) stays with the caller, untouched.

use crate::decode::{self, DecodeError, Header, Packet};
use crate::{HEADER_LEN, MAX_PKT_LEN};

/// How much of a command section we are willing to hold in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of the command section, pkt-line headers and the flush included.
    pub max_section_bytes: usize,
    /// pkt-lines in the command section: commands, shallow lines, certificate lines.
    pub max_lines: usize,
}

impl Default for Limits {
    fn default() -> Self {
        // A push of 100k refs is already far beyond what anyone does by hand; each
        // command line is at most ~4 + 2*65 + a ref name, so 8 MiB fits it.
        Limits {
            max_section_bytes: 8 << 20,
            max_lines: 100_000,
        }
    }
}

/// Why a push's command section was refused (or could not be moved).
#[derive(Debug, thiserror::Error)]
pub enum PktError {
    #[error("reading the push request")]
    Read(#[source] std::io::Error),
    #[error("writing the push request to git")]
    Write(#[source] std::io::Error),
    #[error("bad pkt-line length {header:?} at byte {at}: expected 4 hex digits")]
    BadLength { at: usize, header: String },
    #[error("pkt-line length {len} at byte {at} is shorter than its own 4-byte header")]
    LengthTooShort { at: usize, len: usize },
    #[error("pkt-line length {len} at byte {at} exceeds git's maximum of {MAX_PKT_LEN}")]
    LengthTooLong { at: usize, len: usize },
    #[error("push request ends inside the pkt-line at byte {at}")]
    Truncated { at: usize },
    #[error("push request ends at byte {at} before the flush-pkt closing its command section")]
    MissingFlush { at: usize },
    #[error("unexpected {kind} pkt at byte {at} in the command section (a v0/v1 push sends none)")]
    UnexpectedSpecial { at: usize, kind: &'static str },
    #[error(
        "pkt-line {index} of the command section is not '<old> <new> <ref>' or 'shallow <oid>'"
    )]
    BadCommand { index: usize },
    #[error("pkt-line {index} carries capabilities; a push sends them on its first command only")]
    MisplacedCapabilities { index: usize },
    #[error("command section is larger than the limit of {limit} bytes")]
    SectionTooLarge { limit: usize },
    #[error("command section has more than the limit of {limit} pkt-lines")]
    TooManyLines { limit: usize },
    #[error("{extra} bytes follow the command section's flush-pkt")]
    TrailingBytes { extra: usize },
}

impl From<DecodeError> for PktError {
    fn from(e: DecodeError) -> PktError {
        match e {
            DecodeError::BadLength { at, header } => PktError::BadLength { at, header },
            DecodeError::LengthTooShort { at, len } => PktError::LengthTooShort { at, len },
            DecodeError::LengthTooLong { at, len } => PktError::LengthTooLong { at, len },
            DecodeError::Truncated { at } => PktError::Truncated { at },
        }
    }
}

/// A delim or response-end packet in a command section: git's receive-pack would take
/// either as the end of the commands; no client sends them in v0/v1, so refuse rather
/// than guess what the sender meant.
pub(crate) fn refuse_special(header: Header, at: usize) -> Result<(), PktError> {
    match header {
        Header::Delim | Header::ResponseEnd => Err(PktError::UnexpectedSpecial {
            at,
            kind: header.kind(),
        }),
        Header::Flush | Header::Data(_) => Ok(()),
    }
}

/// How long `buf`'s command section is, its flush included: `Some` once the flush is
/// in `buf`, `None` while more is needed. Checks the framing only (no limits, no
/// command syntax): for a caller deciding how far to read ahead.
pub fn section_end(buf: &[u8]) -> Result<Option<usize>, PktError> {
    let mut packets = decode::packets(buf);
    loop {
        let at = packets.offset();
        match packets.next() {
            None | Some(Err(DecodeError::Truncated { .. })) => return Ok(None),
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(Packet::Flush)) => return Ok(Some(packets.offset())),
            Some(Ok(Packet::Data(_))) => {}
            Some(Ok(Packet::Delim)) => refuse_special(Header::Delim, at)?,
            Some(Ok(Packet::ResponseEnd)) => refuse_special(Header::ResponseEnd, at)?,
        }
    }
}

/// Reads a command section incrementally, checking its framing and the [`Limits`]
/// before holding anything: a hostile length is refused on its header alone.
///
/// Feed it what arrives ([`SectionReader::feed`]); it takes at most [`wants`] bytes at a
/// time and nothing past the flush. When the input ends, [`finish`] hands over the
/// section. After an error the reader takes nothing more and `finish` fails.
///
/// [`wants`]: SectionReader::wants
/// [`finish`]: SectionReader::finish
#[derive(Debug, Clone)]
pub struct SectionReader {
    limits: Limits,
    section: Vec<u8>,
    lines: usize,
    state: State,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Inside a header: `got` of its bytes are in `header`.
    Header {
        header: [u8; 4],
        got: usize,
    },
    /// Inside the payload of the data packet starting at `at`; `left` bytes to come.
    Payload {
        at: usize,
        left: usize,
    },
    Complete,
    Failed {
        at: usize,
    },
}

impl SectionReader {
    pub fn new(limits: Limits) -> SectionReader {
        SectionReader {
            limits,
            section: Vec::new(),
            lines: 0,
            state: State::Header {
                header: [0; 4],
                got: 0,
            },
        }
    }

    /// How many bytes the reader takes next before it decides anything (the rest of a
    /// header or of a payload); 0 once the section is complete or refused.
    pub fn wants(&self) -> usize {
        match self.state {
            State::Header { got, .. } => HEADER_LEN - got,
            State::Payload { left, .. } => left,
            State::Complete | State::Failed { .. } => 0,
        }
    }

    /// The section's flush has been read.
    pub fn is_complete(&self) -> bool {
        self.state == State::Complete
    }

    /// Takes bytes from the start of `input` — as many as the section still needs, never
    /// one past its flush — and returns how many it took.
    pub fn feed(&mut self, mut input: &[u8]) -> Result<usize, PktError> {
        let mut taken = 0;
        while !input.is_empty() {
            let n = match &mut self.state {
                State::Header { header, got } => {
                    let n = (HEADER_LEN - *got).min(input.len());
                    header[*got..*got + n].copy_from_slice(&input[..n]);
                    *got += n;
                    if *got == HEADER_LEN {
                        let (header, at) = (*header, self.section.len());
                        if let Err(e) = self.header(header) {
                            self.state = State::Failed { at };
                            return Err(e);
                        }
                    }
                    n
                }
                State::Payload { left, .. } => {
                    let n = (*left).min(input.len());
                    self.section.extend_from_slice(&input[..n]);
                    *left -= n;
                    if *left == 0 {
                        self.state = State::Header {
                            header: [0; 4],
                            got: 0,
                        };
                    }
                    n
                }
                State::Complete | State::Failed { .. } => break,
            };
            taken += n;
            input = &input[n..];
        }
        Ok(taken)
    }

    /// A whole header arrived.
    fn header(&mut self, header: [u8; 4]) -> Result<(), PktError> {
        let at = self.section.len();
        let parsed = decode::header(&header, at)?;
        refuse_special(parsed, at)?;
        // Checked before holding anything, so a hostile length cannot make us hold more.
        if at + parsed.packet_len() > self.limits.max_section_bytes {
            return Err(PktError::SectionTooLarge {
                limit: self.limits.max_section_bytes,
            });
        }
        self.section.extend_from_slice(&header);
        let Header::Data(len) = parsed else {
            self.state = State::Complete;
            return Ok(());
        };
        self.lines += 1;
        if self.lines > self.limits.max_lines {
            return Err(PktError::TooManyLines {
                limit: self.limits.max_lines,
            });
        }
        self.section.reserve(len);
        self.state = if len == 0 {
            State::Header {
                header: [0; 4],
                got: 0,
            }
        } else {
            State::Payload { at, left: len }
        };
        Ok(())
    }

    /// The input ended: the section, its flush included. An input that ended before its
    /// first byte is an empty request (a client that only wanted the advertisement) and
    /// yields an empty section.
    pub fn finish(self) -> Result<Vec<u8>, PktError> {
        match self.state {
            State::Complete => Ok(self.section),
            State::Header { got: 0, .. } if self.section.is_empty() => Ok(self.section),
            State::Header { got: 0, .. } => Err(PktError::MissingFlush {
                at: self.section.len(),
            }),
            State::Header { .. } => Err(PktError::Truncated {
                at: self.section.len(),
            }),
            State::Payload { at, .. } | State::Failed { at } => Err(PktError::Truncated { at }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encode;

    fn pkt(s: &str) -> Vec<u8> {
        encode::to_vec(s.as_bytes()).unwrap()
    }

    fn read_all(input: &[u8], limits: Limits, step: usize) -> Result<(Vec<u8>, usize), PktError> {
        let mut r = SectionReader::new(limits);
        let mut at = 0;
        while at < input.len() && !r.is_complete() {
            let end = (at + step).min(input.len());
            at += r.feed(&input[at..end])?;
        }
        Ok((r.finish()?, at))
    }

    #[test]
    fn takes_the_section_and_nothing_after_it() {
        let section = [pkt("a"), pkt("bb"), encode::FLUSH.to_vec()].concat();
        let input = [section.clone(), b"PACK0000".to_vec()].concat();
        for step in [1, 2, 3, 5, 7, input.len()] {
            let (got, taken) = read_all(&input, Limits::default(), step).unwrap();
            assert_eq!(got, section, "step {step}");
            assert_eq!(taken, section.len(), "step {step}");
        }
        let mut r = SectionReader::new(Limits::default());
        assert_eq!(r.wants(), 4);
        assert_eq!(r.feed(b"00").unwrap(), 2);
        assert_eq!(r.wants(), 2);
        assert_eq!(r.feed(b"09do").unwrap(), 4);
        assert_eq!(r.wants(), 3);
        assert_eq!(r.feed(b"ne\n00").unwrap(), 5);
        assert_eq!(r.feed(b"00+").unwrap(), 2);
        assert!(r.is_complete());
        assert_eq!(r.wants(), 0);
        assert_eq!(r.feed(b"more").unwrap(), 0);
        assert_eq!(r.finish().unwrap(), b"0009done\n0000");
    }

    #[test]
    fn where_the_input_ends_decides_the_error() {
        let finish = |input: &[u8]| {
            let mut r = SectionReader::new(Limits::default());
            r.feed(input).unwrap();
            r.finish()
        };
        assert_eq!(finish(b"").unwrap(), b"");
        assert!(matches!(finish(b"00"), Err(PktError::Truncated { at: 0 })));
        assert!(matches!(
            finish(b"0006a"),
            Err(PktError::Truncated { at: 0 })
        ));
        assert!(matches!(
            finish(b"0006ab"),
            Err(PktError::MissingFlush { at: 6 })
        ));
        assert!(matches!(
            finish(b"0006ab00"),
            Err(PktError::Truncated { at: 6 })
        ));
        // An empty data line is a line.
        assert_eq!(finish(b"00040000").unwrap(), b"00040000");
    }

    #[test]
    fn refuses_bad_framing_and_stays_refused() {
        let mut r = SectionReader::new(Limits::default());
        assert!(matches!(
            r.feed(b"0006ab0001"),
            Err(PktError::UnexpectedSpecial {
                at: 6,
                kind: "delim"
            })
        ));
        assert_eq!(r.wants(), 0);
        assert_eq!(r.feed(b"0000").unwrap(), 0);
        assert!(matches!(r.finish(), Err(PktError::Truncated { at: 6 })));
        let mut r = SectionReader::new(Limits::default());
        assert!(matches!(
            r.feed(b"0002"),
            Err(PktError::UnexpectedSpecial {
                kind: "response-end",
                ..
            })
        ));
        let mut r = SectionReader::new(Limits::default());
        assert!(matches!(
            r.feed(b"fff1"),
            Err(PktError::LengthTooLong { .. })
        ));
        let mut r = SectionReader::new(Limits::default());
        assert!(matches!(
            r.feed(b"x000"),
            Err(PktError::BadLength { at: 0, .. })
        ));
    }

    #[test]
    fn limits_count_headers_and_lines() {
        let lines = [pkt("one"), pkt("two"), encode::FLUSH.to_vec()].concat();
        let exact = Limits {
            max_section_bytes: lines.len(),
            max_lines: 2,
        };
        assert_eq!(read_all(&lines, exact, 3).unwrap().0, lines);
        let short = Limits {
            max_section_bytes: lines.len() - 1,
            ..exact
        };
        assert!(matches!(
            read_all(&lines, short, 3),
            Err(PktError::SectionTooLarge { .. })
        ));
        let few = Limits {
            max_lines: 1,
            ..exact
        };
        assert!(matches!(
            read_all(&lines, few, 100),
            Err(PktError::TooManyLines { limit: 1 })
        ));
    }

    #[test]
    fn section_end_says_how_far_to_read() {
        let section = [pkt("a"), pkt("b"), encode::FLUSH.to_vec()].concat();
        let input = [section.clone(), b"PACK".to_vec()].concat();
        assert_eq!(section_end(&input).unwrap(), Some(section.len()));
        for cut in 0..section.len() {
            assert_eq!(section_end(&input[..cut]).unwrap(), None, "cut {cut}");
        }
        assert!(matches!(
            section_end(b"0005a0001"),
            Err(PktError::UnexpectedSpecial {
                at: 5,
                kind: "delim"
            })
        ));
        assert!(matches!(
            section_end(b"0005azzzz"),
            Err(PktError::BadLength { at: 5, .. })
        ));
    }
}
