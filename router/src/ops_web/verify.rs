//! The verify job: each up-to-date replica's node computes its checksum
//! (`CalculateChecksum`, through the router's node calls) and the results are compared
//! with the majority's, as `votingctl verify` does, but changing nothing: the result
//! page says which replicas differ and Synchronize (the admin service) levels them.
//! Checksums count only when the repository's generation did not move while they
//! were taken, so a write in flight is never reported as a mismatch.

use std::collections::BTreeMap;

use refvote_cluster::RepoId;
use serde::Serialize;
use tonic::Status;

use super::OpsWeb;

/// One replica's verification (`votingctl verify --json`'s fields).
#[derive(Debug, Clone, Serialize)]
pub struct Checked {
    pub node: String,
    /// `match`, `mismatch`, `not_current` (not compared), `down`, or `error`.
    pub result: String,
    pub checksum: String,
    pub detail: String,
}

/// A repository's verification (`votingctl verify --json`'s fields; this one marks
/// nothing outdated).
#[derive(Debug, Clone, Serialize)]
pub struct Verified {
    pub repo: String,
    pub generation: u64,
    pub expected: String,
    pub replicas: Vec<Checked>,
    pub marked_outdated: Vec<String>,
    pub problem: String,
}

/// The checksum a strict majority of `sums` share.
pub fn majority(sums: &BTreeMap<String, String>) -> Option<String> {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for s in sums.values() {
        *counts.entry(s).or_default() += 1;
    }
    counts
        .into_iter()
        .find(|(_, n)| n * 2 > sums.len())
        .map(|(s, _)| s.to_owned())
}

pub async fn verify(web: &OpsWeb, repo: &RepoId) -> Result<Verified, Status> {
    let etcd = |e: refvote_cluster::Error| match e {
        refvote_cluster::Error::UnknownRepo(r) => {
            Status::not_found(format!("repository {r} is not registered"))
        }
        e => Status::unavailable(format!("etcd: {e}")),
    };
    // Compared only when no write landed while the checksums were taken.
    for _ in 0..5 {
        let view = web.store.repo_view(repo).await.map_err(etcd)?;
        let relative = &view.record.repo.relative_path;
        let (mut checked, mut sums) = (Vec::new(), BTreeMap::new());
        for node in &view.record.assigned {
            let record = view.replicas.get(node).map(|(r, _)| r);
            let mut c = Checked {
                node: node.clone(),
                result: String::new(),
                checksum: String::new(),
                detail: String::new(),
            };
            if !view.live_nodes.contains_key(node) {
                c.result = "down".into();
                c.detail = "node holds no lease; not checked".into();
            } else if !record.is_some_and(|r| r.is_up_to_date(&view.record)) {
                c.result = "not_current".into();
                c.detail = record.map_or("no replica record".into(), |r| r.reason.clone());
            } else {
                match crate::nodes::checksum(&web.pool, &view, node, relative).await {
                    Ok(sum) => {
                        c.checksum = sum.clone();
                        sums.insert(node.clone(), sum);
                    }
                    Err(e) => {
                        c.result = "error".into();
                        c.detail = e.to_string();
                    }
                }
            }
            checked.push(c);
        }
        let after = web.store.repo_view(repo).await.map_err(etcd)?;
        if after.record.generation != view.record.generation {
            continue;
        }
        let expected = majority(&sums).unwrap_or_default();
        let mut differ = Vec::new();
        for c in &mut checked {
            if c.result.is_empty() {
                c.result = if c.checksum == expected {
                    "match"
                } else {
                    differ.push(c.node.clone());
                    "mismatch"
                }
                .into();
            }
        }
        let problem = if expected.is_empty() && !sums.is_empty() {
            "the up-to-date replicas disagree and no checksum has a majority; \
             see Repairs and data loss"
                .to_string()
        } else if !differ.is_empty() {
            format!(
                "{} differ from the majority; Synchronize copies the majority's refs onto them",
                differ.join(", ")
            )
        } else {
            String::new()
        };
        return Ok(Verified {
            repo: repo.to_string(),
            generation: view.record.generation,
            expected,
            replicas: checked,
            marked_outdated: Vec::new(),
            problem,
        });
    }
    Err(Status::unavailable(
        "writes kept landing while the checksums were taken; retry",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_majority_is_strict() {
        let sums = |v: &[&str]| -> BTreeMap<String, String> {
            v.iter()
                .enumerate()
                .map(|(i, s)| (format!("n{i}"), s.to_string()))
                .collect()
        };
        assert_eq!(majority(&sums(&["a", "a", "b"])), Some("a".into()));
        assert_eq!(majority(&sums(&["a", "b"])), None);
        assert_eq!(majority(&sums(&[])), None);
    }
}
