//! FindAllCommits, FilterShasWithSignatures and GetRawChanges through the router with
//! a client built from `proto/`, against the read fixture (`tests/fixtures/
//! read-repo.sh`), each answer compared with what git itself prints for the same
//! question on a replica: `git log` for the walks (every branch, one revision, counts
//! and orders), the commit objects' signature headers for the filter, and `git diff
//! --raw` with `git cat-file -s` for the raw changes; and the errors and empty answers
//! Gitaly gives for unknown or option-like revisions.

use std::collections::BTreeSet;

use refvote_proto::gitaly::commit_service_client::CommitServiceClient;
use refvote_proto::gitaly::find_all_commits_request::Order;
use refvote_proto::gitaly::get_raw_changes_response::RawChange;
use refvote_proto::gitaly::get_raw_changes_response::raw_change::Operation;
use refvote_proto::gitaly::repository_service_client::RepositoryServiceClient;
use refvote_proto::gitaly::{
    FilterShasWithSignaturesRequest, FindAllCommitsRequest, GetRawChangesRequest,
};
use refvote_tests::reads::{EMPTY, REPO, ReadCluster, collect, repo};
use tonic::Code;

const ZERO: &str = "0000000000000000000000000000000000000000";

/// FindAllCommits' ids and subjects, or the code.
async fn all_commits(
    commits: &mut CommitServiceClient<tonic::transport::Channel>,
    relative: &str,
    revision: &str,
    max_count: i32,
    skip: i32,
    order: Order,
) -> Result<Vec<(String, String)>, Code> {
    let answers = collect(commits.find_all_commits(FindAllCommitsRequest {
        repository: repo(relative),
        revision: revision.as_bytes().to_vec(),
        max_count,
        skip,
        order: order as i32,
    }))
    .await
    .map_err(|s| s.code())?;
    Ok(answers
        .into_iter()
        .flat_map(|m| m.commits)
        .map(|c| (c.id, String::from_utf8_lossy(&c.subject).into_owned()))
        .collect())
}

/// `git log --format=%H%x00%s <args>` on the replica, as (id, subject).
fn git_log(rc: &ReadCluster, args: &[&str]) -> anyhow::Result<Vec<(String, String)>> {
    let mut full = vec!["log", "--format=%H%x00%s"];
    full.extend_from_slice(args);
    Ok(rc
        .git_lines(&full)?
        .into_iter()
        .map(|l| {
            let (id, subject) = l.split_once('\0').expect("a NUL");
            (id.to_owned(), subject.to_owned())
        })
        .collect())
}

#[tokio::test(flavor = "multi_thread")]
async fn find_all_commits_equals_git_log() -> anyhow::Result<()> {
    let rc = ReadCluster::start(None).await?;
    let mut commits = CommitServiceClient::new(rc.channel().await?);

    // Every branch, git's default order, then each ordering.
    let every = all_commits(&mut commits, REPO, "", 0, 0, Order::None).await;
    let expected = git_log(&rc, &["--branches"])?;
    assert!(expected.len() > 10, "the fixture has history: {expected:?}");
    assert_eq!(every, Ok(expected));
    for (order, flag) in [(Order::Topo, "--topo-order"), (Order::Date, "--date-order")] {
        assert_eq!(
            all_commits(&mut commits, REPO, "", 0, 0, order).await,
            Ok(git_log(&rc, &["--branches", flag])?),
            "{flag}"
        );
    }
    // One revision, with a window: skip, count; negative bounds are none.
    assert_eq!(
        all_commits(&mut commits, REPO, "main", 3, 2, Order::None).await,
        Ok(git_log(&rc, &["--max-count=3", "--skip=2", "main"])?)
    );
    assert_eq!(
        all_commits(&mut commits, REPO, "signed", -1, -1, Order::Topo).await,
        Ok(git_log(&rc, &["--topo-order", "signed"])?)
    );
    assert_eq!(
        all_commits(&mut commits, REPO, "v1.0", 0, 0, Order::None).await,
        Ok(git_log(&rc, &["v1.0"])?)
    );
    // A window past the end is empty; so is what names nothing, and an empty
    // repository (git's failure is not an error, as in Gitaly).
    assert_eq!(
        all_commits(&mut commits, REPO, "main", 5, 10_000, Order::None).await,
        Ok(Vec::new())
    );
    assert_eq!(
        all_commits(&mut commits, REPO, "no-such-branch", 0, 0, Order::None).await,
        Ok(Vec::new())
    );
    assert_eq!(
        all_commits(&mut commits, EMPTY, "", 0, 0, Order::None).await,
        Ok(Vec::new())
    );
    // Revisions Gitaly refuses, before git runs.
    let target = rc.cluster.path("find-all-commits-output");
    for bad in [
        format!("--output={}", target.display()),
        "main..HEAD~1 x".to_owned(),
        "main:README.md".to_owned(),
    ] {
        assert_eq!(
            all_commits(&mut commits, REPO, &bad, 0, 0, Order::None).await,
            Err(Code::InvalidArgument),
            "{bad}"
        );
    }
    assert!(!target.exists(), "git never ran with --output");
    Ok(())
}

/// Whether git's commit object `id` carries a signature header.
fn signed_by_git(rc: &ReadCluster, id: &str) -> bool {
    let Ok(kind) = rc.git_text(&["cat-file", "-t", id]) else {
        return false;
    };
    if kind != "commit" {
        return false;
    }
    let text = rc.git_text(&["cat-file", "commit", id]).unwrap_or_default();
    let headers = text.split("\n\n").next().unwrap_or_default();
    headers
        .lines()
        .any(|l| l.starts_with("gpgsig ") || l.starts_with("gpgsig-sha256 "))
}

#[tokio::test(flavor = "multi_thread")]
async fn filter_shas_with_signatures_and_raw_changes_equal_git() -> anyhow::Result<()> {
    let rc = ReadCluster::start(None).await?;
    let ch = rc.channel().await?;
    let mut commits = CommitServiceClient::new(ch.clone());

    // FilterShasWithSignatures: per request, the signed ones among its ids, in order.
    let every: Vec<String> = rc.git_lines(&["rev-list", "--all"])?;
    let signed: Vec<String> = every
        .iter()
        .filter(|id| signed_by_git(&rc, id))
        .cloned()
        .collect();
    assert!(signed.len() >= 2, "the fixture signs commits: {signed:?}");
    let tree = rc.rev("main^{tree}")?;
    let requests = [
        every.clone(),
        vec![
            tree,
            "0123456789012345678901234567890123456789".into(),
            "not-an-id".into(),
        ],
        vec![signed[0].clone(), rc.rev("main")?, signed[0].clone()],
    ];
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    for (i, shas) in requests.iter().enumerate() {
        tx.send(FilterShasWithSignaturesRequest {
            // Only the first request names the repository.
            repository: if i == 0 { repo(REPO) } else { None },
            shas: shas.iter().map(|s| s.clone().into_bytes()).collect(),
        })
        .await?;
    }
    drop(tx);
    let answers: Vec<Vec<String>> = collect(
        commits.filter_shas_with_signatures(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
    .await?
    .into_iter()
    .map(|m| {
        m.shas
            .into_iter()
            .map(|s| String::from_utf8(s).unwrap())
            .collect()
    })
    .collect();
    let expected: Vec<Vec<String>> = requests
        .iter()
        .map(|shas| {
            shas.iter()
                .filter(|s| signed_by_git(&rc, s))
                .cloned()
                .collect()
        })
        .collect();
    assert_eq!(answers, expected);
    assert_eq!(answers[2], vec![signed[0].clone(), signed[0].clone()]);
    // No request at all: Gitaly's first receive fails with EOF.
    let (tx, rx) = tokio::sync::mpsc::channel::<FilterShasWithSignaturesRequest>(1);
    drop(tx);
    let empty = collect(
        commits.filter_shas_with_signatures(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
    .await;
    assert!(empty.is_err(), "{empty:?}");

    // GetRawChanges.
    let mut repos = RepositoryServiceClient::new(ch);
    let first = rc.git_lines(&["rev-list", "--max-parents=0", "main"])?;
    let root = first.last().expect("a root commit").clone();
    let ranges = [
        (root.clone(), "main".to_owned()),
        ("main~4".to_owned(), "main".to_owned()),
        (ZERO.to_owned(), "main".to_owned()),
        ("main".to_owned(), root.clone()),
        ("v1.0".to_owned(), "signed".to_owned()),
    ];
    let mut seen_ops = BTreeSet::new();
    for (from, to) in &ranges {
        let ours = raw_changes(&mut repos, from, to).await;
        let theirs = git_raw_changes(&rc, from, to)?;
        assert!(!theirs.is_empty(), "{from}..{to} changes something");
        seen_ops.extend(theirs.iter().map(|c| c.operation));
        assert_eq!(ours, Ok(theirs), "{from}..{to}");
    }
    // The fixture's ranges show additions, deletions, changes, renames and type changes.
    for op in [
        Operation::Added,
        Operation::Deleted,
        Operation::Modified,
        Operation::Renamed,
        Operation::TypeChanged,
    ] {
        assert!(seen_ops.contains(&(op as i32)), "{op:?} in {seen_ops:?}");
    }
    // A null `to` is nothing to report; nothing changed is nothing either.
    assert_eq!(raw_changes(&mut repos, "main", ZERO).await, Ok(Vec::new()));
    assert_eq!(
        raw_changes(&mut repos, "main", "main").await,
        Ok(Vec::new())
    );
    // Revisions naming nothing, or looking like options: INVALID_ARGUMENT with
    // Gitaly's message, and git never runs.
    let target = rc.cluster.path("raw-changes-output");
    let option = format!("--output={}", target.display());
    for (from, to, side) in [
        ("no-such-ref", "main", "from"),
        ("main", "no-such-ref", "to"),
        ("", "main", "from"),
        (option.as_str(), "main", "from"),
        ("main", option.as_str(), "to"),
    ] {
        let answer = repos
            .get_raw_changes(GetRawChangesRequest {
                repository: repo(REPO),
                from_revision: from.into(),
                to_revision: to.into(),
            })
            .await;
        let status = match answer {
            Ok(r) => {
                let mut s = r.into_inner();
                match s.message().await {
                    Err(status) => status,
                    Ok(m) => panic!("{from}..{to}: {m:?}"),
                }
            }
            Err(status) => status,
        };
        assert_eq!(status.code(), Code::InvalidArgument, "{from}..{to}");
        let named = if side == "from" { from } else { to };
        assert_eq!(
            status.message(),
            format!("invalid '{side}' revision: {named:?}"),
            "{from}..{to}"
        );
    }
    assert!(!target.exists(), "git never ran with --output");
    Ok(())
}

/// GetRawChanges' changes, or the code.
async fn raw_changes(
    repos: &mut RepositoryServiceClient<tonic::transport::Channel>,
    from: &str,
    to: &str,
) -> Result<Vec<RawChange>, Code> {
    let answers = collect(repos.get_raw_changes(GetRawChangesRequest {
        repository: repo(REPO),
        from_revision: from.into(),
        to_revision: to.into(),
    }))
    .await
    .map_err(|s| s.code())?;
    Ok(answers.into_iter().flat_map(|m| m.raw_changes).collect())
}

/// What git says changed from `from` to `to`: `git diff --raw -z`, each entry's blob
/// (new side, or old for a deletion; none for a submodule) sized by `git cat-file -s`.
fn git_raw_changes(rc: &ReadCluster, from: &str, to: &str) -> anyhow::Result<Vec<RawChange>> {
    let empty_tree = rc.git_text(&["hash-object", "-t", "tree", "/dev/null"])?;
    let from = if from == ZERO {
        empty_tree.as_str()
    } else {
        from
    };
    let out = rc.git(&["diff", "--raw", "-z", "--no-abbrev", from, to])?;
    let mut fields = out.split(|b| *b == 0).filter(|f| !f.is_empty());
    let mut changes = Vec::new();
    while let Some(head) = fields.next() {
        let head = String::from_utf8(head.to_vec())?;
        let parts: Vec<&str> = head.trim_start_matches(':').split(' ').collect();
        let (old_mode, new_mode) = (
            i32::from_str_radix(parts[0], 8)?,
            i32::from_str_radix(parts[1], 8)?,
        );
        let status = parts[4].as_bytes()[0];
        let first = fields.next().expect("a path").to_vec();
        let second = if matches!(status, b'R' | b'C') {
            fields.next().expect("a second path").to_vec()
        } else {
            Vec::new()
        };
        let (blob, mode) = if parts[3].bytes().all(|b| b == b'0') {
            (parts[2], old_mode)
        } else {
            (parts[3], new_mode)
        };
        let (blob_id, size) = if mode == 0o160000 {
            (String::new(), 0)
        } else {
            (
                blob.to_owned(),
                rc.git_text(&["cat-file", "-s", blob])?.parse()?,
            )
        };
        let (operation, old_path, new_path) = match status {
            b'A' => (Operation::Added, Vec::new(), first),
            b'D' => (Operation::Deleted, first, Vec::new()),
            b'M' => (Operation::Modified, first.clone(), first),
            b'T' => (Operation::TypeChanged, first.clone(), first),
            b'R' => (Operation::Renamed, first, second),
            b'C' => (Operation::Copied, first, second),
            _ => (Operation::Unknown, first.clone(), first),
        };
        changes.push(RawChange {
            blob_id,
            size,
            operation: operation as i32,
            old_mode,
            new_mode,
            new_path_bytes: new_path,
            old_path_bytes: old_path,
        });
    }
    Ok(changes)
}
