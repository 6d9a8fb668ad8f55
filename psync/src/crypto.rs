//! Streaming authenticated encryption of bucket objects.
//!
//! An object is a 64-byte prefix followed by chunks:
//!
//! ```text
//! prefix: "RVPSYNC1" | cipher (1) | log2 chunk size (1) | 6 zero bytes | salt (32) | key check (16)
//! chunk i: AEAD(key, nonce(i, last), plaintext_i) = plaintext_i || tag (16)
//! nonce(i, last) = 7 zero bytes | i as u32 big-endian | last (0 or 1)
//! ```
//!
//! Each object gets its own key: HKDF-SHA256 over the master key with the object's
//! random salt, expanded with the cipher, the chunk size and the object's *context*
//! (its name in the bucket), so an object copied under another name, or with its
//! prefix edited, fails authentication. The nonce is the STREAM construction: a chunk
//! counter and a last-chunk flag, so chunks cannot be reordered, dropped or the stream
//! cut short without detection. Every chunk but the last holds exactly the chunk size;
//! the last holds less (possibly nothing), so the reader knows the last chunk by its
//! length and never needs to look ahead.
//!
//! The key check is an HKDF output that depends only on the master key and the salt:
//! a reader whose key differs from the writer's sees it differ and says "wrong key"
//! instead of "tampered".
//!
//! [`Sealer`] and [`Opener`] are pure (bytes in, bytes out): the uploads and downloads
//! drive them. Nothing here does I/O or holds more than one chunk.

use std::fmt;

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};

/// The magic and format version at the start of every object.
const MAGIC: &[u8; 8] = b"RVPSYNC1";
/// Bytes before the first chunk.
pub const PREFIX_LEN: usize = 64;
/// The authentication tag after each chunk.
pub const TAG_LEN: usize = 16;
/// Plaintext bytes per chunk (2^16): the most either side buffers.
pub const CHUNK_LOG2: u8 = 16;
const SALT_LEN: usize = 32;
const CHECK_LEN: usize = 16;

/// A master key: 32 bytes, named by the id objects record.
#[derive(Clone)]
pub struct MasterKey {
    pub id: String,
    bytes: [u8; 32],
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MasterKey({})", self.id)
    }
}

impl MasterKey {
    pub fn new(id: impl Into<String>, bytes: [u8; 32]) -> MasterKey {
        MasterKey {
            id: id.into(),
            bytes,
        }
    }

    /// Parses a key file's text: 64 hex digits, surrounding whitespace ignored.
    pub fn parse(id: impl Into<String>, text: &str) -> Result<MasterKey, String> {
        let hex_text = text.trim();
        let raw = hex::decode(hex_text)
            .map_err(|_| "a key file holds 64 hex digits (32 random bytes)".to_owned())?;
        let bytes: [u8; 32] = raw.try_into().map_err(|v: Vec<u8>| {
            format!(
                "a key file holds 64 hex digits (32 random bytes); this one holds {} bytes",
                v.len()
            )
        })?;
        Ok(MasterKey::new(id, bytes))
    }

    /// A new random key, as the text a key file holds.
    pub fn generate_hex() -> String {
        let mut bytes = [0u8; 32];
        SystemRandom::new()
            .fill(&mut bytes)
            .expect("the system's random source works");
        hex::encode(bytes)
    }
}

/// The AEAD an object is sealed with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub enum Cipher {
    #[serde(rename = "aes-256-gcm")]
    Aes256Gcm,
    #[serde(rename = "chacha20-poly1305")]
    ChaCha20Poly1305,
}

impl Cipher {
    fn code(self) -> u8 {
        match self {
            Cipher::Aes256Gcm => 1,
            Cipher::ChaCha20Poly1305 => 2,
        }
    }

    fn from_code(code: u8) -> Option<Cipher> {
        match code {
            1 => Some(Cipher::Aes256Gcm),
            2 => Some(Cipher::ChaCha20Poly1305),
            _ => None,
        }
    }

    fn algorithm(self) -> &'static aead::Algorithm {
        match self {
            Cipher::Aes256Gcm => &aead::AES_256_GCM,
            Cipher::ChaCha20Poly1305 => &aead::CHACHA20_POLY1305,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    #[error("not a partition-sync object (its first bytes are not the RVPSYNC1 prefix)")]
    NotOurs,
    #[error("sealed with an unknown cipher (code {0}); is this build older than the producer's?")]
    UnknownCipher(u8),
    #[error("unsupported chunk size 2^{0}")]
    ChunkSize(u8),
    #[error(
        "unsupported object format (reserved prefix bytes are set); is this build older than the producer's?"
    )]
    Reserved,
    #[error(
        "wrong key: key id {key_id} in this config is not the key the object was sealed with (compare the key files on both sides), or the object's prefix was altered"
    )]
    WrongKey { key_id: String },
    #[error(
        "authentication failed at chunk {chunk}: the object was altered, truncated or renamed in the bucket"
    )]
    Authentication { chunk: u64 },
    #[error("the object ends before its last chunk: it was truncated")]
    Truncated,
    #[error("the object has bytes after its last chunk")]
    TrailingData,
    #[error("the object is too large for one stream (2^32 chunks)")]
    TooLarge,
}

struct ObjectKeys {
    key: LessSafeKey,
    check: [u8; CHECK_LEN],
}

/// An HKDF output length that is not a ring AEAD key: the key check.
struct CheckLen;

impl hkdf::KeyType for CheckLen {
    fn len(&self) -> usize {
        CHECK_LEN
    }
}

fn derive(master: &MasterKey, cipher: Cipher, log2: u8, salt: &[u8], context: &[u8]) -> ObjectKeys {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(&master.bytes);
    let params = [cipher.code(), log2];
    let info: [&[u8]; 3] = [b"refvote-psync v1 aead", &params, context];
    let okm = prk
        .expand(&info, cipher.algorithm())
        .expect("the AEAD key length is within HKDF's limit");
    let key = LessSafeKey::new(UnboundKey::from(okm));
    let mut check = [0u8; CHECK_LEN];
    let info: [&[u8]; 1] = [b"refvote-psync v1 key check"];
    prk.expand(&info, CheckLen)
        .expect("16 bytes are within HKDF's limit")
        .fill(&mut check)
        .expect("the buffer has the requested length");
    ObjectKeys { key, check }
}

fn nonce(counter: u32, last: bool) -> Nonce {
    let mut n = [0u8; 12];
    n[7..11].copy_from_slice(&counter.to_be_bytes());
    n[11] = u8::from(last);
    Nonce::assume_unique_for_key(n)
}

/// Seals one object's plaintext, chunk by chunk.
pub struct Sealer {
    keys: ObjectKeys,
    chunk: usize,
    counter: u32,
    pending: Vec<u8>,
    prefix: Option<[u8; PREFIX_LEN]>,
}

impl Sealer {
    /// A sealer for the object named `context`, with a fresh random salt.
    pub fn new(master: &MasterKey, cipher: Cipher, context: &[u8]) -> Sealer {
        let mut salt = [0u8; SALT_LEN];
        SystemRandom::new()
            .fill(&mut salt)
            .expect("the system's random source works");
        Sealer::with_salt(master, cipher, context, salt)
    }

    fn with_salt(master: &MasterKey, cipher: Cipher, context: &[u8], salt: [u8; 32]) -> Sealer {
        let keys = derive(master, cipher, CHUNK_LOG2, &salt, context);
        let mut prefix = [0u8; PREFIX_LEN];
        prefix[..8].copy_from_slice(MAGIC);
        prefix[8] = cipher.code();
        prefix[9] = CHUNK_LOG2;
        prefix[16..48].copy_from_slice(&salt);
        prefix[48..64].copy_from_slice(&keys.check);
        let chunk = 1usize << CHUNK_LOG2;
        Sealer {
            keys,
            chunk,
            counter: 0,
            pending: Vec::with_capacity(chunk + TAG_LEN),
            prefix: Some(prefix),
        }
    }

    /// Seals `data`, appending whatever is complete (the prefix first) to `out`.
    pub fn push(&mut self, mut data: &[u8], out: &mut Vec<u8>) -> Result<(), CryptoError> {
        if let Some(prefix) = self.prefix.take() {
            out.extend_from_slice(&prefix);
        }
        while !data.is_empty() {
            let room = self.chunk - self.pending.len();
            let take = room.min(data.len());
            self.pending.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.pending.len() == self.chunk {
                // A full chunk is never the last one: the last is always shorter.
                self.seal_pending(false, out)?;
            }
        }
        Ok(())
    }

    /// Seals what is left as the last chunk.
    pub fn finish(mut self, out: &mut Vec<u8>) -> Result<(), CryptoError> {
        if let Some(prefix) = self.prefix.take() {
            out.extend_from_slice(&prefix);
        }
        self.seal_pending(true, out)
    }

    fn seal_pending(&mut self, last: bool, out: &mut Vec<u8>) -> Result<(), CryptoError> {
        let tag = self
            .keys
            .key
            .seal_in_place_separate_tag(nonce(self.counter, last), Aad::empty(), &mut self.pending)
            .map_err(|_| CryptoError::TooLarge)?;
        out.extend_from_slice(&self.pending);
        out.extend_from_slice(tag.as_ref());
        self.pending.clear();
        self.counter = self.counter.checked_add(1).ok_or(CryptoError::TooLarge)?;
        Ok(())
    }
}

/// Seals a whole small value (a manifest) at once.
pub fn seal(master: &MasterKey, cipher: Cipher, context: &[u8], plaintext: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(PREFIX_LEN + plaintext.len() + 2 * TAG_LEN);
    let mut sealer = Sealer::new(master, cipher, context);
    sealer
        .push(plaintext, &mut out)
        .expect("a small value fits one stream");
    sealer
        .finish(&mut out)
        .expect("a small value fits one stream");
    out
}

/// Opens a whole small value (a manifest) at once.
pub fn open(master: &MasterKey, context: &[u8], sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let mut out = Vec::with_capacity(sealed.len());
    let mut opener = Opener::new(master, context);
    opener.feed(sealed, &mut out)?;
    opener.finish(&mut out)?;
    Ok(out)
}

/// Opens one object, chunk by chunk: plaintext comes out only once its chunk is
/// authenticated.
pub struct Opener {
    master: MasterKey,
    context: Vec<u8>,
    keys: Option<ObjectKeys>,
    chunk: usize,
    counter: u32,
    buf: Vec<u8>,
    done: bool,
}

impl Opener {
    pub fn new(master: &MasterKey, context: &[u8]) -> Opener {
        Opener {
            master: master.clone(),
            context: context.to_vec(),
            keys: None,
            chunk: 0,
            counter: 0,
            buf: Vec::new(),
            done: false,
        }
    }

    /// Takes the next bytes of the object; appends authenticated plaintext to `out`.
    pub fn feed(&mut self, mut data: &[u8], out: &mut Vec<u8>) -> Result<(), CryptoError> {
        if self.done {
            return if data.is_empty() {
                Ok(())
            } else {
                Err(CryptoError::TrailingData)
            };
        }
        if self.keys.is_none() {
            let need = PREFIX_LEN - self.buf.len();
            let take = need.min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.buf.len() < PREFIX_LEN {
                return Ok(());
            }
            self.read_prefix()?;
        }
        let segment = self.chunk + TAG_LEN;
        while !data.is_empty() {
            let take = (segment - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.buf.len() == segment {
                self.open_buf(false, out)?;
            }
        }
        Ok(())
    }

    /// The object ended: opens the last chunk.
    pub fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), CryptoError> {
        if self.done {
            return Ok(());
        }
        if self.keys.is_none() {
            return Err(if self.buf.len() < MAGIC.len() || &self.buf[..8] != MAGIC {
                CryptoError::NotOurs
            } else {
                CryptoError::Truncated
            });
        }
        if self.buf.len() < TAG_LEN {
            return Err(CryptoError::Truncated);
        }
        self.open_buf(true, out)?;
        self.done = true;
        Ok(())
    }

    fn read_prefix(&mut self) -> Result<(), CryptoError> {
        let p = &self.buf[..PREFIX_LEN];
        if &p[..8] != MAGIC {
            return Err(CryptoError::NotOurs);
        }
        let cipher = Cipher::from_code(p[8]).ok_or(CryptoError::UnknownCipher(p[8]))?;
        if p[10..16].iter().any(|b| *b != 0) {
            return Err(CryptoError::Reserved);
        }
        let log2 = p[9];
        if !(10..=24).contains(&log2) {
            return Err(CryptoError::ChunkSize(log2));
        }
        let keys = derive(&self.master, cipher, log2, &p[16..48], &self.context);
        // Not a secret comparison: the check value is public, stored in the object.
        if keys.check[..] != p[48..64] {
            return Err(CryptoError::WrongKey {
                key_id: self.master.id.clone(),
            });
        }
        self.keys = Some(keys);
        self.chunk = 1usize << log2;
        self.buf.clear();
        self.buf.reserve(self.chunk + TAG_LEN);
        Ok(())
    }

    fn open_buf(&mut self, last: bool, out: &mut Vec<u8>) -> Result<(), CryptoError> {
        let keys = self.keys.as_ref().expect("the prefix was read");
        let chunk = u64::from(self.counter);
        let plain = keys
            .key
            .open_in_place(nonce(self.counter, last), Aad::empty(), &mut self.buf)
            .map_err(|_| CryptoError::Authentication { chunk })?;
        out.extend_from_slice(plain);
        self.buf.clear();
        self.counter = self.counter.checked_add(1).ok_or(CryptoError::TooLarge)?;
        Ok(())
    }
}

/// The sealed size of `plain` plaintext bytes.
pub fn sealed_len(plain: u64) -> u64 {
    let chunk = 1u64 << CHUNK_LOG2;
    let chunks = plain / chunk + 1;
    PREFIX_LEN as u64 + plain + chunks * TAG_LEN as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str, b: u8) -> MasterKey {
        MasterKey::new(id, [b; 32])
    }

    fn sealed_in_pieces(plain: &[u8], piece: usize, cipher: Cipher) -> Vec<u8> {
        let mut out = Vec::new();
        let mut s = Sealer::new(&key("k", 1), cipher, b"ctx");
        for p in plain.chunks(piece.max(1)) {
            s.push(p, &mut out).unwrap();
        }
        s.finish(&mut out).unwrap();
        out
    }

    fn open_in_pieces(sealed: &[u8], piece: usize) -> Result<Vec<u8>, CryptoError> {
        let mut out = Vec::new();
        let mut o = Opener::new(&key("k", 1), b"ctx");
        for p in sealed.chunks(piece.max(1)) {
            o.feed(p, &mut out)?;
        }
        o.finish(&mut out)?;
        Ok(out)
    }

    #[test]
    fn round_trips_at_every_boundary() {
        let chunk = 1usize << CHUNK_LOG2;
        for len in [0, 1, chunk - 1, chunk, chunk + 1, 3 * chunk, 3 * chunk + 7] {
            let plain: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            for cipher in [Cipher::Aes256Gcm, Cipher::ChaCha20Poly1305] {
                let sealed = sealed_in_pieces(&plain, 1000, cipher);
                assert_eq!(sealed.len() as u64, sealed_len(len as u64), "len {len}");
                for piece in [1, 17, 4096, sealed.len()] {
                    if len > chunk && piece == 1 {
                        continue; // slow and adds nothing over 17
                    }
                    assert_eq!(open_in_pieces(&sealed, piece).unwrap(), plain, "len {len}");
                }
            }
        }
    }

    #[test]
    fn any_flipped_byte_is_refused() {
        let plain = vec![7u8; (1 << CHUNK_LOG2) + 100];
        let sealed = sealed_in_pieces(&plain, 5000, Cipher::Aes256Gcm);
        for at in [0, 8, 9, 12, 20, 50, 63, 64, 65, 65_700, sealed.len() - 1] {
            let mut bad = sealed.clone();
            bad[at] ^= 0x01;
            let err = open_in_pieces(&bad, 4096).unwrap_err();
            assert!(
                matches!(
                    err,
                    CryptoError::NotOurs
                        | CryptoError::UnknownCipher(_)
                        | CryptoError::ChunkSize(_)
                        | CryptoError::Reserved
                        | CryptoError::WrongKey { .. }
                        | CryptoError::Authentication { .. }
                ),
                "byte {at}: {err:?}"
            );
        }
    }

    #[test]
    fn truncation_reordering_and_trailing_bytes_are_refused() {
        let chunk = 1usize << CHUNK_LOG2;
        let plain = vec![3u8; 2 * chunk + 10];
        let sealed = sealed_in_pieces(&plain, 9000, Cipher::Aes256Gcm);
        let seg = chunk + TAG_LEN;
        // Cut at a chunk boundary: the rest looks like a valid stream but the last
        // chunk is missing.
        let cut = &sealed[..PREFIX_LEN + 2 * seg];
        assert_eq!(open_in_pieces(cut, 4096), Err(CryptoError::Truncated));
        // Cut inside a chunk: the short piece is taken as the last chunk and fails.
        let cut = &sealed[..PREFIX_LEN + seg + 100];
        assert!(matches!(
            open_in_pieces(cut, 4096),
            Err(CryptoError::Authentication { chunk: 1 })
        ));
        // Two chunks swapped.
        let mut swapped = sealed[..PREFIX_LEN].to_vec();
        swapped.extend_from_slice(&sealed[PREFIX_LEN + seg..PREFIX_LEN + 2 * seg]);
        swapped.extend_from_slice(&sealed[PREFIX_LEN..PREFIX_LEN + seg]);
        swapped.extend_from_slice(&sealed[PREFIX_LEN + 2 * seg..]);
        assert!(matches!(
            open_in_pieces(&swapped, 4096),
            Err(CryptoError::Authentication { chunk: 0 })
        ));
        let mut longer = sealed.clone();
        longer.push(0);
        assert!(open_in_pieces(&longer, 4096).is_err());
        assert_eq!(
            open_in_pieces(&sealed[..10], 4096),
            Err(CryptoError::Truncated)
        );
        assert_eq!(open_in_pieces(b"plain text", 4), Err(CryptoError::NotOurs));
    }

    #[test]
    fn another_key_or_another_name_is_told_apart() {
        let sealed = seal(&key("k", 1), Cipher::Aes256Gcm, b"name-a", b"hello");
        assert_eq!(open(&key("k", 1), b"name-a", &sealed).unwrap(), b"hello");
        assert_eq!(
            open(&key("k", 2), b"name-a", &sealed),
            Err(CryptoError::WrongKey { key_id: "k".into() })
        );
        assert_eq!(
            open(&key("k", 1), b"name-b", &sealed),
            Err(CryptoError::Authentication { chunk: 0 })
        );
    }

    #[test]
    fn key_files_hold_hex() {
        let text = MasterKey::generate_hex();
        assert_eq!(text.len(), 64);
        assert!(MasterKey::parse("a", &format!("{text}\n")).is_ok());
        assert!(
            MasterKey::parse("a", "abcd")
                .unwrap_err()
                .contains("2 bytes")
        );
        assert!(MasterKey::parse("a", "not hex").is_err());
    }

    #[test]
    fn the_prefix_is_bound_into_the_key() {
        // Claiming another chunk size or cipher in the prefix changes the derived key.
        let mut sealed = seal(&key("k", 1), Cipher::Aes256Gcm, b"n", &[1u8; 100]);
        sealed[9] = CHUNK_LOG2 + 1;
        assert!(matches!(
            open(&key("k", 1), b"n", &sealed),
            Err(CryptoError::Authentication { .. })
        ));
        let mut sealed = seal(&key("k", 1), Cipher::Aes256Gcm, b"n", &[1u8; 100]);
        sealed[8] = Cipher::ChaCha20Poly1305.code();
        assert!(matches!(
            open(&key("k", 1), b"n", &sealed),
            Err(CryptoError::Authentication { .. })
        ));
    }
}
