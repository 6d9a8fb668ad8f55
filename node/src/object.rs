//! git objects as Gitaly presents them, parsed without I/O: commits (`GitCommit`, with
//! their signatures and signed payload), annotated tags (`Tag`), trees, signature
//! types. The rules follow Gitaly's parser (`internal/git/catfile/parse_commit.go`,
//! `parser.go`, `tag.go`), so answers match field for field: e.g. a date git cannot
//! parse becomes Gitaly's far-future fallback, a body is cut at 10 KiB while
//! `body_size` keeps the real length, and a tag's message keeps its signature.

use refvote_proto::gitaly::{CommitAuthor, GitCommit, SignatureType, Tag};

/// Commit bodies and tag messages are cut to this many bytes (Gitaly's
/// `MaxCommitOrTagMessageSize`); the size fields tell the real length.
pub const MAX_MESSAGE: usize = 10 * 1024;
/// What an unparsable or out-of-range date becomes (Gitaly's fallback time, the
/// largest `time.Time` seconds value).
pub const FALLBACK_SECONDS: i64 = 9_223_371_974_719_179_007;
/// Gitaly refuses dates past 2^53 seconds as unparsable.
const MAX_SECONDS: i64 = 1 << 53;

/// Tree entry modes.
pub const MODE_TREE: u32 = 0o040000;
pub const MODE_SUBMODULE: u32 = 0o160000;

/// A commit with what signature checks need.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ParsedCommit {
    pub commit: GitCommit,
    /// Each `gpgsig`/`gpgsig-sha256` header's value, continuation lines joined.
    pub signatures: Vec<Vec<u8>>,
    /// The object without its signature headers: what was signed.
    pub payload: Vec<u8>,
}

/// Parses a raw commit object.
pub fn parse_commit(oid: &str, data: &[u8]) -> ParsedCommit {
    #[derive(PartialEq)]
    enum State {
        Header,
        Signature,
        Unexpected,
    }
    let mut commit = GitCommit {
        id: oid.to_owned(),
        ..Default::default()
    };
    let mut payload = Vec::with_capacity(data.len());
    let mut signatures: Vec<Vec<u8>> = Vec::new();
    let mut state = State::Header;
    let mut rest = data;
    while !rest.is_empty() {
        let end = rest
            .iter()
            .position(|b| *b == b'\n')
            .map_or(rest.len(), |i| i + 1);
        let line = &rest[..end];
        rest = &rest[end..];
        if line == b"\n" {
            payload.extend_from_slice(line);
            set_body(&mut commit, rest);
            payload.extend_from_slice(rest);
            break;
        }
        if state == State::Signature {
            if let Some(more) = line.strip_prefix(b" ") {
                if let Some(last) = signatures.last_mut() {
                    last.extend_from_slice(more);
                }
                continue;
            }
            match split_once(line, b' ') {
                Some((key, value)) if key == b"gpgsig" || key == b"gpgsig-sha256" => {
                    signatures.push(value.to_vec());
                    continue;
                }
                _ => state = State::Unexpected,
            }
        }
        if state == State::Unexpected {
            payload.extend_from_slice(line);
            continue;
        }
        let Some((key, value)) = split_once(line, b' ') else {
            continue;
        };
        let value = value.strip_suffix(b"\n").unwrap_or(value);
        match key {
            b"parent" => commit.parent_ids.push(lossy(value)),
            b"author" => commit.author = Some(parse_author(value)),
            b"committer" => commit.committer = Some(parse_author(value)),
            b"tree" => commit.tree_id = lossy(value),
            b"encoding" => commit.encoding = lossy(value),
            b"gpgsig" | b"gpgsig-sha256" => {
                commit.signature_type = signature_type(value) as i32;
                state = State::Signature;
                let mut sig = value.to_vec();
                sig.push(b'\n');
                signatures.push(sig);
                continue;
            }
            _ => {}
        }
        payload.extend_from_slice(line);
    }
    for s in &mut signatures {
        if s.last() == Some(&b'\n') {
            s.pop();
        }
    }
    ParsedCommit {
        commit,
        signatures,
        payload,
    }
}

fn set_body(commit: &mut GitCommit, body: &[u8]) {
    if body.is_empty() {
        return;
    }
    commit.subject = subject(body);
    commit.body_size = body.len() as i64;
    commit.body = body[..body.len().min(MAX_MESSAGE)].to_vec();
}

/// A message's first line, without its line end.
pub fn subject(body: &[u8]) -> Vec<u8> {
    let line = body.split(|b| *b == b'\n').next().unwrap_or_default();
    let mut end = line.len();
    while end > 0 && (line[end - 1] == b'\r' || line[end - 1] == b'\n') {
        end -= 1;
    }
    line[..end].to_vec()
}

/// `Name <email> 1700000000 +0100`, read as Gitaly reads it: the name is what comes
/// before the first '<' (one trailing space dropped), the email runs to the next '>',
/// the date is seconds (the fallback if unparsable), the zone only if exactly one
/// field follows the date.
pub fn parse_author(value: &[u8]) -> CommitAuthor {
    let mut author = CommitAuthor::default();
    let Some((name, rest)) = split_once(value, b'<') else {
        author.name = value.strip_suffix(b" ").unwrap_or(value).to_vec();
        return author;
    };
    author.name = name.strip_suffix(b" ").unwrap_or(name).to_vec();
    let Some((email, rest)) = split_once(rest, b'>') else {
        return author;
    };
    author.email = email.to_vec();
    let rest = String::from_utf8_lossy(rest);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let Some(seconds) = fields.first() else {
        return author;
    };
    author.date = Some(prost_types::Timestamp {
        seconds: parse_seconds(seconds),
        nanos: 0,
    });
    if fields.len() == 2 {
        author.timezone = fields[1].as_bytes().to_vec();
    }
    author
}

/// Gitaly's `ParseDateSeconds`.
pub fn parse_seconds(s: &str) -> i64 {
    match s.parse::<i64>() {
        Ok(v) if (0..=MAX_SECONDS).contains(&v) => v,
        _ => FALLBACK_SECONDS,
    }
}

/// Gitaly's `DetectSignatureType`: by the armor line exactly.
pub fn signature_type(first_line: &[u8]) -> SignatureType {
    match first_line.strip_suffix(b"\n").unwrap_or(first_line) {
        b"-----BEGIN SIGNED MESSAGE-----" => SignatureType::X509,
        b"-----BEGIN PGP MESSAGE-----" | b"-----BEGIN PGP SIGNATURE-----" => SignatureType::Pgp,
        b"-----BEGIN SSH SIGNATURE-----" => SignatureType::Ssh,
        _ => SignatureType::None,
    }
}

/// What an annotated tag points at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tagged {
    pub oid: String,
    pub kind: String,
}

/// Parses an annotated tag object `oid`. `name` (the ref's short name) wins over the
/// object's own `tag` header when given. The message is the whole rest of the object,
/// signature included; [`trim_tag_message`] is what the ref RPCs apply on top.
pub fn parse_tag(oid: &str, name: &[u8], data: &[u8]) -> (Tag, Tagged) {
    let mut tag = Tag {
        id: oid.to_owned(),
        name: name.to_vec(),
        ..Default::default()
    };
    let mut tagged = Tagged::default();
    let mut rest = data;
    let mut body = None;
    while !rest.is_empty() {
        let end = rest
            .iter()
            .position(|b| *b == b'\n')
            .map_or(rest.len(), |i| i + 1);
        let line = &rest[..end];
        rest = &rest[end..];
        if line == b"\n" {
            body = Some(rest);
            break;
        }
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        let Some((key, value)) = split_once(line, b' ') else {
            continue;
        };
        match key {
            b"object" => tagged.oid = lossy(value),
            b"type" => tagged.kind = lossy(value),
            b"tag" if tag.name.is_empty() => tag.name = value.to_vec(),
            b"tagger" => tag.tagger = Some(parse_author(value)),
            _ => {}
        }
    }
    if let Some(message) = body {
        tag.message = message.to_vec();
        tag.message_size = message.len() as i64;
        if let Some((signature, _)) = extract_tag_signature(message) {
            let first = signature.split(|b| *b == b'\n').next().unwrap_or_default();
            if !first.is_empty() && signature.contains(&b'\n') {
                tag.signature_type = signature_type(first) as i32;
            }
        }
    }
    (tag, tagged)
}

/// A tag message's signature (from the first `-----BEGIN`, not at its very start,
/// without the final newline) and the text before it; `None` if unsigned.
pub fn extract_tag_signature(content: &[u8]) -> Option<(&[u8], &[u8])> {
    let at = find(content, b"-----BEGIN")?;
    if at == 0 {
        return None;
    }
    let sig = &content[at..];
    Some((sig.strip_suffix(b"\n").unwrap_or(sig), &content[..at]))
}

/// Gitaly's `TrimTagMessage`: trailing newlines dropped, then cut to [`MAX_MESSAGE`];
/// the size is taken between the two.
pub fn trim_tag_message(tag: &mut Tag) {
    let mut end = tag.message.len();
    while end > 0 && tag.message[end - 1] == b'\n' {
        end -= 1;
    }
    tag.message.truncate(end);
    tag.message_size = tag.message.len() as i64;
    tag.message.truncate(MAX_MESSAGE);
}

/// One entry of a tree object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeItem {
    pub mode: u32,
    pub name: Vec<u8>,
    pub oid: String,
}

/// Parses a raw tree object: `<octal mode> <name>\0<binary id>` repeated; the id has
/// `oid_len / 2` bytes (40 hex digits for SHA-1, 64 for SHA-256).
pub fn parse_tree(data: &[u8], oid_len: usize) -> Vec<TreeItem> {
    let raw = oid_len / 2;
    let mut items = Vec::new();
    let mut rest = data;
    while let Some(sp) = rest.iter().position(|b| *b == b' ') {
        let Some(nul) = rest[sp..].iter().position(|b| *b == 0).map(|i| i + sp) else {
            break;
        };
        if rest.len() < nul + 1 + raw {
            break;
        }
        let mode = std::str::from_utf8(&rest[..sp])
            .ok()
            .and_then(|m| u32::from_str_radix(m, 8).ok())
            .unwrap_or(0);
        items.push(TreeItem {
            mode,
            name: rest[sp + 1..nul].to_vec(),
            oid: hex::encode(&rest[nul + 1..nul + 1 + raw]),
        });
        rest = &rest[nul + 1 + raw..];
    }
    items
}

/// The type of entry a mode names, as Gitaly classifies it.
pub fn mode_kind(mode: u32) -> refvote_proto::gitaly::tree_entry::EntryType {
    use refvote_proto::gitaly::tree_entry::EntryType;
    match mode & 0o170000 {
        MODE_SUBMODULE => EntryType::Commit,
        MODE_TREE => EntryType::Tree,
        _ => EntryType::Blob,
    }
}

/// The message of a raw commit or tag object (everything after the first empty line).
pub fn message(raw: &[u8]) -> &[u8] {
    find(raw, b"\n\n").map_or(&[][..], |i| &raw[i + 2..])
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn split_once(s: &[u8], sep: u8) -> Option<(&[u8], &[u8])> {
    let i = s.iter().position(|b| *b == sep)?;
    Some((&s[..i], &s[i + 1..]))
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signed_commit_parses_with_its_payload() {
        let raw = b"tree 4b825dc642cb6eb9a060e54bf8d69288fbee4904\n\
parent 1111111111111111111111111111111111111111\n\
author A U Thor <a@example.com> 1700000000 +0100\n\
committer C O Mitter <c@example.com> 1700000001 -0200\n\
gpgsig -----BEGIN SSH SIGNATURE-----\n abc\n -----END SSH SIGNATURE-----\n\
\nSubject line\r\n\nBody\n";
        let p = parse_commit("abc", raw);
        let c = &p.commit;
        assert_eq!(c.tree_id, "4b825dc642cb6eb9a060e54bf8d69288fbee4904");
        assert_eq!(c.parent_ids.len(), 1);
        assert_eq!(c.subject, b"Subject line");
        assert_eq!(c.body, b"Subject line\r\n\nBody\n");
        assert_eq!(c.body_size, 20);
        let a = c.author.as_ref().unwrap();
        assert_eq!(a.name, b"A U Thor");
        assert_eq!(a.email, b"a@example.com");
        assert_eq!(a.date.unwrap().seconds, 1_700_000_000);
        assert_eq!(a.timezone, b"+0100");
        assert_eq!(c.committer.as_ref().unwrap().timezone, b"-0200");
        assert_eq!(c.signature_type, SignatureType::Ssh as i32);
        assert_eq!(
            p.signatures,
            vec![b"-----BEGIN SSH SIGNATURE-----\nabc\n-----END SSH SIGNATURE-----".to_vec()]
        );
        // What was signed: the object without the gpgsig header.
        let payload = String::from_utf8(p.payload).unwrap();
        assert!(!payload.contains("gpgsig"), "{payload}");
        assert!(payload.starts_with("tree "), "{payload}");
        assert!(
            payload.ends_with(
                "committer C O Mitter <c@example.com> 1700000001 -0200\n\nSubject line\r\n\nBody\n"
            ),
            "{payload}"
        );
    }

    #[test]
    fn odd_identities_and_dates_read_as_gitaly_reads_them() {
        let a = parse_author(b"Name <mail> notanumber +0000");
        assert_eq!(a.date.unwrap().seconds, FALLBACK_SECONDS);
        let a = parse_author(b"Name <mail> 123");
        assert_eq!(a.date.unwrap().seconds, 123);
        assert!(a.timezone.is_empty());
        let a = parse_author(b"Name <a> b> 5 +0100");
        assert_eq!(a.email, b"a");
        let a = parse_author(b"no email at all");
        assert_eq!(a.name, b"no email at all");
        assert!(a.date.is_none());
        let a = parse_author(b"Name <mail>");
        assert!(a.date.is_none());
    }

    #[test]
    fn an_empty_message_leaves_subject_and_body_empty() {
        let p = parse_commit("x", b"tree t\nauthor a <b> 1 +0000\n\n");
        assert!(p.commit.subject.is_empty());
        assert_eq!(p.commit.body_size, 0);
        let long = format!("tree t\n\n{}", "x".repeat(MAX_MESSAGE + 5));
        let p = parse_commit("x", long.as_bytes());
        assert_eq!(p.commit.body.len(), MAX_MESSAGE);
        assert_eq!(p.commit.body_size as usize, MAX_MESSAGE + 5);
    }

    #[test]
    fn tags_keep_their_signature_until_trimmed() {
        let raw = b"object 1111111111111111111111111111111111111111\ntype commit\ntag v1\n\
tagger T <t@x> 1700000000 +0000\n\nRelease\n\n-----BEGIN PGP SIGNATURE-----\nabc\n-----END PGP SIGNATURE-----\n";
        let (mut t, tagged) = parse_tag("2222", b"", raw);
        assert_eq!(t.name, b"v1");
        assert_eq!(tagged.kind, "commit");
        assert_eq!(t.signature_type, SignatureType::Pgp as i32);
        assert!(t.message.starts_with(b"Release\n\n-----BEGIN"));
        let (sig, text) = extract_tag_signature(&t.message).unwrap();
        assert_eq!(text, b"Release\n\n");
        assert!(sig.ends_with(b"-----END PGP SIGNATURE-----"));
        trim_tag_message(&mut t);
        assert!(t.message.ends_with(b"-----END PGP SIGNATURE-----"));
        assert_eq!(t.message_size as usize, t.message.len());
        let (named, _) = parse_tag("2222", b"given", raw);
        assert_eq!(named.name, b"given");
    }

    #[test]
    fn trees_parse() {
        let mut raw = b"100644 a.txt\0".to_vec();
        raw.extend([0x11; 20]);
        raw.extend(b"40000 dir\0");
        raw.extend([0x22; 20]);
        let items = parse_tree(&raw, 40);
        assert_eq!(items.len(), 2);
        assert_eq!(items[0].mode, 0o100644);
        assert_eq!(items[1].mode, MODE_TREE);
        assert_eq!(items[1].oid, "22".repeat(20));
        assert_eq!(
            mode_kind(0o160000),
            refvote_proto::gitaly::tree_entry::EntryType::Commit
        );
    }
}
