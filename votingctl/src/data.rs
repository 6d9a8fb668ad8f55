//! `verify`, `accept-dataloss` and `track`: the commands that compare replicas' data
//! (Gitaly's `CalculateChecksum` on each node) and change their records. The copies
//! themselves are left to the routers' repair workers, through repair jobs.

use std::collections::BTreeMap;

use anyhow::bail;
use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use refvote_cluster::RepoId;
use refvote_cluster::records::{JobRecord, ReplicaRecord, ReplicaState, RepoRecord};
use refvote_cluster::store::encode;
use serde::Serialize;

use crate::connect::{Ctl, etcd_error, table};

/// One replica's verification.
#[derive(Debug, Clone, Serialize)]
pub struct Checked {
    pub node: String,
    /// `match`, `mismatch` (marked outdated), `not_current` (not compared: not up to
    /// date), `down`, or `error`.
    pub result: String,
    pub checksum: String,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Verified {
    pub repo: String,
    pub generation: u64,
    /// The checksum most up-to-date replicas have (empty: no majority).
    pub expected: String,
    pub replicas: Vec<Checked>,
    /// Replicas marked outdated (repair jobs queued).
    pub marked_outdated: Vec<String>,
    /// Why nothing could be decided, if so.
    pub problem: String,
}

/// `votingctl verify [<repo>]`: exit 0 when every compared replica matched, 1 when
/// some did not (they are marked outdated and queued for repair) or could not be
/// checked.
pub async fn verify(ctl: &Ctl, repo: Option<RepoId>) -> anyhow::Result<i32> {
    let repos = match repo {
        Some(r) => {
            ctl.view(&r).await?;
            vec![r]
        }
        None => crate::repos::snapshot(ctl)
            .await?
            .into_iter()
            .filter_map(|s| RepoId::parse(&s.repo).ok())
            .collect(),
    };
    let mut results = Vec::new();
    for r in &repos {
        results.push(verify_one(ctl, r).await?);
    }
    let bad = results
        .iter()
        .any(|v| !v.marked_outdated.is_empty() || !v.problem.is_empty());
    ctl.print(&results, || {
        let mut rows = Vec::new();
        for v in &results {
            for c in &v.replicas {
                rows.push(vec![
                    v.repo.clone(),
                    v.generation.to_string(),
                    c.node.clone(),
                    c.result.clone(),
                    c.checksum.chars().take(12).collect(),
                    c.detail.clone(),
                ]);
            }
        }
        let mut out = table(
            &[
                "REPOSITORY",
                "GENERATION",
                "NODE",
                "RESULT",
                "CHECKSUM",
                "DETAIL",
            ],
            &rows,
        );
        for v in &results {
            if !v.marked_outdated.is_empty() {
                out.push_str(&format!(
                    "{}: marked outdated and queued for repair: {}\n",
                    v.repo,
                    v.marked_outdated.join(", ")
                ));
            }
            if !v.problem.is_empty() {
                out.push_str(&format!("{}: {}\n", v.repo, v.problem));
            }
        }
        if results.is_empty() {
            out = "no repositories are registered\n".into();
        }
        out
    });
    Ok(if bad { 1 } else { 0 })
}

async fn verify_one(ctl: &Ctl, repo: &RepoId) -> anyhow::Result<Verified> {
    // Checksums are compared only when the generation did not move while they were
    // taken: a write landing in between would look like a mismatch.
    for _ in 0..5 {
        let view = ctl.view(repo).await?;
        let mut checked = Vec::new();
        let mut sums: BTreeMap<String, String> = BTreeMap::new();
        for node in &view.record.assigned {
            let current = view
                .replicas
                .get(node)
                .is_some_and(|(r, _)| r.is_up_to_date(&view.record));
            let mut c = Checked {
                node: node.clone(),
                result: String::new(),
                checksum: String::new(),
                detail: String::new(),
            };
            if !view.live_nodes.contains_key(node) {
                c.result = "down".into();
                c.detail = "node holds no lease; not checked".into();
            } else if !current {
                c.result = "not_current".into();
                c.detail = view
                    .replicas
                    .get(node)
                    .map(|(r, _)| {
                        format!(
                            "{} at generation {}: {}",
                            crate::repos::state_name(r.state),
                            r.generation,
                            r.reason
                        )
                    })
                    .unwrap_or_else(|| "no replica record".into());
            } else {
                match ctl.checksum(&view, node).await {
                    Ok(sum) => {
                        c.checksum = sum.clone();
                        sums.insert(node.clone(), sum);
                    }
                    Err(e) => {
                        c.result = "error".into();
                        c.detail = format!("{e:#}");
                    }
                }
            }
            checked.push(c);
        }
        let after = ctl.view(repo).await?;
        if after.record.generation != view.record.generation {
            continue;
        }
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for s in sums.values() {
            *counts.entry(s.as_str()).or_default() += 1;
        }
        let best = counts.iter().max_by_key(|(_, n)| **n);
        let mut out = Verified {
            repo: repo.to_string(),
            generation: view.record.generation,
            expected: String::new(),
            replicas: Vec::new(),
            marked_outdated: Vec::new(),
            problem: String::new(),
        };
        // The expected checksum: the one a strict majority of the compared replicas
        // share; with a tie, the one recorded in etcd at this generation, if any.
        let expected = match best {
            Some((sum, n)) if *n * 2 > sums.len() => Some(sum.to_string()),
            Some(_) => {
                let recorded: Vec<&str> = sums
                    .keys()
                    .filter_map(|n| view.replicas.get(n))
                    .map(|(r, _)| r.checksum.as_str())
                    .filter(|s| !s.is_empty() && counts.contains_key(s))
                    .collect();
                match recorded.first() {
                    Some(s) if recorded.iter().all(|r| r == s) => Some(s.to_string()),
                    _ => None,
                }
            }
            None => None,
        };
        match &expected {
            Some(e) => out.expected = e.clone(),
            None if !sums.is_empty() => {
                out.problem = "the up-to-date replicas disagree and no checksum has a majority; \
                     run `votingctl replicas sync` or `accept-dataloss` with the replica to keep"
                    .into();
            }
            None => {}
        }
        for mut c in checked {
            if let Some(sum) = sums.get(&c.node) {
                match &expected {
                    Some(e) if e == sum => c.result = "match".into(),
                    Some(e) => {
                        c.result = "mismatch".into();
                        let reason = format!(
                            "votingctl verify: checksum {} differs from the majority's {} at generation {}",
                            short(sum),
                            short(e),
                            view.record.generation
                        );
                        if ctl
                            .store
                            .mark_outdated_if_unchanged(&view, &c.node, &reason)
                            .await
                            .map_err(etcd_error)?
                        {
                            c.detail = "marked outdated; repair will copy it again".into();
                            out.marked_outdated.push(c.node.clone());
                        } else {
                            c.detail =
                                "not marked: the repository changed meanwhile; run verify again"
                                    .into();
                            if out.problem.is_empty() {
                                out.problem =
                                    "writes landed while marking; run verify again".into();
                            }
                        }
                    }
                    None => c.result = "undecided".into(),
                }
            }
            out.replicas.push(c);
        }
        if out.replicas.iter().any(|c| c.result == "error") && out.problem.is_empty() {
            out.problem = "some replicas could not be checked (see DETAIL); retry".into();
        }
        return Ok(out);
    }
    bail!("{repo} kept changing (writes landed during every attempt); retry when it is quieter")
}

fn short(s: &str) -> &str {
    &s[..s.len().min(12)]
}

/// `votingctl accept-dataloss <repo> --authoritative <node>`.
pub async fn accept_dataloss(ctl: &Ctl, repo: &RepoId, node: &str) -> anyhow::Result<i32> {
    let view = ctl.view(repo).await?;
    let record = &view.record;
    if !record.assigned.iter().any(|n| n == node) {
        bail!(
            "{node} holds no replica of {repo} (its replicas: {}); choose one of those",
            record.assigned.join(", ")
        );
    }
    if !view.live_nodes.contains_key(node) {
        bail!(
            "{node} is down (it holds no etcd lease); start it first: the authoritative replica must be readable"
        );
    }
    let available = view.up_to_date_live();
    if !available.is_empty() {
        bail!(
            "{repo} has no data loss: {} up to date on live nodes; nothing to accept (use `votingctl replicas sync` to level replicas)",
            available.join(", ")
        );
    }
    if view.lock.is_some() {
        bail!("{repo} is locked by an administrative operation; retry when it finishes");
    }
    let checksum = ctl.checksum(&view, node).await?;
    let keys = ctl.store.keys();
    let generation = record.generation + 1;
    let reason = format!(
        "accept-dataloss: {node} made authoritative at generation {generation}; repair copies it"
    );
    let mut cmp = vec![
        Compare::mod_revision(
            keys.repo(repo),
            CompareOp::Equal,
            view.record_entry.mod_revision,
        ),
        Compare::create_revision(keys.lock(repo), CompareOp::Equal, 0),
        Compare::create_revision(
            keys.node(node),
            CompareOp::Equal,
            view.live_nodes[node].1.create_revision,
        ),
    ];
    let new_record = RepoRecord {
        generation,
        ..record.clone()
    };
    let mut ops = vec![TxnOp::put(keys.repo(repo), encode(&new_record), None)];
    let mut outdated = Vec::new();
    for n in &record.assigned {
        let old = view.replicas.get(n);
        match old {
            Some((_, e)) => cmp.push(Compare::mod_revision(
                keys.replica(repo, n),
                CompareOp::Equal,
                e.mod_revision,
            )),
            None => cmp.push(Compare::create_revision(
                keys.replica(repo, n),
                CompareOp::Equal,
                0,
            )),
        }
        let epoch = old.map_or(0, |(r, _)| r.repair_epoch + 1);
        if n == node {
            let r = ReplicaRecord {
                node: n.clone(),
                generation,
                state: ReplicaState::UpToDate,
                repair_epoch: epoch,
                checksum: checksum.clone(),
                reason: String::new(),
            };
            ops.push(TxnOp::put(keys.replica(repo, n), encode(&r), None));
            ops.push(TxnOp::delete(keys.repair_job(repo, n), None));
        } else {
            let r = ReplicaRecord {
                node: n.clone(),
                generation: old.map_or(0, |(r, _)| r.generation),
                state: ReplicaState::Outdated,
                repair_epoch: epoch,
                checksum: old.map_or(String::new(), |(r, _)| r.checksum.clone()),
                reason: reason.clone(),
            };
            let job = JobRecord::new(repo.clone(), n.clone(), r.generation, reason.clone());
            ops.push(TxnOp::put(keys.replica(repo, n), encode(&r), None));
            ops.push(TxnOp::put(keys.repair_job(repo, n), encode(&job), None));
            outdated.push(n.clone());
        }
    }
    let resp = ctl
        .store
        .txn(Txn::new().when(cmp).and_then(ops))
        .await
        .map_err(etcd_error)?;
    if !resp.succeeded() {
        bail!(
            "{repo} changed while this ran (a node came or went, or a repair moved); nothing written; check `votingctl dataloss` and retry"
        );
    }
    let doc = serde_json::json!({
        "repo": repo.to_string(),
        "authoritative": node,
        "generation": generation,
        "checksum": checksum,
        "outdated": outdated,
    });
    ctl.print(&doc, || {
        format!(
            "{repo}: {node} is authoritative at generation {generation}; {} outdated and queued for repair from it\n",
            if outdated.is_empty() { "no other replica".into() } else { outdated.join(", ") }
        )
    });
    Ok(0)
}

/// `votingctl track <repo> --nodes a,b,c`.
pub async fn track(ctl: &Ctl, repo: &RepoId, nodes: &[String]) -> anyhow::Result<i32> {
    if nodes.is_empty() {
        bail!("name the nodes that hold it: --nodes a,b,c (the first one's copy is kept)");
    }
    let mut unique = nodes.to_vec();
    unique.sort();
    unique.dedup();
    if unique.len() != nodes.len() {
        bail!("--nodes names a node twice; one replica per node");
    }
    let keys = ctl.store.keys();
    if ctl
        .store
        .get(&keys.repo(repo))
        .await
        .map_err(etcd_error)?
        .is_some()
    {
        bail!("{repo} is already tracked; see `votingctl replicas get {repo}`");
    }
    // A view of the live nodes (the repository is not registered yet).
    let (node_entries, _) = ctl
        .store
        .get_prefix(&keys.nodes())
        .await
        .map_err(etcd_error)?;
    let mut live = BTreeMap::new();
    for e in &node_entries {
        let rec: refvote_cluster::records::NodeRecord = e.decode()?;
        live.insert(rec.name.clone(), (rec, e.clone()));
    }
    for n in nodes {
        if !live.contains_key(n) {
            let known: Vec<&String> = live.keys().collect();
            bail!(
                "node {n} is unknown or down (live nodes: {}); start it, or leave it out",
                known
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    let record = RepoRecord {
        repo: repo.clone(),
        assigned: nodes.to_vec(),
        replication_factor: nodes.len() as u32,
        generation: 0,
        creation_checksum: String::new(),
    };
    let view = refvote_cluster::repository::RepoView {
        revision: 0,
        record: record.clone(),
        record_entry: node_entries[0].clone(),
        replicas: BTreeMap::new(),
        live_nodes: live,
        lock: None,
    };
    let first = &nodes[0];
    let authoritative = ctl.checksum(&view, first).await.map_err(|e| {
        anyhow::anyhow!("{e:#}; the first node's copy must exist (it is the one kept)")
    })?;
    let mut sums = BTreeMap::new();
    for n in &nodes[1..] {
        // A missing or unreadable copy is repaired like a differing one.
        let sum = ctl
            .checksum(&view, n)
            .await
            .unwrap_or_else(|e| format!("unreadable: {e:#}"));
        sums.insert(n.clone(), sum);
    }
    let mut ops = vec![TxnOp::put(
        keys.repo(repo),
        encode(&RepoRecord {
            creation_checksum: authoritative.clone(),
            ..record
        }),
        None,
    )];
    let mut cmp = vec![Compare::create_revision(
        keys.repo(repo),
        CompareOp::Equal,
        0,
    )];
    let mut outdated = Vec::new();
    for n in nodes {
        cmp.push(Compare::create_revision(
            keys.replica(repo, n),
            CompareOp::Equal,
            0,
        ));
        let same = n == first || sums.get(n) == Some(&authoritative);
        let reason = if same {
            String::new()
        } else {
            format!("votingctl track: its copy differs from {first}'s")
        };
        let r = ReplicaRecord {
            node: n.clone(),
            generation: 0,
            state: if same {
                ReplicaState::UpToDate
            } else {
                ReplicaState::Outdated
            },
            repair_epoch: 0,
            checksum: if same {
                authoritative.clone()
            } else {
                String::new()
            },
            reason: reason.clone(),
        };
        ops.push(TxnOp::put(keys.replica(repo, n), encode(&r), None));
        if !same {
            let job = JobRecord::new(repo.clone(), n.clone(), 0, reason);
            ops.push(TxnOp::put(keys.repair_job(repo, n), encode(&job), None));
            outdated.push(n.clone());
        }
    }
    let resp = ctl
        .store
        .txn(Txn::new().when(cmp).and_then(ops))
        .await
        .map_err(etcd_error)?;
    if !resp.succeeded() {
        bail!("{repo} was registered meanwhile; see `votingctl replicas get {repo}`");
    }
    let doc = serde_json::json!({
        "repo": repo.to_string(),
        "nodes": nodes,
        "checksum": authoritative,
        "outdated": outdated,
    });
    ctl.print(&doc, || {
        format!(
            "{repo}: tracked on {} (checksum {}); {}\n",
            nodes.join(", "),
            short(&authoritative),
            if outdated.is_empty() {
                "every copy matches".to_string()
            } else {
                format!(
                    "{} differ from {first} and are queued for repair",
                    outdated.join(", ")
                )
            }
        )
    });
    Ok(0)
}
