//! What a run leaves for monitoring. Each run is a one-shot (a timer starts it), so
//! there is no `/metrics` port: the run merges its outcome into a status file in the
//! cache dir (`<role>-status.json`: per repository the last success, sequence, lag and
//! error, kept across runs so a repository that failed today still shows when it last
//! succeeded) and, with `metrics_dir` set, writes `refvote_partition_sync_<role>.prom`
//! there for node_exporter's textfile collector, atomically (temp file and rename).
//! Dry runs change neither.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::report::{Outcome, Role, Summary};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub repositories: BTreeMap<String, RepoStatus>,
    #[serde(default)]
    pub last_run: Option<LastRun>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RepoStatus {
    /// Unix seconds of the last run that synced it (or found it in sync).
    pub last_success: Option<u64>,
    pub sequence: Option<u64>,
    pub lag: Option<u64>,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LastRun {
    pub at: u64,
    pub seconds: f64,
    pub bytes: u64,
    pub exit_code: i32,
}

impl Status {
    /// Folds a run's summary in.
    pub fn update(&mut self, summary: &Summary) {
        let end = summary.started_at + summary.seconds as u64;
        for r in &summary.repositories {
            let s = self.repositories.entry(r.repository.clone()).or_default();
            if r.sequence.is_some() {
                s.sequence = r.sequence;
            }
            if r.lag.is_some() {
                s.lag = r.lag;
            }
            if r.outcome == Outcome::Failed {
                s.last_error = r.error.clone();
            } else {
                s.last_success = Some(end);
                s.last_error = None;
            }
        }
        self.last_run = Some(LastRun {
            at: end,
            seconds: summary.seconds,
            bytes: summary.bytes,
            exit_code: summary.exit_code,
        });
    }

    /// The Prometheus text for `role`.
    pub fn render(&self, role: Role) -> String {
        let role = role.as_str();
        let mut t = String::new();
        let mut family = |name: &str, help: &str, rows: Vec<(String, String)>| {
            if rows.is_empty() {
                return;
            }
            t.push_str(&format!(
                "# HELP refvote_partition_sync_{name} {help}\n# TYPE refvote_partition_sync_{name} gauge\n"
            ));
            for (labels, value) in rows {
                t.push_str(&format!(
                    "refvote_partition_sync_{name}{{{labels}}} {value}\n"
                ));
            }
        };
        let repo = |r: &str| format!("role=\"{role}\",repository=\"{}\"", escape(r));
        let per = |f: &dyn Fn(&RepoStatus) -> Option<String>| -> Vec<(String, String)> {
            self.repositories
                .iter()
                .filter_map(|(r, s)| f(s).map(|v| (repo(r), v)))
                .collect()
        };
        family(
            "last_success_timestamp_seconds",
            "When the repository was last synced (or found in sync).",
            per(&|s| s.last_success.map(|v| v.to_string())),
        );
        family(
            "sequence",
            "The latest sequence written (produce) or applied (consume).",
            per(&|s| s.sequence.map(|v| v.to_string())),
        );
        family(
            "lag_sequences",
            "Sequences in the bucket not yet applied to the target.",
            per(&|s| s.lag.map(|v| v.to_string())),
        );
        family(
            "failing",
            "1 if the repository's last sync failed.",
            per(&|s| Some(u8::from(s.last_error.is_some()).to_string())),
        );
        if let Some(run) = &self.last_run {
            let l = format!("role=\"{role}\"");
            family(
                "last_run_timestamp_seconds",
                "When the last run ended.",
                vec![(l.clone(), run.at.to_string())],
            );
            family(
                "last_run_exit_code",
                "The last run's exit status (0 ok, 1 failures, 2 integrity, 69 unavailable).",
                vec![(l.clone(), run.exit_code.to_string())],
            );
            family(
                "last_run_bytes",
                "Bytes the last run moved through the bucket.",
                vec![(l.clone(), run.bytes.to_string())],
            );
            family(
                "last_run_duration_seconds",
                "How long the last run took.",
                vec![(l, format!("{:.3}", run.seconds))],
            );
        }
        t
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub fn status_path(cache_dir: &Path, role: Role) -> PathBuf {
    cache_dir.join(format!("{}-status.json", role.as_str()))
}

/// Merges `summary` into the status file and rewrites the metrics file.
pub fn record(cache_dir: &Path, metrics_dir: &Path, summary: &Summary) -> std::io::Result<()> {
    let path = status_path(cache_dir, summary.role);
    let mut status: Status = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    status.update(summary);
    std::fs::create_dir_all(cache_dir)?;
    write_atomic(
        &path,
        &serde_json::to_vec_pretty(&status).expect("serializable"),
    )?;
    if !metrics_dir.as_os_str().is_empty() {
        let prom = metrics_dir.join(format!(
            "refvote_partition_sync_{}.prom",
            summary.role.as_str()
        ));
        write_atomic(&prom, status.render(summary.role).as_bytes())?;
    }
    Ok(())
}

/// Writes `data` to `path` through a temp file in the same directory, fsynced, then
/// renamed over it: readers see the old or the new file, never half of one.
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::RepoReport;

    #[test]
    fn a_failure_keeps_the_last_success() {
        let mut status = Status::default();
        let mut ok = RepoReport::new("g/p.git", Outcome::Applied);
        ok.sequence = Some(4);
        ok.lag = Some(0);
        let mut s = Summary {
            role: Role::Consume,
            dry_run: false,
            started_at: 1000,
            seconds: 2.0,
            bytes: 10,
            repositories: vec![ok],
            error: None,
            exit_code: 0,
        };
        status.update(&s);
        let mut failed = RepoReport::new("g/p.git", Outcome::Failed);
        failed.error = Some("gap".into());
        failed.lag = Some(3);
        s.repositories = vec![failed];
        s.started_at = 2000;
        s.exit_code = 1;
        status.update(&s);
        let r = &status.repositories["g/p.git"];
        assert_eq!(r.last_success, Some(1002));
        assert_eq!(r.sequence, Some(4));
        assert_eq!(r.lag, Some(3));
        let text = status.render(Role::Consume);
        assert!(text.contains(
            "refvote_partition_sync_last_success_timestamp_seconds{role=\"consume\",repository=\"g/p.git\"} 1002\n"
        ), "{text}");
        assert!(text.contains(
            "refvote_partition_sync_failing{role=\"consume\",repository=\"g/p.git\"} 1\n"
        ));
        assert!(text.contains(
            "refvote_partition_sync_lag_sequences{role=\"consume\",repository=\"g/p.git\"} 3\n"
        ));
        assert!(text.contains("refvote_partition_sync_last_run_exit_code{role=\"consume\"} 1\n"));
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
