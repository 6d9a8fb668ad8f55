//! Trees: TreeEntry (one entry, a blob streamed in 128 KiB pieces), GetTreeEntries (a
//! directory, flat or recursive, sorted and paged as Gitaly does) and ListFiles (every
//! blob path of a revision).
//!
//! A flat listing and a single entry come from the read engine; a recursive listing
//! and ListFiles from one `git ls-tree -r`, read as it streams.

use refvote_proto::gitaly::{
    GetTreeEntriesError, GetTreeEntriesRequest, GetTreeEntriesResponse, ListFilesRequest,
    ListFilesResponse, PaginationCursor, ResolveRevisionError, TreeEntry, TreeEntryRequest,
    TreeEntryResponse, get_tree_entries_error, get_tree_entries_request, path_error, tree_entry,
    tree_entry_response,
};
use tonic::codegen::BoxStream;
use tonic::{Code, Status};

use super::page;
use crate::detail::status_with_detail;
use crate::engine::{Kind, Reader};
use crate::error::NodeError;
use crate::object::{self, MODE_SUBMODULE, TreeItem};
use crate::refs::{head, names};
use crate::respond::{Chunker, once, send_object, stream_from};
use crate::state::NodeState;
use crate::storage::RepoPath;

/// Gitaly follows lone subdirectories at most this deep for `flat_path`.
const FLAT_PATH_DEPTH: usize = 10;

/// `path` split as Gitaly's tree-entry finder looks it up (`path.Dir`, then the entry
/// named like the last component), or `None` if no entry can have that path: Gitaly
/// compares with paths it builds cleaned, so `a//b`, `./a`, `a/../b` and absolute
/// paths never match, and `..` never reaches git.
pub fn entry_path(path: &str) -> Option<(&str, &str)> {
    if path.is_empty()
        || path.starts_with('/')
        || path
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return None;
    }
    Some(path.rsplit_once('/').unwrap_or(("", path)))
}

/// The entry at `path` in revision `rev` (a canonical path, see [`entry_path`]): read
/// from its parent tree, so the mode is known and submodules (whose commits are not
/// in this repository) are found.
pub async fn find_entry(
    reader: &mut Reader,
    rev: &str,
    path: &str,
) -> Result<Option<TreeItem>, NodeError> {
    let Some((dir, name)) = entry_path(path) else {
        return Ok(None);
    };
    let Some((_, items)) = reader.tree(&format!("{rev}:{dir}")).await? else {
        return Ok(None);
    };
    Ok(items.into_iter().find(|i| i.name == name.as_bytes()))
}

pub async fn tree_entry(
    node: &NodeState,
    req: TreeEntryRequest,
) -> Result<BoxStream<TreeEntryResponse>, Status> {
    let repo = node.storages.existing(req.repository.as_ref())?;
    let rev = names::revision("revision", &req.revision)?.to_owned();
    if req.path.is_empty() {
        return Err(Status::invalid_argument("empty Path"));
    }
    if req.limit < 0 {
        return Err(Status::invalid_argument("negative Limit"));
    }
    if req.max_size < 0 {
        return Err(Status::invalid_argument("negative MaxSize"));
    }
    let mut path = String::from_utf8_lossy(&req.path).into_owned();
    if path.len() > 1 {
        path = path.trim_end_matches('/').to_owned();
    }
    let not_found = || Status::not_found("tree entry not found");
    let mut reader = node.reads.reader(&repo).await?;
    let Some(item) = find_entry(&mut reader, &rev, &path).await? else {
        return Err(not_found());
    };
    let base = TreeEntryResponse {
        oid: item.oid.clone(),
        mode: item.mode as i32,
        ..Default::default()
    };
    match object::mode_kind(item.mode) {
        tree_entry::EntryType::Commit => {
            return Ok(once(TreeEntryResponse {
                r#type: tree_entry_response::ObjectType::Commit as i32,
                ..base
            }));
        }
        tree_entry::EntryType::Tree => {
            let Some(info) = reader.info(&item.oid).await? else {
                return Err(Status::internal("object not found"));
            };
            return Ok(once(TreeEntryResponse {
                r#type: tree_entry_response::ObjectType::Tree as i32,
                size: info.size as i64,
                ..base
            }));
        }
        tree_entry::EntryType::Blob => {}
    }
    let Some(info) = reader.info(&item.oid).await? else {
        return Err(Status::internal("object not found"));
    };
    if info.kind != Kind::Blob {
        return Err(Status::internal(format!(
            "mismatched object type: tree-oid={} object-oid={} entry-type=BLOB object-type={}",
            item.oid,
            info.oid,
            info.kind.as_str()
        )));
    }
    if req.max_size > 0 && info.size > req.max_size as u64 {
        return Err(Status::failed_precondition(format!(
            "object size ({}) is bigger than the maximum allowed size ({})",
            info.size, req.max_size
        )));
    }
    let limit = match req.limit {
        0 => info.size,
        l => info.size.min(l as u64),
    };
    let first = TreeEntryResponse {
        r#type: tree_entry_response::ObjectType::Blob as i32,
        oid: info.oid.clone(),
        size: info.size as i64,
        ..base
    };
    if limit == 0 {
        return Ok(once(first));
    }
    if reader.open(&info.oid).await?.is_none() {
        return Err(Status::internal("object not found"));
    }
    Ok(stream_from(move |tx| async move {
        send_object(&mut reader, limit, &tx, Some(first), |first, data| {
            let mut m = first.unwrap_or_default();
            m.data = data;
            m
        })
        .await?;
        Ok(())
    }))
}

fn tree_error(code: Code, message: &str, revision: &[u8]) -> Status {
    status_with_detail(
        code,
        message,
        "gitaly.GetTreeEntriesError",
        &GetTreeEntriesError {
            error: Some(get_tree_entries_error::Error::ResolveTree(
                ResolveRevisionError {
                    revision: revision.to_vec(),
                },
            )),
        },
    )
}

pub async fn get_tree_entries(
    node: &NodeState,
    req: GetTreeEntriesRequest,
) -> Result<BoxStream<GetTreeEntriesResponse>, Status> {
    let repo = node.storages.existing(req.repository.as_ref())?;
    let rev = names::revision("revision", &req.revision)?.to_owned();
    if req.path.is_empty() {
        return Err(status_with_detail(
            Code::InvalidArgument,
            "empty path",
            "gitaly.GetTreeEntriesError",
            &GetTreeEntriesError {
                error: Some(get_tree_entries_error::Error::Path(
                    refvote_proto::gitaly::PathError {
                        path: Vec::new(),
                        error_type: path_error::ErrorType::EmptyPath as i32,
                    },
                )),
            },
        ));
    }
    let raw_path = String::from_utf8_lossy(&req.path).into_owned();
    let path = if raw_path == "." {
        String::new()
    } else {
        raw_path.clone()
    };
    let token = req
        .pagination_params
        .as_ref()
        .filter(|p| !p.page_token.is_empty())
        .map(|p| page::decode(&p.page_token));
    // A later page lists the tree its token names, by id.
    let tree_name = match &token {
        Some(page::Token::Path { tree_oid, .. }) if !tree_oid.is_empty() => {
            format!("{tree_oid}:")
        }
        _ => format!("{rev}:{path}"),
    };
    let by_token = !tree_name.starts_with(&format!("{rev}:"));
    let unresolved = || {
        let code = if req.recursive {
            Code::NotFound
        } else {
            Code::InvalidArgument
        };
        tree_error(code, "invalid revision or path", &req.revision)
    };
    // Paths git cannot resolve in a bare repository: refused before git sees them.
    if !by_token
        && (path.starts_with('/')
            || path.split('/').any(|c| c == "." || c == "..")
            || path.contains('\0'))
    {
        return Err(unresolved());
    }
    let mut reader = node.reads.reader(&repo).await?;
    let Some(info) = reader.info(&tree_name).await? else {
        // A path to a submodule resolves to a commit this repository does not have.
        if !by_token
            && !path.is_empty()
            && find_entry(&mut reader, &rev, path.trim_end_matches('/'))
                .await?
                .is_some_and(|i| i.mode == MODE_SUBMODULE)
        {
            return Err(tree_error(
                Code::NotFound,
                "revision doesn't exist",
                &req.revision,
            ));
        }
        return Err(unresolved());
    };
    if info.kind != Kind::Tree {
        return Err(tree_error(
            Code::InvalidArgument,
            "path not treeish",
            &req.revision,
        ));
    }
    let mut entries = if req.recursive {
        drop(reader);
        let e = recursive_entries(node, &repo, &info.oid, &rev, &path).await?;
        reader = node.reads.reader(&repo).await?;
        e
    } else {
        let Some((_, items)) = reader.tree(&info.oid).await? else {
            return Err(Status::internal("reading tree: object not found"));
        };
        items
            .into_iter()
            .filter(|i| i.oid != info.oid)
            .map(|i| tree_entry_of(&rev, &path, &i.name, &i.oid, i.mode))
            .collect()
    };
    sort_entries(&mut entries, req.sort);
    let (entries, cursor) = match &req.pagination_params {
        Some(p) => {
            page::cut(entries, token.as_ref(), p.limit, &info.oid).map_err(Status::internal)?
        }
        None => (entries, String::new()),
    };
    let mut entries = entries;
    if !req.recursive && !req.skip_flat_paths {
        for e in entries.iter_mut() {
            e.flat_path = flat_path(&mut reader, e).await?;
        }
    }
    drop(reader);
    Ok(stream_from(move |tx| async move {
        let mut chunker = Chunker::default();
        let mut cursor = Some(cursor);
        let mut batches = Vec::new();
        for e in entries {
            if let Some(batch) = chunker.push(e) {
                batches.push(batch);
            }
        }
        batches.extend(chunker.finish());
        for batch in batches {
            // Gitaly puts the cursor, empty or not, on the first message only.
            let msg = GetTreeEntriesResponse {
                entries: batch,
                pagination_cursor: cursor
                    .take()
                    .map(|next_cursor| PaginationCursor { next_cursor }),
            };
            if tx.send(Ok(msg)).await.is_err() {
                break;
            }
        }
        Ok(())
    }))
}

/// Gitaly's entry: the path joined (and cleaned) onto the listed directory.
fn tree_entry_of(rev: &str, dir: &str, name: &[u8], oid: &str, mode: u32) -> TreeEntry {
    let dir = dir.trim_end_matches('/');
    let mut full = Vec::with_capacity(dir.len() + 1 + name.len());
    if !dir.is_empty() {
        full.extend_from_slice(dir.as_bytes());
        full.push(b'/');
    }
    full.extend_from_slice(name);
    TreeEntry {
        oid: oid.to_owned(),
        path: full,
        r#type: object::mode_kind(mode) as i32,
        mode: mode as i32,
        commit_oid: rev.to_owned(),
        flat_path: Vec::new(),
    }
}

/// Gitaly's orders: as listed, trees then blobs then submodules (stable), or by path
/// bytes (stable).
fn sort_entries(entries: &mut [TreeEntry], sort: i32) {
    use get_tree_entries_request::SortBy;
    match SortBy::try_from(sort) {
        Ok(SortBy::TreesFirst) => {
            entries.sort_by_key(|e| match tree_entry::EntryType::try_from(e.r#type) {
                Ok(tree_entry::EntryType::Tree) => 0,
                Ok(tree_entry::EntryType::Blob) => 1,
                _ => 2,
            })
        }
        Ok(SortBy::Filesystem) => entries.sort_by(|a, b| a.path.cmp(&b.path)),
        _ => {}
    }
}

/// The path down through lone subdirectories (at most [`FLAT_PATH_DEPTH`] deep).
async fn flat_path(reader: &mut Reader, entry: &TreeEntry) -> Result<Vec<u8>, NodeError> {
    let mut flat = entry.path.clone();
    if entry.r#type != tree_entry::EntryType::Tree as i32 {
        return Ok(flat);
    }
    let mut oid = entry.oid.clone();
    for _ in 1..FLAT_PATH_DEPTH {
        let Some((_, items)) = reader.tree(&oid).await? else {
            break;
        };
        match items.as_slice() {
            [only] if object::mode_kind(only.mode) == tree_entry::EntryType::Tree => {
                flat.push(b'/');
                flat.extend_from_slice(&only.name);
                oid = only.oid.clone();
            }
            _ => break,
        }
    }
    Ok(flat)
}

/// Every entry below tree `tree`, trees included, depth first (`git ls-tree -r -t`).
async fn recursive_entries(
    node: &NodeState,
    repo: &RepoPath,
    tree: &str,
    rev: &str,
    dir: &str,
) -> Result<Vec<TreeEntry>, NodeError> {
    let mut run = node
        .git
        .command(["ls-tree", "-z", "-r", "-t", "--full-tree"])
        .arg(tree)
        .repo(repo)
        .spawn()?;
    let mut entries = Vec::new();
    let mut partial = Vec::new();
    while let Some(chunk) = run.chunk().await {
        partial.extend_from_slice(&chunk?);
        let mut start = 0;
        while let Some(end) = partial[start..].iter().position(|b| *b == 0) {
            if let Some((mode, oid, name)) = ls_tree_record(&partial[start..start + end])
                && oid != tree
            {
                entries.push(tree_entry_of(rev, dir, name, &oid, mode));
            }
            start += end + 1;
        }
        partial.drain(..start);
    }
    run.wait().await?.check()?;
    Ok(entries)
}

/// `<mode> <type> <oid>\t<path>` of `git ls-tree -z`.
fn ls_tree_record(record: &[u8]) -> Option<(u32, String, &[u8])> {
    let tab = record.iter().position(|b| *b == b'\t')?;
    let meta = std::str::from_utf8(&record[..tab]).ok()?;
    let mut fields = meta.split(' ');
    let mode = u32::from_str_radix(fields.next()?, 8).ok()?;
    let _kind = fields.next()?;
    let oid = fields.next()?.to_owned();
    Some((mode, oid, &record[tab + 1..]))
}

/// Every blob path of a revision (default branch if empty), from one `git ls-tree -r`.
pub async fn list_files(
    node: &NodeState,
    req: ListFilesRequest,
) -> Result<BoxStream<ListFilesResponse>, Status> {
    let repo = node.storages.existing(req.repository.as_ref())?;
    let mut reader = node.reads.reader(&repo).await?;
    let revision = if req.revision.is_empty() {
        match head::default_branch(&node.git, &repo.path, &mut reader).await {
            Ok(Some(b)) => b,
            Ok(None) => {
                return Err(Status::failed_precondition(
                    "repository does not have a default branch",
                ));
            }
            Err(_) => return Err(Status::not_found("revision not found \"\"")),
        }
    } else {
        names::revision("revision", &req.revision)?.to_owned()
    };
    if reader.info(&revision).await?.is_none() {
        return Ok(once(ListFilesResponse::default()));
    }
    drop(reader);
    let mut run = node
        .git
        .command(["ls-tree", "-z", "-r", "--full-tree", "--full-name"])
        .arg(&revision)
        .repo(&repo)
        .spawn()
        .map_err(NodeError::from)?;
    Ok(stream_from(move |tx| async move {
        let mut chunker: Chunker<PathItem> = Chunker::default();
        let mut partial = Vec::new();
        let send = |batch: Vec<PathItem>| ListFilesResponse {
            paths: batch.into_iter().map(|p| p.path).collect(),
        };
        while let Some(chunk) = run.chunk().await {
            partial.extend_from_slice(&chunk.map_err(NodeError::from)?);
            let mut start = 0;
            while let Some(end) = partial[start..].iter().position(|b| *b == 0) {
                let record = &partial[start..start + end];
                if let Some((mode, _, path)) = ls_tree_record(record)
                    && object::mode_kind(mode) == tree_entry::EntryType::Blob
                    && let Some(batch) = chunker.push(PathItem {
                        path: path.to_vec(),
                    })
                    && tx.send(Ok(send(batch))).await.is_err()
                {
                    return Ok(());
                }
                start += end + 1;
            }
            partial.drain(..start);
        }
        run.wait()
            .await
            .and_then(crate::git::Exit::check)
            .map_err(NodeError::from)?;
        if let Some(batch) = chunker.finish() {
            let _ = tx.send(Ok(send(batch))).await;
        }
        Ok(())
    }))
}

/// One path, sized as it is encoded in a ListFilesResponse.
#[derive(Clone, PartialEq, prost::Message)]
struct PathItem {
    #[prost(bytes = "vec", tag = "1")]
    path: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_paths_are_those_gitaly_could_match() {
        assert_eq!(entry_path("a"), Some(("", "a")));
        assert_eq!(entry_path("a/b/c"), Some(("a/b", "c")));
        for bad in ["", "/a", "a//b", "./a", "a/../b", "..", "a/.", "a/"] {
            assert_eq!(entry_path(bad), None, "{bad}");
        }
    }

    #[test]
    fn entries_sort_like_gitaly() {
        let e = |p: &str, t: tree_entry::EntryType| TreeEntry {
            path: p.into(),
            r#type: t as i32,
            ..Default::default()
        };
        use tree_entry::EntryType::{Blob, Commit, Tree};
        let mut v = vec![e("b", Blob), e("s", Commit), e("a", Tree), e("c", Blob)];
        sort_entries(&mut v, get_tree_entries_request::SortBy::TreesFirst as i32);
        let order: Vec<&[u8]> = v.iter().map(|e| e.path.as_slice()).collect();
        assert_eq!(order, vec![&b"a"[..], b"b", b"c", b"s"]);
        sort_entries(&mut v, get_tree_entries_request::SortBy::Filesystem as i32);
        let order: Vec<&[u8]> = v.iter().map(|e| e.path.as_slice()).collect();
        assert_eq!(order, vec![&b"a"[..], b"b", b"c", b"s"]);
        assert_eq!(
            tree_entry_of("r", "dir/", b"x", "o", 0o100644).path,
            b"dir/x"
        );
    }
}
