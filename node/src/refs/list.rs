//! ListRefs, the listing that grows with the repository: git's output is read line by
//! line and sent in pages, never collected whole.

use std::path::PathBuf;

use refvote_proto::gitaly::list_refs_request::sort_by::Key;
use refvote_proto::gitaly::{
    ListRefsRequest, ListRefsResponse, SortDirection, list_refs_response::Reference,
};
use tokio::sync::mpsc;
use tonic::Status;
use tonic::codegen::BoxStream;

use crate::error::NodeError;
use crate::git::{Git, Run};

/// Refs per response message (Gitaly sends chunks of similar size).
const PAGE: usize = 100;

/// git's stdout line by line (without the newline); after the last line, git's exit
/// is checked. Dropping it early stops git.
pub struct Lines {
    run: Option<Run>,
    buf: Vec<u8>,
    pos: usize,
}

impl Lines {
    pub fn new(run: Run) -> Lines {
        Lines {
            run: Some(run),
            buf: Vec::new(),
            pos: 0,
        }
    }

    pub async fn next(&mut self) -> Result<Option<Vec<u8>>, NodeError> {
        loop {
            if let Some(nl) = self.buf[self.pos..].iter().position(|b| *b == b'\n') {
                let line = self.buf[self.pos..self.pos + nl].to_vec();
                self.pos += nl + 1;
                return Ok(Some(line));
            }
            let Some(run) = self.run.as_mut() else {
                // The end: an unterminated last line, then nothing.
                if self.pos < self.buf.len() {
                    let line = self.buf[self.pos..].to_vec();
                    self.pos = self.buf.len();
                    return Ok(Some(line));
                }
                return Ok(None);
            };
            self.buf.drain(..self.pos);
            self.pos = 0;
            match run.chunk().await {
                Some(chunk) => self.buf.extend_from_slice(&chunk?),
                None => {
                    let run = self.run.take().expect("checked above");
                    run.wait().await?.check()?;
                }
            }
        }
    }
}

/// for-each-ref's `--sort` for a ListRefs request.
fn list_sort(req: &ListRefsRequest) -> Result<String, NodeError> {
    let Some(sort) = req.sort_by else {
        return Ok("refname".into());
    };
    let key = match Key::try_from(sort.key) {
        Ok(Key::Refname) => "refname",
        Ok(Key::Creatordate) => "creatordate",
        Ok(Key::Authordate) => "authordate",
        Ok(Key::Committerdate) => "committerdate",
        Err(_) => return Err(NodeError::invalid(format!("unknown sort key {}", sort.key))),
    };
    match SortDirection::try_from(sort.direction) {
        Ok(SortDirection::Ascending) => Ok(key.into()),
        Ok(SortDirection::Descending) => Ok(format!("-{key}")),
        Err(_) => Err(NodeError::invalid(format!(
            "unknown sort direction {}",
            sort.direction
        ))),
    }
}

/// Validates a ListRefs request and starts streaming its answer.
pub fn list_refs(
    git: &Git,
    repo: PathBuf,
    req: ListRefsRequest,
) -> Result<BoxStream<ListRefsResponse>, NodeError> {
    if req.patterns.is_empty() {
        return Err(NodeError::invalid(
            "patterns must have at least one entry, e.g. \"refs/\" for every ref",
        ));
    }
    let mut patterns = Vec::new();
    for p in &req.patterns {
        let p = std::str::from_utf8(p)
            .ok()
            .filter(|p| !p.is_empty() && !p.starts_with('-') && !p.chars().any(char::is_control))
            .ok_or_else(|| {
                NodeError::invalid(format!(
                    "invalid pattern {:?}: a ref name prefix or glob such as refs/heads/ is needed",
                    String::from_utf8_lossy(p)
                ))
            })?;
        patterns.push(p.to_owned());
    }
    let mut points_at = Vec::new();
    for oid in &req.pointing_at_oids {
        let oid = std::str::from_utf8(oid)
            .ok()
            .filter(|o| super::names::is_oid(o, o.len()) && (o.len() == 40 || o.len() == 64))
            .ok_or_else(|| {
                NodeError::invalid(format!(
                    "pointing_at_oids: {:?} is not a full object id",
                    String::from_utf8_lossy(oid)
                ))
            })?;
        points_at.push(format!("--points-at={oid}"));
    }
    let mut cmd = git
        .command(["for-each-ref"])
        .arg("--format=%(refname)%00%(objectname)%00%(*objectname)")
        .arg(format!("--sort={}", list_sort(&req)?))
        .git_dir(&repo);
    for p in points_at {
        cmd = cmd.arg(p);
    }
    cmd = cmd.arg("--");
    for p in patterns {
        cmd = cmd.arg(p);
    }
    let run = cmd.spawn()?;
    let head = req.head;
    let peel = req.peel_tags;
    let git = git.clone();
    let (tx, rx) = mpsc::channel::<Result<ListRefsResponse, Status>>(1);
    tokio::spawn(async move {
        let mut page = Vec::new();
        if head {
            // HEAD first, resolved; an unborn HEAD is left out, as Gitaly does.
            match super::names::resolve(&git, &repo, "HEAD").await {
                Ok(Some(oid)) => page.push(Reference {
                    name: b"HEAD".to_vec(),
                    target: oid,
                    peeled_target: String::new(),
                }),
                Ok(None) => {}
                Err(e) => {
                    let _ = tx.send(Err(e.into())).await;
                    return;
                }
            }
        }
        let mut lines = Lines::new(run);
        let result = loop {
            let line = match lines.next().await {
                Ok(Some(l)) => l,
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            };
            let mut f = line.split(|b| *b == 0);
            let (Some(name), Some(target), peeled) = (f.next(), f.next(), f.next()) else {
                continue;
            };
            page.push(Reference {
                name: name.to_vec(),
                target: String::from_utf8_lossy(target).into_owned(),
                peeled_target: if peel {
                    String::from_utf8_lossy(peeled.unwrap_or_default()).into_owned()
                } else {
                    String::new()
                },
            });
            if page.len() >= PAGE {
                let references = std::mem::take(&mut page);
                if tx
                    .send(Ok(ListRefsResponse {
                        references,
                        pagination_cursor: None,
                    }))
                    .await
                    .is_err()
                {
                    return; // the client went away; dropping `lines` stops git
                }
            }
        };
        match result {
            Ok(()) if !page.is_empty() => {
                let _ = tx
                    .send(Ok(ListRefsResponse {
                        references: page,
                        pagination_cursor: None,
                    }))
                    .await;
            }
            Ok(()) => {}
            Err(e) => {
                let _ = tx.send(Err(e.into())).await;
            }
        }
    });
    Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
}
