//! Commits looked up by name: FindCommit, ListCommitsByOid, ListCommitsByRefName,
//! GetCommitMessages, GetCommitSignatures, CommitIsAncestor and CommitStats. All but
//! the last two, and FindCommit's trailers, start no process: the read engine
//! answers. A name that resolves to no commit is left out (or an empty answer), as in
//! Gitaly; ListCommitsByOid's caller even relies on it.

use refvote_proto::gitaly::get_commit_signatures_response::Signer;
use refvote_proto::gitaly::list_commits_by_ref_name_response::CommitForRef;
use refvote_proto::gitaly::{
    CommitIsAncestorRequest, CommitIsAncestorResponse, CommitStatsRequest, CommitStatsResponse,
    CommitTrailer, FindCommitRequest, FindCommitResponse, GetCommitMessagesRequest,
    GetCommitMessagesResponse, GetCommitSignaturesRequest, GetCommitSignaturesResponse,
    ListCommitsByOidRequest, ListCommitsByOidResponse, ListCommitsByRefNameRequest,
    ListCommitsByRefNameResponse,
};
use tonic::Status;
use tonic::codegen::BoxStream;

use crate::engine::{Kind, MAX_OBJECT};
use crate::error::NodeError;
use crate::object;
use crate::refs::names;
use crate::respond::{Batches, Gone, send_bytes, stream_from};
use crate::state::NodeState;
use crate::storage::RepoPath;

/// Gitaly's trailer parser bounds: at most this many, keys and values this long.
const MAX_TRAILERS: usize = 64;
const MAX_TRAILER_KEY: usize = 128;
const MAX_TRAILER_VALUE: usize = 512;

pub async fn find_commit(
    node: &NodeState,
    req: FindCommitRequest,
) -> Result<FindCommitResponse, Status> {
    let repo = node.storages.existing(req.repository.as_ref())?;
    let rev = names::revision("revision", &req.revision)?;
    let mut reader = node.reads.reader(&repo).await?;
    let Some(mut commit) = reader.commit(rev).await? else {
        return Ok(FindCommitResponse { commit: None });
    };
    if req.trailers {
        commit.trailers = trailers_of(node, &repo, &commit.id).await?;
    }
    Ok(FindCommitResponse {
        commit: Some(commit),
    })
}

/// A commit's trailers as git finds them (`%(trailers:unfold,separator=%x00)`),
/// parsed as Gitaly parses them.
async fn trailers_of(
    node: &NodeState,
    repo: &RepoPath,
    oid: &str,
) -> Result<Vec<CommitTrailer>, NodeError> {
    let (out, exit) = node
        .git
        .command([
            "show",
            "--no-patch",
            "--format=%(trailers:unfold,separator=%x00)",
        ])
        .arg(oid)
        .repo(repo)
        .spawn()?
        .output(1 << 20)
        .await?;
    exit.check()?;
    let line = out.strip_suffix(b"\n").unwrap_or(&out);
    Ok(parse_trailers(line))
}

/// Gitaly's `trailerparser.Parse`: NUL-separated `key: value` items.
pub fn parse_trailers(input: &[u8]) -> Vec<CommitTrailer> {
    let mut out = Vec::new();
    for item in input.split(|b| *b == 0) {
        if out.len() >= MAX_TRAILERS {
            break;
        }
        let Some(sep) = item.iter().position(|b| *b == b':').filter(|i| *i > 0) else {
            continue;
        };
        let key = &item[..sep];
        let value = item[sep + 1..].trim_ascii();
        if key.len() > MAX_TRAILER_KEY || value.len() > MAX_TRAILER_VALUE {
            break;
        }
        out.push(CommitTrailer {
            key: key.to_vec(),
            value: value.to_vec(),
        });
    }
    out
}

pub fn list_commits_by_oid(
    node: &NodeState,
    req: ListCommitsByOidRequest,
) -> Result<BoxStream<ListCommitsByOidResponse>, Status> {
    let repo = node.storages.existing(req.repository.as_ref())?;
    let reads = node.reads.clone();
    Ok(stream_from(move |tx| async move {
        let mut reader = reads.reader(&repo).await?;
        let mut out = Batches::new(tx, |commits| ListCommitsByOidResponse { commits });
        for chunk in req.oid.chunks(crate::engine::WINDOW) {
            for commit in reader.commits(chunk).await?.into_iter().flatten() {
                if out.push(commit).await.is_err() {
                    return Ok(());
                }
            }
        }
        let _ = out.finish().await;
        Ok(())
    }))
}

pub fn list_commits_by_ref_name(
    node: &NodeState,
    req: ListCommitsByRefNameRequest,
) -> Result<BoxStream<ListCommitsByRefNameResponse>, Status> {
    let repo = node.storages.existing(req.repository.as_ref())?;
    let reads = node.reads.clone();
    Ok(stream_from(move |tx| async move {
        let mut reader = reads.reader(&repo).await?;
        let mut out = Batches::new(tx, |commit_refs| ListCommitsByRefNameResponse {
            commit_refs,
        });
        for chunk in req.ref_names.chunks(crate::engine::WINDOW) {
            // A name that is not UTF-8 or spans lines names nothing git can resolve.
            let names: Vec<String> = chunk
                .iter()
                .map(|r| match std::str::from_utf8(r) {
                    Ok(s) if !s.is_empty() && !s.contains('\0') => s.to_owned(),
                    _ => "\u{1}".to_owned(),
                })
                .collect();
            let commits = reader.commits(&names).await?;
            for (name, commit) in chunk.iter().zip(commits) {
                let Some(commit) = commit else { continue };
                let item = CommitForRef {
                    commit: Some(commit),
                    ref_name: name.clone(),
                };
                if out.push(item).await.is_err() {
                    return Ok(());
                }
            }
        }
        let _ = out.finish().await;
        Ok(())
    }))
}

/// Each commit's id alone, then its message in 128 KiB pieces. An id that names no
/// commit fails the call (Gitaly: "failed to get commit message").
pub fn get_commit_messages(
    node: &NodeState,
    req: GetCommitMessagesRequest,
) -> Result<BoxStream<GetCommitMessagesResponse>, Status> {
    let repo = node.storages.existing(req.repository.as_ref())?;
    let reads = node.reads.clone();
    Ok(stream_from(move |tx| async move {
        let mut reader = reads.reader(&repo).await?;
        for id in req.commit_ids {
            let raw = match reader
                .object(&format!("{id}^{{commit}}"), MAX_OBJECT)
                .await?
            {
                Some(o) if o.info.kind == Kind::Commit => o.data,
                _ => {
                    return Err(Status::internal(
                        "failed to get commit message: object not found",
                    ));
                }
            };
            let head = GetCommitMessagesResponse {
                commit_id: id.clone(),
                message: Vec::new(),
            };
            if tx.send(Ok(head)).await.is_err() {
                return Ok(());
            }
            let message = object::message(&raw);
            if !message.is_empty()
                && send_bytes(&tx, None, message, |_, message| GetCommitMessagesResponse {
                    commit_id: String::new(),
                    message,
                })
                .await
                .is_err()
            {
                return Ok(());
            }
        }
        Ok(())
    }))
}

/// Signed commits only: the first signature, the signer (always the user: this node
/// signs nothing itself), author and committer, then the signed text in 128 KiB
/// pieces. Raw objects, not mailmapped: the signed bytes must be as written.
pub fn get_commit_signatures(
    node: &NodeState,
    req: GetCommitSignaturesRequest,
) -> Result<BoxStream<GetCommitSignaturesResponse>, Status> {
    let repo = node.storages.existing(req.repository.as_ref())?;
    if req.commit_ids.is_empty() {
        return Err(Status::invalid_argument("empty CommitIds"));
    }
    for id in &req.commit_ids {
        if !names::is_oid(id, 40) && !names::is_oid(id, 64) {
            return Err(Status::invalid_argument(format!(
                "invalid object ID: {id:?}, expected length 40, got {}",
                id.len()
            )));
        }
    }
    let reads = node.reads.clone();
    Ok(stream_from(move |tx| async move {
        let mut reader = reads.raw_reader(&repo).await?;
        for id in req.commit_ids {
            let Some(parsed) = reader.parsed_commit(&id).await? else {
                continue;
            };
            let Some(signature) = parsed.signatures.first() else {
                continue;
            };
            let head = GetCommitSignaturesResponse {
                commit_id: parsed.commit.id.clone(),
                signature: signature.clone(),
                signer: Signer::User as i32,
                author: parsed.commit.author.clone(),
                committer: parsed.commit.committer.clone(),
                ..Default::default()
            };
            if tx.send(Ok(head)).await.is_err() {
                return Ok(());
            }
            let sent = send_bytes(&tx, None, &parsed.payload, |_, signed_text| {
                GetCommitSignaturesResponse {
                    signed_text,
                    ..Default::default()
                }
            })
            .await;
            if let Err(Gone) = sent {
                return Ok(());
            }
        }
        Ok(())
    }))
}

/// `git merge-base --is-ancestor`: any failure (an unknown commit included) is "no".
pub async fn commit_is_ancestor(
    node: &NodeState,
    req: CommitIsAncestorRequest,
) -> Result<CommitIsAncestorResponse, Status> {
    let repo = node.storages.existing(req.repository.as_ref())?;
    if req.ancestor_id.is_empty() {
        return Err(Status::invalid_argument("empty ancestor sha"));
    }
    if req.child_id.is_empty() {
        return Err(Status::invalid_argument("empty child sha"));
    }
    let ancestor = names::revision("ancestor_id", req.ancestor_id.as_bytes())?;
    let child = names::revision("child_id", req.child_id.as_bytes())?;
    let exit = node
        .git
        .command(["merge-base", "--is-ancestor", "--end-of-options"])
        .arg(ancestor)
        .arg(child)
        .repo(&repo)
        .spawn()
        .map_err(NodeError::from)?
        .wait()
        .await
        .map_err(NodeError::from)?;
    Ok(CommitIsAncestorResponse {
        value: exit.success(),
    })
}

/// Lines added and deleted against the first parent (the empty tree for a root
/// commit), from `git diff --numstat`; binary files count as files only.
pub async fn commit_stats(
    node: &NodeState,
    req: CommitStatsRequest,
) -> Result<CommitStatsResponse, Status> {
    let repo = node.storages.existing(req.repository.as_ref())?;
    let rev = names::revision("revision", &req.revision)?;
    let mut reader = node.reads.reader(&repo).await?;
    let Some(commit) = reader.commit(rev).await? else {
        return Err(Status::internal("object not found"));
    };
    drop(reader);
    let from = match commit.parent_ids.is_empty() {
        true => empty_tree(commit.id.len()).to_owned(),
        false => format!("{}^", commit.id),
    };
    let (out, exit) = node
        .git
        .command(["diff", "--numstat", "--end-of-options"])
        .arg(from)
        .arg(&commit.id)
        .repo(&repo)
        .spawn()
        .map_err(NodeError::from)?
        .output(256 << 20)
        .await
        .map_err(NodeError::from)?;
    exit.check().map_err(NodeError::from)?;
    let (additions, deletions, files) = numstat_totals(&out)?;
    Ok(CommitStatsResponse {
        oid: commit.id,
        additions,
        deletions,
        files,
    })
}

/// Sums `git diff --numstat` lines; `-` counts (binary files) add nothing.
fn numstat_totals(out: &[u8]) -> Result<(i32, i32, i32), Status> {
    let (mut added, mut deleted, mut files) = (0i32, 0i32, 0i32);
    for line in String::from_utf8_lossy(out).lines() {
        let mut split = line.splitn(3, '\t');
        let (Some(a), Some(d), Some(_)) = (split.next(), split.next(), split.next()) else {
            return Err(Status::internal(format!("invalid numstat line {line:?}")));
        };
        files += 1;
        if a == "-" && d == "-" {
            continue;
        }
        let parse = |s: &str| {
            s.parse::<i32>()
                .map_err(|_| Status::internal(format!("invalid numstat line {line:?}")))
        };
        added = added.saturating_add(parse(a)?);
        deleted = deleted.saturating_add(parse(d)?);
    }
    Ok((added, deleted, files))
}

/// The empty tree's id in a repository whose ids have `len` hex digits.
pub fn empty_tree(len: usize) -> &'static str {
    if len == 64 {
        "6ef19b41225c5369f1c104d45d8d85efa9b057b53b14b4b9b939dd74decc5321"
    } else {
        "4b825dc642cb6eb9a060e54bf8d69288fbee4904"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailers_parse_as_gitaly_parses_them() {
        let t = parse_trailers(b"Signed-off-by: A <a@x>\0Co-authored-by:  B \0nocolon\0:novalue");
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].key, b"Signed-off-by");
        assert_eq!(t[0].value, b"A <a@x>");
        assert_eq!(t[1].value, b"B");
        let long = format!("K: {}", "v".repeat(600));
        assert!(parse_trailers(long.as_bytes()).is_empty());
    }

    #[test]
    fn numstat_sums_text_and_counts_binary() {
        let out = b"3\t1\ta.txt\n-\t-\tb.bin\n10\t0\tc/d.txt\n";
        assert_eq!(numstat_totals(out).unwrap(), (13, 1, 3));
        assert!(numstat_totals(b"garbage\n").is_err());
    }
}
