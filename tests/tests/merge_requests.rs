//! Merge requests' writes through a real router in front of three real nodes on a real
//! etcd, made the way GitLab's client makes them (stubs generated from `proto/`),
//! checked against git itself: the merge commit of `UserMergeToRef` and of the
//! two-phase `UserMergeBranch` has the tree `git merge-tree --write-tree` computes and
//! the two tips as parents, the same commit id on all three replicas, one generation
//! more, every replica up to date. `UserMergeBranch`'s two phases: the branch moves
//! only after the client's `apply`; a client that never confirms moves nothing
//! anywhere; one that confirms after the branch moved gets Gitaly's reference-update
//! error; a conflict is Gitaly's structured conflict error before any proposal.
//! `UserFFBranch` and `UserUpdateBranch` move the branch as git would allow it.
//! `UserSquash` writes the commit `git commit-tree` writes for the range's tree (and
//! moves nothing); `UserRebaseToRef` and the two-phase `UserRebaseConfirmable` write the
//! commits `git rebase` writes with the same committer and time, on every replica.
//! The UI's `UserCherryPick` (of a merge, mainline 1) and `UserRevert` write the commit
//! `git cherry-pick -m 1` and `git revert` write; a revert that conflicts is Gitaly's
//! structured conflict error. A router killed between the two phases of a merge
//! leaves it merged on a majority or nowhere.

use std::time::Duration;

use refvote_cluster::RepoId;
use refvote_node::detail::detail_of;
use refvote_proto::gitaly::operation_service_client::OperationServiceClient;
use refvote_proto::gitaly::{
    User, UserCherryPickRequest, UserFfBranchRequest, UserMergeBranchError, UserMergeBranchRequest,
    UserMergeBranchResponse, UserMergeToRefRequest, UserRebaseConfirmableError,
    UserRebaseConfirmableRequest, UserRebaseConfirmableResponse, UserRebaseToRefRequest,
    UserRevertError, UserRevertRequest, UserSquashError, UserSquashRequest,
    UserUpdateBranchRequest, user_merge_branch_error, user_rebase_confirmable_error,
    user_rebase_confirmable_request, user_rebase_confirmable_response, user_revert_error,
    user_squash_error,
};
use refvote_tests::cluster::{Fixture, VoteCluster};
use refvote_tests::git::{self, WorkRepo};
use refvote_tests::grpc::repo;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::Channel;

const RELATIVE: &str = "group/mr.git";
/// A fixed time, so the expected commit can be rebuilt with git here.
const WHEN: i64 = 1_767_225_600; // 2026-01-01T00:00:00Z
/// How long a test waits for one answer of a merge.
const ANSWER_WAIT: Duration = Duration::from_secs(30);

fn user() -> Option<User> {
    Some(User {
        gl_id: String::new(),
        name: b"Jane Doe".to_vec(),
        email: b"jane@example.com".to_vec(),
        gl_username: "jane".into(),
        timezone: "Europe/Berlin".into(),
    })
}

fn timestamp() -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp {
        seconds: WHEN,
        nanos: 0,
    })
}

struct Setup {
    c: VoteCluster,
    ch: Channel,
    work: WorkRepo,
    repo: RepoId,
}

/// A repository with `main` and `feature` diverged from one base (different files, so
/// they merge cleanly), pushed through the router.
async fn setup() -> anyhow::Result<Setup> {
    setup_with(Fixture::nodes(3).router()).await
}

/// The same repository on the cluster `fixture` starts (its first router pushes).
async fn setup_with(fixture: Fixture) -> anyhow::Result<Setup> {
    let c = fixture.start().await?;
    let (work, _) = c.create_and_push(&c.routers[0], RELATIVE).await?;
    // `feature` branches off the base (HEAD), then `main` moves on from it.
    work.commit("feature", "feature work")?;
    work.commit("main", "main work")?;
    push(&c, &work, &["main", "feature"]).await?;
    let ch = c.routers[0].channel().await?;
    let repo = c.repo_id(RELATIVE);
    Ok(Setup { c, ch, work, repo })
}

async fn push(c: &VoteCluster, work: &WorkRepo, args: &[&str]) -> anyhow::Result<()> {
    let url = c.routers[0].http_url(RELATIVE);
    let out = git::push(&work.path, std::path::Path::new(&url), args, &[]).await?;
    anyhow::ensure!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

impl Setup {
    fn revs(&self, refname: &str) -> Vec<Option<String>> {
        self.c
            .nodes
            .iter()
            .map(|n| git::rev(&n.repo(RELATIVE), refname))
            .collect()
    }

    fn tip(&self, branch: &str) -> String {
        git::rev(&self.work.path, &format!("refs/heads/{branch}")).expect("a branch")
    }

    /// The nodes' and the router's last log lines, for a failure message.
    fn logs(&self) -> String {
        let mut out = String::new();
        for n in &self.c.nodes {
            out.push_str(&format!("--- {}\n{}\n", n.name, n.log_tail(30)));
        }
        out.push_str(&format!("--- router\n{}", self.c.routers[0].log_tail(30)));
        out
    }

    /// The next answer of `call`, within a bound.
    async fn next(
        &self,
        call: &mut MergeCall,
    ) -> anyhow::Result<Result<Option<UserMergeBranchResponse>, tonic::Status>> {
        match tokio::time::timeout(ANSWER_WAIT, call.answers.message()).await {
            Ok(answer) => Ok(answer),
            Err(_) => anyhow::bail!("no answer within {ANSWER_WAIT:?}\n{}", self.logs()),
        }
    }

    async fn generation(&self) -> anyhow::Result<u64> {
        Ok(self.c.store.repo_view(&self.repo).await?.record.generation)
    }

    async fn all_up_to_date(&self) -> anyhow::Result<bool> {
        let view = self.c.store.repo_view(&self.repo).await?;
        Ok(view.up_to_date_live().len() == 3)
    }

    /// Whether the repository has an open transaction.
    async fn open_transactions(&self) -> anyhow::Result<usize> {
        let key = self.c.store.keys().txrepo(&self.repo);
        let r = self
            .c
            .store
            .client()
            .get(key, Some(etcd_client::GetOptions::new().with_prefix()))
            .await?;
        Ok(r.kvs().len())
    }

    /// Checks that `commit` is on every replica as the merge of `ours` and `theirs`
    /// that git computes, by the request's user at the request's time.
    fn assert_merge(&self, commit: &str, parents: &[&str], theirs: &str) -> anyhow::Result<()> {
        let want_tree = git::git(
            &self.work.path,
            &["merge-tree", "--write-tree", parents[0], theirs],
        )?;
        for n in &self.c.nodes {
            let path = n.repo(RELATIVE);
            let raw = git::git(&path, &["cat-file", "commit", commit])?;
            let tree = raw.lines().next().unwrap().trim_start_matches("tree ");
            assert_eq!(tree, want_tree, "{}: {raw}", n.name);
            let got: Vec<&str> = raw
                .lines()
                .filter_map(|l| l.strip_prefix("parent "))
                .collect();
            assert_eq!(got, parents, "{}: {raw}", n.name);
            for who in ["author", "committer"] {
                let want = format!("{who} Jane Doe <jane@example.com> {WHEN} +0100");
                assert!(raw.lines().any(|l| l == want), "{}: {raw}", n.name);
            }
        }
        Ok(())
    }
}

/// A UserMergeBranch call held open: its first request sent, its answers readable.
struct MergeCall {
    send: mpsc::Sender<UserMergeBranchRequest>,
    answers: tonic::Streaming<UserMergeBranchResponse>,
}

async fn start_merge(
    s: &Setup,
    first: UserMergeBranchRequest,
) -> anyhow::Result<Result<MergeCall, tonic::Status>> {
    let (send, rx) = mpsc::channel(2);
    send.send(first).await.expect("the channel is open");
    let mut client = OperationServiceClient::new(s.ch.clone());
    let call = client.user_merge_branch(ReceiverStream::new(rx));
    let answers = match tokio::time::timeout(ANSWER_WAIT, call).await {
        Ok(Ok(r)) => r.into_inner(),
        Ok(Err(status)) => return Ok(Err(status)),
        Err(_) => anyhow::bail!(
            "the call was not answered within {ANSWER_WAIT:?}\n{}",
            s.logs()
        ),
    };
    Ok(Ok(MergeCall { send, answers }))
}

fn merge_request(branch: &str, commit: &str) -> UserMergeBranchRequest {
    UserMergeBranchRequest {
        repository: repo(RELATIVE),
        user: user(),
        commit_id: commit.into(),
        branch: branch.as_bytes().to_vec(),
        message: b"Merge branch 'feature' into 'main'\n".to_vec(),
        timestamp: timestamp(),
        ..Default::default()
    }
}

fn apply(yes: bool) -> UserMergeBranchRequest {
    UserMergeBranchRequest {
        apply: yes,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merge_to_a_merge_request_ref_is_gits_merge_on_every_replica() -> anyhow::Result<()> {
    let s = setup().await?;
    let (main, feature) = (s.tip("main"), s.tip("feature"));
    let before = s.generation().await?;
    let target = "refs/merge-requests/1/merge";
    let commit = OperationServiceClient::new(s.ch.clone())
        .user_merge_to_ref(UserMergeToRefRequest {
            repository: repo(RELATIVE),
            user: user(),
            source_sha: feature.clone(),
            target_ref: target.as_bytes().to_vec(),
            message: b"Merge feature into main".to_vec(),
            first_parent_ref: b"refs/heads/main".to_vec(),
            timestamp: timestamp(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .commit_id;
    assert_eq!(s.revs(target), vec![Some(commit.clone()); 3]);
    s.assert_merge(&commit, &[&main, &feature], &feature)?;
    // The branch itself did not move.
    assert_eq!(s.revs("refs/heads/main"), vec![Some(main.clone()); 3]);
    assert_eq!(s.generation().await?, before + 1);
    assert!(s.all_up_to_date().await?);

    // A target outside refs/merge-requests is refused as Gitaly refuses it.
    let err = OperationServiceClient::new(s.ch.clone())
        .user_merge_to_ref(UserMergeToRefRequest {
            repository: repo(RELATIVE),
            user: user(),
            source_sha: feature.clone(),
            target_ref: b"refs/heads/main".to_vec(),
            message: b"no".to_vec(),
            first_parent_ref: b"refs/heads/main".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(err.message(), "invalid target ref");
    assert_eq!(s.generation().await?, before + 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_phase_merge_moves_the_branch_only_once_the_client_applies_it() -> anyhow::Result<()>
{
    let s = setup().await?;
    let (main, feature) = (s.tip("main"), s.tip("feature"));
    let before = s.generation().await?;
    let mut call = start_merge(&s, merge_request("main", &feature)).await??;
    let proposal = s.next(&mut call).await??.expect("a first answer");
    let commit = proposal.commit_id;
    assert_eq!(commit.len(), 40, "{commit:?}");
    assert!(proposal.branch_update.is_none());
    // Proposed, not applied: the branch has not moved anywhere.
    assert_eq!(s.revs("refs/heads/main"), vec![Some(main.clone()); 3]);
    call.send.send(apply(true)).await?;
    let done = s.next(&mut call).await??.expect("a second answer");
    let update = done.branch_update.expect("a branch update");
    assert_eq!(update.commit_id, commit);
    assert!(!update.branch_created && !update.repo_created);
    assert!(s.next(&mut call).await??.is_none());
    assert_eq!(s.revs("refs/heads/main"), vec![Some(commit.clone()); 3]);
    s.assert_merge(&commit, &[&main, &feature], &feature)?;
    assert_eq!(s.generation().await?, before + 1);
    assert!(s.all_up_to_date().await?);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merge_the_client_never_confirms_moves_nothing_anywhere() -> anyhow::Result<()> {
    let s = setup().await?;
    let (main, feature) = (s.tip("main"), s.tip("feature"));
    let before = s.generation().await?;

    // The client says no: Gitaly's answer, nothing moved.
    let mut call = start_merge(&s, merge_request("main", &feature)).await??;
    s.next(&mut call).await??.expect("a proposal");
    call.send.send(apply(false)).await?;
    let err = s.next(&mut call).await?.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(err.message(), "merge aborted by client");

    // The client goes away after the proposal, never confirming.
    let mut call = start_merge(&s, merge_request("main", &feature)).await??;
    s.next(&mut call).await??.expect("a proposal");
    drop(call);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while s.open_transactions().await? > 0 {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the abandoned merge's transaction never ended"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(s.revs("refs/heads/main"), vec![Some(main.clone()); 3]);
    assert_eq!(s.generation().await?, before);
    assert!(s.all_up_to_date().await?);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merge_confirmed_after_the_branch_moved_gets_gitalys_reference_error()
-> anyhow::Result<()> {
    let s = setup().await?;
    let feature = s.tip("feature");
    let mut call = start_merge(&s, merge_request("main", &feature)).await??;
    let proposal = s.next(&mut call).await??.expect("a proposal").commit_id;
    // Someone pushes to main meanwhile.
    let moved = s.work.commit("main", "pushed meanwhile")?;
    push(&s.c, &s.work, &["main"]).await?;
    let before = s.generation().await?;
    call.send.send(apply(true)).await?;
    let err = s.next(&mut call).await?.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let detail: UserMergeBranchError =
        detail_of(&err, "gitaly.UserMergeBranchError").expect("a UserMergeBranchError");
    let Some(user_merge_branch_error::Error::ReferenceUpdate(r)) = detail.error else {
        panic!("{detail:?}")
    };
    assert_eq!(r.reference_name, b"refs/heads/main");
    assert_eq!(r.new_oid, proposal);
    assert_eq!(s.revs("refs/heads/main"), vec![Some(moved); 3]);
    assert_eq!(s.generation().await?, before);
    assert!(s.all_up_to_date().await?);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflicting_merge_is_gitalys_conflict_error_and_proposes_nothing() -> anyhow::Result<()>
{
    let s = setup().await?;
    // The same file changed both ways on two branches.
    let (left, right) = s.conflicting().await?;
    let before = s.generation().await?;
    let err = match start_merge(&s, merge_request("left", &right)).await? {
        Err(e) => e,
        Ok(mut call) => s.next(&mut call).await?.unwrap_err(),
    };
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let detail: UserMergeBranchError =
        detail_of(&err, "gitaly.UserMergeBranchError").expect("a UserMergeBranchError");
    let Some(user_merge_branch_error::Error::MergeConflict(m)) = detail.error else {
        panic!("{detail:?}")
    };
    assert_eq!(m.conflicting_files, vec![b"shared.txt".to_vec()]);
    assert_eq!(m.conflicting_commit_ids, vec![left.clone(), right]);
    assert_eq!(s.revs("refs/heads/left"), vec![Some(left); 3]);
    assert_eq!(s.generation().await?, before);
    assert!(s.all_up_to_date().await?);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_forwards_and_branch_updates_move_the_branch_as_git_allows() -> anyhow::Result<()> {
    let s = setup().await?;
    let (main, feature) = (s.tip("main"), s.tip("feature"));
    let mut ops = OperationServiceClient::new(s.ch.clone());
    // feature is no descendant of main: no fast-forward.
    let err = ops
        .user_ff_branch(UserFfBranchRequest {
            repository: repo(RELATIVE),
            user: user(),
            commit_id: feature.clone(),
            branch: b"main".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(err.message(), "not fast forward");
    assert_eq!(s.revs("refs/heads/main"), vec![Some(main.clone()); 3]);

    // A descendant of main is one.
    let ahead = s.work.commit("ahead", "ahead of main")?;
    push(&s.c, &s.work, &["ahead"]).await?;
    assert_eq!(
        git::git(&s.work.path, &["rev-parse", &format!("{ahead}~1")])?,
        main
    );
    let before = s.generation().await?;
    let update = ops
        .user_ff_branch(UserFfBranchRequest {
            repository: repo(RELATIVE),
            user: user(),
            commit_id: ahead.clone(),
            branch: b"main".to_vec(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .branch_update
        .expect("a branch update");
    assert_eq!(update.commit_id, ahead);
    assert_eq!(s.revs("refs/heads/main"), vec![Some(ahead.clone()); 3]);
    assert_eq!(s.generation().await?, before + 1);

    // UserUpdateBranch moves it anywhere, given where it is now.
    ops.user_update_branch(UserUpdateBranchRequest {
        repository: repo(RELATIVE),
        branch_name: b"main".to_vec(),
        user: user(),
        newrev: feature.clone().into_bytes(),
        oldrev: ahead.clone().into_bytes(),
    })
    .await?;
    assert_eq!(s.revs("refs/heads/main"), vec![Some(feature.clone()); 3]);
    assert_eq!(s.generation().await?, before + 2);
    // ...and not from where it is not.
    let err = ops
        .user_update_branch(UserUpdateBranchRequest {
            repository: repo(RELATIVE),
            branch_name: b"main".to_vec(),
            user: user(),
            newrev: main.clone().into_bytes(),
            oldrev: ahead.into_bytes(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(
        err.message(),
        "Could not update refs/heads/main. Please refresh and try again."
    );
    assert_eq!(s.revs("refs/heads/main"), vec![Some(feature); 3]);
    assert_eq!(s.generation().await?, before + 2);
    assert!(s.all_up_to_date().await?);
    Ok(())
}

/// Runs git in `dir` as the request's user commits at the request's time (Europe/Berlin
/// is +0100 in January), with the work repository's own author otherwise kept.
fn git_as_committer(dir: &std::path::Path, args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new("git")
        .current_dir(dir)
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", dir)
        .env("GIT_COMMITTER_NAME", "Jane Doe")
        .env("GIT_COMMITTER_EMAIL", "jane@example.com")
        .env("GIT_COMMITTER_DATE", format!("@{WHEN} +0100"))
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

impl Setup {
    /// The tip `git rebase` makes of `branch` onto `onto` in the work repository, with
    /// the request's committer and time (on a scratch branch; `branch` stays).
    fn git_rebase(&self, onto: &str, branch: &str) -> anyhow::Result<String> {
        git::git(
            &self.work.path,
            &["checkout", "--quiet", "-B", "scratch", branch],
        )?;
        git_as_committer(&self.work.path, &["rebase", "--quiet", onto])?;
        let tip = git::git(&self.work.path, &["rev-parse", "HEAD"])?;
        git::git(&self.work.path, &["checkout", "--quiet", "main"])?;
        Ok(tip)
    }

    /// Every replica holds `commit` with the same bytes as the work repository.
    fn assert_same_commit_everywhere(&self, commit: &str) -> anyhow::Result<()> {
        let want = git::git(&self.work.path, &["cat-file", "commit", commit])?;
        for n in &self.c.nodes {
            let got = git::git(&n.repo(RELATIVE), &["cat-file", "commit", commit])?;
            assert_eq!(got, want, "{}", n.name);
        }
        Ok(())
    }

    /// Two branches off main that change `shared.txt` two ways, pushed.
    async fn conflicting(&self) -> anyhow::Result<(String, String)> {
        for (branch, content) in [("left", "left\n"), ("right", "right\n")] {
            git::git(
                &self.work.path,
                &["checkout", "--quiet", "-B", branch, "main"],
            )?;
            std::fs::write(self.work.path.join("shared.txt"), content)?;
            git::git(&self.work.path, &["add", "shared.txt"])?;
            git::git(&self.work.path, &["commit", "--quiet", "-m", branch])?;
        }
        git::git(&self.work.path, &["checkout", "--quiet", "main"])?;
        push(&self.c, &self.work, &["left", "right"]).await?;
        Ok((self.tip("left"), self.tip("right")))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_squash_is_the_commit_git_writes_for_the_range_on_every_replica() -> anyhow::Result<()> {
    let s = setup().await?;
    // feature gets a second commit: the range base..feature is two commits.
    s.work.commit("feature", "more feature work")?;
    push(&s.c, &s.work, &["feature"]).await?;
    let feature = s.tip("feature");
    let start = git::git(&s.work.path, &["merge-base", "main", "feature"])?;
    let before = s.generation().await?;
    let refs_before: Vec<String> =
        s.c.nodes
            .iter()
            .map(|n| git::refs(&n.repo(RELATIVE)))
            .collect();
    let author = User {
        gl_id: String::new(),
        name: b"Ann Author".to_vec(),
        email: b"ann@example.com".to_vec(),
        gl_username: "ann".into(),
        timezone: "America/New_York".into(),
    };
    let squash = OperationServiceClient::new(s.ch.clone())
        .user_squash(UserSquashRequest {
            repository: repo(RELATIVE),
            user: user(),
            start_sha: start.clone(),
            end_sha: feature.clone(),
            author: Some(author.clone()),
            commit_message: b"Squashed feature".to_vec(),
            timestamp: timestamp(),
            sign: false,
        })
        .await?
        .into_inner()
        .squash_sha;
    // git itself: the end's tree on the start, the author in their zone (-0500 in
    // January), the user committing in theirs, the message ended by a newline.
    let tree = git::git(&s.work.path, &["rev-parse", &format!("{feature}^{{tree}}")])?;
    let out = std::process::Command::new("git")
        .current_dir(&s.work.path)
        .args(["commit-tree", &tree, "-p", &start, "-m", "Squashed feature"])
        .env("GIT_AUTHOR_NAME", "Ann Author")
        .env("GIT_AUTHOR_EMAIL", "ann@example.com")
        .env("GIT_AUTHOR_DATE", format!("@{WHEN} -0500"))
        .env("GIT_COMMITTER_NAME", "Jane Doe")
        .env("GIT_COMMITTER_EMAIL", "jane@example.com")
        .env("GIT_COMMITTER_DATE", format!("@{WHEN} +0100"))
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert_eq!(squash, want);
    s.assert_same_commit_everywhere(&squash)?;
    // A squash moves no ref: nothing committed, no generation more, no one outdated.
    let refs_after: Vec<String> =
        s.c.nodes
            .iter()
            .map(|n| git::refs(&n.repo(RELATIVE)))
            .collect();
    assert_eq!(refs_after, refs_before);
    assert_eq!(s.generation().await?, before);
    assert!(s.all_up_to_date().await?);

    // A revision that names nothing: Gitaly's structured error naming it.
    let err = OperationServiceClient::new(s.ch.clone())
        .user_squash(UserSquashRequest {
            repository: repo(RELATIVE),
            user: user(),
            start_sha: "no-such-branch".into(),
            end_sha: feature.clone(),
            author: Some(author),
            commit_message: b"Squashed".to_vec(),
            timestamp: timestamp(),
            sign: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let detail: UserSquashError =
        detail_of(&err, "gitaly.UserSquashError").expect("a UserSquashError");
    let Some(user_squash_error::Error::ResolveRevision(r)) = detail.error else {
        panic!("{detail:?}")
    };
    assert_eq!(r.revision, b"no-such-branch");
    assert!(s.all_up_to_date().await?);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebase_to_a_merge_request_ref_is_gits_rebase_on_every_replica() -> anyhow::Result<()> {
    let s = setup().await?;
    s.work.commit("feature", "more feature work")?;
    push(&s.c, &s.work, &["feature"]).await?;
    let (main, feature) = (s.tip("main"), s.tip("feature"));
    let want = s.git_rebase("main", "feature")?;
    let before = s.generation().await?;
    let target = "refs/merge-requests/1/train";
    let commit = OperationServiceClient::new(s.ch.clone())
        .user_rebase_to_ref(UserRebaseToRefRequest {
            repository: repo(RELATIVE),
            user: user(),
            source_sha: feature.clone(),
            target_ref: target.as_bytes().to_vec(),
            first_parent_ref: b"refs/heads/main".to_vec(),
            timestamp: timestamp(),
            expected_old_oid: String::new(),
        })
        .await?
        .into_inner()
        .commit_id;
    assert_eq!(commit, want);
    assert_eq!(
        git::git(&s.work.path, &["rev-parse", &format!("{commit}~2")])?,
        main
    );
    assert_eq!(s.revs(target), vec![Some(commit.clone()); 3]);
    s.assert_same_commit_everywhere(&commit)?;
    s.assert_same_commit_everywhere(&format!("{commit}~1"))?;
    // The branches did not move.
    assert_eq!(s.revs("refs/heads/feature"), vec![Some(feature); 3]);
    assert_eq!(s.generation().await?, before + 1);
    assert!(s.all_up_to_date().await?);

    // A conflict: Gitaly's words, nothing written.
    let (left, right) = s.conflicting().await?;
    let before = s.generation().await?;
    let err = OperationServiceClient::new(s.ch.clone())
        .user_rebase_to_ref(UserRebaseToRefRequest {
            repository: repo(RELATIVE),
            user: user(),
            source_sha: right.clone(),
            target_ref: b"refs/merge-requests/2/train".to_vec(),
            first_parent_ref: b"refs/heads/left".to_vec(),
            timestamp: timestamp(),
            expected_old_oid: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(
        err.message(),
        format!(
            "failed to rebase {right} on {left} while preparing refs/merge-requests/2/train due to conflict"
        )
    );
    assert_eq!(s.revs("refs/merge-requests/2/train"), vec![None; 3]);
    assert_eq!(s.generation().await?, before);
    assert!(s.all_up_to_date().await?);
    Ok(())
}

/// A UserRebaseConfirmable call held open.
struct RebaseCall {
    send: mpsc::Sender<UserRebaseConfirmableRequest>,
    answers: tonic::Streaming<UserRebaseConfirmableResponse>,
}

fn rebase_header(branch: &str, branch_sha: &str, onto: &str) -> UserRebaseConfirmableRequest {
    use user_rebase_confirmable_request::{Header, UserRebaseConfirmableRequestPayload as P};
    UserRebaseConfirmableRequest {
        user_rebase_confirmable_request_payload: Some(P::Header(Header {
            repository: repo(RELATIVE),
            user: user(),
            rebase_id: "1".into(),
            branch: branch.as_bytes().to_vec(),
            branch_sha: branch_sha.into(),
            remote_repository: repo(RELATIVE),
            remote_branch: onto.as_bytes().to_vec(),
            git_push_options: Vec::new(),
            timestamp: timestamp(),
        })),
    }
}

fn rebase_apply(yes: bool) -> UserRebaseConfirmableRequest {
    UserRebaseConfirmableRequest {
        user_rebase_confirmable_request_payload: Some(
            user_rebase_confirmable_request::UserRebaseConfirmableRequestPayload::Apply(yes),
        ),
    }
}

impl Setup {
    async fn start_rebase(
        &self,
        first: UserRebaseConfirmableRequest,
    ) -> anyhow::Result<Result<RebaseCall, tonic::Status>> {
        let (send, rx) = mpsc::channel(2);
        send.send(first).await.expect("the channel is open");
        let mut client = OperationServiceClient::new(self.ch.clone());
        let call = client.user_rebase_confirmable(ReceiverStream::new(rx));
        match tokio::time::timeout(ANSWER_WAIT, call).await {
            Ok(Ok(r)) => Ok(Ok(RebaseCall {
                send,
                answers: r.into_inner(),
            })),
            Ok(Err(status)) => Ok(Err(status)),
            Err(_) => anyhow::bail!("no answer within {ANSWER_WAIT:?}\n{}", self.logs()),
        }
    }

    async fn next_rebase(
        &self,
        call: &mut RebaseCall,
    ) -> anyhow::Result<Result<Option<UserRebaseConfirmableResponse>, tonic::Status>> {
        match tokio::time::timeout(ANSWER_WAIT, call.answers.message()).await {
            Ok(answer) => Ok(answer),
            Err(_) => anyhow::bail!("no answer within {ANSWER_WAIT:?}\n{}", self.logs()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_phase_rebase_moves_the_branch_only_once_the_client_applies_it() -> anyhow::Result<()>
{
    use user_rebase_confirmable_response::UserRebaseConfirmableResponsePayload as A;
    let s = setup().await?;
    let (main, feature) = (s.tip("main"), s.tip("feature"));
    let want = s.git_rebase("main", "feature")?;
    let before = s.generation().await?;

    // Proposed, then declined: nothing moves.
    let mut call = s
        .start_rebase(rebase_header("feature", &feature, "main"))
        .await??;
    let proposal = s.next_rebase(&mut call).await??.expect("a proposal");
    assert_eq!(
        proposal.user_rebase_confirmable_response_payload,
        Some(A::RebaseSha(want.clone()))
    );
    call.send.send(rebase_apply(false)).await?;
    let err = s.next_rebase(&mut call).await?.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(err.message(), "rebase aborted by client");
    assert_eq!(s.revs("refs/heads/feature"), vec![Some(feature.clone()); 3]);
    assert_eq!(s.generation().await?, before);

    // Proposed, then applied: the branch moves on every replica, once.
    let mut call = s
        .start_rebase(rebase_header("feature", &feature, "main"))
        .await??;
    let proposal = s.next_rebase(&mut call).await??.expect("a proposal");
    assert_eq!(
        proposal.user_rebase_confirmable_response_payload,
        Some(A::RebaseSha(want.clone()))
    );
    assert_eq!(s.revs("refs/heads/feature"), vec![Some(feature.clone()); 3]);
    call.send.send(rebase_apply(true)).await?;
    let done = s.next_rebase(&mut call).await??.expect("a second answer");
    assert_eq!(
        done.user_rebase_confirmable_response_payload,
        Some(A::RebaseApplied(true))
    );
    assert!(s.next_rebase(&mut call).await??.is_none());
    assert_eq!(s.revs("refs/heads/feature"), vec![Some(want.clone()); 3]);
    s.assert_same_commit_everywhere(&want)?;
    assert_eq!(
        git::git(&s.work.path, &["rev-parse", &format!("{want}~1")])?,
        main
    );
    assert_eq!(s.generation().await?, before + 1);
    assert!(s.all_up_to_date().await?);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflicting_rebase_is_gitalys_conflict_error_and_proposes_nothing() -> anyhow::Result<()>
{
    let s = setup().await?;
    let (left, right) = s.conflicting().await?;
    let before = s.generation().await?;
    let err = match s
        .start_rebase(rebase_header("right", &right, "left"))
        .await?
    {
        Err(e) => e,
        Ok(mut call) => s.next_rebase(&mut call).await?.unwrap_err(),
    };
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let detail: UserRebaseConfirmableError =
        detail_of(&err, "gitaly.UserRebaseConfirmableError").expect("a UserRebaseConfirmableError");
    let Some(user_rebase_confirmable_error::Error::RebaseConflict(m)) = detail.error else {
        panic!("{detail:?}")
    };
    assert_eq!(m.conflicting_files, vec![b"shared.txt".to_vec()]);
    assert_eq!(m.conflicting_commit_ids, vec![left, right.clone()]);
    assert_eq!(s.revs("refs/heads/right"), vec![Some(right); 3]);
    assert_eq!(s.generation().await?, before);
    assert!(s.all_up_to_date().await?);
    Ok(())
}

/// Runs git in `dir` as the request's user authors and commits at the request's time.
fn git_as_user(dir: &std::path::Path, args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new("git")
        .current_dir(dir)
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", dir)
        .env("GIT_AUTHOR_NAME", "Jane Doe")
        .env("GIT_AUTHOR_EMAIL", "jane@example.com")
        .env("GIT_AUTHOR_DATE", format!("@{WHEN} +0100"))
        .env("GIT_COMMITTER_NAME", "Jane Doe")
        .env("GIT_COMMITTER_EMAIL", "jane@example.com")
        .env("GIT_COMMITTER_DATE", format!("@{WHEN} +0100"))
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn commit_of(id: &str) -> Option<refvote_proto::gitaly::GitCommit> {
    Some(refvote_proto::gitaly::GitCommit {
        id: id.into(),
        ..Default::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cherry_pick_of_a_merge_is_gits_cherry_pick_with_mainline_one() -> anyhow::Result<()> {
    let s = setup().await?;
    let w = &s.work.path;
    // A merge of feature into main, and a target branch off the common base.
    git::git(w, &["checkout", "--quiet", "-B", "merged", "main"])?;
    git::git(
        w,
        &[
            "merge",
            "--quiet",
            "--no-ff",
            "-m",
            "Merge feature",
            "feature",
        ],
    )?;
    let merge = git::git(w, &["rev-parse", "HEAD"])?;
    let base = git::git(w, &["merge-base", "main", "feature"])?;
    git::git(w, &["checkout", "--quiet", "-B", "target", &base])?;
    s.work.commit("target", "target work")?;
    push(&s.c, &s.work, &["merged", "target"]).await?;
    let target = s.tip("target");
    // git itself: the merge's changes against its first parent, its author kept.
    git::git(w, &["checkout", "--quiet", "-B", "scratch", "target"])?;
    git_as_committer(w, &["cherry-pick", "-m", "1", &merge])?;
    let want = git::git(w, &["rev-parse", "HEAD"])?;
    let message = git::git(w, &["log", "-1", "--format=%B", &merge])? + "\n";
    git::git(w, &["checkout", "--quiet", "main"])?;
    let before = s.generation().await?;
    let update = OperationServiceClient::new(s.ch.clone())
        .user_cherry_pick(UserCherryPickRequest {
            repository: repo(RELATIVE),
            user: user(),
            commit: commit_of(&merge),
            branch_name: b"target".to_vec(),
            message: message.into_bytes(),
            timestamp: timestamp(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .branch_update
        .expect("a branch update");
    assert_eq!(update.commit_id, want);
    assert!(!update.branch_created && !update.repo_created);
    assert_eq!(git::git(w, &["rev-parse", &format!("{want}~1")])?, target);
    assert_eq!(s.revs("refs/heads/target"), vec![Some(want.clone()); 3]);
    s.assert_same_commit_everywhere(&want)?;
    assert_eq!(s.generation().await?, before + 1);
    assert!(s.all_up_to_date().await?);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revert_is_gits_revert_and_a_conflicting_one_gitalys_conflict_error() -> anyhow::Result<()>
{
    let s = setup().await?;
    let w = &s.work.path;
    let feature = s.tip("feature");
    // git itself: the revert of feature's tip on feature, by the user.
    git::git(w, &["checkout", "--quiet", "-B", "scratch", "feature"])?;
    git_as_user(w, &["revert", "--no-edit", &feature])?;
    let want = git::git(w, &["rev-parse", "HEAD"])?;
    let message = git::git(w, &["log", "-1", "--format=%B", &want])? + "\n";
    git::git(w, &["checkout", "--quiet", "main"])?;
    let before = s.generation().await?;
    let revert = |branch: &str, commit: &str, message: &str| UserRevertRequest {
        repository: repo(RELATIVE),
        user: user(),
        commit: commit_of(commit),
        branch_name: branch.as_bytes().to_vec(),
        message: message.as_bytes().to_vec(),
        timestamp: timestamp(),
        ..Default::default()
    };
    let update = OperationServiceClient::new(s.ch.clone())
        .user_revert(revert("feature", &feature, &message))
        .await?
        .into_inner()
        .branch_update
        .expect("a branch update");
    assert_eq!(update.commit_id, want);
    assert_eq!(s.revs("refs/heads/feature"), vec![Some(want.clone()); 3]);
    s.assert_same_commit_everywhere(&want)?;
    assert_eq!(s.generation().await?, before + 1);

    // A change that a later commit built on: its revert conflicts.
    git::git(w, &["checkout", "--quiet", "-B", "later", "main"])?;
    for content in ["one\n", "two\n"] {
        std::fs::write(w.join("shared.txt"), content)?;
        git::git(w, &["add", "shared.txt"])?;
        git::git(w, &["commit", "--quiet", "-m", content.trim()])?;
    }
    let first = git::git(w, &["rev-parse", "HEAD~1"])?;
    git::git(w, &["checkout", "--quiet", "main"])?;
    push(&s.c, &s.work, &["later"]).await?;
    let later = s.tip("later");
    let before = s.generation().await?;
    let err = OperationServiceClient::new(s.ch.clone())
        .user_revert(revert("later", &first, "Revert \"one\"\n"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(err.message(), "revert: there are conflicting files");
    let detail: UserRevertError =
        detail_of(&err, "gitaly.UserRevertError").expect("a UserRevertError");
    let Some(user_revert_error::Error::MergeConflict(m)) = detail.error else {
        panic!("{detail:?}")
    };
    assert_eq!(m.conflicting_files, vec![b"shared.txt".to_vec()]);
    assert_eq!(s.revs("refs/heads/later"), vec![Some(later); 3]);
    assert_eq!(s.generation().await?, before);
    assert!(s.all_up_to_date().await?);
    Ok(())
}

impl Setup {
    /// Waits (bounded) until the repository has no open transaction: the killed
    /// router's are reaped by another.
    async fn settled(&self) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while self.open_transactions().await? > 0 {
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "the killed router's transaction was never reaped\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_killed_between_a_merges_phases_leaves_it_on_a_majority_or_nowhere()
-> anyhow::Result<()> {
    let mut s = setup_with(Fixture::nodes(3).router().router().router()).await?;
    let (main, feature) = (s.tip("main"), s.tip("feature"));
    let before = s.generation().await?;

    // Killed after the proposal, before the client applies: nowhere.
    let mut call = start_merge(&s, merge_request("main", &feature)).await??;
    s.next(&mut call).await??.expect("a proposal");
    s.c.routers[0].kill()?;
    drop(call);
    s.settled().await?;
    assert_eq!(s.revs("refs/heads/main"), vec![Some(main.clone()); 3]);
    assert_eq!(s.generation().await?, before);

    // Killed right after the client applied: merged on a majority or nowhere, and
    // every replica the cluster calls up to date holds what the majority holds.
    s.ch = s.c.routers[1].channel().await?;
    let mut call = start_merge(&s, merge_request("main", &feature)).await??;
    let proposal = s.next(&mut call).await??.expect("a proposal").commit_id;
    call.send.send(apply(true)).await?;
    s.c.routers[1].kill()?;
    drop(call);
    s.settled().await?;
    let revs = s.revs("refs/heads/main");
    let merged = revs
        .iter()
        .filter(|r| **r == Some(proposal.clone()))
        .count();
    let view = s.c.store.repo_view(&s.repo).await?;
    if merged >= 2 {
        assert_eq!(view.record.generation, before + 1, "{revs:?}");
    } else {
        assert_eq!(view.record.generation, before, "{revs:?}");
    }
    eprintln!(
        "router killed after apply: merged on {merged} of 3 replicas, up to date: {:?}",
        view.up_to_date_live()
    );
    let majority = if merged >= 2 {
        Some(proposal)
    } else {
        Some(main)
    };
    for (i, n) in s.c.nodes.iter().enumerate() {
        if view.up_to_date_live().contains(&n.name) {
            assert_eq!(revs[i], majority, "{} is up to date: {revs:?}", n.name);
        }
    }
    assert!(
        view.up_to_date_live().len() >= 2,
        "{:?}",
        view.up_to_date_live()
    );
    Ok(())
}
