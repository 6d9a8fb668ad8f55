//! Side-band multiplexing: when a client asks for `side-band` or `side-band-64k`, each
//! pkt-line of the answer starts with a band byte — 1 the data (a pack, a report),
//! 2 progress text the client prints as `remote: …`, 3 a fatal error — and the answer
//! ends with a flush.

use crate::decode::{self, DecodeError, Packet};
use crate::encode;

/// The band a side-band packet travels on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Band {
    Data = 1,
    Progress = 2,
    Error = 3,
}

impl Band {
    pub fn from_byte(b: u8) -> Option<Band> {
        match b {
            1 => Some(Band::Data),
            2 => Some(Band::Progress),
            3 => Some(Band::Error),
            _ => None,
        }
    }
}

/// Which side-band the client negotiated; they differ only in the largest packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SideBand {
    /// `side-band`: packets of at most 1000 bytes.
    Small,
    /// `side-band-64k`: packets of at most [`crate::MAX_PKT_LEN`] bytes.
    Large,
}

impl SideBand {
    /// The capability's name.
    pub fn capability(self) -> &'static str {
        match self {
            SideBand::Small => "side-band",
            SideBand::Large => "side-band-64k",
        }
    }

    /// The largest packet, its header and band byte included.
    pub fn max_packet_len(self) -> usize {
        match self {
            SideBand::Small => 1000,
            SideBand::Large => crate::MAX_PKT_LEN,
        }
    }

    /// The most bytes of a band one packet carries.
    pub fn max_chunk(self) -> usize {
        self.max_packet_len() - crate::HEADER_LEN - 1
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SideBandError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("side-band pkt-line at byte {at} is empty: it has no band byte")]
    Empty { at: usize },
    #[error("side-band pkt-line at byte {at} is on band {band}; only 1, 2 and 3 exist")]
    UnknownBand { at: usize, band: u8 },
    #[error("{kind} pkt at byte {at} inside a side-band answer")]
    Unexpected { at: usize, kind: &'static str },
}

/// Appends `bytes` on `band`, split into as many packets as `side_band` needs. Empty
/// `bytes` write nothing.
pub fn write(out: &mut Vec<u8>, side_band: SideBand, band: Band, bytes: &[u8]) {
    for chunk in bytes.chunks(side_band.max_chunk()) {
        encode::parts(out, &[&[band as u8], chunk])
            .expect("a chunk within the side-band's maximum fits a pkt-line");
    }
}

/// The band and the bytes of one side-band packet's payload.
pub fn split(payload: &[u8]) -> Option<(Band, &[u8])> {
    let (&band, rest) = payload.split_first()?;
    Some((Band::from_byte(band)?, rest))
}

/// An answer taken apart, each band's bytes joined.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Demuxed {
    pub data: Vec<u8>,
    pub progress: Vec<u8>,
    pub error: Vec<u8>,
    /// Bytes of the input up to and including the closing flush, if there was one.
    pub end: Option<usize>,
}

/// Takes apart a side-band answer up to its flush (or the end of the input). For
/// reading what a server sent: tests, and whoever relays an answer.
pub fn demux(buf: &[u8]) -> Result<Demuxed, SideBandError> {
    let mut out = Demuxed::default();
    let mut packets = decode::packets(buf);
    loop {
        let at = packets.offset();
        let Some(packet) = packets.next() else {
            return Ok(out);
        };
        match packet? {
            Packet::Flush => {
                out.end = Some(packets.offset());
                return Ok(out);
            }
            Packet::Data(payload) => {
                let (&band, bytes) = payload.split_first().ok_or(SideBandError::Empty { at })?;
                let into = match Band::from_byte(band) {
                    Some(Band::Data) => &mut out.data,
                    Some(Band::Progress) => &mut out.progress,
                    Some(Band::Error) => &mut out.error,
                    None => return Err(SideBandError::UnknownBand { at, band }),
                };
                into.extend_from_slice(bytes);
            }
            p @ (Packet::Delim | Packet::ResponseEnd) => {
                let kind = if p == Packet::Delim {
                    "delim"
                } else {
                    "response-end"
                };
                return Err(SideBandError::Unexpected { at, kind });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MAX_PKT_LEN;

    #[test]
    fn bands_are_split_at_the_negotiated_size() {
        let big: Vec<u8> = (0..2500u32).map(|i| i as u8).collect();
        let mut out = Vec::new();
        write(&mut out, SideBand::Small, Band::Data, &big);
        // 995 bytes per packet: three packets, the last one short.
        let lens: Vec<usize> = decode::packets(&out)
            .map(|p| p.unwrap().data().unwrap().len())
            .collect();
        assert_eq!(lens, [1000 - 4, 1000 - 4, 2500 - 2 * 995 + 1]);
        assert!(out.starts_with(b"03e8\x01"));
        let mut large = Vec::new();
        write(
            &mut large,
            SideBand::Large,
            Band::Data,
            &vec![0; MAX_PKT_LEN],
        );
        assert!(large.starts_with(b"fff0\x01"));
        assert_eq!(decode::packets(&large).count(), 2);
        let mut none = Vec::new();
        write(&mut none, SideBand::Large, Band::Progress, b"");
        assert!(none.is_empty());
    }

    #[test]
    fn round_trip_on_every_band() {
        let mut out = Vec::new();
        write(
            &mut out,
            SideBand::Small,
            Band::Progress,
            b"Counting objects\r",
        );
        write(&mut out, SideBand::Small, Band::Data, &[9u8; 3000]);
        write(&mut out, SideBand::Small, Band::Error, b"fatal: no\n");
        write(&mut out, SideBand::Small, Band::Progress, b"done\n");
        encode::flush(&mut out);
        out.extend_from_slice(b"after");
        let d = demux(&out).unwrap();
        assert_eq!(d.data, vec![9u8; 3000]);
        assert_eq!(d.progress, b"Counting objects\rdone\n");
        assert_eq!(d.error, b"fatal: no\n");
        assert_eq!(d.end, Some(out.len() - 5));
        assert_eq!(split(b"\x02hi"), Some((Band::Progress, &b"hi"[..])));
        assert_eq!(split(b"\x04hi"), None);
        assert_eq!(split(b""), None);
    }

    #[test]
    fn malformed_answers_are_refused() {
        assert_eq!(demux(b"0006\x01a0004"), Err(SideBandError::Empty { at: 6 }));
        assert_eq!(
            demux(b"0006\x04a"),
            Err(SideBandError::UnknownBand { at: 0, band: 4 })
        );
        assert_eq!(
            demux(b"0001"),
            Err(SideBandError::Unexpected {
                at: 0,
                kind: "delim"
            })
        );
        assert!(matches!(
            demux(b"0006\x01"),
            Err(SideBandError::Decode(DecodeError::Truncated { at: 0 }))
        ));
        // No flush: what came is returned, without an end.
        let d = demux(b"0007\x01ab").unwrap();
        assert_eq!((d.data.as_slice(), d.end), (&b"ab"[..], None));
    }
}
