//! refvote-pktline against real git: push requests captured from `git push`, replayed into
//! `git receive-pack` with and without `pktline::canonicalize`, watching the order of
//! ref transactions through a `reference-transaction` hook.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use refvote_pktline::{Limits, canonicalize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A directory of its own under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "refvote-pktline-{name}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// git with no user or system config, so the host's settings cannot change what it sends.
fn git_cmd(home: &Path) -> std::process::Command {
    let mut c = std::process::Command::new("git");
    c.env("HOME", home)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.com")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.com");
    c
}

fn git(home: &Path, dir: &Path, args: &[&str]) -> String {
    let out = git_cmd(home).current_dir(dir).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "git {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn write_script(path: &Path, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, body).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

struct Fixture {
    tmp: TempDir,
    work: PathBuf,
    origin: PathBuf,
    hooks: PathBuf,
}

impl Fixture {
    fn new(name: &str) -> Fixture {
        let tmp = TempDir::new(name);
        let root = tmp.0.clone();
        let (work, origin, hooks) = (
            root.join("work"),
            root.join("origin.git"),
            root.join("hooks"),
        );
        git(
            &root,
            &root,
            &["init", "-q", "--bare", origin.to_str().unwrap()],
        );
        git(&root, &root, &["init", "-q", work.to_str().unwrap()]);
        git(
            &root,
            &work,
            &["commit", "-q", "--allow-empty", "-m", "one"],
        );
        // Tees what the client sends into $CAPTURE, then lets the real receive-pack
        // answer it.
        write_script(
            &root.join("capture-receive-pack"),
            "#!/bin/sh\ntee \"$CAPTURE\" | git receive-pack \"$@\"\n",
        );
        std::fs::create_dir(&hooks).unwrap();
        write_script(
            &hooks.join("reference-transaction"),
            "#!/bin/sh\n{ echo \"$1\"; cat; } >>\"$REFTX_LOG\"\n",
        );
        write_script(
            &hooks.join("pre-receive"),
            "#!/bin/sh\ncat >/dev/null\n\
             echo \"push-options: $GIT_PUSH_OPTION_0 $GIT_PUSH_OPTION_1\" >>\"$REFTX_LOG\"\n",
        );
        Fixture {
            tmp,
            work,
            origin,
            hooks,
        }
    }

    fn root(&self) -> &Path {
        &self.tmp.0
    }

    /// Runs `git push <args>` from the work repo to origin and returns the bytes the
    /// client sent to receive-pack.
    fn capture_push(&self, name: &str, args: &[&str]) -> Vec<u8> {
        let capture = self.root().join(name);
        let receive_pack = format!(
            "--receive-pack={}",
            self.root().join("capture-receive-pack").display()
        );
        let mut full = vec!["push", "-q", receive_pack.as_str()];
        full.extend(args);
        let out = git_cmd(self.root())
            .current_dir(&self.work)
            .env("CAPTURE", &capture)
            .args(&full)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git push failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::read(capture).unwrap()
    }

    /// A copy of origin as it is now, with the logging hooks.
    fn replica(&self, name: &str) -> PathBuf {
        let dir = self.root().join(name);
        let status = std::process::Command::new("cp")
            .arg("-a")
            .arg(&self.origin)
            .arg(&dir)
            .status()
            .unwrap();
        assert!(status.success());
        let hooks = self.hooks.to_str().unwrap();
        git(self.root(), &dir, &["config", "core.hooksPath", hooks]);
        dir
    }

    fn refs(&self, repo: &Path) -> String {
        git(
            self.root(),
            repo,
            &["for-each-ref", "--format=%(objectname) %(refname)"],
        )
    }
}

/// The ref names of the commands in a captured request, in the order the client sent
/// them. Parsed here independently of the code under test.
fn sent_order(request: &[u8]) -> Vec<String> {
    let mut names = Vec::new();
    let mut at = 0;
    loop {
        let len =
            usize::from_str_radix(std::str::from_utf8(&request[at..at + 4]).unwrap(), 16).unwrap();
        if len == 0 {
            return names;
        }
        let line = &request[at + 4..at + len];
        let line = line.split(|&b| b == 0).next().unwrap();
        let line = String::from_utf8(line.to_vec()).unwrap();
        names.push(line.trim_end().splitn(3, ' ').nth(2).unwrap().to_string());
        at += len;
    }
}

struct Replay {
    /// What receive-pack answered (advertisement, then its report).
    stdout: Vec<u8>,
    /// The ref of each voted (`prepared`) transaction, in order, leaving out the
    /// packed-refs side of a delete (all lines `0…0 0…0 <ref>`).
    prepared: Vec<String>,
    /// The push options the pre-receive hook saw.
    options: Vec<String>,
}

/// Feeds `request` to `git receive-pack <repo>` (the SSH form: it advertises first,
/// which we ignore), through `canonicalize` or byte for byte.
async fn replay(fx: &Fixture, repo: &Path, request: Vec<u8>, canonical: bool) -> Replay {
    let log = repo.join("reftx.log");
    let mut child = tokio::process::Command::new("git")
        .env("HOME", fx.root())
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("REFTX_LOG", &log)
        .arg("receive-pack")
        .arg(repo)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let feed = tokio::spawn(async move {
        if canonical {
            let summary = canonicalize(&request[..], &mut stdin, Limits::default())
                .await
                .unwrap();
            assert!(summary.reordered);
        } else {
            stdin.write_all(&request).await.unwrap();
        }
        // receive-pack reads the pack to its end; closing tells it nothing more comes.
        drop(stdin);
    });
    // Read both pipes while feeding, so a chatty git cannot block on a full pipe.
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let (o, e) = tokio::join!(stdout.read_to_end(&mut out), stderr.read_to_end(&mut err));
    o.unwrap();
    e.unwrap();
    feed.await.unwrap();
    let status = child.wait().await.unwrap();
    assert!(
        status.success(),
        "receive-pack failed: {}",
        String::from_utf8_lossy(&err)
    );

    let text = std::fs::read_to_string(&log).unwrap();
    let mut prepared = Vec::new();
    let mut options = Vec::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        if let Some(o) = line.strip_prefix("push-options: ") {
            options.extend(o.split_whitespace().map(String::from));
            continue;
        }
        let state = line;
        let mut updates = Vec::new();
        while let Some(next) = lines.peek() {
            if matches!(*next, "prepared" | "committed" | "aborted")
                || next.starts_with("push-options: ")
            {
                break;
            }
            updates.push(lines.next().unwrap().to_string());
        }
        let zero = |s: &str| s.bytes().all(|b| b == b'0');
        let packed_side = updates.iter().all(|u| {
            let mut p = u.split(' ');
            zero(p.next().unwrap()) && zero(p.next().unwrap())
        });
        if state == "prepared" && !packed_side {
            assert_eq!(
                updates.len(),
                1,
                "a non-atomic push: one ref per transaction"
            );
            prepared.push(updates[0].split(' ').nth(2).unwrap().to_string());
        }
    }
    Replay {
        stdout: out,
        prepared,
        options,
    }
}

fn reported_ok(stdout: &[u8], refname: &str) -> bool {
    let needle = format!("ok {refname}");
    stdout.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[tokio::test]
async fn real_push_is_applied_in_sorted_ref_order() {
    let fx = Fixture::new("create");
    for b in ["z", "a", "m"] {
        git(fx.root(), &fx.work, &["branch", b]);
    }
    git(fx.root(), &fx.work, &["tag", "v1"]);
    let plain = fx.replica("plain.git");
    let canon = fx.replica("canon.git");

    let request = fx.capture_push(
        "create.req",
        &[
            "../origin.git",
            "refs/tags/v1",
            "refs/heads/z",
            "refs/heads/a",
            "refs/heads/m",
        ],
    );
    let client_order = [
        "refs/tags/v1",
        "refs/heads/z",
        "refs/heads/a",
        "refs/heads/m",
    ];
    assert_eq!(
        sent_order(&request),
        client_order,
        "git sends commands as given"
    );

    let sorted = [
        "refs/heads/a",
        "refs/heads/m",
        "refs/heads/z",
        "refs/tags/v1",
    ];
    let as_sent = replay(&fx, &plain, request.clone(), false).await;
    assert_eq!(
        as_sent.prepared, client_order,
        "receive-pack follows arrival order"
    );
    let rewritten = replay(&fx, &canon, request, true).await;
    assert_eq!(rewritten.prepared, sorted);

    let want = fx.refs(&fx.origin);
    assert_eq!(want.lines().count(), 4);
    assert_eq!(fx.refs(&canon), want);
    assert_eq!(fx.refs(&plain), want);
    for r in sorted {
        assert!(
            reported_ok(&rewritten.stdout, r),
            "no 'ok {r}' in the report"
        );
    }
}

#[tokio::test]
async fn real_push_with_options_updates_and_deletes_is_sorted() {
    let fx = Fixture::new("mixed");
    for b in ["z", "m"] {
        git(fx.root(), &fx.work, &["branch", b]);
    }
    git(
        fx.root(),
        &fx.work,
        &[
            "push",
            "-q",
            "../origin.git",
            "refs/heads/z",
            "refs/heads/m",
        ],
    );
    git(
        fx.root(),
        &fx.origin,
        &["config", "receive.advertisePushOptions", "true"],
    );
    let plain = fx.replica("plain.git");
    let canon = fx.replica("canon.git");

    git(fx.root(), &fx.work, &["checkout", "-q", "-b", "b"]);
    git(
        fx.root(),
        &fx.work,
        &["commit", "-q", "--allow-empty", "-m", "two"],
    );
    git(fx.root(), &fx.work, &["branch", "-f", "m", "b"]);
    let request = fx.capture_push(
        "mixed.req",
        &[
            "-o",
            "ci.skip",
            "-o",
            "topic=x",
            "../origin.git",
            ":refs/heads/z",
            "refs/heads/m",
            "refs/heads/b",
        ],
    );
    // git 2.47 sends the refs the remote already has first, in its order (here m, z),
    // then the new ones; what matters is that it is not sorted.
    let client_order = sent_order(&request);
    let mut sorted = client_order.clone();
    sorted.sort();
    assert_eq!(sorted, ["refs/heads/b", "refs/heads/m", "refs/heads/z"]);
    assert_ne!(client_order, sorted, "the client must send these unsorted");

    let as_sent = replay(&fx, &plain, request.clone(), false).await;
    assert_eq!(as_sent.prepared, client_order);
    let rewritten = replay(&fx, &canon, request, true).await;
    assert_eq!(rewritten.prepared, sorted);
    assert_eq!(rewritten.options, ["ci.skip", "topic=x"]);

    let want = fx.refs(&fx.origin);
    assert!(!want.contains("refs/heads/z") && want.contains("refs/heads/b"));
    assert_eq!(fx.refs(&canon), want);
    assert_eq!(fx.refs(&plain), want);
}
