//! RepositoryService and RefService RPCs of the node against real votingd processes,
//! real etcd and real git: checksums, sizes, merge bases, WriteRef, bundles,
//! ReplicateRepository (repair), ref listings and lookups, DeleteRefs and
//! UpdateReferences, inside and outside refvote transactions.

use std::path::Path;

use base64::Engine as _;
use refvote_cluster::RepoId;
use refvote_cluster::records::ReplicaRecord;
use refvote_proto::gitaly::ref_service_client::RefServiceClient;
use refvote_proto::gitaly::repository_service_client::RepositoryServiceClient;
use refvote_proto::gitaly::update_references_request::Update;
use refvote_proto::gitaly::{
    CalculateChecksumRequest, CreateBundleRequest, CreateRepositoryFromBundleRequest,
    CreateRepositoryRequest, DeleteRefsRequest, FindBranchRequest, FindLocalBranchesRequest,
    FindMergeBaseRequest, FindTagRequest, ListRefsRequest, PaginationParameter,
    ReplicateRepositoryRequest, RepositoryInfoRequest, RepositorySizeRequest,
    UpdateReferencesRequest, WriteRefRequest,
};
use refvote_tests::cluster::VoteCluster;
use refvote_tests::git::{self, rev};
use refvote_tests::grpc::{channel, repo, with_tx};
use refvote_tests::node::{Node, NodeOptions};
use sha1::{Digest, Sha1};
use tokio_stream::StreamExt;
use tonic::Code;
use tonic::metadata::MetadataValue;

async fn create(node: &Node, relative: &str) -> anyhow::Result<()> {
    RepositoryServiceClient::new(channel(node).await)
        .create_repository(CreateRepositoryRequest {
            repository: repo(relative),
            ..Default::default()
        })
        .await?;
    Ok(())
}

async fn push(work: &Path, target: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = git::push(work, target, args, &[]).await?;
    anyhow::ensure!(
        out.status.success(),
        "push failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

async fn checksum(node: &Node, relative: &str) -> anyhow::Result<String> {
    Ok(RepositoryServiceClient::new(channel(node).await)
        .calculate_checksum(CalculateChecksumRequest {
            repository: repo(relative),
        })
        .await?
        .into_inner()
        .checksum)
}

/// Gitaly's checksum, computed here from `git show-ref --head` independently of the
/// node's code: SHA-1 of each kept line, XOR, hex without leading zeros.
fn expected_checksum(repo: &Path) -> String {
    let out = std::process::Command::new("git")
        .args(["show-ref", "--head"])
        .current_dir(repo)
        .output()
        .unwrap();
    let kept = [
        "HEAD",
        "refs/heads/",
        "refs/tags/",
        "refs/keep-around/",
        "refs/merge-requests/",
        "refs/environments/",
        "refs/notes/",
    ];
    let mut acc = [0u8; 20];
    let mut any = false;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if !kept.iter().any(|k| line.contains(k)) {
            continue;
        }
        any = true;
        for (a, d) in acc.iter_mut().zip(Sha1::digest(line.as_bytes())) {
            *a ^= d;
        }
    }
    if !any {
        return "0".repeat(40);
    }
    let hex: String = acc.iter().map(|b| format!("{b:02x}")).collect();
    hex.trim_start_matches('0').to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checksum_size_info_and_merge_base_come_from_git() -> anyhow::Result<()> {
    let c = VoteCluster::start(1, 1).await?;
    let node = &c.nodes[0];
    let rel = "g/sums.git";
    create(node, rel).await?;
    let mut repos = RepositoryServiceClient::new(channel(node).await);

    // Empty but valid: 40 zeros.
    assert_eq!(checksum(node, rel).await?, "0".repeat(40));

    let work = c.work("w")?;
    let base = work.commit("main", "base")?;
    work.commit("main", "on main")?;
    git::git(&work.path, &["checkout", "--quiet", "-b", "topic", &base])?;
    work.commit("topic", "on topic")?;
    git::git(&work.path, &["tag", "-a", "v1", "-m", "v1", "main"])?;
    git::git(&work.path, &["update-ref", "refs/remotes/origin/x", "main"])?;
    push(
        &work.path,
        &node.repo(rel),
        &[
            "main",
            "topic",
            "v1",
            "refs/remotes/origin/x:refs/remotes/origin/x",
        ],
    )
    .await?;
    let sum = checksum(node, rel).await?;
    assert_eq!(sum, expected_checksum(&node.repo(rel)));
    assert_ne!(sum, "0".repeat(40));

    let size = repos
        .repository_size(RepositorySizeRequest {
            repository: repo(rel),
        })
        .await?
        .into_inner()
        .size;
    assert!(size > 0, "{size}");
    let info = repos
        .repository_info(RepositoryInfoRequest {
            repository: repo(rel),
        })
        .await?
        .into_inner();
    assert!(
        info.size >= info.objects.as_ref().unwrap().size && info.size > 0,
        "{info:?}"
    );
    assert!(
        info.references.as_ref().unwrap().loose_count >= 3,
        "{info:?}"
    );

    let mb = repos
        .find_merge_base(FindMergeBaseRequest {
            repository: repo(rel),
            revisions: vec![b"main".to_vec(), b"topic".to_vec()],
        })
        .await?
        .into_inner()
        .base;
    assert_eq!(mb, base);

    // Error paths: a missing repository, too few revisions, an option as a revision.
    let e = repos
        .calculate_checksum(CalculateChecksumRequest {
            repository: repo("missing.git"),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = repos
        .repository_size(RepositorySizeRequest {
            repository: repo("missing.git"),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = repos
        .find_merge_base(FindMergeBaseRequest {
            repository: repo(rel),
            revisions: vec![b"main".to_vec()],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = repos
        .find_merge_base(FindMergeBaseRequest {
            repository: repo(rel),
            revisions: vec![b"main".to_vec(), b"--output=/tmp/x".to_vec()],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_ref_checks_the_old_value_and_points_head() -> anyhow::Result<()> {
    let c = VoteCluster::start(1, 1).await?;
    let node = &c.nodes[0];
    let rel = "wr.git";
    create(node, rel).await?;
    let work = c.work("w")?;
    let one = work.commit("main", "one")?;
    let two = work.commit("main", "two")?;
    push(&work.path, &node.repo(rel), &["main"]).await?;
    let mut repos = RepositoryServiceClient::new(channel(node).await);
    let path = node.repo(rel);

    // Create with "must not exist", then move with the right old value.
    repos
        .write_ref(WriteRefRequest {
            repository: repo(rel),
            r#ref: b"refs/heads/feature".to_vec(),
            revision: one.clone().into_bytes(),
            old_revision: "0".repeat(40).into_bytes(),
        })
        .await?;
    assert_eq!(
        rev(&path, "refs/heads/feature").as_deref(),
        Some(one.as_str())
    );
    repos
        .write_ref(WriteRefRequest {
            repository: repo(rel),
            r#ref: b"refs/heads/feature".to_vec(),
            revision: b"main".to_vec(),
            old_revision: one.clone().into_bytes(),
        })
        .await?;
    assert_eq!(
        rev(&path, "refs/heads/feature").as_deref(),
        Some(two.as_str())
    );

    // A stale old value is refused and changes nothing.
    let e = repos
        .write_ref(WriteRefRequest {
            repository: repo(rel),
            r#ref: b"refs/heads/feature".to_vec(),
            revision: one.clone().into_bytes(),
            old_revision: one.clone().into_bytes(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Aborted, "{e:?}");
    assert_eq!(
        rev(&path, "refs/heads/feature").as_deref(),
        Some(two.as_str())
    );

    // HEAD is a symref: the revision is the ref it points at.
    repos
        .write_ref(WriteRefRequest {
            repository: repo(rel),
            r#ref: b"HEAD".to_vec(),
            revision: b"refs/heads/feature".to_vec(),
            old_revision: Vec::new(),
        })
        .await?;
    assert_eq!(
        git::git(&path, &["symbolic-ref", "HEAD"])?,
        "refs/heads/feature"
    );

    // Error paths: missing revision, bad names, a HEAD target that is not a ref.
    let e = repos
        .write_ref(WriteRefRequest {
            repository: repo(rel),
            r#ref: b"refs/heads/x".to_vec(),
            revision: b"no-such-branch".to_vec(),
            old_revision: Vec::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    for (r, revision) in [
        (&b"heads/x"[..], &b"main"[..]),
        (b"refs/heads/a..b", b"main"),
        (b"refs/heads/x", b""),
        (b"HEAD", b"main"),
    ] {
        let e = repos
            .write_ref(WriteRefRequest {
                repository: repo(rel),
                r#ref: r.to_vec(),
                revision: revision.to_vec(),
                old_revision: Vec::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{r:?} {revision:?}: {e:?}");
    }
    assert!(rev(&path, "refs/heads/x").is_none());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundles_stream_out_and_create_repositories() -> anyhow::Result<()> {
    let c = VoteCluster::start(1, 1).await?;
    let node = &c.nodes[0];
    let rel = "src.git";
    create(node, rel).await?;
    let mut repos = RepositoryServiceClient::new(channel(node).await);

    // An empty repository has nothing to bundle.
    let e = repos
        .create_bundle(CreateBundleRequest {
            repository: repo(rel),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");

    let work = c.work("w")?;
    work.commit("main", "one")?;
    work.commit("dev", "two")?;
    push(&work.path, &node.repo(rel), &["main", "dev"]).await?;
    let mut stream = repos
        .create_bundle(CreateBundleRequest {
            repository: repo(rel),
        })
        .await?
        .into_inner();
    let mut chunks = Vec::new();
    while let Some(m) = stream.next().await {
        chunks.push(m?.data);
    }
    let bundle: Vec<u8> = chunks.concat();
    assert!(bundle.starts_with(b"# v2 git bundle") || bundle.starts_with(b"# v3 git bundle"));

    // Streamed in, in several messages: the repository appears with the same refs.
    let mut msgs: Vec<CreateRepositoryFromBundleRequest> = bundle
        .chunks(1000)
        .map(|d| CreateRepositoryFromBundleRequest {
            repository: None,
            data: d.to_vec(),
        })
        .collect();
    msgs[0].repository = repo("copy.git");
    repos
        .create_repository_from_bundle(tokio_stream::iter(msgs.clone()))
        .await?;
    let copy = node.repo("copy.git");
    assert_eq!(git::refs(&copy), git::refs(&node.repo(rel)));
    assert_eq!(
        checksum(node, "copy.git").await?,
        checksum(node, rel).await?
    );
    assert_eq!(
        git::git(&copy, &["config", "core.hooksPath"])?,
        node.hooks.display().to_string()
    );
    git::git(&copy, &["fsck", "--strict"])?;

    // Error paths: it exists already; garbage is not a bundle and creates nothing.
    let e = repos
        .create_repository_from_bundle(tokio_stream::iter(msgs))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    let e = repos
        .create_repository_from_bundle(tokio_stream::iter(vec![
            CreateRepositoryFromBundleRequest {
                repository: repo("garbage.git"),
                data: b"this is not a bundle\n".to_vec(),
            },
        ]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(!node.repo("garbage.git").exists());
    let tmp = std::fs::read_dir(node.storage.join("+refvote/tmp"))?.count();
    assert_eq!(tmp, 0, "temporary files left behind");
    Ok(())
}

fn servers_metadata(source: &Node) -> MetadataValue<tonic::metadata::Ascii> {
    let json = format!(
        r#"{{"default": {{"address": "tcp://{}", "token": ""}}}}"#,
        source.grpc_addr()
    );
    MetadataValue::try_from(base64::engine::general_purpose::STANDARD.encode(json)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicate_repository_repairs_a_stale_replica_and_is_idempotent() -> anyhow::Result<()> {
    let c = VoteCluster::start(2, 1).await?;
    let (source, stale) = (&c.nodes[0], &c.nodes[1]);
    let rel = "g/repair.git";
    create(source, rel).await?;
    create(stale, rel).await?;
    let work = c.work("w")?;
    work.commit("main", "one")?;
    work.commit("gone", "a branch the source deletes")?;
    push(&work.path, &source.repo(rel), &["main", "gone"]).await?;
    push(&work.path, &stale.repo(rel), &["main", "gone"]).await?;
    // The source moves on: a new commit, a new branch and tag, a deleted branch, HEAD.
    work.commit("main", "two")?;
    work.commit("dev", "three")?;
    git::git(&work.path, &["tag", "-a", "v2", "-m", "v2", "main"])?;
    push(
        &work.path,
        &source.repo(rel),
        &["main", "dev", "v2", ":gone"],
    )
    .await?;
    git::git(
        &source.repo(rel),
        &["symbolic-ref", "HEAD", "refs/heads/dev"],
    )?;
    assert_ne!(checksum(source, rel).await?, checksum(stale, rel).await?);

    let mut repos = RepositoryServiceClient::new(channel(stale).await);
    let request = |target: &str| {
        let mut r = tonic::Request::new(ReplicateRepositoryRequest {
            repository: repo(target),
            source: repo(rel),
        });
        r.metadata_mut()
            .insert("gitaly-servers", servers_metadata(source));
        r
    };
    repos.replicate_repository(request(rel)).await?;
    let want = checksum(source, rel).await?;
    assert_eq!(checksum(stale, rel).await?, want);
    assert_eq!(git::refs(&stale.repo(rel)), git::refs(&source.repo(rel)));
    assert_eq!(
        git::git(&stale.repo(rel), &["symbolic-ref", "HEAD"])?,
        "refs/heads/dev"
    );
    git::git(&stale.repo(rel), &["fsck", "--strict"])?;

    // Again: nothing changes.
    let before = git::refs(&stale.repo(rel));
    repos.replicate_repository(request(rel)).await?;
    assert_eq!(checksum(stale, rel).await?, want);
    assert_eq!(git::refs(&stale.repo(rel)), before);

    // A replica that does not exist yet is created whole.
    repos
        .replicate_repository(request("g/new-replica.git"))
        .await?;
    let fresh = stale.repo("g/new-replica.git");
    assert_eq!(checksum(stale, "g/new-replica.git").await?, want);
    assert_eq!(
        git::git(&fresh, &["config", "core.hooksPath"])?,
        stale.hooks.display().to_string()
    );

    // Error paths: no servers metadata; a source that does not exist.
    let e = repos
        .replicate_repository(ReplicateRepositoryRequest {
            repository: repo(rel),
            source: repo(rel),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("gitaly-servers"), "{e:?}");
    let mut r = tonic::Request::new(ReplicateRepositoryRequest {
        repository: repo(rel),
        source: repo("no-such.git"),
    });
    r.metadata_mut()
        .insert("gitaly-servers", servers_metadata(source));
    let e = repos.replicate_repository(r).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert_eq!(
        checksum(stale, rel).await?,
        want,
        "a failed repair changed the replica"
    );
    Ok(())
}

/// Regression, found by the crash scenarios (`scenario_crashes.rs`, scenario 2):
/// `git bundle create --all` silently leaves out a ref that moves while it writes the
/// bundle, and a repair fetching that bundle with `--prune` deleted the branch on its
/// target (which a quiet moment in etcd could then record up to date). The source here
/// runs git through a wrapper that leaves `moving` out of every bundle, as that race
/// does: the repair must fail ABORTED (a conflict: try again) naming the ref, and
/// change nothing. The wrapper also refuses to serve upload-pack, so the target's
/// incremental fetch fails and the repair falls back to the bundle, as it does when a
/// fetch breaks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repair_never_applies_a_bundle_that_lacks_a_ref_the_source_has() -> anyhow::Result<()> {
    let c = VoteCluster::start(1, 1).await?;
    let target = &c.nodes[0];
    let wrapper = c.dir.path().join("git-bundles-leave-out-moving");
    std::fs::write(
        &wrapper,
        "#!/bin/sh\n\
         # git, except that bundles leave out refs/heads/moving and upload-pack fails.\n\
         for a in \"$@\"; do [ \"$a\" = upload-pack ] && { echo 'no upload-pack here' >&2; exit 1; }; done\n\
         bundle=\n\
         for a in \"$@\"; do [ \"$a\" = bundle ] && bundle=1; done\n\
         if [ -n \"$bundle\" ]; then\n\
           n=$#\n\
           for a in \"$@\"; do\n\
             if [ \"$a\" = --all ]; then set -- \"$@\" --exclude=refs/heads/moving --all\n\
             else set -- \"$@\" \"$a\"; fi\n\
           done\n\
           shift $n\n\
         fi\n\
         exec git \"$@\"\n",
    )?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))?;
    let source = Node::start(
        "leaky",
        c.dir.path(),
        &c.etcd.endpoints(),
        &NodeOptions::default().config({
            let wrapper = wrapper.clone();
            move |c| c.git.bin_path = wrapper.clone()
        }),
    )
    .await?;
    let rel = "g/moving.git";
    create(&source, rel).await?;
    create(target, rel).await?;
    let work = c.work("w")?;
    work.commit("main", "one")?;
    work.commit("moving", "two")?;
    push(&work.path, &source.repo(rel), &["main", "moving"]).await?;
    push(&work.path, &target.repo(rel), &["main", "moving"]).await?;
    work.commit("main", "three")?;
    push(&work.path, &source.repo(rel), &["main"]).await?;
    let before = git::refs(&target.repo(rel));

    let mut r = tonic::Request::new(ReplicateRepositoryRequest {
        repository: repo(rel),
        source: repo(rel),
    });
    r.metadata_mut()
        .insert("gitaly-servers", servers_metadata(&source));
    let e = RepositoryServiceClient::new(channel(target).await)
        .replicate_repository(r)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Aborted, "{e:?}");
    assert!(e.message().contains("refs/heads/moving"), "{e:?}");
    assert_eq!(
        git::refs(&target.repo(rel)),
        before,
        "a repair from an incomplete bundle changed the replica"
    );
    assert!(rev(&target.repo(rel), "refs/heads/moving").is_some());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refs_are_listed_and_looked_up() -> anyhow::Result<()> {
    let c = VoteCluster::start(1, 1).await?;
    let node = &c.nodes[0];
    let rel = "refs.git";
    create(node, rel).await?;
    let work = c.work("w")?;
    let main = work.commit("main", "main commit\n\nwith a body")?;
    let mut branches = vec!["main".to_owned()];
    for i in 0..5 {
        let b = format!("b{i}");
        work.commit(&b, &format!("on {b}"))?;
        branches.push(b);
    }
    git::git(&work.path, &["tag", "-a", "v1", "-m", "release one", &main])?;
    git::git(&work.path, &["tag", "light", &main])?;
    let mut args: Vec<&str> = branches.iter().map(String::as_str).collect();
    args.extend(["v1", "light"]);
    push(&work.path, &node.repo(rel), &args).await?;
    let mut refs = RefServiceClient::new(channel(node).await);

    let mut listed = Vec::new();
    let mut s = refs
        .list_refs(ListRefsRequest {
            repository: repo(rel),
            patterns: vec![b"refs/tags/".to_vec()],
            head: true,
            peel_tags: true,
            ..Default::default()
        })
        .await?
        .into_inner();
    while let Some(m) = s.next().await {
        listed.extend(m?.references);
    }
    let names: Vec<String> = listed
        .iter()
        .map(|r| String::from_utf8_lossy(&r.name).into_owned())
        .collect();
    assert_eq!(names, ["HEAD", "refs/tags/light", "refs/tags/v1"]);
    assert_eq!(listed[0].target, main);
    assert_eq!(listed[2].peeled_target, main);
    assert_eq!(
        listed[2].target,
        rev(&node.repo(rel), "refs/tags/v1").unwrap()
    );

    let b = refs
        .find_branch(FindBranchRequest {
            repository: repo(rel),
            name: b"main".to_vec(),
        })
        .await?
        .into_inner()
        .branch
        .expect("main exists");
    assert_eq!(b.name, b"main");
    let commit = b.target_commit.unwrap();
    assert_eq!(commit.id, main);
    assert_eq!(commit.subject, b"main commit");
    assert_eq!(commit.author.unwrap().email, b"test@refvote.invalid");
    let none = refs
        .find_branch(FindBranchRequest {
            repository: repo(rel),
            name: b"nope".to_vec(),
        })
        .await?
        .into_inner();
    assert!(none.branch.is_none());

    let tag = refs
        .find_tag(FindTagRequest {
            repository: repo(rel),
            tag_name: b"v1".to_vec(),
        })
        .await?
        .into_inner()
        .tag
        .unwrap();
    // Gitaly trims a tag message's trailing newlines.
    assert_eq!(tag.message, b"release one");
    assert_eq!(tag.target_commit.unwrap().id, main);
    assert!(tag.tagger.is_some());
    let light = refs
        .find_tag(FindTagRequest {
            repository: repo(rel),
            tag_name: b"light".to_vec(),
        })
        .await?
        .into_inner()
        .tag
        .unwrap();
    assert_eq!(light.id, main);

    // Branches in pages of two, the token being the last full name seen.
    let mut all = Vec::new();
    let mut token = String::new();
    loop {
        let mut s = refs
            .find_local_branches(FindLocalBranchesRequest {
                repository: repo(rel),
                pagination_params: Some(PaginationParameter {
                    page_token: token.clone(),
                    limit: 2,
                }),
                ..Default::default()
            })
            .await?
            .into_inner();
        let mut page = Vec::new();
        while let Some(m) = s.next().await {
            page.extend(m?.local_branches);
        }
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 2);
        token = String::from_utf8_lossy(&page.last().unwrap().name).into_owned();
        all.extend(page);
    }
    let got: Vec<String> = all
        .iter()
        .map(|b| String::from_utf8_lossy(&b.name).into_owned())
        .collect();
    let mut want: Vec<String> = branches.iter().map(|b| format!("refs/heads/{b}")).collect();
    want.sort();
    assert_eq!(got, want);
    assert!(all.iter().all(|b| b.target_commit.is_some()));

    // Error paths.
    let e = refs
        .find_tag(FindTagRequest {
            repository: repo(rel),
            tag_name: b"v9".to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(!e.details().is_empty(), "a FindTagError detail is attached");
    let e = refs
        .list_refs(ListRefsRequest {
            repository: repo(rel),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = refs
        .find_branch(FindBranchRequest {
            repository: repo(rel),
            name: Vec::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let mut s = refs
        .find_local_branches(FindLocalBranchesRequest {
            repository: repo(rel),
            pagination_params: Some(PaginationParameter {
                page_token: "refs/heads/zzz".into(),
                limit: 2,
            }),
            ..Default::default()
        })
        .await?
        .into_inner();
    let e = loop {
        match s.next().await {
            Some(Ok(_)) => continue,
            Some(Err(e)) => break e,
            None => panic!("an unknown page token must fail"),
        }
    };
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_references_is_atomic_and_delete_refs_deletes() -> anyhow::Result<()> {
    let c = VoteCluster::start(1, 1).await?;
    let node = &c.nodes[0];
    let rel = "upd.git";
    create(node, rel).await?;
    let work = c.work("w")?;
    let one = work.commit("main", "one")?;
    let two = work.commit("main", "two")?;
    push(&work.path, &node.repo(rel), &["main"]).await?;
    let path = node.repo(rel);
    let zero = "0".repeat(40);
    let mut refs = RefServiceClient::new(channel(node).await);
    let upd = |r: &str, old: &str, new: &str| Update {
        reference: r.as_bytes().to_vec(),
        old_object_id: old.as_bytes().to_vec(),
        new_object_id: new.as_bytes().to_vec(),
    };

    // Spread over two messages, applied together.
    refs.update_references(tokio_stream::iter(vec![
        UpdateReferencesRequest {
            repository: repo(rel),
            updates: vec![upd("refs/heads/a", &zero, &one)],
        },
        UpdateReferencesRequest {
            repository: None,
            updates: vec![
                upd("refs/heads/b", "", &two),
                upd("refs/heads/main", &two, &one),
            ],
        },
    ]))
    .await?;
    assert_eq!(rev(&path, "refs/heads/a").as_deref(), Some(one.as_str()));
    assert_eq!(rev(&path, "refs/heads/b").as_deref(), Some(two.as_str()));
    assert_eq!(rev(&path, "refs/heads/main").as_deref(), Some(one.as_str()));

    // One stale old value: nothing of the batch is applied.
    let before = git::refs(&path);
    let e = refs
        .update_references(tokio_stream::iter(vec![UpdateReferencesRequest {
            repository: repo(rel),
            updates: vec![
                upd("refs/heads/c", &zero, &one),
                upd("refs/heads/a", &two, &two),
            ],
        }]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Aborted, "{e:?}");
    assert!(!e.details().is_empty());
    assert_eq!(git::refs(&path), before);
    for bad in [
        vec![upd("HEAD", "", &one)],
        vec![upd("refs/heads/x", "", "not-an-oid")],
        vec![upd("refs/heads/x", "", &one), upd("refs/heads/x", "", &two)],
    ] {
        let e = refs
            .update_references(tokio_stream::iter(vec![UpdateReferencesRequest {
                repository: repo(rel),
                updates: bad,
            }]))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    }
    assert_eq!(git::refs(&path), before);

    // DeleteRefs by name (a missing one is fine), then all but a prefix.
    refs.delete_refs(DeleteRefsRequest {
        repository: repo(rel),
        refs: vec![b"refs/heads/a".to_vec(), b"refs/heads/missing".to_vec()],
        ..Default::default()
    })
    .await?;
    assert!(rev(&path, "refs/heads/a").is_none());
    refs.delete_refs(DeleteRefsRequest {
        repository: repo(rel),
        except_with_prefix: vec![b"refs/heads/main".to_vec()],
        ..Default::default()
    })
    .await?;
    assert_eq!(git::refs(&path), format!("{one} refs/heads/main"));
    let e = refs
        .delete_refs(DeleteRefsRequest {
            repository: repo(rel),
            refs: vec![b"refs/heads/main".to_vec()],
            except_with_prefix: vec![b"refs/tags/".to_vec()],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = refs
        .delete_refs(DeleteRefsRequest {
            repository: repo(rel),
            refs: vec![b"main".to_vec()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert_eq!(git::refs(&path), format!("{one} refs/heads/main"));
    Ok(())
}

/// DESIGN.md §2 "Votes": a ref packed on one replica and loose on the others is
/// deleted through DeleteRefs inside a 3-voter transaction; git's packed-refs side
/// transaction on the packed replica is not voted, so all three commit and are
/// promoted, and each promoted replica's record carries its checksum.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_refs_of_a_ref_packed_on_one_replica_commits_on_all_three() -> anyhow::Result<()> {
    let c = VoteCluster::start(3, 1).await?;
    let rel = "g/packed.git";
    for n in &c.nodes {
        create(n, rel).await?;
    }
    let id = RepoId::new("default", rel)?;
    c.store.create_repository(&id, &c.node_names(), "").await?;
    let work = c.work("w")?;
    work.commit("main", "one")?;
    work.commit("old", "to delete")?;
    for n in &c.nodes {
        push(&work.path, &n.repo(rel), &["main", "old"]).await?;
    }
    git::git(&c.nodes[0].repo(rel), &["pack-refs", "--all"])?;
    assert!(!c.nodes[0].repo(rel).join("refs/heads/old").exists());
    assert!(c.nodes[1].repo(rel).join("refs/heads/old").exists());

    let tx = c.begin(&id).await?;
    assert_eq!(tx.voters.len(), 3);
    let calls = c.nodes.iter().map(|n| {
        let tx = tx.id.clone();
        async move {
            RefServiceClient::new(channel(n).await)
                .delete_refs(with_tx(
                    DeleteRefsRequest {
                        repository: repo(rel),
                        refs: vec![b"refs/heads/old".to_vec()],
                        ..Default::default()
                    },
                    &tx,
                ))
                .await
        }
    });
    for r in futures::future::join_all(calls).await {
        r?;
    }
    let outcome = c.finalize(&tx).await?;
    assert!(outcome.committed && outcome.acknowledged, "{outcome:?}");
    assert_eq!(outcome.promoted.len(), 3, "{outcome:?}");
    assert!(outcome.outdated.is_empty(), "{outcome:?}");
    for n in &c.nodes {
        assert!(rev(&n.repo(rel), "refs/heads/old").is_none(), "{}", n.name);
        let record: ReplicaRecord = c
            .store
            .get(&c.store.keys().replica(&id, &n.name))
            .await?
            .expect("replica record")
            .decode()?;
        assert_eq!(record.generation, outcome.generation);
        assert_eq!(record.checksum, checksum(n, rel).await?, "{}", n.name);
        assert_eq!(record.checksum, expected_checksum(&n.repo(rel)));
    }

    // A write refused on every replica (a stale expected old value) commits nothing:
    // nobody is promoted or outdated.
    let tx = c.begin(&id).await?;
    for n in &c.nodes {
        let e = RefServiceClient::new(channel(n).await)
            .update_references(with_tx(
                tokio_stream::iter(vec![UpdateReferencesRequest {
                    repository: repo(rel),
                    updates: vec![Update {
                        reference: b"refs/heads/main".to_vec(),
                        old_object_id: "1".repeat(40).into_bytes(),
                        new_object_id: "0".repeat(40).into_bytes(),
                    }],
                }]),
                &tx.id,
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Aborted, "{e:?}");
    }
    let outcome = c.finalize(&tx).await?;
    assert!(!outcome.committed, "{outcome:?}");
    Ok(())
}
