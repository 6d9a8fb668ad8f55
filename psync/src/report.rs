//! What a run did, per repository and in sum: the lines a person reads, the `--json`
//! document a script reads, and the exit status a timer alerts on.
//!
//! Exit status: 0 every repository is synced (or had nothing to do); 1 some failed
//! (a gap, a diverged target, git, a conflict) and the rest went on; 2 an object did
//! not authenticate or no configured key opens it (tampering, or the wrong key: alert
//! on it); 69 the bucket or the target could not be reached after retries; 64 the
//! configuration is invalid (nothing ran).

use serde::Serialize;

use crate::config::ConfigError;
use crate::error::{Class, SyncError};
use crate::naming::Kind;

pub const EXIT_OK: i32 = 0;
pub const EXIT_FAILED: i32 = 1;
pub const EXIT_INTEGRITY: i32 = 2;
pub const EXIT_CONFIG: i32 = 64;
pub const EXIT_UNAVAILABLE: i32 = 69;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Produce,
    Consume,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Produce => "produce",
            Role::Consume => "consume",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// producer: a new sequence is in the bucket.
    Uploaded,
    /// producer: the refs are what the last sequence carried.
    Unchanged,
    /// producer: the source repository has no refs yet.
    Empty,
    /// consumer: one or more sequences applied.
    Applied,
    /// consumer: the target is at the bucket's latest sequence.
    UpToDate,
    /// `--dry-run`: what would have been uploaded or applied.
    WouldSync,
    Failed,
}

#[derive(Debug, Clone, Serialize)]
pub struct RepoReport {
    pub repository: String,
    pub outcome: Outcome,
    /// producer: the sequence written (or the latest); consumer: the last applied.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sequence: Option<u64>,
    /// consumer: the sequences applied in this run.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub applied: Vec<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<Kind>,
    /// Bytes moved through the bucket (sealed).
    pub bytes: u64,
    /// consumer: sequences in the bucket not yet applied after this run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lag: Option<u64>,
    pub seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<Class>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
    /// `--dry-run`: what would happen.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
}

impl RepoReport {
    pub fn new(repository: &str, outcome: Outcome) -> RepoReport {
        RepoReport {
            repository: repository.to_owned(),
            outcome,
            sequence: None,
            applied: Vec::new(),
            kind: None,
            bytes: 0,
            lag: None,
            seconds: 0.0,
            failure: None,
            error: None,
            hint: None,
            plan: None,
        }
    }

    pub fn failed(repository: &str, e: &SyncError) -> RepoReport {
        RepoReport {
            failure: Some(e.class()),
            error: Some(format!("{e:#}")),
            hint: e.hint(repository),
            ..RepoReport::new(repository, Outcome::Failed)
        }
    }

    /// One line for a person.
    pub fn line(&self) -> String {
        let r = &self.repository;
        let seq = self.sequence.map(|s| s.to_string()).unwrap_or_default();
        let kind = self.kind.map(|k| format!("{k}, ")).unwrap_or_default();
        let size = human_bytes(self.bytes);
        match self.outcome {
            Outcome::Uploaded => format!("{r}: sequence {seq} uploaded ({kind}{size})"),
            Outcome::Unchanged => format!("{r}: unchanged since sequence {seq}"),
            Outcome::Empty => format!("{r}: no refs yet, nothing to carry"),
            Outcome::Applied => {
                let list: Vec<String> = self.applied.iter().map(u64::to_string).collect();
                format!(
                    "{r}: applied sequence{} {} ({size}), now at {seq}",
                    if list.len() == 1 { "" } else { "s" },
                    list.join(", ")
                )
            }
            Outcome::UpToDate => format!("{r}: up to date at sequence {seq}"),
            Outcome::WouldSync => format!("{r}: would {}", self.plan.as_deref().unwrap_or("sync")),
            Outcome::Failed => {
                let mut s = format!(
                    "{r}: FAILED: {}",
                    self.error.as_deref().unwrap_or("unknown error")
                );
                if let Some(h) = &self.hint {
                    s.push_str(&format!("\n  hint: {h}"));
                }
                s
            }
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub role: Role,
    pub dry_run: bool,
    /// Unix seconds.
    pub started_at: u64,
    pub seconds: f64,
    pub bytes: u64,
    pub repositories: Vec<RepoReport>,
    /// A failure before any repository (the bucket unreachable).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub exit_code: i32,
}

impl Summary {
    /// Sets `exit_code` from the outcomes.
    pub fn settle(&mut self, run_failure: Option<Class>) {
        let worst = self
            .repositories
            .iter()
            .filter_map(|r| r.failure)
            .chain(run_failure)
            .max();
        self.exit_code = match worst {
            None => EXIT_OK,
            Some(Class::Failed) => EXIT_FAILED,
            Some(Class::Unavailable) => EXIT_UNAVAILABLE,
            Some(Class::Integrity) => EXIT_INTEGRITY,
        };
    }

    pub fn failed(&self) -> usize {
        self.repositories
            .iter()
            .filter(|r| r.outcome == Outcome::Failed)
            .count()
    }

    /// The closing line for a person.
    pub fn line(&self) -> String {
        let rate = if self.seconds > 0.0 {
            format!(
                ", {}/s",
                human_bytes((self.bytes as f64 / self.seconds) as u64)
            )
        } else {
            String::new()
        };
        format!(
            "{}{}: {} repositories, {} failed, {} in {:.1} s{rate}",
            self.role.as_str(),
            if self.dry_run { " (dry run)" } else { "" },
            self.repositories.len(),
            self.failed(),
            human_bytes(self.bytes),
            self.seconds,
        )
    }
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A refused start: the exit status and what to say.
#[derive(Debug)]
pub struct Refused {
    pub code: i32,
    pub message: String,
}

impl From<ConfigError> for Refused {
    fn from(e: ConfigError) -> Refused {
        Refused {
            code: EXIT_CONFIG,
            message: format!("configuration: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(reports: Vec<RepoReport>) -> Summary {
        Summary {
            role: Role::Consume,
            dry_run: false,
            started_at: 0,
            seconds: 1.0,
            bytes: 0,
            repositories: reports,
            error: None,
            exit_code: -1,
        }
    }

    #[test]
    fn the_worst_failure_sets_the_exit_status() {
        let ok = RepoReport::new("a", Outcome::UpToDate);
        let mut s = summary(vec![ok.clone()]);
        s.settle(None);
        assert_eq!(s.exit_code, EXIT_OK);
        let gap = RepoReport::failed(
            "b",
            &SyncError::Gap {
                missing: 3,
                latest: 5,
            },
        );
        let mut s = summary(vec![ok.clone(), gap.clone()]);
        s.settle(None);
        assert_eq!(s.exit_code, EXIT_FAILED);
        assert!(
            gap.line()
                .contains("hint: on the source side run `votingctl partition-sync produce")
        );
        let tampered = RepoReport::failed(
            "c",
            &SyncError::Crypto(crate::crypto::CryptoError::Authentication { chunk: 0 }),
        );
        let mut s = summary(vec![gap.clone(), tampered]);
        s.settle(Some(Class::Unavailable));
        assert_eq!(s.exit_code, EXIT_INTEGRITY);
        let mut s = summary(vec![gap]);
        s.settle(Some(Class::Unavailable));
        assert_eq!(s.exit_code, EXIT_UNAVAILABLE);
    }

    #[test]
    fn sizes_read_well() {
        assert_eq!(human_bytes(12), "12 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 * 1024 * 1024 * 1024), "3.0 GiB");
    }
}
