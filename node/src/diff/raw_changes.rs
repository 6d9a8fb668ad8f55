//! RepositoryService.GetRawChanges: the files `git diff --raw -z` finds changed
//! between two revisions, each with its blob's id and size (the new side's, or the old
//! side's for a deletion; none for a submodule), its modes and its kind, batched by
//! message size, as Gitaly answers it.
//!
//! As Gitaly: a `to_revision` of zeros is an empty answer, a `from_revision` of zeros
//! diffs against the empty tree, and a revision that names nothing (or that git could
//! not be handed, like `--output=x`) is INVALID_ARGUMENT "invalid 'from' revision:
//! \"...\"" before git runs. git is handed the object ids the engine resolved, never
//! the request's names. The reading of a raw entry into a change is pure
//! ([`change_of`]).

use refvote_proto::gitaly::get_raw_changes_response::RawChange;
use refvote_proto::gitaly::get_raw_changes_response::raw_change::Operation;
use refvote_proto::gitaly::{GetRawChangesRequest, GetRawChangesResponse};
use tonic::Status;
use tonic::codegen::BoxStream;

use super::parse::Raw;
use crate::commit::empty_tree;
use crate::engine::{Reader, WINDOW};
use crate::error::NodeError;
use crate::object::MODE_SUBMODULE;
use crate::records::Records;
use crate::respond::{Chunker, stream_from};
use crate::state::NodeState;

/// Gitaly's zero object id test: exactly the SHA-1 null id.
fn is_null_sha1(rev: &str) -> bool {
    rev.len() == 40 && rev.bytes().all(|b| b == b'0')
}

/// A change's kind, paths and modes from git's raw entry (blob id and size are the
/// caller's). Gitaly names the first path as both old and new, the second as the new
/// one of a rename or copy, and drops the old of an addition and the new of a deletion.
pub fn change_of(raw: &Raw) -> RawChange {
    let mut change = RawChange {
        old_mode: raw.old_mode,
        new_mode: raw.new_mode,
        new_path_bytes: raw.from_path.clone(),
        old_path_bytes: raw.from_path.clone(),
        ..Default::default()
    };
    let operation = match raw.status {
        b'A' => {
            change.old_path_bytes.clear();
            Operation::Added
        }
        b'C' => {
            change.new_path_bytes = raw.to_path.clone();
            Operation::Copied
        }
        b'D' => {
            change.new_path_bytes.clear();
            Operation::Deleted
        }
        b'M' => Operation::Modified,
        b'R' => {
            change.new_path_bytes = raw.to_path.clone();
            Operation::Renamed
        }
        b'T' => Operation::TypeChanged,
        _ => Operation::Unknown,
    };
    change.operation = operation as i32;
    change
}

/// The blob a change reports: the new side's, or the old side's when the new one is
/// null; `None` for a submodule (Gitaly leaves its id and size empty).
pub fn blob_of(raw: &Raw) -> Option<&str> {
    let (id, mode) = if raw.to_id.bytes().all(|b| b == b'0') {
        (&raw.from_id, raw.old_mode)
    } else {
        (&raw.to_id, raw.new_mode)
    };
    (mode as u32 != MODE_SUBMODULE).then_some(id.as_str())
}

/// `rev`'s object id through the engine; `None` if it names nothing git could be
/// asked for.
async fn resolve(reader: &mut Reader, rev: &str) -> Result<Option<String>, NodeError> {
    if rev.is_empty() || rev.contains(['\0', '\n']) {
        return Ok(None);
    }
    Ok(reader.info(rev).await?.map(|i| i.oid))
}

pub async fn get_raw_changes(
    node: &NodeState,
    req: GetRawChangesRequest,
) -> Result<BoxStream<GetRawChangesResponse>, Status> {
    let repo = node.storages.existing(req.repository.as_ref())?;
    let mut reader = node.reads.reader(&repo).await?;
    let mut resolved = Vec::with_capacity(2);
    for (what, rev) in [("from", &req.from_revision), ("to", &req.to_revision)] {
        if is_null_sha1(rev) {
            resolved.push(None);
            continue;
        }
        match resolve(&mut reader, rev).await? {
            Some(oid) => resolved.push(Some(oid)),
            None => {
                return Err(Status::invalid_argument(format!(
                    "invalid '{what}' revision: {rev:?}"
                )));
            }
        }
    }
    let (Some(to), from) = (resolved.pop().flatten(), resolved.pop().flatten()) else {
        return Ok(Box::pin(tokio_stream::empty()));
    };
    let from = from.unwrap_or_else(|| empty_tree(to.len()).to_owned());
    let run = node
        .git
        .command(["diff", "--raw", "-z", "--no-abbrev"])
        .arg(&from)
        .arg(&to)
        .repo(&repo)
        .spawn()
        .map_err(NodeError::from)?;
    Ok(stream_from(move |tx| async move {
        let mut records = Records::new(run, 0);
        let mut chunker = Chunker::default();
        let mut pending: Vec<Raw> = Vec::new();
        loop {
            let head = records.next().await?;
            if let Some(head) = &head {
                let mut raw = Raw::parse_head(head)
                    .map_err(|e| Status::internal(format!("read diff: {}", e.0)))?;
                raw.from_path = records
                    .next()
                    .await?
                    .ok_or_else(|| Status::internal("read diff: a raw entry without its path"))?;
                if raw.has_two_paths() {
                    raw.to_path = records.next().await?.ok_or_else(|| {
                        Status::internal("read diff: a rename without its new path")
                    })?;
                }
                pending.push(raw);
            }
            if pending.len() == WINDOW || (head.is_none() && !pending.is_empty()) {
                let batch = std::mem::take(&mut pending);
                let names: Vec<String> = batch
                    .iter()
                    .map(|r| blob_of(r).unwrap_or_default().to_owned())
                    .collect();
                let infos = reader.infos(&names).await?;
                for (raw, info) in batch.iter().zip(infos) {
                    let mut change = change_of(raw);
                    if let Some(blob) = blob_of(raw) {
                        let info = info.ok_or_else(|| {
                            Status::internal(format!(
                                "build change from diff line: find {blob:?}: object not found"
                            ))
                        })?;
                        change.blob_id = info.oid;
                        change.size = info.size as i64;
                    }
                    if let Some(raw_changes) = chunker.push(change)
                        && tx
                            .send(Ok(GetRawChangesResponse { raw_changes }))
                            .await
                            .is_err()
                    {
                        return Ok(());
                    }
                }
            }
            if head.is_none() {
                break;
            }
        }
        if let Some(exit) = records.exit()
            && !exit.success()
        {
            let status = match exit.code() {
                Some(c) => format!("exit status {c}"),
                None => "signal: killed".to_owned(),
            };
            return Err(Status::internal(format!("wait git diff: {status}")));
        }
        if let Some(raw_changes) = chunker.finish() {
            let _ = tx.send(Ok(GetRawChangesResponse { raw_changes })).await;
        }
        Ok(())
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(status: u8, old_mode: i32, new_mode: i32, from: &str, to: &str) -> Raw {
        Raw {
            old_mode,
            new_mode,
            from_id: from.into(),
            to_id: to.into(),
            status,
            score: 0,
            from_path: b"a.txt".to_vec(),
            to_path: if matches!(status, b'R' | b'C') {
                b"b.txt".to_vec()
            } else {
                Vec::new()
            },
        }
    }

    const Z: &str = "0000000000000000000000000000000000000000";
    const X: &str = "1111111111111111111111111111111111111111";
    const Y: &str = "2222222222222222222222222222222222222222";

    #[test]
    fn paths_and_kinds_as_gitaly_reports_them() {
        let added = change_of(&raw(b'A', 0, 0o100644, Z, X));
        assert_eq!(added.operation, Operation::Added as i32);
        assert_eq!(
            (
                added.old_path_bytes.as_slice(),
                added.new_path_bytes.as_slice()
            ),
            (&b""[..], &b"a.txt"[..])
        );
        assert_eq!((added.old_mode, added.new_mode), (0, 0o100644));
        let deleted = change_of(&raw(b'D', 0o100644, 0, X, Z));
        assert_eq!(deleted.operation, Operation::Deleted as i32);
        assert_eq!(
            (
                deleted.old_path_bytes.as_slice(),
                deleted.new_path_bytes.as_slice()
            ),
            (&b"a.txt"[..], &b""[..])
        );
        let renamed = change_of(&raw(b'R', 0o100644, 0o100644, X, X));
        assert_eq!(renamed.operation, Operation::Renamed as i32);
        assert_eq!(
            (
                renamed.old_path_bytes.as_slice(),
                renamed.new_path_bytes.as_slice()
            ),
            (&b"a.txt"[..], &b"b.txt"[..])
        );
        let copied = change_of(&raw(b'C', 0o100644, 0o100644, X, X));
        assert_eq!(copied.operation, Operation::Copied as i32);
        assert_eq!(copied.new_path_bytes, b"b.txt");
        for (s, op) in [
            (b'M', Operation::Modified),
            (b'T', Operation::TypeChanged),
            (b'X', Operation::Unknown),
        ] {
            let c = change_of(&raw(s, 0o100644, 0o120000, X, Y));
            assert_eq!(c.operation, op as i32);
            assert_eq!(
                (c.old_path_bytes, c.new_path_bytes),
                (b"a.txt".to_vec(), b"a.txt".to_vec())
            );
        }
    }

    #[test]
    fn the_blob_is_the_new_side_unless_deleted_and_never_a_submodule() {
        assert_eq!(blob_of(&raw(b'M', 0o100644, 0o100644, X, Y)), Some(Y));
        assert_eq!(blob_of(&raw(b'D', 0o100644, 0, X, Z)), Some(X));
        assert_eq!(blob_of(&raw(b'A', 0, 0o160000, Z, X)), None);
        assert_eq!(blob_of(&raw(b'D', 0o160000, 0, X, Z)), None);
        assert!(is_null_sha1(Z));
        assert!(!is_null_sha1("0000"));
        assert!(!is_null_sha1(&"0".repeat(64)));
    }
}
