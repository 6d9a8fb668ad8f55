//! Gitaly's repository checksum: one value that two replicas share exactly when their
//! well-known refs and HEAD agree. It must match Gitaly's bit for bit, so operators can
//! compare a refvote replica with a Gitaly one, and so it is computed the same way:
//! each `git show-ref --head` line (`<oid> <refname>`, no newline) that matches the
//! unanchored pattern `HEAD|(refs/(heads|tags|keep-around|merge-requests|environments|notes)/)`
//! is hashed with SHA-1 (also in SHA-256 repositories), the digests are XORed, and the
//! result is printed as the hex of a big-endian number without leading zeros.
//!
//! Pure: the node feeds it `show-ref` lines of a replica on disk, partition sync the
//! refs a manifest lists (the checksum a refvote target will report for them).

use sha1::{Digest, Sha1};

/// What an empty but valid repository reports.
pub const EMPTY: &str = "0000000000000000000000000000000000000000";

/// The ref namespaces Gitaly counts, matched anywhere in the line like its regexp.
const COUNTED: &[&str] = &[
    "HEAD",
    "refs/heads/",
    "refs/tags/",
    "refs/keep-around/",
    "refs/merge-requests/",
    "refs/environments/",
    "refs/notes/",
];

/// The running XOR of the counted lines' digests.
#[derive(Default)]
pub struct Checksum {
    acc: Option<[u8; 20]>,
}

impl Checksum {
    pub fn add_line(&mut self, line: &[u8]) {
        if !COUNTED
            .iter()
            .any(|p| line.windows(p.len()).any(|w| w == p.as_bytes()))
        {
            return;
        }
        let digest: [u8; 20] = Sha1::digest(line).into();
        let acc = self.acc.get_or_insert([0; 20]);
        for (a, d) in acc.iter_mut().zip(digest) {
            *a ^= d;
        }
    }

    /// Hex of the big-endian number (Go's `big.Int.Text(16)`): no leading zeros, "0"
    /// for zero. `None` when no line was counted.
    pub fn finish(self) -> Option<String> {
        let acc = self.acc?;
        let hex = hex::encode(acc);
        let trimmed = hex.trim_start_matches('0');
        Some(if trimmed.is_empty() {
            "0".into()
        } else {
            trimmed.to_owned()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xor_of_counted_lines_without_leading_zeros() {
        let mut s = Checksum::default();
        s.add_line(b"1111111111111111111111111111111111111111 refs/remotes/origin/x");
        assert_eq!(s.finish(), None, "refs/remotes is not counted");

        let line = b"1111111111111111111111111111111111111111 refs/heads/main";
        let mut s = Checksum::default();
        s.add_line(line);
        let one = hex::encode(Sha1::digest(line));
        assert_eq!(s.finish().unwrap(), one.trim_start_matches('0'));

        // The same line twice cancels out: zero prints as "0", like Go's big.Int.
        let mut s = Checksum::default();
        s.add_line(line);
        s.add_line(line);
        assert_eq!(s.finish().unwrap(), "0");

        // Unanchored like Gitaly's regexp: a remote's HEAD counts.
        let mut s = Checksum::default();
        s.add_line(b"1111111111111111111111111111111111111111 refs/remotes/origin/HEAD");
        assert!(s.finish().is_some());
    }
}
