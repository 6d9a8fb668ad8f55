//! The gitoxide comparison: the same object lookups answered by a long-lived
//! `git cat-file --batch-command` process (what refvote's read engine pools) and by
//! gitoxide in process, alternating, in one run; and the per-call alternatives
//! (a new `git cat-file` per lookup, `gix::open` per lookup). Prints a markdown table
//! of medians and p90s in microseconds.
//!
//! Usage: `gix-compare <git-dir> <rev> <path> [iterations]`. The lookups: the commit
//! `rev` names (FindCommit), the blob `rev:path` names by its id (GetBlob), and
//! `rev:path` resolved through the tree (TreeEntry). Each reads the object whole.
//!
//! Not measured here: the gRPC call around a lookup (BENCHMARKS.md's read benchmark
//! measures the RPCs themselves).

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Instant;

struct CatFile {
    _child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl CatFile {
    fn start(git_dir: &Path) -> CatFile {
        let mut child = Command::new("git")
            .arg("--git-dir")
            .arg(git_dir)
            .args(["cat-file", "--batch-command", "--buffer"])
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("git cat-file starts");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        CatFile {
            _child: child,
            stdin,
            stdout,
        }
    }

    /// The object `name` names, whole (one round trip).
    fn contents(&mut self, name: &str) -> Vec<u8> {
        write!(self.stdin, "contents {name}\nflush\n").expect("write");
        self.stdin.flush().expect("flush");
        let mut header = String::new();
        self.stdout.read_line(&mut header).expect("header");
        let size: usize = header
            .trim_end()
            .rsplit(' ')
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{name}: {header:?}"));
        let mut data = vec![0; size + 1];
        self.stdout.read_exact(&mut data).expect("contents");
        data.truncate(size);
        data
    }
}

fn gix_contents(repo: &gix::Repository, name: &str) -> Vec<u8> {
    let id = repo
        .rev_parse_single(name)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    id.object().expect("object").detach().data
}

fn gix_commit(repo: &gix::Repository, rev: &str) -> Vec<u8> {
    let id = repo.rev_parse_single(rev).expect("revision");
    let commit = id
        .object()
        .expect("object")
        .peel_to_commit()
        .expect("commit");
    commit.data.clone()
}

/// (median, p90) of `samples` microseconds.
fn stats(samples: &mut [f64]) -> (f64, f64) {
    samples.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
    (at(0.5), at(0.9))
}

fn time<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let start = Instant::now();
    let out = f();
    (out, start.elapsed().as_secs_f64() * 1e6)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        eprintln!("usage: gix-compare <git-dir> <rev> <path> [iterations]");
        std::process::exit(2);
    }
    let git_dir = PathBuf::from(&args[1]);
    let (rev, path) = (args[2].as_str(), args[3].as_str());
    let n: usize = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(2000);

    let repo = gix::open(&git_dir).expect("gix opens the repository");
    let mut cat = CatFile::start(&git_dir);
    let blob = gix::ObjectId::from(
        repo.rev_parse_single(format!("{rev}:{path}").as_str())
            .expect("rev:path"),
    )
    .to_string();
    let commit_name = format!("{rev}^{{commit}}");
    let entry_name = format!("{rev}:{path}");
    // Both sides agree before anything is timed.
    assert_eq!(cat.contents(&commit_name), gix_commit(&repo, rev));
    assert_eq!(cat.contents(&blob), gix_contents(&repo, &blob));
    assert_eq!(cat.contents(&entry_name), gix_contents(&repo, &entry_name));
    // Warm both.
    for _ in 0..100 {
        cat.contents(&commit_name);
        gix_commit(&repo, rev);
    }

    let cases: [(&str, &str); 3] = [
        ("FindCommit (commit by revision)", "commit"),
        ("GetBlob (4 KiB blob by id)", "blob"),
        ("TreeEntry (rev:path)", "entry"),
    ];
    println!(
        "| lookup | pooled cat-file p50 µs | p90 | gix p50 µs | p90 | gix / cat-file p50 | new cat-file per lookup p50 µs | gix::open per lookup p50 µs |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for (label, kind) in cases {
        let name = match kind {
            "commit" => commit_name.clone(),
            "blob" => blob.clone(),
            _ => entry_name.clone(),
        };
        let gix_once = |repo: &gix::Repository| match kind {
            "commit" => gix_commit(repo, rev),
            _ => gix_contents(repo, &name),
        };
        let (mut pooled, mut inproc) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for _ in 0..n {
            let (a, t) = time(|| cat.contents(&name));
            pooled.push(t);
            let (b, t) = time(|| gix_once(&repo));
            inproc.push(t);
            assert_eq!(a.len(), b.len());
        }
        // The per-call alternatives, fewer rounds (a process start each).
        let m = (n / 20).max(20);
        let (mut spawned, mut opened) = (Vec::with_capacity(m), Vec::with_capacity(m));
        for _ in 0..m {
            let (_, t) = time(|| CatFile::start(&git_dir).contents(&name));
            spawned.push(t);
            let (_, t) = time(|| gix_once(&gix::open(&git_dir).expect("open")));
            opened.push(t);
        }
        let (p50, p90) = stats(&mut pooled);
        let (g50, g90) = stats(&mut inproc);
        let (s50, _) = stats(&mut spawned);
        let (o50, _) = stats(&mut opened);
        println!(
            "| {label} | {p50:.1} | {p90:.1} | {g50:.1} | {g90:.1} | {:.2} | {s50:.0} | {o50:.0} |",
            g50 / p50
        );
    }
}
