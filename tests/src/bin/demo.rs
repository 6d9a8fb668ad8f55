//! The demo (`scripts/demo.sh`): a voted push across three replicas on one machine,
//! with real etcd, real votingd processes and real git. It checks every step it shows
//! and exits non-zero if one misbehaves, so CI runs it too.

use std::time::Instant;

use anyhow::{Context, ensure};
use refvote_cluster::records::ReplicaRecord;
use refvote_tests::cluster::VoteCluster;
use refvote_tests::git::{self, rev};

fn step(n: u32, text: &str) {
    println!("\n[{n}] {text}");
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let t0 = Instant::now();
    step(
        1,
        "starting a 3-member etcd and three storage nodes (votingd) on loopback",
    );
    let mut c = VoteCluster::start(3, 3).await?;
    println!("    etcd: {}", c.etcd.endpoints().join(" "));
    for n in &c.nodes {
        println!(
            "    {}: pid {}, storage {}",
            n.name,
            n.pid().unwrap_or(0),
            n.storage.display()
        );
    }

    step(
        2,
        "creating demo/project.git on all three nodes (core.hooksPath -> votingd's hook)",
    );
    let repo = c.create_repo("demo/project.git").await?;
    let work = c.work("alice")?;
    let first = work.commit("main", "first commit")?;

    step(
        3,
        "pushing main to the three replicas inside one refvote transaction",
    );
    let tx = c.begin(&repo).await?;
    println!(
        "    transaction {} voters {:?} threshold {}",
        tx.id, tx.voters, tx.threshold
    );
    for (node, out) in c.push_all(&tx, &work, &["main"]).await? {
        ensure!(
            out.status.success(),
            "push to {node} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        println!("    {node}: committed main = {}", &first[..12]);
    }
    let outcome = c.finalize(&tx).await?;
    ensure!(
        outcome.acknowledged && outcome.promoted.len() == 3,
        "unexpected outcome {outcome:?}"
    );
    println!(
        "    finalized: generation {}, promoted {:?}, acknowledged",
        outcome.generation, outcome.promoted
    );

    step(
        4,
        "node3's main drifts behind refvote's back; the next push is voted again",
    );
    let mallory = c.work("mallory")?;
    git::git(
        &mallory.path,
        &[
            "fetch",
            "--quiet",
            c.node("node1")
                .repo("demo/project.git")
                .to_str()
                .context("path")?,
            "main",
        ],
    )?;
    git::git(&mallory.path, &["reset", "--quiet", "--hard", "FETCH_HEAD"])?;
    mallory.commit("main", "an update only node3 has")?;
    let out = git::push(
        &mallory.path,
        &c.node("node3").repo("demo/project.git"),
        &["main"],
        &[],
    )
    .await?;
    ensure!(out.status.success(), "drift push failed");
    let second = work.commit("main", "second commit")?;
    let tx = c.begin(&repo).await?;
    for (node, out) in c.push_all(&tx, &work, &["+main"]).await? {
        let said = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            println!("    {node}: committed main = {}", &second[..12]);
        } else {
            let line = said
                .lines()
                .find(|l| l.starts_with("refvote:"))
                .unwrap_or("(no reason)");
            println!("    {node}: aborted; the pusher sees: {line}");
            ensure!(node == "node3", "{node} should have committed: {said}");
        }
    }
    let outcome = c.finalize(&tx).await?;
    ensure!(
        outcome.acknowledged && outcome.outdated == ["node3"],
        "unexpected outcome {outcome:?}"
    );
    for n in &c.nodes {
        let r: ReplicaRecord = c
            .store
            .get(&c.store.keys().replica(&repo, &n.name))
            .await?
            .context("replica")?
            .decode()?;
        let main = rev(&n.repo("demo/project.git"), "main").unwrap_or_default();
        println!(
            "    {}: main = {}  state {:?} at generation {}",
            n.name,
            &main[..12],
            r.state,
            r.generation
        );
    }

    step(
        5,
        "node2 goes down: one up-to-date replica is left, so writes fail fast",
    );
    c.nodes[1].kill()?;
    let store = c.store.clone();
    let started = Instant::now();
    let err = loop {
        // node2's lease lapses after its TTL (3 s here); until then it still counts.
        match c.begin(&repo).await {
            Err(e) => break e,
            Ok(tx) => {
                for v in &tx.voters {
                    store.done(&tx.id, v, false, "demo: not run").await?;
                }
                c.finalize(&tx).await?;
                ensure!(
                    started.elapsed().as_secs() < 15,
                    "node2's lease never lapsed"
                );
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
    };
    println!("    refused: {err:#}");
    ensure!(
        err.to_string().contains("1 of 3 up, 2 needed"),
        "unexpected error {err:#}"
    );

    step(6, "votingctl status on node1");
    let out = std::process::Command::new(refvote_tests::node::bin("votingctl"))
        .args(["status", "--socket"])
        .arg(&c.node("node1").socket)
        .output()?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    ensure!(
        out.status.success(),
        "votingctl status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    println!(
        "\ndemo complete in {:.1}s: every step behaved as expected",
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
