//! The reads behind GitLab's project page, tree, file, history and branch/tag pages,
//! through the router with a client built from `proto/`, each answer compared with what
//! git itself prints for the same question on a replica of the fixture
//! (`tests/fixtures/read-repo.sh`): commits, tree entries, last commits per path,
//! blobs and LFS pointers, history walks and counts, branches and tags, changed
//! paths, info/attributes, and the bad input Gitaly refuses before git runs.

use std::collections::BTreeSet;

use refvote_proto::gitaly::blob_service_client::BlobServiceClient;
use refvote_proto::gitaly::commit_service_client::CommitServiceClient;
use refvote_proto::gitaly::diff_service_client::DiffServiceClient;
use refvote_proto::gitaly::get_blobs_request::RevisionPath;
use refvote_proto::gitaly::get_tree_entries_request::SortBy as TreeSort;
use refvote_proto::gitaly::ref_service_client::RefServiceClient;
use refvote_proto::gitaly::repository_service_client::RepositoryServiceClient;
use refvote_proto::gitaly::{
    ChangedPaths, CheckObjectsExistRequest, CountCommitsRequest, CountDivergingCommitsRequest,
    FindAllBranchesRequest, FindAllRemoteBranchesRequest, FindAllTagsRequest,
    FindChangedPathsRequest, FindCommitRequest, FindCommitsRequest, FindLocalBranchesRequest,
    FindRefsByOidRequest, FindTagRequest, GetBlobRequest, GetBlobsRequest,
    GetCommitSignaturesRequest, GetInfoAttributesRequest, GetLfsPointersRequest,
    GetTreeEntriesRequest, HasLocalBranchesRequest, LastCommitForPathRequest, ListAllBlobsRequest,
    ListAllLfsPointersRequest, ListBlobsRequest, ListBranchNamesContainingCommitRequest,
    ListCommitsByOidRequest, ListCommitsRequest, ListFilesRequest, ListLastCommitsForTreeRequest,
    ListLfsPointersRequest, ListTagNamesContainingCommitRequest, ObjectFormat, ObjectFormatRequest,
    PaginationParameter, SignatureType, TreeEntry, TreeEntryRequest, changed_paths,
    find_changed_paths_request, tree_entry, tree_entry_response,
};
use refvote_tests::reads::{EMPTY, REPO, ReadCluster, collect, repo};
use tonic::Code;

/// One `git ls-tree` record: mode, type, oid, path.
type LsTree = (String, String, String, Vec<u8>);

/// `git ls-tree -z <args>` as records.
fn ls_tree(rc: &ReadCluster, args: &[&str]) -> anyhow::Result<Vec<LsTree>> {
    let mut full = vec!["ls-tree", "-z"];
    full.extend_from_slice(args);
    let out = rc.git(&full)?;
    let mut records = Vec::new();
    for r in out.split(|b| *b == 0).filter(|r| !r.is_empty()) {
        let tab = r.iter().position(|b| *b == b'\t').expect("a tab");
        let meta = String::from_utf8_lossy(&r[..tab]).into_owned();
        let f: Vec<&str> = meta.split(' ').collect();
        records.push((
            f[0].to_owned(),
            f[1].to_owned(),
            f[2].to_owned(),
            r[tab + 1..].to_vec(),
        ));
    }
    Ok(records)
}

fn entry_type(kind: &str) -> i32 {
    match kind {
        "tree" => tree_entry::EntryType::Tree as i32,
        "commit" => tree_entry::EntryType::Commit as i32,
        _ => tree_entry::EntryType::Blob as i32,
    }
}

/// (path, oid, type, mode) of entries, for comparing with git's.
fn shape(entries: &[TreeEntry]) -> Vec<(Vec<u8>, String, i32, i32)> {
    entries
        .iter()
        .map(|e| (e.path.clone(), e.oid.clone(), e.r#type, e.mode))
        .collect()
}

fn git_shape(records: &[LsTree]) -> Vec<(Vec<u8>, String, i32, i32)> {
    records
        .iter()
        .map(|(mode, kind, oid, path)| {
            (
                path.clone(),
                oid.clone(),
                entry_type(kind),
                i32::from_str_radix(mode, 8).unwrap(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn project_page_and_tree_reads_equal_git() -> anyhow::Result<()> {
    let rc = ReadCluster::start(None).await?;
    let ch = rc.channel().await?;
    let mut commits = CommitServiceClient::new(ch.clone());
    let mut repos = RepositoryServiceClient::new(ch.clone());
    let main = rc.rev("main")?;

    // FindCommit: the fields GitLab shows, as git prints them.
    let c = commits
        .find_commit(FindCommitRequest {
            repository: repo(REPO),
            revision: b"main".to_vec(),
            trailers: false,
        })
        .await?
        .into_inner()
        .commit
        .expect("main is a commit");
    let fields = rc.git_text(&[
        "log",
        "-1",
        "--format=%H%n%T%n%P%n%an%n%ae%n%at%n%s",
        "main",
    ])?;
    let f: Vec<&str> = fields.lines().collect();
    assert_eq!(c.id, f[0]);
    assert_eq!(c.tree_id, f[1]);
    assert_eq!(c.parent_ids, f[2].split(' ').collect::<Vec<_>>());
    let author = c.author.as_ref().unwrap();
    assert_eq!(author.name, f[3].as_bytes());
    assert_eq!(author.email, f[4].as_bytes());
    assert_eq!(author.date.as_ref().unwrap().seconds.to_string(), f[5]);
    assert_eq!(c.subject, f[6].as_bytes());
    assert_eq!(
        c.body,
        rc.git(&["log", "-1", "--format=%B", "main"])?
            .strip_suffix(b"\n")
            .unwrap()
    );
    // A revision naming nothing: an empty answer, as Gitaly gives.
    let none = commits
        .find_commit(FindCommitRequest {
            repository: repo(REPO),
            revision: b"no-such-branch".to_vec(),
            trailers: false,
        })
        .await?
        .into_inner();
    assert!(none.commit.is_none());

    // TreeEntry: a blob's bytes, a tree's id.
    let readme = collect(commits.tree_entry(TreeEntryRequest {
        repository: repo(REPO),
        revision: b"main".to_vec(),
        path: b"README.md".to_vec(),
        ..Default::default()
    }))
    .await?;
    assert_eq!(
        readme[0].r#type,
        tree_entry_response::ObjectType::Blob as i32
    );
    assert_eq!(readme[0].oid, rc.rev("main:README.md")?);
    assert_eq!(readme[0].mode, 0o100644);
    let data: Vec<u8> = readme.iter().flat_map(|m| m.data.clone()).collect();
    assert_eq!(data, rc.git(&["cat-file", "blob", "main:README.md"])?);
    let lib = collect(commits.tree_entry(TreeEntryRequest {
        repository: repo(REPO),
        revision: b"main".to_vec(),
        path: b"lib".to_vec(),
        ..Default::default()
    }))
    .await?;
    assert_eq!(lib[0].r#type, tree_entry_response::ObjectType::Tree as i32);
    assert_eq!(lib[0].oid, rc.rev("main:lib")?);
    let missing = commits
        .tree_entry(TreeEntryRequest {
            repository: repo(REPO),
            revision: b"main".to_vec(),
            path: b"no/such/file".to_vec(),
            ..Default::default()
        })
        .await;
    let code = match missing {
        Err(s) => s.code(),
        Ok(r) => {
            let mut s = r.into_inner();
            s.message()
                .await
                .err()
                .map(|e| e.code())
                .unwrap_or(Code::Ok)
        }
    };
    assert_eq!(code, Code::NotFound);

    // GetTreeEntries of the root, flat: git's tree order, ids, types and modes.
    let tree_req =
        |path: &[u8], recursive: bool, sort: TreeSort, page: Option<PaginationParameter>| {
            GetTreeEntriesRequest {
                repository: repo(REPO),
                revision: b"main".to_vec(),
                path: path.to_vec(),
                recursive,
                sort: sort as i32,
                pagination_params: page,
                skip_flat_paths: false,
            }
        };
    let flat: Vec<TreeEntry> =
        collect(commits.get_tree_entries(tree_req(b".", false, TreeSort::Default, None)))
            .await?
            .into_iter()
            .flat_map(|m| m.entries)
            .collect();
    let git_root = ls_tree(&rc, &["main"])?;
    assert_eq!(shape(&flat), git_shape(&git_root));
    assert!(flat.iter().all(|e| e.commit_oid == "main"));
    // Trees first: trees, then blobs, then submodules, each in git's order (Gitaly's
    // TREES_FIRST).
    let trees_first: Vec<TreeEntry> =
        collect(commits.get_tree_entries(tree_req(b".", false, TreeSort::TreesFirst, None)))
            .await?
            .into_iter()
            .flat_map(|m| m.entries)
            .collect();
    let mut expected: Vec<_> = git_root.iter().filter(|r| r.1 == "tree").cloned().collect();
    expected.extend(git_root.iter().filter(|r| r.1 == "blob").cloned());
    expected.extend(git_root.iter().filter(|r| r.1 == "commit").cloned());
    assert_eq!(shape(&trees_first), git_shape(&expected));

    // Recursive below a directory: every entry, trees too, as ls-tree -r -t lists them.
    let recursive: Vec<TreeEntry> =
        collect(commits.get_tree_entries(tree_req(b"many", true, TreeSort::Default, None)))
            .await?
            .into_iter()
            .flat_map(|m| m.entries)
            .collect();
    let git_many: Vec<_> = ls_tree(&rc, &["-r", "-t", "--full-tree", "main:many"])?
        .into_iter()
        .map(|(m, k, o, p)| (m, k, o, [b"many/".as_slice(), &p].concat()))
        .collect();
    assert_eq!(recursive.len(), 50);
    assert_eq!(shape(&recursive), git_shape(&git_many));

    // Pages of 7 walked by cursor give the whole listing once, in order; the last page
    // has no cursor.
    let mut paged = Vec::new();
    let mut token = String::new();
    for _ in 0..20 {
        let msgs = collect(commits.get_tree_entries(tree_req(
            b"many",
            true,
            TreeSort::Default,
            Some(PaginationParameter {
                page_token: token.clone(),
                limit: 7,
            }),
        )))
        .await?;
        let page: Vec<TreeEntry> = msgs.iter().flat_map(|m| m.entries.clone()).collect();
        assert!(page.len() <= 7);
        paged.extend(page);
        token = msgs
            .iter()
            .filter_map(|m| m.pagination_cursor.as_ref())
            .map(|c| c.next_cursor.clone())
            .next_back()
            .unwrap_or_default();
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(shape(&paged), shape(&recursive));

    // ListLastCommitsForTree: each root entry with the commit git log names for it.
    let last: Vec<_> = collect(
        commits.list_last_commits_for_tree(ListLastCommitsForTreeRequest {
            repository: repo(REPO),
            revision: main.clone(),
            path: Vec::new(),
            limit: 100,
            offset: 0,
            ..Default::default()
        }),
    )
    .await?
    .into_iter()
    .flat_map(|m| m.commits)
    .collect();
    let names: BTreeSet<Vec<u8>> = last.iter().map(|c| c.path_bytes.clone()).collect();
    let git_names: BTreeSet<Vec<u8>> = git_root.iter().map(|r| r.3.clone()).collect();
    assert_eq!(names, git_names);
    for c in &last {
        let path = String::from_utf8(c.path_bytes.clone())?;
        let expected = rc.git_text(&["log", "-1", "--format=%H", "main", "--", &path])?;
        assert_eq!(c.commit.as_ref().unwrap().id, expected, "{path}");
    }
    // offset and limit cut the same list.
    let window: Vec<_> = collect(commits.list_last_commits_for_tree(
        ListLastCommitsForTreeRequest {
            repository: repo(REPO),
            revision: main.clone(),
            path: Vec::new(),
            limit: 3,
            offset: 2,
            ..Default::default()
        },
    ))
    .await?
    .into_iter()
    .flat_map(|m| m.commits)
    .map(|c| c.path_bytes)
    .collect();
    assert_eq!(
        window,
        last[2..5]
            .iter()
            .map(|c| c.path_bytes.clone())
            .collect::<Vec<_>>()
    );

    // LastCommitForPath: git log -1 for a file, nothing for a path never there.
    for path in [
        "README.md",
        "new-name.txt",
        "many/file-7.txt",
        "ünï cödé/fïlé.txt",
    ] {
        let c = commits
            .last_commit_for_path(LastCommitForPathRequest {
                repository: repo(REPO),
                revision: b"main".to_vec(),
                path: path.as_bytes().to_vec(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .commit
            .expect("a last commit");
        assert_eq!(
            c.id,
            rc.git_text(&["log", "-1", "--format=%H", "main", "--", path])?,
            "{path}"
        );
    }
    let never = commits
        .last_commit_for_path(LastCommitForPathRequest {
            repository: repo(REPO),
            revision: b"main".to_vec(),
            path: b"never-existed.txt".to_vec(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert!(never.commit.is_none());

    // The project page's repository questions.
    let has = |r: &'static str| {
        let mut repos = repos.clone();
        async move {
            repos
                .has_local_branches(HasLocalBranchesRequest {
                    repository: repo(r),
                })
                .await
                .map(|r| r.into_inner().value)
        }
    };
    assert!(has(REPO).await?);
    assert!(!has(EMPTY).await?);
    let format = repos
        .object_format(ObjectFormatRequest {
            repository: repo(REPO),
        })
        .await?
        .into_inner()
        .format;
    assert_eq!(format, ObjectFormat::Sha1 as i32);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn file_reads_equal_git() -> anyhow::Result<()> {
    let rc = ReadCluster::start(None).await?;
    let ch = rc.channel().await?;
    let mut blobs = BlobServiceClient::new(ch.clone());
    let mut commits = CommitServiceClient::new(ch.clone());

    // GetBlob: the whole blob, or its first `limit` bytes; nothing for a missing id.
    let big = rc.rev("main:big.txt")?;
    let whole = rc.git(&["cat-file", "blob", &big])?;
    let answer = collect(blobs.get_blob(GetBlobRequest {
        repository: repo(REPO),
        oid: big.clone(),
        limit: -1,
    }))
    .await?;
    assert_eq!(answer[0].oid, big);
    assert_eq!(answer[0].size as usize, whole.len());
    let data: Vec<u8> = answer.iter().flat_map(|m| m.data.clone()).collect();
    assert_eq!(data, whole);
    let cut = collect(blobs.get_blob(GetBlobRequest {
        repository: repo(REPO),
        oid: big.clone(),
        limit: 100,
    }))
    .await?;
    let data: Vec<u8> = cut.iter().flat_map(|m| m.data.clone()).collect();
    assert_eq!(data, whole[..100]);
    let unknown = collect(blobs.get_blob(GetBlobRequest {
        repository: repo(REPO),
        oid: "0123456789012345678901234567890123456789".into(),
        limit: -1,
    }))
    .await?;
    assert_eq!(unknown.len(), 1);
    assert!(unknown[0].oid.is_empty() && unknown[0].data.is_empty());

    // GetBlobs by revision and path: a file's bytes, a missing path's names only.
    let answer = collect(blobs.get_blobs(GetBlobsRequest {
        repository: repo(REPO),
        revision_paths: vec![
            RevisionPath {
                revision: "main".into(),
                path: "ünï cödé/fïlé.txt".as_bytes().to_vec(),
            },
            RevisionPath {
                revision: "main".into(),
                path: b"not/here".to_vec(),
            },
        ],
        limit: -1,
    }))
    .await?;
    let first: Vec<_> = answer
        .iter()
        .filter(|m| m.path == "ünï cödé/fïlé.txt".as_bytes() || m.path.is_empty())
        .collect();
    assert_eq!(first[0].oid, rc.rev("main:ünï cödé/fïlé.txt")?);
    assert_eq!(
        first
            .iter()
            .flat_map(|m| m.data.clone())
            .collect::<Vec<u8>>(),
        rc.git(&["cat-file", "blob", "main:ünï cödé/fïlé.txt"])?
    );
    let gone = answer
        .iter()
        .find(|m| m.path == b"not/here")
        .expect("named back");
    assert!(gone.oid.is_empty());

    // ListBlobs: the blobs a walk reaches, as rev-list finds them.
    let listed: BTreeSet<String> = collect(blobs.list_blobs(ListBlobsRequest {
        repository: repo(REPO),
        revisions: vec!["main".into(), "--not".into(), "main~1".into()],
        limit: 0,
        bytes_limit: 0,
        with_paths: true,
    }))
    .await?
    .into_iter()
    .flat_map(|m| m.blobs)
    .map(|b| b.oid)
    .collect();
    let walked: BTreeSet<String> = rc
        .git_lines(&[
            "rev-list",
            "--objects",
            "--no-object-names",
            "--filter=object:type=blob",
            "--filter-provided-objects",
            "main",
            "--not",
            "main~1",
        ])?
        .into_iter()
        .collect();
    assert_eq!(listed, walked);
    assert_eq!(listed.len(), 50);

    // ListAllBlobs: every blob in the object database, sizes as git counts them.
    let all = collect(blobs.list_all_blobs(ListAllBlobsRequest {
        repository: repo(REPO),
        limit: 0,
        bytes_limit: 0,
    }))
    .await?
    .into_iter()
    .flat_map(|m| m.blobs)
    .collect::<Vec<_>>();
    let git_all: BTreeSet<(String, i64)> = rc
        .git_lines(&[
            "cat-file",
            "--batch-all-objects",
            "--batch-check=%(objectname) %(objecttype) %(objectsize)",
        ])?
        .into_iter()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f[1] == "blob").then(|| (f[0].to_owned(), f[2].parse().unwrap()))
        })
        .collect();
    let ours: BTreeSet<(String, i64)> = all.iter().map(|b| (b.oid.clone(), b.size)).collect();
    assert_eq!(ours, git_all);
    let limited = collect(blobs.list_all_blobs(ListAllBlobsRequest {
        repository: repo(REPO),
        limit: 3,
        bytes_limit: 5,
    }))
    .await?
    .into_iter()
    .flat_map(|m| m.blobs)
    .collect::<Vec<_>>();
    let heads: Vec<_> = limited.iter().filter(|b| !b.oid.is_empty()).collect();
    assert_eq!(heads.len(), 3);
    for b in &heads {
        let bytes = rc.git(&["cat-file", "blob", &b.oid])?;
        assert_eq!(b.data, bytes[..bytes.len().min(5)], "{}", b.oid);
    }

    // LFS pointers: by id, reachable from revisions, and all of them.
    let pointer = rc.rev("main:asset.bin")?;
    let found = collect(blobs.get_lfs_pointers(GetLfsPointersRequest {
        repository: repo(REPO),
        blob_ids: vec![pointer.clone(), rc.rev("main:README.md")?],
    }))
    .await?
    .into_iter()
    .flat_map(|m| m.lfs_pointers)
    .collect::<Vec<_>>();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].oid, pointer);
    assert_eq!(found[0].data, rc.git(&["cat-file", "blob", &pointer])?);
    assert_eq!(found[0].file_size, 12345);
    assert_eq!(
        found[0].file_oid,
        b"4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393"
    );
    let reachable = collect(blobs.list_lfs_pointers(ListLfsPointersRequest {
        repository: repo(REPO),
        revisions: vec!["main".into()],
        limit: 0,
    }))
    .await?
    .into_iter()
    .flat_map(|m| m.lfs_pointers)
    .map(|p| p.oid)
    .collect::<Vec<_>>();
    assert_eq!(reachable, vec![pointer.clone()]);
    let none = collect(blobs.list_lfs_pointers(ListLfsPointersRequest {
        repository: repo(REPO),
        revisions: vec!["main".into(), "--not".into(), "--all".into()],
        limit: 0,
    }))
    .await?;
    assert!(none.iter().all(|m| m.lfs_pointers.is_empty()));
    let refused = collect(blobs.list_lfs_pointers(ListLfsPointersRequest {
        repository: repo(REPO),
        revisions: Vec::new(),
        limit: 0,
    }))
    .await
    .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    let everywhere = collect(blobs.list_all_lfs_pointers(ListAllLfsPointersRequest {
        repository: repo(REPO),
        limit: 0,
    }))
    .await?
    .into_iter()
    .flat_map(|m| m.lfs_pointers)
    .map(|p| p.oid)
    .collect::<Vec<_>>();
    assert_eq!(everywhere, vec![pointer]);

    // ListFiles: every blob path of the revision, as ls-tree -r names them.
    let files: Vec<Vec<u8>> = collect(commits.list_files(ListFilesRequest {
        repository: repo(REPO),
        revision: b"main".to_vec(),
    }))
    .await?
    .into_iter()
    .flat_map(|m| m.paths)
    .collect();
    let git_files: Vec<Vec<u8>> = ls_tree(&rc, &["-r", "--full-tree", "main"])?
        .into_iter()
        .filter(|r| r.1 == "blob")
        .map(|r| r.3)
        .collect();
    assert_eq!(files, git_files);

    // CheckObjectsExist: each revision named back with whether it resolves.
    let asked = vec![
        b"main".to_vec(),
        rc.rev("main:README.md")?.into_bytes(),
        b"no-such-ref".to_vec(),
        b"0123456789012345678901234567890123456789".to_vec(),
    ];
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(CheckObjectsExistRequest {
        repository: repo(REPO),
        revisions: asked.clone(),
    })
    .await?;
    drop(tx);
    let answers: Vec<(Vec<u8>, bool)> =
        collect(commits.check_objects_exist(tokio_stream::wrappers::ReceiverStream::new(rx)))
            .await?
            .into_iter()
            .flat_map(|m| m.revisions)
            .map(|r| (r.name, r.exists))
            .collect();
    assert_eq!(
        answers,
        asked
            .into_iter()
            .zip([true, true, false, false])
            .collect::<Vec<_>>()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn history_reads_equal_git() -> anyhow::Result<()> {
    let rc = ReadCluster::start(None).await?;
    let ch = rc.channel().await?;
    let mut commits = CommitServiceClient::new(ch.clone());

    let find = |req: FindCommitsRequest| {
        let mut commits = commits.clone();
        async move {
            collect(commits.find_commits(req)).await.map(|ms| {
                ms.into_iter()
                    .flat_map(|m| m.commits)
                    .map(|c| c.id)
                    .collect::<Vec<_>>()
            })
        }
    };
    let base = || FindCommitsRequest {
        repository: repo(REPO),
        revision: b"main".to_vec(),
        limit: 1000,
        ..Default::default()
    };
    // FindCommits as git log answers: plain, paged, by path, followed, without
    // merges, first parent only, by author, topological.
    assert_eq!(
        find(base()).await?,
        rc.git_lines(&["log", "--format=%H", "main"])?
    );
    assert_eq!(
        find(FindCommitsRequest {
            offset: 2,
            limit: 3,
            ..base()
        })
        .await?,
        rc.git_lines(&["log", "--format=%H", "--skip=2", "--max-count=3", "main"])?
    );
    assert_eq!(
        find(FindCommitsRequest {
            paths: vec![b"README.md".to_vec()],
            ..base()
        })
        .await?,
        rc.git_lines(&["log", "--format=%H", "main", "--", "README.md"])?
    );
    assert_eq!(
        find(FindCommitsRequest {
            paths: vec![b"new-name.txt".to_vec()],
            follow: true,
            ..base()
        })
        .await?,
        rc.git_lines(&[
            "log",
            "--format=%H",
            "--follow",
            "main",
            "--",
            "new-name.txt"
        ])?
    );
    assert_eq!(
        find(FindCommitsRequest {
            skip_merges: true,
            ..base()
        })
        .await?,
        rc.git_lines(&["log", "--format=%H", "--no-merges", "main"])?
    );
    assert_eq!(
        find(FindCommitsRequest {
            first_parent: true,
            ..base()
        })
        .await?,
        rc.git_lines(&["log", "--format=%H", "--first-parent", "main"])?
    );
    assert_eq!(
        find(FindCommitsRequest {
            order: refvote_proto::gitaly::find_commits_request::Order::Topo as i32,
            ..base()
        })
        .await?,
        rc.git_lines(&["log", "--format=%H", "--topo-order", "main"])?
    );
    assert_eq!(
        find(FindCommitsRequest {
            revision: b"signed".to_vec(),
            author: b"Read Fixture".to_vec(),
            ..base()
        })
        .await?,
        rc.git_lines(&["log", "--format=%H", "--author=Read Fixture", "signed"])?
    );

    // ListCommits: rev-list's order, and pages that join up to the whole walk.
    let list = |revisions: Vec<String>, page: Option<PaginationParameter>| {
        let mut commits = commits.clone();
        async move {
            collect(commits.list_commits(ListCommitsRequest {
                repository: repo(REPO),
                revisions,
                pagination_params: page,
                ..Default::default()
            }))
            .await
            .map(|ms| {
                ms.into_iter()
                    .flat_map(|m| m.commits)
                    .map(|c| c.id)
                    .collect::<Vec<_>>()
            })
        }
    };
    let all = list(vec!["main".into()], None).await?;
    assert_eq!(all, rc.git_lines(&["rev-list", "main"])?);
    let mut paged = Vec::new();
    let mut token = String::new();
    for _ in 0..20 {
        let page = list(
            vec!["main".into()],
            Some(PaginationParameter {
                page_token: token.clone(),
                limit: 4,
            }),
        )
        .await?;
        if page.is_empty() {
            break;
        }
        token = page.last().unwrap().clone();
        paged.extend(page);
    }
    assert_eq!(paged, all);
    assert_eq!(
        list(vec!["main".into(), "--not".into(), "feature".into()], None).await?,
        rc.git_lines(&["rev-list", "main", "--not", "feature"])?
    );

    // Counts.
    let count = commits
        .count_commits(CountCommitsRequest {
            repository: repo(REPO),
            revision: b"main".to_vec(),
            path: b"README.md".to_vec(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .count;
    assert_eq!(
        count.to_string(),
        rc.git_text(&["rev-list", "--count", "main", "--", "README.md"])?
    );
    let diverging = commits
        .count_diverging_commits(CountDivergingCommitsRequest {
            repository: repo(REPO),
            from: b"conflict-ours".to_vec(),
            to: b"signed".to_vec(),
            max_count: 0,
        })
        .await?
        .into_inner();
    let git = rc.git_text(&[
        "rev-list",
        "--left-right",
        "--count",
        "conflict-ours...signed",
    ])?;
    assert_eq!(
        format!("{}\t{}", diverging.left_count, diverging.right_count),
        git
    );

    // ListCommitsByOid: found ones in order, unknown ones left out.
    let wanted = vec![
        rc.rev("main~1")?,
        "0123456789012345678901234567890123456789".into(),
        rc.rev("feature")?,
    ];
    let by_oid: Vec<String> = collect(commits.list_commits_by_oid(ListCommitsByOidRequest {
        repository: repo(REPO),
        oid: wanted.clone(),
    }))
    .await?
    .into_iter()
    .flat_map(|m| m.commits)
    .map(|c| c.id)
    .collect();
    assert_eq!(by_oid, vec![wanted[0].clone(), wanted[2].clone()]);

    // Signatures: the SSH-signed commit's signature and signed text, as in the object.
    let ssh = rc.rev("signed~1")?;
    let sigs = collect(commits.get_commit_signatures(GetCommitSignaturesRequest {
        repository: repo(REPO),
        commit_ids: vec![ssh.clone(), rc.rev("main")?],
    }))
    .await?;
    let raw = rc.git(&["cat-file", "commit", &ssh])?;
    let raw = String::from_utf8(raw)?;
    let mut signature = String::new();
    let mut signed = String::new();
    let mut in_sig = false;
    for line in raw.split_inclusive('\n') {
        if let Some(rest) = line.strip_prefix("gpgsig ") {
            in_sig = true;
            signature.push_str(rest);
        } else if in_sig && line.starts_with(' ') {
            signature.push_str(&line[1..]);
        } else {
            in_sig = false;
            signed.push_str(line);
        }
    }
    assert_eq!(sigs[0].commit_id, ssh);
    let got_sig: Vec<u8> = sigs.iter().flat_map(|m| m.signature.clone()).collect();
    let got_text: Vec<u8> = sigs.iter().flat_map(|m| m.signed_text.clone()).collect();
    // The armored signature as the header holds it (continuation spaces dropped).
    assert_eq!(got_sig.trim_ascii_end(), signature.trim_end().as_bytes());
    assert!(got_sig.starts_with(b"-----BEGIN SSH SIGNATURE-----"));
    assert_eq!(got_text, signed.as_bytes());
    assert!(
        sigs.iter()
            .all(|m| m.commit_id.is_empty() || m.commit_id == ssh),
        "an unsigned commit has no answer"
    );
    let pgp = commits
        .find_commit(FindCommitRequest {
            repository: repo(REPO),
            revision: b"signed".to_vec(),
            trailers: false,
        })
        .await?
        .into_inner()
        .commit
        .unwrap();
    assert_eq!(pgp.signature_type, SignatureType::Pgp as i32);

    // Trailers, as interpret-trailers parses them.
    let with = commits
        .find_commit(FindCommitRequest {
            repository: repo(REPO),
            revision: b"signed~2".to_vec(),
            trailers: true,
        })
        .await?
        .into_inner()
        .commit
        .unwrap();
    let trailers: Vec<String> = with
        .trailers
        .iter()
        .map(|t| {
            format!(
                "{}: {}",
                String::from_utf8_lossy(&t.key),
                String::from_utf8_lossy(&t.value)
            )
        })
        .collect();
    assert_eq!(
        trailers,
        rc.git_lines(&["log", "-1", "--format=%(trailers:only,unfold)", "signed~2"])?
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn branch_and_tag_reads_equal_git() -> anyhow::Result<()> {
    let rc = ReadCluster::start(None).await?;
    let ch = rc.channel().await?;
    let mut refs = RefServiceClient::new(ch.clone());

    // FindAllBranches: every branch, remote-tracking ones too (as Gitaly lists them),
    // with its commit.
    let all: Vec<(Vec<u8>, String)> = collect(refs.find_all_branches(FindAllBranchesRequest {
        repository: repo(REPO),
        ..Default::default()
    }))
    .await?
    .into_iter()
    .flat_map(|m| m.branches)
    .map(|b| (b.name, b.target.unwrap().id))
    .collect();
    let git: Vec<(Vec<u8>, String)> = rc
        .git_lines(&[
            "for-each-ref",
            "--format=%(refname) %(objectname)",
            "refs/heads/",
            "refs/remotes/",
        ])?
        .into_iter()
        .map(|l| {
            let (n, o) = l.split_once(' ').unwrap();
            (n.as_bytes().to_vec(), o.to_owned())
        })
        .collect();
    assert_eq!(all, git);
    assert!(all.iter().any(|(n, _)| n == b"refs/remotes/origin/main"));

    // FindAllRemoteBranches: one remote's branches.
    let remote: Vec<(Vec<u8>, String)> =
        collect(refs.find_all_remote_branches(FindAllRemoteBranchesRequest {
            repository: repo(REPO),
            remote_name: "origin".into(),
        }))
        .await?
        .into_iter()
        .flat_map(|m| m.branches)
        .map(|b| (b.name, b.target_commit.unwrap().id))
        .collect();
    assert_eq!(
        remote,
        vec![(b"refs/remotes/origin/main".to_vec(), rc.rev("main~1")?)]
    );

    // FindLocalBranches, by name, in pages of 2 joined by their tokens.
    let page = |token: String| {
        let mut refs = refs.clone();
        async move {
            collect(refs.find_local_branches(FindLocalBranchesRequest {
                repository: repo(REPO),
                pagination_params: Some(PaginationParameter {
                    page_token: token,
                    limit: 2,
                }),
                ..Default::default()
            }))
            .await
            .map(|ms| {
                ms.into_iter()
                    .flat_map(|m| m.local_branches)
                    .map(|b| String::from_utf8_lossy(&b.name).into_owned())
                    .collect::<Vec<_>>()
            })
        }
    };
    let mut names = Vec::new();
    let mut token = String::new();
    for _ in 0..20 {
        let p = page(token.clone()).await?;
        if p.is_empty() {
            break;
        }
        assert!(p.len() <= 2);
        token = p.last().unwrap().clone();
        names.extend(p);
    }
    assert_eq!(
        names,
        rc.git_lines(&["for-each-ref", "--format=%(refname)", "refs/heads/"])?
    );

    // FindAllTags: names, ids, the commits they lead to (none for a blob's tag).
    let tags = collect(refs.find_all_tags(FindAllTagsRequest {
        repository: repo(REPO),
        ..Default::default()
    }))
    .await?
    .into_iter()
    .flat_map(|m| m.tags)
    .collect::<Vec<_>>();
    let git_tags = rc.git_lines(&[
        "for-each-ref",
        "--format=%(refname:strip=2) %(objectname)",
        "refs/tags/",
    ])?;
    assert_eq!(
        tags.iter()
            .map(|t| format!("{} {}", String::from_utf8_lossy(&t.name), t.id))
            .collect::<Vec<_>>(),
        git_tags
    );
    for t in &tags {
        let name = String::from_utf8_lossy(&t.name).into_owned();
        let peeled = rc.git_text(&["rev-parse", &format!("refs/tags/{name}^{{}}")])?;
        let kind = rc.git_text(&["cat-file", "-t", &peeled])?;
        match kind.as_str() {
            "commit" => assert_eq!(
                t.target_commit.as_ref().map(|c| c.id.clone()),
                Some(peeled),
                "{name}"
            ),
            _ => assert!(t.target_commit.is_none(), "{name}"),
        }
    }

    // FindTag: the signed ones carry their signature type; a missing one is NOT_FOUND.
    for (name, sig) in [
        ("v1.1", SignatureType::Ssh),
        ("pgp", SignatureType::Pgp),
        ("v1.0", SignatureType::None),
    ] {
        let tag = refs
            .find_tag(FindTagRequest {
                repository: repo(REPO),
                tag_name: name.as_bytes().to_vec(),
            })
            .await?
            .into_inner()
            .tag
            .unwrap();
        assert_eq!(tag.id, rc.rev(&format!("refs/tags/{name}"))?);
        assert_eq!(tag.signature_type, sig as i32, "{name}");
    }
    let missing = refs
        .find_tag(FindTagRequest {
            repository: repo(REPO),
            tag_name: b"no-such-tag".to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    // Which branches and tags contain a commit.
    let commit = rc.rev("main~3")?;
    let branches: Vec<Vec<u8>> = collect(refs.list_branch_names_containing_commit(
        ListBranchNamesContainingCommitRequest {
            repository: repo(REPO),
            commit_id: commit.clone(),
            limit: 0,
        },
    ))
    .await?
    .into_iter()
    .flat_map(|m| m.branch_names)
    .collect();
    let git_branches: Vec<Vec<u8>> = rc
        .git_lines(&[
            "for-each-ref",
            "--contains",
            &commit,
            "--format=%(refname:strip=2)",
            "refs/heads/",
        ])?
        .into_iter()
        .map(String::into_bytes)
        .collect();
    assert_eq!(branches, git_branches);
    let tag_names: Vec<Vec<u8>> = collect(refs.list_tag_names_containing_commit(
        ListTagNamesContainingCommitRequest {
            repository: repo(REPO),
            commit_id: commit.clone(),
            limit: 0,
        },
    ))
    .await?
    .into_iter()
    .flat_map(|m| m.tag_names)
    .collect();
    let git_tag_names: Vec<Vec<u8>> = rc
        .git_lines(&[
            "for-each-ref",
            "--contains",
            &commit,
            "--format=%(refname:strip=2)",
            "refs/tags/",
        ])?
        .into_iter()
        .map(String::into_bytes)
        .collect();
    assert_eq!(tag_names, git_tag_names);

    // FindRefsByOID: branches and tags pointing at it.
    let oid = rc.rev("main~1")?;
    let found = refs
        .find_refs_by_oid(FindRefsByOidRequest {
            repository: repo(REPO),
            oid: oid.clone(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .refs;
    let mut git_refs = rc.git_lines(&[
        "for-each-ref",
        "--points-at",
        &oid,
        "--format=%(refname)",
        "refs/heads/",
        "refs/tags/",
    ])?;
    let mut sorted = found.clone();
    sorted.sort();
    git_refs.sort();
    assert_eq!(sorted, git_refs);
    assert!(found.contains(&"refs/tags/light".to_owned()));
    Ok(())
}

/// Revisions that would be options, paths that climb out of the tree: refused with
/// INVALID_ARGUMENT (or, for a tree path, NOT_FOUND as Gitaly answers) before git
/// runs, and the file an option would have written is not there.
#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_refused_before_git_runs() -> anyhow::Result<()> {
    let rc = ReadCluster::start(None).await?;
    let ch = rc.channel().await?;
    let mut commits = CommitServiceClient::new(ch.clone());
    let target = rc.cluster.path("written-by-git");
    let option = format!("--output={}", target.display());

    let e = commits
        .find_commit(FindCommitRequest {
            repository: repo(REPO),
            revision: option.clone().into_bytes(),
            trailers: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = collect(commits.find_commits(FindCommitsRequest {
        repository: repo(REPO),
        revision: option.clone().into_bytes(),
        limit: 10,
        ..Default::default()
    }))
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = commits
        .count_commits(CountCommitsRequest {
            repository: repo(REPO),
            revision: option.clone().into_bytes(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = commits
        .last_commit_for_path(LastCommitForPathRequest {
            repository: repo(REPO),
            revision: option.clone().into_bytes(),
            path: b"README.md".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = collect(
        commits.list_last_commits_for_tree(ListLastCommitsForTreeRequest {
            repository: repo(REPO),
            revision: option.clone(),
            limit: 10,
            ..Default::default()
        }),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = collect(commits.get_tree_entries(GetTreeEntriesRequest {
        repository: repo(REPO),
        revision: option.clone().into_bytes(),
        path: b".".to_vec(),
        ..Default::default()
    }))
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = collect(commits.tree_entry(TreeEntryRequest {
        repository: repo(REPO),
        revision: b"main".to_vec(),
        path: b"../../etc/passwd".to_vec(),
        ..Default::default()
    }))
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = collect(commits.list_commits(ListCommitsRequest {
        repository: repo(REPO),
        revisions: vec![option.clone()],
        ..Default::default()
    }))
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(!target.exists(), "git ran with an option from a request");

    // The node kept serving.
    let ok = commits
        .find_commit(FindCommitRequest {
            repository: repo(REPO),
            revision: b"main".to_vec(),
            trailers: false,
        })
        .await?
        .into_inner();
    assert_eq!(ok.commit.unwrap().id, rc.rev("main")?);
    Ok(())
}

/// `git diff-tree -z -r --root <args> <commit>` as (status letter, old path, path,
/// old mode, new mode, old blob, new blob) per record.
type Change = (char, Vec<u8>, Vec<u8>, i32, i32, String, String);

fn git_changes(rc: &ReadCluster, args: &[&str]) -> anyhow::Result<Vec<Change>> {
    let mut full = vec!["diff-tree", "-z", "-r", "--root", "--no-commit-id"];
    full.extend_from_slice(args);
    let out = rc.git(&full)?;
    let fields: Vec<&[u8]> = out.split(|b| *b == 0).filter(|f| !f.is_empty()).collect();
    let mut changes = Vec::new();
    let mut i = 0;
    while i < fields.len() {
        let header = String::from_utf8_lossy(fields[i]).into_owned();
        let f: Vec<&str> = header.trim_start_matches(':').split(' ').collect();
        let letter = f[4].chars().next().unwrap();
        let two = matches!(letter, 'R' | 'C');
        let (old, path) = if two {
            (fields[i + 1].to_vec(), fields[i + 2].to_vec())
        } else {
            (Vec::new(), fields[i + 1].to_vec())
        };
        changes.push((
            letter,
            old,
            path,
            i32::from_str_radix(f[0], 8)?,
            i32::from_str_radix(f[1], 8)?,
            f[2].to_owned(),
            f[3].to_owned(),
        ));
        i += if two { 3 } else { 2 };
    }
    Ok(changes)
}

fn ours(paths: &[ChangedPaths]) -> Vec<Change> {
    paths
        .iter()
        .map(|p| {
            let letter = match changed_paths::Status::try_from(p.status).unwrap() {
                changed_paths::Status::Added => 'A',
                changed_paths::Status::Modified => 'M',
                changed_paths::Status::Deleted => 'D',
                changed_paths::Status::TypeChange => 'T',
                changed_paths::Status::Copied => 'C',
                changed_paths::Status::Renamed => 'R',
            };
            (
                letter,
                p.old_path.clone(),
                p.path.clone(),
                p.old_mode,
                p.new_mode,
                p.old_blob_id.clone(),
                p.new_blob_id.clone(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn changed_paths_and_info_attributes_equal_git() -> anyhow::Result<()> {
    let rc = ReadCluster::start(None).await?;
    let ch = rc.channel().await?;
    let mut diffs = DiffServiceClient::new(ch.clone());
    let mut repos = RepositoryServiceClient::new(ch.clone());

    // Commits against their parents (a merge against each of its parents), in order.
    let commits = ["main~5", "main~2", "main~4", "main~6"];
    let answer: Vec<ChangedPaths> = collect(diffs.find_changed_paths(FindChangedPathsRequest {
        repository: repo(REPO),
        commits: commits.iter().map(|c| (*c).to_owned()).collect(),
        ..Default::default()
    }))
    .await?
    .into_iter()
    .flat_map(|m| m.paths)
    .collect();
    let mut expected = Vec::new();
    for c in commits {
        expected.extend(git_changes(
            &rc,
            &["-m", "--no-renames", "--diff-filter=AMDTCR", c],
        )?);
    }
    assert_eq!(ours(&answer), expected);
    let merge = rc.rev("main~2")?;
    assert!(answer.iter().any(|p| p.commit_id == merge));

    // Renames when asked, between two trees, and only the statuses asked for.
    let (left, right) = (rc.rev("main~6^{tree}")?, rc.rev("main~5^{tree}")?);
    let renamed: Vec<ChangedPaths> = collect(diffs.find_changed_paths(FindChangedPathsRequest {
        repository: repo(REPO),
        requests: vec![find_changed_paths_request::Request {
            r#type: Some(find_changed_paths_request::request::Type::TreeRequest(
                find_changed_paths_request::request::TreeRequest {
                    left_tree_revision: left.clone(),
                    right_tree_revision: right.clone(),
                },
            )),
        }],
        find_renames: true,
        diff_filters: vec![
            find_changed_paths_request::DiffStatus::Renamed as i32,
            find_changed_paths_request::DiffStatus::Deleted as i32,
        ],
        ..Default::default()
    }))
    .await?
    .into_iter()
    .flat_map(|m| m.paths)
    .collect();
    let git = git_changes(
        &rc,
        &["--find-renames=30%", "--diff-filter=RD", &left, &right],
    )?;
    assert_eq!(ours(&renamed), git);
    assert!(
        renamed
            .iter()
            .any(|p| p.old_path == b"old-name.txt" && p.path == b"new-name.txt")
    );
    let unknown = collect(diffs.find_changed_paths(FindChangedPathsRequest {
        repository: repo(REPO),
        commits: vec!["no-such-commit".into()],
        ..Default::default()
    }))
    .await
    .unwrap_err();
    assert_ne!(unknown.code(), Code::Ok);

    // GetInfoAttributes: the file's bytes where it exists, an empty answer elsewhere.
    let attributes = b"*.dat binary\n*.md text eol=lf\n".to_vec();
    for n in &rc.cluster.nodes {
        let info = n.repo(REPO).join("info");
        std::fs::create_dir_all(&info)?;
        std::fs::write(info.join("attributes"), &attributes)?;
    }
    let got: Vec<u8> = collect(repos.get_info_attributes(GetInfoAttributesRequest {
        repository: repo(REPO),
    }))
    .await?
    .into_iter()
    .flat_map(|m| m.attributes)
    .collect();
    assert_eq!(got, attributes);
    let none: Vec<u8> = collect(repos.get_info_attributes(GetInfoAttributesRequest {
        repository: repo(EMPTY),
    }))
    .await?
    .into_iter()
    .flat_map(|m| m.attributes)
    .collect();
    assert!(none.is_empty());
    Ok(())
}
