//! History walks: ListCommits and ListAllCommits (paged with a cursor), FindCommits
//! and CommitsByMessage (`git log`), CountCommits and CountDivergingCommits. The walk
//! is git's (`rev-list`, `log`, `cat-file --batch-all-objects`), streamed as git
//! prints it; the commits it names come from the read engine in batches.
//!
//! Error answers follow Gitaly's: an unknown revision fails ListCommits with INTERNAL
//! and git's complaint, FindCommits with NOT_FOUND "commits not found", and counts as
//! zero commits in CountCommits and as nothing in CommitsByMessage.

use refvote_proto::gitaly::{
    CommitStatInfo, CommitsByMessageRequest, CommitsByMessageResponse, CountCommitsRequest,
    CountCommitsResponse, CountDivergingCommitsRequest, CountDivergingCommitsResponse,
    FindCommitsError, FindCommitsRequest, FindCommitsResponse, GitCommit, GlobalOptions,
    ListAllCommitsRequest, ListAllCommitsResponse, ListCommitsRequest, ListCommitsResponse,
    PaginationCursor, find_commits_request, list_commits_request,
};
use tonic::codegen::BoxStream;
use tonic::{Code, Status};

use super::lookup::parse_trailers;
use crate::detail::status_with_detail;
use crate::engine::{ReadEngine, WINDOW};
use crate::error::NodeError;
use crate::git::Command;
use crate::records::Records;
use crate::refs::{head, names};
use crate::respond::{Chunker, Tx, stream_from};
use crate::state::NodeState;
use crate::storage::RepoPath;

/// A revision list entry: a pseudo-revision, or a revision by Gitaly's rules, refused
/// as "invalid revision: ...".
fn list_revision(rev: &[u8]) -> Result<String, Status> {
    names::revision_or_pseudo(rev)
        .map(str::to_owned)
        .map_err(|e| Status::invalid_argument(format!("invalid revision: {e}")))
}

/// `--literal-pathspecs` as the environment says it.
fn global_options(cmd: Command, options: Option<&GlobalOptions>) -> Command {
    match options {
        Some(o) if o.literal_pathspecs => cmd.env("GIT_LITERAL_PATHSPECS", "1"),
        _ => cmd,
    }
}

fn utf8(bytes: &[u8], what: &str) -> Result<String, Status> {
    match std::str::from_utf8(bytes) {
        Ok(s) if !s.contains('\0') => Ok(s.to_owned()),
        _ => Err(Status::invalid_argument(format!(
            "{what} is not UTF-8 or contains NUL"
        ))),
    }
}

/// Go's description of a failed command, as Gitaly's messages carry it.
fn exit_text(exit: &crate::git::Exit) -> String {
    match exit.code() {
        Some(c) => format!("exit status {c}"),
        None => "signal: killed".to_owned(),
    }
}

/// Commits named by `oids`, read in batches through the engine and sent through
/// `chunker`; returns false if the client went away.
pub(super) async fn send_commits<M>(
    reads: &ReadEngine,
    repo: &RepoPath,
    oids: &[String],
    tx: &Tx<M>,
    chunker: &mut Chunker<GitCommit>,
    wrap: fn(Vec<GitCommit>) -> M,
) -> Result<bool, Status> {
    let mut reader = reads.reader(repo).await?;
    for commit in reader.commits(oids).await?.into_iter().flatten() {
        if let Some(batch) = chunker.push(commit)
            && tx.send(Ok(wrap(batch))).await.is_err()
        {
            return Ok(false);
        }
    }
    Ok(true)
}

pub fn list_commits(
    node: &NodeState,
    req: ListCommitsRequest,
) -> Result<BoxStream<ListCommitsResponse>, Status> {
    let repo = node.storages.existing(req.repository.as_ref())?;
    if req.revisions.is_empty() {
        return Err(Status::invalid_argument("missing revisions"));
    }
    let revisions = req
        .revisions
        .iter()
        .map(|r| list_revision(r.as_bytes()))
        .collect::<Result<Vec<_>, _>>()?;
    let mut cmd = node.git.command(["rev-list", "--stdin"]).repo(&repo);
    match list_commits_request::Order::try_from(req.order) {
        Ok(list_commits_request::Order::Topo) => cmd = cmd.arg("--topo-order"),
        Ok(list_commits_request::Order::Date) => cmd = cmd.arg("--date-order"),
        _ => {}
    }
    if req.reverse {
        cmd = cmd.arg("--reverse");
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
    if let Some(t) = &req.before {
        cmd = cmd.arg(format!("--before=@{}", t.seconds));
    }
    if let Some(t) = &req.after {
        cmd = cmd.arg(format!("--after=@{}", t.seconds));
    }
    if !req.author.is_empty() {
        cmd = cmd.arg(format!("--author={}", utf8(&req.author, "author")?));
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
    cmd = global_options(cmd, req.global_options.as_ref()).arg("--");
    for p in &req.paths {
        cmd = cmd.arg(utf8(p, "paths")?);
    }
    let input = revisions.join("\n").into_bytes();
    let run = cmd
        .stdin(Box::pin(tokio_stream::once(Ok(input))))
        .spawn()
        .map_err(NodeError::from)?;
    let (token, limit) = match &req.pagination_params {
        Some(p) => (p.page_token.clone(), p.limit),
        None => (String::new(), 0),
    };
    let reads = node.reads.clone();
    Ok(stream_from(move |tx| async move {
        let mut records = Records::new(run, b'\n');
        let mut waiting = !token.is_empty();
        let mut count: i64 = 0;
        let mut more = false;
        let mut last = String::new();
        let mut chunker = Chunker::default();
        let mut pending: Vec<String> = Vec::new();
        let wrap = |commits| ListCommitsResponse {
            commits,
            pagination_cursor: None,
        };
        while let Some(line) = records.next().await? {
            let oid = String::from_utf8_lossy(&line).into_owned();
            if waiting {
                waiting = oid != token;
                continue;
            }
            if limit > 0 && count >= i64::from(limit) {
                more = true;
                break;
            }
            count += 1;
            last = oid.clone();
            pending.push(oid);
            if pending.len() == WINDOW {
                let batch = std::mem::take(&mut pending);
                if !send_commits(&reads, &repo, &batch, &tx, &mut chunker, wrap).await? {
                    return Ok(());
                }
            }
        }
        if !more {
            let exit = records.exit();
            if let Some(exit) = exit.filter(|e| !e.success()) {
                return Err(Status::internal(format!(
                    "iterating objects: rev-list pipeline command: {}, stderr: {:?}",
                    exit_text(&exit),
                    exit.stderr
                )));
            }
        }
        if !send_commits(&reads, &repo, &pending, &tx, &mut chunker, wrap).await? {
            return Ok(());
        }
        if let Some(commits) = chunker.finish() {
            let pagination_cursor = (more && !last.is_empty()).then(|| PaginationCursor {
                next_cursor: last.clone(),
            });
            let _ = tx
                .send(Ok(ListCommitsResponse {
                    commits,
                    pagination_cursor,
                }))
                .await;
        }
        Ok(())
    }))
}

/// Every commit object in the repository (or, for a quarantine, in its object
/// directory), in `cat-file --batch-all-objects --unordered` order.
pub fn list_all_commits(
    node: &NodeState,
    req: ListAllCommitsRequest,
) -> Result<BoxStream<ListAllCommitsResponse>, Status> {
    let repo = node.storages.existing(req.repository.as_ref())?;
    let run = node
        .git
        .command([
            "cat-file",
            "--batch-all-objects",
            "--batch-check=%(objectname) %(objecttype)",
            "--buffer",
            "--unordered",
            "--filter=object:type=commit",
        ])
        .repo(&repo)
        .spawn()
        .map_err(NodeError::from)?;
    let (token, limit) = match &req.pagination_params {
        Some(p) => (p.page_token.clone(), p.limit),
        None => (String::new(), 0),
    };
    let reads = node.reads.clone();
    Ok(stream_from(move |tx| async move {
        let mut records = Records::new(run, b'\n');
        let mut waiting = !token.is_empty();
        let mut count: i64 = 0;
        let mut chunker = Chunker::default();
        let mut pending = Vec::new();
        let wrap = |commits| ListAllCommitsResponse { commits };
        while let Some(line) = records.next().await? {
            let text = String::from_utf8_lossy(&line).into_owned();
            let Some((oid, kind)) = text.split_once(' ') else {
                continue;
            };
            if waiting {
                waiting = oid != token;
                continue;
            }
            if kind != "commit" {
                continue;
            }
            if limit > 0 && count >= i64::from(limit) {
                break;
            }
            count += 1;
            pending.push(oid.to_owned());
            if pending.len() == WINDOW {
                let batch = std::mem::take(&mut pending);
                if !send_commits(&reads, &repo, &batch, &tx, &mut chunker, wrap).await? {
                    return Ok(());
                }
            }
        }
        if let Some(exit) = records.exit().filter(|e| !e.success()) {
            return Err(Status::internal(format!(
                "iterating objects: {}: {}",
                exit_text(&exit),
                exit.stderr.trim()
            )));
        }
        if !send_commits(&reads, &repo, &pending, &tx, &mut chunker, wrap).await? {
            return Ok(());
        }
        if let Some(commits) = chunker.finish() {
            let _ = tx.send(Ok(ListAllCommitsResponse { commits })).await;
        }
        Ok(())
    }))
}

/// `git log`'s arguments for a FindCommits request (Gitaly's `getLogCommandSubCmd`).
fn find_commits_args(req: &FindCommitsRequest, revision: &str) -> Result<Vec<String>, Status> {
    let manual_offset = req.follow && req.offset > 0;
    let mut format = if req.include_shortstat {
        "--format=%x01%H".to_owned()
    } else {
        "--format=%H".to_owned()
    };
    if req.trailers {
        format.push_str("%x00%(trailers:unfold,separator=%x00)");
    }
    if !req.include_referenced_by.is_empty() {
        format.push_str("%x02%D");
    }
    let mut args = vec!["log".to_owned(), format];
    if req.offset > 0 && !manual_offset {
        args.push(format!("--skip={}", req.offset));
    }
    let limit = if manual_offset {
        i64::from(req.limit) + i64::from(req.offset)
    } else {
        i64::from(req.limit)
    };
    args.push(format!("--max-count={limit}"));
    if req.follow && !req.paths.is_empty() {
        args.push("--follow".into());
    }
    if !req.author.is_empty() {
        args.push(format!("--author={}", utf8(&req.author, "author")?));
    }
    if req.skip_merges {
        args.push("--no-merges".into());
    }
    if let Some(t) = &req.before {
        args.push(format!("--before=@{}", t.seconds));
    }
    if let Some(t) = &req.after {
        args.push(format!("--after=@{}", t.seconds));
    }
    if req.all {
        args.push("--all".into());
        args.push("--reverse".into());
    }
    if req.first_parent {
        args.push("--first-parent".into());
    }
    if req.order == find_commits_request::Order::Topo as i32 {
        args.push("--topo-order".into());
    }
    if req.include_shortstat {
        args.push("--shortstat".into());
    }
    if !req.include_referenced_by.is_empty() {
        args.push("--decorate=full".into());
        for p in &req.include_referenced_by {
            args.push(format!(
                "--decorate-refs={}",
                utf8(p, "include_referenced_by")?
            ));
        }
    }
    if !req.message_regex.is_empty() {
        args.push("--grep".into());
        args.push(req.message_regex.clone());
        args.push("--regexp-ignore-case".into());
    }
    if !revision.is_empty() || !req.all {
        args.push("--end-of-options".into());
        args.push(revision.to_owned());
    }
    args.push("--".into());
    for p in &req.paths {
        args.push(utf8(p, "paths")?);
    }
    Ok(args)
}

/// One commit of `git log`'s output: the id, trailers, refs and short stat.
#[derive(Debug, Default, PartialEq)]
struct LogRecord {
    oid: String,
    trailers: Option<Vec<u8>>,
    refs: Option<String>,
    stat: Option<String>,
}

fn parse_log_record(record: &[u8], trailers: bool, stat: bool, refs: bool) -> LogRecord {
    let text = String::from_utf8_lossy(record);
    let mut rest: &str = text.trim();
    let mut out = LogRecord::default();
    if stat && let Some((first, stats)) = rest.split_once('\n') {
        out.stat = Some(stats.to_owned());
        rest = first;
    }
    if refs && let Some((first, r)) = rest.split_once('\x02') {
        out.refs = Some(r.to_owned());
        rest = first;
    }
    if trailers && let Some((first, t)) = rest.split_once('\0') {
        out.trailers = Some(t.as_bytes().to_vec());
        rest = first;
    }
    out.oid = rest.to_owned();
    out
}

/// `%D`'s refs, each side of `HEAD -> refs/heads/main` and without `tag: `.
fn parse_refs(line: &str) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for r in line.split(", ").filter(|r| !r.is_empty()) {
        let r = r.strip_prefix("tag: ").unwrap_or(r);
        match r.split_once(" -> ") {
            Some((a, b)) => {
                out.push(a.as_bytes().to_vec());
                out.push(b.as_bytes().to_vec());
            }
            None => out.push(r.as_bytes().to_vec()),
        }
    }
    out
}

/// `N files changed, A insertions(+), D deletions(-)`.
fn parse_stat(line: &str) -> Option<CommitStatInfo> {
    let mut info = CommitStatInfo::default();
    let mut found = false;
    for part in line.trim().split(", ") {
        let mut words = part.split(' ');
        let n: i32 = words.next()?.parse().ok()?;
        match words.next()? {
            "file" | "files" => {
                info.changed_files = n;
                found = true;
            }
            w if w.starts_with("insertion") => info.additions = n,
            w if w.starts_with("deletion") => info.deletions = n,
            _ => return None,
        }
    }
    found.then_some(info)
}

pub async fn find_commits(
    node: &NodeState,
    req: FindCommitsRequest,
) -> Result<BoxStream<FindCommitsResponse>, Status> {
    let repo = node.storages.existing(req.repository.as_ref())?;
    let mut revision = if req.revision.is_empty() {
        String::new()
    } else {
        names::revision("revision", &req.revision)?.to_owned()
    };
    if revision.is_empty() && !req.all {
        let mut reader = node.reads.reader(&repo).await?;
        revision = head::default_branch(&node.git, &repo.path, &mut reader)
            .await
            .map_err(|e| Status::internal(format!("defaultBranchName: {e}")))?
            .unwrap_or_default();
    }
    if req.paths.iter().any(|p| p.is_empty()) {
        return Err(Status::invalid_argument("path is empty string"));
    }
    let args = find_commits_args(&req, &revision)?;
    let cmd = global_options(
        node.git.command(args).repo(&repo),
        req.global_options.as_ref(),
    );
    let run = cmd.spawn().map_err(NodeError::from)?;
    let reads = node.reads.clone();
    Ok(stream_from(move |tx| async move {
        find_commits_stream(&reads, &repo, &req, run, &tx).await
    }))
}

async fn find_commits_stream(
    reads: &ReadEngine,
    repo: &RepoPath,
    req: &FindCommitsRequest,
    run: crate::git::Run,
    tx: &Tx<FindCommitsResponse>,
) -> Result<(), Status> {
    let delimiter = if req.include_shortstat { 1 } else { b'\n' };
    let mut records = Records::new(run, delimiter);
    let mut skip = if req.follow && req.offset > 0 {
        req.offset as usize
    } else {
        0
    };
    let refs = !req.include_referenced_by.is_empty();
    let mut reader = reads.reader(repo).await?;
    let mut chunker = Chunker::default();
    let wrap = |commits| FindCommitsResponse { commits };
    let mut window: Vec<LogRecord> = Vec::new();
    loop {
        let record = records.next().await?;
        if let Some(r) = &record {
            if req.include_shortstat && r.is_empty() {
                continue;
            }
            if skip > 0 {
                skip -= 1;
                continue;
            }
            window.push(parse_log_record(
                r,
                req.trailers,
                req.include_shortstat,
                refs,
            ));
        }
        if window.len() == WINDOW || (record.is_none() && !window.is_empty()) {
            let oids: Vec<String> = window.iter().map(|w| w.oid.clone()).collect();
            let commits = reader.commits(&oids).await?;
            for (rec, commit) in std::mem::take(&mut window).into_iter().zip(commits) {
                let Some(mut commit) = commit else {
                    return Err(Status::internal(format!(
                        "error streaming commits: cat-file get commit {:?}: object not found",
                        rec.oid
                    )));
                };
                if let Some(r) = &rec.refs {
                    commit.referenced_by = parse_refs(r);
                }
                if let Some(t) = &rec.trailers {
                    commit.trailers = parse_trailers(t);
                }
                if let Some(s) = &rec.stat {
                    commit.short_stats = Some(parse_stat(s).ok_or_else(|| {
                        Status::internal(format!("get stats: unexpected stats format: {s:?}"))
                    })?);
                }
                if let Some(batch) = chunker.push(commit)
                    && tx.send(Ok(wrap(batch))).await.is_err()
                {
                    return Ok(());
                }
            }
        }
        if record.is_none() {
            break;
        }
    }
    if let Some(exit) = records.exit().filter(|e| !e.success()) {
        return Err(log_error(&exit.stderr));
    }
    if let Some(commits) = chunker.finish() {
        let _ = tx.send(Ok(FindCommitsResponse { commits })).await;
    }
    Ok(())
}

/// Gitaly's reading of a failed `git log`: an unknown revision or range is NOT_FOUND
/// with an empty FindCommitsError, anything else INTERNAL.
fn log_error(stderr: &str) -> Status {
    let not_found = stderr.contains("fatal: ambiguous argument")
        && stderr.contains("unknown revision or path not in the working tree")
        || stderr.contains("fatal: bad object")
        || stderr.contains("fatal: Invalid revision range")
        || (stderr.starts_with("fatal: bad revision '") && stderr.lines().count() == 1);
    if not_found {
        status_with_detail(
            Code::NotFound,
            "commits not found",
            "gitaly.FindCommitsError",
            &FindCommitsError { error: None },
        )
    } else {
        Status::internal("listing commits failed")
    }
}

pub async fn commits_by_message(
    node: &NodeState,
    req: CommitsByMessageRequest,
) -> Result<BoxStream<CommitsByMessageResponse>, Status> {
    let repo = node.storages.existing(req.repository.as_ref())?;
    let mut revision = if req.revision.is_empty() {
        String::new()
    } else {
        names::revision("revision", &req.revision)?.to_owned()
    };
    if req.query.is_empty() {
        return Err(Status::invalid_argument("empty Query"));
    }
    if revision.is_empty() {
        let mut reader = node.reads.reader(&repo).await?;
        revision = head::default_branch(&node.git, &repo.path, &mut reader)
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .unwrap_or_default();
    }
    let mut cmd = node
        .git
        .command(["log", "--pretty=%H"])
        .arg(format!("--grep={}", req.query))
        .arg("--regexp-ignore-case")
        .repo(&repo);
    if req.offset > 0 {
        cmd = cmd.arg(format!("--skip={}", req.offset));
    }
    if req.limit > 0 {
        cmd = cmd.arg(format!("--max-count={}", req.limit));
    }
    cmd = global_options(cmd, req.global_options.as_ref())
        .arg("--end-of-options")
        .arg(&revision)
        .arg("--");
    if !req.path.is_empty() {
        cmd = cmd.arg(utf8(&req.path, "path")?);
    }
    let run = cmd.spawn().map_err(NodeError::from)?;
    // Like Gitaly, git's own failure (an unknown revision) just ends the list.
    Ok(stream_listed(run, node.reads.clone(), repo, |commits| {
        CommitsByMessageResponse { commits }
    }))
}

/// The commits whose ids `run` (a git listing, one id per line) prints, read in windows
/// through the engine and sent in Gitaly's chunks, each wrapped by `wrap`. git's own
/// failure ends the list.
pub(super) fn stream_listed<M: Send + 'static>(
    run: crate::git::Run,
    reads: ReadEngine,
    repo: RepoPath,
    wrap: fn(Vec<GitCommit>) -> M,
) -> BoxStream<M> {
    stream_from(move |tx| async move {
        let mut records = Records::new(run, b'\n');
        let mut chunker = Chunker::default();
        let mut pending = Vec::new();
        while let Some(line) = records.next().await? {
            pending.push(String::from_utf8_lossy(&line).into_owned());
            if pending.len() == WINDOW {
                let batch = std::mem::take(&mut pending);
                if !send_commits(&reads, &repo, &batch, &tx, &mut chunker, wrap).await? {
                    return Ok(());
                }
            }
        }
        if !send_commits(&reads, &repo, &pending, &tx, &mut chunker, wrap).await? {
            return Ok(());
        }
        if let Some(commits) = chunker.finish() {
            let _ = tx.send(Ok(wrap(commits))).await;
        }
        Ok(())
    })
}

/// RFC 3339 in UTC, as Gitaly formats the count's date bounds.
fn rfc3339(seconds: i64) -> String {
    let days = seconds.div_euclid(86_400);
    let secs = seconds.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

pub async fn count_commits(
    node: &NodeState,
    req: CountCommitsRequest,
) -> Result<CountCommitsResponse, Status> {
    let repo = node.storages.existing(req.repository.as_ref())?;
    let mut cmd = node.git.command(["rev-list", "--count"]).repo(&repo);
    let mut revisions = Vec::new();
    if !req.revisions.is_empty() {
        for r in &req.revisions {
            revisions.push(list_revision(r)?);
        }
    } else {
        let rev = if req.revision.is_empty() {
            String::new()
        } else {
            names::revision("revision", &req.revision)?.to_owned()
        };
        if rev.is_empty() && !req.all {
            return Err(Status::invalid_argument("empty Revision and false All"));
        }
        if req.all {
            cmd = cmd.arg("--all");
        } else {
            revisions.push(rev);
        }
    }
    if let Some(t) = &req.before {
        cmd = cmd.arg(format!("--before={}", rfc3339(t.seconds)));
    }
    if let Some(t) = &req.after {
        cmd = cmd.arg(format!("--after={}", rfc3339(t.seconds)));
    }
    if req.max_count != 0 {
        cmd = cmd.arg(format!("--max-count={}", req.max_count));
    }
    if req.first_parent {
        cmd = cmd.arg("--first-parent");
    }
    for r in revisions {
        cmd = cmd.arg(r);
    }
    cmd = global_options(cmd, req.global_options.as_ref()).arg("--");
    if !req.path.is_empty() {
        cmd = cmd.arg(utf8(&req.path, "path")?);
    }
    let (out, exit) = cmd
        .spawn()
        .map_err(NodeError::from)?
        .output(64)
        .await
        .map_err(NodeError::from)?;
    // Like Gitaly: git's failure (an unknown revision) counts zero.
    let count = if exit.success() {
        String::from_utf8_lossy(&out)
            .trim()
            .parse::<i64>()
            .map_err(|e| Status::internal(format!("parse count: {e}")))?
    } else {
        0
    };
    Ok(CountCommitsResponse {
        count: count as i32,
    })
}

pub async fn count_diverging_commits(
    node: &NodeState,
    req: CountDivergingCommitsRequest,
) -> Result<CountDivergingCommitsResponse, Status> {
    if req.from.is_empty() || req.to.is_empty() {
        return Err(Status::invalid_argument("from and to are both required"));
    }
    let repo = node.storages.existing(req.repository.as_ref())?;
    let side = |raw: &[u8], what: &str| -> Result<String, Status> {
        let s = utf8(raw, what)?;
        if s.starts_with('-') || s.contains(char::is_whitespace) {
            return Err(Status::invalid_argument(format!(
                "{what} {s:?} can't start with '-' or contain whitespace"
            )));
        }
        Ok(s)
    };
    let (from, to) = (side(&req.from, "from")?, side(&req.to, "to")?);
    let mut cmd = node
        .git
        .command(["rev-list", "--count", "--left-right"])
        .repo(&repo);
    if req.max_count != 0 {
        cmd = cmd.arg(format!("--max-count={}", req.max_count));
    }
    let (out, exit) = cmd
        .arg(format!("{from}...{to}"))
        .arg("--")
        .spawn()
        .map_err(NodeError::from)?
        .output(128)
        .await
        .map_err(NodeError::from)?;
    if !exit.success() {
        return Err(Status::internal(format!(
            "gi rev-list error: {}",
            exit_text(&exit)
        )));
    }
    let text = String::from_utf8_lossy(&out);
    let counts: Vec<&str> = text.split_whitespace().collect();
    let [left, right] = counts.as_slice() else {
        return Err(Status::internal(format!(
            "invalid output from git rev-list --left-right: {text}"
        )));
    };
    let parse = |s: &str| {
        s.parse::<i32>()
            .map_err(|_| Status::internal(format!("invalid count value: {s}")))
    };
    Ok(CountDivergingCommitsResponse {
        left_count: parse(left)?,
        right_count: parse(right)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_records_split_like_gitalys() {
        let r = parse_log_record(b"abc\0Signed-off-by: A\0\x02HEAD -> refs/heads/main, tag: refs/tags/v1\n\n 2 files changed, 3 insertions(+)", true, true, true);
        assert_eq!(r.oid, "abc");
        assert_eq!(r.trailers.as_deref(), Some(&b"Signed-off-by: A\0"[..]));
        assert_eq!(
            parse_refs(r.refs.as_deref().unwrap()),
            vec![
                b"HEAD".to_vec(),
                b"refs/heads/main".to_vec(),
                b"refs/tags/v1".to_vec()
            ]
        );
        let s = parse_stat(r.stat.as_deref().unwrap()).unwrap();
        assert_eq!((s.changed_files, s.additions, s.deletions), (2, 3, 0));
        assert_eq!(
            parse_stat(" 1 file changed, 1 deletion(-)").map(|s| s.deletions),
            Some(1)
        );
        assert_eq!(parse_log_record(b"abc", false, false, false).oid, "abc");
    }

    #[test]
    fn revisions_pseudo_and_dates() {
        assert!(names::is_pseudo_revision(b"--not"));
        assert!(names::is_pseudo_revision(b"--glob=refs/heads/*"));
        assert!(list_revision(b"--output=/x").is_err());
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn log_failures_read_as_gitaly_reads_them() {
        let s = log_error(
            "fatal: ambiguous argument 'nope': unknown revision or path not in the working tree.\nUse '--' to separate",
        );
        assert_eq!(s.code(), Code::NotFound);
        assert_eq!(s.message(), "commits not found");
        assert_eq!(log_error("fatal: something else").code(), Code::Internal);
    }
}
