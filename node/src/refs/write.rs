//! DeleteRefs and UpdateReferences: validation, old values, one atomic update, and
//! Gitaly's status codes with their typed details.

use std::collections::HashSet;
use std::path::Path;

use refvote_proto::gitaly::{
    DeleteRefsError, InvalidRefFormatError, ReferenceStateMismatchError, ReferencesLockedError,
    UpdateReferencesError, delete_refs_error, update_references_error,
};
use tonic::{Code, Status};

use super::names::{self, is_oid, is_zero};
use super::update::{self, FailureKind, RefUpdate};
use crate::detail;
use crate::error::NodeError;
use crate::git::Git;
use crate::tx::WriteContext;

/// An update as the client sent it (old empty: no check).
pub struct Requested {
    pub name: Vec<u8>,
    pub old: Vec<u8>,
    pub new: Vec<u8>,
}

/// The names among `refs` that are no fully qualified ref name git would accept, and
/// how a message shows them.
fn invalid_refs<'a>(refs: impl Iterator<Item = &'a [u8]>) -> (Vec<Vec<u8>>, Vec<String>) {
    refs.filter(|n| !std::str::from_utf8(n).is_ok_and(names::valid_ref_name))
        .map(|n| (n.to_vec(), String::from_utf8_lossy(n).into_owned()))
        .unzip()
}

/// Checks UpdateReferences' input before anything runs: ref names, object ids, no ref
/// twice, no symref. Invalid names carry an `InvalidRefFormatError` detail.
pub fn validate_updates(updates: &[Requested], oid_len: usize) -> Result<(), Status> {
    let (invalid, shown) = invalid_refs(updates.iter().map(|u| u.name.as_slice()));
    if !invalid.is_empty() {
        return Err(detail::status_with_detail(
            Code::InvalidArgument,
            format!(
                "invalid references {shown:?}: fully qualified ref names are needed, e.g. refs/heads/main (HEAD and symrefs cannot be changed here)"
            ),
            "gitaly.UpdateReferencesError",
            &UpdateReferencesError {
                error: Some(update_references_error::Error::InvalidFormat(
                    InvalidRefFormatError { refs: invalid },
                )),
            },
        ));
    }
    let mut seen = HashSet::new();
    for u in updates {
        let name = String::from_utf8_lossy(&u.name);
        let new = std::str::from_utf8(&u.new).unwrap_or("");
        if !is_oid(new, oid_len) {
            return Err(NodeError::invalid(format!(
                "new_object_id of {name} must be a full object id of {oid_len} hex digits (all zeros deletes)"
            ))
            .into());
        }
        let old = std::str::from_utf8(&u.old).unwrap_or("-");
        if !old.is_empty() && !is_oid(old, oid_len) {
            return Err(NodeError::invalid(format!(
                "old_object_id of {name} must be empty (no check) or a full object id of {oid_len} hex digits (all zeros: must not exist)"
            ))
            .into());
        }
        if !seen.insert(u.name.clone()) {
            return Err(NodeError::invalid(format!(
                "reference {name} is updated twice in one request; send one update per ref"
            ))
            .into());
        }
    }
    Ok(())
}

/// Turns the requests into updates with explicit old values: the current value where
/// the client gave none. A stated old value that does not hold is refused here,
/// before git runs, with a `ReferenceStateMismatchError` detail.
pub async fn resolve_updates(
    git: &Git,
    repo: &Path,
    requested: &[Requested],
    oid_len: usize,
) -> Result<Vec<RefUpdate>, Status> {
    let wanted: HashSet<String> = requested
        .iter()
        .map(|u| String::from_utf8_lossy(&u.name).into_owned())
        .collect();
    let current = names::current_values(git, repo, &wanted).await?;
    let zero = "0".repeat(oid_len);
    let mut out = Vec::with_capacity(requested.len());
    for u in requested {
        let name = String::from_utf8_lossy(&u.name).into_owned();
        let now = current.get(&name).cloned().unwrap_or_else(|| zero.clone());
        let old = String::from_utf8_lossy(&u.old).into_owned();
        if !old.is_empty() && old != now {
            return Err(mismatch(&name, &old, &now));
        }
        let new = String::from_utf8_lossy(&u.new).into_owned();
        if is_zero(&new) && is_zero(&now) {
            // Deleting what is not there: nothing to do (and nothing to vote on).
            continue;
        }
        out.push(RefUpdate {
            name,
            old: now,
            new,
        });
    }
    Ok(out)
}

fn mismatch(name: &str, expected: &str, actual: &str) -> Status {
    detail::status_with_detail(
        Code::Aborted,
        format!(
            "reference does not point to expected object: {name} is at {actual}, expected {expected}; read it again and retry"
        ),
        "gitaly.UpdateReferencesError",
        &UpdateReferencesError {
            error: Some(update_references_error::Error::ReferenceStateMismatch(
                ReferenceStateMismatchError {
                    reference_name: name.as_bytes().to_vec(),
                    expected_object_id: expected.as_bytes().to_vec(),
                    actual_object_id: actual.as_bytes().to_vec(),
                },
            )),
        },
    )
}

/// Applies UpdateReferences' updates; failures become Gitaly's codes and details.
pub async fn apply_updates(
    git: &Git,
    repo: &Path,
    ctx: &WriteContext,
    updates: &[RefUpdate],
) -> Result<(), Status> {
    update::apply(git, repo, ctx, updates)
        .await
        .map_err(|f| match &f.kind {
            FailureKind::Locked(r) => detail::status_with_detail(
                Code::Aborted,
                format!("{f}; retry later"),
                "gitaly.UpdateReferencesError",
                &UpdateReferencesError {
                    error: Some(update_references_error::Error::ReferencesLocked(
                        ReferencesLockedError {
                            refs: vec![r.clone().into_bytes()],
                        },
                    )),
                },
            ),
            FailureKind::Mismatch(r) => {
                let expected = updates
                    .iter()
                    .find(|u| u.name == *r)
                    .map(|u| u.old.clone())
                    .unwrap_or_default();
                mismatch(r, &expected, "a newer value")
            }
            FailureKind::MissingObject(_) => {
                Status::invalid_argument(format!("{f}: push the object first"))
            }
            FailureKind::Refused(_) => Status::aborted(f.to_string()),
            FailureKind::Unlockable(_) | FailureKind::Other => NodeError::from(f.git).into(),
        })
}

/// Checks DeleteRefs' input before anything runs; invalid names carry an
/// `InvalidRefFormatError` detail.
pub fn validate_deletions(refs: &[Vec<u8>], except_with_prefix: &[Vec<u8>]) -> Result<(), Status> {
    match (refs.is_empty(), except_with_prefix.is_empty()) {
        (false, false) => {
            return Err(NodeError::invalid(
                "ExceptWithPrefix and Refs are mutually exclusive: set one of them",
            )
            .into());
        }
        (true, true) => {
            return Err(
                NodeError::invalid("empty ExceptWithPrefix and Refs: set one of them").into(),
            );
        }
        _ => {}
    }
    let (invalid, shown) = invalid_refs(refs.iter().map(Vec::as_slice));
    if !invalid.is_empty() {
        return Err(detail::status_with_detail(
            Code::InvalidArgument,
            format!(
                "invalid references {shown:?}: fully qualified ref names are needed, e.g. refs/heads/old"
            ),
            "gitaly.DeleteRefsError",
            &DeleteRefsError {
                error: Some(delete_refs_error::Error::InvalidFormat(
                    InvalidRefFormatError { refs: invalid },
                )),
            },
        ));
    }
    Ok(())
}

/// DeleteRefs: the refs to delete with their current values. Missing refs are
/// skipped: deleting them is not an error.
pub async fn deletions(
    git: &Git,
    repo: &Path,
    refs: &[Vec<u8>],
    except_with_prefix: &[Vec<u8>],
) -> Result<Vec<RefUpdate>, Status> {
    let oid_len = names::oid_len(git, repo).await?;
    let zero = "0".repeat(oid_len);
    let mut out = Vec::new();
    if refs.is_empty() {
        // Every ref except those under the prefixes.
        let prefixes: Vec<String> = except_with_prefix
            .iter()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .collect();
        let run = git
            .command(["for-each-ref", "--format=%(objectname) %(refname)"])
            .git_dir(repo)
            .spawn()
            .map_err(NodeError::from)?;
        let mut lines = super::list::Lines::new(run);
        while let Some(line) = lines.next().await? {
            let line = String::from_utf8_lossy(&line);
            if let Some((oid, name)) = line.split_once(' ')
                && !prefixes.iter().any(|p| name.starts_with(p.as_str()))
            {
                out.push(RefUpdate {
                    name: name.to_owned(),
                    old: oid.to_owned(),
                    new: zero.clone(),
                });
            }
        }
        return Ok(out);
    }
    let wanted: HashSet<String> = refs
        .iter()
        .map(|r| String::from_utf8_lossy(r).into_owned())
        .collect();
    let current = names::current_values(git, repo, &wanted).await?;
    let mut names: Vec<&String> = wanted.iter().collect();
    names.sort();
    for name in names {
        if let Some(oid) = current.get(name) {
            out.push(RefUpdate {
                name: name.clone(),
                old: oid.clone(),
                new: zero.clone(),
            });
        }
    }
    Ok(out)
}

/// Applies DeleteRefs' deletions; a lock held by another writer is FAILED_PRECONDITION
/// with a `ReferencesLockedError` detail, as in Gitaly.
pub async fn apply_deletions(
    git: &Git,
    repo: &Path,
    ctx: &WriteContext,
    deletions: &[RefUpdate],
) -> Result<(), Status> {
    update::apply(git, repo, ctx, deletions)
        .await
        .map_err(|f| match &f.kind {
            FailureKind::Locked(r) => detail::status_with_detail(
                Code::FailedPrecondition,
                format!("cannot lock references: {r} is locked by another writer; retry later"),
                "gitaly.DeleteRefsError",
                &DeleteRefsError {
                    error: Some(delete_refs_error::Error::ReferencesLocked(
                        ReferencesLockedError {
                            refs: vec![r.clone().into_bytes()],
                        },
                    )),
                },
            ),
            FailureKind::Mismatch(_) | FailureKind::Refused(_) => {
                Status::aborted(format!("{f}; retry"))
            }
            FailureKind::MissingObject(_) => Status::internal(f.to_string()),
            FailureKind::Unlockable(_) | FailureKind::Other => NodeError::from(f.git).into(),
        })
}
