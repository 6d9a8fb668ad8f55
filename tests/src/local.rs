//! A cluster started the way a person starts one: `votingctl cluster up` on a random
//! loopback address in a temp dir. [`LocalCluster`] reads its `cluster.env`, runs
//! `votingctl cluster stop|start|down` for the test, and on drop runs `cluster down`
//! and then SIGKILLs, by pid, every process the cluster ever started that is still
//! running — the processes outlive votingctl by design, so the test must not rely on
//! votingctl alone to end them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

use anyhow::{Context, bail};
use refvote_launcher::{self as local_cluster, Layout, process};

use crate::node::bin;
use crate::proc::loopback_ip;

pub struct LocalCluster {
    /// The cluster's directory (`--dir`).
    pub dir: PathBuf,
    /// `cluster.env`, parsed.
    pub env: BTreeMap<String, String>,
    /// Every pid a pid file has shown, with its member's name.
    seen: Mutex<BTreeSet<(String, u32)>>,
    // Removed last, after the processes are gone.
    _tmp: tempfile::TempDir,
}

impl LocalCluster {
    /// `votingctl cluster up --dir <temp> --host <random loopback> <args>`.
    pub fn up(args: &[&str]) -> anyhow::Result<LocalCluster> {
        let tmp = tempfile::Builder::new().prefix("refvote-lc-").tempdir()?;
        let dir = tmp.path().join("c");
        let host = loopback_ip().to_string();
        let dir_arg = dir.to_str().context("utf-8 dir")?.to_owned();
        let mut full = vec!["cluster", "up", "--dir", &dir_arg];
        full.extend(["--host", &host, "--timeout", "60"]);
        full.extend(args);
        let mut c = LocalCluster {
            dir,
            env: BTreeMap::new(),
            seen: Mutex::new(BTreeSet::new()),
            _tmp: tmp,
        };
        let out = c.votingctl(&full)?;
        // Whatever it started is ours to stop, even if it failed.
        c.note_pids();
        if !out.status.success() {
            bail!(
                "votingctl cluster up failed:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        c.env = local_cluster::read_env(&c.dir)?.into_iter().collect();
        Ok(c)
    }

    /// Runs votingctl with `args`; failure is a value.
    pub fn votingctl(&self, args: &[&str]) -> anyhow::Result<Output> {
        Command::new(bin("votingctl"))
            .args(args)
            .output()
            .context("running votingctl")
    }

    /// A `cluster.env` value; panics if the key is missing.
    pub fn var(&self, key: &str) -> &str {
        self.env
            .get(key)
            .unwrap_or_else(|| panic!("cluster.env has no {key}: {:?}", self.env))
    }

    /// `$ROUTER_HTTP/<relative>`.
    pub fn url(&self, relative: &str) -> String {
        format!("{}/{relative}", self.var("ROUTER_HTTP"))
    }

    /// `name`'s repository directory on a node (`node1`…).
    pub fn replica(&self, node: &str, relative: &str) -> PathBuf {
        PathBuf::from(self.var(&format!("{}_STORAGE", node.to_uppercase()))).join(relative)
    }

    pub fn layout(&self) -> anyhow::Result<Layout> {
        Layout::load(&self.dir)
    }

    /// The pid in `name`'s pid file, if the file exists.
    pub fn pid_file(&self, name: &str) -> Option<u32> {
        std::fs::read_to_string(self.dir.join(format!("{name}.pid")))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    fn note_pids(&self) {
        let Ok(layout) = self.layout() else { return };
        let mut seen = self.seen.lock().expect("pid set");
        for name in layout.names() {
            if let Some(pid) = self.pid_file(&name) {
                seen.insert((name, pid));
            }
        }
    }

    /// Every pid the cluster has had, with its member's name.
    pub fn seen_pids(&self) -> Vec<(String, u32)> {
        self.seen.lock().expect("pid set").iter().cloned().collect()
    }

    /// `votingctl cluster <verb> --dir DIR [name]`, which must succeed.
    fn cluster(&self, verb: &str, name: Option<&str>) -> anyhow::Result<String> {
        let mut args = vec![
            "cluster",
            verb,
            "--dir",
            self.dir.to_str().context("utf-8")?,
        ];
        args.extend(name);
        let out = self.votingctl(&args)?;
        self.note_pids();
        if !out.status.success() {
            bail!(
                "votingctl {args:?} failed:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn stop(&self, name: &str) -> anyhow::Result<String> {
        self.cluster("stop", Some(name))
    }

    pub fn start(&self, name: &str) -> anyhow::Result<String> {
        self.cluster("start", Some(name))
    }

    pub fn down(&self) -> anyhow::Result<String> {
        self.cluster("down", None)
    }

    /// The last lines of a member's log.
    pub fn log_tail(&self, name: &str, n: usize) -> String {
        crate::proc::log_tail(&self.dir.join("logs").join(format!("{name}.log")), n)
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        let _ = self.down();
        // Belt and braces: anything `down` left running dies now, if its command line
        // still names this cluster's directory (so a reused pid is never touched).
        for (_, pid) in self.seen_pids() {
            if process::alive(pid) && process::cmdline_names(pid, &self.dir) {
                let _ = process::signal(pid, process::Signal::KILL);
            }
        }
    }
}

/// Runs git with a clean config in `dir`; returns the whole output.
pub fn git_in(dir: &Path, args: &[&str]) -> anyhow::Result<Output> {
    Command::new("git")
        .current_dir(dir)
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", dir)
        .env("GIT_TERMINAL_PROMPT", "0")
        .output()
        .with_context(|| format!("running git {args:?}"))
}
