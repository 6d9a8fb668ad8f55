//! BlobService: blobs by id (GetBlob), by revision and path (GetBlobs), reached by
//! revision walks (ListBlobs) or all in the object database (ListAllBlobs), and LFS
//! pointers (GetLFSPointers, ListLFSPointers, ListAllLFSPointers).
//! Contents stream from the read engine in 128 KiB pieces, never held whole; walks
//! are git's (`rev-list --objects`, `cat-file --batch-all-objects`).
//!
//! Gitaly's answers for what is not there: GetBlob sends one empty message for a
//! missing or non-blob object; GetBlobs sends only the revision and path.
//!
//! Every read sees the push quarantine a request names (the engine's processes and
//! the git a call runs alike). ListAllBlobs and ListLFSPointers on a quarantine (Rails
//! reads them during GitLab's checks of a push) are [`listing`]'s: they list the
//! quarantine's own objects only, as Gitaly does.

mod listing;

use std::sync::Arc;

use refvote_proto::gitaly::blob_service_server::BlobService;
use refvote_proto::gitaly::list_blobs_response::Blob;
use refvote_proto::gitaly::{
    GetBlobRequest, GetBlobResponse, GetBlobsRequest, GetBlobsResponse, GetLfsPointersRequest,
    GetLfsPointersResponse, LfsPointer, ListAllBlobsRequest, ListAllBlobsResponse,
    ListAllLfsPointersRequest, ListAllLfsPointersResponse, ListBlobsRequest, ListBlobsResponse,
    ListLfsPointersRequest, ListLfsPointersResponse, ObjectType, list_all_blobs_response,
};
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status};

use super::commit::tree::find_entry;
use super::error::NodeError;
use super::refs::names;
use crate::engine::{Kind, ObjectInfo, Reader, WINDOW};
use crate::object::{MODE_SUBMODULE, MODE_TREE, TreeItem};
use crate::records::Records;
use crate::respond::{Batches, DATA_CHUNK, Tx, once, send_object, stream_from};
use crate::state::NodeState;

/// Blobs larger than this are never LFS pointers (Gitaly's `lfsPointerMaxSize`).
const LFS_POINTER_MAX: u64 = 200;

pub struct BlobSvc {
    node: Arc<NodeState>,
}

impl BlobSvc {
    pub fn new(node: Arc<NodeState>) -> BlobSvc {
        BlobSvc { node }
    }
}

/// Bytes to send of an object of `size` under Gitaly's limit rule: negative = all.
fn read_limit(limit: i64, size: u64) -> u64 {
    if limit < 0 {
        size
    } else {
        size.min(limit as u64)
    }
}

type Stream<T> = Result<Response<BoxStream<T>>, Status>;

#[tonic::async_trait]
impl BlobService for BlobSvc {
    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn get_blob(&self, request: Request<GetBlobRequest>) -> Stream<GetBlobResponse> {
        let req = request.into_inner();
        let repo = self.node.storages.existing(req.repository.as_ref())?;
        if req.oid.is_empty() {
            return Err(Status::invalid_argument("empty Oid"));
        }
        let mut reader = self.node.reads.reader(&repo).await?;
        let info = match reader.info(&req.oid).await? {
            Some(i) if i.kind == Kind::Blob => i,
            // Missing, or not a blob: one empty message.
            _ => return Ok(Response::new(once(GetBlobResponse::default()))),
        };
        let limit = read_limit(req.limit, info.size);
        let first = GetBlobResponse {
            size: info.size as i64,
            oid: info.oid.clone(),
            data: Vec::new(),
        };
        if limit == 0 {
            return Ok(Response::new(once(first)));
        }
        reader.open(&info.oid).await?;
        Ok(Response::new(stream_from(move |tx| async move {
            send_object(&mut reader, limit, &tx, Some(first), |first, data| {
                let mut m = first.unwrap_or_default();
                m.data = data;
                m
            })
            .await?;
            Ok(())
        })))
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn get_blobs(&self, request: Request<GetBlobsRequest>) -> Stream<GetBlobsResponse> {
        let req = request.into_inner();
        let repo = self.node.storages.existing(req.repository.as_ref())?;
        if req.revision_paths.is_empty() {
            return Err(Status::invalid_argument("empty RevisionPaths"));
        }
        for rp in &req.revision_paths {
            names::revision("revision", rp.revision.as_bytes())?;
        }
        let reader = self.node.reads.reader(&repo).await?;
        Ok(Response::new(stream_from(move |tx| async move {
            get_blobs(reader, req, &tx).await
        })))
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn list_blobs(&self, request: Request<ListBlobsRequest>) -> Stream<ListBlobsResponse> {
        let req = request.into_inner();
        let repo = self.node.storages.existing(req.repository.as_ref())?;
        if req.revisions.is_empty() {
            return Err(Status::invalid_argument("missing revisions"));
        }
        for r in &req.revisions {
            names::path_revision_or_pseudo(r.as_bytes())
                .map_err(|e| Status::invalid_argument(format!("invalid revision: {e}")))?;
        }
        let input = req.revisions.join("\n").into_bytes();
        let run = self
            .node
            .git
            .command([
                "rev-list",
                "--stdin",
                "--in-commit-order",
                "--objects",
                "--object-names",
                "--filter=object:type=blob",
                "--filter-provided-objects",
            ])
            .repo(&repo)
            .stdin(Box::pin(tokio_stream::once(Ok(input))))
            .spawn()
            .map_err(NodeError::from)?;
        let reader = self.node.reads.reader(&repo).await?;
        let listing = Listing {
            limit: req.limit,
            bytes_limit: req.bytes_limit,
            with_paths: req.with_paths,
            typed: false,
        };
        Ok(Response::new(stream_from(move |tx| async move {
            let out = Batches::new(tx, |blobs| ListBlobsResponse { blobs });
            let make = |oid, size, data, path| Blob {
                oid,
                size,
                data,
                path,
            };
            list_blobs(reader, Records::new(run, b'\n'), listing, out, make).await
        })))
    }

    /// Every blob of the object database (loose, packed, alternates'), unordered, as
    /// ListBlobs sends them.
    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn list_all_blobs(
        &self,
        request: Request<ListAllBlobsRequest>,
    ) -> Stream<ListAllBlobsResponse> {
        let req = request.into_inner();
        let repo = self.node.storages.existing(req.repository.as_ref())?;
        if repo.quarantine.is_some() {
            return listing::list_all_blobs(&self.node, req).map(Response::new);
        }
        let run = all_blobs(&self.node, &repo)?;
        let reader = self.node.reads.reader(&repo).await?;
        let listing = Listing {
            limit: req.limit,
            bytes_limit: req.bytes_limit,
            with_paths: false,
            typed: true,
        };
        Ok(Response::new(stream_from(move |tx| async move {
            let out = Batches::new(tx, |blobs| ListAllBlobsResponse { blobs });
            let make = |oid, size, data, _path| list_all_blobs_response::Blob { oid, size, data };
            list_blobs(reader, Records::new(run, b'\n'), listing, out, make).await
        })))
    }

    /// The LFS pointers among the blobs a walk of `revisions` reaches.
    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn list_lfs_pointers(
        &self,
        request: Request<ListLfsPointersRequest>,
    ) -> Stream<ListLfsPointersResponse> {
        let req = request.into_inner();
        let repo = self.node.storages.existing(req.repository.as_ref())?;
        if repo.quarantine.is_some() {
            return listing::list_lfs_pointers(&self.node, req).map(Response::new);
        }
        if req.revisions.is_empty() {
            return Err(Status::invalid_argument("missing revisions"));
        }
        for r in &req.revisions {
            names::revision_or_pseudo(r.as_bytes())
                .map_err(|e| Status::invalid_argument(format!("invalid revision: {e}")))?;
        }
        let input = req.revisions.join("\n").into_bytes();
        let run = self
            .node
            .git
            .command([
                "rev-list",
                "--stdin",
                "--in-commit-order",
                "--objects",
                "--no-object-names",
                "--filter=blob:limit=201",
                "--filter-provided-objects",
            ])
            .repo(&repo)
            .stdin(Box::pin(tokio_stream::once(Ok(input))))
            .spawn()
            .map_err(NodeError::from)?;
        let reader = self.node.reads.reader(&repo).await?;
        Ok(Response::new(stream_from(move |tx| async move {
            let out = Batches::new(tx, |lfs_pointers| ListLfsPointersResponse { lfs_pointers });
            let limit = usize::try_from(req.limit).ok().filter(|l| *l > 0);
            lfs_pointers_of(reader, Records::new(run, b'\n'), limit, out).await
        })))
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn get_lfs_pointers(
        &self,
        request: Request<GetLfsPointersRequest>,
    ) -> Stream<GetLfsPointersResponse> {
        let req = request.into_inner();
        let repo = self.node.storages.existing(req.repository.as_ref())?;
        if req.blob_ids.is_empty() {
            return Err(Status::invalid_argument("empty BlobIds"));
        }
        let mut reader = self.node.reads.reader(&repo).await?;
        Ok(Response::new(stream_from(move |tx| async move {
            let mut out = Batches::new(tx, |lfs_pointers| GetLfsPointersResponse { lfs_pointers });
            for window in req.blob_ids.chunks(WINDOW) {
                let infos = reader.infos(window).await?;
                let mut small = Vec::new();
                for info in infos {
                    let Some(info) = info else {
                        return Err(Status::internal("object not found"));
                    };
                    if info.kind == Kind::Blob && info.size <= LFS_POINTER_MAX {
                        small.push(info.oid);
                    }
                }
                if send_pointers(&mut reader, &small, &mut out).await?.is_err() {
                    return Ok(());
                }
            }
            let _ = out.finish().await;
            Ok(())
        })))
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn list_all_lfs_pointers(
        &self,
        request: Request<ListAllLfsPointersRequest>,
    ) -> Stream<ListAllLfsPointersResponse> {
        let req = request.into_inner();
        let repo = self.node.storages.existing(req.repository.as_ref())?;
        let run = all_blobs(&self.node, &repo)?;
        let reader = self.node.reads.reader(&repo).await?;
        Ok(Response::new(stream_from(move |tx| async move {
            let out = Batches::new(tx, |lfs_pointers| ListAllLfsPointersResponse {
                lfs_pointers,
            });
            let limit = usize::try_from(req.limit).ok().filter(|l| *l > 0);
            lfs_pointers_of(reader, Records::new(run, b'\n'), limit, out).await
        })))
    }
}

/// `git cat-file --batch-all-objects` listing every object as `<oid> <type> <size>`
/// (git 2.47's cat-file has no type filter: `--filter=` would be taken for
/// `--filters`); the readers keep the blobs.
fn all_blobs(node: &NodeState, repo: &crate::storage::RepoPath) -> Result<crate::git::Run, Status> {
    Ok(node
        .git
        .command([
            "cat-file",
            "--batch-all-objects",
            "--batch-check=%(objectname) %(objecttype) %(objectsize)",
            "--buffer",
            "--unordered",
        ])
        .repo(repo)
        .spawn()
        .map_err(NodeError::from)?)
}

/// The LFS pointers among the objects `records` name (each line starts with an object
/// id; a line of `cat-file --batch-check` says its type and size too), in their order,
/// at most `limit`. Only small blobs are read.
async fn lfs_pointers_of<M>(
    mut reader: Reader,
    mut records: Records,
    limit: Option<usize>,
    mut out: Batches<LfsPointer, M>,
) -> Result<(), Status> {
    let limit = limit.unwrap_or(usize::MAX);
    let mut sent = 0usize;
    let mut small = Vec::new();
    loop {
        let line = records.next().await?;
        if let Some(line) = &line {
            let text = String::from_utf8_lossy(line);
            let mut f = text.split(' ');
            match (f.next(), f.next(), f.next()) {
                (Some(oid), Some("blob"), Some(size))
                    if size.parse::<u64>().is_ok_and(|s| s <= LFS_POINTER_MAX) =>
                {
                    small.push(oid.to_owned())
                }
                // A rev-list line: only an id; its size is checked when read.
                (Some(oid), None, None) if !oid.is_empty() => small.push(oid.to_owned()),
                _ => {}
            }
        }
        if small.len() == WINDOW || (line.is_none() && !small.is_empty()) {
            let batch = std::mem::take(&mut small);
            let infos = reader.infos(&batch).await?;
            let blobs: Vec<String> = infos
                .into_iter()
                .flatten()
                .filter(|i| i.kind == Kind::Blob && i.size <= LFS_POINTER_MAX)
                .map(|i| i.oid)
                .collect();
            for p in pointers(&mut reader, &blobs).await? {
                if sent >= limit {
                    break;
                }
                sent += 1;
                if out.push(p).await.is_err() {
                    return Ok(());
                }
            }
        }
        if line.is_none() || sent >= limit {
            break;
        }
    }
    if sent < limit
        && let Some(exit) = records.exit().filter(|e| !e.success())
    {
        return Err(Status::internal(format!(
            "listing LFS pointers: exit status {}, stderr: {:?}",
            exit.code().unwrap_or(-1),
            exit.stderr
        )));
    }
    let _ = out.finish().await;
    Ok(())
}

/// The LFS pointers among the small blobs `oids`, in order.
async fn pointers(reader: &mut Reader, oids: &[String]) -> Result<Vec<LfsPointer>, Status> {
    let objects = reader.objects(oids, LFS_POINTER_MAX).await?;
    Ok(objects
        .into_iter()
        .flatten()
        .filter_map(|o| {
            let (file_oid, file_size) = lfs_pointer(&o.data)?;
            Some(LfsPointer {
                size: o.data.len() as i64,
                data: o.data,
                oid: o.info.oid,
                file_size,
                file_oid,
            })
        })
        .collect())
}

async fn send_pointers<M>(
    reader: &mut Reader,
    oids: &[String],
    out: &mut Batches<LfsPointer, M>,
) -> Result<Result<(), crate::respond::Gone>, Status> {
    for p in pointers(reader, oids).await? {
        if let Err(g) = out.push(p).await {
            return Ok(Err(g));
        }
    }
    Ok(Ok(()))
}

/// Gitaly's `IsLFSPointer`: the spec line first, then a `oid sha256:<64 hex>` line
/// and a `size <digits>` line anywhere. Returns the file's oid and size.
pub fn lfs_pointer(data: &[u8]) -> Option<(Vec<u8>, i64)> {
    if !data.starts_with(b"version https://git-lfs.github.com/spec") {
        return None;
    }
    let text = std::str::from_utf8(data).ok()?;
    let mut oid = None;
    let mut size = None;
    for line in text.split('\n') {
        if oid.is_none()
            && let Some(hex) = line.strip_prefix("oid sha256:")
            && hex.len() == 64
            && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            oid = Some(hex.as_bytes().to_vec());
        }
        if size.is_none()
            && let Some(n) = line.strip_prefix("size ")
            && !n.is_empty()
            && n.bytes().all(|b| b.is_ascii_digit())
        {
            size = Some(n.parse::<i64>().ok()?);
        }
    }
    Some((oid?, size?))
}

async fn get_blobs(
    mut reader: Reader,
    req: GetBlobsRequest,
    tx: &Tx<GetBlobsResponse>,
) -> Result<(), Status> {
    for rp in req.revision_paths {
        let mut path = rp.path.clone();
        if path.len() > 1 {
            while path.last() == Some(&b'/') {
                path.pop();
            }
        }
        let named = GetBlobsResponse {
            revision: rp.revision.clone(),
            path: path.clone(),
            ..Default::default()
        };
        let text = String::from_utf8_lossy(&path).into_owned();
        let item: Option<TreeItem> = find_entry(&mut reader, &rp.revision, &text).await?;
        let Some(item) = item else {
            if tx.send(Ok(named)).await.is_err() {
                return Ok(());
            }
            continue;
        };
        let mut first = GetBlobsResponse {
            oid: item.oid.clone(),
            mode: item.mode as i32,
            ..named
        };
        if item.mode & 0o170000 == MODE_SUBMODULE {
            first.is_submodule = true;
            first.r#type = ObjectType::Commit as i32;
            if tx.send(Ok(first)).await.is_err() {
                return Ok(());
            }
            continue;
        }
        let Some(info): Option<ObjectInfo> = reader.info(&item.oid).await? else {
            return Err(Status::internal("read object info: object not found"));
        };
        first.size = info.size as i64;
        if item.mode & 0o170000 == MODE_TREE {
            first.r#type = ObjectType::Tree as i32;
            if tx.send(Ok(first)).await.is_err() {
                return Ok(());
            }
            continue;
        }
        first.r#type = ObjectType::Blob as i32;
        let limit = read_limit(req.limit, info.size);
        if limit == 0 {
            if tx.send(Ok(first)).await.is_err() {
                return Ok(());
            }
            continue;
        }
        if reader.open(&item.oid).await?.is_none() {
            return Err(Status::internal("read object: object not found"));
        }
        let more = send_object(&mut reader, limit, tx, Some(first), |first, data| {
            let mut m = first.unwrap_or_default();
            m.data = data;
            m
        })
        .await?;
        if !more {
            return Ok(());
        }
    }
    Ok(())
}

/// What a blob listing sends: at most `limit` blobs (0: all), each with at most
/// `bytes_limit` bytes of its contents (negative: all), with the path it was reached by.
#[derive(Clone, Copy)]
struct Listing {
    limit: u32,
    bytes_limit: i64,
    with_paths: bool,
    /// The records are `<oid> <type> <size>` (cat-file): only blobs count.
    typed: bool,
}

/// Sends the blobs `records` name (`<oid>[ <path>]` per line), as ListBlobs does: a
/// blob's first message carries its id and size, its contents follow in
/// [`DATA_CHUNK`] pieces whose id and size are empty.
async fn list_blobs<B: prost::Message, M>(
    mut reader: Reader,
    mut records: Records,
    req: Listing,
    mut out: Batches<B, M>,
    make: impl Fn(String, i64, Vec<u8>, Vec<u8>) -> B,
) -> Result<(), Status> {
    let limit = if req.limit > 0 {
        req.limit as usize
    } else {
        usize::MAX
    };
    let mut count = 0usize;
    while count < limit {
        let Some(line) = records.next().await? else {
            break;
        };
        let (oid, name) = match line.iter().position(|b| *b == b' ') {
            Some(i) => (
                String::from_utf8_lossy(&line[..i]).into_owned(),
                line[i + 1..].to_vec(),
            ),
            None => (String::from_utf8_lossy(&line).into_owned(), Vec::new()),
        };
        if req.typed && !name.starts_with(b"blob ") {
            continue;
        }
        let path = if req.with_paths { name } else { Vec::new() };
        count += 1;
        if req.bytes_limit == 0 {
            let Some(info) = reader.info(&oid).await? else {
                return Err(Status::internal("processing blobs: object not found"));
            };
            let blob = make(info.oid, info.size as i64, Vec::new(), path);
            if out.push(blob).await.is_err() {
                return Ok(());
            }
            continue;
        }
        let Some(info) = reader.open(&oid).await? else {
            return Err(Status::internal("processing blobs: object not found"));
        };
        let mut left = if req.bytes_limit < 0 {
            info.size
        } else {
            info.size.min(req.bytes_limit as u64)
        };
        let mut header = Some((info.oid.clone(), info.size as i64));
        while left > 0 {
            let data = reader.read(DATA_CHUNK.min(left as usize)).await?;
            if data.is_empty() {
                break;
            }
            left -= data.len() as u64;
            let (oid, size) = header.take().unwrap_or_default();
            let blob = make(oid, size, data, path.clone());
            if out.push(blob).await.is_err() {
                return Ok(());
            }
        }
        if let Some((oid, size)) = header.take() {
            let blob = make(oid, size, Vec::new(), path);
            if out.push(blob).await.is_err() {
                return Ok(());
            }
        }
    }
    if count < limit
        && let Some(exit) = records.exit().filter(|e| !e.success())
    {
        return Err(Status::internal(format!(
            "processing blobs: rev-list pipeline command: exit status {}, stderr: {:?}",
            exit.code().unwrap_or(-1),
            exit.stderr
        )));
    }
    let _ = out.finish().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lfs_pointers_are_recognised_as_gitaly_does() {
        let oid = "a".repeat(64);
        let p =
            format!("version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize 12345\n");
        assert_eq!(
            lfs_pointer(p.as_bytes()),
            Some((oid.as_bytes().to_vec(), 12345))
        );
        assert_eq!(lfs_pointer(b"hello"), None);
        let no_size = format!("version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\n");
        assert_eq!(lfs_pointer(no_size.as_bytes()), None);
        assert_eq!(read_limit(-1, 10), 10);
        assert_eq!(read_limit(3, 10), 3);
    }
}
