//! Just enough of the protobuf wire format to walk a message's fields without a
//! schema: the registry reads descriptor options this way (prost drops extensions),
//! and the router rewrites one nested field of a request frame this way.

use std::ops::Range;

/// A field's value as it appears on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Value<'a> {
    Varint(u64),
    Fixed64(u64),
    Bytes(&'a [u8]),
    Fixed32(u32),
}

/// One field occurrence: its number, value, and where the whole field (tag included)
/// sits in the buffer.
#[derive(Debug, Clone)]
pub struct Field<'a> {
    pub number: u32,
    pub value: Value<'a>,
    pub span: Range<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("truncated varint at byte {0}")]
    Varint(usize),
    #[error("field at byte {0} runs past the end of the message")]
    Truncated(usize),
    #[error("unsupported wire type {wire_type} at byte {at}")]
    WireType { wire_type: u64, at: usize },
    #[error("field number 0 at byte {0}")]
    ZeroField(usize),
}

fn varint(buf: &[u8], at: &mut usize) -> Result<u64, WireError> {
    let start = *at;
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *buf.get(*at).ok_or(WireError::Varint(start))?;
        *at += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(WireError::Varint(start))
}

/// Every field of a message, in wire order.
pub fn fields(buf: &[u8]) -> Result<Vec<Field<'_>>, WireError> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < buf.len() {
        let start = at;
        let key = varint(buf, &mut at)?;
        let number = u32::try_from(key >> 3).map_err(|_| WireError::ZeroField(start))?;
        if number == 0 {
            return Err(WireError::ZeroField(start));
        }
        let take = |at: &mut usize, n: usize| -> Result<&[u8], WireError> {
            let end = at
                .checked_add(n)
                .filter(|e| *e <= buf.len())
                .ok_or(WireError::Truncated(start))?;
            let s = &buf[*at..end];
            *at = end;
            Ok(s)
        };
        let value = match key & 7 {
            0 => Value::Varint(varint(buf, &mut at)?),
            1 => Value::Fixed64(u64::from_le_bytes(
                take(&mut at, 8)?.try_into().expect("8 bytes"),
            )),
            2 => {
                let len = usize::try_from(varint(buf, &mut at)?)
                    .map_err(|_| WireError::Truncated(start))?;
                Value::Bytes(take(&mut at, len)?)
            }
            5 => Value::Fixed32(u32::from_le_bytes(
                take(&mut at, 4)?.try_into().expect("4 bytes"),
            )),
            wire_type => {
                return Err(WireError::WireType {
                    wire_type,
                    at: start,
                });
            }
        };
        out.push(Field {
            number,
            value,
            span: start..at,
        });
    }
    Ok(out)
}

/// Appends a varint.
pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Appends a length-delimited field.
pub fn put_bytes_field(out: &mut Vec<u8>, number: u32, bytes: &[u8]) {
    put_varint(out, (u64::from(number) << 3) | 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walks_every_wire_type() {
        let mut buf = Vec::new();
        put_varint(&mut buf, 1 << 3); // field 1, varint
        put_varint(&mut buf, 300);
        put_bytes_field(&mut buf, 2, b"abc");
        buf.extend_from_slice(&[(3 << 3) | 5, 1, 0, 0, 0]);
        buf.extend_from_slice(&[(4 << 3) | 1, 2, 0, 0, 0, 0, 0, 0, 0]);
        let f = fields(&buf).unwrap();
        assert_eq!(f[0].value, Value::Varint(300));
        assert_eq!(f[1].value, Value::Bytes(b"abc"));
        assert_eq!(f[1].span, 3..8);
        assert_eq!(f[2].value, Value::Fixed32(1));
        assert_eq!(f[3].value, Value::Fixed64(2));
    }

    #[test]
    fn refuses_malformed_input() {
        assert_eq!(fields(&[0x0a, 5, 1]).unwrap_err(), WireError::Truncated(0));
        assert_eq!(fields(&[0x08, 0x80]).unwrap_err(), WireError::Varint(1));
        assert!(matches!(
            fields(&[0x0b]).unwrap_err(),
            WireError::WireType { wire_type: 3, .. }
        ));
        assert_eq!(fields(&[0x00, 1]).unwrap_err(), WireError::ZeroField(0));
        assert_eq!(
            fields(&[0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f]).unwrap_err(),
            WireError::Truncated(0)
        );
    }
}
