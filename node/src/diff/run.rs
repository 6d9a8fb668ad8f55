//! Reading git's diff output and sending it: [`DiffRun`] reads a running `git diff`
//! file by file through the streaming parser, [`exit_as_precondition`] turns git's
//! failure into Gitaly's answer, [`send_all`] sends a file's messages. Shared by the
//! DiffService handlers and DiffBlobs.

use tokio::sync::mpsc;
use tonic::Status;

use super::parse::{self, Diff, Limits, Parser};
use crate::error::NodeError;
use crate::git::{Command, Run};

/// Patch bytes per message (Gitaly's `msgSizeThreshold`), also the CommitDelta batch
/// size.
pub(crate) const MSG_SIZE: usize = 5 * 1024;

/// git's diff output read file by file.
pub(crate) struct DiffRun {
    run: Option<Run>,
    parser: Parser,
    ended: bool,
    /// Prefix of the message when git fails (Gitaly's wording: "eachDiff: ").
    what: &'static str,
}

impl DiffRun {
    pub(crate) fn new(run: Run, limits: Limits, what: &'static str) -> DiffRun {
        DiffRun {
            run: Some(run),
            parser: Parser::new(limits.capped()),
            ended: false,
            what,
        }
    }

    /// The next file; `None` at the end (or once a limit stopped the diff).
    pub(crate) async fn next(&mut self) -> Result<Option<Diff>, NodeError> {
        loop {
            if let Some(d) = self.parser.next_diff() {
                return Ok(Some(d));
            }
            if self.ended || self.parser.finished() {
                return Ok(None);
            }
            let run = self.run.as_mut().expect("present until the end");
            match run.chunk().await {
                Some(chunk) => self.parser.feed(&chunk?).map_err(parse_error)?,
                None => {
                    self.parser.finish().map_err(parse_error)?;
                    self.ended = true;
                }
            }
        }
    }

    /// How git ended: its failure (an unknown revision) as FAILED_PRECONDITION, as
    /// Gitaly answers it. Stopped early by a limit, git is killed and that is fine.
    pub(crate) async fn finish(mut self) -> Result<(), NodeError> {
        let Some(run) = self.run.take() else {
            return Ok(());
        };
        if !self.ended {
            drop(run);
            return Ok(());
        }
        exit_as_precondition(run, self.what).await
    }
}

/// Waits for git and turns a non-zero exit into Gitaly's FAILED_PRECONDITION
/// ("exit status 128"), with git's own words after it.
pub(crate) async fn exit_as_precondition(run: Run, what: &str) -> Result<(), NodeError> {
    let exit = run.wait().await?;
    if exit.success() {
        return Ok(());
    }
    Err(NodeError::FailedPrecondition(format!(
        "{what}exit status {}: {}",
        exit.code().unwrap_or(-1),
        exit.stderr.trim()
    )))
}

pub(crate) fn parse_error(e: parse::ParseError) -> NodeError {
    NodeError::io("reading git's diff output", std::io::Error::other(e))
}

/// Sends every message; false if the client went away.
pub(crate) async fn send_all<T>(tx: &mpsc::Sender<Result<T, Status>>, messages: Vec<T>) -> bool {
    for m in messages {
        if tx.send(Ok(m)).await.is_err() {
            return false;
        }
    }
    true
}

/// Config for one git run through the environment (`GIT_CONFIG_COUNT`), which wins
/// over the repository's config: output formats the parsers rely on.
pub(crate) fn with_config(mut cmd: Command, pairs: &[(&str, &str)]) -> Command {
    cmd = cmd.env("GIT_CONFIG_COUNT", pairs.len().to_string());
    for (i, (k, v)) in pairs.iter().enumerate() {
        cmd = cmd
            .env(&format!("GIT_CONFIG_KEY_{i}"), *k)
            .env(&format!("GIT_CONFIG_VALUE_{i}"), *v);
    }
    cmd
}

/// What `git diff` must print for the parsers: `a/`/`b/` prefixes, quoted paths.
pub(crate) const DIFF_CONFIG: &[(&str, &str)] = &[
    ("diff.noprefix", "false"),
    ("diff.mnemonicPrefix", "false"),
    ("core.quotePath", "true"),
];
