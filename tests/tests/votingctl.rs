//! votingctl's operator commands, run as the real binary against a real etcd, three
//! real votingd nodes, a real router and real git: `repos list`, `replicas
//! get|remove|add|sync`, `verify` catching a replica changed on disk (then repaired),
//! `track` adopting repositories made directly on disk, `dataloss` after the only
//! surviving replica turned out to be outdated and `accept-dataloss` bringing writes
//! back; bad input refused with clear messages and a non-zero exit. One cluster for
//! all of it (start-up is costly); the steps that stop nodes come last.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use refvote_proto::gitaly::CalculateChecksumRequest;
use refvote_proto::gitaly::repository_service_client::RepositoryServiceClient;
use refvote_tests::cluster::Fixture;
use refvote_tests::git;
use refvote_tests::grpc::{channel, repo};
use refvote_tests::node::{Node, bin};
use refvote_tests::proc::wait_until;
use serde_json::Value;

struct Ctl {
    etcd: String,
}

impl Ctl {
    async fn run(&self, args: &[&str]) -> anyhow::Result<Output> {
        let out = tokio::process::Command::new(bin("votingctl"))
            .args(args)
            .arg("--etcd")
            .arg(&self.etcd)
            .kill_on_drop(true)
            .output()
            .await?;
        Ok(out)
    }

    /// Runs with `--json`; the exit code and the parsed document.
    async fn json(&self, args: &[&str]) -> anyhow::Result<(i32, Value)> {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.run(&a).await?;
        let doc = serde_json::from_slice(&out.stdout).map_err(|e| {
            anyhow::anyhow!(
                "votingctl {args:?}: not JSON ({e}): {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        Ok((out.status.code().unwrap_or(-1), doc))
    }

    /// Runs and expects failure; its stderr.
    async fn fails(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.run(args).await?;
        anyhow::ensure!(
            !out.status.success(),
            "votingctl {args:?} succeeded: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        Ok(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

async fn node_checksum(node: &Node, relative: &str) -> anyhow::Result<String> {
    Ok(RepositoryServiceClient::new(channel(node).await)
        .calculate_checksum(CalculateChecksumRequest {
            repository: repo(relative),
        })
        .await?
        .into_inner()
        .checksum)
}

/// The `repos list --json` entry of `name`.
async fn listed(ctl: &Ctl, name: &str) -> anyhow::Result<Value> {
    let (code, doc) = ctl.json(&["repos", "list"]).await?;
    anyhow::ensure!(code == 0, "repos list exited {code}");
    doc.as_array()
        .and_then(|a| a.iter().find(|r| r["repo"] == name))
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("{name} not listed: {doc}"))
}

async fn wait_all_current(ctl: &Ctl, name: &str, what: &str) -> anyhow::Result<()> {
    wait_until(what, Duration::from_secs(30), || async {
        listed(ctl, name)
            .await
            .is_ok_and(|r| r["available"] == 3 && r["outdated"] == 0 && r["repairing"] == 0)
    })
    .await
}

fn replica<'a>(repo: &'a Value, node: &str) -> &'a Value {
    repo["replicas"]
        .as_array()
        .and_then(|a| a.iter().find(|r| r["node"] == node))
        .unwrap_or(&Value::Null)
}

/// A commit made in a bare repository on disk, behind the cluster's back (no hook).
fn change_on_disk(repo: &Path) -> anyhow::Result<String> {
    let commit = git::git(
        repo,
        &[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "commit-tree",
            "main^{tree}",
            "-p",
            "main",
            "-m",
            "changed on disk",
        ],
    )?;
    let commit = commit.trim().to_owned();
    git::git(
        repo,
        &[
            "-c",
            "core.hooksPath=/dev/null",
            "update-ref",
            "refs/heads/main",
            &commit,
        ],
    )?;
    Ok(commit)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_commands_against_a_real_cluster() -> anyhow::Result<()> {
    let mut c = Fixture::nodes(3).router().start().await?;
    let router = &c.routers[0];
    let ctl = Ctl {
        etcd: c.etcd.endpoints().join(","),
    };
    c.create_and_push(router, "a.git").await?;

    // repos list: table and JSON.
    let out = ctl.run(&["repos", "list"]).await?;
    assert!(out.status.success(), "{}", text(&out));
    let t = text(&out);
    assert!(
        t.contains("REPOSITORY") && t.contains("default/a.git"),
        "{t}"
    );
    let a = listed(&ctl, "default/a.git").await?;
    assert_eq!(a["generation"], 1, "{a}");
    assert_eq!(a["available"], 3, "{a}");
    assert_eq!(a["replicas"].as_array().unwrap().len(), 3, "{a}");

    // status: the node's health, then the cluster view read from etcd.
    let config = c.node("node1").config.display().to_string();
    let out = std::process::Command::new(bin("votingctl"))
        .args(["status", "--config", &config])
        .output()?;
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("cluster (from etcd):"), "{t}");
    assert!(t.contains("router1") && t.contains("(leader)"), "{t}");
    assert!(
        t.contains("1 registered, 0 with a replica outdated or down"),
        "{t}"
    );
    let out = std::process::Command::new(bin("votingctl"))
        .args(["status", "--json", "--config", &config])
        .output()?;
    let doc: Value = serde_json::from_slice(&out.stdout)?;
    let view = &doc["cluster_view"];
    assert_eq!(view["nodes"].as_array().map(Vec::len), Some(3), "{doc}");
    assert_eq!(view["routers"][0]["name"], "router1", "{doc}");
    assert!(
        view["nodes"][0]["ttl_secs"].as_i64().unwrap_or(0) > 0,
        "{doc}"
    );
    assert_eq!(doc["node"], "node1", "{doc}");

    // replicas get (the router found through etcd's routers/ records), remove, add, sync.
    let (code, got) = ctl.json(&["replicas", "get", "default/a.git"]).await?;
    assert_eq!(code, 0);
    assert_eq!(got["threshold"], 2, "{got}");
    assert_eq!(got["replicas"].as_array().unwrap().len(), 3, "{got}");
    let (code, removed) = ctl
        .json(&["replicas", "remove", "default/a.git", "--node", "node3"])
        .await?;
    assert_eq!(code, 0, "{removed}");
    assert_eq!(
        removed["removed"],
        serde_json::json!(["node3"]),
        "{removed}"
    );
    assert!(!c.node("node3").repo("a.git").exists());
    let router_addr = router.addr().to_string();
    let out = ctl
        .run(&[
            "replicas",
            "add",
            "default/a.git",
            "--count",
            "1",
            "--router",
            &router_addr,
        ])
        .await?;
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("added node3"), "{}", text(&out));
    let out = ctl
        .run(&["replicas", "remove", "default/a.git", "--node", "node2"])
        .await?;
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("removed node2"), "{}", text(&out));
    let (code, added) = ctl
        .json(&["replicas", "add", "default/a.git", "--node", "node2"])
        .await?;
    assert_eq!(code, 0, "{added}");
    assert_eq!(added["added"], serde_json::json!(["node2"]), "{added}");
    let e = ctl
        .fails(&["replicas", "add", "default/a.git", "--node", "node9"])
        .await?;
    assert!(
        e.contains("CreateRepositoryReplicas default/a.git") && e.contains("node9"),
        "{e}"
    );
    let e = ctl
        .fails(&["replicas", "remove", "default/nope.git", "--node", "node1"])
        .await?;
    assert!(e.contains("NotFound"), "{e}");
    let (code, synced) = ctl.json(&["replicas", "sync", "default/a.git"]).await?;
    assert_eq!(code, 0, "{synced}");
    let out = ctl.run(&["replicas", "get", "default/a.git"]).await?;
    assert!(
        out.status.success() && text(&out).contains("node3"),
        "{}",
        text(&out)
    );

    // verify: all equal, then a replica changed on disk is caught and repaired.
    let (code, v) = ctl.json(&["verify"]).await?;
    assert_eq!(code, 0, "{v}");
    assert!(
        v[0]["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["result"] == "match"),
        "{v}"
    );
    let good = node_checksum(c.node("node1"), "a.git").await?;
    let head = git::rev(&c.node("node1").repo("a.git"), "refs/heads/main");
    change_on_disk(&c.node("node2").repo("a.git"))?;
    assert_ne!(node_checksum(c.node("node2"), "a.git").await?, good);
    let out = ctl.run(&["verify", "default/a.git"]).await?;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let t = text(&out);
    assert!(
        t.contains("mismatch") && t.contains("queued for repair: node2"),
        "{t}"
    );
    wait_all_current(&ctl, "default/a.git", "node2 repaired after verify").await?;
    assert_eq!(node_checksum(c.node("node2"), "a.git").await?, good);
    assert_eq!(
        git::rev(&c.node("node2").repo("a.git"), "refs/heads/main"),
        head
    );
    let (code, v) = ctl.json(&["verify", "default/a.git"]).await?;
    assert_eq!(code, 0, "{v}");

    // track: repositories made directly on disk are adopted; a differing copy repaired.
    let seed = c.work("adopt-seed")?;
    seed.commit("main", "adopted")?;
    for n in ["node1", "node2"] {
        let path = c.node(n).repo("adopt.git");
        git::init_bare(&path, &c.node(n).hooks)?;
        let out = git::push(&seed.path, &path, &["main"], &[]).await?;
        assert!(out.status.success(), "{out:?}");
    }
    let other = c.work("adopt-other")?;
    other.commit("main", "something else")?;
    let path3 = c.node("node3").repo("adopt.git");
    git::init_bare(&path3, &c.node("node3").hooks)?;
    assert!(
        git::push(&other.path, &path3, &["main"], &[])
            .await?
            .status
            .success()
    );
    let (code, t) = ctl
        .json(&["track", "default/adopt.git", "--nodes", "node1,node2,node3"])
        .await?;
    assert_eq!(code, 0, "{t}");
    assert_eq!(t["outdated"], serde_json::json!(["node3"]), "{t}");
    wait_all_current(&ctl, "default/adopt.git", "node3 repaired after track").await?;
    assert_eq!(
        node_checksum(c.node("node3"), "adopt.git").await?,
        node_checksum(c.node("node1"), "adopt.git").await?
    );
    // Tracked on two nodes that agree: nothing queued; then writable through the router.
    for n in ["node2", "node3"] {
        let path = c.node(n).repo("two.git");
        git::init_bare(&path, &c.node(n).hooks)?;
        assert!(
            git::push(&seed.path, &path, &["main"], &[])
                .await?
                .status
                .success()
        );
    }
    let out = ctl
        .run(&["track", "default/two.git", "--nodes", "node2,node3"])
        .await?;
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("every copy matches"), "{}", text(&out));
    seed.commit("main", "after tracking")?;
    let out = git::push(
        &seed.path,
        Path::new(&router.http_url("two.git")),
        &["main"],
        &[],
    )
    .await?;
    assert!(out.status.success(), "{out:?}");

    // Bad input: clear messages, non-zero exits, nothing changed.
    let e = ctl.fails(&["replicas", "get", "default/nope.git"]).await?;
    assert!(e.contains("NotFound") && e.contains("repos list"), "{e}");
    let e = ctl.fails(&["verify", "default/nope.git"]).await?;
    assert!(e.contains("not registered"), "{e}");
    let e = ctl
        .fails(&[
            "accept-dataloss",
            "default/a.git",
            "--authoritative",
            "node9",
        ])
        .await?;
    assert!(e.contains("node9 holds no replica of default/a.git"), "{e}");
    let e = ctl
        .fails(&[
            "accept-dataloss",
            "default/a.git",
            "--authoritative",
            "node1",
        ])
        .await?;
    assert!(e.contains("no data loss"), "{e}");
    let e = ctl
        .fails(&["track", "default/x.git", "--nodes", "node1,node9"])
        .await?;
    assert!(e.contains("node node9 is unknown or down"), "{e}");
    let e = ctl
        .fails(&["track", "default/a.git", "--nodes", "node1"])
        .await?;
    assert!(e.contains("already tracked"), "{e}");
    let e = ctl.fails(&["replicas", "get", "nostorage"]).await?;
    assert!(e.contains("<storage>/<relative path>"), "{e}");
    let e = ctl.fails(&["replicas", "add", "default/a.git"]).await?;
    assert!(e.contains("--count N"), "{e}");
    let out = tokio::process::Command::new(bin("votingctl"))
        .args(["dataloss", "--etcd", "http://127.0.0.1:9"])
        .output()
        .await?;
    assert!(!out.status.success());
    assert!(text(&out).contains("does not answer"), "{}", text(&out));
    let (code, d) = ctl.json(&["dataloss"]).await?;
    assert_eq!((code, d.clone()), (0, serde_json::json!([])), "{d}");

    // dataloss: node1 misses a push, then the two that have it go down and node1 comes
    // back: its replica is the only live one and it is outdated.
    let (dwork, _) = c.create_and_push(router, "d.git").await?;
    c.nodes[0].kill()?;
    dwork.commit("main", "only on node2 and node3")?;
    let url = router.http_url("d.git");
    wait_until(
        "a push without node1 succeeds",
        Duration::from_secs(30),
        || async {
            git::push(&dwork.path, Path::new(&url), &["main"], &[])
                .await
                .is_ok_and(|o| o.status.success())
        },
    )
    .await?;
    wait_until(
        "node1 outdated on d.git",
        Duration::from_secs(20),
        || async {
            listed(&ctl, "default/d.git")
                .await
                .is_ok_and(|r| replica(&r, "node1")["up_to_date"] == false)
        },
    )
    .await?;
    c.nodes[1].kill()?;
    c.nodes[2].kill()?;
    c.nodes[0].launch().await?;
    wait_until("dataloss lists d.git", Duration::from_secs(30), || async {
        ctl.json(&["dataloss"]).await.is_ok_and(|(code, d)| {
            code == 1
                && d.as_array().is_some_and(|a| {
                    a.iter().any(|r| r["repo"] == "default/d.git")
                        && !a.iter().any(|r| r["repo"] == "default/a.git")
                })
        })
    })
    .await?;
    let out = ctl.run(&["dataloss"]).await?;
    assert!(text(&out).contains("accept-dataloss"), "{}", text(&out));
    let out = std::process::Command::new(bin("votingctl"))
        .args(["status", "--config", &config])
        .output()?;
    let t = text(&out);
    assert!(
        t.contains("default/d.git: 0/3 available") && t.contains("NO up-to-date replica"),
        "{t}"
    );
    let e = ctl
        .fails(&[
            "accept-dataloss",
            "default/d.git",
            "--authoritative",
            "node2",
        ])
        .await?;
    assert!(e.contains("node2 is down"), "{e}");
    let (code, acc) = ctl
        .json(&[
            "accept-dataloss",
            "default/d.git",
            "--authoritative",
            "node1",
        ])
        .await?;
    assert_eq!(code, 0, "{acc}");
    let mut outdated: Vec<String> =
        serde_json::from_value(acc["outdated"].clone()).unwrap_or_default();
    outdated.sort();
    assert_eq!(outdated, ["node2", "node3"], "{acc}");
    let (_, d) = ctl.json(&["dataloss"]).await?;
    assert!(
        !d.as_array()
            .unwrap()
            .iter()
            .any(|r| r["repo"] == "default/d.git"),
        "{d}"
    );
    // The others come back, are repaired from node1, and writes work again.
    c.nodes[1].launch().await?;
    c.nodes[2].launch().await?;
    wait_all_current(&ctl, "default/d.git", "d.git repaired from node1").await?;
    let kept = git::rev(&c.node("node1").repo("d.git"), "refs/heads/main");
    assert_eq!(
        git::rev(&c.node("node2").repo("d.git"), "refs/heads/main"),
        kept
    );
    let fresh = c.work("after-accept")?;
    git::git(
        &fresh.path,
        &[
            "fetch",
            &c.node("node1").repo("d.git").display().to_string(),
            "main",
        ],
    )?;
    git::git(&fresh.path, &["checkout", "-B", "main", "FETCH_HEAD"])?;
    let new_head = fresh.commit("main", "after accepting the loss")?;
    let out = git::push(&fresh.path, Path::new(&url), &["main"], &[]).await?;
    assert!(out.status.success(), "{out:?}");
    for n in ["node1", "node2", "node3"] {
        assert_eq!(
            git::rev(&c.node(n).repo("d.git"), "refs/heads/main").as_deref(),
            Some(new_head.as_str()),
            "{n}"
        );
    }
    let (code, v) = ctl.json(&["verify", "default/d.git"]).await?;
    assert_eq!(code, 0, "{v}");
    Ok(())
}
