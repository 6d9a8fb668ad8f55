//! Commits and tags as Gitaly describes them (`GitCommit`, `Tag`), read with one
//! `git cat-file --batch` per batch of objects and parsed here.

use std::path::Path;

use refvote_proto::gitaly::{CommitAuthor, GitCommit, SignatureType, Tag};

use crate::error::NodeError;
use crate::git::Git;

/// Gitaly caps commit bodies and tag messages it returns; the full size is still told.
const MAX_MESSAGE: usize = 10 * 1024;
/// Objects per `cat-file` run: bounds what one answer holds in memory.
pub const BATCH: usize = 100;

/// One object's header fields and raw content.
pub struct RawObject {
    pub oid: String,
    pub kind: String,
    pub data: Vec<u8>,
}

/// Reads the objects `revs` name (`None` where a revision names nothing).
pub async fn read(
    git: &Git,
    repo: &Path,
    revs: &[String],
) -> Result<Vec<Option<RawObject>>, NodeError> {
    if revs.is_empty() {
        return Ok(Vec::new());
    }
    let input: String = revs.iter().map(|r| format!("{r}\n")).collect();
    let run = git
        .command(["cat-file", "--batch"])
        .git_dir(repo)
        .stdin(Box::pin(tokio_stream::once(Ok(input.into_bytes()))))
        .spawn()?;
    // Commits and tags are small; a batch of them is read whole.
    let (out, exit) = run.output(256 << 20).await?;
    exit.check()?;
    let mut objects = Vec::with_capacity(revs.len());
    let mut rest = out.as_slice();
    for _ in revs {
        let nl = rest.iter().position(|b| *b == b'\n').ok_or_else(|| {
            NodeError::io(
                "parsing git cat-file output",
                std::io::Error::other("truncated"),
            )
        })?;
        let header = String::from_utf8_lossy(&rest[..nl]).into_owned();
        rest = &rest[nl + 1..];
        let mut parts = header.split(' ');
        let (Some(oid), Some(kind), Some(size)) = (parts.next(), parts.next(), parts.next()) else {
            // "<rev> missing" (or "ambiguous"): nothing follows.
            objects.push(None);
            continue;
        };
        let size: usize = size.parse().map_err(|_| {
            NodeError::io(
                "parsing git cat-file output",
                std::io::Error::other(header.clone()),
            )
        })?;
        if rest.len() < size + 1 {
            return Err(NodeError::io(
                "parsing git cat-file output",
                std::io::Error::other("truncated object"),
            ));
        }
        objects.push(Some(RawObject {
            oid: oid.to_owned(),
            kind: kind.to_owned(),
            data: rest[..size].to_vec(),
        }));
        rest = &rest[size + 1..];
    }
    Ok(objects)
}

/// An object's header lines as (key, value); continuation lines joined into the value.
type Headers<'a> = Vec<(&'a [u8], Vec<u8>)>;

/// Splits an object into its header lines and its message.
fn split(data: &[u8]) -> (Headers<'_>, &[u8]) {
    let (head, message) = match data.windows(2).position(|w| w == b"\n\n") {
        Some(i) => (&data[..i], &data[i + 2..]),
        None => (data, &data[data.len()..]),
    };
    let mut headers: Headers<'_> = Vec::new();
    for line in head.split(|b| *b == b'\n') {
        // A continuation line (multi-line gpgsig) starts with a space.
        if let Some(cont) = line.strip_prefix(b" ") {
            if let Some((_, v)) = headers.last_mut() {
                v.push(b'\n');
                v.extend_from_slice(cont);
            }
            continue;
        }
        let (k, v) = match line.iter().position(|b| *b == b' ') {
            Some(i) => (&line[..i], line[i + 1..].to_vec()),
            None => (line, Vec::new()),
        };
        headers.push((k, v));
    }
    (headers, message)
}

/// "Name <email> 1700000000 +0100".
fn author(raw: &[u8]) -> CommitAuthor {
    let text = raw;
    let lt = text.iter().position(|b| *b == b'<');
    let gt = text.iter().rposition(|b| *b == b'>');
    let (name, email, rest) = match (lt, gt) {
        (Some(l), Some(g)) if l < g => (
            text[..l].trim_ascii_end().to_vec(),
            text[l + 1..g].to_vec(),
            String::from_utf8_lossy(&text[g + 1..]).into_owned(),
        ),
        _ => (text.to_vec(), Vec::new(), String::new()),
    };
    let mut fields = rest.split_whitespace();
    let seconds = fields
        .next()
        .and_then(|s| s.parse::<i64>().ok())
        .unwrap_or(0);
    let timezone = fields.next().unwrap_or("+0000").as_bytes().to_vec();
    CommitAuthor {
        name,
        email,
        date: Some(prost_types::Timestamp { seconds, nanos: 0 }),
        timezone,
    }
}

fn signature_type(sig: &[u8]) -> SignatureType {
    if sig.starts_with(b"-----BEGIN PGP") {
        SignatureType::Pgp
    } else if sig.starts_with(b"-----BEGIN SIGNED MESSAGE") {
        SignatureType::X509
    } else if sig.starts_with(b"-----BEGIN SSH SIGNATURE") {
        SignatureType::Ssh
    } else {
        SignatureType::None
    }
}

fn capped(message: &[u8]) -> Vec<u8> {
    if message.len() > MAX_MESSAGE {
        message[..MAX_MESSAGE].to_vec()
    } else {
        message.to_vec()
    }
}

/// Gitaly's subject: the first line of the message.
fn subject(message: &[u8]) -> Vec<u8> {
    let line = message.split(|b| *b == b'\n').next().unwrap_or_default();
    line.trim_ascii_end().to_vec()
}

/// A commit object as `GitCommit`.
pub fn commit(obj: &RawObject) -> GitCommit {
    let (headers, message) = split(&obj.data);
    let mut c = GitCommit {
        id: obj.oid.clone(),
        subject: subject(message),
        body: capped(message),
        body_size: message.len() as i64,
        ..Default::default()
    };
    for (k, v) in headers {
        match k {
            b"tree" => c.tree_id = String::from_utf8_lossy(&v).into_owned(),
            b"parent" => c.parent_ids.push(String::from_utf8_lossy(&v).into_owned()),
            b"author" => c.author = Some(author(&v)),
            b"committer" => c.committer = Some(author(&v)),
            b"encoding" => c.encoding = String::from_utf8_lossy(&v).into_owned(),
            b"gpgsig" | b"gpgsig-sha256" => c.signature_type = signature_type(&v) as i32,
            _ => {}
        }
    }
    c
}

/// A tag: `tag_obj` is the annotated tag object (if annotated), `target` the commit it
/// leads to (if it leads to one). `oid` is what the ref points at.
pub fn tag(name: &[u8], oid: &str, tag_obj: Option<&RawObject>, target: Option<&RawObject>) -> Tag {
    let mut t = Tag {
        name: name.to_vec(),
        id: oid.to_owned(),
        target_commit: target.filter(|o| o.kind == "commit").map(commit),
        ..Default::default()
    };
    if let Some(obj) = tag_obj.filter(|o| o.kind == "tag") {
        let (headers, message) = split(&obj.data);
        // A signature is appended to the message of a signed tag.
        let sig_at = message
            .windows(11)
            .position(|w| w == b"-----BEGIN ")
            .unwrap_or(message.len());
        t.signature_type = signature_type(&message[sig_at..]) as i32;
        let message = &message[..sig_at];
        t.message = capped(message);
        t.message_size = message.len() as i64;
        for (k, v) in headers {
            if k == b"tagger" {
                t.tagger = Some(author(&v));
            }
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_commit() {
        let data = b"tree 4b825dc642cb6eb9a060e54bf8d69288fbee4904\n\
parent 1111111111111111111111111111111111111111\n\
author A U Thor <a@example.com> 1700000000 +0100\n\
committer C O Mitter <c@example.com> 1700000100 -0200\n\
\n\
subject line\n\nbody\n";
        let c = commit(&RawObject {
            oid: "abc".into(),
            kind: "commit".into(),
            data: data.to_vec(),
        });
        assert_eq!(c.subject, b"subject line");
        assert_eq!(c.body, b"subject line\n\nbody\n");
        assert_eq!(c.parent_ids, vec!["1".repeat(40)]);
        let a = c.author.unwrap();
        assert_eq!(a.name, b"A U Thor");
        assert_eq!(a.email, b"a@example.com");
        assert_eq!(a.date.unwrap().seconds, 1_700_000_000);
        assert_eq!(c.committer.unwrap().timezone, b"-0200");
    }
}
