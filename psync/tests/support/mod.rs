//! The fixture every partition-sync test builds on: a temp dir holding a source
//! directory of bare repositories (read by the producer as `file://`), a target
//! directory (the consumer's "any git remote"), working clones to push from, a key
//! file, the bucket (SeaweedFS on loopback, or a local directory), and configs
//! rendered from the real config type. Runs go through the real `refvote-psync`
//! binary, so crash points can kill a real process.

// The S3 server is the cluster harness's (`refvote_tests::seaweed`); this crate
// cannot depend on the harness, which would build all of refvote for its tests.
#[path = "../../../tests/src/seaweed.rs"]
pub mod seaweed;
pub mod tls;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use refvote_psync::config::{KeyConfig, StoreKind, SyncConfig};
use refvote_psync::crypto::MasterKey;
use seaweed::Seaweed;

pub const REPO: &str = "group/project.git";

pub struct Fixture {
    pub tmp: tempfile::TempDir,
    pub weed: Option<Seaweed>,
    pub source_dir: PathBuf,
    pub target_dir: PathBuf,
    pub home: PathBuf,
    pub key_file: PathBuf,
}

/// A finished run of the binary.
#[derive(Debug)]
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// The `--json` summary.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not a JSON summary ({e}): {self:?}"))
    }

    /// The report of `repository` in the summary.
    pub fn repo(&self, repository: &str) -> serde_json::Value {
        self.json()["repositories"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["repository"] == repository)
            .cloned()
            .unwrap_or_else(|| panic!("{repository} not in the summary: {}", self.stdout))
    }
}

impl Fixture {
    /// A fixture whose bucket is SeaweedFS on loopback.
    pub fn s3() -> Fixture {
        let mut f = Fixture::bare();
        f.weed = Some(Seaweed::start(f.tmp.path()));
        f
    }

    /// A fixture whose bucket is SeaweedFS serving S3 over TLS too, with a certificate
    /// from a private CA (returned).
    pub fn s3_tls() -> (Fixture, PathBuf) {
        let mut f = Fixture::bare();
        let (ca, cert, key) = tls::ca_and_server(&f.tmp.path().join("ca"));
        f.weed = Some(Seaweed::start_with_tls(f.tmp.path(), Some((&cert, &key))));
        (f, ca)
    }

    /// A fixture whose bucket is a local directory.
    pub fn local() -> Fixture {
        Fixture::bare()
    }

    fn bare() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let home = tmp.path().join("home");
        std::fs::create_dir_all(&home).unwrap();
        std::fs::write(
            home.join(".gitconfig"),
            "[user]\n\tname = Test\n\temail = test@example.com\n[init]\n\tdefaultBranch = main\n[gc]\n\tauto = 0\n",
        )
        .unwrap();
        let key_file = tmp.path().join("k1.key");
        write_key(&key_file, &MasterKey::generate_hex());
        let f = Fixture {
            source_dir: tmp.path().join("source"),
            target_dir: tmp.path().join("target"),
            home,
            key_file,
            weed: None,
            tmp,
        };
        std::fs::create_dir_all(&f.source_dir).unwrap();
        std::fs::create_dir_all(&f.target_dir).unwrap();
        f
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// The config both sides start from (`role` picks the cache dir: two hosts).
    pub fn config(&self, role: &str) -> SyncConfig {
        let mut c = SyncConfig::parse(
            r#"
            [store]
            bucket = "x"
            [encryption]
            keys = [{ id = "k1", file = "/k" }]
            [repositories]
            paths = ["group/project.git"]
            [source]
            url = "/"
            [target]
            kind = "git"
            url = "/"
            "#,
        )
        .unwrap();
        c.cache_dir = self.path(&format!("{role}-cache"));
        c.encryption.keys = vec![KeyConfig {
            id: "k1".into(),
            file: self.key_file.clone(),
        }];
        c.source.as_mut().unwrap().url = format!("file://{}/", self.source_dir.display());
        c.target.as_mut().unwrap().url = format!("{}/", self.target_dir.display());
        c.store.prefix = "to-isolated".into();
        c.store.retries = 2;
        c.store.retry_timeout_secs = 10;
        c.store.part_size_mib = 5;
        match &self.weed {
            Some(w) => {
                c.store.kind = StoreKind::S3;
                c.store.endpoint = w.endpoint.clone();
                c.store.bucket = seaweed::BUCKET.into();
                let creds = seaweed::write_credentials(&self.path("s3-credentials.toml"));
                c.store.credentials_file = Some(creds);
            }
            None => {
                c.store.kind = StoreKind::Local;
                c.store.path = self.path("bucket");
            }
        }
        c
    }

    /// Writes `config` as TOML (serialized from the config type) and returns its path.
    pub fn write_config(&self, name: &str, config: &SyncConfig) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, toml::to_string(config).unwrap()).unwrap();
        path
    }

    /// Runs `refvote-psync ARGS` with the fixture's git environment plus `env`.
    pub fn psync(&self, args: &[&str], env: &[(&str, &str)]) -> Run {
        let out = Command::new(env!("CARGO_BIN_EXE_refvote-psync"))
            .args(args)
            .env("HOME", &self.home)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env_remove("REFVOTE_FAULT_POINT")
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .envs(env.iter().copied())
            .output()
            .expect("run refvote-psync");
        Run {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// A producer run with `config`, `--json`; asserts it succeeded.
    pub fn produce(&self, config: &Path, extra: &[&str]) -> Run {
        let mut args = vec!["produce", "--json", "--config", config.to_str().unwrap()];
        args.extend_from_slice(extra);
        let run = self.psync(&args, &[]);
        assert_eq!(run.code, Some(0), "produce failed: {run:?}");
        run
    }

    /// A consumer run with `config`, `--json`; asserts it succeeded.
    pub fn consume(&self, config: &Path) -> Run {
        let run = self.psync(
            &["consume", "--json", "--config", config.to_str().unwrap()],
            &[],
        );
        assert_eq!(run.code, Some(0), "consume failed: {run:?}");
        run
    }

    /// Creates the bare source repository `repository` and a working clone of it.
    pub fn source(&self, repository: &str) -> Work {
        self.source_of_format(repository, "sha1")
    }

    /// [`Fixture::source`] with the object format `format` (`sha1`, `sha256`).
    pub fn source_of_format(&self, repository: &str, format: &str) -> Work {
        let bare = self.source_dir.join(repository);
        std::fs::create_dir_all(&bare).unwrap();
        self.git(
            &bare,
            &[
                "init",
                "--bare",
                "--quiet",
                &format!("--object-format={format}"),
            ],
        );
        let dir = self.path(&format!("work-{}", repository.replace('/', "_")));
        self.git(
            self.tmp.path(),
            &[
                "clone",
                "--quiet",
                bare.to_str().unwrap(),
                dir.to_str().unwrap(),
            ],
        );
        Work {
            dir,
            home: self.home.clone(),
            seed: 1,
        }
    }

    /// Creates the bare target repository `repository`, keeping a reflog of every ref
    /// update (to count how often a sequence was applied).
    pub fn target(&self, repository: &str) -> PathBuf {
        let bare = self.target_dir.join(repository);
        std::fs::create_dir_all(&bare).unwrap();
        self.git(&bare, &["init", "--bare", "--quiet"]);
        self.git(&bare, &["config", "core.logAllRefUpdates", "always"]);
        bare
    }

    pub fn git(&self, dir: &Path, args: &[&str]) -> String {
        git_in(&self.home, dir, args)
    }

    /// `git show-ref` of a bare repository: ref → oid.
    pub fn refs(&self, bare: &Path) -> BTreeMap<String, String> {
        let out = Command::new("git")
            .arg("--git-dir")
            .arg(bare)
            .args(["for-each-ref", "--format=%(refname) %(objectname)"])
            .env("HOME", &self.home)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(r, o)| (r.to_owned(), o.to_owned()))
            .collect()
    }

    /// Gitaly's checksum of a bare repository, as refvote's nodes compute it.
    pub fn checksum(&self, bare: &Path) -> String {
        let refs = self.refs(bare);
        let head = Command::new("git")
            .arg("--git-dir")
            .arg(bare)
            .args(["symbolic-ref", "-q", "HEAD"])
            .output()
            .unwrap();
        let head = String::from_utf8_lossy(&head.stdout).trim().to_owned();
        let set = refvote_psync::refs::RefSet {
            refs: refs.into_iter().collect(),
            head: (!head.is_empty()).then_some(head),
        };
        set.checksum()
    }

    /// How many times `reference` was updated in the bare repository `bare`.
    pub fn reflog_len(&self, bare: &Path, reference: &str) -> usize {
        let out = Command::new("git")
            .arg("--git-dir")
            .arg(bare)
            .args(["reflog", "show", "--format=%H", reference])
            .env("HOME", &self.home)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).lines().count()
    }
}

pub fn write_key(path: &Path, hex: &str) {
    std::fs::write(path, format!("{hex}\n")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

fn git_in(home: &Path, dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .current_dir(dir)
        .args(args)
        .env("HOME", home)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?} in {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A working clone of a source repository.
pub struct Work {
    pub dir: PathBuf,
    home: PathBuf,
    seed: u64,
}

impl Work {
    pub fn git(&self, args: &[&str]) -> String {
        git_in(&self.home, &self.dir, args)
    }

    /// Writes `size` pseudo-random (incompressible) bytes to `file` and commits.
    pub fn commit_random(&mut self, file: &str, size: usize, message: &str) {
        let mut x = self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        self.seed += 1;
        let mut data = Vec::with_capacity(size);
        while data.len() < size {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            data.extend_from_slice(&x.to_le_bytes());
        }
        data.truncate(size);
        let path = self.dir.join(file);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&path, data).unwrap();
        self.git(&["add", "--", file]);
        self.git(&["commit", "--quiet", "-m", message]);
    }

    pub fn push(&self, args: &[&str]) {
        let mut a = vec!["push", "--quiet", "origin"];
        a.extend_from_slice(args);
        self.git(&a);
    }
}
