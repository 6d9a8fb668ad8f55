//! The workload: writers pushing real commits with real `git` over smart HTTP through
//! both routers (most to their own branch, some racing with `--force` on one shared
//! branch, some creating and deleting a branch), and readers asking both routers for a
//! branch with gRPC `FindBranch`, and a gRPC writer creating and deleting branches
//! with `UserCreateBranch`/`UserDeleteBranch`. Every operation goes into the
//! [`History`].
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
    FindBranchRequest, User, UserCreateBranchRequest, UserDeleteBranchRequest,
};
use tonic::transport::Channel;

use super::history::{History, Op, OpKind, Outcome};
use super::{Rng, repository};
use crate::git::WorkRepo;

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

/// What a refused gRPC write says about whether it can exist anywhere: only a refusal
/// before the transaction began (no quorum, a locked repository) is definite.
pub fn classify_status(status: &tonic::Status) -> (Outcome, String) {
    let detail = format!("{:?}: {}", status.code(), status.message());
    let m = status.message();
    if m.contains("not enough replicas are up to date") || m.contains("is locked by") {
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

/// Runs the gRPC writer until `stop`: through alternating routers, creates a branch at
/// writer 0's branch with `UserCreateBranch`, then deletes it with `UserDeleteBranch`
/// (expecting the value it was created at, when known).
pub async fn grpc_writer(channels: Vec<Channel>, history: Arc<History>, stop: Arc<AtomicBool>) {
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) && i < 100_000 {
        i += 1;
        let router = i % channels.len();
        let name = format!("t-g-{i}");
        let mut client = OperationServiceClient::new(channels[router].clone());
        let start = history.now();
        let call = client.user_create_branch(UserCreateBranchRequest {
            repository: Some(repository()),
            branch_name: name.as_bytes().to_vec(),
            user: user(),
            start_point: b"w0".to_vec(),
        });
        let (outcome, value, detail) = match tokio::time::timeout(READ_DEADLINE, call).await {
            Ok(Ok(resp)) => {
                let value = resp
                    .into_inner()
                    .branch
                    .and_then(|b| b.target_commit)
                    .map(|c| c.id);
                (Outcome::Ack, value, String::new())
            }
            Ok(Err(status)) => {
                let (o, d) = classify_status(&status);
                (o, None, d)
            }
            Err(_) => (Outcome::Unknown, None, "timed out".into()),
        };
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
            let (outcome, detail) = match tokio::time::timeout(READ_DEADLINE, call).await {
                Ok(Ok(_)) => (Outcome::Ack, String::new()),
                Ok(Err(status)) => classify_status(&status),
                Err(_) => (Outcome::Unknown, "timed out".into()),
            };
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
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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
        let branch = format!("w{}", rng.below(writers));
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
}
