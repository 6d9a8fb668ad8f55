//! Three everyday calls made the way GitLab's own client makes them (stubs generated
//! from `proto/`, requests built as Rails builds them), through a real router in front
//! of three real nodes on a real etcd: `RepositoryExists` before a project exists
//! answers `exists: false` as Gitaly and Praefect do (and the other reads Rails makes
//! of a repository that may not exist answer NOT_FOUND); a web-editor commit without a
//! timestamp gets the router's time and the user's zone, identically on every replica;
//! and a push refused right after a node died says how many replicas answered and
//! which were unreachable, not that they disagreed.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use refvote_proto::gitaly::operation_service_client::OperationServiceClient;
use refvote_proto::gitaly::ref_service_client::RefServiceClient;
use refvote_proto::gitaly::repository_service_client::RepositoryServiceClient;
use refvote_proto::gitaly::user_commit_files_action_header::ActionType;
use refvote_proto::gitaly::{
    CreateRepositoryRequest, FindDefaultBranchNameRequest, HasLocalBranchesRequest,
    ObjectFormatRequest, RepositoryExistsRequest, RepositorySizeRequest, User,
    UserCommitFilesAction, UserCommitFilesActionHeader, UserCommitFilesRequest,
    UserCommitFilesRequestHeader, UserCreateTagRequest, user_commit_files_action,
    user_commit_files_request,
};
use refvote_tests::cluster::Fixture;
use refvote_tests::git;
use refvote_tests::grpc::repo;
use tonic::Code;
use tonic::transport::Channel;

async fn exists(
    ch: &Channel,
    repository: Option<refvote_proto::gitaly::Repository>,
) -> anyhow::Result<bool> {
    Ok(RepositoryServiceClient::new(ch.clone())
        .repository_exists(RepositoryExistsRequest { repository })
        .await?
        .into_inner()
        .exists)
}

/// Rails' user as `Gitlab::Git::User#to_gitaly` sends it: the zone is the user's
/// configured tz database name.
fn user(zone: &str) -> Option<User> {
    Some(User {
        gl_id: "user-1".into(),
        name: b"Jane Doe".to_vec(),
        email: b"jane@example.com".to_vec(),
        gl_username: "jane".into(),
        timezone: zone.into(),
    })
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("a clock after 1970")
        .as_secs() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repository_exists_says_false_before_a_project_is_created_and_true_after()
-> anyhow::Result<()> {
    let c = Fixture::nodes(3).router().start().await?;
    let ch = c.routers[0].channel().await?;

    // What Rails asks before it creates a project: no error, just "not there".
    assert!(!exists(&ch, repo("group/new.git")).await?);
    // A virtual storage refvote does not know has no such repository either (Praefect
    // answers the same).
    let elsewhere = refvote_proto::gitaly::Repository {
        storage_name: "nowhere".into(),
        relative_path: "group/new.git".into(),
        ..Default::default()
    };
    assert!(!exists(&ch, Some(elsewhere)).await?);
    // The other reads Rails makes of a repository that may not exist answer as Gitaly
    // does for a missing one: NOT_FOUND, which Rails reads as "no repository".
    let mut repos = RepositoryServiceClient::new(ch.clone());
    let size = repos
        .repository_size(RepositorySizeRequest {
            repository: repo("group/new.git"),
        })
        .await
        .unwrap_err();
    assert_eq!(size.code(), Code::NotFound, "{size:?}");
    let format = repos
        .object_format(ObjectFormatRequest {
            repository: repo("group/new.git"),
        })
        .await
        .unwrap_err();
    assert_eq!(format.code(), Code::NotFound, "{format:?}");
    let branches = repos
        .has_local_branches(HasLocalBranchesRequest {
            repository: repo("group/new.git"),
        })
        .await
        .unwrap_err();
    assert_eq!(branches.code(), Code::NotFound, "{branches:?}");
    let branch = RefServiceClient::new(ch.clone())
        .find_default_branch_name(FindDefaultBranchNameRequest {
            repository: repo("group/new.git"),
            head_only: false,
        })
        .await
        .unwrap_err();
    assert_eq!(branch.code(), Code::NotFound, "{branch:?}");
    // Bad input is still bad input, not "does not exist".
    let err = repos
        .repository_exists(RepositoryExistsRequest { repository: None })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    // Project creation: create, then it exists, and its size is readable.
    repos
        .create_repository(CreateRepositoryRequest {
            repository: repo("group/new.git"),
            default_branch: b"main".to_vec(),
            ..Default::default()
        })
        .await?;
    assert!(exists(&ch, repo("group/new.git")).await?);
    repos
        .repository_size(RepositorySizeRequest {
            repository: repo("group/new.git"),
        })
        .await?;

    // Registered, but gone from every replica's disk: the replicas' truth, false.
    for n in &c.nodes {
        std::fs::remove_dir_all(n.repo("group/new.git"))?;
    }
    assert!(!exists(&ch, repo("group/new.git")).await?);
    Ok(())
}

fn commit_files(
    header: UserCommitFilesRequestHeader,
    path: &str,
    content: &str,
) -> Vec<UserCommitFilesRequest> {
    let action = |payload| UserCommitFilesRequest {
        user_commit_files_request_payload: Some(
            user_commit_files_request::UserCommitFilesRequestPayload::Action(
                UserCommitFilesAction {
                    user_commit_files_action_payload: Some(payload),
                },
            ),
        ),
    };
    vec![
        UserCommitFilesRequest {
            user_commit_files_request_payload: Some(
                user_commit_files_request::UserCommitFilesRequestPayload::Header(header),
            ),
        },
        action(
            user_commit_files_action::UserCommitFilesActionPayload::Header(
                UserCommitFilesActionHeader {
                    action: ActionType::Create as i32,
                    file_path: path.as_bytes().to_vec(),
                    ..Default::default()
                },
            ),
        ),
        action(
            user_commit_files_action::UserCommitFilesActionPayload::Content(
                content.as_bytes().to_vec(),
            ),
        ),
    ]
}

/// The `<seconds> <zone>` ending the `author`, `committer` or `tagger` line of a raw
/// object.
fn date_of(raw: &str, who: &str) -> (i64, String) {
    let line = raw
        .lines()
        .find(|l| l.starts_with(&format!("{who} ")))
        .unwrap_or_else(|| panic!("no {who} line in {raw}"));
    let mut words = line.rsplit(' ');
    let zone = words.next().expect("a zone").to_owned();
    let seconds = words.next().expect("seconds").parse().expect("a number");
    (seconds, zone)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_web_editor_commit_without_a_timestamp_gets_the_routers_time_and_the_users_zone()
-> anyhow::Result<()> {
    let c = Fixture::nodes(3).router().start().await?;
    let ch = c.routers[0].channel().await?;
    RepositoryServiceClient::new(ch.clone())
        .create_repository(CreateRepositoryRequest {
            repository: repo("web.git"),
            default_branch: b"main".to_vec(),
            ..Default::default()
        })
        .await?;
    let mut ops = OperationServiceClient::new(ch.clone());

    // The web editor's first commit, as Rails sends it: no timestamp.
    let before = now();
    let header = UserCommitFilesRequestHeader {
        repository: repo("web.git"),
        user: user("Asia/Kolkata"),
        branch_name: b"main".to_vec(),
        commit_message: b"Add README".to_vec(),
        ..Default::default()
    };
    let update = ops
        .user_commit_files(tokio_stream::iter(commit_files(
            header,
            "README.md",
            "hello\n",
        )))
        .await?
        .into_inner()
        .branch_update
        .expect("a branch update");
    let after = now();
    assert!(update.branch_created, "{update:?}");
    let commit = update.commit_id;
    for n in &c.nodes {
        let path = n.repo("web.git");
        assert_eq!(
            git::rev(&path, "refs/heads/main").as_deref(),
            Some(commit.as_str()),
            "{}",
            n.name
        );
        let raw = git::git(&path, &["cat-file", "commit", &commit])?;
        for who in ["author", "committer"] {
            let (seconds, zone) = date_of(&raw, who);
            assert!(
                (before - 2..=after + 2).contains(&seconds),
                "{who} date {seconds} is not the router's time ({before}..{after}): {raw}"
            );
            // India keeps one offset all year.
            assert_eq!(zone, "+0530", "{raw}");
        }
    }

    // An annotated tag without a timestamp: the same for its tagger.
    let before = now();
    let tag = ops
        .user_create_tag(UserCreateTagRequest {
            repository: repo("web.git"),
            tag_name: b"v1.0".to_vec(),
            user: user("Asia/Tokyo"),
            target_revision: b"main".to_vec(),
            message: b"First release".to_vec(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .tag
        .expect("a tag");
    let after = now();
    let tagger = tag.tagger.expect("a tagger");
    assert_eq!(tagger.timezone, b"+0900");
    let seconds = tagger.date.expect("a date").seconds;
    assert!((before - 2..=after + 2).contains(&seconds), "{seconds}");
    for n in &c.nodes {
        let path = n.repo("web.git");
        assert_eq!(
            git::rev(&path, "refs/tags/v1.0").as_deref(),
            Some(tag.id.as_str()),
            "{}",
            n.name
        );
        let raw = git::git(&path, &["cat-file", "tag", &tag.id])?;
        assert_eq!(
            date_of(&raw, "tagger"),
            (seconds, "+0900".to_owned()),
            "{raw}"
        );
    }

    // A zone Gitaly could not load is refused as Gitaly refuses it, before anything
    // is written.
    let header = UserCommitFilesRequestHeader {
        repository: repo("web.git"),
        user: user("Mars/Olympus_Mons"),
        branch_name: b"main".to_vec(),
        commit_message: b"Elsewhere".to_vec(),
        ..Default::default()
    };
    let err = ops
        .user_commit_files(tokio_stream::iter(commit_files(header, "b.md", "b\n")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message()
            .contains("unknown time zone Mars/Olympus_Mons"),
        "{err:?}"
    );
    for n in &c.nodes {
        assert_eq!(
            git::rev(&n.repo("web.git"), "refs/heads/main").as_deref(),
            Some(commit.as_str())
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_refused_right_after_a_node_died_says_who_was_unreachable() -> anyhow::Result<()> {
    // A long lease: the killed node stays "live" in etcd for the whole test, so the
    // router still calls it and finds it dead only then.
    let opts = refvote_tests::node::NodeOptions {
        lease_ttl_secs: 60,
        ..Default::default()
    };
    let mut c = Fixture::nodes(3)
        .node_options(opts)
        .seeded("p.git")
        .router()
        .start()
        .await?;
    let work = c.work("w")?;
    work.commit("main", "after the failures")?;
    let before = git::rev(&c.nodes[2].repo("p.git"), "refs/heads/main");
    c.nodes[0].kill()?;
    c.nodes[1].stop()?;
    let url = c.routers[0].http_url("p.git");
    let started = std::time::Instant::now();
    let out = git::push(&work.path, std::path::Path::new(&url), &["main"], &[]).await?;
    let took = started.elapsed();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains(
            "remote: refvote: cannot write to default/p.git: not enough replicas answered: 1 of 3 answered, 2 needed; unreachable: node1 ("
        ),
        "{said}\nrouter log:\n{}",
        c.routers[0].log_tail(40)
    );
    assert!(said.contains("node2 ("), "{said}");
    assert!(
        said.contains("(no quorum: 1 of 3 answered, 2 needed)"),
        "{said}"
    );
    assert!(!said.contains("failed differently"), "{said}");
    // The dead node's lease still runs: the push did not wait for it to lapse.
    assert!(c.store.get(&c.store.keys().node("node1")).await?.is_some());
    assert!(took < Duration::from_secs(20), "the refusal took {took:?}");
    // Nothing changed on the survivor.
    assert_eq!(
        git::rev(&c.nodes[2].repo("p.git"), "refs/heads/main"),
        before
    );
    Ok(())
}
