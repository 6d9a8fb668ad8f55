//! The sidechannel's client→server framing, without any I/O: git's pkt-line length
//! header without the band byte.
//!
//! A yamux stream has no half-close that both Go's `net.Conn` and our streams can
//! signal, so the client wraps what it sends in chunks: four lowercase hex digits
//! giving the chunk's length *including* those four digits, then the payload. `0000`
//! (a flush packet) means "no more data from me"; the server still writes back, raw,
//! and ends its data by closing the stream. git's other special packets (`0001`
//! delim, `0002` response-end, `0003`) mean nothing here and are refused, as is a
//! stream that ends without the flush.
//!
//! Wire bytes: `0009hello0000` is the payload `hello` followed by end-of-data.

use std::fmt;

/// git's `LARGE_PACKET_MAX`: the longest chunk, header included.
pub const MAX_CHUNK_LEN: usize = 65520;
/// The most payload one chunk carries (65516 bytes).
pub const MAX_PAYLOAD: usize = MAX_CHUNK_LEN - HEADER_LEN;
/// Bytes of the length header.
pub const HEADER_LEN: usize = 4;
/// The flush packet: the client's end of data.
pub const FLUSH: &[u8; HEADER_LEN] = b"0000";

/// What a chunk header announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// A chunk whose payload (after the header) is this many bytes; may be 0.
    Data(usize),
    /// `0000`: the client sends nothing more.
    Flush,
}

/// Why the client's bytes are not valid sidechannel framing. Gitaly refuses the same
/// inputs (`internal/grpc/sidechannel/conn.go`, `internal/git/pktline/pktline.go`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    /// Not four hex digits.
    #[error("sidechannel: invalid chunk length {0:?}")]
    BadLength(String),
    /// A length above [`MAX_CHUNK_LEN`].
    #[error("sidechannel: chunk length {0} exceeds the maximum of {MAX_CHUNK_LEN}")]
    TooLong(usize),
    /// `0001`, `0002` or `0003` (the digit is kept): git's special packets are not data.
    #[error("sidechannel: invalid header {0}")]
    SpecialPacket(char),
    /// The stream ended inside a header or payload.
    #[error("sidechannel: the stream ended inside a chunk ({missing} bytes missing)")]
    Truncated { missing: usize },
    /// The stream ended where a chunk could start, without the `0000` that ends the data.
    #[error("sidechannel: the client closed the stream without ending its data (no 0000 flush)")]
    NoFlush,
}

/// Parses a chunk header.
pub fn parse_header(header: [u8; HEADER_LEN]) -> Result<Header, FramingError> {
    let mut len = 0usize;
    for b in header {
        let digit = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            b'A'..=b'F' => b - b'A' + 10,
            _ => {
                return Err(FramingError::BadLength(
                    String::from_utf8_lossy(&header).into_owned(),
                ));
            }
        };
        len = len * 16 + digit as usize;
    }
    match len {
        0 => Ok(Header::Flush),
        1..=3 => Err(FramingError::SpecialPacket(header[3] as char)),
        n if n > MAX_CHUNK_LEN => Err(FramingError::TooLong(n)),
        n => Ok(Header::Data(n - HEADER_LEN)),
    }
}

/// The header of a chunk carrying `payload` bytes (at most [`MAX_PAYLOAD`]).
pub fn encode_header(payload: usize) -> [u8; HEADER_LEN] {
    assert!(
        payload <= MAX_PAYLOAD,
        "a chunk carries at most {MAX_PAYLOAD} bytes"
    );
    let len = payload + HEADER_LEN;
    const HEX: &[u8; 16] = b"0123456789abcdef";
    [
        HEX[(len >> 12) & 0xf],
        HEX[(len >> 8) & 0xf],
        HEX[(len >> 4) & 0xf],
        HEX[len & 0xf],
    ]
}

/// Where a reader is inside the framed stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadState {
    /// Expecting a header; this many of its bytes are already in.
    Header {
        filled: usize,
        bytes: [u8; HEADER_LEN],
    },
    /// Inside a chunk's payload: this many bytes are still to come.
    Payload { remaining: usize },
    /// The flush arrived: end of data.
    Done,
    /// The framing broke; every later read reports this.
    Failed(FramingError),
}

impl Default for ReadState {
    fn default() -> Self {
        ReadState::Header {
            filled: 0,
            bytes: [0; HEADER_LEN],
        }
    }
}

impl ReadState {
    /// Takes header bytes from `input` (as many as the header still needs) and returns
    /// how many it took. A complete header moves to the next state.
    pub fn feed_header(&mut self, input: &[u8]) -> usize {
        let ReadState::Header { filled, bytes } = self else {
            return 0;
        };
        let take = (HEADER_LEN - *filled).min(input.len());
        bytes[*filled..*filled + take].copy_from_slice(&input[..take]);
        *filled += take;
        if *filled == HEADER_LEN {
            *self = match parse_header(*bytes) {
                Ok(Header::Flush) => ReadState::Done,
                Ok(Header::Data(n)) => ReadState::Payload { remaining: n },
                Err(e) => ReadState::Failed(e),
            };
            if let ReadState::Payload { remaining: 0 } = self {
                *self = ReadState::default();
            }
        }
        take
    }

    /// Accounts for `n` payload bytes handed to the reader.
    pub fn consumed_payload(&mut self, n: usize) {
        if let ReadState::Payload { remaining } = self {
            *remaining -= n;
            if *remaining == 0 {
                *self = ReadState::default();
            }
        }
    }

    /// The stream ended (EOF) in this state: the error it is, if any.
    pub fn at_eof(&mut self) -> Option<FramingError> {
        let e = match self {
            ReadState::Done => return None,
            ReadState::Failed(e) => return Some(e.clone()),
            ReadState::Header { filled: 0, .. } => FramingError::NoFlush,
            ReadState::Header { filled, .. } => FramingError::Truncated {
                missing: HEADER_LEN - *filled,
            },
            ReadState::Payload { remaining } => FramingError::Truncated {
                missing: *remaining,
            },
        };
        *self = ReadState::Failed(e.clone());
        Some(e)
    }
}

impl fmt::Display for Header {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Header::Data(n) => write!(f, "{n} payload bytes"),
            Header::Flush => f.write_str("flush"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_parse_like_gitaly() {
        assert_eq!(parse_header(*b"0009"), Ok(Header::Data(5)));
        assert_eq!(parse_header(*b"0004"), Ok(Header::Data(0)));
        assert_eq!(parse_header(*b"0000"), Ok(Header::Flush));
        assert_eq!(parse_header(*b"fff0"), Ok(Header::Data(MAX_PAYLOAD)));
        assert_eq!(parse_header(*b"FFF0"), Ok(Header::Data(MAX_PAYLOAD)));
        assert_eq!(parse_header(*b"fff1"), Err(FramingError::TooLong(65521)));
        for (h, d) in [(*b"0001", '1'), (*b"0002", '2'), (*b"0003", '3')] {
            let e = parse_header(h).unwrap_err();
            assert_eq!(e, FramingError::SpecialPacket(d));
        }
        // Gitaly's message for a special packet names its last digit.
        assert_eq!(
            parse_header(*b"0001").unwrap_err().to_string(),
            "sidechannel: invalid header 1"
        );
        assert!(matches!(
            parse_header(*b"+00a"),
            Err(FramingError::BadLength(_))
        ));
        assert!(matches!(
            parse_header(*b"PACK"),
            Err(FramingError::BadLength(_))
        ));
    }

    #[test]
    fn headers_encode_lowercase_with_their_own_length() {
        assert_eq!(&encode_header(5), b"0009");
        assert_eq!(&encode_header(0), b"0004");
        assert_eq!(&encode_header(MAX_PAYLOAD), b"fff0");
        assert_eq!(&encode_header(0x1234 - 4), b"1234");
        for n in [0, 1, 9, 10, 255, 4096, MAX_PAYLOAD] {
            assert_eq!(parse_header(encode_header(n)), Ok(Header::Data(n)));
        }
    }

    #[test]
    #[should_panic]
    fn oversized_chunks_are_a_bug() {
        encode_header(MAX_PAYLOAD + 1);
    }

    /// Runs the reader state machine over `wire` in pieces of `step` bytes and
    /// returns the payload bytes and how the stream ended.
    fn decode(wire: &[u8], step: usize) -> (Vec<u8>, Option<FramingError>) {
        let mut st = ReadState::default();
        let mut out = Vec::new();
        let mut rest = wire;
        while !rest.is_empty() {
            let piece = &rest[..step.min(rest.len())];
            let used = match &st {
                ReadState::Header { .. } => st.feed_header(piece),
                ReadState::Payload { remaining } => {
                    let n = (*remaining).min(piece.len());
                    out.extend_from_slice(&piece[..n]);
                    st.consumed_payload(n);
                    n
                }
                ReadState::Done => return (out, None),
                ReadState::Failed(e) => return (out, Some(e.clone())),
            };
            rest = &rest[used..];
        }
        match &st {
            ReadState::Done => (out, None),
            ReadState::Failed(e) => (out, Some(e.clone())),
            _ => {
                let e = st.at_eof();
                (out, e)
            }
        }
    }

    #[test]
    fn the_state_machine_reassembles_any_split() {
        let wire = b"0009hello00040009world0000";
        for step in 1..wire.len() {
            assert_eq!(
                decode(wire, step),
                (b"helloworld".to_vec(), None),
                "step {step}"
            );
        }
    }

    #[test]
    fn endings_without_a_flush_are_errors() {
        assert_eq!(
            decode(b"0009hello", 3),
            (b"hello".to_vec(), Some(FramingError::NoFlush))
        );
        assert_eq!(decode(b"", 3).1, Some(FramingError::NoFlush));
        assert_eq!(
            decode(b"0009hel", 2),
            (
                b"hel".to_vec(),
                Some(FramingError::Truncated { missing: 2 })
            )
        );
        assert_eq!(
            decode(b"0009hello00", 4).1,
            Some(FramingError::Truncated { missing: 2 })
        );
        assert_eq!(
            decode(b"0009hello0002", 4),
            (b"hello".to_vec(), Some(FramingError::SpecialPacket('2')))
        );
    }

    #[test]
    fn a_failed_state_stays_failed() {
        let mut st = ReadState::default();
        st.feed_header(b"zzzz");
        assert!(matches!(st, ReadState::Failed(FramingError::BadLength(_))));
        assert_eq!(st.feed_header(b"0000"), 0);
        assert!(matches!(st.at_eof(), Some(FramingError::BadLength(_))));
        let mut done = ReadState::default();
        done.feed_header(b"0000");
        assert_eq!(done, ReadState::Done);
        assert_eq!(done.at_eof(), None);
    }
}
