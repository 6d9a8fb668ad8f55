//! The engine against real git in a temporary repository: reuse, freshness after every
//! kind of ref write, the mailmap, quarantines, and processes that must not return.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;

fn git(dir: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_AUTHOR_NAME", "A U Thor")
        .env("GIT_AUTHOR_EMAIL", "author@example.com")
        .env("GIT_COMMITTER_NAME", "C O Mitter")
        .env("GIT_COMMITTER_EMAIL", "committer@example.com")
        .output()
        .unwrap();
    assert!(out.status.success(), "git {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

struct Repo {
    _dir: tempfile::TempDir,
    path: PathBuf,
    work: PathBuf,
}

/// A bare repository `r.git` with `main` holding one commit, and a work tree that
/// pushes into it.
fn repo() -> Repo {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.git");
    let work = dir.path().join("w");
    git(
        dir.path(),
        &[
            "init",
            "--quiet",
            "--bare",
            "--initial-branch=main",
            "r.git",
        ],
    );
    git(
        dir.path(),
        &["init", "--quiet", "--initial-branch=main", "w"],
    );
    std::fs::write(work.join("a.txt"), "a\n").unwrap();
    git(&work, &["add", "."]);
    git(&work, &["commit", "--quiet", "-m", "first"]);
    git(&work, &["push", "--quiet", path.to_str().unwrap(), "main"]);
    Repo {
        _dir: dir,
        path,
        work,
    }
}

fn engine() -> ReadEngine {
    ReadEngine::new(
        Git::new("git".into(), Duration::from_secs(30), "/nonexistent".into()),
        Limits::default(),
    )
}

async fn oid(e: &ReadEngine, repo: &Path, rev: &str) -> Option<String> {
    let mut r = e
        .reader_with(repo, ObjectDirs::default(), true)
        .await
        .unwrap();
    r.info(rev).await.unwrap().map(|i| i.oid)
}

#[tokio::test]
async fn one_process_serves_call_after_call() {
    let r = repo();
    let e = engine();
    let head = git(&r.path, &["rev-parse", "main"]);
    for _ in 0..5 {
        assert_eq!(oid(&e, &r.path, "main").await, Some(head.clone()));
    }
    let s = e.stats();
    assert_eq!(s.started, 1, "{s:?}");
    assert_eq!(s.reused, 4, "{s:?}");
    assert_eq!(s.idle, 1, "{s:?}");
}

#[tokio::test]
async fn a_pooled_process_never_answers_with_refs_older_than_disk() {
    let r = repo();
    let e = engine();
    let c1 = git(&r.path, &["rev-parse", "main"]);
    assert_eq!(oid(&e, &r.path, "main").await, Some(c1.clone()));
    // A loose update.
    std::fs::write(r.work.join("b.txt"), "b\n").unwrap();
    git(&r.work, &["add", "."]);
    git(&r.work, &["commit", "--quiet", "-m", "second"]);
    git(
        &r.work,
        &["push", "--quiet", r.path.to_str().unwrap(), "main"],
    );
    let c2 = git(&r.path, &["rev-parse", "main"]);
    assert_eq!(oid(&e, &r.path, "main").await, Some(c2.clone()));
    // Packed, then moved while packed (a rewrite of packed-refs the size of the old).
    git(&r.path, &["update-ref", "refs/heads/x", &c1]);
    git(&r.path, &["pack-refs", "--all"]);
    assert_eq!(oid(&e, &r.path, "x").await, Some(c1.clone()));
    git(&r.path, &["update-ref", "refs/heads/x", &c2]);
    git(&r.path, &["pack-refs", "--all"]);
    assert_eq!(oid(&e, &r.path, "x").await, Some(c2.clone()));
    // A packed ref deleted.
    git(&r.path, &["update-ref", "-d", "refs/heads/x"]);
    assert_eq!(oid(&e, &r.path, "x").await, None);
    // HEAD pointed elsewhere.
    git(&r.path, &["update-ref", "refs/heads/other", &c1]);
    git(&r.path, &["symbolic-ref", "HEAD", "refs/heads/other"]);
    assert_eq!(oid(&e, &r.path, "HEAD").await, Some(c1));
    assert!(e.stats().retired >= 1, "{:?}", e.stats());
}

#[tokio::test]
async fn identities_follow_the_mailmap_on_head_as_it_changes() {
    let r = repo();
    let e = engine();
    let author = |c: &GitCommit| c.author.as_ref().unwrap().name.clone();
    let read = |e: ReadEngine, path: PathBuf| async move {
        let mut rd = e
            .reader_with(&path, ObjectDirs::default(), true)
            .await
            .unwrap();
        rd.commit("main").await.unwrap().unwrap()
    };
    assert_eq!(author(&read(e.clone(), r.path.clone()).await), b"A U Thor");
    std::fs::write(r.work.join(".mailmap"), "Real Name <author@example.com>\n").unwrap();
    git(&r.work, &["add", "."]);
    git(&r.work, &["commit", "--quiet", "-m", "mailmap"]);
    git(
        &r.work,
        &["push", "--quiet", r.path.to_str().unwrap(), "main"],
    );
    // The pooled process loaded no mailmap; it must not answer with the old identity.
    assert_eq!(author(&read(e.clone(), r.path.clone()).await), b"Real Name");
    // A raw reader sees the bytes as written.
    let mut raw = e
        .reader_with(&r.path, ObjectDirs::default(), false)
        .await
        .unwrap();
    let c = raw.commit("main").await.unwrap().unwrap();
    assert_eq!(author(&c), b"A U Thor");
}

#[tokio::test]
async fn objects_stream_in_pieces_and_a_half_read_process_is_not_reused() {
    let r = repo();
    let e = engine();
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(r.work.join("big.bin"), &big).unwrap();
    git(&r.work, &["add", "."]);
    git(&r.work, &["commit", "--quiet", "-m", "big"]);
    git(
        &r.work,
        &["push", "--quiet", r.path.to_str().unwrap(), "main"],
    );
    {
        let mut rd = e
            .reader_with(&r.path, ObjectDirs::default(), true)
            .await
            .unwrap();
        let info = rd.open("main:big.bin").await.unwrap().unwrap();
        assert_eq!(info.size, big.len() as u64);
        let mut got = Vec::new();
        loop {
            let chunk = rd.read(32 * 1024).await.unwrap();
            if chunk.is_empty() {
                break;
            }
            assert!(chunk.len() <= 32 * 1024);
            got.extend(chunk);
        }
        assert_eq!(got, big);
        // Lookups after a whole object work, and so does skipping one.
        rd.open("main:big.bin").await.unwrap().unwrap();
        assert!(rd.info("main:a.txt").await.unwrap().is_some());
    }
    assert_eq!(e.stats().idle, 1);
    {
        let mut rd = e
            .reader_with(&r.path, ObjectDirs::default(), true)
            .await
            .unwrap();
        rd.open("main:big.bin").await.unwrap().unwrap();
        let _ = rd.read(1000).await.unwrap();
        // Dropped mid-object: stopped, not pooled.
    }
    let s = e.stats();
    assert_eq!(s.idle, 0, "{s:?}");
    assert!(oid(&e, &r.path, "main").await.is_some());
    assert_eq!(e.stats().started, 2, "{:?}", e.stats());
}

#[tokio::test]
async fn batches_keep_order_and_misses() {
    let r = repo();
    let e = engine();
    let head = git(&r.path, &["rev-parse", "main"]);
    let names: Vec<String> = (0..300)
        .map(|i| {
            if i % 3 == 0 {
                "nope".to_owned()
            } else {
                head.clone()
            }
        })
        .collect();
    let mut rd = e
        .reader_with(&r.path, ObjectDirs::default(), true)
        .await
        .unwrap();
    let commits = rd.commits(&names).await.unwrap();
    assert_eq!(commits.len(), 300);
    for (i, c) in commits.iter().enumerate() {
        assert_eq!(c.is_some(), i % 3 != 0, "{i}");
    }
    let infos = rd.infos(&names).await.unwrap();
    assert_eq!(infos.iter().filter(|i| i.is_none()).count(), 100);
}

#[tokio::test]
async fn a_quarantine_is_read_through_its_own_processes() {
    let r = repo();
    let e = engine();
    // An object written only into a separate object directory.
    let quarantine = r.path.join("objects").join("incoming-test");
    std::fs::create_dir_all(&quarantine).unwrap();
    let out = std::process::Command::new("git")
        .arg("--git-dir")
        .arg(&r.path)
        .args(["hash-object", "-w", "--stdin"])
        .env("GIT_OBJECT_DIRECTORY", &quarantine)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(b"quarantined\n")?;
            c.wait_with_output()
        })
        .unwrap();
    let blob = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert_eq!(oid(&e, &r.path, &blob).await, None);
    let dirs = ObjectDirs {
        object_dir: Some(quarantine),
        alternates: vec![r.path.join("objects")],
    };
    let mut q = e.reader_with(&r.path, dirs, true).await.unwrap();
    assert_eq!(q.info(&blob).await.unwrap().map(|i| i.oid), Some(blob));
    // The repository's own objects through the alternate.
    assert!(q.commit("main").await.unwrap().is_some());
}

#[tokio::test]
async fn eviction_and_the_process_cap() {
    let r = repo();
    let e = ReadEngine::new(
        Git::new("git".into(), Duration::from_secs(30), "/nonexistent".into()),
        Limits {
            processes: 2,
            ..Limits::default()
        },
    );
    assert!(oid(&e, &r.path, "main").await.is_some());
    e.evict(&r.path);
    assert_eq!(e.stats().idle, 0);
    // Two held, a third for another key waits for one to come back.
    let a = e
        .reader_with(&r.path, ObjectDirs::default(), true)
        .await
        .unwrap();
    let b = e
        .reader_with(&r.path, ObjectDirs::default(), false)
        .await
        .unwrap();
    assert_eq!(e.stats().alive, 2);
    let e2 = e.clone();
    let path = r.path.clone();
    let third = tokio::spawn(async move {
        let mut c = e2
            .reader_with(&path, ObjectDirs::default(), true)
            .await
            .unwrap();
        c.info("main").await.unwrap().is_some()
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!third.is_finished());
    drop(a);
    assert!(third.await.unwrap());
    drop(b);
    // An idle process makes room for another key at once.
    let stats = e.stats();
    assert!(stats.alive <= 2, "{stats:?}");
}
