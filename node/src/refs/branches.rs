//! Branch listings as Gitaly makes them: FindLocalBranches (every branch's commit from
//! `git for-each-ref`'s own fields, sorted, paged by full ref name, with exclude
//! patterns), FindAllBranches (local and remote branches, 20 per message, commits from
//! the read engine), the names of branches or tags containing a commit, and the refs
//! pointing at an object (FindRefsByOID).

use refvote_proto::gitaly::find_all_branches_response::Branch as AllBranch;
use refvote_proto::gitaly::find_local_branches_request::SortBy;
use refvote_proto::gitaly::{
    Branch, CommitAuthor, FindAllBranchesRequest, FindAllBranchesResponse,
    FindAllRemoteBranchesRequest, FindAllRemoteBranchesResponse, FindLocalBranchesRequest,
    FindLocalBranchesResponse, FindRefsByOidRequest, FindRefsByOidResponse, GitCommit,
    ListBranchNamesContainingCommitRequest, ListBranchNamesContainingCommitResponse,
    ListTagNamesContainingCommitRequest, ListTagNamesContainingCommitResponse,
};
use tonic::Status;
use tonic::codegen::BoxStream;

use super::{head, names};
use crate::error::NodeError;
use crate::object::{MAX_MESSAGE, parse_seconds, signature_type};
use crate::records::Records;
use crate::respond::{Chunker, stream_from};
use crate::state::NodeState;

/// FindAllBranches' branches per message (Gitaly's `lines.ItemsPerMessage`).
const BRANCHES_PER_MESSAGE: usize = 20;

/// The fields FindLocalBranches reads from for-each-ref, in Gitaly's order.
const LOCAL_FIELDS: &[&str] = &[
    "%(refname)",
    "%(objectname)",
    "%(authorname)",
    "%(subject)",
    "%(authoremail)",
    "%(authordate:unix)",
    "%(authordate:format:%z)",
    "%(committername)",
    "%(contents)",
    "%(committeremail)",
    "%(committerdate:unix)",
    "%(committerdate:format:%z)",
    "%(contents:signature)",
    "%(tree)",
    "%(parent)",
];

/// A branch from one for-each-ref record of [`LOCAL_FIELDS`] (Gitaly's `buildBranch`:
/// emails without their brackets, the body cut to 10 KiB and its size taken after).
fn branch_from_fields(fields: &[&[u8]]) -> Option<Branch> {
    if fields.len() != LOCAL_FIELDS.len() {
        return None;
    }
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let email = |b: &[u8]| {
        let s = b.strip_prefix(b"<").unwrap_or(b);
        s.strip_suffix(b">").unwrap_or(s).to_vec()
    };
    let date = |b: &[u8]| {
        Some(prost_types::Timestamp {
            seconds: parse_seconds(&text(b)),
            nanos: 0,
        })
    };
    let body = &fields[8][..fields[8].len().min(MAX_MESSAGE)];
    let parents: Vec<String> = text(fields[14])
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    let sig = fields[12].strip_suffix(b"\n").unwrap_or(fields[12]);
    Some(Branch {
        name: fields[0].to_vec(),
        target_commit: Some(GitCommit {
            id: text(fields[1]),
            subject: fields[3].to_vec(),
            body: body.to_vec(),
            body_size: body.len() as i64,
            author: Some(CommitAuthor {
                name: fields[2].to_vec(),
                email: email(fields[4]),
                date: date(fields[5]),
                timezone: fields[6].to_vec(),
            }),
            committer: Some(CommitAuthor {
                name: fields[7].to_vec(),
                email: email(fields[9]),
                date: date(fields[10]),
                timezone: fields[11].to_vec(),
            }),
            signature_type: signature_type(sig) as i32,
            tree_id: text(fields[13]),
            parent_ids: parents,
            ..Default::default()
        }),
    })
}

pub fn find_local_branches(
    node: &NodeState,
    req: FindLocalBranchesRequest,
) -> Result<BoxStream<FindLocalBranchesResponse>, Status> {
    let repo = node.storages.existing(req.repository.as_ref())?;
    for p in &req.exclude_patterns {
        let p = String::from_utf8_lossy(p);
        if p.is_empty() {
            return Err(Status::invalid_argument("empty exclude pattern"));
        }
        if p.contains('\0') {
            return Err(Status::invalid_argument(format!(
                "exclude pattern contains null byte: {p:?}"
            )));
        }
        if !p.starts_with("refs/heads/") {
            return Err(Status::invalid_argument(format!(
                "exclude pattern must start with \"refs/heads/\": {p:?}"
            )));
        }
    }
    let sort = match SortBy::try_from(req.sort_by) {
        Ok(SortBy::Name) => "refname",
        Ok(SortBy::UpdatedAsc) => "committerdate",
        Ok(SortBy::UpdatedDesc) => "-committerdate",
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "unknown sort_by {}",
                req.sort_by
            )));
        }
    };
    let (token, limit) = match &req.pagination_params {
        None => (None, i64::from(i32::MAX)),
        Some(p) => (
            (!p.page_token.is_empty()).then(|| p.page_token.clone().into_bytes()),
            if p.limit >= 0 {
                i64::from(p.limit)
            } else {
                i64::from(i32::MAX)
            },
        ),
    };
    let mut cmd = node
        .git
        .command(["for-each-ref"])
        .arg(format!("--format={}%00", LOCAL_FIELDS.join("%00")))
        .arg(format!("--sort={sort}"))
        .repo(&repo);
    for p in &req.exclude_patterns {
        cmd = cmd.arg(format!("--exclude={}", String::from_utf8_lossy(p)));
    }
    let run = cmd.arg("refs/heads").spawn().map_err(NodeError::from)?;
    Ok(stream_from(move |tx| async move {
        let mut records = Records::new(run, b'\n');
        let mut pending: Vec<u8> = Vec::new();
        let mut found = token.is_none();
        let mut sent: i64 = 0;
        let mut chunker = Chunker::default();
        let wrap = |local_branches| FindLocalBranchesResponse { local_branches };
        // Records end in "\0\n"; a field (a commit message) may hold newlines.
        while sent < limit {
            let Some(line) = records.next().await? else {
                break;
            };
            pending.extend_from_slice(&line);
            if pending.last() != Some(&0) {
                pending.push(b'\n');
                continue;
            }
            pending.pop();
            let record = std::mem::take(&mut pending);
            let fields: Vec<&[u8]> = record.split(|b| *b == 0).collect();
            if !found {
                found = token.as_deref() == fields.first().copied();
                continue;
            }
            let Some(branch) = branch_from_fields(&fields) else {
                return Err(Status::internal(format!(
                    "finding refs: invalid field count: expected {}, got {}",
                    LOCAL_FIELDS.len(),
                    fields.len()
                )));
            };
            sent += 1;
            if let Some(batch) = chunker.push(branch)
                && tx.send(Ok(wrap(batch))).await.is_err()
            {
                return Ok(());
            }
        }
        if !found {
            return Err(Status::invalid_argument(
                "invalid page token: sending lines: could not find page token",
            ));
        }
        if let Some(batch) = chunker.finish() {
            let _ = tx.send(Ok(wrap(batch))).await;
        }
        Ok(())
    }))
}

/// One remote's branches (`refs/remotes/<remote>/`), as FindLocalBranches lists its
/// own: by name, every field of the commit.
pub fn find_all_remote_branches(
    node: &NodeState,
    req: FindAllRemoteBranchesRequest,
) -> Result<BoxStream<FindAllRemoteBranchesResponse>, Status> {
    let repo = node.storages.existing(req.repository.as_ref())?;
    if req.remote_name.is_empty() {
        return Err(Status::invalid_argument("empty RemoteName"));
    }
    let pattern = format!("refs/remotes/{}/", req.remote_name);
    if !names::valid_ref_name(pattern.trim_end_matches('/')) {
        return Err(Status::invalid_argument(format!(
            "invalid remote name {:?}",
            req.remote_name
        )));
    }
    let run = node
        .git
        .command(["for-each-ref"])
        .arg(format!("--format={}%00", LOCAL_FIELDS.join("%00")))
        .arg("--sort=refname")
        .arg(pattern)
        .repo(&repo)
        .spawn()
        .map_err(NodeError::from)?;
    Ok(stream_from(move |tx| async move {
        let mut records = Records::new(run, b'\n');
        let mut pending: Vec<u8> = Vec::new();
        let mut chunker = Chunker::default();
        let wrap = |branches| FindAllRemoteBranchesResponse { branches };
        // Records end in "\0\n"; a field (a commit message) may hold newlines.
        while let Some(line) = records.next().await? {
            pending.extend_from_slice(&line);
            if pending.last() != Some(&0) {
                pending.push(b'\n');
                continue;
            }
            pending.pop();
            let record = std::mem::take(&mut pending);
            let fields: Vec<&[u8]> = record.split(|b| *b == 0).collect();
            let Some(branch) = branch_from_fields(&fields) else {
                return Err(Status::internal("finding refs: invalid field count"));
            };
            if let Some(batch) = chunker.push(branch)
                && tx.send(Ok(wrap(batch))).await.is_err()
            {
                return Ok(());
            }
        }
        if let Some(batch) = chunker.finish() {
            let _ = tx.send(Ok(wrap(batch))).await;
        }
        Ok(())
    }))
}

pub async fn find_all_branches(
    node: &NodeState,
    req: FindAllBranchesRequest,
) -> Result<BoxStream<FindAllBranchesResponse>, Status> {
    let repo = node.storages.existing(req.repository.as_ref())?;
    let mut cmd = node
        .git
        .command(["for-each-ref", "--format=%(refname)%00%(objectname)"])
        .repo(&repo);
    let mut patterns = vec!["refs/heads".to_owned(), "refs/remotes".to_owned()];
    if req.merged_only {
        let mut reader = node.reads.reader(&repo).await?;
        let default = head::default_branch(&node.git, &repo.path, &mut reader)
            .await
            .map_err(|e| Status::internal(format!("default branch name: {e}")))?
            .unwrap_or_default();
        cmd = cmd.arg(format!("--merged={default}"));
        if !req.merged_branches.is_empty() {
            patterns = req
                .merged_branches
                .iter()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .collect();
        }
    }
    cmd = cmd.arg("--");
    for p in patterns {
        cmd = cmd.arg(p);
    }
    let run = cmd.spawn().map_err(NodeError::from)?;
    let reads = node.reads.clone();
    Ok(stream_from(move |tx| async move {
        let mut records = Records::new(run, b'\n');
        let mut reader = reads.reader(&repo).await?;
        let mut page: Vec<(Vec<u8>, String)> = Vec::new();
        loop {
            let line = records.next().await?;
            if let Some(line) = line.as_ref().filter(|l| !l.is_empty()) {
                let Some(i) = line.iter().position(|b| *b == 0) else {
                    return Err(Status::internal(format!(
                        "finding refs: error parsing ref {:?}",
                        String::from_utf8_lossy(line)
                    )));
                };
                page.push((
                    line[..i].to_vec(),
                    String::from_utf8_lossy(&line[i + 1..]).into_owned(),
                ));
            }
            let end = line.as_ref().is_none_or(|l| l.is_empty());
            if page.len() == BRANCHES_PER_MESSAGE || (end && !page.is_empty()) {
                let oids: Vec<String> = page.iter().map(|(_, o)| o.clone()).collect();
                let commits = reader.commits(&oids).await?;
                let mut branches = Vec::with_capacity(page.len());
                for ((name, oid), commit) in std::mem::take(&mut page).into_iter().zip(commits) {
                    let Some(target) = commit else {
                        return Err(Status::internal(format!(
                            "finding refs: object not found: {oid}"
                        )));
                    };
                    branches.push(AllBranch {
                        name,
                        target: Some(target),
                    });
                }
                if tx
                    .send(Ok(FindAllBranchesResponse { branches }))
                    .await
                    .is_err()
                {
                    return Ok(());
                }
            }
            if end {
                break;
            }
        }
        if let Some(exit) = records.exit().filter(|e| !e.success()) {
            return Err(Status::internal(format!(
                "finding refs: listing failed with exit code {}",
                exit.code().unwrap_or(-1)
            )));
        }
        Ok(())
    }))
}

/// The names below `prefix` of refs containing `commit_id`, `--count`-limited.
fn containing(
    node: &NodeState,
    repo: &crate::storage::RepoPath,
    commit_id: &str,
    limit: u32,
    prefix: &'static str,
) -> Result<Records, Status> {
    let len = crate::repository::hash_len(&repo.path);
    validate_hex(commit_id, len)?;
    let mut cmd = node
        .git
        .command(["for-each-ref", "--format=%(refname)"])
        .arg(format!("--contains={commit_id}"))
        .repo(repo);
    if limit != 0 {
        cmd = cmd.arg(format!("--count={limit}"));
    }
    let run = cmd.arg(prefix).spawn().map_err(NodeError::from)?;
    Ok(Records::new(run, b'\n'))
}

/// Gitaly's `ValidateHex`: the repository's id length, lowercase hex.
pub fn validate_hex(oid: &str, len: usize) -> Result<(), Status> {
    if oid.len() != len {
        return Err(Status::invalid_argument(format!(
            "invalid object ID: {oid:?}, expected length {len}, got {}",
            oid.len()
        )));
    }
    if let Some(c) = oid.chars().find(|c| !matches!(c, '0'..='9' | 'a'..='f')) {
        return Err(Status::invalid_argument(format!(
            "invalid object ID: {oid:?}, invalid character {c:?}"
        )));
    }
    Ok(())
}

/// One name, sized as it is encoded in a list of names.
#[derive(Clone, PartialEq, prost::Message)]
struct Name {
    #[prost(bytes = "vec", tag = "1")]
    name: Vec<u8>,
}

async fn send_names<M: Send + 'static>(
    mut records: Records,
    prefix: &str,
    tx: crate::respond::Tx<M>,
    wrap: fn(Vec<Vec<u8>>) -> M,
) -> Result<(), Status> {
    let mut chunker: Chunker<Name> = Chunker::default();
    let unwrap = |batch: Vec<Name>| batch.into_iter().map(|n| n.name).collect();
    while let Some(line) = records.next().await? {
        let name = line
            .strip_prefix(prefix.as_bytes())
            .unwrap_or(&line)
            .to_vec();
        if let Some(batch) = chunker.push(Name { name })
            && tx.send(Ok(wrap(unwrap(batch)))).await.is_err()
        {
            return Ok(());
        }
    }
    if let Some(exit) = records.exit().filter(|e| !e.success()) {
        return Err(Status::internal(format!(
            "exit status {}",
            exit.code().unwrap_or(-1)
        )));
    }
    if let Some(batch) = chunker.finish() {
        let _ = tx.send(Ok(wrap(unwrap(batch)))).await;
    }
    Ok(())
}

pub fn list_branch_names_containing_commit(
    node: &NodeState,
    req: ListBranchNamesContainingCommitRequest,
) -> Result<BoxStream<ListBranchNamesContainingCommitResponse>, Status> {
    let repo = node.storages.existing(req.repository.as_ref())?;
    let records = containing(node, &repo, &req.commit_id, req.limit, "refs/heads")?;
    Ok(stream_from(move |tx| {
        send_names(records, "refs/heads/", tx, |branch_names| {
            ListBranchNamesContainingCommitResponse { branch_names }
        })
    }))
}

pub fn list_tag_names_containing_commit(
    node: &NodeState,
    req: ListTagNamesContainingCommitRequest,
) -> Result<BoxStream<ListTagNamesContainingCommitResponse>, Status> {
    let repo = node.storages.existing(req.repository.as_ref())?;
    let records = containing(node, &repo, &req.commit_id, req.limit, "refs/tags")?;
    Ok(stream_from(move |tx| {
        send_names(records, "refs/tags/", tx, |tag_names| {
            ListTagNamesContainingCommitResponse { tag_names }
        })
    }))
}

pub async fn find_refs_by_oid(
    node: &NodeState,
    req: FindRefsByOidRequest,
) -> Result<FindRefsByOidResponse, Status> {
    let repo = node.storages.existing(req.repository.as_ref())?;
    if req.oid.is_empty() {
        return Err(Status::invalid_argument("empty Oid"));
    }
    let oid = names::revision("oid", req.oid.as_bytes())?;
    let mut cmd = node
        .git
        .command(["for-each-ref", "--format=%(refname)"])
        .arg(format!("--points-at={oid}"))
        .repo(&repo);
    if !req.sort_field.is_empty() {
        cmd = cmd.arg(format!("--sort={}", req.sort_field));
    }
    if req.limit > 0 {
        cmd = cmd.arg(format!("--count={}", req.limit));
    }
    cmd = cmd.arg("--");
    if req.ref_patterns.is_empty() {
        cmd = cmd.arg("refs/tags/").arg("refs/heads/");
    } else {
        for p in &req.ref_patterns {
            cmd = cmd.arg(p);
        }
    }
    let (out, exit) = cmd
        .spawn()
        .map_err(NodeError::from)?
        .output(64 << 20)
        .await
        .map_err(NodeError::from)?;
    if !exit.success() {
        let text = format!(
            "for-each-ref pipeline command: exit status {}, stderr: {:?}",
            exit.code().unwrap_or(-1),
            exit.stderr
        );
        return Err(match exit.code() {
            Some(129) => Status::invalid_argument(text),
            _ => Status::internal(text),
        });
    }
    Ok(FindRefsByOidResponse {
        refs: String::from_utf8_lossy(&out)
            .lines()
            .map(str::to_owned)
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_branch_fields_read_as_gitaly_reads_them() {
        let body = "x".repeat(MAX_MESSAGE + 10);
        let parent = "1".repeat(40);
        let fields: Vec<&[u8]> = vec![
            b"refs/heads/main",
            b"abc",
            b"A",
            b"Subject",
            b"<a@x>",
            b"1700000000",
            b"+0100",
            b"C",
            body.as_bytes(),
            b"<c@x>",
            b"1700000001",
            b"-0200",
            b"",
            b"tree",
            parent.as_bytes(),
        ];
        let b = branch_from_fields(&fields).unwrap();
        let c = b.target_commit.unwrap();
        assert_eq!(b.name, b"refs/heads/main");
        assert_eq!(c.author.as_ref().unwrap().email, b"a@x");
        assert_eq!(c.body_size as usize, MAX_MESSAGE);
        assert_eq!(c.parent_ids, vec![parent.clone()]);
        assert_eq!(c.committer.unwrap().timezone, b"-0200");
        assert!(branch_from_fields(&fields[..3]).is_none());
        assert!(validate_hex(&"a".repeat(40), 40).is_ok());
        assert_eq!(
            validate_hex("abc", 40).unwrap_err().message(),
            "invalid object ID: \"abc\", expected length 40, got 3"
        );
        assert!(validate_hex(&"A".repeat(40), 40).is_err());
    }
}
