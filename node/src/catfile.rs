//! Reading objects through one long-lived `git cat-file --batch` per call, and the
//! object parsing the commit, blob and operation services share (commits, trees, tree
//! path validation; revisions are checked by `refs::names::revision`).
//!
//! One process answers every lookup of a call, so listing a hundred commits costs one
//! fork, not a hundred. Contents are read in bounded pieces: a blob is streamed to the
//! client as it comes out of git, never held whole.

use refvote_proto::gitaly::{CommitAuthor, CommitTrailer, GitCommit, SignatureType};
use tokio::sync::mpsc;
use tonic::Status;

use super::error::NodeError;
use super::git::{Git, Run};
use super::storage::RepoPath;

/// Commit message bytes sent in a GitCommit's body; body_size still tells the real
/// length (Gitaly's limit too).
pub const MAX_BODY: usize = 10 * 1024;
/// Largest commit or tree object read whole.
pub const MAX_OBJECT: u64 = 64 * 1024 * 1024;

/// What `cat-file --batch` says about an object before its contents.
#[derive(Debug, Clone)]
pub struct Header {
    pub oid: String,
    pub kind: String,
    pub size: u64,
}

pub struct CatFile {
    names: mpsc::Sender<Result<Vec<u8>, Status>>,
    run: Run,
    buf: Vec<u8>,
    /// Content bytes of the current object not read yet, plus its trailing LF.
    pending: u64,
}

impl CatFile {
    pub fn start(git: &Git, repo: &RepoPath) -> Result<CatFile, NodeError> {
        let (names, rx) = mpsc::channel(16);
        let run = git
            .command(["cat-file", "--batch"])
            .git_dir(&repo.path)
            .stdin(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
            .spawn()?;
        Ok(CatFile {
            names,
            run,
            buf: Vec::new(),
            pending: 0,
        })
    }

    /// Looks `name` up (an object id or any `rev:path` expression); `None` if git finds
    /// nothing. The caller reads the contents with [`CatFile::read`] or leaves them: the
    /// next lookup skips what was not read.
    pub async fn header(&mut self, name: &str) -> Result<Option<Header>, NodeError> {
        if name.contains('\n') || name.is_empty() {
            return Err(NodeError::invalid(format!(
                "object name {name:?} is empty or spans lines"
            )));
        }
        while self.pending > 0 {
            let n = self.pending.min(64 * 1024) as usize;
            self.take(n).await?;
            self.pending -= n as u64;
        }
        let mut line = name.as_bytes().to_vec();
        line.push(b'\n');
        if self.names.send(Ok(line)).await.is_err() {
            return Err(self.broken());
        }
        let line = self.line().await?;
        let line = String::from_utf8_lossy(&line).into_owned();
        let fields: Vec<&str> = line.split(' ').collect();
        match fields.as_slice() {
            [oid, kind, size] => {
                let size: u64 = size
                    .parse()
                    .map_err(|_| self.protocol(&format!("bad header {line:?}")))?;
                self.pending = size + 1;
                Ok(Some(Header {
                    oid: (*oid).to_owned(),
                    kind: (*kind).to_owned(),
                    size,
                }))
            }
            // "<name> missing", "<name> ambiguous", ...: nothing usable by that name.
            _ => Ok(None),
        }
    }

    /// Up to `max` more content bytes of the current object; empty at its end.
    pub async fn read(&mut self, max: usize) -> Result<Vec<u8>, NodeError> {
        let left = self.pending.saturating_sub(1);
        if left == 0 {
            return Ok(Vec::new());
        }
        if self.buf.is_empty() && !self.fill().await? {
            return Err(self.broken());
        }
        let n = (left.min(max as u64) as usize).min(self.buf.len());
        let out: Vec<u8> = self.buf.drain(..n).collect();
        self.pending -= n as u64;
        Ok(out)
    }

    /// The whole object, if it exists and is at most [`MAX_OBJECT`] bytes.
    pub async fn object(&mut self, name: &str) -> Result<Option<(Header, Vec<u8>)>, NodeError> {
        let Some(h) = self.header(name).await? else {
            return Ok(None);
        };
        if h.size > MAX_OBJECT {
            return Err(NodeError::invalid(format!(
                "object {} is {} bytes, more than this call reads whole ({MAX_OBJECT})",
                h.oid, h.size
            )));
        }
        let mut data = Vec::with_capacity(h.size as usize);
        while (data.len() as u64) < h.size {
            data.extend(self.read(256 * 1024).await?);
        }
        Ok(Some((h, data)))
    }

    /// A commit, parsed; `None` if `name` does not name a commit.
    pub async fn commit(&mut self, name: &str) -> Result<Option<GitCommit>, NodeError> {
        match self.object(&format!("{name}^{{commit}}")).await? {
            Some((h, data)) if h.kind == "commit" => Ok(Some(parse_commit(&h.oid, &data))),
            _ => Ok(None),
        }
    }

    async fn fill(&mut self) -> Result<bool, NodeError> {
        match self.run.chunk().await {
            Some(chunk) => {
                self.buf.extend(chunk?);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    async fn take(&mut self, n: usize) -> Result<(), NodeError> {
        while self.buf.len() < n {
            if !self.fill().await? {
                return Err(self.broken());
            }
        }
        self.buf.drain(..n);
        Ok(())
    }

    async fn line(&mut self) -> Result<Vec<u8>, NodeError> {
        loop {
            if let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
                let mut line: Vec<u8> = self.buf.drain(..=i).collect();
                line.pop();
                return Ok(line);
            }
            if !self.fill().await? {
                return Err(self.broken());
            }
        }
    }

    fn broken(&self) -> NodeError {
        self.protocol("git cat-file --batch stopped answering")
    }

    fn protocol(&self, what: &str) -> NodeError {
        NodeError::io(
            what.to_owned(),
            std::io::Error::other("unexpected git cat-file output"),
        )
    }
}

/// Parses a raw commit object (`git cat-file commit` output) the way Gitaly presents it.
pub fn parse_commit(oid: &str, data: &[u8]) -> GitCommit {
    let split = find(data, b"\n\n").unwrap_or(data.len());
    let (head, message) = (&data[..split], data.get(split + 2..).unwrap_or(&[]));
    let mut commit = GitCommit {
        id: oid.to_owned(),
        body_size: message.len() as i64,
        body: message[..message.len().min(MAX_BODY)].to_vec(),
        subject: subject(message),
        ..Default::default()
    };
    let mut lines = head.split(|b| *b == b'\n').peekable();
    while let Some(line) = lines.next() {
        let (key, value) = match find(line, b" ") {
            Some(i) => (&line[..i], &line[i + 1..]),
            None => (line, &[][..]),
        };
        match key {
            b"tree" => commit.tree_id = String::from_utf8_lossy(value).into_owned(),
            b"parent" => commit
                .parent_ids
                .push(String::from_utf8_lossy(value).into_owned()),
            b"author" => commit.author = Some(parse_signature(value)),
            b"committer" => commit.committer = Some(parse_signature(value)),
            b"encoding" => commit.encoding = String::from_utf8_lossy(value).into_owned(),
            b"gpgsig" | b"gpgsig-sha256" => {
                commit.signature_type = signature_type(value) as i32;
            }
            _ => {}
        }
        // Continuation lines (a signature's body) start with a space.
        while lines.peek().is_some_and(|l| l.starts_with(b" ")) {
            lines.next();
        }
    }
    commit
}

fn signature_type(first_line: &[u8]) -> SignatureType {
    if first_line.starts_with(b"-----BEGIN PGP") {
        SignatureType::Pgp
    } else if first_line.starts_with(b"-----BEGIN SSH") {
        SignatureType::Ssh
    } else if first_line.starts_with(b"-----BEGIN SIGNED MESSAGE") {
        SignatureType::X509
    } else {
        SignatureType::None
    }
}

/// The first line of a message, without its line end (Gitaly's subject).
fn subject(message: &[u8]) -> Vec<u8> {
    let line = message.split(|b| *b == b'\n').next().unwrap_or(&[]);
    line.strip_suffix(b"\r").unwrap_or(line).to_vec()
}

/// `Name <email> 1700000000 +0100`.
pub fn parse_signature(value: &[u8]) -> CommitAuthor {
    let mut author = CommitAuthor::default();
    let (Some(open), Some(close)) = (find(value, b"<"), rfind(value, b">")) else {
        author.name = value.to_vec();
        return author;
    };
    author.name = value[..open]
        .strip_suffix(b" ")
        .unwrap_or(&value[..open])
        .to_vec();
    author.email = value.get(open + 1..close).unwrap_or(&[]).to_vec();
    let rest = String::from_utf8_lossy(value.get(close + 1..).unwrap_or(&[])).into_owned();
    let mut parts = rest.split_whitespace();
    if let Some(seconds) = parts.next().and_then(|s| s.parse::<i64>().ok()) {
        author.date = Some(prost_types::Timestamp { seconds, nanos: 0 });
    }
    if let Some(tz) = parts.next() {
        author.timezone = tz.as_bytes().to_vec();
    }
    author
}

/// Trailers (`Key: value` lines of the message's last paragraph), as
/// `git interpret-trailers --parse` finds them.
pub async fn trailers(
    git: &Git,
    repo: &RepoPath,
    message: &[u8],
) -> Result<Vec<CommitTrailer>, NodeError> {
    let input = message.to_vec();
    let (out, exit) = git
        .command(["interpret-trailers", "--parse"])
        .git_dir(&repo.path)
        .stdin(Box::pin(tokio_stream::once(Ok(input))))
        .output(MAX_OBJECT as usize)
        .await?;
    exit.check()?;
    Ok(out
        .split(|b| *b == b'\n')
        .filter_map(|line| {
            let i = find(line, b": ")?;
            Some(CommitTrailer {
                key: line[..i].to_vec(),
                value: line[i + 2..].to_vec(),
            })
        })
        .collect())
}

/// A full object id (40 or 64 hex digits).
pub fn is_object_id(s: &str) -> bool {
    (s.len() == 40 || s.len() == 64) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A path inside a tree: relative, no `.`/`..`/empty components, no NUL or newline.
/// Leading and trailing slashes are dropped first.
pub fn validate_tree_path(path: &[u8], what: &str) -> Result<String, NodeError> {
    let p = std::str::from_utf8(path)
        .map_err(|_| NodeError::invalid(format!("{what} is not UTF-8")))?;
    let trimmed = p.trim_end_matches('/');
    if trimmed.starts_with('/') {
        return Err(NodeError::invalid(format!("{what} {p:?} is absolute")));
    }
    if trimmed.contains(['\0', '\n'])
        || trimmed
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(NodeError::invalid(format!(
            "{what} {p:?}: relative path escapes root directory or is malformed"
        )));
    }
    Ok(trimmed.to_owned())
}

/// One entry of a tree object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeItem {
    pub mode: u32,
    pub name: Vec<u8>,
    pub oid: String,
}

/// Parses a raw tree object: `<octal mode> <name>\0<binary id>` repeated. The id's
/// length follows the repository's hash (`oid_len` hex digits).
pub fn parse_tree(data: &[u8], oid_len: usize) -> Vec<TreeItem> {
    let raw = oid_len / 2;
    let mut items = Vec::new();
    let mut rest = data;
    while let Some(sp) = find(rest, b" ") {
        let Some(nul) = find(&rest[sp..], b"\0").map(|i| i + sp) else {
            break;
        };
        if rest.len() < nul + 1 + raw {
            break;
        }
        let mode = u32::from_str_radix(&String::from_utf8_lossy(&rest[..sp]), 8).unwrap_or(0);
        items.push(TreeItem {
            mode,
            name: rest[sp + 1..nul].to_vec(),
            oid: hex::encode(&rest[nul + 1..nul + 1 + raw]),
        });
        rest = &rest[nul + 1 + raw..];
    }
    items
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn rfind(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).rposition(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_parse_like_gitaly_shows_them() {
        let raw = b"tree 4b825dc642cb6eb9a060e54bf8d69288fbee4904\n\
parent 1111111111111111111111111111111111111111\n\
author A U Thor <a@example.com> 1700000000 +0100\n\
committer C O Mitter <c@example.com> 1700000001 -0200\n\
gpgsig -----BEGIN SSH SIGNATURE-----\n abc\n -----END SSH SIGNATURE-----\n\
\nSubject line\r\n\nBody\n";
        let c = parse_commit("abc", raw);
        assert_eq!(c.tree_id, "4b825dc642cb6eb9a060e54bf8d69288fbee4904");
        assert_eq!(c.parent_ids.len(), 1);
        assert_eq!(c.subject, b"Subject line");
        assert_eq!(c.body, b"Subject line\r\n\nBody\n");
        let a = c.author.unwrap();
        assert_eq!(a.name, b"A U Thor");
        assert_eq!(a.email, b"a@example.com");
        assert_eq!(a.date.unwrap().seconds, 1_700_000_000);
        assert_eq!(a.timezone, b"+0100");
        assert_eq!(c.committer.unwrap().timezone, b"-0200");
        assert_eq!(c.signature_type, SignatureType::Ssh as i32);
    }

    #[test]
    fn revisions_and_paths_are_checked() {
        // Revisions are checked by the node's one validator (refs::names::revision).
        use crate::refs::names::revision;
        assert!(revision("revision", b"main").is_ok());
        for bad in [&b""[..], b"-x", b"a b", b"a:b"] {
            assert!(revision("revision", bad).is_err());
        }
        assert_eq!(validate_tree_path(b"a/b/", "path").unwrap(), "a/b");
        for bad in [&b"../x"[..], b"a/../b", b"/etc", b"a//b", b"./a"] {
            assert!(validate_tree_path(bad, "path").is_err(), "{bad:?}");
        }
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
        assert_eq!(items[1].name, b"dir");
        assert_eq!(items[1].oid, "22".repeat(20));
    }
}
