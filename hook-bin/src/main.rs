//! `reference-transaction`: git's reference-transaction hook for refvote.
//!
//! git runs it at every phase of every ref transaction, with the phase as the argument
//! and `<old-oid> <new-oid> <refname>` lines on stdin. Inside a refvote transaction
//! (`REFVOTE_TX` in the environment) it votes the update through the local votingd over
//! a Unix socket and waits for the cluster's decision. It is synchronous and small on
//! purpose: no async runtime, no gRPC, one request, a hard deadline.
//!
//! Exit status: 0 lets git go on (commit, or a phase that needs nothing); 1 makes git
//! abort the update at `prepared` (git ignores the status of later phases). On abort it
//! prints one line saying why; the pusher sees it.
//!
//! Environment (set by votingd when it runs git; the names are `refvote_proto::contract`'s):
//! - `REFVOTE_TX`: the refvote transaction id; absent for updates outside refvote.
//! - `REFVOTE_VOTER`: the node name this replica votes as.
//! - `REFVOTE_SOCKET`: votingd's vote socket.
//! - `REFVOTE_MAINTENANCE=1`: a run votingd started itself (repair, maintenance): passes.
//! - `REFVOTE_HOOK_DEADLINE_MS`: overall deadline (default 120000), longer than any
//!   vote wait in votingd.
//! - `REFVOTE_HOOK_CONF`: the hook's config file; default `refvote-hook.conf` beside the
//!   hook. It says `require_transaction = true|false` for updates with no refvote
//!   context; votingd writes it at start-up.
//!
//! It does not decide anything itself: the decision is votingd's and etcd's.
#![forbid(unsafe_code)]

use refvote_hook::input;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use prost::Message;
use refvote_proto::contract::{ENV_MAINTENANCE, ENV_SOCKET, ENV_TX, ENV_VOTER, MAINTENANCE_ON};
use refvote_proto::hook::{self, Phase, Request, Response, Vote, request, response};

const DEFAULT_DEADLINE: Duration = Duration::from_secs(120);
/// Largest stdin accepted: git sends one line per ref, ~100 bytes each.
const MAX_STDIN: u64 = 256 * 1024 * 1024;

fn main() {
    let started = Instant::now();
    let code = match run(started) {
        Ok(code) => code,
        Err(message) => {
            eprintln!("refvote: {message}");
            1
        }
    };
    std::process::exit(code);
}

fn run(started: Instant) -> Result<i32, String> {
    let mut args = std::env::args_os();
    let argv0 = args.next().map(PathBuf::from);
    let phase = match args.next().as_ref().and_then(|a| a.to_str()) {
        Some("prepared") => Phase::Prepared,
        Some("committed") => Phase::Committed,
        Some("aborted") => Phase::Aborted,
        // Phases refvote does not vote on (e.g. "preparing" in newer git).
        Some(_) => return Ok(0),
        None => return Err("usage: reference-transaction <phase> (git runs this hook)".into()),
    };
    let mut stdin = Vec::new();
    std::io::stdin()
        .take(MAX_STDIN + 1)
        .read_to_end(&mut stdin)
        .map_err(|e| format!("cannot read the ref updates from stdin: {e}"))?;
    if stdin.len() as u64 > MAX_STDIN {
        return Err(format!(
            "update rejected: more than {MAX_STDIN} bytes of ref updates"
        ));
    }

    if std::env::var_os(ENV_MAINTENANCE).is_some_and(|v| v == MAINTENANCE_ON) {
        return Ok(0);
    }
    let Some(tx) = std::env::var_os(ENV_TX) else {
        return outside_refvote(phase, argv0);
    };
    let tx = tx
        .into_string()
        .map_err(|_| format!("{ENV_TX} is not UTF-8"))?;
    let update = input::parse(&stdin).map_err(|e| format!("update rejected: {e}"))?;
    if update.is_packed_refs_side() {
        // git's packed-refs half of a deletion: replicas that packed their refs at
        // different times see it or not, so it is never voted.
        return Ok(0);
    }
    let voter = env(ENV_VOTER)?;
    let socket = env(ENV_SOCKET)?;
    let deadline = std::env::var("REFVOTE_HOOK_DEADLINE_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
        .unwrap_or(DEFAULT_DEADLINE);

    let vote = Vote {
        phase: phase as i32,
        transaction: tx,
        voter,
        key_base: update.key_base(),
        hash: input::sha256(&stdin).to_vec(),
        ref_count: update.lines.len() as u32,
        first_ref: update
            .lines
            .first()
            .map(|l| l.refname.clone())
            .unwrap_or_default(),
    };
    let request = Request {
        kind: Some(request::Kind::Vote(vote)),
    };
    let answer = exchange(&socket, &request, started + deadline);
    match (phase, answer) {
        (Phase::Prepared, Ok(response::Kind::Decision(d))) if d.commit => Ok(0),
        (Phase::Prepared, Ok(response::Kind::Decision(d))) => {
            eprintln!("{}", d.message);
            Ok(1)
        }
        (Phase::Prepared, Ok(response::Kind::Error(e))) => {
            Err(format!("update rejected: {}", e.message))
        }
        (Phase::Prepared, Ok(response::Kind::StatusJson(_))) => {
            Err("update rejected: votingd sent an unexpected answer".into())
        }
        (Phase::Prepared, Err(e)) => Err(format!("update rejected: {e}")),
        // The update is already on disk or already dropped: git ignores our status.
        // Say so when the report could not be made; finalize treats the replica as
        // unconfirmed, which is the safe side.
        (_, Ok(response::Kind::Error(e))) => {
            eprintln!(
                "refvote: warning: could not report {}: {}",
                phase.as_str_name(),
                e.message
            );
            Ok(0)
        }
        (_, Err(e)) => {
            eprintln!(
                "refvote: warning: could not report {}: {e}",
                phase.as_str_name()
            );
            Ok(0)
        }
        (_, Ok(_)) => Ok(0),
    }
}

/// An update with no refvote context: allowed unless votingd requires transactions.
fn outside_refvote(phase: Phase, argv0: Option<PathBuf>) -> Result<i32, String> {
    if phase != Phase::Prepared {
        return Ok(0);
    }
    let conf = std::env::var_os("REFVOTE_HOOK_CONF")
        .map(PathBuf::from)
        .or_else(|| argv0.and_then(|p| p.parent().map(|d| d.join("refvote-hook.conf"))));
    let required = match conf.as_deref().map(std::fs::read_to_string) {
        Some(Ok(text)) => input::conf_flag(&text, "require_transaction")?,
        // No config beside the hook: votingd never set this hooks directory up.
        Some(Err(_)) | None => false,
    };
    if required {
        return Err(
            "update rejected: this replica only accepts ref updates that come \
                    through a refvote router (require_transaction = true)"
                .into(),
        );
    }
    Ok(0)
}

fn env(name: &str) -> Result<String, String> {
    std::env::var(name).map_err(|_| format!("{name} is not set; votingd sets it with {ENV_TX}"))
}

/// Sends one request and reads one response, all before `deadline`.
fn exchange(socket: &str, request: &Request, deadline: Instant) -> Result<response::Kind, String> {
    let remaining = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| "no answer from votingd before the hook's deadline".to_string())
    };
    let mut stream = UnixStream::connect(socket)
        .map_err(|e| format!("cannot reach votingd at {socket}: {e}"))?;
    stream
        .set_write_timeout(Some(remaining()?))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(&hook::encode_frame(request))
        .map_err(|e| format!("cannot send the vote to votingd: {e}"))?;
    let mut header = [0u8; 4];
    let mut read = |buf: &mut [u8]| -> Result<(), String> {
        stream
            .set_read_timeout(Some(remaining()?))
            .map_err(|e| e.to_string())?;
        stream.read_exact(buf).map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                "no answer from votingd before the hook's deadline".to_string()
            }
            _ => format!("votingd closed the connection: {e}"),
        })
    };
    read(&mut header)?;
    let len = hook::frame_len(header).map_err(|e| e.to_string())?;
    let mut body = vec![0u8; len];
    read(&mut body)?;
    Response::decode(body.as_slice())
        .map_err(|e| format!("votingd sent a malformed answer: {e}"))?
        .kind
        .ok_or_else(|| "votingd sent an empty answer".to_string())
}
