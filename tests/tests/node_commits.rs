//! The node's CommitService, BlobService and OperationService against real votingd
//! processes, real etcd and real git: success and error paths of every RPC, and the
//! mutators inside refvote transactions.

use refvote_cluster::RepoId;
use refvote_node::detail::detail_of;
use refvote_proto::gitaly::blob_service_client::BlobServiceClient;
use refvote_proto::gitaly::commit_service_client::CommitServiceClient;
use refvote_proto::gitaly::get_blobs_request::RevisionPath;
use refvote_proto::gitaly::operation_service_client::OperationServiceClient;
use refvote_proto::gitaly::repository_service_client::RepositoryServiceClient;
use refvote_proto::gitaly::user_commit_files_action_header::ActionType;
use refvote_proto::gitaly::{
    CommitIsAncestorRequest, CountCommitsRequest, CreateRepositoryRequest, FindCommitRequest,
    GetBlobRequest, GetBlobResponse, GetBlobsRequest, GetBlobsResponse, GetTreeEntriesError,
    GetTreeEntriesRequest, GetTreeEntriesResponse, ListCommitsRequest, ObjectType,
    PaginationParameter, TreeEntryRequest, TreeEntryResponse, User, UserCommitFilesAction,
    UserCommitFilesActionHeader, UserCommitFilesError, UserCommitFilesRequest,
    UserCommitFilesRequestHeader, UserCreateBranchRequest, UserCreateTagError,
    UserCreateTagRequest, UserDeleteBranchError, UserDeleteBranchRequest, UserDeleteTagRequest,
    get_tree_entries_error, index_error, tree_entry, tree_entry_response, user_commit_files_action,
    user_commit_files_error, user_commit_files_request, user_create_tag_error,
    user_delete_branch_error,
};
use refvote_tests::cluster::VoteCluster;
use refvote_tests::git::{self, WorkRepo, rev};
use refvote_tests::grpc::{channel, repo};
use tonic::Code;
use tonic::metadata::MetadataValue;

/// Every message of a server stream, or the status that ended it.
async fn collect<T>(
    call: impl Future<Output = Result<tonic::Response<tonic::Streaming<T>>, tonic::Status>>,
) -> Result<Vec<T>, tonic::Status> {
    let mut stream = call.await?.into_inner();
    let mut out = Vec::new();
    while let Some(m) = stream.message().await? {
        out.push(m);
    }
    Ok(out)
}

/// What the fixture history holds.
struct Fixture {
    first: String,
    head: String,
    topic: String,
    big: Vec<u8>,
    submodule: String,
}

/// Builds, in `work`, three commits on main (the last with a 300 KiB blob, nested
/// directories, an executable and a submodule entry) and one on topic, and pushes
/// them into the node's bare repository `relative`.
fn fixture(c: &VoteCluster, work: &WorkRepo, relative: &str) -> anyhow::Result<Fixture> {
    let w = &work.path;
    std::fs::write(w.join("README.md"), "hello\n")?;
    git::git(w, &["add", "README.md"])?;
    git::git(
        w,
        &["commit", "--quiet", "-m", "first\n\nSigned-off-by: A <a@x>"],
    )?;
    let first = git::git(w, &["rev-parse", "HEAD"])?;
    std::fs::create_dir_all(w.join("dir/only/deep"))?;
    std::fs::write(w.join("dir/a.txt"), "a\n")?;
    std::fs::write(w.join("dir/only/deep/file.txt"), "deep\n")?;
    git::git(w, &["add", "dir"])?;
    git::git(w, &["commit", "--quiet", "-m", "second"])?;
    let big: Vec<u8> = (0..300 * 1024).map(|i| (i % 251) as u8).collect();
    std::fs::write(w.join("big.bin"), &big)?;
    std::fs::write(w.join("run.sh"), "#!/bin/sh\n")?;
    git::git(w, &["add", "big.bin", "run.sh"])?;
    git::git(w, &["update-index", "--chmod=+x", "run.sh"])?;
    let submodule = first.clone();
    git::git(
        w,
        &[
            "update-index",
            "--add",
            "--cacheinfo",
            &format!("160000,{submodule},sub"),
        ],
    )?;
    git::git(
        w,
        &["commit", "--quiet", "-m", "third: big, exec, submodule"],
    )?;
    let head = git::git(w, &["rev-parse", "HEAD"])?;
    let topic = work.commit("topic", "on topic")?;
    git::git(w, &["checkout", "--quiet", "main"])?;
    let node = &c.nodes[0];
    git::init_bare(&node.repo(relative), &node.hooks)?;
    git::git(
        w,
        &[
            "push",
            "--quiet",
            node.repo(relative).to_str().unwrap(),
            "main",
            "topic",
        ],
    )?;
    Ok(Fixture {
        first,
        head,
        topic,
        big,
        submodule,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn find_commit_is_ancestor_and_count_commits() -> anyhow::Result<()> {
    let c = VoteCluster::start(1, 1).await?;
    let work = c.work("w")?;
    let f = fixture(&c, &work, "c.git")?;
    let mut client = CommitServiceClient::new(channel(&c.nodes[0]).await);

    let find = |revision: &str, trailers: bool| FindCommitRequest {
        repository: repo("c.git"),
        revision: revision.as_bytes().to_vec(),
        trailers,
    };
    let commit = client
        .find_commit(find("main", false))
        .await?
        .into_inner()
        .commit
        .expect("main exists");
    assert_eq!(commit.id, f.head);
    assert_eq!(commit.subject, b"third: big, exec, submodule");
    assert_eq!(commit.parent_ids.len(), 1);
    assert_eq!(
        commit.tree_id,
        git::git(&work.path, &["rev-parse", "main^{tree}"])?
    );
    let author = commit.author.expect("author");
    assert_eq!(author.name, b"refvote test");
    assert_eq!(author.email, b"test@refvote.invalid");
    assert!(author.date.unwrap().seconds > 1_600_000_000);
    let first = client
        .find_commit(find(&f.first, true))
        .await?
        .into_inner()
        .commit
        .unwrap();
    assert!(first.parent_ids.is_empty());
    assert_eq!(first.trailers.len(), 1, "{:?}", first.trailers);
    assert_eq!(first.trailers[0].key, b"Signed-off-by");
    // Missing: an empty answer, as Gitaly gives. Malformed or no repository: errors.
    let none = client.find_commit(find("no-such-branch", false)).await?;
    assert!(none.into_inner().commit.is_none());
    let e = client.find_commit(find("--all", false)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("'-'"), "{e:?}");
    let e = client.find_commit(find("", false)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = client
        .find_commit(FindCommitRequest {
            repository: repo("missing.git"),
            revision: b"main".to_vec(),
            trailers: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");

    let is_ancestor = |a: &str, b: &str| CommitIsAncestorRequest {
        repository: repo("c.git"),
        ancestor_id: a.into(),
        child_id: b.into(),
    };
    assert!(
        client
            .commit_is_ancestor(is_ancestor(&f.first, &f.head))
            .await?
            .into_inner()
            .value
    );
    assert!(
        !client
            .commit_is_ancestor(is_ancestor(&f.head, &f.first))
            .await?
            .into_inner()
            .value
    );
    assert!(
        !client
            .commit_is_ancestor(is_ancestor(&f.topic, &f.head))
            .await?
            .into_inner()
            .value
    );
    // A commit that does not exist is "not an ancestor", as in Gitaly.
    let ghost = "1234567890123456789012345678901234567890";
    assert!(
        !client
            .commit_is_ancestor(is_ancestor(ghost, &f.head))
            .await?
            .into_inner()
            .value
    );
    let e = client
        .commit_is_ancestor(is_ancestor("", &f.head))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    // Gitaly's wording.
    assert!(e.message().contains("empty ancestor sha"), "{e:?}");

    let count = |revision: &str, all: bool, path: &str, max: i32| CountCommitsRequest {
        repository: repo("c.git"),
        revision: revision.as_bytes().to_vec(),
        all,
        path: path.as_bytes().to_vec(),
        max_count: max,
        ..Default::default()
    };
    let n = |r: CountCommitsRequest| {
        let mut client = client.clone();
        async move { client.count_commits(r).await.map(|r| r.into_inner().count) }
    };
    assert_eq!(n(count("main", false, "", 0)).await?, 3);
    assert_eq!(n(count("", true, "", 0)).await?, 4);
    assert_eq!(n(count("main", false, "dir", 0)).await?, 1);
    assert_eq!(n(count("main", false, "", 2)).await?, 2);
    assert_eq!(
        n(count(&format!("{}..topic", f.first), false, "", 0)).await?,
        3
    );
    assert_eq!(n(count("no-such-branch", false, "", 0)).await?, 0);
    let e = n(count("", false, "", 0)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    // Gitaly: with `all` set, the revision is not looked at.
    assert_eq!(n(count("main", true, "", 0)).await?, 4);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_commits_walks_and_pages() -> anyhow::Result<()> {
    let c = VoteCluster::start(1, 1).await?;
    let work = c.work("w")?;
    let f = fixture(&c, &work, "l.git")?;
    // 45 more commits, so pages span several messages.
    let mut ids = Vec::new();
    for i in 0..45 {
        ids.push(work.commit("main", &format!("extra {i}"))?);
    }
    git::git(
        &work.path,
        &[
            "push",
            "--quiet",
            c.nodes[0].repo("l.git").to_str().unwrap(),
            "main",
        ],
    )?;
    let client = CommitServiceClient::new(channel(&c.nodes[0]).await);
    let list = |revisions: &[&str], token: &str, limit: i32| {
        let mut client = client.clone();
        let req = ListCommitsRequest {
            repository: repo("l.git"),
            revisions: revisions.iter().map(|r| (*r).to_owned()).collect(),
            pagination_params: Some(PaginationParameter {
                page_token: token.into(),
                limit,
            }),
            ..Default::default()
        };
        async move {
            let msgs = collect(client.list_commits(req)).await?;
            Ok::<_, tonic::Status>(
                msgs.into_iter()
                    .flat_map(|m| m.commits)
                    .map(|c| c.id)
                    .collect::<Vec<_>>(),
            )
        }
    };
    let all = list(&["main"], "", 0).await?;
    assert_eq!(all.len(), 48);
    assert_eq!(all[0], *ids.last().unwrap());
    assert_eq!(all[47], f.first);
    // Pages of 20 chained through the last id of each page.
    let p1 = list(&["main"], "", 20).await?;
    let p2 = list(&["main"], &p1[19], 20).await?;
    let p3 = list(&["main"], &p2[19], 20).await?;
    assert_eq!((p1.len(), p2.len(), p3.len()), (20, 20, 8));
    assert_eq!([p1, p2, p3].concat(), all);
    // Ranges with --not.
    let only_topic = list(&["topic", "--not", "main"], "", 0).await?;
    assert_eq!(only_topic, vec![f.topic.clone()]);

    let e = list(&[], "", 0).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = list(&["--output=/tmp/x"], "", 0).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    // Gitaly: git's refusal of an unknown revision is INTERNAL, with git's words.
    let e = list(&["no-such-branch"], "", 0).await.unwrap_err();
    assert_eq!(e.code(), Code::Internal, "{e:?}");
    assert!(e.message().contains("no-such-branch"), "{e:?}");
    // Gitaly: a page token that is never seen skips everything.
    assert!(list(&["main"], &"0".repeat(40), 5).await?.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tree_entry_streams_with_limit_and_max_size() -> anyhow::Result<()> {
    let c = VoteCluster::start(1, 1).await?;
    let work = c.work("w")?;
    let f = fixture(&c, &work, "t.git")?;
    let client = CommitServiceClient::new(channel(&c.nodes[0]).await);
    let entry = |revision: &str, path: &str, limit: i64, max_size: i64| {
        let mut client = client.clone();
        let req = TreeEntryRequest {
            repository: repo("t.git"),
            revision: revision.as_bytes().to_vec(),
            path: path.as_bytes().to_vec(),
            limit,
            max_size,
        };
        async move { collect(client.tree_entry(req)).await }
    };
    let data = |msgs: &[TreeEntryResponse]| -> Vec<u8> {
        msgs.iter().flat_map(|m| m.data.clone()).collect()
    };

    let msgs = entry("main", "big.bin", 0, 0).await?;
    assert!(msgs.len() > 1, "300 KiB comes in several 128 KiB messages");
    assert_eq!(msgs[0].r#type, tree_entry_response::ObjectType::Blob as i32);
    assert_eq!(msgs[0].size, f.big.len() as i64);
    assert_eq!(msgs[0].mode, 0o100644);
    assert_eq!(data(&msgs), f.big);
    let msgs = entry("main", "big.bin", 1000, 0).await?;
    assert_eq!(data(&msgs), f.big[..1000]);
    assert_eq!(msgs[0].size, f.big.len() as i64, "size is the whole blob's");
    let msgs = entry("main", "run.sh", 0, 0).await?;
    assert_eq!(msgs[0].mode, 0o100755);
    let msgs = entry("main", "dir/", 0, 0).await?;
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].r#type, tree_entry_response::ObjectType::Tree as i32);
    assert!(msgs[0].data.is_empty() && msgs[0].size > 0);
    let msgs = entry("main", "sub", 0, 0).await?;
    assert_eq!(
        msgs[0].r#type,
        tree_entry_response::ObjectType::Commit as i32
    );
    assert_eq!(msgs[0].oid, f.submodule);
    let msgs = entry(&f.first, "README.md", 0, 0).await?;
    assert_eq!(data(&msgs), b"hello\n");

    let e = entry("main", "big.bin", 0, 1000).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("bigger than the maximum"), "{e:?}");
    let e = entry("main", "nope.txt", 0, 0).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = entry("no-such-branch", "README.md", 0, 0)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    // Gitaly: a path that climbs out names no entry.
    let e = entry("main", "../etc/passwd", 0, 0).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = entry("main", "", 0, 0).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_tree_entries_lists_recursively_and_pages() -> anyhow::Result<()> {
    let c = VoteCluster::start(1, 1).await?;
    let work = c.work("w")?;
    fixture(&c, &work, "g.git")?;
    let client = CommitServiceClient::new(channel(&c.nodes[0]).await);
    let list = |path: &str, recursive: bool, page: Option<(&str, i32)>| {
        let mut client = client.clone();
        let req = GetTreeEntriesRequest {
            repository: repo("g.git"),
            revision: b"main".to_vec(),
            path: path.as_bytes().to_vec(),
            recursive,
            pagination_params: page.map(|(t, l)| PaginationParameter {
                page_token: t.into(),
                limit: l,
            }),
            ..Default::default()
        };
        async move { collect(client.get_tree_entries(req)).await }
    };
    let paths = |msgs: &[GetTreeEntriesResponse]| -> Vec<String> {
        msgs.iter()
            .flat_map(|m| &m.entries)
            .map(|e| String::from_utf8_lossy(&e.path).into_owned())
            .collect()
    };

    let root = list(".", false, None).await?;
    assert_eq!(
        paths(&root),
        ["README.md", "big.bin", "dir", "run.sh", "sub"]
    );
    let entries: Vec<_> = root.iter().flat_map(|m| m.entries.clone()).collect();
    assert_eq!(entries[2].r#type, tree_entry::EntryType::Tree as i32);
    assert_eq!(entries[4].r#type, tree_entry::EntryType::Commit as i32);
    assert_eq!(entries[0].commit_oid, "main");
    let dir = list("dir", false, None).await?;
    let dir_entries: Vec<_> = dir.iter().flat_map(|m| m.entries.clone()).collect();
    assert_eq!(paths(&dir), ["dir/a.txt", "dir/only"]);
    // flat_path follows the chain of lone subdirectories.
    assert_eq!(dir_entries[1].flat_path, b"dir/only/deep");
    let rec = list("dir", true, None).await?;
    assert_eq!(
        paths(&rec),
        [
            "dir/a.txt",
            "dir/only",
            "dir/only/deep",
            "dir/only/deep/file.txt"
        ]
    );

    // Pages of two, chained through the cursor.
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = list(".", false, Some((&token, 2))).await?;
        seen.extend(paths(&page));
        token = page
            .first()
            .and_then(|m| m.pagination_cursor.clone())
            .map(|c| c.next_cursor)
            .unwrap_or_default();
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(seen, paths(&root));

    let e = list("nope", false, None).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let detail: GetTreeEntriesError =
        detail_of(&e, "gitaly.GetTreeEntriesError").expect("structured detail");
    assert!(matches!(
        detail.error,
        Some(get_tree_entries_error::Error::ResolveTree(_))
    ));
    let e = list("README.md", false, None).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("not treeish"), "{e:?}");
    let e = list("", false, None).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let detail: GetTreeEntriesError = detail_of(&e, "gitaly.GetTreeEntriesError").unwrap();
    assert!(matches!(
        detail.error,
        Some(get_tree_entries_error::Error::Path(_))
    ));
    let e = list("a/../..", false, None).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    // Gitaly: a token naming no entry is INTERNAL "could not find starting OID".
    let e = list(".", false, Some(("bogus", 2))).await.unwrap_err();
    assert_eq!(e.code(), Code::Internal, "{e:?}");
    assert!(e.message().contains("could not find starting OID"), "{e:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_stream_in_chunks_with_limits() -> anyhow::Result<()> {
    let c = VoteCluster::start(1, 1).await?;
    let work = c.work("w")?;
    let f = fixture(&c, &work, "b.git")?;
    let client = BlobServiceClient::new(channel(&c.nodes[0]).await);
    let big_oid = git::git(&work.path, &["rev-parse", "main:big.bin"])?;
    let get = |oid: &str, limit: i64| {
        let mut client = client.clone();
        let req = GetBlobRequest {
            repository: repo("b.git"),
            oid: oid.into(),
            limit,
        };
        async move { collect(client.get_blob(req)).await }
    };
    let data = |msgs: &[GetBlobResponse]| -> Vec<u8> {
        msgs.iter().flat_map(|m| m.data.clone()).collect()
    };
    let msgs = get(&big_oid, -1).await?;
    assert!(msgs.len() > 1);
    assert_eq!(
        (msgs[0].oid.as_str(), msgs[0].size),
        (big_oid.as_str(), f.big.len() as i64)
    );
    assert_eq!(data(&msgs), f.big);
    assert_eq!(data(&get(&big_oid, 10).await?), f.big[..10]);
    let none = get(&big_oid, 0).await?;
    assert_eq!(none.len(), 1);
    assert!(none[0].data.is_empty() && none[0].size == f.big.len() as i64);
    // Missing blob: one empty message (Gitaly's answer).
    let missing = get(&"ab".repeat(20), -1).await?;
    assert_eq!(missing, vec![GetBlobResponse::default()]);
    let e = get("", -1).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    // Gitaly: an object that is not a blob is one empty message too.
    let tree = git::git(&work.path, &["rev-parse", "main^{tree}"])?;
    assert_eq!(get(&tree, -1).await?, vec![GetBlobResponse::default()]);

    let mut blobs = client.clone();
    let pairs = [
        ("main", "README.md"),
        ("main", "big.bin"),
        ("main", "dir"),
        ("main", "sub"),
        ("main", "nope"),
        (f.first.as_str(), "README.md"),
    ];
    let msgs: Vec<GetBlobsResponse> = collect(
        blobs.get_blobs(GetBlobsRequest {
            repository: repo("b.git"),
            revision_paths: pairs
                .iter()
                .map(|(r, p)| RevisionPath {
                    revision: (*r).into(),
                    path: p.as_bytes().to_vec(),
                })
                .collect(),
            limit: 5000,
        }),
    )
    .await?;
    // Group the stream by object: a message with a path starts one.
    let mut objects: Vec<GetBlobsResponse> = Vec::new();
    for m in msgs {
        if m.path.is_empty() && !objects.is_empty() {
            objects.last_mut().unwrap().data.extend(m.data);
        } else {
            objects.push(m);
        }
    }
    assert_eq!(objects.len(), pairs.len());
    assert_eq!(objects[0].data, b"hello\n");
    assert_eq!(objects[0].r#type, ObjectType::Blob as i32);
    assert_eq!(objects[1].data, f.big[..5000], "limit applies per blob");
    assert_eq!(objects[1].size, f.big.len() as i64);
    assert_eq!(objects[2].r#type, ObjectType::Tree as i32);
    assert!(objects[2].data.is_empty());
    assert!(objects[3].is_submodule);
    assert_eq!(objects[3].oid, f.submodule);
    assert!(objects[4].oid.is_empty(), "not found: names only");
    assert_eq!(objects[4].path, b"nope");
    assert_eq!(objects[5].revision, f.first);
    let e = collect(blobs.get_blobs(GetBlobsRequest {
        repository: repo("b.git"),
        revision_paths: vec![RevisionPath {
            revision: String::new(),
            path: b"README.md".to_vec(),
        }],
        limit: -1,
    }))
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = collect(blobs.get_blobs(GetBlobsRequest {
        repository: repo("nowhere.git"),
        revision_paths: vec![],
        limit: -1,
    }))
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    Ok(())
}

fn user() -> Option<User> {
    Some(User {
        gl_id: "user-1".into(),
        name: b"Jane Doe".to_vec(),
        email: b"jane@example.com".to_vec(),
        gl_username: "jane".into(),
        timezone: "UTC".into(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn branches_and_tags_are_created_and_deleted() -> anyhow::Result<()> {
    let c = VoteCluster::start(1, 1).await?;
    let work = c.work("w")?;
    let f = fixture(&c, &work, "o.git")?;
    let path = c.nodes[0].repo("o.git");
    let mut ops = OperationServiceClient::new(channel(&c.nodes[0]).await);
    let create = |name: &str, start: &str| UserCreateBranchRequest {
        repository: repo("o.git"),
        branch_name: name.as_bytes().to_vec(),
        user: user(),
        start_point: start.as_bytes().to_vec(),
    };

    let branch = ops
        .user_create_branch(create("feature", "main"))
        .await?
        .into_inner()
        .branch
        .unwrap();
    assert_eq!(branch.name, b"feature");
    assert_eq!(branch.target_commit.unwrap().id, f.head);
    assert_eq!(
        rev(&path, "refs/heads/feature").as_deref(),
        Some(f.head.as_str())
    );
    let e = ops
        .user_create_branch(create("feature", "main"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let e = ops
        .user_create_branch(create("other", "nope"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("nope"), "{e:?}");
    let e = ops
        .user_create_branch(create("bad..name", "main"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = ops
        .user_create_branch(UserCreateBranchRequest {
            user: None,
            ..create("x", "main")
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = ops
        .user_create_branch(UserCreateBranchRequest {
            repository: repo("missing.git"),
            ..create("x", "main")
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");

    let delete = |name: &str, expected: &str| UserDeleteBranchRequest {
        repository: repo("o.git"),
        branch_name: name.as_bytes().to_vec(),
        user: user(),
        expected_old_oid: expected.into(),
    };
    let e = ops
        .user_delete_branch(delete("feature", &f.first))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let detail: UserDeleteBranchError = detail_of(&e, "gitaly.UserDeleteBranchError").unwrap();
    assert!(matches!(
        detail.error,
        Some(user_delete_branch_error::Error::ReferenceUpdate(_))
    ));
    assert!(
        rev(&path, "refs/heads/feature").is_some(),
        "a refused delete changes nothing"
    );
    ops.user_delete_branch(delete("feature", &f.head)).await?;
    assert!(rev(&path, "refs/heads/feature").is_none());
    let e = ops
        .user_delete_branch(delete("feature", ""))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("not found"), "{e:?}");

    let tag = |name: &str, target: &str, message: &str| UserCreateTagRequest {
        repository: repo("o.git"),
        tag_name: name.as_bytes().to_vec(),
        user: user(),
        target_revision: target.as_bytes().to_vec(),
        message: message.as_bytes().to_vec(),
        timestamp: Some(prost_types::Timestamp {
            seconds: 1_700_000_000,
            nanos: 0,
        }),
    };
    let light = ops
        .user_create_tag(tag("v1", "main", ""))
        .await?
        .into_inner()
        .tag
        .unwrap();
    assert_eq!(light.id, f.head);
    let annotated = ops
        .user_create_tag(tag("v2", &f.first, "Release 2\n"))
        .await?
        .into_inner()
        .tag
        .unwrap();
    assert_ne!(annotated.id, f.first);
    assert_eq!(annotated.target_commit.unwrap().id, f.first);
    let raw = git::git(&path, &["cat-file", "tag", "refs/tags/v2"])?;
    assert!(
        raw.contains("tagger Jane Doe <jane@example.com> 1700000000 +0000"),
        "{raw}"
    );
    assert!(raw.contains(&format!("object {}", f.first)), "{raw}");
    git::git(&path, &["fsck", "--strict"])?;
    let e = ops
        .user_create_tag(tag("v2", "main", "again"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    let detail: UserCreateTagError = detail_of(&e, "gitaly.UserCreateTagError").unwrap();
    assert!(matches!(
        detail.error,
        Some(user_create_tag_error::Error::ReferenceExists(_))
    ));
    let e = ops
        .user_create_tag(tag("v3", "nope", ""))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let e = ops
        .user_create_tag(tag("v 3", "main", ""))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    let delete_tag = |name: &str| UserDeleteTagRequest {
        repository: repo("o.git"),
        tag_name: name.as_bytes().to_vec(),
        user: user(),
        expected_old_oid: String::new(),
    };
    ops.user_delete_tag(delete_tag("v1")).await?;
    assert!(rev(&path, "refs/tags/v1").is_none());
    let e = ops.user_delete_tag(delete_tag("v1")).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    Ok(())
}

fn header(h: UserCommitFilesRequestHeader) -> UserCommitFilesRequest {
    UserCommitFilesRequest {
        user_commit_files_request_payload: Some(
            user_commit_files_request::UserCommitFilesRequestPayload::Header(h),
        ),
    }
}

fn action(h: UserCommitFilesActionHeader) -> UserCommitFilesRequest {
    UserCommitFilesRequest {
        user_commit_files_request_payload: Some(
            user_commit_files_request::UserCommitFilesRequestPayload::Action(
                UserCommitFilesAction {
                    user_commit_files_action_payload: Some(
                        user_commit_files_action::UserCommitFilesActionPayload::Header(h),
                    ),
                },
            ),
        ),
    }
}

fn content(data: &[u8]) -> UserCommitFilesRequest {
    UserCommitFilesRequest {
        user_commit_files_request_payload: Some(
            user_commit_files_request::UserCommitFilesRequestPayload::Action(
                UserCommitFilesAction {
                    user_commit_files_action_payload: Some(
                        user_commit_files_action::UserCommitFilesActionPayload::Content(
                            data.to_vec(),
                        ),
                    ),
                },
            ),
        ),
    }
}

fn act(kind: ActionType, path: &str) -> UserCommitFilesActionHeader {
    UserCommitFilesActionHeader {
        action: kind as i32,
        file_path: path.as_bytes().to_vec(),
        ..Default::default()
    }
}

fn commit_header(relative: &str, branch: &str, message: &str) -> UserCommitFilesRequestHeader {
    UserCommitFilesRequestHeader {
        repository: repo(relative),
        user: user(),
        branch_name: branch.as_bytes().to_vec(),
        commit_message: message.as_bytes().to_vec(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_commit_files_builds_commits_from_actions() -> anyhow::Result<()> {
    let c = VoteCluster::start(1, 1).await?;
    let work = c.work("w")?;
    let f = fixture(&c, &work, "u.git")?;
    let path = c.nodes[0].repo("u.git");
    let ops = OperationServiceClient::new(channel(&c.nodes[0]).await);
    let send = |msgs: Vec<UserCommitFilesRequest>| {
        let mut ops = ops.clone();
        async move {
            ops.user_commit_files(tokio_stream::iter(msgs))
                .await
                .map(|r| r.into_inner())
        }
    };

    let moved = UserCommitFilesActionHeader {
        previous_path: b"dir/a.txt".to_vec(),
        infer_content: true,
        ..act(ActionType::Move, "moved/a.txt")
    };
    let chmod = UserCommitFilesActionHeader {
        execute_filemode: true,
        ..act(ActionType::Chmod, "big.bin")
    };
    let created = UserCommitFilesActionHeader {
        base64_content: true,
        ..act(ActionType::Create, "docs/new.txt")
    };
    let out = send(vec![
        header(UserCommitFilesRequestHeader {
            commit_author_name: b"Ann Author".to_vec(),
            commit_author_email: b"ann@example.com".to_vec(),
            timestamp: Some(prost_types::Timestamp {
                seconds: 1_700_000_100,
                nanos: 0,
            }),
            ..commit_header("u.git", "main", "Edit files\n")
        }),
        // "new file\n" in base64, split inside a 4-character group.
        action(created),
        content(b"bmV3IG"),
        content(b"ZpbGUK"),
        action(act(ActionType::Update, "README.md")),
        content(b"updated "),
        content(b"readme\n"),
        action(act(ActionType::Delete, "run.sh")),
        action(moved),
        action(chmod),
        action(act(ActionType::CreateDir, "empty")),
    ])
    .await?;
    let update = out.branch_update.unwrap();
    assert!(!update.branch_created && !update.repo_created);
    let id = update.commit_id;
    assert_eq!(rev(&path, "refs/heads/main").as_deref(), Some(id.as_str()));
    assert_eq!(git::git(&path, &["rev-parse", &format!("{id}^")])?, f.head);
    assert_eq!(git::git(&path, &["show", "main:docs/new.txt"])?, "new file");
    assert_eq!(
        git::git(&path, &["show", "main:README.md"])?,
        "updated readme"
    );
    assert_eq!(git::git(&path, &["show", "main:moved/a.txt"])?, "a");
    let listing = git::git(&path, &["ls-tree", "-r", "main"])?;
    assert!(
        !listing.contains("run.sh") && !listing.contains("dir/a.txt"),
        "{listing}"
    );
    assert!(
        listing.contains("100755 blob") && listing.contains("big.bin"),
        "{listing}"
    );
    assert!(listing.contains("empty/.gitkeep"), "{listing}");
    assert!(
        listing.contains("160000 commit"),
        "the submodule stays: {listing}"
    );
    let raw = git::git(&path, &["cat-file", "commit", "main"])?;
    assert!(
        raw.contains("author Ann Author <ann@example.com> 1700000100 +0000"),
        "{raw}"
    );
    assert!(
        raw.contains("committer Jane Doe <jane@example.com> 1700000100 +0000"),
        "{raw}"
    );
    git::git(&path, &["fsck", "--strict"])?;

    // A new branch from another one.
    let out = send(vec![
        header(UserCommitFilesRequestHeader {
            start_branch_name: b"main".to_vec(),
            ..commit_header("u.git", "fresh", "On a new branch")
        }),
        action(act(ActionType::Create, "fresh.txt")),
        content(b"fresh\n"),
    ])
    .await?;
    let update = out.branch_update.unwrap();
    assert!(update.branch_created);
    assert_eq!(git::git(&path, &["rev-parse", "fresh^"])?, id);
    // Without a timestamp the fixed rule applies: the parent's committer date.
    let raw = git::git(&path, &["cat-file", "commit", "fresh"])?;
    assert!(raw.contains("> 1700000100 +0000"), "{raw}");

    // Conflicts carry Gitaly's IndexError detail; nothing moves.
    let e = send(vec![
        header(commit_header("u.git", "main", "again")),
        action(act(ActionType::Create, "README.md")),
        content(b"x"),
    ])
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    let detail: UserCommitFilesError = detail_of(&e, "gitaly.UserCommitFilesError").unwrap();
    match detail.error {
        Some(user_commit_files_error::Error::IndexUpdate(ie)) => {
            assert_eq!(ie.error_type, index_error::ErrorType::FileExists as i32);
            assert_eq!(ie.path, b"README.md");
        }
        other => panic!("{other:?}"),
    }
    let e = send(vec![
        header(commit_header("u.git", "main", "x")),
        action(act(ActionType::Delete, "nope.txt")),
    ])
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = send(vec![
        header(commit_header("u.git", "main", "x")),
        action(act(ActionType::Create, "../escape")),
    ])
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = send(vec![
        header(UserCommitFilesRequestHeader {
            expected_old_oid: f.first.clone(),
            ..commit_header("u.git", "main", "x")
        }),
        action(act(ActionType::Create, "y")),
    ])
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let e = send(vec![header(commit_header("u.git", "main", ""))])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = send(vec![action(act(ActionType::Create, "y"))])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert_eq!(rev(&path, "refs/heads/main").as_deref(), Some(id.as_str()));
    let tmp = std::fs::read_dir(c.nodes[0].storage.join("+refvote/tmp"))?.count();
    assert_eq!(tmp, 0, "no private index left behind");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_commit_files_in_a_three_voter_transaction_is_identical_everywhere()
-> anyhow::Result<()> {
    let c = VoteCluster::start(3, 1).await?;
    let relative = "group/ops.git";
    for n in &c.nodes {
        RepositoryServiceClient::new(channel(n).await)
            .create_repository(CreateRepositoryRequest {
                repository: repo(relative),
                ..Default::default()
            })
            .await?;
    }
    let id = RepoId::new("default", relative)?;
    c.store.create_repository(&id, &c.node_names(), "").await?;

    let mut last = None;
    for (round, timestamp) in [(1, Some(1_700_000_000)), (2, None)] {
        let tx = c.begin(&id).await?;
        assert_eq!(tx.voters.len(), 3);
        let calls = c.nodes.iter().map(|n| {
            let tx = tx.id.clone();
            async move {
                let msgs = vec![
                    header(UserCommitFilesRequestHeader {
                        timestamp: timestamp
                            .map(|seconds| prost_types::Timestamp { seconds, nanos: 0 }),
                        ..commit_header(relative, "main", &format!("round {round}"))
                    }),
                    action(act(ActionType::Create, &format!("file-{round}.txt"))),
                    content(format!("round {round}\n").as_bytes()),
                ];
                let mut request = tonic::Request::new(tokio_stream::iter(msgs));
                request.metadata_mut().insert(
                    refvote_proto::contract::TX_METADATA,
                    MetadataValue::try_from(tx.as_str()).unwrap(),
                );
                OperationServiceClient::new(channel(n).await)
                    .user_commit_files(request)
                    .await
                    .map(|r| r.into_inner().branch_update.unwrap())
            }
        });
        let updates = futures::future::join_all(calls).await;
        let outcome = c.finalize(&tx).await?;
        assert!(outcome.acknowledged && outcome.committed, "{outcome:?}");
        assert_eq!(outcome.promoted.len(), 3, "{outcome:?}");
        let ids: Vec<String> = updates
            .into_iter()
            .map(|u| u.map(|u| u.commit_id))
            .collect::<Result<_, _>>()?;
        assert!(
            ids.iter().all(|i| *i == ids[0]),
            "same commit everywhere: {ids:?}"
        );
        for n in &c.nodes {
            assert_eq!(
                rev(&n.repo(relative), "refs/heads/main").as_deref(),
                Some(ids[0].as_str())
            );
        }
        last = Some(ids[0].clone());
    }
    // The annotated tag without a timestamp is byte-identical on all three too.
    let tx = c.begin(&id).await?;
    let tags = c.nodes.iter().map(|n| {
        let tx = tx.id.clone();
        async move {
            let mut request = tonic::Request::new(UserCreateTagRequest {
                repository: repo(relative),
                tag_name: b"v1.0".to_vec(),
                user: user(),
                target_revision: b"main".to_vec(),
                message: b"First release\n".to_vec(),
                timestamp: None,
            });
            request.metadata_mut().insert(
                refvote_proto::contract::TX_METADATA,
                MetadataValue::try_from(tx.as_str()).unwrap(),
            );
            OperationServiceClient::new(channel(n).await)
                .user_create_tag(request)
                .await
                .map(|r| r.into_inner().tag.unwrap().id)
        }
    });
    let ids: Vec<String> = futures::future::join_all(tags)
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    let outcome = c.finalize(&tx).await?;
    assert!(
        outcome.committed && outcome.promoted.len() == 3,
        "{outcome:?}"
    );
    assert!(ids.iter().all(|i| *i == ids[0]), "{ids:?}");
    let raw = git::git(&c.nodes[0].repo(relative), &["cat-file", "-p", "v1.0"])?;
    assert!(raw.contains(&format!("object {}", last.unwrap())), "{raw}");
    Ok(())
}
