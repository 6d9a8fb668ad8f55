//! The node's CommitService, BlobService and OperationService against real votingd
//! processes, real etcd and real git: success and error paths of every RPC, and the
//! mutators inside refvote transactions.

use refvote_proto::gitaly::blob_service_client::BlobServiceClient;
use refvote_proto::gitaly::commit_service_client::CommitServiceClient;
use refvote_proto::gitaly::get_blobs_request::RevisionPath;
use refvote_proto::gitaly::{
    CommitIsAncestorRequest, CountCommitsRequest, FindCommitRequest, GetBlobRequest,
    GetBlobResponse, GetBlobsRequest, GetBlobsResponse, GetTreeEntriesError, GetTreeEntriesRequest,
    GetTreeEntriesResponse, ListCommitsRequest, ObjectType, PaginationParameter, Repository,
    TreeEntryRequest, TreeEntryResponse, get_tree_entries_error, tree_entry, tree_entry_response,
};
use refvote_tests::cluster::VoteCluster;
use refvote_tests::git::{self, WorkRepo};
use refvote_tests::node::Node;
use tonic::Code;
use tonic::transport::Channel;
use votingd::node::detail::detail_of;

fn repo(relative: &str) -> Option<Repository> {
    Some(Repository {
        storage_name: "default".into(),
        relative_path: relative.into(),
        ..Default::default()
    })
}

async fn channel(node: &Node) -> Channel {
    Channel::from_shared(node.grpc_url())
        .unwrap()
        .tcp_nodelay(true)
        .connect()
        .await
        .unwrap()
}

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

/// Builds, in `work`, three commits on main (the last with a 100 KiB blob, nested
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
    let big: Vec<u8> = (0..100 * 1024).map(|i| (i % 251) as u8).collect();
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
    assert!(e.message().contains("ancestor_id"), "{e:?}");

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
    let e = n(count("main", true, "", 0)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
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
    let e = list(&["no-such-branch"], "", 0).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("no-such-branch"), "{e:?}");
    let e = list(&["main"], &"0".repeat(40), 5).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
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
    assert!(msgs.len() > 1, "100 KiB comes in several messages");
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
    let e = entry("main", "../etc/passwd", 0, 0).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
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
    let e = list(".", false, Some(("bogus", 2))).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
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
    let tree = git::git(&work.path, &["rev-parse", "main^{tree}"])?;
    let e = get(&tree, -1).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

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
