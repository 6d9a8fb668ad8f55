//! Reading objects through one `git cat-file --batch` of a call's own, for the
//! operation service (its writes read objects as written, without the mailmap the read
//! engine applies); revisions are checked by `refs::names::revision`.
//!
//! One process answers every lookup of a call, so listing a hundred commits costs one
//! fork, not a hundred. Reads go through the read engine ([`crate::engine`]) instead.

use refvote_proto::gitaly::GitCommit;
use tokio::sync::mpsc;
use tonic::Status;

use super::error::NodeError;
use super::git::{Git, Run};
use super::storage::RepoPath;

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
            .envs(repo.object_env())
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

/// Parses a raw commit object (`git cat-file commit` output) the way Gitaly presents it
/// (`object::parse_commit`).
pub fn parse_commit(oid: &str, data: &[u8]) -> GitCommit {
    crate::object::parse_commit(oid, data).commit
}

/// A full object id (40 or 64 hex digits).
pub fn is_object_id(s: &str) -> bool {
    (s.len() == 40 || s.len() == 64) && s.bytes().all(|b| b.is_ascii_hexdigit())
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
        assert_eq!(
            c.signature_type,
            refvote_proto::gitaly::SignatureType::Ssh as i32
        );
    }

    #[test]
    fn revisions_and_paths_are_checked() {
        // Revisions are checked by the node's one validator (refs::names::revision).
        use crate::refs::names::revision;
        assert!(revision("revision", b"main").is_ok());
        for bad in [&b""[..], b"-x", b"a b", b"a:b"] {
            assert!(revision("revision", bad).is_err());
        }
        // Tree paths: only the canonical form of a path can name an entry (Gitaly).
        use crate::commit::tree::entry_path;
        assert_eq!(entry_path("a/b"), Some(("a", "b")));
        for bad in ["../x", "a/../b", "/etc", "a//b", "./a"] {
            assert_eq!(entry_path(bad), None, "{bad:?}");
        }
    }
}
