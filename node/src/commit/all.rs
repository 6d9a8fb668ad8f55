//! FindAllCommits: `git log` from one revision, or from every branch when none is
//! given, with Gitaly's `max_count`, `skip` and order; the commits it names come from
//! the read engine in batches. As in Gitaly, git's own failure (an unknown revision,
//! an unborn HEAD) ends the list without an error; a revision Gitaly refuses is
//! INVALID_ARGUMENT before git runs.

use refvote_proto::gitaly::{
    FindAllCommitsRequest, FindAllCommitsResponse, find_all_commits_request,
};
use tonic::Status;
use tonic::codegen::BoxStream;

use super::walk::stream_listed;
use crate::error::NodeError;
use crate::refs::names;
use crate::state::NodeState;

/// `git log`'s arguments after `log` for `req` (`revision` checked, `None` for every
/// branch).
pub fn log_args(req: &FindAllCommitsRequest, revision: Option<&str>) -> Vec<String> {
    let mut args = vec!["--pretty=%H".to_owned()];
    if req.max_count > 0 {
        args.push(format!("--max-count={}", req.max_count));
    }
    if req.skip > 0 {
        args.push(format!("--skip={}", req.skip));
    }
    match find_all_commits_request::Order::try_from(req.order) {
        Ok(find_all_commits_request::Order::Date) => args.push("--date-order".into()),
        Ok(find_all_commits_request::Order::Topo) => args.push("--topo-order".into()),
        _ => {}
    }
    match revision {
        // Every branch (Gitaly lists refs/heads and names each; the walk is the same,
        // and with no branch at all both fall back to HEAD).
        None => args.extend(["--branches".to_owned(), "--end-of-options".to_owned()]),
        Some(rev) => args.extend(["--end-of-options".to_owned(), rev.to_owned()]),
    }
    args.push("--".into());
    args
}

pub async fn find_all_commits(
    node: &NodeState,
    req: FindAllCommitsRequest,
) -> Result<BoxStream<FindAllCommitsResponse>, Status> {
    let repo = node.storages.existing(req.repository.as_ref())?;
    let revision = if req.revision.is_empty() {
        None
    } else {
        Some(names::revision("revision", &req.revision)?.to_owned())
    };
    let args = log_args(&req, revision.as_deref());
    let run = node.git.command(["log"]).repo(&repo);
    let run = args
        .iter()
        .fold(run, |cmd, a| cmd.arg(a))
        .spawn()
        .map_err(NodeError::from)?;
    Ok(stream_listed(run, node.reads.clone(), repo, |commits| {
        FindAllCommitsResponse { commits }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_follow_gitaly() {
        let mut req = FindAllCommitsRequest::default();
        assert_eq!(
            log_args(&req, None),
            ["--pretty=%H", "--branches", "--end-of-options", "--"]
        );
        req.max_count = 3;
        req.skip = 2;
        req.order = find_all_commits_request::Order::Topo as i32;
        assert_eq!(
            log_args(&req, Some("main")),
            [
                "--pretty=%H",
                "--max-count=3",
                "--skip=2",
                "--topo-order",
                "--end-of-options",
                "main",
                "--"
            ]
        );
        // Negative counts are no bounds; an unknown order is git's default.
        req.max_count = -1;
        req.skip = -5;
        req.order = 42;
        assert_eq!(
            log_args(&req, Some("v1")),
            ["--pretty=%H", "--end-of-options", "v1", "--"]
        );
        req.order = find_all_commits_request::Order::Date as i32;
        assert!(log_args(&req, None).contains(&"--date-order".to_owned()));
    }
}
