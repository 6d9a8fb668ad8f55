//! One `git cat-file --batch-command --buffer -Z` process and its protocol: commands
//! `info <name>` / `contents <name>` terminated by NUL, each batch ended by `flush`;
//! answers `<oid> <type> <size>` NUL, then for `contents` the object's bytes and a
//! NUL, or `<name> missing` NUL (also "ambiguous" and the like: nothing usable).
//!
//! The process is in a known state only between answers. Whoever stops reading in the
//! middle of one (a client that went away mid-blob, a timeout, an I/O error) leaves it
//! [`Process::reusable`] false, and the pool stops it rather than hand it on.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout};

use crate::error::NodeError;
use crate::git::Git;

/// Longest object name sent (a revision with a path).
const MAX_NAME: usize = 64 * 1024;
/// Answers' header lines are short; a longer one means the stream is out of step.
const MAX_HEADER: usize = MAX_NAME + 128;
/// Commands per batch: keeps what is written ahead of reading far below a pipe's
/// capacity, so git never blocks on a full stdout while we block on its stdin.
pub const WINDOW: usize = 128;

/// The four object types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Commit,
    Tree,
    Blob,
    Tag,
}

impl Kind {
    fn parse(s: &str) -> Option<Kind> {
        match s {
            "commit" => Some(Kind::Commit),
            "tree" => Some(Kind::Tree),
            "blob" => Some(Kind::Blob),
            "tag" => Some(Kind::Tag),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Commit => "commit",
            Kind::Tree => "tree",
            Kind::Blob => "blob",
            Kind::Tag => "tag",
        }
    }
}

/// What git says about an object before its contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub oid: String,
    pub kind: Kind,
    pub size: u64,
}

/// What a command asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ask {
    Info,
    Contents,
}

pub struct Process {
    _child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    /// Bytes of the current object's contents not read yet, plus its trailing NUL;
    /// 0 between answers.
    pending: u64,
    /// Answers asked for and not read yet.
    queued: usize,
    broken: bool,
    timeout: Duration,
}

impl Process {
    /// Starts the process for `git_dir`, with `env` (a quarantine's object
    /// directories) and, if `mailmap`, identities rewritten through the mailmap (as
    /// Gitaly's object readers do).
    pub fn spawn(
        git: &Git,
        git_dir: &Path,
        env: &[(String, String)],
        mailmap: bool,
    ) -> Result<Process, NodeError> {
        let mut args = Vec::with_capacity(4);
        if mailmap {
            args.push("--use-mailmap");
        }
        args.extend(["--batch-command", "--buffer", "-Z"]);
        let mut cmd = git.long_lived(git_dir, &[], env, &["cat-file"]);
        cmd.args(&args);
        let mut child = cmd
            .spawn()
            .map_err(|e| NodeError::io("starting git cat-file (set git.bin_path)", e))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(NodeError::io(
                "starting git cat-file",
                std::io::Error::other("no pipes"),
            ));
        };
        Ok(Process {
            _child: child,
            stdin,
            stdout: BufReader::with_capacity(64 * 1024, stdout),
            pending: 0,
            queued: 0,
            broken: false,
            timeout: git.timeout(),
        })
    }

    /// Between answers and never out of step: may serve another caller.
    pub fn reusable(&self) -> bool {
        !self.broken && self.pending == 0 && self.queued == 0
    }

    /// Sends `asks` and a flush in one write. Whatever of the current object was not
    /// read is skipped first; unread answers of an earlier batch make this an error.
    pub async fn request(&mut self, asks: &[(Ask, &str)]) -> Result<(), NodeError> {
        if self.pending > 0 {
            self.skip().await?;
        }
        if self.queued > 0 {
            self.broken = true;
            return Err(protocol("a batch was sent before the last one was read"));
        }
        let mut line = Vec::with_capacity(asks.len() * 60 + 6);
        for (ask, name) in asks {
            check_name(name)?;
            line.extend_from_slice(match ask {
                Ask::Info => b"info ",
                Ask::Contents => b"contents ",
            });
            line.extend_from_slice(name.as_bytes());
            line.push(0);
        }
        line.extend_from_slice(b"flush\0");
        self.queued = asks.len();
        let timeout = self.timeout;
        let write = async {
            self.stdin.write_all(&line).await?;
            self.stdin.flush().await
        };
        match tokio::time::timeout(timeout, write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                self.broken = true;
                Err(NodeError::io("writing to git cat-file", e))
            }
            Err(_) => {
                self.broken = true;
                Err(timed_out(timeout))
            }
        }
    }

    /// The next answer's header; `None` if git found nothing by that name. After a
    /// found [`Ask::Contents`], the contents come next ([`Process::read`]).
    pub async fn answer(&mut self, ask: Ask) -> Result<Option<ObjectInfo>, NodeError> {
        if self.pending > 0 {
            self.skip().await?;
        }
        if self.queued == 0 {
            self.broken = true;
            return Err(protocol("an answer was read that was not asked for"));
        }
        let mut header = Vec::with_capacity(96);
        let timeout = self.timeout;
        let read = async {
            (&mut self.stdout)
                .take(MAX_HEADER as u64)
                .read_until(0, &mut header)
                .await
        };
        match tokio::time::timeout(timeout, read).await {
            Ok(Ok(n)) if n > 0 && header.last() == Some(&0) => {}
            Ok(Ok(_)) => {
                self.broken = true;
                return Err(protocol("git cat-file stopped answering"));
            }
            Ok(Err(e)) => {
                self.broken = true;
                return Err(NodeError::io("reading from git cat-file", e));
            }
            Err(_) => {
                self.broken = true;
                return Err(timed_out(timeout));
            }
        }
        header.pop();
        self.queued -= 1;
        let info = parse_header(&header);
        if let (Some(i), Ask::Contents) = (&info, ask) {
            self.pending = i.size + 1;
        }
        Ok(info)
    }

    /// Up to `max` more bytes of the current object's contents; empty at their end.
    pub async fn read(&mut self, max: usize) -> Result<Vec<u8>, NodeError> {
        if self.pending == 0 {
            return Ok(Vec::new());
        }
        let left = self.pending - 1;
        if left == 0 {
            self.finish_object().await?;
            return Ok(Vec::new());
        }
        let n = left.min(max.max(1) as u64) as usize;
        let mut buf = vec![0u8; n];
        let timeout = self.timeout;
        match tokio::time::timeout(timeout, self.stdout.read_exact(&mut buf)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                self.broken = true;
                return Err(NodeError::io("reading an object from git cat-file", e));
            }
            Err(_) => {
                self.broken = true;
                return Err(timed_out(timeout));
            }
        }
        self.pending -= n as u64;
        if self.pending == 1 {
            self.finish_object().await?;
        }
        Ok(buf)
    }

    /// The rest of the current object, whole.
    pub async fn read_rest(&mut self) -> Result<Vec<u8>, NodeError> {
        let mut data = Vec::with_capacity(self.pending.saturating_sub(1) as usize);
        loop {
            let chunk = self.read(256 * 1024).await?;
            if chunk.is_empty() {
                return Ok(data);
            }
            data.extend_from_slice(&chunk);
        }
    }

    /// Discards the rest of the current object.
    pub async fn skip(&mut self) -> Result<(), NodeError> {
        while self.pending > 0 {
            self.read(256 * 1024).await?;
        }
        Ok(())
    }

    /// Reads the NUL after an object's contents.
    async fn finish_object(&mut self) -> Result<(), NodeError> {
        let timeout = self.timeout;
        match tokio::time::timeout(timeout, self.stdout.read_u8()).await {
            Ok(Ok(0)) => {
                self.pending = 0;
                Ok(())
            }
            Ok(Ok(_)) => {
                self.broken = true;
                Err(protocol(
                    "an object's contents did not end where its size said",
                ))
            }
            Ok(Err(e)) => {
                self.broken = true;
                Err(NodeError::io("reading from git cat-file", e))
            }
            Err(_) => {
                self.broken = true;
                Err(timed_out(timeout))
            }
        }
    }
}

/// `<oid> <type> <size>`; anything else (`<name> missing`, `<name> ambiguous`) names
/// no object.
fn parse_header(header: &[u8]) -> Option<ObjectInfo> {
    let text = std::str::from_utf8(header).ok()?;
    let mut fields = text.split(' ');
    let (oid, kind, size) = (fields.next()?, fields.next()?, fields.next()?);
    if fields.next().is_some()
        || !(oid.len() == 40 || oid.len() == 64)
        || !oid.bytes().all(|b| b.is_ascii_hexdigit())
    {
        return None;
    }
    Some(ObjectInfo {
        oid: oid.to_owned(),
        kind: Kind::parse(kind)?,
        size: size.parse().ok()?,
    })
}

/// Whether `name` can be sent to git at all.
pub fn askable(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_NAME && !name.contains('\0')
}

fn check_name(name: &str) -> Result<(), NodeError> {
    if !askable(name) {
        return Err(NodeError::invalid(format!(
            "object name {:?} is empty, longer than {MAX_NAME} bytes or contains NUL",
            name.chars().take(80).collect::<String>()
        )));
    }
    Ok(())
}

fn protocol(what: &str) -> NodeError {
    NodeError::io(
        "reading from git cat-file",
        std::io::Error::other(what.to_owned()),
    )
}

fn timed_out(after: Duration) -> NodeError {
    NodeError::Git(crate::git::GitError::Timeout {
        command: "cat-file".into(),
        after,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_parse_and_misses_are_none() {
        let oid = "a".repeat(40);
        assert_eq!(
            parse_header(format!("{oid} blob 12").as_bytes()),
            Some(ObjectInfo {
                oid: oid.clone(),
                kind: Kind::Blob,
                size: 12
            })
        );
        assert_eq!(parse_header(b"main:nope missing"), None);
        assert_eq!(parse_header(b"a b missing"), None);
        assert_eq!(parse_header(format!("{oid} blob missing").as_bytes()), None);
        assert_eq!(parse_header(b"abc ambiguous"), None);
        assert_eq!(parse_header(format!("{oid} weird 1").as_bytes()), None);
    }
}
