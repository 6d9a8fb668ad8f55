//! ListAllBlobs and ListLFSPointers: what Rails reads while GitLab checks a push (file
//! sizes, LFS pointers), usually on its quarantine. ListAllBlobs of a quarantined
//! repository lists the quarantine's objects only, as Gitaly does.

use refvote_proto::gitaly::{
    LfsPointer, ListAllBlobsRequest, ListAllBlobsResponse, ListLfsPointersRequest,
    ListLfsPointersResponse, list_all_blobs_response,
};
use tonic::Status;
use tonic::codegen::BoxStream;

use crate::catfile::CatFile;
use crate::error::NodeError;
use crate::git::Run;
use crate::respond::{DATA_CHUNK, stream_from};
use crate::state::NodeState;

/// Largest blob that can be a Git LFS pointer (Gitaly's bound).
pub const LFS_POINTER_MAX_SIZE: u64 = 200;
/// What every LFS pointer starts with.
const LFS_SPEC: &[u8] = b"version https://git-lfs.github.com/spec";
/// Pointers per ListLFSPointers message; blobs per ListAllBlobs message.
const PER_MESSAGE: usize = 100;

/// Whether `data` is a Git LFS pointer, and the object it points to (oid, size).
pub fn lfs_pointer(data: &[u8]) -> Option<(Vec<u8>, i64)> {
    if !data.starts_with(LFS_SPEC) {
        return None;
    }
    let text = String::from_utf8_lossy(data);
    let mut oid = Vec::new();
    let mut size = 0;
    for line in text.lines() {
        if let Some(o) = line.strip_prefix("oid sha256:") {
            oid = o.trim().as_bytes().to_vec();
        } else if let Some(s) = line.strip_prefix("size ") {
            size = s.trim().parse().unwrap_or(0);
        }
    }
    Some((oid, size))
}

/// Lines of a running git's stdout.
async fn next_line(run: &mut Run, buf: &mut Vec<u8>) -> Result<Option<String>, NodeError> {
    loop {
        if let Some(i) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            return Ok(Some(String::from_utf8_lossy(&line[..i]).into_owned()));
        }
        match run.chunk().await {
            Some(chunk) => buf.extend(chunk?),
            None if buf.is_empty() => return Ok(None),
            None => {
                let line = String::from_utf8_lossy(buf).into_owned();
                buf.clear();
                return Ok(Some(line));
            }
        }
    }
}

pub fn list_all_blobs(
    node: &NodeState,
    req: ListAllBlobsRequest,
) -> Result<BoxStream<ListAllBlobsResponse>, Status> {
    let repo = node.storages.existing(req.repository.as_ref())?;
    let mut cmd = node
        .git
        .command([
            "cat-file",
            "--batch-all-objects",
            "--batch-check=%(objectname) %(objecttype) %(objectsize)",
            "--unordered",
        ])
        .git_dir(&repo.path);
    if let Some(q) = &repo.quarantine {
        // The quarantine alone: the objects the push brings.
        cmd = cmd.env(
            "GIT_OBJECT_DIRECTORY",
            q.objects.to_string_lossy().into_owned(),
        );
    }
    let mut run = cmd.spawn().map_err(NodeError::from)?;
    let mut cat = CatFile::start(&node.git, &repo)?;
    let limit = if req.limit == 0 {
        usize::MAX
    } else {
        req.limit as usize
    };
    let bytes_limit = req.bytes_limit;
    Ok(stream_from(move |tx| async move {
        let mut buf = Vec::new();
        let mut blobs = Vec::new();
        let mut listed = 0;
        while listed < limit {
            let Some(line) = next_line(&mut run, &mut buf).await? else {
                break;
            };
            let mut parts = line.split(' ');
            let (Some(oid), Some("blob"), Some(size)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let size: u64 = size.parse().unwrap_or(0);
            listed += 1;
            let want = match bytes_limit {
                n if n < 0 => size,
                n => size.min(n as u64),
            };
            let mut first = true;
            let mut left = want;
            if want > 0 && cat.header(oid).await?.is_none() {
                continue;
            }
            loop {
                let data = if left > 0 {
                    cat.read(DATA_CHUNK.min(left as usize)).await?
                } else {
                    Vec::new()
                };
                left = left.saturating_sub(data.len() as u64);
                let done = left == 0 || data.is_empty();
                blobs.push(list_all_blobs_response::Blob {
                    oid: if first { oid.to_owned() } else { String::new() },
                    size: if first { size as i64 } else { 0 },
                    data,
                });
                first = false;
                if blobs.len() >= PER_MESSAGE || !done {
                    let msg = ListAllBlobsResponse {
                        blobs: std::mem::take(&mut blobs),
                    };
                    if tx.send(Ok(msg)).await.is_err() {
                        return Ok(());
                    }
                }
                if done {
                    break;
                }
            }
        }
        if !blobs.is_empty() {
            let _ = tx.send(Ok(ListAllBlobsResponse { blobs })).await;
        }
        Ok(())
    }))
}

pub fn list_lfs_pointers(
    node: &NodeState,
    req: ListLfsPointersRequest,
) -> Result<BoxStream<ListLfsPointersResponse>, Status> {
    let repo = node.storages.existing(req.repository.as_ref())?;
    if req.revisions.is_empty() {
        return Err(NodeError::invalid("missing revisions").into());
    }
    let mut cmd = node
        .git
        .command([
            "rev-list".to_owned(),
            "--in-commit-order".to_owned(),
            "--objects".to_owned(),
            "--no-object-names".to_owned(),
            format!("--filter=blob:limit={}", LFS_POINTER_MAX_SIZE + 1),
        ])
        .git_dir(&repo.path)
        .envs(repo.object_env());
    for r in &req.revisions {
        if r == "--not" || r == "--all" {
            cmd = cmd.arg(r);
        } else {
            cmd = cmd.arg(crate::refs::names::revision("revisions", r.as_bytes())?);
        }
    }
    let mut run = cmd.arg("--").spawn().map_err(NodeError::from)?;
    let mut cat = CatFile::start(&node.git, &repo)?;
    let limit = if req.limit <= 0 {
        usize::MAX
    } else {
        req.limit as usize
    };
    Ok(stream_from(move |tx| async move {
        let mut buf = Vec::new();
        let mut pointers = Vec::new();
        let mut found = 0;
        while found < limit {
            let Some(oid) = next_line(&mut run, &mut buf).await? else {
                let exit = run.wait().await.map_err(NodeError::from)?;
                if !exit.success() {
                    return Err(Status::invalid_argument(format!(
                        "listing objects failed, check the revisions: {}",
                        exit.stderr.trim()
                    )));
                }
                break;
            };
            let Some(header) = cat.header(oid.trim()).await? else {
                continue;
            };
            if header.kind != "blob" || header.size > LFS_POINTER_MAX_SIZE {
                continue;
            }
            let data = cat.read(header.size as usize).await?;
            let Some((file_oid, file_size)) = lfs_pointer(&data) else {
                continue;
            };
            found += 1;
            pointers.push(LfsPointer {
                size: header.size as i64,
                data,
                oid: header.oid,
                file_size,
                file_oid,
            });
            if pointers.len() == PER_MESSAGE {
                let msg = ListLfsPointersResponse {
                    lfs_pointers: std::mem::take(&mut pointers),
                };
                if tx.send(Ok(msg)).await.is_err() {
                    return Ok(());
                }
            }
        }
        if !pointers.is_empty() {
            let _ = tx
                .send(Ok(ListLfsPointersResponse {
                    lfs_pointers: pointers,
                }))
                .await;
        }
        Ok(())
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lfs_pointers_are_recognised_and_parsed() {
        let p = b"version https://git-lfs.github.com/spec/v1\noid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 12345\n";
        let (oid, size) = lfs_pointer(p).unwrap();
        assert_eq!(
            oid,
            b"4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393"
        );
        assert_eq!(size, 12345);
        assert_eq!(lfs_pointer(b"just a file\n"), None);
    }
}
