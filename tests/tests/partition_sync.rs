//! Partition sync between two refvote clusters on one machine: a producer reads
//! cluster A through its router (repositories resolved in A's registry) into a
//! SeaweedFS bucket on loopback, a consumer applies each sequence to cluster B through
//! B's router as voted writes. After every round every replica of B holds exactly the
//! source's refs (Gitaly's checksum, and the ref lists); with a node of B down the
//! consume still lands, on the two of three replicas a majority needs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use refvote_proto::gitaly::repository_service_client::RepositoryServiceClient;
use refvote_proto::gitaly::{CalculateChecksumRequest, WriteRefRequest};
use refvote_psync::config::{KeyConfig, StoreKind, SyncConfig, TargetKind};
use refvote_psync::crypto::MasterKey;
use refvote_psync::fault;
use refvote_tests::cluster::{Fixture, VoteCluster};
use refvote_tests::git::{self, WorkRepo};
use refvote_tests::node::bin;
use refvote_tests::seaweed::{self, Seaweed};

const REPO: &str = "group/project.git";
const SECOND: &str = "group/second.git";

/// A finished `votingctl partition-sync` run.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not a JSON summary ({e}): {self:?}"))
    }

    /// Sequences the consumer applied to `repository`.
    fn applied(&self, repository: &str) -> Vec<u64> {
        self.json()["repositories"]
            .as_array()
            .expect("repositories")
            .iter()
            .find(|r| r["repository"] == repository)
            .unwrap_or_else(|| panic!("{repository} not in {}", self.stdout))["applied"]
            .as_array()
            .map(|a| a.iter().map(|s| s.as_u64().unwrap()).collect())
            .unwrap_or_default()
    }
}

/// Both clusters, the bucket and the config both sides run with.
struct Sync {
    a: VoteCluster,
    b: VoteCluster,
    _weed: Seaweed,
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl Sync {
    async fn start() -> anyhow::Result<Sync> {
        let a = Fixture::nodes(3).router().start().await?;
        let b = Fixture::nodes(3).router().start().await?;
        let dir = tempfile::Builder::new()
            .prefix("refvote-psync-")
            .tempdir()?;
        let weed = Seaweed::start(dir.path());
        let key = dir.path().join("k1.key");
        std::fs::write(&key, MasterKey::generate_hex())?;
        set_private(&key)?;
        let creds = seaweed::write_credentials(&dir.path().join("s3.toml"));
        let mut c = SyncConfig::parse(
            r#"
            [store]
            bucket = "x"
            [encryption]
            keys = [{ id = "k1", file = "/k" }]
            [repositories]
            prefixes = ["group/"]
            [source]
            url = "/"
            [target]
            kind = "refvote"
            url = "/"
            node_config = "/n"
            "#,
        )?;
        c.cache_dir = dir.path().join("cache");
        c.store.kind = StoreKind::S3;
        c.store.endpoint = weed.endpoint.clone();
        c.store.bucket = seaweed::BUCKET.into();
        c.store.prefix = "a-to-b".into();
        c.store.credentials_file = Some(creds);
        c.store.retries = 2;
        c.store.retry_timeout_secs = 10;
        c.encryption.keys = vec![KeyConfig {
            id: "k1".into(),
            file: key,
        }];
        let source = c.source.as_mut().expect("source");
        source.url = base_url(&a);
        source.node_config = Some(a.nodes[0].config.clone());
        let target = c.target.as_mut().expect("target");
        assert_eq!(target.kind, TargetKind::Refvote);
        target.url = base_url(&b);
        target.node_config = Some(b.nodes[0].config.clone());
        let config = dir.path().join("sync.toml");
        std::fs::write(&config, toml::to_string(&c)?)?;
        Ok(Sync {
            a,
            b,
            _weed: weed,
            dir,
            config,
        })
    }

    /// `votingctl partition-sync ROLE --json --config sync.toml`.
    fn run(&self, role: &str) -> Run {
        self.run_with(role, &self.config, None)
    }

    /// `votingctl partition-sync ROLE --json --config CONFIG`, with a fault point armed
    /// if `fault` names one.
    fn run_with(&self, role: &str, config: &Path, fault: Option<&str>) -> Run {
        let home = self.dir.path().join("home");
        std::fs::create_dir_all(&home).expect("home");
        let mut cmd = Command::new(bin("votingctl"));
        cmd.args(["partition-sync", role, "--json", "--config"])
            .arg(config)
            .env("HOME", &home)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env_remove("REFVOTE_FAULT_POINT");
        if let Some(point) = fault {
            cmd.env("REFVOTE_FAULT_POINT", point);
        }
        let out = cmd.output().expect("run votingctl");
        Run {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// A producer run, then a consumer run; both must succeed. The consumer's run.
    fn round(&self) -> Run {
        let p = self.run("produce");
        assert_eq!(p.code, Some(0), "produce: {}\n{}", p.stdout, p.stderr);
        let c = self.run("consume");
        assert_eq!(
            c.code,
            Some(0),
            "consume: {}\n{}\n{}",
            c.stdout,
            c.stderr,
            self.b.routers[0].log_tail(30)
        );
        c
    }

    /// Pushes from `work` to REPO on A through its router; must succeed.
    async fn push(&self, work: &WorkRepo, args: &[&str]) -> anyhow::Result<()> {
        let url = self.a.routers[0].http_url(REPO);
        let out = git::push(&work.path, Path::new(&url), args, &[]).await?;
        anyhow::ensure!(out.status.success(), "push {args:?}: {out:?}");
        Ok(())
    }

    /// Every live replica of REPO on B holds exactly A's refs: the same ref list as
    /// A's node1, and the same Gitaly checksum (refs and HEAD) through each node's own
    /// CalculateChecksum. Returns how many replicas were compared.
    async fn assert_equal(&self, repo: &str, down: &[&str]) -> anyhow::Result<usize> {
        let source = &self.a.nodes[0];
        let want_refs = git::refs(&source.repo(repo));
        anyhow::ensure!(!want_refs.is_empty(), "the source has no refs");
        let want = checksum(source.grpc_url(), repo).await?;
        let mut compared = 0;
        for n in &self.b.nodes {
            if down.contains(&n.name.as_str()) {
                continue;
            }
            assert_eq!(
                git::refs(&n.repo(repo)),
                want_refs,
                "refs of {repo} on {} of B differ from A's",
                n.name
            );
            assert_eq!(
                checksum(n.grpc_url(), repo).await?,
                want,
                "checksum of {} on B",
                n.name
            );
            compared += 1;
        }
        Ok(compared)
    }
}

fn base_url(c: &VoteCluster) -> String {
    let url = c.routers[0].http_url(REPO);
    url.strip_suffix(REPO)
        .expect("the URL ends in the path")
        .to_owned()
}

fn set_private(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

async fn checksum(url: String, relative: &str) -> anyhow::Result<String> {
    let channel = tonic::transport::Endpoint::from_shared(url)?
        .connect()
        .await?;
    let r = RepositoryServiceClient::new(channel)
        .calculate_checksum(CalculateChecksumRequest {
            repository: refvote_tests::grpc::repo(relative),
        })
        .await?;
    Ok(r.into_inner().checksum)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repository_travels_between_two_clusters_voted_on_every_replica() -> anyhow::Result<()> {
    let mut s = Sync::start().await?;
    // A's repository, created through A's router; found by the prefix in A's registry.
    let (work, _) = s.a.create_and_push(&s.a.routers[0], REPO).await?;
    work.commit("feature", "a branch")?;
    s.push(&work, &["feature"]).await?;

    // Round 1: created on B from the full bundle, on all three replicas.
    let c = s.round();
    assert_eq!(c.applied(REPO), vec![1], "{c:?}");
    assert_eq!(s.assert_equal(REPO, &[]).await?, 3);
    let record =
        s.b.store
            .get(&s.b.store.keys().psync_applied(&s.b.repo_id(REPO)))
            .await?
            .expect("B's etcd records the applied sequence");
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&record.value)?["sequence"],
        1
    );

    // Round 2: two commits and a new branch; and a new repository under the prefix,
    // picked up from A's registry and created on B.
    work.commit("main", "second")?;
    work.commit("main", "third")?;
    work.commit("gone", "to be deleted")?;
    s.push(&work, &["main", "gone"]).await?;
    s.a.create_and_push(&s.a.routers[0], SECOND).await?;
    let c = s.round();
    assert_eq!(c.applied(REPO), vec![2], "{c:?}");
    assert_eq!(c.applied(SECOND), vec![1], "{c:?}");
    assert_eq!(s.assert_equal(SECOND, &[]).await?, 3);

    // Round 3: a force push (feature back two commits) and a deleted branch.
    git::git(&work.path, &["checkout", "--quiet", "main"])?;
    git::git(&work.path, &["branch", "-f", "feature", "main~2"])?;
    s.push(&work, &["--force", "feature", ":gone"]).await?;
    let c = s.round();
    assert_eq!(c.applied(REPO), vec![3], "{c:?}");
    assert_eq!(s.assert_equal(REPO, &[]).await?, 3);
    assert!(
        git::rev(&s.b.nodes[1].repo(REPO), "refs/heads/gone").is_none(),
        "the deleted branch is gone on B"
    );

    // HEAD moved at the source (a voted WriteRef through A's router): followed on B,
    // with no ref changed (assert_equal compares the checksums, which cover HEAD).
    let mut request = tonic::Request::new(WriteRefRequest {
        repository: refvote_tests::grpc::repo(REPO),
        r#ref: b"HEAD".to_vec(),
        revision: b"refs/heads/feature".to_vec(),
        ..Default::default()
    });
    request.set_timeout(Duration::from_secs(20));
    RepositoryServiceClient::new(s.a.routers[0].channel().await?)
        .write_ref(request)
        .await?;
    let c = s.round();
    assert_eq!(c.applied(REPO), vec![4], "{c:?}");
    assert_eq!(s.assert_equal(REPO, &[]).await?, 3);
    let head = git::git(&s.b.nodes[0].repo(REPO), &["symbolic-ref", "HEAD"])?;
    assert_eq!(head.trim(), "refs/heads/feature", "B's HEAD follows A's");

    // Nothing new: nothing applied, nothing changed.
    let c = s.round();
    assert!(c.applied(REPO).is_empty(), "{c:?}");

    // Round 4 with node3 of B down: the push through B's router is voted by node1 and
    // node2 (two of three), and the consume succeeds.
    s.b.nodes[2].stop()?;
    // Wait until the router sees node3 gone (its lease revoked on SIGTERM).
    let deadline = Instant::now() + Duration::from_secs(20);
    let node3 = s.b.store.keys().node("node3");
    while s.b.store.get(&node3).await?.is_some() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "node3 still registered after 20 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    work.commit("main", "while node3 is down")?;
    s.push(&work, &["main"]).await?;
    let c = s.round();
    assert_eq!(c.applied(REPO), vec![5], "{c:?}");
    assert_eq!(s.assert_equal(REPO, &["node3"]).await?, 2);

    // node3 comes back and is repaired to the same refs.
    s.b.nodes[2].launch().await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let want = git::refs(&s.a.nodes[0].repo(REPO));
    while git::refs(&s.b.nodes[2].repo(REPO)) != want {
        anyhow::ensure!(
            Instant::now() < deadline,
            "node3 of B was not repaired within 60 s:\n{}",
            s.b.routers[0].log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(s.assert_equal(REPO, &[]).await?, 3);
    Ok(())
}

/// Two consumers on two hosts (two cache dirs, so the per-host lock file does not keep
/// them apart) against one target cluster: the first crashes holding the claim right
/// before applying; the second is refused while that claim lives, naming who holds it,
/// then applies the sequence exactly once after the crashed consumer's lease expired,
/// and a consumer that ends leaves no claim behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_consumers_never_apply_to_one_cluster_at_once() -> anyhow::Result<()> {
    let s = Sync::start().await?;
    s.a.create_and_push(&s.a.routers[0], REPO).await?;
    let p = s.run("produce");
    assert_eq!(p.code, Some(0), "produce: {p:?}");

    // The second host: the same config with its own cache dir.
    let mut other = SyncConfig::parse(&std::fs::read_to_string(&s.config)?)?;
    other.cache_dir = s.dir.path().join("cache-host2");
    let other_config = s.dir.path().join("sync-host2.toml");
    std::fs::write(&other_config, toml::to_string(&other)?)?;

    let claim = s.b.store.keys().psync_consumer("default");
    let crashed = s.run_with("consume", &s.config, Some(fault::BEFORE_APPLY));
    assert_ne!(crashed.code, Some(0), "the fault point aborts: {crashed:?}");
    let held =
        s.b.store
            .get(&claim)
            .await?
            .expect("the crashed consumer's claim");
    let holder: serde_json::Value = serde_json::from_slice(&held.value)?;
    assert!(holder["pid"].as_u64().is_some(), "{holder}");

    let refused = s.run_with("consume", &other_config, None);
    assert_eq!(refused.code, Some(75), "busy: {refused:?}");
    assert!(
        refused
            .stderr
            .contains("another partition-sync consume is applying to storage \"default\"")
            && refused.stderr.contains(&format!("pid {}", holder["pid"])),
        "{}",
        refused.stderr
    );
    assert!(
        git::rev(&s.b.nodes[0].repo(REPO), "refs/heads/main").is_none(),
        "nothing applied while refused"
    );

    // The crashed consumer's lease runs out within its TTL (10 s); then the second
    // consumer applies sequence 1, once.
    let deadline = Instant::now() + Duration::from_secs(30);
    while s.b.store.get(&claim).await?.is_some() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the crashed consumer's claim outlived its lease by far"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let c = s.run_with("consume", &other_config, None);
    assert_eq!(c.code, Some(0), "{c:?}");
    assert_eq!(c.applied(REPO), vec![1], "{c:?}");
    assert_eq!(s.assert_equal(REPO, &[]).await?, 3);
    assert!(
        s.b.store.get(&claim).await?.is_none(),
        "a consumer that ended revoked its claim"
    );
    // And the first host, back, finds nothing left to apply.
    let again = s.run("consume");
    assert_eq!(again.code, Some(0), "{again:?}");
    assert!(again.applied(REPO).is_empty(), "{again:?}");
    Ok(())
}
