//! DiffService and ConflictsService through a real router in front of three real
//! votingd nodes, on the repository `tests/fixtures/read-repo.sh` builds: every answer
//! is compared with what git itself prints for the same question on a replica (`git
//! diff --raw/--numstat/-p`, `git format-patch`, `git patch-id`, `git merge-tree`),
//! including Gitaly's limits and errors. Also: an outdated replica is never read by
//! these RPCs, and a node killed while it streams a large archive leaves the client
//! with an error, never a short success.

use std::collections::BTreeSet;
use std::time::Duration;

use refvote_proto::gitaly::commit_service_client::CommitServiceClient;
use refvote_proto::gitaly::conflicts_service_client::ConflictsServiceClient;
use refvote_proto::gitaly::diff_service_client::DiffServiceClient;
use refvote_proto::gitaly::repository_service_client::RepositoryServiceClient;
use refvote_proto::gitaly::{
    ChangedPaths, CommitDeltaRequest, CommitDiffRequest, CommitDiffResponse, ConflictFile,
    DiffBlobsRequest, DiffStatsRequest, GetArchiveRequest, GetPatchIdRequest,
    ListConflictFilesRequest, RawBlameRequest, RawDiffRequest, RawPatchRequest, changed_paths,
    conflict_file, diff_blobs_request, diff_blobs_response, get_archive_request,
};
use refvote_tests::reads::{EMPTY, REPO, ReadCluster, collect, git_bytes, nul_fields, repo};
use tonic::Code;
use tonic::transport::Channel;

/// One file of a CommitDiff answer, its pieces put together.
#[derive(Debug, Clone, Default)]
struct FileDiff {
    head: CommitDiffResponse,
    patch: Vec<u8>,
    messages: usize,
}

fn join_files(messages: Vec<CommitDiffResponse>) -> Vec<FileDiff> {
    let mut out: Vec<FileDiff> = Vec::new();
    let mut open = false;
    for m in messages {
        if !open {
            out.push(FileDiff {
                head: CommitDiffResponse {
                    raw_patch_data: Vec::new(),
                    ..m.clone()
                },
                ..Default::default()
            });
        }
        let f = out.last_mut().expect("a file is open");
        f.patch.extend_from_slice(&m.raw_patch_data);
        f.messages += 1;
        open = !m.end_of_patch;
    }
    assert!(!open, "the last file's patch never ended");
    out
}

fn diff_request(left: &str, right: &str) -> CommitDiffRequest {
    CommitDiffRequest {
        repository: repo(REPO),
        left_commit_id: left.into(),
        right_commit_id: right.into(),
        ..Default::default()
    }
}

async fn commit_diff(ch: &Channel, req: CommitDiffRequest) -> Result<Vec<FileDiff>, tonic::Status> {
    let mut client = DiffServiceClient::new(ch.clone());
    Ok(join_files(collect(client.commit_diff(req)).await?))
}

/// git's raw entries: (status letter, old mode, new mode, old id, new id, from, to).
type RawEntry = (u8, i32, i32, String, String, Vec<u8>, Vec<u8>);

fn raw_entries(output: &[u8]) -> Vec<RawEntry> {
    let fields = nul_fields(output);
    let mut out = Vec::new();
    let mut i = 0;
    while i < fields.len() {
        let head = String::from_utf8_lossy(&fields[i]).into_owned();
        let parts: Vec<&str> = head.trim_start_matches(':').split(' ').collect();
        let status = parts[4].as_bytes()[0];
        let from = fields[i + 1].clone();
        let (to, step) = if matches!(status, b'R' | b'C') {
            (fields[i + 2].clone(), 3)
        } else {
            (from.clone(), 2)
        };
        out.push((
            status,
            i32::from_str_radix(parts[0], 8).unwrap(),
            i32::from_str_radix(parts[1], 8).unwrap(),
            parts[2].to_owned(),
            parts[3].to_owned(),
            from,
            to,
        ));
        i += step;
    }
    out
}

/// git's patch of each file without the lines Gitaly drops (the `diff --git` line,
/// extended headers, `---`/`+++`): from the first hunk or `Binary` line on.
fn patches(output: &[u8]) -> Vec<Vec<u8>> {
    let text = output;
    let mut out: Vec<Vec<u8>> = Vec::new();
    let mut current: Option<(Vec<u8>, bool)> = None;
    for line in text.split_inclusive(|b| *b == b'\n') {
        if line.starts_with(b"diff --git ") {
            if let Some((p, _)) = current.take() {
                out.push(p);
            }
            current = Some((Vec::new(), false));
            continue;
        }
        let Some((p, started)) = current.as_mut() else {
            continue;
        };
        if !*started && (line.starts_with(b"@@") || line.starts_with(b"Binary")) {
            *started = true;
        }
        if *started {
            p.extend_from_slice(line);
        }
    }
    if let Some((p, _)) = current {
        out.push(p);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diffs_through_the_router_equal_what_git_prints() -> anyhow::Result<()> {
    let rc = ReadCluster::start(None).await?;
    let ch = rc.channel().await?;
    let (base, change) = (rc.rev("main~6")?, rc.rev("main~5")?);

    // CommitDiff: each file's fields equal git's raw entry (a type change comes as a
    // deletion and an addition), its patch git's patch, its counts git's numstat.
    let files = commit_diff(&ch, diff_request(&base, &change)).await?;
    let raw = raw_entries(&rc.git(&[
        "diff",
        "--raw",
        "-z",
        "--no-abbrev",
        "--find-renames=30%",
        &base,
        &change,
    ])?);
    let mut expected = Vec::new();
    for (status, old_mode, new_mode, from_id, to_id, from, to) in &raw {
        if *status == b'T' {
            let zero = "0".repeat(40);
            expected.push((
                0,
                *old_mode,
                from_id.clone(),
                zero.clone(),
                from.clone(),
                to.clone(),
            ));
            expected.push((*new_mode, 0, zero, to_id.clone(), from.clone(), to.clone()));
        } else {
            expected.push((
                *new_mode,
                *old_mode,
                from_id.clone(),
                to_id.clone(),
                from.clone(),
                to.clone(),
            ));
        }
    }
    assert_eq!(files.len(), expected.len(), "{files:#?}");
    for (f, (new_mode, old_mode, from_id, to_id, from, to)) in files.iter().zip(&expected) {
        assert_eq!(
            (
                f.head.new_mode,
                f.head.old_mode,
                &f.head.from_id,
                &f.head.to_id,
                &f.head.from_path,
                &f.head.to_path
            ),
            (*new_mode, *old_mode, from_id, to_id, from, to)
        );
    }
    let git_patches = patches(&rc.git(&[
        "diff",
        "--patch",
        "--full-index",
        "--find-renames=30%",
        &base,
        &change,
    ])?);
    let ours: Vec<&Vec<u8>> = files
        .iter()
        .map(|f| &f.patch)
        .filter(|p| !p.is_empty())
        .collect();
    let theirs: Vec<&Vec<u8>> = git_patches.iter().filter(|p| !p.is_empty()).collect();
    assert_eq!(ours, theirs);
    let numstat = nul_fields(&rc.git(&[
        "diff",
        "--numstat",
        "-z",
        "--find-renames=30%",
        &base,
        &change,
    ])?);
    for f in files
        .iter()
        .filter(|f| f.head.old_mode != 0 && f.head.new_mode != 0 && !f.head.binary)
    {
        let path = &f.head.to_path;
        let stat = numstat
            .iter()
            .position(|n| n.ends_with(&[b"\t", path.as_slice()].concat()) || n == path)
            .map(|i| {
                let line = if numstat[i] == *path {
                    &numstat[i - 2]
                } else {
                    &numstat[i]
                };
                let text = String::from_utf8_lossy(line).into_owned();
                let mut parts = text.split('\t');
                (
                    parts.next().unwrap().parse::<i32>().unwrap(),
                    parts.next().unwrap().parse::<i32>().unwrap(),
                )
            })
            .unwrap_or_else(|| panic!("no numstat for {}", String::from_utf8_lossy(path)));
        assert_eq!(
            (f.head.lines_added, f.head.lines_removed),
            stat,
            "{}",
            String::from_utf8_lossy(path)
        );
    }
    let by_path = |p: &str| {
        files
            .iter()
            .find(|f| f.head.to_path == p.as_bytes())
            .unwrap()
    };
    assert!(by_path("image.dat").head.binary);
    assert_eq!(by_path("new-name.txt").head.from_path, b"old-name.txt");
    assert_eq!(by_path("ünï cödé/fïlé.txt").head.lines_added, 1);
    // big.txt's patch is larger than one message: it comes in 5 KiB pieces.
    let big = by_path("big.txt");
    assert!(
        big.patch.len() > 5 * 1024 && big.messages == big.patch.len().div_ceil(5 * 1024),
        "{}",
        big.messages
    );

    // A submodule change.
    let sub = commit_diff(&ch, diff_request(&change, &rc.rev("main~4")?)).await?;
    let gitlink = sub
        .iter()
        .find(|f| f.head.to_path == b"sub")
        .expect("the submodule");
    assert_eq!(gitlink.head.new_mode, 0o160000);
    assert!(
        gitlink
            .patch
            .starts_with(b"@@ -0,0 +1 @@\n+Subproject commit ")
    );

    // Limits on the 50-file commit: max_files overflows after 10 files and stops.
    let (fifty_a, fifty_b) = (rc.rev("main~1")?, rc.rev("main")?);
    let limited = CommitDiffRequest {
        enforce_limits: true,
        max_files: 10,
        max_lines: 100_000,
        max_bytes: 10_000_000,
        max_patch_bytes: 100_000,
        ..diff_request(&fifty_a, &fifty_b)
    };
    let files = commit_diff(&ch, limited.clone()).await?;
    assert_eq!(files.len(), 11);
    assert!(
        files[..10]
            .iter()
            .all(|f| !f.head.overflow_marker && !f.patch.is_empty())
    );
    assert!(files[10].head.overflow_marker && files[10].head.to_path.is_empty());
    // collect_all_paths: every file comes, those past the limit without their patch.
    let files = commit_diff(
        &ch,
        CommitDiffRequest {
            collect_all_paths: true,
            ..limited.clone()
        },
    )
    .await?;
    assert_eq!(files.len(), 50);
    assert!(
        files[10..]
            .iter()
            .all(|f| f.head.overflow_marker && f.patch.is_empty())
    );
    // max_patch_bytes: larger patches come too_large and empty.
    let files = commit_diff(
        &ch,
        CommitDiffRequest {
            max_patch_bytes: 50,
            ..limited.clone()
        },
    )
    .await?;
    assert!(
        files[..10]
            .iter()
            .all(|f| f.head.too_large && f.patch.is_empty())
    );
    // safe limits collapse the files past them.
    let files = commit_diff(
        &ch,
        CommitDiffRequest {
            collapse_diffs: true,
            safe_max_files: 5,
            safe_max_lines: 100_000,
            safe_max_bytes: 10_000_000,
            ..diff_request(&fifty_a, &fifty_b)
        },
    )
    .await?;
    assert_eq!(files.len(), 50);
    assert!(files[..5].iter().all(|f| !f.head.collapsed));
    assert!(
        files[5..]
            .iter()
            .all(|f| f.head.collapsed && f.patch.is_empty() && f.head.lines_added == 2)
    );
    // Ignoring whitespace: whitespace.txt's change vanishes from the patch, the file
    // still comes (last, with git's numstat counts, as Gitaly sends it).
    let files = commit_diff(
        &ch,
        CommitDiffRequest {
            whitespace_changes: 2,
            ..diff_request(&base, &change)
        },
    )
    .await?;
    let ws = files
        .iter()
        .find(|f| f.head.to_path == b"whitespace.txt")
        .expect("whitespace.txt still listed");
    assert!(ws.patch.is_empty());

    // CommitDelta: git's raw entries with --find-renames (50 %).
    let mut client = DiffServiceClient::new(ch.clone());
    let deltas: Vec<_> = collect(client.commit_delta(CommitDeltaRequest {
        repository: repo(REPO),
        left_commit_id: base.clone(),
        right_commit_id: change.clone(),
        paths: vec![],
    }))
    .await?
    .into_iter()
    .flat_map(|m| m.deltas)
    .collect();
    let raw = raw_entries(&rc.git(&[
        "diff",
        "--raw",
        "-z",
        "--no-abbrev",
        "--find-renames",
        &base,
        &change,
    ])?);
    assert_eq!(
        deltas.len(),
        raw.len() + raw.iter().filter(|r| r.0 == b'T').count()
    );
    assert!(
        deltas
            .iter()
            .any(|d| d.from_path == b"old-name.txt" && d.to_path == b"new-name.txt")
    );

    // DiffStats: git's --numstat, binary files as 0/0, renames with their old path.
    let stats: Vec<_> = collect(client.diff_stats(DiffStatsRequest {
        repository: repo(REPO),
        left_commit_id: base.clone(),
        right_commit_id: change.clone(),
    }))
    .await?
    .into_iter()
    .flat_map(|m| m.stats)
    .collect();
    let git_stats = String::from_utf8(rc.git(&["diff", "--numstat", &base, &change])?)?;
    assert_eq!(stats.len(), git_stats.lines().count());
    let renamed = stats.iter().find(|s| s.path == b"new-name.txt").unwrap();
    assert_eq!(renamed.old_path, b"old-name.txt");
    assert_eq!((renamed.additions, renamed.deletions), (1, 1));

    // RawDiff and RawPatch: git's bytes exactly.
    let raw_diff: Vec<u8> = collect(client.raw_diff(RawDiffRequest {
        repository: repo(REPO),
        left_commit_id: base.clone(),
        right_commit_id: change.clone(),
    }))
    .await?
    .into_iter()
    .flat_map(|m| m.data)
    .collect();
    assert_eq!(raw_diff, rc.git(&["diff", "--full-index", &base, &change])?);
    let raw_patch: Vec<u8> = collect(client.raw_patch(RawPatchRequest {
        repository: repo(REPO),
        left_commit_id: base.clone(),
        right_commit_id: rc.rev("main~4")?,
    }))
    .await?
    .into_iter()
    .flat_map(|m| m.data)
    .collect();
    let range = format!("{base}..{}", rc.rev("main~4")?);
    assert_eq!(
        raw_patch,
        rc.git(&["format-patch", "--stdout", "--signature", "GitLab", &range])?
    );

    // GetPatchID: git diff | git patch-id --verbatim.
    let id = client
        .get_patch_id(GetPatchIdRequest {
            repository: repo(REPO),
            old_revision: base.clone().into_bytes(),
            new_revision: change.clone().into_bytes(),
            context_free: false,
        })
        .await?
        .into_inner()
        .patch_id;
    let diff = rc.git(&["diff", "--full-index", &base, &change])?;
    let mut patch_id = std::process::Command::new("git")
        .args(["patch-id", "--verbatim"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    use std::io::Write;
    patch_id.stdin.take().unwrap().write_all(&diff)?;
    let expected = String::from_utf8(patch_id.wait_with_output()?.stdout)?;
    assert_eq!(id, expected.split(' ').next().unwrap());
    let same = client
        .get_patch_id(GetPatchIdRequest {
            repository: repo(REPO),
            old_revision: base.clone().into_bytes(),
            new_revision: base.clone().into_bytes(),
            context_free: false,
        })
        .await
        .unwrap_err();
    assert_eq!(same.code(), Code::FailedPrecondition, "{same:?}");
    assert!(
        same.message()
            .contains("no difference between old and new revision")
    );

    // DiffBlobs: blob pairs, as git diff of the two blobs.
    let (old_blob, new_blob) = (
        rc.rev(&format!("{base}:old-name.txt"))?,
        rc.rev(&format!("{change}:new-name.txt"))?,
    );
    let answer = collect(client.diff_blobs(DiffBlobsRequest {
        repository: repo(REPO),
        blob_pairs: vec![diff_blobs_request::BlobPair {
            left_blob: old_blob.clone().into_bytes(),
            right_blob: new_blob.clone().into_bytes(),
        }],
        ..Default::default()
    }))
    .await?;
    assert_eq!(answer.len(), 1);
    assert_eq!(
        answer[0].status,
        diff_blobs_response::Status::EndOfPatch as i32
    );
    assert_eq!(
        answer[0].patch,
        patches(&rc.git(&["diff", &old_blob, &new_blob])?)[0]
    );
    assert_eq!((answer[0].lines_added, answer[0].lines_removed), (1, 1));
    // Raw entries (what FindChangedPaths gives): an added file diffs against nothing.
    let zero = "0".repeat(40);
    let added = rc.rev(&format!("{change}:added.txt"))?;
    let image = (
        rc.rev(&format!("{base}:image.dat"))?,
        rc.rev(&format!("{change}:image.dat"))?,
    );
    let answer = collect(client.diff_blobs(DiffBlobsRequest {
        repository: repo(REPO),
        raw_info: vec![
            ChangedPaths {
                path: b"added.txt".to_vec(),
                status: changed_paths::Status::Added as i32,
                old_mode: 0,
                new_mode: 0o100644,
                old_blob_id: zero.clone(),
                new_blob_id: added.clone(),
                ..Default::default()
            },
            ChangedPaths {
                path: b"image.dat".to_vec(),
                status: changed_paths::Status::Modified as i32,
                old_mode: 0o100644,
                new_mode: 0o100644,
                old_blob_id: image.0.clone(),
                new_blob_id: image.1.clone(),
                ..Default::default()
            },
        ],
        ..Default::default()
    }))
    .await?;
    assert_eq!(answer.len(), 2);
    assert_eq!(answer[0].left_blob_id, zero);
    assert_eq!(answer[0].patch, b"@@ -0,0 +1 @@\n+new file\n");
    assert!(answer[1].binary);
    assert_eq!(
        answer[1].patch,
        b"Binary files a/image.dat and b/image.dat differ\n"
    );
    // The repository gained nothing from the empty blob the addition needed.
    assert!(
        git_bytes(
            &rc.replica(),
            &["cat-file", "-e", "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"]
        )
        .is_err()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_diff_requests_get_gitalys_codes_and_run_no_git() -> anyhow::Result<()> {
    let rc = ReadCluster::start(None).await?;
    let ch = rc.channel().await?;
    let main = rc.rev("main")?;
    let err = commit_diff(&ch, diff_request("", &main)).await.unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::InvalidArgument, "empty LeftCommitId")
    );
    let err = commit_diff(&ch, diff_request(&main, "")).await.unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::InvalidArgument, "empty RightCommitId")
    );
    // An option-like revision never reaches git: no file appears.
    let target = rc.cluster.path("written-by-git");
    let option = format!("--output={}", target.display());
    for bad in [option.as_str(), "main..feature", "a\0b"] {
        let err = commit_diff(&ch, diff_request(bad, &main))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad}: {err:?}");
        let mut client = DiffServiceClient::new(ch.clone());
        let err = collect(client.raw_diff(RawDiffRequest {
            repository: repo(REPO),
            left_commit_id: bad.into(),
            right_commit_id: main.clone(),
        }))
        .await
        .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad}: {err:?}");
    }
    assert!(!target.exists(), "git ran with an option from the request");
    // A path climbing out of the tree.
    let err = commit_diff(
        &ch,
        CommitDiffRequest {
            paths: vec![b"../x".to_vec()],
            ..diff_request(&main, &main)
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // Unknown revisions: git's exit 128, FAILED_PRECONDITION as in Gitaly.
    let unknown = "1".repeat(40);
    let err = commit_diff(&ch, diff_request(&unknown, &main))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().starts_with("eachDiff: exit status 128"),
        "{err:?}"
    );
    let mut client = DiffServiceClient::new(ch.clone());
    let err = collect(client.commit_delta(CommitDeltaRequest {
        repository: repo(REPO),
        left_commit_id: unknown.clone(),
        right_commit_id: main.clone(),
        paths: vec![],
    }))
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let err = client
        .get_patch_id(GetPatchIdRequest {
            repository: repo(REPO),
            old_revision: unknown.clone().into_bytes(),
            new_revision: main.clone().into_bytes(),
            context_free: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    assert!(
        err.message()
            .starts_with("waiting for git-diff: exit status 128"),
        "{err:?}"
    );
    // The empty repository has no such commit either.
    let err = commit_diff(
        &ch,
        CommitDiffRequest {
            repository: repo(EMPTY),
            ..diff_request("HEAD~1", "HEAD")
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    // DiffBlobs' own checks.
    let err = collect(client.diff_blobs(DiffBlobsRequest {
        repository: repo(REPO),
        ..Default::default()
    }))
    .await
    .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (
            Code::InvalidArgument,
            "request contains no file pairs to diff"
        )
    );
    let blob = rc.rev("main:README.md")?;
    let err = collect(client.diff_blobs(DiffBlobsRequest {
        repository: repo(REPO),
        blob_pairs: vec![diff_blobs_request::BlobPair {
            left_blob: blob.clone().into(),
            right_blob: blob.clone().into(),
        }],
        ..Default::default()
    }))
    .await
    .unwrap_err();
    assert!(
        err.message()
            .starts_with("left and right blob revisions resolve to same OID"),
        "{err:?}"
    );
    let err = collect(client.diff_blobs(DiffBlobsRequest {
        repository: repo(REPO),
        blob_pairs: vec![diff_blobs_request::BlobPair {
            left_blob: main.clone().into(),
            right_blob: blob.into(),
        }],
        ..Default::default()
    }))
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("revision is not blob"), "{err:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflict_files_equal_git_merge_tree() -> anyhow::Result<()> {
    let rc = ReadCluster::start(None).await?;
    let ch = rc.channel().await?;
    let (ours, theirs) = (rc.rev("conflict-ours")?, rc.rev("conflict-theirs")?);
    let mut client = ConflictsServiceClient::new(ch.clone());
    let request = ListConflictFilesRequest {
        repository: repo(REPO),
        our_commit_oid: ours.clone(),
        their_commit_oid: theirs.clone(),
        allow_tree_conflicts: false,
        skip_content: false,
    };
    let files: Vec<ConflictFile> = collect(client.list_conflict_files(request.clone()))
        .await?
        .into_iter()
        .flat_map(|m| m.files)
        .collect();
    // What git merge-tree leaves in each file, in a scratch copy (it writes objects).
    let scratch = rc.cluster.path("merge-scratch");
    git_bytes(
        rc.cluster.dir.path(),
        &[
            "clone",
            "--quiet",
            "--bare",
            rc.replica().to_str().unwrap(),
            scratch.to_str().unwrap(),
        ],
    )?;
    let out = std::process::Command::new("git")
        .current_dir(&scratch)
        .args(["merge-tree", "-z", "--write-tree", &ours, &theirs])
        .output()?;
    assert_eq!(
        out.status.code(),
        Some(1),
        "the fixture's branches conflict"
    );
    let tree = String::from_utf8_lossy(nul_fields(&out.stdout)[0].as_slice()).into_owned();
    let mut headers = Vec::new();
    let mut contents: Vec<Vec<u8>> = Vec::new();
    for f in &files {
        match f.conflict_file_payload.as_ref().unwrap() {
            conflict_file::ConflictFilePayload::Header(h) => {
                headers.push(h.clone());
                contents.push(Vec::new());
            }
            conflict_file::ConflictFilePayload::Content(c) => {
                contents.last_mut().unwrap().extend(c)
            }
        }
    }
    let paths: Vec<(&[u8], &[u8], &[u8])> = headers
        .iter()
        .map(|h| {
            (
                h.our_path.as_slice(),
                h.their_path.as_slice(),
                h.ancestor_path.as_slice(),
            )
        })
        .collect();
    assert_eq!(
        paths,
        vec![
            (&b"both-added.txt"[..], &b"both-added.txt"[..], &b""[..]),
            (b"conflict.txt", b"conflict.txt", b"conflict.txt")
        ]
    );
    assert!(
        headers
            .iter()
            .all(|h| h.commit_oid == ours && h.our_mode == 0o100644)
    );
    for (h, content) in headers.iter().zip(&contents) {
        let path = String::from_utf8_lossy(&h.our_path).into_owned();
        let merged = String::from_utf8(git_bytes(
            &scratch,
            &["cat-file", "blob", &format!("{tree}:{path}")],
        )?)?;
        let expected = merged.replace(&ours, &path).replace(&theirs, &path);
        assert_eq!(String::from_utf8_lossy(content), expected);
        assert!(expected.contains(&format!("<<<<<<< {path}")));
    }
    // The quarantine kept the merge's objects out of the repository.
    assert!(git_bytes(&rc.replica(), &["cat-file", "-e", &tree]).is_err());
    // Headers only; a clean merge has no conflicts; an unknown side is refused.
    let headers_only: Vec<ConflictFile> =
        collect(client.list_conflict_files(ListConflictFilesRequest {
            skip_content: true,
            ..request.clone()
        }))
        .await?
        .into_iter()
        .flat_map(|m| m.files)
        .collect();
    assert_eq!(headers_only.len(), 2);
    let clean = collect(client.list_conflict_files(ListConflictFilesRequest {
        our_commit_oid: rc.rev("main~3")?,
        their_commit_oid: rc.rev("feature")?,
        ..request.clone()
    }))
    .await?;
    assert!(clean.iter().all(|m| m.files.is_empty()));
    let err = collect(client.list_conflict_files(ListConflictFilesRequest {
        their_commit_oid: "1".repeat(40),
        ..request.clone()
    }))
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().starts_with("could not lookup 'their' OID"));
    let err = collect(client.list_conflict_files(ListConflictFilesRequest {
        our_commit_oid: String::new(),
        ..request
    }))
    .await
    .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::InvalidArgument, "empty OurCommitOid")
    );
    Ok(())
}

/// Outcome of one read that names the commit only node1's replica has: Ok(true) if
/// the answer shows it, Ok(false) if the replica did not know it.
async fn read_sees_only_node1(
    ch: &Channel,
    rpc: &str,
    only: &str,
    main: &str,
) -> anyhow::Result<bool> {
    let diff = DiffServiceClient::new(ch.clone());
    let unknown = |r: Result<(), tonic::Status>| match r {
        Ok(()) => Ok(true),
        Err(s)
            if matches!(
                s.code(),
                Code::FailedPrecondition | Code::NotFound | Code::Internal | Code::InvalidArgument
            ) =>
        {
            Ok(false)
        }
        Err(s) => Err(anyhow::anyhow!("{rpc}: {s:?}")),
    };
    match rpc {
        "CommitDiff" => unknown(commit_diff(ch, diff_request(main, only)).await.map(|_| ())),
        "CommitDelta" => unknown(
            collect(diff.clone().commit_delta(CommitDeltaRequest {
                repository: repo(REPO),
                left_commit_id: main.into(),
                right_commit_id: only.into(),
                paths: vec![],
            }))
            .await
            .map(|_| ()),
        ),
        "RawPatch" => unknown(
            collect(diff.clone().raw_patch(RawPatchRequest {
                repository: repo(REPO),
                left_commit_id: main.into(),
                right_commit_id: only.into(),
            }))
            .await
            .map(|_| ()),
        ),
        "RawBlame" => unknown(
            collect(
                CommitServiceClient::new(ch.clone()).raw_blame(RawBlameRequest {
                    repository: repo(REPO),
                    revision: only.as_bytes().to_vec(),
                    path: b"only-on-node1.txt".to_vec(),
                    ..Default::default()
                }),
            )
            .await
            .map(|_| ()),
        ),
        "GetArchive" => unknown(
            collect(
                RepositoryServiceClient::new(ch.clone()).get_archive(GetArchiveRequest {
                    repository: repo(REPO),
                    commit_id: only.into(),
                    prefix: "p".into(),
                    format: get_archive_request::Format::Tar as i32,
                    ..Default::default()
                }),
            )
            .await
            .map(|_| ()),
        ),
        other => anyhow::bail!("unknown rpc {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outdated_replica_is_never_read() -> anyhow::Result<()> {
    let rc = ReadCluster::start(None).await?;
    let ch = rc.channel().await?;
    let main = rc.rev("main")?;
    // A commit only node1's replica has (written behind refvote's back).
    let node1 = rc.replica();
    let blob = {
        let mut c = std::process::Command::new("git")
            .current_dir(&node1)
            .args(["hash-object", "-w", "--stdin"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        use std::io::Write;
        c.stdin.take().unwrap().write_all(b"only here\n")?;
        String::from_utf8(c.wait_with_output()?.stdout)?
            .trim()
            .to_owned()
    };
    let tree_input = format!("100644 blob {blob}\tonly-on-node1.txt\n");
    let mut mk = std::process::Command::new("git")
        .current_dir(&node1)
        .arg("mktree")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    use std::io::Write;
    mk.stdin.take().unwrap().write_all(tree_input.as_bytes())?;
    let tree = String::from_utf8(mk.wait_with_output()?.stdout)?
        .trim()
        .to_owned();
    let commit = String::from_utf8(git_bytes(
        &node1,
        &[
            "-c",
            "user.name=x",
            "-c",
            "user.email=x@x",
            "commit-tree",
            &tree,
            "-p",
            &main,
            "-m",
            "only on node1",
        ],
    )?)?
    .trim()
    .to_owned();
    // Named by a ref: a repair of node1 (fetch --prune from a peer) removes the ref,
    // while the object it pointed to may stay in node1's object store.
    git_bytes(&node1, &["update-ref", "refs/heads/only-on-node1", &commit])?;
    let only = "only-on-node1".to_owned();
    let rpcs = [
        "CommitDiff",
        "CommitDelta",
        "RawPatch",
        "RawBlame",
        "GetArchive",
    ];
    for rpc in rpcs {
        let mut seen = BTreeSet::new();
        for _ in 0..6 {
            seen.insert(read_sees_only_node1(&ch, rpc, &only, &main).await?);
        }
        // node1 answers its share while it is up to date. (Where the others answer
        // Gitaly's FAILED_PRECONDITION for the unknown commit, the router tries the
        // next up-to-date replica, so node1 may answer every one of them.)
        assert!(seen.contains(&true), "{rpc}: node1 never answered");
    }
    rc.cluster
        .store
        .mark_outdated(&rc.id, "node1", "test: diverged")
        .await?;
    for rpc in rpcs {
        for i in 0..9 {
            assert!(
                !read_sees_only_node1(&ch, rpc, &only, &main).await?,
                "{rpc}: read {i} went to the outdated replica"
            );
        }
    }
    Ok(())
}

/// Processes whose parent is `pid` and whose command line contains `needle`.
fn children_running(pid: u32, needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Ok(child) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        let after = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
        let ppid: u32 = after
            .split(' ')
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        let cmdline = std::fs::read(format!("/proc/{child}/cmdline")).unwrap_or_default();
        if ppid == pid && String::from_utf8_lossy(&cmdline).contains(needle) {
            out.push(child);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_archive_leaves_an_error_not_a_short_success() -> anyhow::Result<()> {
    // 16 MiB of incompressible data: far more than the buffers between git and the
    // client (a few hundred KiB), so the stream is still running at the kill.
    let mut rc = ReadCluster::start(Some(
        "mkdir -p large && for i in $(seq 1 4); do head -c 4194304 /dev/urandom > large/blob-$i; done && \
         git add large && GIT_AUTHOR_DATE='1700100000 +0000' GIT_COMMITTER_DATE='1700100000 +0000' git commit --quiet -m large",
    ))
    .await?;
    let ch = rc.channel().await?;
    let main = rc.rev("main")?;
    let mut client = RepositoryServiceClient::new(ch.clone());
    let mut stream = client
        .get_archive(GetArchiveRequest {
            repository: repo(REPO),
            commit_id: main,
            prefix: "p".into(),
            format: get_archive_request::Format::Tar as i32,
            ..Default::default()
        })
        .await?
        .into_inner();
    let first = stream.message().await?.expect("the archive starts");
    let mut received = first.data.len();
    // Which node streams it: the one running git archive.
    let serving = rc
        .cluster
        .nodes
        .iter()
        .position(|n| {
            n.pid()
                .is_some_and(|p| !children_running(p, "archive").is_empty())
        })
        .expect("a node runs git archive");
    rc.cluster.nodes[serving].kill()?;
    let killed = std::time::Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match stream.message().await {
                Ok(Some(m)) => received += m.data.len(),
                Ok(None) => return Ok(()),
                Err(s) => return Err(s),
            }
        }
    })
    .await?;
    eprintln!(
        "the stream ended {:?} after the kill, {received} bytes in",
        killed.elapsed()
    );
    let full = rc
        .git(&["archive", "--format=tar", "--prefix=p/", "main"])?
        .len();
    match ended {
        Ok(()) => panic!("the stream ended as a success after {received} of {full} bytes"),
        Err(s) => {
            assert!(received < full, "all {full} bytes arrived before the kill");
            assert_ne!(s.code(), Code::Ok);
        }
    }
    Ok(())
}
