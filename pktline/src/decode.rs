//! Reading pkt-lines out of a buffer: one header, one packet, or every packet in turn.
//! Offsets in errors count bytes from the start of the input the caller has in hand.

use crate::encode::{self, EncodeError};
use crate::{HEADER_LEN, MAX_PKT_LEN};

/// A pkt-line header, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    Flush,
    Delim,
    ResponseEnd,
    /// A data pkt-line with this many payload bytes.
    Data(usize),
}

impl Header {
    /// The packet's length on the wire, its header included.
    pub fn packet_len(self) -> usize {
        match self {
            Header::Data(len) => HEADER_LEN + len,
            Header::Flush | Header::Delim | Header::ResponseEnd => HEADER_LEN,
        }
    }

    /// What git calls it: `flush`, `delim`, `response-end` or `data`.
    pub fn kind(self) -> &'static str {
        match self {
            Header::Flush => "flush",
            Header::Delim => "delim",
            Header::ResponseEnd => "response-end",
            Header::Data(_) => "data",
        }
    }
}

/// One decoded pkt-line, borrowing its payload from the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packet<'a> {
    Flush,
    Delim,
    ResponseEnd,
    Data(&'a [u8]),
}

impl<'a> Packet<'a> {
    /// The payload of a data packet.
    pub fn data(self) -> Option<&'a [u8]> {
        match self {
            Packet::Data(d) => Some(d),
            _ => None,
        }
    }

    /// The payload of a data packet without one trailing newline, as git reads a text
    /// line.
    pub fn line(self) -> Option<&'a [u8]> {
        self.data().map(|d| d.strip_suffix(b"\n").unwrap_or(d))
    }

    /// Appends the packet as it goes on the wire.
    pub fn encode(self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        match self {
            Packet::Flush => encode::flush(out),
            Packet::Delim => encode::delim(out),
            Packet::ResponseEnd => encode::response_end(out),
            Packet::Data(d) => encode::data(out, d)?,
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("bad pkt-line length {header:?} at byte {at}: expected 4 hex digits")]
    BadLength { at: usize, header: String },
    #[error("pkt-line length {len} at byte {at} is shorter than its own 4-byte header")]
    LengthTooShort { at: usize, len: usize },
    #[error("pkt-line length {len} at byte {at} exceeds git's maximum of {MAX_PKT_LEN}")]
    LengthTooLong { at: usize, len: usize },
    #[error("the input ends inside the pkt-line at byte {at}")]
    Truncated { at: usize },
}

impl DecodeError {
    /// Where the offending pkt-line starts.
    pub fn at(&self) -> usize {
        match self {
            DecodeError::BadLength { at, .. }
            | DecodeError::LengthTooShort { at, .. }
            | DecodeError::LengthTooLong { at, .. }
            | DecodeError::Truncated { at } => *at,
        }
    }

    fn shifted(mut self, by: usize) -> DecodeError {
        match &mut self {
            DecodeError::BadLength { at, .. }
            | DecodeError::LengthTooShort { at, .. }
            | DecodeError::LengthTooLong { at, .. }
            | DecodeError::Truncated { at } => *at += by,
        }
        self
    }
}

/// Decodes the header `h`, found at byte `at` of the input (for the error). Hex digits
/// may be either case, as git accepts them.
pub fn header(h: &[u8; 4], at: usize) -> Result<Header, DecodeError> {
    let mut len = 0usize;
    for &b in h {
        let digit = (b as char)
            .to_digit(16)
            .ok_or_else(|| DecodeError::BadLength {
                at,
                header: String::from_utf8_lossy(h).into_owned(),
            })?;
        len = len * 16 + digit as usize;
    }
    match len {
        0 => Ok(Header::Flush),
        1 => Ok(Header::Delim),
        2 => Ok(Header::ResponseEnd),
        3 => Err(DecodeError::LengthTooShort { at, len }),
        n if n > MAX_PKT_LEN => Err(DecodeError::LengthTooLong { at, len }),
        n => Ok(Header::Data(n - HEADER_LEN)),
    }
}

/// The packet at the start of `buf` and how many bytes it takes; `None` while `buf`
/// holds less than the whole packet (read more and try again).
pub fn packet(buf: &[u8]) -> Result<Option<(Packet<'_>, usize)>, DecodeError> {
    let Some(h) = buf.first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    let parsed = header(h, 0)?;
    let len = parsed.packet_len();
    let packet = match parsed {
        Header::Flush => Packet::Flush,
        Header::Delim => Packet::Delim,
        Header::ResponseEnd => Packet::ResponseEnd,
        Header::Data(_) => match buf.get(HEADER_LEN..len) {
            Some(payload) => Packet::Data(payload),
            None => return Ok(None),
        },
    };
    Ok(Some((packet, len)))
}

/// Every packet of `buf`, in order.
pub fn packets(buf: &[u8]) -> Packets<'_> {
    Packets {
        buf,
        at: 0,
        failed: false,
    }
}

/// The iterator [`packets`] returns. It ends at the end of the input; input that ends
/// inside a packet, or a malformed header, yields one error and then nothing.
#[derive(Debug, Clone)]
pub struct Packets<'a> {
    buf: &'a [u8],
    at: usize,
    failed: bool,
}

impl<'a> Packets<'a> {
    /// Bytes of the input taken by the packets returned so far.
    pub fn offset(&self) -> usize {
        self.at
    }

    /// The input after the packets returned so far.
    pub fn rest(&self) -> &'a [u8] {
        &self.buf[self.at..]
    }
}

impl<'a> Iterator for Packets<'a> {
    type Item = Result<Packet<'a>, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        let rest = self.rest();
        if self.failed || rest.is_empty() {
            return None;
        }
        let at = self.at;
        let result = match packet(rest) {
            Ok(Some((packet, len))) => {
                self.at += len;
                return Some(Ok(packet));
            }
            Ok(None) => DecodeError::Truncated { at },
            Err(e) => e.shifted(at),
        };
        self.failed = true;
        Some(Err(result))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{MAX_DATA_LEN, encode};

    #[test]
    fn headers() {
        assert_eq!(header(b"0000", 0).unwrap(), Header::Flush);
        assert_eq!(header(b"0001", 0).unwrap(), Header::Delim);
        assert_eq!(header(b"0002", 0).unwrap(), Header::ResponseEnd);
        assert_eq!(header(b"0004", 0).unwrap(), Header::Data(0));
        assert_eq!(header(b"00aF", 0).unwrap(), Header::Data(0xaf - 4));
        assert_eq!(header(b"fff0", 0).unwrap(), Header::Data(MAX_PKT_LEN - 4));
        assert!(matches!(
            header(b"fff1", 9),
            Err(DecodeError::LengthTooLong { at: 9, len: 0xfff1 })
        ));
        assert!(matches!(
            header(b"0003", 0),
            Err(DecodeError::LengthTooShort { len: 3, .. })
        ));
        assert!(matches!(
            header(b"00g4", 0),
            Err(DecodeError::BadLength { .. })
        ));
        assert!(matches!(
            header(b" 004", 0),
            Err(DecodeError::BadLength { .. })
        ));
        assert!(matches!(
            header(b"+004", 0),
            Err(DecodeError::BadLength { .. })
        ));
    }

    #[test]
    fn special_packets_and_data() {
        let all: Vec<_> = packets(b"0000000100020004000ahello\n")
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            all,
            [
                Packet::Flush,
                Packet::Delim,
                Packet::ResponseEnd,
                Packet::Data(b""),
                Packet::Data(b"hello\n"),
            ]
        );
        assert_eq!(all[4].line(), Some(&b"hello"[..]));
        assert_eq!(all[0].data(), None);
        // Only one newline is chomped.
        assert_eq!(Packet::Data(b"a\n\n").line(), Some(&b"a\n"[..]));
    }

    #[test]
    fn incomplete_input_asks_for_more() {
        assert_eq!(packet(b""), Ok(None));
        assert_eq!(packet(b"00"), Ok(None));
        assert_eq!(packet(b"0009don"), Ok(None));
        assert_eq!(
            packet(b"0009done\nrest"),
            Ok(Some((Packet::Data(b"done\n"), 9)))
        );
        assert_eq!(packet(b"0000rest"), Ok(Some((Packet::Flush, 4))));
        // A bad header is an error at once, before the payload arrives.
        assert!(matches!(packet(b"zz"), Ok(None)));
        assert!(matches!(
            packet(b"zzzz"),
            Err(DecodeError::BadLength { at: 0, .. })
        ));
    }

    #[test]
    fn errors_name_where_the_packet_starts() {
        let mut it = packets(b"0006ab0005x00");
        assert_eq!(it.next(), Some(Ok(Packet::Data(b"ab"))));
        assert_eq!(it.next(), Some(Ok(Packet::Data(b"x"))));
        assert_eq!(it.offset(), 11);
        assert_eq!(it.rest(), b"00");
        assert_eq!(it.next(), Some(Err(DecodeError::Truncated { at: 11 })));
        assert_eq!(it.next(), None);

        let errs: Vec<_> = packets(b"0000ffff0000").collect();
        assert_eq!(
            errs,
            [
                Ok(Packet::Flush),
                Err(DecodeError::LengthTooLong { at: 4, len: 0xffff })
            ]
        );
        let e = packets(b"0005x0003").nth(1).unwrap().unwrap_err();
        assert_eq!(e, DecodeError::LengthTooShort { at: 5, len: 3 });
        assert_eq!(e.at(), 5);
        assert_eq!(
            e.to_string(),
            "pkt-line length 3 at byte 5 is shorter than its own 4-byte header"
        );
        // A header promising more than the input holds.
        let e = packets(b"0010short").next().unwrap().unwrap_err();
        assert_eq!(e, DecodeError::Truncated { at: 0 });
    }

    #[test]
    fn the_largest_packet_decodes() {
        let payload = vec![7u8; MAX_DATA_LEN];
        let wire = encode::to_vec(&payload).unwrap();
        assert_eq!(&wire[..4], b"fff0");
        let (p, len) = packet(&wire).unwrap().unwrap();
        assert_eq!((p, len), (Packet::Data(&payload[..]), MAX_PKT_LEN));
        assert_eq!(packet(&wire[..wire.len() - 1]), Ok(None));
    }

    /// Cheap property test: any sequence of packets encodes and decodes back to itself,
    /// and every cut of the encoding is either incomplete or a prefix of it.
    #[test]
    fn round_trips() {
        // A small deterministic generator, so a failure reproduces.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..200 {
            let count = (next() % 8) as usize;
            let mut owned: Vec<Option<Vec<u8>>> = Vec::new();
            for _ in 0..count {
                owned.push(match next() % 5 {
                    0 => None,
                    n => {
                        // Mostly short payloads, now and then one near the maximum.
                        let len = match n {
                            1 => MAX_DATA_LEN - (next() % 3) as usize,
                            _ => (next() % 70) as usize,
                        };
                        Some((0..len).map(|_| next() as u8).collect())
                    }
                });
            }
            let want: Vec<Packet> = owned
                .iter()
                .map(|o| match o {
                    None => Packet::Flush,
                    Some(d) => Packet::Data(d),
                })
                .collect();
            let mut wire = Vec::new();
            for p in &want {
                p.encode(&mut wire).unwrap();
            }
            let got: Vec<_> = packets(&wire).collect::<Result<_, _>>().unwrap();
            assert_eq!(got, want);
            // Cut anywhere: whatever decodes is a prefix, and the rest is only truncated.
            let cut = (next() as usize) % (wire.len() + 1);
            let mut it = packets(&wire[..cut]);
            let mut n = 0;
            for item in it.by_ref() {
                match item {
                    Ok(p) => {
                        assert_eq!(p, want[n]);
                        n += 1;
                    }
                    Err(e) => assert!(matches!(e, DecodeError::Truncated { .. }), "{e}"),
                }
            }
        }
    }
}
