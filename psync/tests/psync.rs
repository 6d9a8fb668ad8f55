//! Partition sync end to end: the real `refvote-psync` binary, real git repositories
//! (a directory of bare repositories as the source, bare repositories as the "any git
//! remote" target) and a real S3-compatible server (SeaweedFS on loopback) or a local
//! directory as the bucket. Crashes are real process aborts at the crate's fault
//! points.

mod support;

use std::time::{Duration, Instant};

use refvote_psync::store::Bucket;
use support::{Fixture, REPO, Run, write_key};

fn seq(run: &Run) -> u64 {
    run.repo(REPO)["sequence"].as_u64().unwrap()
}

fn applied(run: &Run) -> Vec<u64> {
    run.repo(REPO)["applied"]
        .as_array()
        .map(|a| a.iter().map(|v| v.as_u64().unwrap()).collect())
        .unwrap_or_default()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The bucket a fixture's config names, opened by the crate's own store layer.
fn bucket(f: &Fixture) -> Bucket {
    Bucket::open(&f.config("inspect").store).unwrap()
}

/// Every key in the bucket under the fixture's prefix.
fn keys(f: &Fixture) -> Vec<String> {
    let b = bucket(f);
    runtime()
        .block_on(b.list("to-isolated/", None))
        .unwrap()
        .into_iter()
        .map(|l| l.key)
        .collect()
}

fn consumer_state(f: &Fixture) -> serde_json::Value {
    let text = std::fs::read_to_string(f.path("consume-cache/consumer-state.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn full_then_ten_incremental_rounds_follow_the_source() {
    let f = Fixture::s3();
    let mut w = f.source(REPO);
    w.commit_random("big.bin", 3 << 20, "a large base");
    w.push(&["main"]);
    let source = f.source_dir.join(REPO);
    let target = f.target(REPO);
    let p = f.write_config("produce.toml", &f.config("produce"));
    let c = f.write_config("consume.toml", &f.config("consume"));

    let run = f.produce(&p, &[]);
    let r = run.repo(REPO);
    assert_eq!(r["outcome"], "uploaded", "{r}");
    assert_eq!(r["kind"], "full");
    let full = r["bytes"].as_u64().unwrap();
    assert!(
        full > 3 << 20,
        "the full bundle holds the 3 MiB blob: {full}"
    );
    let run = f.consume(&c);
    assert_eq!(applied(&run), vec![1]);
    assert_eq!(f.refs(&target), f.refs(&source));

    for round in 0..10u64 {
        w.commit_random(
            &format!("small/{round}.bin"),
            2000,
            &format!("round {round}"),
        );
        w.push(&["main"]);
        if round == 4 {
            // The producer's disk is lost: it re-clones and resumes from the bucket.
            std::fs::remove_dir_all(f.path("produce-cache")).unwrap();
        }
        if round == 6 {
            // The consumer's too: it finds the target's sequence again.
            std::fs::remove_dir_all(f.path("consume-cache")).unwrap();
        }
        let run = f.produce(&p, &[]);
        let r = run.repo(REPO);
        assert_eq!(r["outcome"], "uploaded", "round {round}: {r}");
        assert_eq!(r["kind"], "incremental", "round {round}: {r}");
        assert_eq!(seq(&run), round + 2);
        // About the push (2000 random bytes, a tree, a commit), not the repository.
        let size = r["bytes"].as_u64().unwrap();
        assert!(
            size < 8 * 1024,
            "round {round}: {size} bytes for a 2 kB push"
        );
        let run = f.consume(&c);
        assert_eq!(
            applied(&run),
            vec![round + 2],
            "round {round}: {}",
            run.stdout
        );
        assert_eq!(f.refs(&target), f.refs(&source), "round {round}");
        assert_eq!(f.checksum(&target), f.checksum(&source), "round {round}");
    }

    // Nothing new: nothing uploaded, nothing applied.
    let run = f.produce(&p, &[]);
    assert_eq!(run.repo(REPO)["outcome"], "unchanged");
    let run = f.consume(&c);
    assert_eq!(run.repo(REPO)["outcome"], "up_to_date");
    assert_eq!(seq(&run), 11);
}

#[test]
fn force_pushes_deleted_branches_and_tags_are_followed() {
    let f = Fixture::s3();
    let mut w = f.source(REPO);
    w.commit_random("a.bin", 4000, "one");
    w.commit_random("b.bin", 4000, "two");
    w.git(&["branch", "feature"]);
    w.git(&["branch", "old"]);
    w.git(&["tag", "v1"]);
    w.push(&["main", "feature", "old", "v1"]);
    let source = f.source_dir.join(REPO);
    let target = f.target(REPO);
    let p = f.write_config("produce.toml", &f.config("produce"));
    let c = f.write_config("consume.toml", &f.config("consume"));
    f.produce(&p, &[]);
    f.consume(&c);
    assert_eq!(f.refs(&target), f.refs(&source));

    // feature is rewritten and force-pushed, old is deleted, an annotated tag added.
    w.git(&["checkout", "--quiet", "feature"]);
    w.git(&["reset", "--quiet", "--hard", "HEAD~1"]);
    w.commit_random("c.bin", 4000, "rewritten");
    w.git(&["tag", "-a", "-m", "annotated", "v2"]);
    w.push(&["--force", "feature", "v2"]);
    w.push(&["--delete", "old"]);
    let run = f.produce(&p, &[]);
    assert_eq!(run.repo(REPO)["kind"], "incremental");
    f.consume(&c);
    let refs = f.refs(&target);
    assert_eq!(refs, f.refs(&source));
    assert!(!refs.contains_key("refs/heads/old"), "{refs:?}");
    assert!(refs.contains_key("refs/tags/v2"));

    // A round that only deletes a branch carries no objects at all.
    w.push(&["--delete", "feature"]);
    let run = f.produce(&p, &[]);
    let r = run.repo(REPO);
    assert_eq!(r["outcome"], "uploaded");
    assert!(r["bytes"].as_u64().unwrap() < 2048, "{r}");
    f.consume(&c);
    assert_eq!(f.refs(&target), f.refs(&source));
    assert!(!f.refs(&target).contains_key("refs/heads/feature"));

    // A new branch at an old commit: no new objects either.
    w.git(&["checkout", "--quiet", "main"]);
    w.git(&["branch", "again", "HEAD~1"]);
    w.push(&["again"]);
    f.produce(&p, &[]);
    f.consume(&c);
    assert_eq!(f.refs(&target), f.refs(&source));
}

#[test]
fn a_producer_killed_mid_upload_leaves_nothing_a_consumer_takes() {
    let f = Fixture::s3();
    let mut w = f.source(REPO);
    // Larger than two 5 MiB parts, so the upload is multipart and cut inside it.
    w.commit_random("big.bin", 12 << 20, "big");
    w.push(&["main"]);
    let source = f.source_dir.join(REPO);
    let target = f.target(REPO);
    let p = f.write_config("produce.toml", &f.config("produce"));
    let c = f.write_config("consume.toml", &f.config("consume"));
    let produce = |fault: &str| {
        f.psync(
            &["produce", "--json", "--config", p.to_str().unwrap()],
            &[("REFVOTE_FAULT_POINT", fault)],
        )
    };

    // Killed with 8 MiB handed to the upload: parts are up, the object is not.
    let run = produce("psync-mid-upload:8");
    assert_ne!(run.code, Some(0), "the fault point did not fire: {run:?}");
    assert!(run.stderr.contains("psync-mid-upload"), "{}", run.stderr);
    assert!(
        keys(&f).is_empty(),
        "an incomplete upload is invisible: {:?}",
        keys(&f)
    );
    let run = f.consume(&c);
    assert!(
        run.json()["repositories"].as_array().unwrap().is_empty(),
        "{}",
        run.stdout
    );

    // Killed after the bundle is complete, before its manifest: still nothing to take.
    let run = produce("psync-before-manifest");
    assert_ne!(run.code, Some(0), "the fault point did not fire: {run:?}");
    let left = keys(&f);
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(left[0].ends_with("/bundle"), "{left:?}");
    let run = f.consume(&c);
    assert_eq!(run.repo(REPO)["outcome"], "up_to_date");
    assert!(f.refs(&target).is_empty());

    // The next run finishes the sequence and removes the leftover.
    let run = f.produce(&p, &[]);
    assert_eq!(seq(&run), 1);
    let now = keys(&f);
    assert_eq!(now.len(), 2, "one bundle and its manifest: {now:?}");
    assert!(!now.contains(&left[0]), "the leftover is gone: {now:?}");
    let run = f.consume(&c);
    assert_eq!(applied(&run), vec![1]);
    assert_eq!(f.refs(&target), f.refs(&source));
    assert_eq!(f.reflog_len(&target, "refs/heads/main"), 1);
}

#[test]
fn a_consumer_killed_mid_apply_applies_each_sequence_exactly_once() {
    let f = Fixture::s3();
    let mut w = f.source(REPO);
    w.commit_random("a.bin", 5000, "one");
    w.push(&["main"]);
    let source = f.source_dir.join(REPO);
    let target = f.target(REPO);
    let p = f.write_config("produce.toml", &f.config("produce"));
    let c = f.write_config("consume.toml", &f.config("consume"));
    f.produce(&p, &[]);
    f.consume(&c);
    assert_eq!(f.reflog_len(&target, "refs/heads/main"), 1);
    let consume = |fault: &str| {
        f.psync(
            &["consume", "--json", "--config", c.to_str().unwrap()],
            &[("REFVOTE_FAULT_POINT", fault)],
        )
    };

    // Killed after the push, before the state records it.
    w.commit_random("b.bin", 5000, "two");
    w.push(&["main"]);
    f.produce(&p, &[]);
    let run = consume("psync-after-apply");
    assert_ne!(run.code, Some(0), "the fault point did not fire: {run:?}");
    assert_eq!(consumer_state(&f)["repositories"][REPO]["sequence"], 1);
    assert_eq!(f.refs(&target), f.refs(&source), "the push went through");
    assert_eq!(f.reflog_len(&target, "refs/heads/main"), 2);
    let run = f.consume(&c);
    assert_eq!(applied(&run), vec![2]);
    assert_eq!(consumer_state(&f)["repositories"][REPO]["sequence"], 2);
    assert_eq!(
        f.reflog_len(&target, "refs/heads/main"),
        2,
        "not pushed again"
    );

    // Killed after the fetch into the local mirror, before the push.
    w.commit_random("c.bin", 5000, "three");
    w.push(&["main"]);
    f.produce(&p, &[]);
    let before = f.refs(&target);
    let run = consume("psync-before-apply");
    assert_ne!(run.code, Some(0), "the fault point did not fire: {run:?}");
    assert_eq!(f.refs(&target), before, "the target is untouched");
    let run = f.consume(&c);
    assert_eq!(applied(&run), vec![3]);
    assert_eq!(f.refs(&target), f.refs(&source));
    assert_eq!(f.reflog_len(&target, "refs/heads/main"), 3, "applied once");
}

#[test]
fn a_tampered_object_is_refused_and_nothing_is_applied() {
    let f = Fixture::s3();
    let mut w = f.source(REPO);
    w.commit_random("a.bin", 200_000, "one");
    w.push(&["main"]);
    let target = f.target(REPO);
    let p = f.write_config("produce.toml", &f.config("produce"));
    let c = f.write_config("consume.toml", &f.config("consume"));
    f.produce(&p, &[]);
    f.consume(&c);
    let at_one = f.refs(&target);
    w.commit_random("b.bin", 200_000, "two");
    w.push(&["main"]);
    f.produce(&p, &[]);

    let b = bucket(&f);
    let rt = runtime();
    let flip = |key: &str, at: usize| {
        rt.block_on(async {
            let mut data = b.get(key).await.unwrap().to_vec();
            data[at] ^= 0x40;
            b.delete(key).await.unwrap();
            b.create(key, data).await.unwrap();
        })
    };
    let all = keys(&f);
    let data2 = all
        .iter()
        .find(|k| k.contains("/00000000000000000002/"))
        .unwrap()
        .clone();
    flip(&data2, 100_000);
    let run = f.psync(&["consume", "--json", "--config", c.to_str().unwrap()], &[]);
    assert_eq!(run.code, Some(2), "{run:?}");
    let r = run.repo(REPO);
    assert_eq!(r["failure"], "integrity", "{r}");
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("authentication failed"),
        "{r}"
    );
    assert_eq!(f.refs(&target), at_one, "nothing applied");
    assert_eq!(consumer_state(&f)["repositories"][REPO]["sequence"], 1);
    assert!(
        std::fs::read_dir(f.path("consume-cache/tmp"))
            .map(|d| d.count())
            .unwrap_or(0)
            == 0,
        "no decrypted remains"
    );

    // A flipped byte in the manifest is refused the same way.
    flip(&data2, 100_000); // restore the bundle
    let manifest2 = all
        .iter()
        .find(|k| k.ends_with("00000000000000000002.manifest"))
        .unwrap();
    flip(manifest2, 80);
    let run = f.psync(&["consume", "--json", "--config", c.to_str().unwrap()], &[]);
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(
        run.repo(REPO)["error"]
            .as_str()
            .unwrap()
            .contains("authentication failed")
    );
    assert_eq!(f.refs(&target), at_one);
}

#[test]
fn a_wrong_key_is_a_clear_error() {
    let f = Fixture::local();
    let mut w = f.source(REPO);
    w.commit_random("a.bin", 1000, "one");
    w.push(&["main"]);
    let target = f.target(REPO);
    let p = f.write_config("produce.toml", &f.config("produce"));
    f.produce(&p, &[]);
    let other = f.path("other.key");
    write_key(&other, &refvote_psync::crypto::MasterKey::generate_hex());
    let mut config = f.config("consume");
    config.encryption.keys[0].file = other;
    let c = f.write_config("consume.toml", &config);
    let run = f.psync(&["consume", "--config", c.to_str().unwrap()], &[]);
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(
        run.stdout.contains("wrong key: key id k1"),
        "stdout: {}\nstderr: {}",
        run.stdout,
        run.stderr
    );
    assert!(
        run.stdout
            .contains("hint: both sides need the same key file"),
        "{}",
        run.stdout
    );
    assert!(f.refs(&target).is_empty());
}

#[test]
fn an_unreachable_bucket_is_retried_then_fails() {
    let f = Fixture::local();
    let mut w = f.source(REPO);
    w.commit_random("a.bin", 1000, "one");
    w.push(&["main"]);
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut config = f.config("produce");
    config.store.kind = refvote_psync::config::StoreKind::S3;
    config.store.endpoint = format!("http://127.0.0.1:{port}");
    config.store.bucket = "sync".into();
    let creds = f.path("creds.toml");
    std::fs::write(&creds, "access_key_id = \"a\"\nsecret_access_key = \"b\"\n").unwrap();
    config.store.credentials_file = Some(creds);
    config.store.retries = 3;
    let path = f.write_config("produce.toml", &config);
    for role in ["produce", "consume"] {
        let started = Instant::now();
        let run = f.psync(&[role, "--config", path.to_str().unwrap()], &[]);
        assert_eq!(run.code, Some(69), "{role}: {run:?}");
        assert!(
            run.stderr
                .contains("cannot use bucket sync at http://127.0.0.1"),
            "{role}: {}",
            run.stderr
        );
        assert!(
            run.stderr.contains("after 3 retries"),
            "{role}: {}",
            run.stderr
        );
        // Three retries with back-off (jittered, from 200 ms).
        assert!(
            started.elapsed() > Duration::from_millis(300),
            "{role}: no back-off"
        );
    }
}

#[test]
fn a_gap_stops_the_repository_until_a_full_bundle_bridges_it() {
    let f = Fixture::local();
    let mut w = f.source(REPO);
    let source = f.source_dir.join(REPO);
    let target = f.target(REPO);
    let p = f.write_config("produce.toml", &f.config("produce"));
    let mut consume_config = f.config("consume");
    consume_config.metrics_dir = f.path("metrics");
    std::fs::create_dir_all(&consume_config.metrics_dir).unwrap();
    let c = f.write_config("consume.toml", &consume_config);
    for i in 0..3 {
        w.commit_random(&format!("{i}.bin"), 1000, &format!("c{i}"));
        w.push(&["main"]);
        f.produce(&p, &[]);
    }
    let manifest2 = keys(&f)
        .into_iter()
        .find(|k| k.ends_with("00000000000000000002.manifest"))
        .unwrap();
    std::fs::remove_file(f.path("bucket").join(&manifest2)).unwrap();

    let run = f.psync(&["consume", "--json", "--config", c.to_str().unwrap()], &[]);
    assert_eq!(run.code, Some(1), "{run:?}");
    let r = run.repo(REPO);
    assert_eq!(r["applied"], serde_json::json!([1]), "{r}");
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("sequence 2 is missing"),
        "{r}"
    );
    assert!(
        r["hint"]
            .as_str()
            .unwrap()
            .contains("produce --config sync.toml --full group/project.git"),
        "{r}"
    );
    let prom =
        std::fs::read_to_string(f.path("metrics/refvote_partition_sync_consume.prom")).unwrap();
    assert!(
        prom.contains("refvote_partition_sync_lag_sequences{role=\"consume\",repository=\"group/project.git\"} 2"),
        "{prom}"
    );
    assert!(prom.contains(
        "refvote_partition_sync_failing{role=\"consume\",repository=\"group/project.git\"} 1"
    ));

    let run = f.produce(&p, &["--full", REPO]);
    assert_eq!(run.repo(REPO)["kind"], "full");
    assert_eq!(seq(&run), 4);
    let run = f.consume(&c);
    assert_eq!(applied(&run), vec![4]);
    assert_eq!(f.refs(&target), f.refs(&source));
    let prom =
        std::fs::read_to_string(f.path("metrics/refvote_partition_sync_consume.prom")).unwrap();
    assert!(prom.contains(
        "refvote_partition_sync_lag_sequences{role=\"consume\",repository=\"group/project.git\"} 0"
    ));
    assert!(prom.contains(
        "refvote_partition_sync_failing{role=\"consume\",repository=\"group/project.git\"} 0"
    ));
}

#[test]
fn prefixes_pick_up_new_repositories_and_dry_runs_change_nothing() {
    let f = Fixture::local();
    let mut config = f.config("produce");
    config.repositories.paths.clear();
    config.repositories.prefixes = vec!["team/".into()];
    let p = f.write_config("produce.toml", &config);
    let mut cc = f.config("consume");
    cc.repositories = config.repositories.clone();
    let c = f.write_config("consume.toml", &cc);
    for name in ["team/a.git", "team/sub/b.git", "other/c.git"] {
        let mut w = f.source(name);
        w.commit_random("x.bin", 1000, "x");
        w.push(&["main"]);
    }

    let run = f.produce(&p, &["--dry-run"]);
    let reports = run.json()["repositories"].as_array().unwrap().clone();
    assert_eq!(reports.len(), 2, "{}", run.stdout);
    assert!(reports.iter().all(|r| r["outcome"] == "would_sync"));
    assert!(keys(&f).is_empty(), "a dry run uploads nothing");

    f.produce(&p, &[]);
    let run = f.psync(
        &[
            "consume",
            "--dry-run",
            "--json",
            "--config",
            c.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(run.repo("team/a.git")["outcome"], "would_sync");
    assert!(
        !f.target_dir.join("team/a.git").exists(),
        "a dry run applies nothing"
    );

    // A local directory target: missing repositories are created, HEAD is set.
    let run = f.consume(&c);
    assert_eq!(run.json()["repositories"].as_array().unwrap().len(), 2);
    for name in ["team/a.git", "team/sub/b.git"] {
        let t = f.target_dir.join(name);
        assert_eq!(f.refs(&t), f.refs(&f.source_dir.join(name)), "{name}");
        assert_eq!(
            f.checksum(&t),
            f.checksum(&f.source_dir.join(name)),
            "{name}"
        );
    }
    assert!(!f.target_dir.join("other/c.git").exists());

    // A repository created later under the prefix is carried by the next round.
    let mut w = f.source("team/new.git");
    w.commit_random("y.bin", 1000, "y");
    w.push(&["main"]);
    let run = f.produce(&p, &[]);
    assert_eq!(run.repo("team/new.git")["outcome"], "uploaded");
    assert_eq!(run.repo("team/a.git")["outcome"], "unchanged");
    let run = f.consume(&c);
    assert_eq!(run.repo("team/new.git")["applied"], serde_json::json!([1]));
    assert_eq!(
        f.refs(&f.target_dir.join("team/new.git")),
        f.refs(&f.source_dir.join("team/new.git"))
    );
    let listed = f.psync(&["list", "--config", p.to_str().unwrap()], &[]);
    assert_eq!(listed.code, Some(0), "{listed:?}");
    assert!(listed.stdout.contains("team/new.git"), "{}", listed.stdout);
}

#[test]
fn manifests_are_created_only_once() {
    for f in [Fixture::s3(), Fixture::local()] {
        let b = bucket(&f);
        runtime().block_on(async {
            b.create("to-isolated/x.manifest", b"one".to_vec())
                .await
                .unwrap();
            let again = b.create("to-isolated/x.manifest", b"two".to_vec()).await;
            assert!(
                matches!(again, Err(refvote_psync::store::StoreError::Exists { .. })),
                "{again:?}"
            );
            assert_eq!(&b.get("to-isolated/x.manifest").await.unwrap()[..], b"one");
        });
    }
}

#[test]
fn sha256_repositories_travel_as_v3_bundles() {
    let f = Fixture::local();
    let mut w = f.source_of_format(REPO, "sha256");
    w.commit_random("a.bin", 3000, "one");
    w.push(&["main"]);
    let p = f.write_config("produce.toml", &f.config("produce"));
    let c = f.write_config("consume.toml", &f.config("consume"));
    let run = f.produce(&p, &[]);
    assert_eq!(run.repo(REPO)["kind"], "full");
    let data = keys(&f)
        .into_iter()
        .find(|k| k.ends_with("/bundle"))
        .unwrap();
    let layout = refvote_psync::naming::Layout::new("to-isolated").unwrap();
    match layout.parse(&data) {
        Some(refvote_psync::naming::Entry::Data(h)) => {
            assert_eq!(h.format, refvote_psync::naming::BundleFormat::V3, "{h:?}")
        }
        other => panic!("{data}: {other:?}"),
    }
    // The target does not exist yet: it is created with the source's object format.
    f.consume(&c);
    let target = f.target_dir.join(REPO);
    assert_eq!(
        f.git(&target, &["rev-parse", "--show-object-format"])
            .trim(),
        "sha256"
    );
    w.commit_random("b.bin", 3000, "two");
    w.push(&["main"]);
    f.produce(&p, &[]);
    f.consume(&c);
    assert_eq!(f.refs(&target), f.refs(&f.source_dir.join(REPO)));
    assert_eq!(f.refs(&target)["refs/heads/main"].len(), 64);
}

#[test]
fn one_run_per_role_at_a_time() {
    let f = Fixture::local();
    let c = f.write_config("consume.toml", &f.config("consume"));
    std::fs::create_dir_all(f.path("consume-cache")).unwrap();
    let lock = std::fs::File::create(f.path("consume-cache/consume.lock")).unwrap();
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).unwrap();
    let run = f.psync(&["consume", "--config", c.to_str().unwrap()], &[]);
    assert_eq!(run.code, Some(75), "{run:?}");
    assert!(
        run.stderr
            .contains("another partition-sync consume is running"),
        "{}",
        run.stderr
    );
    drop(lock);
    let run = f.psync(&["consume", "--config", c.to_str().unwrap()], &[]);
    assert_eq!(run.code, Some(0), "{run:?}");
}

#[test]
fn s3_over_tls_is_checked_against_the_configured_ca() {
    let (f, ca) = Fixture::s3_tls();
    let mut w = f.source(REPO);
    w.commit_random("a.bin", 3000, "one");
    w.push(&["main"]);
    let https = f.weed.as_ref().unwrap().https_endpoint.clone().unwrap();
    let with_ca = |role: &str, ca: Option<&std::path::Path>| {
        let mut c = f.config(role);
        c.store.endpoint = https.clone();
        c.store.ca_file = ca.map(|p| p.to_owned());
        c
    };
    // Without the CA the endpoint's certificate is not trusted: refused, clearly.
    let p = f.write_config("untrusted.toml", &with_ca("produce", None));
    let run = f.psync(&["produce", "--config", p.to_str().unwrap()], &[]);
    assert_eq!(run.code, Some(69), "{run:?}");
    assert!(run.stderr.contains("set store.ca_file"), "{}", run.stderr);
    let p = f.write_config("produce.toml", &with_ca("produce", Some(&ca)));
    let c = f.write_config("consume.toml", &with_ca("consume", Some(&ca)));
    f.produce(&p, &[]);
    f.consume(&c);
    let target = f.target_dir.join(REPO);
    assert_eq!(f.refs(&target), f.refs(&f.source_dir.join(REPO)));
}
