//! One member of a cluster as a process to start: its program, flags, environment and
//! how to tell it is healthy. The local cluster records these in `cluster.json`; the
//! test harness starts the same ones as children of the test.

use std::path::PathBuf;
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::ready::Ready;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Etcd,
    Node,
    Router,
}

/// One process of a cluster and how to start it (again).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Member {
    pub name: String,
    pub kind: Kind,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub ready: Ready,
}

impl Member {
    /// The command that starts it: its program, flags and environment (for etcd,
    /// without the `ETCD_*` variables it would read as flags).
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        if self.kind == Kind::Etcd {
            // etcd reads ETCD_* variables as flags (cluster.env has ETCD_ENDPOINTS).
            for (k, _) in std::env::vars_os() {
                if k.to_string_lossy().starts_with("ETCD_") {
                    cmd.env_remove(k);
                }
            }
        }
        cmd
    }
}
