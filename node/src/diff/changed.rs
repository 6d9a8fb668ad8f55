//! FindChangedPaths: the paths each commit (against its parents, or against the parents
//! a request names) or each pair of trees changes, from one `git diff-tree -z --stdin
//! -r --root` for the whole request, read as it streams. The reading of diff-tree's
//! raw records is pure ([`Records`]), and unit tested.
//!
//! As Gitaly: merge commits are diffed against each parent (`-m`) unless the request
//! asks for the combined form (`-c`, one record per parent of each path changed
//! against all of them); renames only when asked (`--find-renames=30%`); the status
//! filter defaults to AMDTCR. Every revision is resolved through the read engine
//! first (to a commit, or to a tree), so git only ever sees object ids.

use refvote_proto::gitaly::changed_paths::Status as PathStatus;
use refvote_proto::gitaly::find_changed_paths_request::request::Type as RequestType;
use refvote_proto::gitaly::find_changed_paths_request::{DiffStatus, MergeCommitDiffMode};
use refvote_proto::gitaly::{ChangedPaths, FindChangedPathsRequest, FindChangedPathsResponse};
use tonic::Status;
use tonic::codegen::BoxStream;

use crate::engine::{Kind, Reader};
use crate::error::NodeError;
use crate::refs::names;
use crate::respond::{Batches, stream_from};
use crate::state::NodeState;

/// One line of diff-tree's input, resolved to object ids.
struct Line {
    input: String,
}

/// `rev^{kind}` through the engine, with Gitaly's errors for what resolves to nothing.
async fn resolve(reader: &mut Reader, rev: &str, kind: Kind, what: &str) -> Result<String, Status> {
    if rev.is_empty() {
        return Err(Status::invalid_argument("revision cannot be empty"));
    }
    names::revision("revision", rev.as_bytes())?;
    let peel = match kind {
        Kind::Tree => "tree",
        _ => "commit",
    };
    match reader.info(&format!("{rev}^{{{peel}}}")).await? {
        Some(i) if i.kind == kind => Ok(i.oid),
        _ => Err(Status::internal(format!(
            "resolving {what}: revision can not be found: {rev:?}"
        ))),
    }
}

pub async fn find_changed_paths(
    node: &NodeState,
    req: FindChangedPathsRequest,
) -> Result<BoxStream<FindChangedPathsResponse>, Status> {
    let repo = node.storages.existing(req.repository.as_ref())?;
    if !req.commits.is_empty() && !req.requests.is_empty() {
        return Err(Status::invalid_argument(
            "cannot specify both commits and requests",
        ));
    }
    let mut reader = node.reads.reader(&repo).await?;
    let mut lines = Vec::new();
    for c in &req.commits {
        let oid = resolve(&mut reader, c, Kind::Commit, "commit").await?;
        lines.push(Line { input: oid });
    }
    for r in &req.requests {
        match &r.r#type {
            Some(RequestType::CommitRequest(c)) => {
                let oid = resolve(&mut reader, &c.commit_revision, Kind::Commit, "commit").await?;
                let mut input = oid;
                for p in &c.parent_commit_revisions {
                    input.push(' ');
                    input.push_str(&resolve(&mut reader, p, Kind::Commit, "commit parent").await?);
                }
                lines.push(Line { input });
            }
            Some(RequestType::TreeRequest(t)) => {
                let left =
                    resolve(&mut reader, &t.left_tree_revision, Kind::Tree, "left tree").await?;
                let right = resolve(
                    &mut reader,
                    &t.right_tree_revision,
                    Kind::Tree,
                    "right tree",
                )
                .await?;
                lines.push(Line {
                    input: format!("{left} {right}"),
                });
            }
            None => {
                return Err(Status::invalid_argument(
                    "a request names neither commit nor trees",
                ));
            }
        }
    }
    drop(reader);
    let filter = diff_filter(&req.diff_filters)?;
    let mut cmd = node
        .git
        .command(["diff-tree", "-z", "--stdin", "-r", "--root"])
        .arg(format!("--diff-filter={filter}"))
        .arg(if req.find_renames {
            "--find-renames=30%"
        } else {
            "--no-renames"
        })
        .repo(&repo);
    cmd = match MergeCommitDiffMode::try_from(req.merge_commit_diff_mode) {
        Ok(MergeCommitDiffMode::AllParents) => cmd.arg("-c"),
        _ => cmd.arg("-m"),
    };
    let input: Vec<u8> = lines
        .iter()
        .flat_map(|l| format!("{}\n", l.input).into_bytes())
        .collect();
    let run = cmd
        .stdin(Box::pin(tokio_stream::once(Ok(input))))
        .spawn()
        .map_err(NodeError::from)?;
    Ok(stream_from(move |tx| async move {
        let mut out = Batches::new(tx, |paths| FindChangedPathsResponse { paths });
        let mut records = Records::new();
        let mut run = run;
        while let Some(chunk) = run.chunk().await {
            let chunk = chunk.map_err(NodeError::from)?;
            for p in records.feed(&chunk)? {
                if out.push(p).await.is_err() {
                    return Ok(());
                }
            }
        }
        let exit = run.wait().await.map_err(NodeError::from)?;
        if !exit.success() {
            return Err(Status::failed_precondition(format!(
                "cmd wait err: git diff-tree exited {}: {}",
                exit.code().unwrap_or(-1),
                exit.stderr.trim()
            )));
        }
        for p in records.finish()? {
            if out.push(p).await.is_err() {
                return Ok(());
            }
        }
        let _ = out.finish().await;
        Ok(())
    }))
}

/// `--diff-filter` letters for the statuses asked for (all of AMDTCR if none).
fn diff_filter(filters: &[i32]) -> Result<String, Status> {
    if filters.is_empty() {
        return Ok("AMDTCR".into());
    }
    let mut letters = String::new();
    for f in filters {
        let l = match DiffStatus::try_from(*f) {
            Ok(DiffStatus::Added) => 'A',
            Ok(DiffStatus::Modified) => 'M',
            Ok(DiffStatus::Deleted) => 'D',
            Ok(DiffStatus::TypeChange) => 'T',
            Ok(DiffStatus::Copied) => 'C',
            Ok(DiffStatus::Renamed) => 'R',
            _ => return Err(Status::invalid_argument(format!("unknown diff filter {f}"))),
        };
        if !letters.contains(l) {
            letters.push(l);
        }
    }
    Ok(letters)
}

fn status_of(letter: u8) -> Option<PathStatus> {
    Some(match letter {
        b'A' => PathStatus::Added,
        b'M' => PathStatus::Modified,
        b'D' => PathStatus::Deleted,
        b'T' => PathStatus::TypeChange,
        b'C' => PathStatus::Copied,
        b'R' => PathStatus::Renamed,
        _ => return None,
    })
}

/// diff-tree's `-z` output, split into NUL-terminated fields as it arrives: a commit
/// id (which commit the records after it are about; the commits of the input in
/// order), an echoed tree pair (newline-terminated, fused with the next field), a
/// raw record (`:modes oids status`), then one path, or two for a rename or copy.
struct Records {
    current: String,
    partial: Vec<u8>,
    /// A record waiting for its path(s): the parsed header and how many paths.
    pending: Option<(Vec<ChangedPaths>, usize, Vec<Vec<u8>>)>,
}

impl Records {
    fn new() -> Records {
        Records {
            current: String::new(),
            partial: Vec::new(),
            pending: None,
        }
    }

    fn feed(&mut self, data: &[u8]) -> Result<Vec<ChangedPaths>, Status> {
        self.partial.extend_from_slice(data);
        let mut out = Vec::new();
        let mut start = 0;
        while let Some(end) = self.partial[start..].iter().position(|b| *b == 0) {
            let field = self.partial[start..start + end].to_vec();
            start += end + 1;
            self.field(field, &mut out)?;
        }
        self.partial.drain(..start);
        Ok(out)
    }

    fn finish(&mut self) -> Result<Vec<ChangedPaths>, Status> {
        // What is left unterminated can only be echoed tree pairs.
        let echoes = self.partial.ends_with(b"\n") && !self.partial.contains(&b':');
        if (!self.partial.is_empty() && !echoes) || self.pending.is_some() {
            return Err(Status::internal(
                "git diff-tree parsing failed: output ends mid-record",
            ));
        }
        Ok(Vec::new())
    }

    fn field(&mut self, field: Vec<u8>, out: &mut Vec<ChangedPaths>) -> Result<(), Status> {
        if let Some((mut paths, wanted, mut got)) = self.pending.take() {
            got.push(field);
            if got.len() < wanted {
                self.pending = Some((paths, wanted, got));
                return Ok(());
            }
            let path = got.pop().unwrap_or_default();
            let old = got.pop().unwrap_or_default();
            for p in &mut paths {
                p.path = path.clone();
                p.old_path = old.clone();
            }
            out.extend(paths);
            return Ok(());
        }
        // An echoed tree pair ends with a newline, the record after it has no NUL
        // before it.
        let field = match field.iter().rposition(|b| *b == b'\n') {
            Some(nl) => {
                self.current.clear();
                field[nl + 1..].to_vec()
            }
            None => field,
        };
        if field.first() != Some(&b':') {
            let text = String::from_utf8_lossy(&field).into_owned();
            if !text.is_empty() && text.bytes().all(|b| b.is_ascii_hexdigit()) {
                // The next commit's section (repeated per parent with -m).
                self.current = text;
            }
            return Ok(());
        }
        let (paths, wanted) = parse_header(&field, &self.current)?;
        self.pending = Some((paths, wanted, Vec::new()));
        Ok(())
    }
}

/// A raw record's header (`:mode… mode oid… oid status`, one more colon per extra
/// parent): one ChangedPaths per parent, and how many paths follow.
fn parse_header(field: &[u8], commit: &str) -> Result<(Vec<ChangedPaths>, usize), Status> {
    let text = String::from_utf8_lossy(field);
    let colons = text.bytes().take_while(|b| *b == b':').count();
    let parts: Vec<&str> = text[colons..].split(' ').collect();
    let bad = || Status::internal(format!("git diff-tree parsing failed on: {text:?}"));
    if parts.len() != 2 * colons + 3 {
        return Err(bad());
    }
    let status_field = parts[parts.len() - 1];
    let letters: Vec<u8> = status_field
        .bytes()
        .filter(|b| status_of(*b).is_some())
        .collect();
    if letters.len() != colons {
        return Err(bad());
    }
    let score: i32 = status_field
        .trim_start_matches(|c: char| c.is_ascii_alphabetic())
        .parse()
        .unwrap_or(0);
    let mode = |s: &str| i32::from_str_radix(s, 8).map_err(|_| bad());
    let new_mode = mode(parts[colons])?;
    let new_blob = parts[2 * colons + 1].to_owned();
    let mut paths = Vec::with_capacity(colons);
    for i in 0..colons {
        let status = status_of(letters[i]).ok_or_else(bad)?;
        paths.push(ChangedPaths {
            status: status as i32,
            old_mode: mode(parts[i])?,
            new_mode,
            old_blob_id: parts[colons + 1 + i].to_owned(),
            new_blob_id: new_blob.clone(),
            score: if colons == 1 { score } else { 0 },
            commit_id: commit.to_owned(),
            ..Default::default()
        });
    }
    let two = colons == 1 && matches!(letters[0], b'R' | b'C');
    Ok((paths, if two { 2 } else { 1 }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "1111111111111111111111111111111111111111";
    const B: &str = "2222222222222222222222222222222222222222";
    const Z: &str = "0000000000000000000000000000000000000000";

    #[test]
    fn records_split_as_they_arrive() {
        let commit = "abcabcabcabcabcabcabcabcabcabcabcabcabca";
        let out = format!(
            "{commit}\0:100644 100644 {A} {B} M\0a.txt\0:000000 100644 {Z} {B} A\0dir/b\0\
             t1 t2\n:100644 100644 {A} {B} R087\0old\0new\0"
        );
        let mut r = Records::new();
        let mut got = Vec::new();
        // Byte by byte: nothing depends on where git's writes split.
        for b in out.as_bytes() {
            got.extend(r.feed(&[*b]).unwrap());
        }
        assert!(r.finish().unwrap().is_empty());
        assert_eq!(got.len(), 3);
        assert_eq!(got[0].path, b"a.txt");
        assert_eq!(got[0].status, PathStatus::Modified as i32);
        assert_eq!(got[0].commit_id, commit);
        assert_eq!(got[0].old_mode, 0o100644);
        assert_eq!(got[1].status, PathStatus::Added as i32);
        assert_eq!(got[1].old_blob_id, Z);
        assert_eq!(got[1].new_blob_id, B);
        assert_eq!(got[2].status, PathStatus::Renamed as i32);
        assert_eq!(got[2].old_path, b"old");
        assert_eq!(got[2].path, b"new");
        assert_eq!(got[2].score, 87);
        assert_eq!(got[2].commit_id, "", "a tree pair is no commit's");
    }

    #[test]
    fn combined_records_give_one_path_per_parent() {
        let c = "3333333333333333333333333333333333333333";
        let (paths, wanted) = parse_header(
            format!("::100644 100644 100644 {A} {B} {c} MM").as_bytes(),
            "x",
        )
        .unwrap();
        assert_eq!(wanted, 1);
        assert_eq!(paths.len(), 2);
        assert_eq!(paths[0].old_blob_id, A);
        assert_eq!(paths[1].old_blob_id, B);
        assert!(paths.iter().all(|p| p.new_blob_id == c));
        assert!(parse_header(b":100644 100644 x M", "x").is_err());
    }

    #[test]
    fn filters_map_to_letters() {
        assert_eq!(diff_filter(&[]).unwrap(), "AMDTCR");
        assert_eq!(
            diff_filter(&[DiffStatus::Deleted as i32, DiffStatus::Added as i32]).unwrap(),
            "DA"
        );
        assert!(diff_filter(&[99]).is_err());
    }
}
