//! Reads of a push's quarantine, as Rails makes them while GitLab checks a push
//! (`/allowed`): against a real etcd, three real votingd nodes, a real router, real
//! git and a real HTTP server standing in for GitLab's internal API, which, while the
//! push waits for its answer, asks the router for the push's new commit, tree, blob and
//! diff with the quarantine named in the Repository message. Every read sees the
//! quarantined objects (through the read engine's pooled processes and through the git
//! processes a call runs alike), and the same reads without the quarantine do not.
//!
//! Not here: CheckObjectsExist on a quarantine and the router's choice of replica
//! (tests/gitlab.rs).

use std::path::Path;
use std::sync::{Arc, Mutex};

use refvote_proto::gitaly::blob_service_client::BlobServiceClient;
use refvote_proto::gitaly::commit_service_client::CommitServiceClient;
use refvote_proto::gitaly::diff_service_client::DiffServiceClient;
use refvote_proto::gitaly::find_changed_paths_request::{self, request::CommitRequest};
use refvote_proto::gitaly::get_blobs_request::RevisionPath;
use refvote_proto::gitaly::{
    CommitDiffRequest, CommitIsAncestorRequest, FindChangedPathsRequest, FindCommitRequest,
    GetBlobRequest, GetBlobsRequest, ListBlobsRequest, ListCommitsRequest, Repository,
    TreeEntryRequest,
};
use refvote_tests::cluster::Fixture;
use refvote_tests::git;
use refvote_tests::gitlab::{GitlabApi, allowing, respond};
use refvote_tests::node::NodeOptions;
use refvote_tests::smarthttp::{GitHttpProxy, GitlabIdentity, Target};
use tonic::transport::Channel;

const RELATIVE: &str = "@hashed/12/34/quarantined.git";
const GL_REPOSITORY: &str = "project-7";

/// What the reads answered, each as far as the test compares it (`Err`: the code).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Answers {
    /// FindCommit of the new commit: its id.
    find_commit: Result<Option<String>, tonic::Code>,
    /// GetBlob of the new blob: its bytes.
    get_blob: Result<Vec<u8>, tonic::Code>,
    /// GetBlobs of `<new>:<path>`: its oid and bytes.
    get_blobs: Result<Vec<(String, Vec<u8>)>, tonic::Code>,
    /// TreeEntry of `<new>:<path>`: its oid and bytes.
    tree_entry: Result<(String, Vec<u8>), tonic::Code>,
    /// ListCommits `<new> --not --all`: ids.
    list_commits: Result<Vec<String>, tonic::Code>,
    /// CommitIsAncestor(old, new).
    is_ancestor: Result<bool, tonic::Code>,
    /// FindChangedPaths of the new commit: paths.
    changed_paths: Result<Vec<String>, tonic::Code>,
    /// ListBlobs `<new> --not --all` with paths: (oid, path).
    list_blobs: Result<Vec<(String, String)>, tonic::Code>,
    /// CommitDiff old..new: (to path, patch bytes).
    commit_diff: Result<Vec<(String, Vec<u8>)>, tonic::Code>,
}

fn repository(quarantine: Option<&str>) -> Option<Repository> {
    Some(Repository {
        storage_name: "default".into(),
        relative_path: RELATIVE.into(),
        gl_repository: GL_REPOSITORY.into(),
        git_object_directory: quarantine.unwrap_or_default().into(),
        git_alternate_object_directories: if quarantine.is_some() {
            vec!["objects".into()]
        } else {
            Vec::new()
        },
        ..Default::default()
    })
}

/// Every read of `new` (child of `old`, adding `path`) through `channel`, naming
/// `quarantine` when given.
async fn read_all(
    channel: Channel,
    quarantine: Option<&str>,
    old: &str,
    new: &str,
    blob: &str,
    path: &str,
) -> Answers {
    let repo = || repository(quarantine);
    let mut commits = CommitServiceClient::new(channel.clone());
    let mut blobs = BlobServiceClient::new(channel.clone());
    let mut diffs = DiffServiceClient::new(channel);

    let find_commit = commits
        .find_commit(FindCommitRequest {
            repository: repo(),
            revision: new.as_bytes().to_vec(),
            trailers: false,
        })
        .await
        .map(|r| r.into_inner().commit.map(|c| c.id))
        .map_err(|s| s.code());

    let get_blob = async {
        let mut s = blobs
            .get_blob(GetBlobRequest {
                repository: repo(),
                oid: blob.into(),
                limit: -1,
            })
            .await?
            .into_inner();
        let mut data = Vec::new();
        while let Some(m) = s.message().await? {
            data.extend(m.data);
        }
        Ok::<_, tonic::Status>(data)
    }
    .await
    .map_err(|s| s.code());

    let get_blobs = async {
        let mut s = blobs
            .get_blobs(GetBlobsRequest {
                repository: repo(),
                revision_paths: vec![RevisionPath {
                    revision: new.into(),
                    path: path.as_bytes().to_vec(),
                }],
                limit: -1,
            })
            .await?
            .into_inner();
        let mut out: Vec<(String, Vec<u8>)> = Vec::new();
        while let Some(m) = s.message().await? {
            if !m.oid.is_empty() {
                out.push((m.oid.clone(), Vec::new()));
            }
            if let Some(last) = out.last_mut() {
                last.1.extend(m.data);
            }
        }
        Ok::<_, tonic::Status>(out)
    }
    .await
    .map_err(|s| s.code());

    let tree_entry = async {
        let mut s = commits
            .tree_entry(TreeEntryRequest {
                repository: repo(),
                revision: new.as_bytes().to_vec(),
                path: path.as_bytes().to_vec(),
                ..Default::default()
            })
            .await?
            .into_inner();
        let (mut oid, mut data) = (String::new(), Vec::new());
        while let Some(m) = s.message().await? {
            if !m.oid.is_empty() {
                oid = m.oid;
            }
            data.extend(m.data);
        }
        Ok::<_, tonic::Status>((oid, data))
    }
    .await
    .map_err(|s| s.code());

    let list_commits = async {
        let mut s = commits
            .list_commits(ListCommitsRequest {
                repository: repo(),
                revisions: vec![new.into(), "--not".into(), "--all".into()],
                ..Default::default()
            })
            .await?
            .into_inner();
        let mut ids = Vec::new();
        while let Some(m) = s.message().await? {
            ids.extend(m.commits.into_iter().map(|c| c.id));
        }
        Ok::<_, tonic::Status>(ids)
    }
    .await
    .map_err(|s| s.code());

    let is_ancestor = commits
        .commit_is_ancestor(CommitIsAncestorRequest {
            repository: repo(),
            ancestor_id: old.into(),
            child_id: new.into(),
        })
        .await
        .map(|r| r.into_inner().value)
        .map_err(|s| s.code());

    let changed_paths = async {
        let mut s = diffs
            .find_changed_paths(FindChangedPathsRequest {
                repository: repo(),
                requests: vec![find_changed_paths_request::Request {
                    r#type: Some(find_changed_paths_request::request::Type::CommitRequest(
                        CommitRequest {
                            commit_revision: new.into(),
                            parent_commit_revisions: Vec::new(),
                        },
                    )),
                }],
                ..Default::default()
            })
            .await?
            .into_inner();
        let mut paths = Vec::new();
        while let Some(m) = s.message().await? {
            paths.extend(
                m.paths
                    .into_iter()
                    .map(|p| String::from_utf8_lossy(&p.path).into_owned()),
            );
        }
        Ok::<_, tonic::Status>(paths)
    }
    .await
    .map_err(|s| s.code());

    let list_blobs = async {
        let mut s = blobs
            .list_blobs(ListBlobsRequest {
                repository: repo(),
                revisions: vec![new.into(), "--not".into(), "--all".into()],
                limit: 0,
                bytes_limit: 0,
                with_paths: true,
            })
            .await?
            .into_inner();
        let mut out = Vec::new();
        while let Some(m) = s.message().await? {
            for b in m.blobs {
                if !b.oid.is_empty() {
                    out.push((b.oid, String::from_utf8_lossy(&b.path).into_owned()));
                }
            }
        }
        Ok::<_, tonic::Status>(out)
    }
    .await
    .map_err(|s| s.code());

    let commit_diff = async {
        let mut s = diffs
            .commit_diff(CommitDiffRequest {
                repository: repo(),
                left_commit_id: old.into(),
                right_commit_id: new.into(),
                ..Default::default()
            })
            .await?
            .into_inner();
        let mut out: Vec<(String, Vec<u8>)> = Vec::new();
        let mut open = false;
        while let Some(m) = s.message().await? {
            if !open {
                out.push((String::from_utf8_lossy(&m.to_path).into_owned(), Vec::new()));
            }
            if let Some(last) = out.last_mut() {
                last.1.extend(m.raw_patch_data);
            }
            open = !m.end_of_patch;
        }
        Ok::<_, tonic::Status>(out)
    }
    .await
    .map_err(|s| s.code());

    Answers {
        find_commit,
        get_blob,
        get_blobs,
        tree_entry,
        list_commits,
        is_ancestor,
        changed_paths,
        list_blobs,
        commit_diff,
    }
}

/// What git says in the work repository (which holds the new objects) for the same
/// questions.
fn expected(work: &Path, old: &str, new: &str, path: &str) -> anyhow::Result<Answers> {
    let blob = git::git(work, &["rev-parse", &format!("{new}:{path}")])?;
    let data = std::fs::read(work.join(path))?;
    // CommitDiff's patch: the hunks after git's header lines.
    let patch = git::git(
        work,
        &["diff", "--no-color", "--full-index", old, new, "--", path],
    )?;
    let hunks = patch
        .find("\n@@")
        .map(|i| patch[i + 1..].to_owned())
        .unwrap_or_default();
    Ok(Answers {
        find_commit: Ok(Some(new.to_owned())),
        get_blob: Ok(data.clone()),
        get_blobs: Ok(vec![(blob.clone(), data.clone())]),
        tree_entry: Ok((blob.clone(), data)),
        list_commits: Ok(vec![new.to_owned()]),
        is_ancestor: Ok(true),
        changed_paths: Ok(vec![path.to_owned()]),
        list_blobs: Ok(vec![(blob, path.to_owned())]),
        commit_diff: Ok(vec![(path.to_owned(), format!("{hunks}\n").into_bytes())]),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_during_allowed_see_the_pushed_objects_in_quarantine() -> anyhow::Result<()> {
    let api_dir = tempfile::tempdir()?;
    let api = GitlabApi::start(api_dir.path(), respond(allowing)).await?;
    let c = Fixture::nodes(3)
        .node_options(NodeOptions::default().config(api.configure()))
        .seeded(RELATIVE)
        .router()
        .start()
        .await?;
    let work = c.work("w")?;
    let router = c.routers[0].grpc_url();

    // The push: one commit adding one file whose blob exists nowhere else.
    let old = git::rev(&work.path, "refs/heads/main").expect("seeded main");
    let path = "docs/quarantined.txt";
    std::fs::create_dir_all(work.path.join("docs"))?;
    std::fs::write(work.path.join(path), "only in the push's quarantine\n")?;
    git::git(&work.path, &["add", path])?;
    git::git(
        &work.path,
        &["commit", "--quiet", "-m", "read in quarantine"],
    )?;
    let new = git::git(&work.path, &["rev-parse", "HEAD"])?;
    let blob = git::git(&work.path, &["rev-parse", &format!("HEAD:{path}")])?;

    // (with the quarantine, without it), recorded by the stand-in during /allowed.
    type Seen = (Answers, Answers);
    let seen: Arc<Mutex<Option<Seen>>> = Arc::default();
    let record = seen.clone();
    let asked = (router.clone(), old.clone(), new.clone(), blob);
    api.set_responder(Arc::new(move |req| {
        let (record, (router, old, new, blob)) = (record.clone(), asked.clone());
        Box::pin(async move {
            if req.path == "/api/v4/internal/allowed" {
                let body = req.json();
                let env: serde_json::Value =
                    serde_json::from_str(body["env"].as_str().unwrap_or("{}")).unwrap_or_default();
                let quarantine = env["GIT_OBJECT_DIRECTORY_RELATIVE"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                let channel = tonic::transport::Endpoint::from_shared(router)
                    .expect("router url")
                    .connect()
                    .await
                    .expect("router reachable");
                let q = Some(quarantine.as_str());
                let with = read_all(channel.clone(), q, &old, &new, &blob, path).await;
                let without = read_all(channel, None, &old, &new, &blob, path).await;
                *record.lock().unwrap() = Some((with, without));
            }
            allowing(&req)
        })
    }));

    let proxy = GitHttpProxy::start_as(
        vec![Target {
            url: router.clone(),
            storage: "default".into(),
            transaction: None,
        }],
        GitlabIdentity {
            gl_id: "user-3".into(),
            gl_username: "jane".into(),
            gl_repository: GL_REPOSITORY.into(),
            gl_project_path: "group/quarantined".into(),
        },
    )
    .await?;
    let out = git::push(&work.path, Path::new(&proxy.url(RELATIVE)), &["main"], &[]).await?;
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let (with, without) = seen.lock().unwrap().take().expect("/allowed was called");
    assert_eq!(with, expected(&work.path, &old, &new, path)?);
    // Without the quarantine the new objects are nowhere yet.
    assert_eq!(without.find_commit, Ok(None));
    assert_eq!(without.get_blob, Ok(Vec::new()));
    assert_eq!(without.get_blobs.map(|b| b.is_empty()), Ok(true));
    assert_eq!(without.tree_entry.err(), Some(tonic::Code::NotFound));
    assert!(without.list_commits.is_err(), "{:?}", without.list_commits);
    assert!(without.commit_diff.is_err(), "{:?}", without.commit_diff);
    Ok(())
}
