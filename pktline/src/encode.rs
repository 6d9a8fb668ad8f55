//! Writing pkt-lines into a buffer. The length header counts itself and is written in
//! lower case, as git writes it.

use crate::{HEADER_LEN, MAX_DATA_LEN};

/// The flush packet: ends a section (the ref advertisement, a push's commands, a
/// report).
pub const FLUSH: &[u8; 4] = b"0000";
/// The delimiter packet (protocol v2: between a command's capabilities and arguments).
pub const DELIM: &[u8; 4] = b"0001";
/// The response-end packet (protocol v2, stateless connections).
pub const RESPONSE_END: &[u8; 4] = b"0002";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("a pkt-line payload of {len} bytes is over git's maximum of {MAX_DATA_LEN}")]
    TooLong { len: usize },
}

/// The header of a data packet carrying `payload_len` bytes.
pub fn header(payload_len: usize) -> Result<[u8; 4], EncodeError> {
    if payload_len > MAX_DATA_LEN {
        return Err(EncodeError::TooLong { len: payload_len });
    }
    let total = payload_len + HEADER_LEN;
    const HEX: &[u8; 16] = b"0123456789abcdef";
    Ok([
        HEX[(total >> 12) & 0xf],
        HEX[(total >> 8) & 0xf],
        HEX[(total >> 4) & 0xf],
        HEX[total & 0xf],
    ])
}

/// Appends one data packet carrying `payload`. An empty payload is written as `0004`,
/// which git reads as an empty line.
pub fn data(out: &mut Vec<u8>, payload: &[u8]) -> Result<(), EncodeError> {
    parts(out, &[payload])
}

/// Appends one data packet whose payload is `parts` one after another (a line and its
/// newline, a command and its capabilities), without joining them first.
pub fn parts(out: &mut Vec<u8>, parts: &[&[u8]]) -> Result<(), EncodeError> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    out.extend_from_slice(&header(len)?);
    for p in parts {
        out.extend_from_slice(p);
    }
    Ok(())
}

/// Appends `text` and a newline as one data packet, the way git writes its text lines
/// (`# service=git-upload-pack`, `unpack ok`).
pub fn text(out: &mut Vec<u8>, text: &str) -> Result<(), EncodeError> {
    parts(out, &[text.as_bytes(), b"\n"])
}

/// One data packet carrying `payload`, as a vector of its own.
pub fn to_vec(payload: &[u8]) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    data(&mut out, payload)?;
    Ok(out)
}

pub fn flush(out: &mut Vec<u8>) {
    out.extend_from_slice(FLUSH);
}

pub fn delim(out: &mut Vec<u8>) {
    out.extend_from_slice(DELIM);
}

pub fn response_end(out: &mut Vec<u8>) {
    out.extend_from_slice(RESPONSE_END);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MAX_PKT_LEN;

    #[test]
    fn headers_count_themselves_in_lower_case_hex() {
        assert_eq!(&header(0).unwrap(), b"0004");
        assert_eq!(&header(6).unwrap(), b"000a");
        assert_eq!(&header(0xab - 4).unwrap(), b"00ab");
        assert_eq!(&header(MAX_DATA_LEN).unwrap(), b"fff0");
        assert_eq!(
            header(MAX_DATA_LEN + 1),
            Err(EncodeError::TooLong {
                len: MAX_DATA_LEN + 1
            })
        );
    }

    #[test]
    fn writes_what_git_writes() {
        let mut out = Vec::new();
        text(&mut out, "# service=git-upload-pack").unwrap();
        flush(&mut out);
        assert_eq!(out, b"001e# service=git-upload-pack\n0000");

        let mut out = Vec::new();
        parts(&mut out, &[b"a", b"", b"bc"]).unwrap();
        data(&mut out, b"").unwrap();
        delim(&mut out);
        response_end(&mut out);
        assert_eq!(out, b"0007abc000400010002");
        assert_eq!(to_vec(b"done\n").unwrap(), b"0009done\n");
    }

    #[test]
    fn the_largest_payload_fits_and_one_more_byte_does_not() {
        let max = vec![b'x'; MAX_DATA_LEN];
        let mut out = Vec::new();
        data(&mut out, &max).unwrap();
        assert_eq!(out.len(), MAX_PKT_LEN);
        let mut out = Vec::new();
        let err = parts(&mut out, &[&max, b"y"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "a pkt-line payload of 65517 bytes is over git's maximum of 65516"
        );
        assert!(
            out.is_empty(),
            "nothing is written for a payload that does not fit"
        );
    }
}
