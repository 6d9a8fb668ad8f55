//! RepositorySize and RepositoryInfo: what a repository occupies on disk, from one
//! walk of its directory (off the async workers; symlinks are not followed).

use std::path::Path;

use refvote_proto::gitaly::RepositoryInfoResponse;
use refvote_proto::gitaly::repository_info_response::references_info::ReferenceBackend;
use refvote_proto::gitaly::repository_info_response::{ObjectsInfo, ReferencesInfo};

/// Total bytes of the regular files under `dir`.
fn tree_size(dir: &Path) -> std::io::Result<u64> {
    let mut total = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let entries = match std::fs::read_dir(&d) {
            Ok(e) => e,
            // Gone meanwhile (a concurrent repack or ref deletion): it counts as empty.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let meta = match entry.metadata() {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            if meta.is_dir() {
                stack.push(entry.path());
            } else if meta.is_file() {
                total += meta.len();
            }
        }
    }
    Ok(total)
}

/// Number of regular files under `dir` (loose refs).
fn file_count(dir: &Path) -> std::io::Result<u64> {
    let mut count = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            match entry.file_type() {
                Ok(t) if t.is_dir() => stack.push(entry.path()),
                Ok(t) if t.is_file() => count += 1,
                _ => {}
            }
        }
    }
    Ok(count)
}

/// RepositorySize's answer: KiB, everything under the repository directory.
pub fn size_kib(repo: &Path) -> std::io::Result<i64> {
    Ok(i64::try_from(tree_size(repo)? / 1024).unwrap_or(i64::MAX))
}

/// RepositoryInfo's answer. Packs with a `.mtimes` file are cruft packs (unreachable
/// objects kept for a grace period): stale. Loose objects all count as recent.
pub fn info(repo: &Path) -> std::io::Result<RepositoryInfoResponse> {
    let size = tree_size(repo)?;
    let objects_dir = repo.join("objects");
    let objects_size = tree_size(&objects_dir)?;
    let (mut stale, mut keep) = (0u64, 0u64);
    if let Ok(entries) = std::fs::read_dir(objects_dir.join("pack")) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "pack") {
                continue;
            }
            let len = entry.metadata().map(|m| m.len()).unwrap_or(0);
            if path.with_extension("mtimes").exists() {
                stale += len;
            }
            if path.with_extension("keep").exists() {
                keep += len;
            }
        }
    }
    let reftable = repo.join("reftable").is_dir();
    let references = ReferencesInfo {
        loose_count: if reftable {
            0
        } else {
            file_count(&repo.join("refs"))?
        },
        packed_size: std::fs::metadata(repo.join("packed-refs"))
            .map(|m| m.len())
            .unwrap_or(0),
        reference_backend: if reftable {
            ReferenceBackend::Reftable
        } else {
            ReferenceBackend::Files
        } as i32,
    };
    Ok(RepositoryInfoResponse {
        size,
        references: Some(references),
        objects: Some(ObjectsInfo {
            size: objects_size,
            recent_size: objects_size.saturating_sub(stale),
            stale_size: stale,
            keep_size: keep,
            // The counts Gitaly added later (packs, loose objects, ...) are not
            // computed yet; they stay zero.
            ..Default::default()
        }),
        // Likewise the commit-graph, bitmap, multi-pack-index and alternates details.
        ..Default::default()
    })
}
