//! The benchmark's repository, generated once and kept: text files changed over many
//! commits (so packs hold deltas and compressed text, like source code), then
//! incompressible binaries up to the requested size.

use std::path::Path;

use super::git;

/// Deterministic pseudo-random bytes.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn fill(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(n);
        v
    }

    /// Text that compresses and deltas like source code: lines of words.
    pub fn text(&mut self, n: usize) -> String {
        const WORDS: &[&str] = &[
            "let",
            "fn",
            "self",
            "match",
            "return",
            "value",
            "config",
            "repository",
            "error",
            "result",
            "stream",
            "bytes",
            "async",
            "await",
            "impl",
            "struct",
            "pub",
            "use",
            "mod",
            "if",
            "else",
            "for",
            "in",
            "while",
            "Some",
            "None",
        ];
        let mut s = String::with_capacity(n + 80);
        while s.len() < n {
            let words = 3 + self.next() % 9;
            s.push_str(&"    ".repeat((self.next() % 3) as usize));
            for _ in 0..words {
                s.push_str(WORDS[(self.next() % WORDS.len() as u64) as usize]);
                s.push(' ');
            }
            s.push_str(&format!("{};\n", self.next() % 1000));
        }
        s
    }
}

/// Builds the benchmark repository: 2000 text files changed over 40 commits (deltas,
/// compression), then incompressible 8 MiB binaries until the pack reaches `mib`.
pub fn generate(home: &Path, bare: &Path, mib: u64) {
    eprintln!(
        "generating a {mib} MiB repository at {} (once)",
        bare.display()
    );
    let _ = std::fs::remove_dir_all(bare);
    std::fs::create_dir_all(bare).unwrap();
    git(
        home,
        None,
        &["init", "--bare", "--quiet", bare.to_str().unwrap()],
    );
    let work = bare.parent().unwrap().join("generate-work");
    let _ = std::fs::remove_dir_all(&work);
    git(
        home,
        None,
        &[
            "clone",
            "--quiet",
            bare.to_str().unwrap(),
            work.to_str().unwrap(),
        ],
    );
    std::fs::create_dir_all(work.join("src")).unwrap();
    std::fs::create_dir_all(work.join("assets")).unwrap();
    let mut rng = Rng(0x5eed);
    for commit in 0..40 {
        let files: Vec<usize> = if commit == 0 {
            (0..2000).collect()
        } else {
            (0..100).map(|_| (rng.next() % 2000) as usize).collect()
        };
        for i in files {
            let f = work.join(format!("src/file{i:04}.rs"));
            let mut text = std::fs::read_to_string(&f).unwrap_or_default();
            // ASCII text: any byte is a character boundary.
            text.truncate(text.len() / 2);
            text.push_str(&rng.text(16 * 1024 - text.len().min(8 * 1024)));
            std::fs::write(&f, text).unwrap();
        }
        git(home, Some(&work), &["add", "-A"]);
        git(
            home,
            Some(&work),
            &["commit", "--quiet", "-m", &format!("text {commit}")],
        );
    }
    git(home, Some(&work), &["push", "--quiet", "origin", "main"]);
    let packed = |bare: &Path| -> u64 {
        let out = git(
            home,
            None,
            &["--git-dir", bare.to_str().unwrap(), "count-objects", "-v"],
        );
        out.lines()
            .filter_map(|l| l.split_once(": "))
            .filter(|(k, _)| *k == "size-pack" || *k == "size")
            .map(|(_, v)| v.trim().parse::<u64>().unwrap_or(0))
            .sum::<u64>()
            * 1024
    };
    let mut n = 0;
    while packed(bare) < mib << 20 {
        for _ in 0..8 {
            std::fs::write(
                work.join(format!("assets/blob{n:04}.bin")),
                rng.fill(8 << 20),
            )
            .unwrap();
            n += 1;
        }
        git(home, Some(&work), &["add", "-A"]);
        git(
            home,
            Some(&work),
            &["commit", "--quiet", "-m", &format!("assets up to {n}")],
        );
        git(home, Some(&work), &["push", "--quiet", "origin", "main"]);
    }
    git(
        home,
        None,
        &["--git-dir", bare.to_str().unwrap(), "repack", "-adq"],
    );
    std::fs::remove_dir_all(&work).unwrap();
    let tip = git(
        home,
        None,
        &["--git-dir", bare.to_str().unwrap(), "rev-parse", "main"],
    );
    std::fs::write(bare.join("generated"), tip).unwrap();
}
