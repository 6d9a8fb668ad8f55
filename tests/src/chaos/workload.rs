//! The workload: writers pushing real commits with real `git` over smart HTTP through
//! both routers (most to their own branch, some racing with `--force` on one shared
//! branch, some creating and deleting a branch), and readers asking both routers for a
//! branch with gRPC `FindBranch`, and a gRPC writer using the voted mutators
//! `UserCreateBranch`/`UserDeleteBranch`, `UserCommitFiles`, `UpdateReferences` and
//! `DeleteRefs`. Every operation goes into the [`History`].
//!
//! Writers are threads (git runs as a child process with a deadline); readers are
//! tasks. Both stop when `stop` is set, within one operation's deadline.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use refvote_proto::gitaly::operation_service_client::OperationServiceClient;
use refvote_proto::gitaly::ref_service_client::RefServiceClient;
use refvote_proto::gitaly::{
    FindBranchRequest, Repository, User, UserCreateBranchRequest, UserDeleteBranchRequest,
};
use tonic::transport::Channel;

use super::history::{History, Op, OpKind, Outcome};
use super::rng::Rng;
use crate::git::WorkRepo;

/// The relative path every workload client uses.
pub const REPO: &str = "chaos/project.git";

/// The workload's repository as clients name it.
pub fn repository() -> Repository {
    Repository {
        storage_name: "default".into(),
        relative_path: REPO.into(),
        ..Default::default()
    }
}

/// The branch writers race on.
pub const RACE: &str = "race";

/// A push that takes longer than this is abandoned (killed) and recorded as unknown.
const PUSH_DEADLINE: Duration = Duration::from_secs(30);
/// A read that takes longer than this is abandoned.
const READ_DEADLINE: Duration = Duration::from_secs(10);

/// Runs writer `k` until `stop`: pushes through `urls[r]` (one git smart HTTP base per
/// router, e.g. `http://127.0.0.1:1234/chaos/project.git`).
pub fn writer(
    k: usize,
    work_dir: PathBuf,
    urls: Vec<String>,
    history: Arc<History>,
    stop: Arc<AtomicBool>,
    seed: u64,
) -> anyhow::Result<()> {
    let work = WorkRepo::new(&work_dir)?;
    let mut rng = Rng::new(seed ^ (k as u64 + 1).wrapping_mul(0x2545_F491_4F6C_DD1D));
    let own = format!("w{k}");
    let client = format!("writer{k}");
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) && i < 100_000 {
        i += 1;
        let router = (k + i) % urls.len();
        let url = &urls[router];
        let roll = rng.below(100);
        if roll < 12 {
            // Race on one branch with every other writer.
            let oid = work.commit(&format!("race-{own}"), &format!("{client} race {i}"))?;
            let op = push(
                &work.path,
                url,
                &["--force", "HEAD:refs/heads/race"],
                &history,
            );
            history.record(Op {
                client: client.clone(),
                router,
                kind: OpKind::Push,
                branch: RACE.into(),
                value: Some(oid),
                ..op
            });
        } else if roll < 20 {
            // A short-lived branch: created at this writer's tip, then deleted.
            let name = format!("t-{own}-{i}");
            let Some(tip) = crate::git::rev(&work.path, &format!("refs/heads/{own}")) else {
                continue;
            };
            let op = push(
                &work.path,
                url,
                &[&format!("{tip}:refs/heads/{name}")],
                &history,
            );
            history.record(Op {
                client: client.clone(),
                router,
                kind: OpKind::Push,
                branch: name.clone(),
                value: Some(tip),
                ..op
            });
            let op = push(&work.path, url, &[&format!(":refs/heads/{name}")], &history);
            history.record(Op {
                client: client.clone(),
                router,
                kind: OpKind::Delete,
                branch: name,
                value: None,
                ..op
            });
        } else {
            let oid = work.commit(&own, &format!("{client} commit {i}"))?;
            let op = push(
                &work.path,
                url,
                &[&format!("HEAD:refs/heads/{own}")],
                &history,
            );
            history.record(Op {
                client: client.clone(),
                router,
                kind: OpKind::Push,
                branch: own.clone(),
                value: Some(oid),
                ..op
            });
        }
    }
    Ok(())
}

/// One `git push`, timed and classified. The caller fills in who and what.
fn push(work: &Path, url: &str, refspecs: &[&str], history: &History) -> Op {
    let start = history.now();
    let (outcome, detail) = match run_git_push(work, url, refspecs) {
        Ok((true, _)) => (Outcome::Ack, String::new()),
        Ok((false, text)) => classify(&text),
        Err(e) => (Outcome::Unknown, format!("{e:#}")),
    };
    Op {
        client: String::new(),
        router: 0,
        kind: OpKind::Push,
        branch: String::new(),
        value: None,
        start,
        end: history.now(),
        outcome,
        detail,
    }
}

/// What a failed push's output says about whether the update can exist anywhere.
pub fn classify(text: &str) -> (Outcome, String) {
    let line = ["refvote:", "rejected", "fatal", "error"]
        .iter()
        .find_map(|w| text.lines().find(|l| l.contains(w)))
        .unwrap_or_else(|| text.lines().last().unwrap_or(""))
        .trim()
        .to_owned();
    // Definite: the vote aborted (the hook's line: the abort is a durable decision),
    // the router refused before creating the transaction (no quorum, a locked
    // repository), or git itself refused before sending anything. Every other refusal
    // (`[remote rejected] … (cluster unavailable, retry)`, a broken connection, an
    // HTTP error) may have committed somewhere.
    let definite = (text.contains("update rejected:") && text.contains("replicas agreed"))
        || text.contains("(no quorum:")
        || text.contains("is locked by")
        || text.contains(" ! [rejected]");
    if definite && !text.contains("outcome unknown") {
        (Outcome::Failed, line)
    } else {
        (Outcome::Unknown, line)
    }
}

/// Runs `git push --porcelain url refspecs...` with a deadline. Returns whether git
/// succeeded and its combined output.
fn run_git_push(work: &Path, url: &str, refspecs: &[&str]) -> anyhow::Result<(bool, String)> {
    let out_path = work.join(".git").join("push-output");
    let out = std::fs::File::create(&out_path)?;
    let mut child = Command::new("git")
        .current_dir(work)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_TERMINAL_PROMPT", "0")
        .args(["push", "--porcelain", url])
        .args(refspecs)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()?;
    let deadline = Instant::now() + PUSH_DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let text = String::from_utf8_lossy(&std::fs::read(&out_path)?).into_owned();
    match status {
        Some(s) => Ok((s.success(), text)),
        None => anyhow::bail!("push timed out after {PUSH_DEADLINE:?}"),
    }
}

/// What a refused gRPC write says about whether it can exist anywhere. Definite: a
/// refusal before the transaction began (no quorum, a locked repository), and a ref's
/// expected old value not holding (`UpdateReferences`: every replica refuses it before
/// git runs, and the router passes a node's refusal on only when nothing committed).
/// Not definite: "changed nothing" (a replica that applied the update and crashed
/// before confirming it is only marked outdated), and everything else.
pub fn classify_status(status: &tonic::Status) -> (Outcome, String) {
    let detail = format!("{:?}: {}", status.code(), status.message());
    let m = status.message();
    if m.contains("not enough replicas are up to date")
        || m.contains("is locked by")
        || (status.code() == tonic::Code::Aborted
            && m.starts_with("reference does not point to expected object"))
    {
        (Outcome::Failed, detail)
    } else {
        (Outcome::Unknown, detail)
    }
}

fn user() -> Option<User> {
    Some(User {
        gl_id: "user-chaos".into(),
        name: b"Chaos Writer".to_vec(),
        email: b"chaos@refvote.invalid".to_vec(),
        gl_username: "chaos".into(),
        timezone: "UTC".into(),
    })
}

/// The gRPC writer's own branch: a linear history of `UserCommitFiles` commits.
pub const GRPC_BRANCH: &str = "wg";
/// Prefix of the branches the gRPC writer moves with `UpdateReferences`/`DeleteRefs`.
pub const UPDATE_PREFIX: &str = "u-";

/// What a gRPC write's answer (or its absence) says: the outcome, the response if there
/// was one, and the error.
fn grpc_outcome<T>(
    result: Result<Result<tonic::Response<T>, tonic::Status>, tokio::time::error::Elapsed>,
) -> (Outcome, Option<T>, String) {
    match result {
        Ok(Ok(resp)) => (Outcome::Ack, Some(resp.into_inner()), String::new()),
        Ok(Err(status)) => {
            let (o, d) = classify_status(&status);
            (o, None, d)
        }
        Err(_) => (Outcome::Unknown, None, "timed out".into()),
    }
}

/// Runs the gRPC writer until `stop`, through alternating routers, in turn:
/// - creates a branch at writer 0's branch with `UserCreateBranch`, then deletes it with
///   `UserDeleteBranch` (expecting the value it was created at, when known);
/// - commits a new file to [`GRPC_BRANCH`] with `UserCommitFiles`;
/// - on a fresh branch `u-g-<i>`: creates it with `UpdateReferences` (must not exist
///   yet), moves it with a wrong expected old value (must be refused and invisible),
///   moves it with the right one, and deletes it with `DeleteRefs`.
pub async fn grpc_writer(channels: Vec<Channel>, history: Arc<History>, stop: Arc<AtomicBool>) {
    let mut i = 0usize;
    // The last two acknowledged commits of GRPC_BRANCH: objects every replica has.
    let mut commits: Vec<String> = Vec::new();
    while !stop.load(Ordering::Relaxed) && i < 100_000 {
        i += 1;
        let router = i % channels.len();
        let channel = channels[router].clone();
        match i % 3 {
            0 => create_and_delete_branch(i, router, channel, &history).await,
            1 => {
                if let Some(c) = commit_file(i, router, channel, &history).await {
                    commits.push(c);
                    if commits.len() > 2 {
                        commits.remove(0);
                    }
                }
            }
            _ => {
                if let [older, newer] = commits.as_slice() {
                    update_references(i, router, channel, newer, older, &history).await;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn create_and_delete_branch(i: usize, router: usize, channel: Channel, history: &History) {
    let name = format!("t-g-{i}");
    let mut client = OperationServiceClient::new(channel);
    let start = history.now();
    let call = client.user_create_branch(UserCreateBranchRequest {
        repository: Some(repository()),
        branch_name: name.as_bytes().to_vec(),
        user: user(),
        start_point: b"w0".to_vec(),
    });
    let (outcome, resp, detail) = grpc_outcome(tokio::time::timeout(READ_DEADLINE, call).await);
    let value = resp
        .and_then(|r| r.branch)
        .and_then(|b| b.target_commit)
        .map(|c| c.id);
    let created = outcome != Outcome::Failed;
    history.record(Op {
        client: "grpc-writer".into(),
        router,
        kind: OpKind::Push,
        branch: name.clone(),
        value: value.clone(),
        start,
        end: history.now(),
        outcome,
        detail,
    });
    if created {
        let start = history.now();
        let call = client.user_delete_branch(UserDeleteBranchRequest {
            repository: Some(repository()),
            branch_name: name.as_bytes().to_vec(),
            user: user(),
            expected_old_oid: value.unwrap_or_default(),
        });
        let (outcome, _, detail) = grpc_outcome(tokio::time::timeout(READ_DEADLINE, call).await);
        history.record(Op {
            client: "grpc-writer".into(),
            router,
            kind: OpKind::Delete,
            branch: name,
            value: None,
            start,
            end: history.now(),
            outcome,
            detail,
        });
    }
}

/// One `UserCommitFiles` adding file `g/<i>.txt` to [`GRPC_BRANCH`]; returns the new
/// commit when acknowledged.
async fn commit_file(
    i: usize,
    router: usize,
    channel: Channel,
    history: &History,
) -> Option<String> {
    use refvote_proto::gitaly::user_commit_files_action_header::ActionType;
    use refvote_proto::gitaly::{
        UserCommitFilesAction, UserCommitFilesActionHeader, UserCommitFilesRequest,
        UserCommitFilesRequestHeader, user_commit_files_action, user_commit_files_request,
    };
    let message = format!("grpc-writer commit {i}");
    let action = |payload| UserCommitFilesRequest {
        user_commit_files_request_payload: Some(
            user_commit_files_request::UserCommitFilesRequestPayload::Action(
                UserCommitFilesAction {
                    user_commit_files_action_payload: Some(payload),
                },
            ),
        ),
    };
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let requests = vec![
        UserCommitFilesRequest {
            user_commit_files_request_payload: Some(
                user_commit_files_request::UserCommitFilesRequestPayload::Header(
                    UserCommitFilesRequestHeader {
                        repository: Some(repository()),
                        user: user(),
                        branch_name: GRPC_BRANCH.as_bytes().to_vec(),
                        commit_message: message.as_bytes().to_vec(),
                        // As GitLab does: the client's clock, the same on every replica.
                        timestamp: Some(prost_types::Timestamp { seconds, nanos: 0 }),
                        ..Default::default()
                    },
                ),
            ),
        },
        action(
            user_commit_files_action::UserCommitFilesActionPayload::Header(
                UserCommitFilesActionHeader {
                    action: ActionType::Create as i32,
                    file_path: format!("g/{i}.txt").into_bytes(),
                    ..Default::default()
                },
            ),
        ),
        action(
            user_commit_files_action::UserCommitFilesActionPayload::Content(
                format!("grpc-writer file {i}\n").into_bytes(),
            ),
        ),
    ];
    let mut client = OperationServiceClient::new(channel);
    let start = history.now();
    let call = client.user_commit_files(tokio_stream::iter(requests));
    let (mut outcome, resp, mut detail) =
        grpc_outcome(tokio::time::timeout(READ_DEADLINE, call).await);
    let value = resp
        .as_ref()
        .and_then(|r| r.branch_update.as_ref())
        .map(|b| b.commit_id.clone())
        .filter(|c| !c.is_empty());
    if outcome == Outcome::Ack && value.is_none() {
        // A success without a commit: the response's own error fields say why.
        outcome = Outcome::Unknown;
        detail = format!("success without a commit id: {resp:?}");
    }
    history.record(Op {
        client: "grpc-writer".into(),
        router,
        kind: OpKind::Commit { message },
        branch: GRPC_BRANCH.into(),
        value: value.clone(),
        start,
        end: history.now(),
        outcome: outcome.clone(),
        detail,
    });
    value.filter(|_| outcome == Outcome::Ack)
}

/// The `UpdateReferences`/`DeleteRefs` round on a fresh branch, with two commits every
/// replica has (`newer` != `older`).
async fn update_references(
    i: usize,
    router: usize,
    channel: Channel,
    newer: &str,
    older: &str,
    history: &History,
) {
    use refvote_proto::gitaly::update_references_request::Update;
    use refvote_proto::gitaly::{DeleteRefsRequest, UpdateReferencesRequest};
    let branch = format!("{UPDATE_PREFIX}g-{i}");
    let name = format!("refs/heads/{branch}");
    let zero = "0".repeat(newer.len());
    let mut refs = RefServiceClient::new(channel);
    // (expected old value, new value): create; a wrong expectation (the ref is at
    // `newer`, not `older`), refused everywhere; the right one.
    let steps = [(zero.as_str(), newer), (older, older), (newer, older)];
    for (old, new) in steps {
        let start = history.now();
        let call = refs.update_references(tokio_stream::iter(vec![UpdateReferencesRequest {
            repository: Some(repository()),
            updates: vec![Update {
                reference: name.as_bytes().to_vec(),
                old_object_id: old.as_bytes().to_vec(),
                new_object_id: new.as_bytes().to_vec(),
            }],
        }]));
        let (outcome, _, detail) = grpc_outcome(tokio::time::timeout(READ_DEADLINE, call).await);
        history.record(Op {
            client: "grpc-writer".into(),
            router,
            kind: OpKind::Push,
            branch: branch.clone(),
            value: Some(new.to_owned()),
            start,
            end: history.now(),
            outcome,
            detail,
        });
    }
    let start = history.now();
    let call = refs.delete_refs(DeleteRefsRequest {
        repository: Some(repository()),
        refs: vec![name.as_bytes().to_vec()],
        ..Default::default()
    });
    let (mut outcome, resp, mut detail) =
        grpc_outcome(tokio::time::timeout(READ_DEADLINE, call).await);
    if let Some(e) = resp.map(|r| r.git_error).filter(|e| !e.is_empty()) {
        outcome = Outcome::Unknown;
        detail = format!("success with git_error {e:?}");
    }
    history.record(Op {
        client: "grpc-writer".into(),
        router,
        kind: OpKind::Delete,
        branch,
        value: None,
        start,
        end: history.now(),
        outcome,
        detail,
    });
}

/// Runs reader `k` until `stop`: reads a random writer's branch through alternating
/// routers.
pub async fn reader(
    k: usize,
    channels: Vec<Channel>,
    writers: usize,
    history: Arc<History>,
    stop: Arc<AtomicBool>,
    seed: u64,
) {
    let mut rng = Rng::new(seed ^ 0xDEAD_BEEF ^ k as u64);
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) && i < 1_000_000 {
        i += 1;
        let router = i % channels.len();
        // The writers' branches and the gRPC writer's commit branch.
        let branch = match rng.below(writers + 1) {
            n if n == writers => GRPC_BRANCH.to_owned(),
            n => format!("w{n}"),
        };
        let start = history.now();
        let mut client = RefServiceClient::new(channels[router].clone());
        let call = client.find_branch(FindBranchRequest {
            repository: Some(repository()),
            name: branch.as_bytes().to_vec(),
        });
        let result = tokio::time::timeout(READ_DEADLINE, call).await;
        let end = history.now();
        let (outcome, detail) = match result {
            Ok(Ok(resp)) => {
                let value = resp
                    .into_inner()
                    .branch
                    .and_then(|b| b.target_commit)
                    .map(|c| c.id);
                (Outcome::Read(value), String::new())
            }
            // A failed read says nothing about the data; it is counted, not checked.
            // No such branch (yet): a valid answer.
            Ok(Err(status)) if status.code() == tonic::Code::NotFound => {
                (Outcome::Read(None), String::new())
            }
            Ok(Err(status)) => (
                Outcome::Failed,
                format!("{:?}: {}", status.code(), status.message()),
            ),
            Err(_) => (Outcome::Unknown, "timed out".into()),
        };
        history.record(Op {
            client: format!("reader{k}"),
            router,
            kind: OpKind::Read,
            branch,
            value: None,
            start,
            end,
            outcome,
            detail,
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_push_failures() {
        let abort = "remote: refvote: update rejected: 1 of 3 replicas agreed, 2 needed\n ! [remote rejected] HEAD -> w1";
        assert_eq!(classify(abort).0, Outcome::Failed);
        assert_eq!(
            classify("error: RPC failed; HTTP 500 curl 22\nfatal: the remote end hung up").0,
            Outcome::Unknown
        );
        assert_eq!(
            classify("[remote rejected] HEAD -> w1 (outcome unknown)").0,
            Outcome::Unknown
        );
        assert_eq!(
            classify(" ! [remote rejected] HEAD -> w1 (no quorum: 1 of 3 up, 2 needed)").0,
            Outcome::Failed
        );
        assert_eq!(
            classify(" ! [remote rejected] HEAD -> w1 (cluster unavailable, retry)").0,
            Outcome::Unknown
        );
    }

    #[test]
    fn classifies_grpc_refusals() {
        use tonic::Status;
        let mismatch = Status::aborted(
            "reference does not point to expected object: refs/heads/u-g-2 is at 1111, expected 2222; read it again and retry",
        );
        assert_eq!(classify_status(&mismatch).0, Outcome::Failed);
        let no_quorum = Status::unavailable(
            "cannot write to default/x.git: not enough replicas are up to date",
        );
        assert_eq!(classify_status(&no_quorum).0, Outcome::Failed);
        let nothing = Status::unavailable(
            "the write to default/x.git changed nothing: its replicas failed differently (...); retry",
        );
        assert_eq!(classify_status(&nothing).0, Outcome::Unknown);
        let unknown =
            Status::unavailable("outcome unknown: the write reached fewer than a majority");
        assert_eq!(classify_status(&unknown).0, Outcome::Unknown);
    }
}
