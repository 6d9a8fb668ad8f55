//! GitLab's side of a call, as the router sees it (DESIGN.md §8): which writes GitLab's
//! checks gate (a push or an operation that names a GitLab user), post-receive asked of
//! one promoted voter once such a write is acknowledged, its output put into the
//! pusher's answer, and which calls must read a push's quarantine (Rails' callbacks
//! during `/allowed`).
//!
//! The checks themselves run on the nodes (`refvote_node::gitlab`); the router holds
//! no GitLab configuration.

use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use refvote_cluster::records::{PendingPostReceive, TxRecord};
use refvote_cluster::repository::RepoView;
use refvote_pktline::sideband::{self, Band, SideBand};
use refvote_proto::gitaly::{
    PostReceivePackRequest, PostReceivePackResponse, Repository, SshReceivePackRequest,
    SshReceivePackResponse, User, UserCherryPickRequest, UserCommitFilesRequest,
    UserCreateBranchRequest, UserCreateTagRequest, UserDeleteBranchRequest, UserDeleteTagRequest,
    UserFfBranchRequest, UserMergeBranchRequest, UserRebaseConfirmableRequest, UserRevertRequest,
    UserUpdateBranchRequest, user_commit_files_request, user_rebase_confirmable_request,
};
use refvote_proto::node::RunPostReceiveRequest;
use refvote_proto::node::node_service_client::NodeServiceClient;
use tonic::Code;
use tonic::metadata::MetadataMap;

use crate::pool::Pool;

/// Rails' metadata asking for the replica that holds a push's quarantine.
pub const ACCESSOR_POLICY_METADATA: &str = "gitaly-route-repository-accessor-policy";
const PRIMARY_ONLY: &str = "primary-only";
/// How long one node may take for post-receive (GitLab's call, retries, custom hooks).
const POST_RECEIVE_WAIT: Duration = Duration::from_secs(600);

const POST_RECEIVE_PACK: &str = "/gitaly.SmartHTTPService/PostReceivePack";
const SSH_RECEIVE_PACK: &str = "/gitaly.SSHService/SSHReceivePack";

/// Whether the call `path` with first request `first` names a GitLab user, so GitLab's
/// checks gate its transaction. A frame that does not decode is not gated here; the
/// node refuses it.
pub fn gated(path: &str, first: &[u8]) -> bool {
    fn user(u: &Option<User>) -> bool {
        u.as_ref().is_some_and(|u| !u.gl_id.is_empty())
    }
    match path {
        POST_RECEIVE_PACK => {
            PostReceivePackRequest::decode(first).is_ok_and(|r| !r.gl_id.is_empty())
        }
        SSH_RECEIVE_PACK => SshReceivePackRequest::decode(first).is_ok_and(|r| !r.gl_id.is_empty()),
        "/gitaly.OperationService/UserCreateBranch" => {
            UserCreateBranchRequest::decode(first).is_ok_and(|r| user(&r.user))
        }
        "/gitaly.OperationService/UserDeleteBranch" => {
            UserDeleteBranchRequest::decode(first).is_ok_and(|r| user(&r.user))
        }
        "/gitaly.OperationService/UserCreateTag" => {
            UserCreateTagRequest::decode(first).is_ok_and(|r| user(&r.user))
        }
        "/gitaly.OperationService/UserDeleteTag" => {
            UserDeleteTagRequest::decode(first).is_ok_and(|r| user(&r.user))
        }
        "/gitaly.OperationService/UserMergeBranch" => {
            UserMergeBranchRequest::decode(first).is_ok_and(|r| user(&r.user))
        }
        "/gitaly.OperationService/UserFFBranch" => {
            UserFfBranchRequest::decode(first).is_ok_and(|r| user(&r.user))
        }
        "/gitaly.OperationService/UserUpdateBranch" => {
            UserUpdateBranchRequest::decode(first).is_ok_and(|r| user(&r.user))
        }
        "/gitaly.OperationService/UserCherryPick" => {
            UserCherryPickRequest::decode(first).is_ok_and(|r| user(&r.user))
        }
        "/gitaly.OperationService/UserRevert" => {
            UserRevertRequest::decode(first).is_ok_and(|r| user(&r.user))
        }
        "/gitaly.OperationService/UserRebaseConfirmable" => {
            UserRebaseConfirmableRequest::decode(first).is_ok_and(|r| {
                match r.user_rebase_confirmable_request_payload {
            Some(user_rebase_confirmable_request::UserRebaseConfirmableRequestPayload::Header(
                h,
            )) => user(&h.user),
            _ => false,
        }
            })
        }
        "/gitaly.OperationService/UserCommitFiles" => UserCommitFilesRequest::decode(first)
            .is_ok_and(|r| match r.user_commit_files_request_payload {
                Some(user_commit_files_request::UserCommitFilesRequestPayload::Header(h)) => {
                    user(&h.user)
                }
                _ => false,
            }),
        _ => false,
    }
}

/// What a read needs of a push's quarantine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Quarantine {
    /// Nothing: any up-to-date replica.
    None,
    /// It names a quarantine directory: only the replica that holds it can answer.
    Directory(String),
    /// `primary-only`: the replica running an open push's checks, if there is one.
    PrimaryOnly,
}

/// What the read of `repo` with `metadata` needs.
pub fn quarantine(repo: &Repository, metadata: &MetadataMap) -> Quarantine {
    if !repo.git_object_directory.is_empty() {
        return Quarantine::Directory(repo.git_object_directory.clone());
    }
    let primary = metadata
        .get_all(ACCESSOR_POLICY_METADATA)
        .iter()
        .any(|v| v.to_str().is_ok_and(|v| v == PRIMARY_ONLY));
    if primary {
        Quarantine::PrimaryOnly
    } else {
        Quarantine::None
    }
}

/// The live designated voters of `open` (a repository's open gated transactions,
/// newest first), each once: where a quarantine read goes, in that order.
pub fn quarantine_holders(open: &[TxRecord], view: &RepoView) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for d in open.iter().filter_map(|t| t.designated.as_ref()) {
        if view.live_nodes.contains_key(d) && !out.contains(d) {
            out.push(d.clone());
        }
    }
    out
}

/// Who is asked to run post-receive of the transaction `pending` describes, in
/// order: its designated voter if promoted, then the other promoted voters in record
/// order.
pub fn post_receive_order(pending: &PendingPostReceive) -> Vec<String> {
    let promoted = |v: &String| pending.promoted.contains(v);
    pending
        .designated
        .iter()
        .filter(|d| promoted(d))
        .chain(
            pending
                .voters
                .iter()
                .filter(|v| promoted(v) && Some(*v) != pending.designated.as_ref()),
        )
        .cloned()
        .collect()
}

/// What asking the promoted voters for post-receive came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PostReceive {
    /// One ran it (its pending marker is deleted); what it printed.
    Ran(Vec<u8>),
    /// It is claimed by someone who has not finished, or it ran already: nothing to
    /// do here.
    NotHere,
    /// Every promoted voter answered that it can run nothing: they restarted since and
    /// the pending marker carries no runnable data (changes over its bound): nobody can
    /// run it.
    Nowhere,
    /// A voter could not be reached or failed: the marker stays for a sweeper.
    Failed,
}

/// Asks the promoted voters of the acknowledged gated transaction `pending` (in
/// [`post_receive_order`]) to run GitLab's post-receive, under `lease`, until one
/// answers that it ran it or that it is not owed here. Its failures never fail the
/// write: they are logged and the pusher's answer goes without the messages.
pub async fn run_post_receive(
    pool: &Pool,
    view: Option<&RepoView>,
    pending: &PendingPostReceive,
    lease: i64,
) -> PostReceive {
    let tx = &pending.id;
    let mut failed = false;
    for node in post_receive_order(pending) {
        let Some((record, _)) = view.and_then(|v| v.live_nodes.get(&node)) else {
            failed = true;
            continue;
        };
        let channel = match pool.channel(&record.address) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(tx = %tx, node, error = %e, "cannot reach a promoted voter for post-receive");
                failed = true;
                continue;
            }
        };
        let request = RunPostReceiveRequest {
            transaction: tx.clone(),
            lease,
        };
        let mut client = NodeServiceClient::new(channel);
        let call = client.run_post_receive(request);
        match tokio::time::timeout(POST_RECEIVE_WAIT, call).await {
            Ok(Ok(answer)) => {
                let answer = answer.into_inner();
                return if answer.ran {
                    PostReceive::Ran(answer.output)
                } else {
                    PostReceive::NotHere
                };
            }
            Ok(Err(status)) if status.code() == Code::NotFound => {
                tracing::debug!(tx = %tx, node, "no committed update there; asking the next");
            }
            Ok(Err(status)) => {
                tracing::warn!(tx = %tx, node, %status, "post-receive failed on a promoted voter; asking the next");
                failed = true;
            }
            Err(_) => {
                tracing::warn!(tx = %tx, node, "post-receive did not answer in time; asking the next");
                failed = true;
            }
        }
    }
    if failed {
        tracing::warn!(tx = %tx, "no promoted voter ran GitLab's post-receive yet; it stays pending");
        PostReceive::Failed
    } else {
        tracing::error!(tx = %tx, "no promoted voter holds the update any more: GitLab's post-receive cannot run");
        PostReceive::Nowhere
    }
}

/// `answer` (a receive-pack's whole output) with `output` put before its final flush
/// on the progress band, where git puts post-receive's output. `None` unless the
/// answer is side-band multiplexed and ends with that flush. Packets of at most 1000
/// bytes suit both side-band flavours.
pub fn with_output(answer: &[u8], output: &[u8]) -> Option<Vec<u8>> {
    let body = answer.strip_suffix(b"0000")?;
    let mut packets = refvote_pktline::decode::packets(body);
    for packet in packets.by_ref() {
        let data = packet.ok()?.data()?;
        sideband::split(data)?;
    }
    if !packets.rest().is_empty() {
        return None;
    }
    let mut out = body.to_vec();
    sideband::write(&mut out, SideBand::Small, Band::Progress, output);
    out.extend_from_slice(b"0000");
    Some(out)
}

/// Where a receive-pack session's ref advertisement ends (after its flush), if its
/// stdout `out` holds a whole one.
fn advertisement_end(out: &[u8]) -> Option<usize> {
    let mut packets = refvote_pktline::decode::packets(out);
    while let Some(packet) = packets.next() {
        if packet.ok()? == refvote_pktline::decode::Packet::Flush {
            return Some(packets.offset());
        }
    }
    None
}

/// The frames of `path`'s answer with post-receive's `output` put in (see
/// [`with_output`]); unchanged when there is nothing to put or no place for it. A
/// session without side-band (SSH) gets it as stderr before its exit status.
pub fn insert_output(path: &str, mut frames: Vec<Bytes>, output: &[u8]) -> Vec<Bytes> {
    if output.is_empty() {
        return frames;
    }
    match path {
        POST_RECEIVE_PACK => {
            let decoded: Option<Vec<PostReceivePackResponse>> = frames
                .iter()
                .map(|f| PostReceivePackResponse::decode(f.as_ref()).ok())
                .collect();
            let Some(mut messages) = decoded else {
                return frames;
            };
            let all: Vec<u8> = messages.iter().flat_map(|m| m.data.clone()).collect();
            let Some(last) = messages.iter().rposition(|m| !m.data.is_empty()) else {
                return frames;
            };
            match with_output(&all, output) {
                Some(new) if messages[last].data.ends_with(b"0000") => {
                    let before = all.len() - messages[last].data.len();
                    messages[last].data = new[before..].to_vec();
                    frames[last] = Bytes::from(messages[last].encode_to_vec());
                }
                _ => tracing::info!(
                    "the push's answer has no side-band; post-receive's messages are not shown"
                ),
            }
            frames
        }
        SSH_RECEIVE_PACK => {
            let decoded: Option<Vec<SshReceivePackResponse>> = frames
                .iter()
                .map(|f| SshReceivePackResponse::decode(f.as_ref()).ok())
                .collect();
            let Some(mut messages) = decoded else {
                return frames;
            };
            let all: Vec<u8> = messages.iter().flat_map(|m| m.stdout.clone()).collect();
            let last = messages.iter().rposition(|m| !m.stdout.is_empty());
            // An SSH session's stdout begins with the ref advertisement, which is not
            // side-band: the report after it is.
            let advertised = advertisement_end(&all);
            let new = advertised.and_then(|at| {
                with_output(&all[at..], output).map(|new| [&all[..at], &new[..]].concat())
            });
            if let (Some(last), Some(new)) = (last, new)
                && messages[last].stdout.ends_with(b"0000")
            {
                let before = all.len() - messages[last].stdout.len();
                messages[last].stdout = new[before..].to_vec();
                frames[last] = Bytes::from(messages[last].encode_to_vec());
                return frames;
            }
            // No side-band: stderr, before the exit status.
            let at = messages
                .iter()
                .position(|m| m.exit_status.is_some())
                .unwrap_or(messages.len());
            let stderr = SshReceivePackResponse {
                stderr: output.to_vec(),
                ..Default::default()
            };
            frames.insert(at, Bytes::from(stderr.encode_to_vec()));
            frames
        }
        _ => frames,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use refvote_cluster::RepoId;
    use refvote_pktline::encode;

    fn record(designated: Option<&str>) -> TxRecord {
        TxRecord {
            id: "t1".into(),
            repo: RepoId::new("default", "a.git").unwrap(),
            voters: vec!["a".into(), "b".into(), "c".into()],
            threshold: 2,
            assigned: 3,
            base_generation: 1,
            creator: "r".into(),
            voter_leases: BTreeMap::new(),
            repo_create_revision: 1,
            designated: designated.map(str::to_owned),
        }
    }

    fn pending(designated: Option<&str>, promoted: &[&str]) -> PendingPostReceive {
        let r = record(designated);
        PendingPostReceive {
            id: r.id,
            repo: r.repo,
            designated: r.designated,
            voters: r.voters,
            promoted: promoted.iter().map(|p| p.to_string()).collect(),
            finalized_by: "r".into(),
            post_receive: serde_json::Value::Null,
        }
    }

    #[test]
    fn pushes_and_operations_by_a_gitlab_user_are_gated() {
        let push = |gl_id: &str| {
            PostReceivePackRequest {
                gl_id: gl_id.into(),
                ..Default::default()
            }
            .encode_to_vec()
        };
        assert!(gated(POST_RECEIVE_PACK, &push("user-1")));
        assert!(!gated(POST_RECEIVE_PACK, &push("")));
        let ssh = SshReceivePackRequest {
            gl_id: "key-2".into(),
            ..Default::default()
        }
        .encode_to_vec();
        assert!(gated(SSH_RECEIVE_PACK, &ssh));
        let branch = UserCreateBranchRequest {
            user: Some(User {
                gl_id: "user-3".into(),
                ..Default::default()
            }),
            ..Default::default()
        }
        .encode_to_vec();
        assert!(gated("/gitaly.OperationService/UserCreateBranch", &branch));
        assert!(!gated(
            "/gitaly.OperationService/UserCreateBranch",
            &UserCreateBranchRequest::default().encode_to_vec()
        ));
        assert!(!gated("/gitaly.RefService/UpdateReferences", &branch));
        assert!(!gated(POST_RECEIVE_PACK, b"\xff\xff not protobuf"));
        // A confirmable rebase names its user in the header of its first frame.
        let rebase = UserRebaseConfirmableRequest {
            user_rebase_confirmable_request_payload: Some(
                user_rebase_confirmable_request::UserRebaseConfirmableRequestPayload::Header(
                    user_rebase_confirmable_request::Header {
                        user: Some(User {
                            gl_id: "user-4".into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    },
                ),
            ),
        }
        .encode_to_vec();
        assert!(gated(
            "/gitaly.OperationService/UserRebaseConfirmable",
            &rebase
        ));
        assert!(!gated(
            "/gitaly.OperationService/UserRebaseConfirmable",
            &UserRebaseConfirmableRequest::default().encode_to_vec()
        ));
    }

    #[test]
    fn post_receive_is_asked_of_the_designated_voter_first_when_promoted() {
        assert_eq!(
            post_receive_order(&pending(Some("b"), &["a", "b", "c"])),
            ["b", "a", "c"]
        );
        assert_eq!(
            post_receive_order(&pending(Some("b"), &["a", "c"])),
            ["a", "c"]
        );
        assert!(post_receive_order(&pending(None, &[])).is_empty());
    }

    fn report(sideband: bool) -> Vec<u8> {
        let mut inner = Vec::new();
        encode::text(&mut inner, "unpack ok\n").unwrap();
        encode::text(&mut inner, "ok refs/heads/main\n").unwrap();
        encode::flush(&mut inner);
        if !sideband {
            return inner;
        }
        let mut out = Vec::new();
        sideband::write(
            &mut out,
            SideBand::Large,
            Band::Progress,
            b"resolving deltas\n",
        );
        sideband::write(&mut out, SideBand::Large, Band::Data, &inner);
        encode::flush(&mut out);
        out
    }

    #[test]
    fn output_goes_on_the_progress_band_before_the_final_flush() {
        let answer = report(true);
        let new = with_output(&answer, b"To create a merge request, visit:\n").unwrap();
        let d = sideband::demux(&new).unwrap();
        assert_eq!(
            String::from_utf8(d.progress).unwrap(),
            "resolving deltas\nTo create a merge request, visit:\n"
        );
        assert_eq!(d.end, Some(new.len()));
        assert_eq!(with_output(&report(false), b"x"), None);
        assert_eq!(with_output(b"0001", b"x"), None);
    }

    #[test]
    fn frames_get_the_output_where_their_protocol_shows_it() {
        let answer = report(true);
        let (a, b) = answer.split_at(10);
        let frames: Vec<Bytes> = [a, b]
            .iter()
            .map(|d| Bytes::from(PostReceivePackResponse { data: d.to_vec() }.encode_to_vec()))
            .collect();
        let out = insert_output(POST_RECEIVE_PACK, frames, b"hello\n");
        let all: Vec<u8> = out
            .iter()
            .flat_map(|f| PostReceivePackResponse::decode(f.as_ref()).unwrap().data)
            .collect();
        assert!(
            sideband::demux(&all)
                .unwrap()
                .progress
                .ends_with(b"hello\n")
        );
        // SSH without side-band: a stderr frame before the exit status.
        let frames = vec![
            Bytes::from(
                SshReceivePackResponse {
                    stdout: report(false),
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
            Bytes::from(
                SshReceivePackResponse {
                    exit_status: Some(refvote_proto::gitaly::ExitStatus { value: 0 }),
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
        ];
        let out = insert_output(SSH_RECEIVE_PACK, frames, b"hello\n");
        assert_eq!(out.len(), 3);
        let middle = SshReceivePackResponse::decode(out[1].as_ref()).unwrap();
        assert_eq!(middle.stderr, b"hello\n");
        assert!(insert_output(POST_RECEIVE_PACK, vec![], b"").is_empty());
        // SSH with side-band: after the ref advertisement, on the progress band.
        let mut session = Vec::new();
        encode::text(
            &mut session,
            "1111111111111111111111111111111111111111 refs/heads/main\n",
        )
        .unwrap();
        encode::flush(&mut session);
        let advertised = session.len();
        let frames = vec![
            Bytes::from(
                SshReceivePackResponse {
                    stdout: session.clone(),
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
            Bytes::from(
                SshReceivePackResponse {
                    stdout: report(true),
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
        ];
        let out = insert_output(SSH_RECEIVE_PACK, frames, b"hello\n");
        assert_eq!(out.len(), 2, "no stderr frame");
        let all: Vec<u8> = out
            .iter()
            .flat_map(|f| SshReceivePackResponse::decode(f.as_ref()).unwrap().stdout)
            .collect();
        assert_eq!(all[..advertised], session[..]);
        assert!(
            sideband::demux(&all[advertised..])
                .unwrap()
                .progress
                .ends_with(b"hello\n")
        );
    }
}
