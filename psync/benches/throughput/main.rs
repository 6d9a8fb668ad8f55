//! Partition sync's throughput benchmark (`scripts/bench-psync.sh`; see BENCHMARKS.md).
//!
//! On one generated repository of about `PSYNC_BENCH_MIB` MiB (default 1024; text
//! history with deltas plus incompressible binary files) and SeaweedFS on loopback as
//! the bucket, each run measures, alternating:
//!
//! - produce, baselines: `git bundle create --all` to a file, then a plain upload of
//!   that file (the same object_store client, part size and concurrency); and the two
//!   streamed into each other (`git bundle create -` piped into the upload), the
//!   stricter baseline;
//! - produce: `refvote-psync produce` writing sequence 1 (a full bundle) from a warm
//!   mirror;
//! - consume, baseline: a plain download of the bundle, `git bundle verify`, `git
//!   fetch` into a scratch repository and `git push --mirror` to an empty target (the
//!   same steps a git-target consumer must take);
//! - consume: `refvote-psync consume` into an empty target with an empty cache.
//!
//! Then one incremental round (a small push) is produced and consumed, against the
//! full round. Figures are medians over `PSYNC_BENCH_RUNS` runs (default 3) with the
//! range, printed as Markdown for BENCHMARKS.md.

mod generate;
#[path = "../../../tests/src/seaweed.rs"]
#[allow(dead_code)]
mod seaweed;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use refvote_psync::config::{KeyConfig, StoreKind, SyncConfig};
use refvote_psync::store::Bucket;

const REPO: &str = "bench/repo.git";

fn main() {
    let mib: u64 = env_or("PSYNC_BENCH_MIB", 1024);
    let runs: usize = env_or("PSYNC_BENCH_RUNS", 3);
    let dir = PathBuf::from(
        std::env::var("PSYNC_BENCH_DIR").unwrap_or_else(|_| "/tmp/refvote-psync-bench".into()),
    );
    std::fs::create_dir_all(&dir).unwrap();
    let b = Bench::new(&dir, mib);
    b.run(runs);
}

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Bench {
    dir: PathBuf,
    home: PathBuf,
    source: PathBuf,
    produce_config: PathBuf,
    consume_config: PathBuf,
    bucket: Bucket,
    rt: tokio::runtime::Runtime,
    _weed: seaweed::Seaweed,
    _run_dir: tempfile::TempDir,
}

pub fn git(home: &Path, dir: Option<&Path>, args: &[&str]) -> String {
    let mut cmd = Command::new("git");
    if let Some(d) = dir {
        cmd.current_dir(d);
    }
    let out = cmd
        .args(args)
        .env("HOME", home)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Bench {
    fn new(dir: &Path, mib: u64) -> Bench {
        let home = dir.join("home");
        std::fs::create_dir_all(&home).unwrap();
        // Both sides run with this config. bigFileThreshold keeps git from searching
        // deltas between incompressible binaries (minutes per run, for nothing), for
        // the baselines and for partition sync alike.
        std::fs::write(
            home.join(".gitconfig"),
            "[user]\n\tname = Bench\n\temail = bench@example.com\n[init]\n\tdefaultBranch = main\n[core]\n\tbigFileThreshold = 2m\n[gc]\n\tauto = 0\n",
        )
        .unwrap();
        let source = dir.join(format!("source-{mib}")).join(REPO);
        if !source.join("generated").exists() {
            generate::generate(&home, &source, mib);
        }
        // Every invocation starts from the generated history (a previous one pushed
        // its incremental round on top).
        let tip = std::fs::read_to_string(source.join("generated")).unwrap();
        git(
            &home,
            None,
            &[
                "--git-dir",
                source.to_str().unwrap(),
                "update-ref",
                "refs/heads/main",
                tip.trim(),
            ],
        );
        let run_dir = tempfile::tempdir_in(dir).unwrap();
        let weed = seaweed::Seaweed::start(run_dir.path());
        let key = run_dir.path().join("k.key");
        std::fs::write(
            &key,
            format!("{}\n", refvote_psync::crypto::MasterKey::generate_hex()),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let creds = seaweed::write_credentials(&run_dir.path().join("creds.toml"));
        let config = |cache: &str| {
            let mut c = SyncConfig::parse(
                "[store]\nbucket = \"x\"\n[encryption]\nkeys = [{ id = \"k\", file = \"/k\" }]\n[repositories]\npaths = [\"bench/repo.git\"]\n[source]\nurl = \"/\"\n[target]\nkind = \"git\"\nurl = \"/\"\n",
            )
            .unwrap();
            c.cache_dir = run_dir.path().join(cache);
            c.encryption.keys = vec![KeyConfig {
                id: "k".into(),
                file: key.clone(),
            }];
            c.store.kind = StoreKind::S3;
            c.store.endpoint = weed.endpoint.clone();
            c.store.bucket = seaweed::BUCKET.into();
            c.store.credentials_file = Some(creds.clone());
            c.store.prefix = "bench".into();
            c.source.as_mut().unwrap().url =
                format!("{}/", source.parent().unwrap().parent().unwrap().display());
            c.target.as_mut().unwrap().url =
                format!("{}/", run_dir.path().join("target").display());
            c
        };
        let produce = config("produce-cache");
        let consume = config("consume-cache");
        let bucket = Bucket::open(&produce.store).unwrap();
        let write = |name: &str, c: &SyncConfig| {
            let p = run_dir.path().join(name);
            std::fs::write(&p, toml::to_string(c).unwrap()).unwrap();
            p
        };
        Bench {
            dir: run_dir.path().to_owned(),
            home,
            source,
            produce_config: write("produce.toml", &produce),
            consume_config: write("consume.toml", &consume),
            bucket,
            rt: tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap(),
            _weed: weed,
            _run_dir: run_dir,
        }
    }

    fn psync(&self, args: &[&str]) -> Duration {
        let started = Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_refvote-psync"))
            .args(args)
            .env("HOME", &self.home)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let took = started.elapsed();
        assert!(
            out.status.success(),
            "refvote-psync {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        took
    }

    fn clear_bucket(&self) {
        self.rt.block_on(async {
            for item in self.bucket.list("bench/", None).await.unwrap() {
                self.bucket.delete(&item.key).await.unwrap();
            }
        });
    }

    fn mirror(&self) -> PathBuf {
        use base64::Engine;
        let name = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(REPO);
        self.dir
            .join("produce-cache/source")
            .join(format!("{name}.git"))
    }

    /// `git bundle create --all` of the producer's mirror into `path`.
    fn bundle_to_file(&self, path: &Path) -> Duration {
        let started = Instant::now();
        git(
            &self.home,
            None,
            &[
                "--git-dir",
                self.mirror().to_str().unwrap(),
                "bundle",
                "create",
                "--quiet",
                path.to_str().unwrap(),
                "--all",
            ],
        );
        started.elapsed()
    }

    fn upload_file(&self, path: &Path, key: &str) -> Duration {
        let started = Instant::now();
        self.rt.block_on(async {
            let mut up = self.bucket.upload(key);
            let mut f = std::fs::File::open(path).unwrap();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = f.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                up.write(Bytes::copy_from_slice(&buf[..n])).await.unwrap();
            }
            up.finish().await.unwrap();
        });
        started.elapsed()
    }

    /// `git bundle create -` streamed into the upload.
    fn bundle_streamed(&self, key: &str) -> Duration {
        let started = Instant::now();
        let mut child = Command::new("git")
            .args([
                "--git-dir",
                self.mirror().to_str().unwrap(),
                "bundle",
                "create",
                "--quiet",
                "-",
                "--all",
            ])
            .env("HOME", &self.home)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = child.stdout.take().unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
        let reader = std::thread::spawn(move || {
            loop {
                let mut buf = vec![0u8; 1 << 20];
                let n = out.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                buf.truncate(n);
                if tx.blocking_send(buf).is_err() {
                    break;
                }
            }
        });
        self.rt.block_on(async {
            let mut up = self.bucket.upload(key);
            while let Some(chunk) = rx.recv().await {
                up.write(Bytes::from(chunk)).await.unwrap();
            }
            up.finish().await.unwrap();
        });
        reader.join().unwrap();
        assert!(child.wait().unwrap().success());
        started.elapsed()
    }

    /// The consume baseline: download, verify, fetch into a scratch repository, push
    /// to an empty target.
    fn consume_baseline(&self, key: &str, run: usize) -> Duration {
        let work = self.dir.join(format!("baseline-{run}"));
        std::fs::create_dir_all(&work).unwrap();
        let file = work.join("plain.bundle");
        let scratch = work.join("scratch.git");
        let target = work.join("target.git");
        git(
            &self.home,
            None,
            &["init", "--bare", "--quiet", target.to_str().unwrap()],
        );
        let started = Instant::now();
        self.rt.block_on(async {
            let (_, mut stream) = self.bucket.get_stream(key).await.unwrap();
            let mut f = std::fs::File::create(&file).unwrap();
            while let Some(piece) = stream.next().await {
                f.write_all(&piece.unwrap()).unwrap();
            }
            f.flush().unwrap();
        });
        git(
            &self.home,
            None,
            &["init", "--bare", "--quiet", scratch.to_str().unwrap()],
        );
        let s = scratch.to_str().unwrap();
        git(
            &self.home,
            None,
            &[
                "--git-dir",
                s,
                "bundle",
                "verify",
                "--quiet",
                file.to_str().unwrap(),
            ],
        );
        git(
            &self.home,
            None,
            &[
                "--git-dir",
                s,
                "fetch",
                "--quiet",
                file.to_str().unwrap(),
                "+refs/*:refs/*",
            ],
        );
        git(
            &self.home,
            None,
            &[
                "--git-dir",
                s,
                "push",
                "--quiet",
                "--mirror",
                target.to_str().unwrap(),
            ],
        );
        let took = started.elapsed();
        std::fs::remove_dir_all(&work).unwrap();
        took
    }

    fn fresh_target(&self) {
        let target = self.dir.join("target");
        let _ = std::fs::remove_dir_all(&target);
        let _ = std::fs::remove_dir_all(self.dir.join("consume-cache"));
        let repo = target.join(REPO);
        std::fs::create_dir_all(&repo).unwrap();
        git(
            &self.home,
            None,
            &["init", "--bare", "--quiet", repo.to_str().unwrap()],
        );
    }

    fn run(&self, runs: usize) {
        let p = self.produce_config.to_str().unwrap().to_owned();
        let c = self.consume_config.to_str().unwrap().to_owned();
        // Warm the producer's mirror (a dry run clones it and uploads nothing).
        self.psync(&["produce", "--quiet", "--dry-run", "--config", &p]);
        let plain = self.dir.join("plain.bundle");
        self.bundle_to_file(&plain);
        let bundle_bytes = std::fs::metadata(&plain).unwrap().len();
        std::fs::remove_file(&plain).unwrap();

        let mut rows: Vec<[f64; 6]> = Vec::new();
        for run in 0..runs {
            self.clear_bucket();
            let a = self.bundle_to_file(&plain);
            let b = self.upload_file(&plain, "bench-plain/file.bundle");
            std::fs::remove_file(&plain).unwrap();
            let streamed = self.bundle_streamed("bench-plain/streamed.bundle");
            let produce = self.psync(&["produce", "--quiet", "--config", &p]);
            let consume_base = self.consume_baseline("bench-plain/streamed.bundle", run);
            self.fresh_target();
            let consume = self.psync(&["consume", "--quiet", "--config", &c]);
            rows.push([
                (a + b).as_secs_f64(),
                streamed.as_secs_f64(),
                produce.as_secs_f64(),
                consume_base.as_secs_f64(),
                consume.as_secs_f64(),
                a.as_secs_f64(),
            ]);
            eprintln!("run {run}: {:?}", rows.last().unwrap());
        }
        // The incremental round, from the state the last run left: a push of 200
        // changed text files and one new 1 MiB binary.
        let work = self.dir.join("work");
        git(
            &self.home,
            None,
            &[
                "clone",
                "--quiet",
                self.source.to_str().unwrap(),
                work.to_str().unwrap(),
            ],
        );
        let mut rng = generate::Rng(0xfeed);
        for i in 0..200 {
            let f = work.join(format!("src/file{i:04}.rs"));
            let mut text = std::fs::read_to_string(&f).unwrap();
            text.push_str(&rng.text(200));
            std::fs::write(&f, text).unwrap();
        }
        std::fs::write(work.join("assets/new.bin"), rng.fill(1 << 20)).unwrap();
        git(&self.home, Some(&work), &["add", "-A"]);
        git(
            &self.home,
            Some(&work),
            &["commit", "--quiet", "-m", "incremental"],
        );
        git(
            &self.home,
            Some(&work),
            &["push", "--quiet", "origin", "main"],
        );
        let produce_inc = self.psync(&["produce", "--quiet", "--config", &p]);
        let sizes = self.rt.block_on(self.bucket.list("bench/", None)).unwrap();
        let inc_bytes = sizes
            .iter()
            .filter(|l| l.key.contains("/00000000000000000002/"))
            .map(|l| l.size)
            .sum::<u64>();
        let full_bytes = sizes
            .iter()
            .filter(|l| l.key.contains("/00000000000000000001/"))
            .map(|l| l.size)
            .sum::<u64>();
        let consume_inc = self.psync(&["consume", "--quiet", "--config", &c]);

        let col = |i: usize| -> (f64, f64, f64) {
            let mut v: Vec<f64> = rows.iter().map(|r| r[i]).collect();
            v.sort_by(|a, b| a.partial_cmp(b).unwrap());
            (v[v.len() / 2], v[0], v[v.len() - 1])
        };
        let mb = bundle_bytes as f64 / 1e6;
        let rate = |i: usize| {
            let (m, lo, hi) = col(i);
            format!("{:.0} ({:.0}–{:.0})", mb / m, mb / hi, mb / lo)
        };
        let secs = |i: usize| {
            let (m, lo, hi) = col(i);
            format!("{m:.1} ({lo:.1}–{hi:.1})")
        };
        println!(
            "repository: {:.0} MB bundle ({} MiB requested); {runs} runs; medians (range)\n",
            mb,
            self.source.display()
        );
        println!("| step | seconds | MB/s |\n| --- | --- | --- |");
        println!(
            "| git bundle create to a file | {} | {} |",
            secs(5),
            rate(5)
        );
        println!(
            "| produce baseline: bundle to a file, then upload it | {} | {} |",
            secs(0),
            rate(0)
        );
        println!(
            "| produce baseline: bundle streamed into the upload | {} | {} |",
            secs(1),
            rate(1)
        );
        println!(
            "| **refvote-psync produce** (full, sealed) | {} | {} |",
            secs(2),
            rate(2)
        );
        println!(
            "| consume baseline: download, verify, fetch, push | {} | {} |",
            secs(3),
            rate(3)
        );
        println!(
            "| **refvote-psync consume** (full, into an empty git target) | {} | {} |",
            secs(4),
            rate(4)
        );
        let ratio = |num: usize, den: usize| {
            let mut v: Vec<f64> = rows.iter().map(|r| r[den] / r[num]).collect();
            v.sort_by(|a, b| a.partial_cmp(b).unwrap());
            format!("{:.2} ({:.2}–{:.2})", v[v.len() / 2], v[0], v[v.len() - 1])
        };
        println!();
        println!(
            "produce throughput / baseline (file then upload): {}",
            ratio(2, 0)
        );
        println!("produce throughput / baseline (streamed): {}", ratio(2, 1));
        println!("consume throughput / baseline: {}", ratio(4, 3));
        println!();
        println!(
            "incremental round: {} bytes stored vs {} for the full one ({:.4}%); produce {:.2} s vs {:.1} s, consume {:.2} s vs {:.1} s",
            inc_bytes,
            full_bytes,
            inc_bytes as f64 * 100.0 / full_bytes as f64,
            produce_inc.as_secs_f64(),
            col(2).0,
            consume_inc.as_secs_f64(),
            col(4).0,
        );
    }
}
