//! CommitService: commits and trees, read with `git cat-file --batch`, `git rev-list`,
//! `git ls-tree` and `git merge-base`.
//!
//! Where Gitaly answers a missing object with an empty answer rather than an error
//! (FindCommit, CommitIsAncestor, CountCommits), so do we: GitLab relies on it.
//! Malformed input (an option-like revision, a path that climbs out of the tree) is
//! INVALID_ARGUMENT before git runs.

use std::sync::Arc;

use base64::Engine;
use refvote_proto::gitaly::commit_service_server::CommitService;
use refvote_proto::gitaly::{
    CommitIsAncestorRequest, CommitIsAncestorResponse, CommitLanguagesRequest,
    CommitLanguagesResponse, CountCommitsRequest, CountCommitsResponse, FindCommitRequest,
    FindCommitResponse, GetTreeEntriesError, GetTreeEntriesRequest, GetTreeEntriesResponse,
    GitCommit, ListCommitsRequest, ListCommitsResponse, PaginationCursor, PathError,
    RawBlameRequest, RawBlameResponse, ResolveRevisionError, TreeEntry, TreeEntryRequest,
    TreeEntryResponse, get_tree_entries_error, get_tree_entries_request, list_commits_request,
    path_error, tree_entry, tree_entry_response,
};
use tokio::sync::mpsc;
use tonic::codegen::BoxStream;
use tonic::{Code, Request, Response, Status};

use super::catfile::{self, CatFile};
use super::detail::status_with_detail;
use super::error::NodeError;
use super::storage::RepoPath;
use crate::state::NodeState;

/// Bound on a tree listing read whole (Gitaly sorts and pages it in memory too).
const MAX_LISTING: usize = 256 * 1024 * 1024;
/// Entries per GetTreeEntries message, commits per ListCommits message.
const ENTRIES_PER_MESSAGE: usize = 100;
const COMMITS_PER_MESSAGE: usize = 20;
/// Gitaly follows lone subdirectories at most this deep for flat_path.
const FLAT_PATH_DEPTH: usize = 10;
/// Size of one data message of a streamed object.
pub(super) const DATA_CHUNK: usize = 32 * 1024;
/// Tree entry modes.
pub(super) const MODE_TREE: u32 = 0o040000;
pub(super) const MODE_SUBMODULE: u32 = 0o160000;

pub struct CommitSvc {
    node: Arc<NodeState>,
}

impl CommitSvc {
    pub fn new(node: Arc<NodeState>) -> CommitSvc {
        CommitSvc { node }
    }
}

/// Runs `work` in a task that feeds a response stream; its error (if any) ends the
/// stream. A client that goes away makes the sends fail, and the work stop.
pub(super) fn stream_from<T, F>(
    work: impl FnOnce(mpsc::Sender<Result<T, Status>>) -> F,
) -> BoxStream<T>
where
    T: Send + 'static,
    F: Future<Output = Result<(), Status>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(4);
    let fut = work(tx.clone());
    tokio::spawn(async move {
        if let Err(status) = fut.await {
            let _ = tx.send(Err(status)).await;
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// Streams up to `limit` content bytes of the object `cat` just found, in
/// [`DATA_CHUNK`] pieces, each wrapped by `wrap`; the first piece goes into `first`.
/// Returns false if the client went away.
pub(super) async fn send_data<T>(
    cat: &mut CatFile,
    limit: u64,
    tx: &mpsc::Sender<Result<T, Status>>,
    mut first: Option<T>,
    wrap: impl Fn(Option<T>, Vec<u8>) -> T,
) -> Result<bool, Status> {
    let mut left = limit;
    loop {
        let data = if left > 0 {
            cat.read(DATA_CHUNK.min(left as usize)).await?
        } else {
            Vec::new()
        };
        left -= data.len() as u64;
        if data.is_empty() && first.is_none() {
            return Ok(true);
        }
        if tx.send(Ok(wrap(first.take(), data))).await.is_err() {
            return Ok(false);
        }
        if left == 0 {
            return Ok(true);
        }
    }
}

#[tonic::async_trait]
impl CommitService for CommitSvc {
    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn find_commit(
        &self,
        request: Request<FindCommitRequest>,
    ) -> Result<Response<FindCommitResponse>, Status> {
        let req = request.into_inner();
        let repo = self.node.storages.existing(req.repository.as_ref())?;
        let rev = catfile::validate_revision(&req.revision, "revision", false)?;
        let mut cat = CatFile::start(&self.node.git, &repo)?;
        let mut commit = cat.commit(&rev).await?;
        if req.trailers
            && let Some(c) = commit.as_mut()
        {
            let message = match cat.object(&c.id).await? {
                Some((_, raw)) => message_of(&raw),
                None => c.body.clone(),
            };
            c.trailers = catfile::trailers(&self.node.git, &repo, &message).await?;
        }
        Ok(Response::new(FindCommitResponse { commit }))
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn commit_is_ancestor(
        &self,
        request: Request<CommitIsAncestorRequest>,
    ) -> Result<Response<CommitIsAncestorResponse>, Status> {
        let req = request.into_inner();
        let repo = self.node.storages.existing(req.repository.as_ref())?;
        let ancestor =
            catfile::validate_revision(req.ancestor_id.as_bytes(), "ancestor_id", false)?;
        let child = catfile::validate_revision(req.child_id.as_bytes(), "child_id", false)?;
        let exit = self
            .node
            .git
            .command(["merge-base", "--is-ancestor", "--end-of-options"])
            .arg(&ancestor)
            .arg(&child)
            .git_dir(&repo.path)
            .spawn()
            .map_err(NodeError::from)?
            .wait()
            .await
            .map_err(NodeError::from)?;
        // Exit 1 is "no"; like Gitaly, a commit that does not exist (exit 128) is "no" too.
        let value = match exit.code() {
            Some(0) => true,
            Some(1) | Some(128) => false,
            _ => return Err(NodeError::from(exit.into_error()).into()),
        };
        Ok(Response::new(CommitIsAncestorResponse { value }))
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn tree_entry(
        &self,
        request: Request<TreeEntryRequest>,
    ) -> Result<Response<BoxStream<TreeEntryResponse>>, Status> {
        let req = request.into_inner();
        let repo = self.node.storages.existing(req.repository.as_ref())?;
        let rev = catfile::validate_revision(&req.revision, "revision", false)?;
        if req.path.is_empty() {
            return Err(NodeError::invalid("empty path: name the tree entry to read").into());
        }
        if req.limit < 0 || req.max_size < 0 {
            return Err(NodeError::invalid("limit and max_size must not be negative").into());
        }
        let path = catfile::validate_tree_path(&req.path, "path")?;
        let mut cat = CatFile::start(&self.node.git, &repo)?;
        let not_found = || {
            Status::new(
                Code::NotFound,
                format!("tree entry not found: no {path:?} at revision {rev:?}"),
            )
        };
        let Some(item) = lookup(&mut cat, &rev, &path).await? else {
            return Err(not_found());
        };
        let base = TreeEntryResponse {
            oid: item.oid.clone(),
            mode: item.mode as i32,
            ..Default::default()
        };
        if item.mode == MODE_SUBMODULE {
            let only = TreeEntryResponse {
                r#type: tree_entry_response::ObjectType::Commit as i32,
                ..base
            };
            return Ok(Response::new(Box::pin(tokio_stream::once(Ok(only)))));
        }
        let Some(h) = cat.header(&item.oid).await? else {
            return Err(not_found());
        };
        if h.kind == "tree" {
            let only = TreeEntryResponse {
                r#type: tree_entry_response::ObjectType::Tree as i32,
                size: h.size as i64,
                ..base
            };
            return Ok(Response::new(Box::pin(tokio_stream::once(Ok(only)))));
        }
        if req.max_size > 0 && h.size > req.max_size as u64 {
            return Err(Status::new(
                Code::FailedPrecondition,
                format!(
                    "object size ({}) is bigger than the maximum allowed size ({})",
                    h.size, req.max_size
                ),
            ));
        }
        let limit = if req.limit > 0 {
            h.size.min(req.limit as u64)
        } else {
            h.size
        };
        let header = TreeEntryResponse {
            r#type: tree_entry_response::ObjectType::Blob as i32,
            size: h.size as i64,
            ..base
        };
        Ok(Response::new(stream_from(move |tx| async move {
            send_data(&mut cat, limit, &tx, Some(header), |first, data| {
                let mut m = first.unwrap_or_default();
                m.data = data;
                m
            })
            .await?;
            Ok(())
        })))
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn get_tree_entries(
        &self,
        request: Request<GetTreeEntriesRequest>,
    ) -> Result<Response<BoxStream<GetTreeEntriesResponse>>, Status> {
        let req = request.into_inner();
        let repo = self.node.storages.existing(req.repository.as_ref())?;
        let rev = catfile::validate_revision(&req.revision, "revision", false)?;
        if req.path.is_empty() {
            return Err(tree_error(
                Code::InvalidArgument,
                "empty path: use \".\" for the root tree",
                get_tree_entries_error::Error::Path(PathError {
                    path: Vec::new(),
                    error_type: path_error::ErrorType::EmptyPath as i32,
                }),
            ));
        }
        let path = if req.path == b"." {
            String::new()
        } else {
            catfile::validate_tree_path(&req.path, "path")?
        };
        let mut cat = CatFile::start(&self.node.git, &repo)?;
        let resolve_error = |code, message: &str| {
            tree_error(
                code,
                message,
                get_tree_entries_error::Error::ResolveTree(ResolveRevisionError {
                    revision: rev.clone().into_bytes(),
                }),
            )
        };
        let tree = match cat.header(&format!("{rev}:{path}")).await? {
            Some(h) if h.kind == "tree" => h,
            // Gitaly's wart, kept for its clients: a recursive listing of a non-tree is
            // empty, a flat one is an error.
            Some(_) if req.recursive => {
                return Ok(Response::new(Box::pin(tokio_stream::empty())));
            }
            Some(_) => {
                return Err(resolve_error(
                    Code::InvalidArgument,
                    &format!("path not treeish: {path:?} at {rev:?} is not a directory"),
                ));
            }
            None => {
                let code = if req.recursive {
                    Code::NotFound
                } else {
                    Code::InvalidArgument
                };
                return Err(resolve_error(
                    code,
                    &format!("invalid revision or path: nothing at {path:?} in {rev:?}"),
                ));
            }
        };
        let mut entries = self
            .list_tree(&repo, &tree.oid, &path, &rev, req.recursive)
            .await?;
        if !req.recursive && !req.skip_flat_paths {
            for e in entries.iter_mut() {
                e.flat_path = e.path.clone();
                if e.r#type == tree_entry::EntryType::Tree as i32 {
                    e.flat_path = flat_path(&mut cat, e).await?;
                }
            }
        }
        if req.sort == get_tree_entries_request::SortBy::TreesFirst as i32 {
            entries.sort_by_key(|e| match tree_entry::EntryType::try_from(e.r#type) {
                Ok(tree_entry::EntryType::Tree) => 0,
                Ok(tree_entry::EntryType::Blob) => 1,
                _ => 2,
            });
        }
        let (entries, cursor) = match &req.pagination_params {
            Some(p) => paginate(entries, &p.page_token, p.limit)?,
            None => (entries, String::new()),
        };
        Ok(Response::new(stream_from(move |tx| async move {
            let mut cursor = Some(cursor);
            let mut chunks = entries.chunks(ENTRIES_PER_MESSAGE).peekable();
            if chunks.peek().is_none() {
                // Nothing to list, but a cursor (if any) still reaches the client.
                let _ = tx
                    .send(Ok(GetTreeEntriesResponse {
                        entries: Vec::new(),
                        pagination_cursor: cursor
                            .take()
                            .map(|next_cursor| PaginationCursor { next_cursor }),
                    }))
                    .await;
                return Ok(());
            }
            for chunk in chunks {
                let msg = GetTreeEntriesResponse {
                    entries: chunk.to_vec(),
                    // Only on the first message, as Gitaly does.
                    pagination_cursor: cursor
                        .take()
                        .map(|next_cursor| PaginationCursor { next_cursor }),
                };
                if tx.send(Ok(msg)).await.is_err() {
                    break;
                }
            }
            Ok(())
        })))
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn list_commits(
        &self,
        request: Request<ListCommitsRequest>,
    ) -> Result<Response<BoxStream<ListCommitsResponse>>, Status> {
        let req = request.into_inner();
        let repo = self.node.storages.existing(req.repository.as_ref())?;
        if req.revisions.is_empty() {
            return Err(NodeError::invalid("missing revisions: name at least one").into());
        }
        let mut cmd = self.node.git.command(["rev-list"]).git_dir(&repo.path);
        match list_commits_request::Order::try_from(req.order) {
            Ok(list_commits_request::Order::None) => {}
            Ok(list_commits_request::Order::Topo) => cmd = cmd.arg("--topo-order"),
            Ok(list_commits_request::Order::Date) => cmd = cmd.arg("--date-order"),
            Err(_) => return Err(NodeError::invalid(format!("unknown order {}", req.order)).into()),
        }
        if req.max_parents > 0 {
            cmd = cmd.arg(format!("--max-parents={}", req.max_parents));
        }
        if req.disable_walk {
            cmd = cmd.arg("--no-walk");
        }
        if req.first_parent {
            cmd = cmd.arg("--first-parent");
        }
        if let Some(t) = &req.after {
            cmd = cmd.arg(format!("--max-age={}", t.seconds));
        }
        if let Some(t) = &req.before {
            cmd = cmd.arg(format!("--min-age={}", t.seconds));
        }
        if !req.author.is_empty() {
            cmd = cmd.arg(format!("--author={}", utf8(&req.author, "author")?));
        }
        if req.reverse {
            cmd = cmd.arg("--reverse");
        }
        if req.ignore_case {
            cmd = cmd.arg("--regexp-ignore-case");
        }
        for p in &req.commit_message_patterns {
            cmd = cmd.arg(format!("--grep={}", utf8(p, "commit_message_patterns")?));
        }
        if req.skip > 0 {
            cmd = cmd.arg(format!("--skip={}", req.skip));
        }
        for r in &req.revisions {
            // The two pseudo-revisions Gitaly allows; anything else option-like is refused.
            if r == "--not" || r == "--all" {
                cmd = cmd.arg(r);
            } else {
                cmd = cmd.arg(catfile::validate_revision(r.as_bytes(), "revision", false)?);
            }
        }
        let (token, limit) = match &req.pagination_params {
            Some(p) => (p.page_token.clone(), p.limit),
            None => (String::new(), 0),
        };
        if !token.is_empty() && !catfile::is_object_id(&token) {
            return Err(NodeError::invalid(format!(
                "page_token {token:?} must be the id of the last commit of the previous page"
            ))
            .into());
        }
        let mut run = cmd.arg("--").spawn().map_err(NodeError::from)?;
        let mut cat = CatFile::start(&self.node.git, &repo)?;
        Ok(Response::new(stream_from(move |tx| async move {
            let mut skipping = !token.is_empty();
            // Gitaly's meaning: a positive limit bounds the page; 0 or less does not.
            let mut left = if limit > 0 { limit as u64 } else { u64::MAX };
            let mut batch: Vec<GitCommit> = Vec::new();
            let mut partial: Vec<u8> = Vec::new();
            'read: while let Some(chunk) = run.chunk().await {
                partial.extend(chunk.map_err(NodeError::from)?);
                while let Some(i) = partial.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = partial.drain(..=i).collect();
                    let oid = String::from_utf8_lossy(&line[..i]).into_owned();
                    if skipping {
                        skipping = oid != token;
                        continue;
                    }
                    if left == 0 {
                        break 'read;
                    }
                    left -= 1;
                    if let Some(c) = cat.commit(&oid).await? {
                        batch.push(c);
                    }
                    if batch.len() == COMMITS_PER_MESSAGE {
                        let commits = std::mem::take(&mut batch);
                        if tx
                            .send(Ok(ListCommitsResponse {
                                commits,
                                pagination_cursor: None,
                            }))
                            .await
                            .is_err()
                        {
                            return Ok(());
                        }
                    }
                }
            }
            if left > 0 || skipping {
                // The walk ended on its own: how it ended matters (a bad revision).
                let exit = run.wait().await.map_err(NodeError::from)?;
                if !exit.success() {
                    return Err(Status::new(
                        Code::InvalidArgument,
                        format!(
                            "listing commits failed, check the revisions: {}",
                            exit.stderr.trim()
                        ),
                    ));
                }
            }
            if skipping {
                return Err(Status::new(
                    Code::InvalidArgument,
                    format!("page_token {token:?} is not among the listed commits"),
                ));
            }
            if !batch.is_empty() {
                let _ = tx
                    .send(Ok(ListCommitsResponse {
                        commits: batch,
                        pagination_cursor: None,
                    }))
                    .await;
            }
            Ok(())
        })))
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn count_commits(
        &self,
        request: Request<CountCommitsRequest>,
    ) -> Result<Response<CountCommitsResponse>, Status> {
        let req = request.into_inner();
        let repo = self.node.storages.existing(req.repository.as_ref())?;
        let mut cmd = self
            .node
            .git
            .command(["rev-list", "--count"])
            .git_dir(&repo.path);
        if req
            .global_options
            .as_ref()
            .is_some_and(|g| g.literal_pathspecs)
        {
            cmd = cmd.env("GIT_LITERAL_PATHSPECS", "1");
        }
        if let Some(t) = &req.after {
            cmd = cmd.arg(format!("--max-age={}", t.seconds));
        }
        if let Some(t) = &req.before {
            cmd = cmd.arg(format!("--min-age={}", t.seconds));
        }
        if req.max_count > 0 {
            cmd = cmd.arg(format!("--max-count={}", req.max_count));
        }
        if req.first_parent {
            cmd = cmd.arg("--first-parent");
        }
        cmd = match (req.all, req.revision.is_empty()) {
            (true, true) => cmd.arg("--all"),
            (false, false) => cmd.arg(catfile::validate_revision(
                &req.revision,
                "revision",
                false,
            )?),
            (true, false) => {
                return Err(
                    NodeError::invalid("revision and all exclude each other: set one").into(),
                );
            }
            (false, true) => {
                return Err(NodeError::invalid("empty revision: set revision or all").into());
            }
        };
        cmd = cmd.arg("--");
        if !req.path.is_empty() {
            cmd = cmd.arg(utf8(&req.path, "path")?);
        }
        let (out, exit) = cmd
            .spawn()
            .map_err(NodeError::from)?
            .output(64)
            .await
            .map_err(NodeError::from)?;
        // Like Gitaly: a revision that does not resolve counts zero commits.
        let count = if exit.success() {
            String::from_utf8_lossy(&out).trim().parse().unwrap_or(0)
        } else {
            0
        };
        Ok(Response::new(CountCommitsResponse { count }))
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn raw_blame(
        &self,
        request: Request<RawBlameRequest>,
    ) -> Result<Response<BoxStream<RawBlameResponse>>, Status> {
        crate::blame::raw_blame(&self.node, request.into_inner()).await
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn commit_languages(
        &self,
        request: Request<CommitLanguagesRequest>,
    ) -> Result<Response<CommitLanguagesResponse>, Status> {
        crate::languages::commit_languages(&self.node, request).await
    }
}

impl CommitSvc {
    /// The entries of tree `tree` (found at `path`, listed with paths from the root).
    async fn list_tree(
        &self,
        repo: &RepoPath,
        tree: &str,
        path: &str,
        rev: &str,
        recursive: bool,
    ) -> Result<Vec<TreeEntry>, NodeError> {
        let mut cmd = self
            .node
            .git
            .command(["ls-tree", "-z", "--full-tree"])
            .git_dir(&repo.path);
        if recursive {
            cmd = cmd.arg("-r").arg("-t");
        }
        let (out, exit) = cmd.arg(tree).spawn()?.output(MAX_LISTING).await?;
        exit.check()?;
        let prefix = if path.is_empty() {
            String::new()
        } else {
            format!("{path}/")
        };
        let mut entries = Vec::new();
        for record in out.split(|b| *b == 0).filter(|r| !r.is_empty()) {
            let Some(tab) = record.iter().position(|b| *b == b'\t') else {
                continue;
            };
            let meta = String::from_utf8_lossy(&record[..tab]).into_owned();
            let mut fields = meta.split(' ');
            let (Some(mode), Some(kind), Some(oid)) = (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            let r#type = match kind {
                "tree" => tree_entry::EntryType::Tree,
                "commit" => tree_entry::EntryType::Commit,
                _ => tree_entry::EntryType::Blob,
            };
            let mut full = prefix.clone().into_bytes();
            full.extend_from_slice(&record[tab + 1..]);
            entries.push(TreeEntry {
                oid: oid.to_owned(),
                path: full,
                r#type: r#type as i32,
                mode: i32::from_str_radix(mode, 8).unwrap_or(0),
                commit_oid: rev.to_owned(),
                flat_path: Vec::new(),
            });
        }
        Ok(entries)
    }
}

/// The path down to the first subdirectory that is not a lone subdirectory.
async fn flat_path(cat: &mut CatFile, entry: &TreeEntry) -> Result<Vec<u8>, NodeError> {
    let mut flat = entry.path.clone();
    let mut oid = entry.oid.clone();
    for _ in 1..FLAT_PATH_DEPTH {
        let Some((_, data)) = cat.object(&oid).await? else {
            break;
        };
        let items = catfile::parse_tree(&data, oid.len());
        match items.as_slice() {
            [only] if only.mode == MODE_TREE => {
                flat.push(b'/');
                flat.extend_from_slice(&only.name);
                oid = only.oid.clone();
            }
            _ => break,
        }
    }
    Ok(flat)
}

/// The entry at `path` in revision `rev`: read from its parent tree, so the mode is
/// known too (and submodules, whose commits are not in this repository, are found).
pub(super) async fn lookup(
    cat: &mut CatFile,
    rev: &str,
    path: &str,
) -> Result<Option<catfile::TreeItem>, NodeError> {
    let (dir, name) = match path.rsplit_once('/') {
        Some((d, n)) => (d, n),
        None => ("", path),
    };
    let Some((h, data)) = cat.object(&format!("{rev}:{dir}")).await? else {
        return Ok(None);
    };
    if h.kind != "tree" {
        return Ok(None);
    }
    Ok(catfile::parse_tree(&data, h.oid.len())
        .into_iter()
        .find(|i| i.name == name.as_bytes()))
}

/// Gitaly's page tokens: base64 of `{"file_name": <path>}`; an older form was the
/// entry's object id, still accepted.
fn paginate(
    entries: Vec<TreeEntry>,
    token: &str,
    limit: i32,
) -> Result<(Vec<TreeEntry>, String), Status> {
    let start = if token.is_empty() {
        0
    } else {
        let by_path = base64::engine::general_purpose::STANDARD
            .decode(token)
            .ok()
            .and_then(|raw| serde_json::from_slice::<serde_json::Value>(&raw).ok())
            .and_then(|v| v.get("file_name")?.as_str().map(str::to_owned));
        let found = entries.iter().position(|e| match &by_path {
            Some(p) => e.path == p.as_bytes(),
            None => e.oid == token,
        });
        match found {
            Some(i) => i + 1,
            None => {
                return Err(Status::new(
                    Code::InvalidArgument,
                    format!(
                        "page_token {token:?} names no entry of this tree: start again without it"
                    ),
                ));
            }
        }
    };
    if limit == 0 {
        return Ok((Vec::new(), String::new()));
    }
    let mut rest: Vec<TreeEntry> = entries.into_iter().skip(start).collect();
    if limit < 0 || limit as usize >= rest.len() {
        return Ok((rest, String::new()));
    }
    rest.truncate(limit as usize);
    let last = String::from_utf8_lossy(&rest[rest.len() - 1].path).into_owned();
    let token = base64::engine::general_purpose::STANDARD
        .encode(serde_json::json!({ "file_name": last }).to_string());
    Ok((rest, token))
}

fn tree_error(code: Code, message: &str, error: get_tree_entries_error::Error) -> Status {
    status_with_detail(
        code,
        message,
        "gitaly.GetTreeEntriesError",
        &GetTreeEntriesError { error: Some(error) },
    )
}

/// The message of a raw commit object.
fn message_of(raw: &[u8]) -> Vec<u8> {
    catfile::find(raw, b"\n\n")
        .map(|i| raw[i + 2..].to_vec())
        .unwrap_or_default()
}

fn utf8(bytes: &[u8], what: &str) -> Result<String, NodeError> {
    String::from_utf8(bytes.to_vec())
        .map_err(|_| NodeError::invalid(format!("{what} is not UTF-8")))
        .and_then(|s| {
            if s.contains('\0') {
                Err(NodeError::invalid(format!("{what} contains a NUL byte")))
            } else {
                Ok(s)
            }
        })
}
