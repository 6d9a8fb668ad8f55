//! refvote-launcher: starts refvote's processes on one machine, for `votingctl cluster`
//! and for the test harness alike. One description of each member ([`Member`]: the
//! program, its flags and environment, and how to tell it is healthy), built the same
//! way for both:
//!
//! - [`etcd`]: an etcd of 1, 3 or 5 members on one loopback address (names, ports,
//!   data directories, flags, optional client TLS);
//! - [`config`]: a votingd node's home directory and config, and a router's, written
//!   by serializing the real config types (`votingd::Config`, `refvote_router::Config`)
//!   and checked as the daemons check them;
//! - [`process`]: starting a member with its output in a log file, signalling it by
//!   pid (or its process group), whether it still runs; [`ready`]: one health probe;
//! - [`local`]: `votingctl cluster up|down|stop|start` (DESIGN.md §7): a whole cluster
//!   under one directory, with `cluster.env`, `cluster.json` and pid files, whose
//!   processes outlive votingctl.
//!
//! The test harness (`tests/src`) starts the same members through [`Member::command`]
//! and keeps each process as a child it kills by pid when the test ends. The launcher
//! builds nothing: the binaries must exist (`etcd` from PATH; `votingd`,
//! `refvote-router` and the hook beside the running executable or on PATH, or where
//! the caller says). It never runs a cluster across machines.
#![forbid(unsafe_code)]

pub mod config;
pub mod etcd;
mod host;
pub mod local;
mod member;
pub mod process;
pub mod ready;

pub use host::{find_binary, free_ports, on_path};
pub use local::{
    ENV_FILE, LAYOUT_FILE, Layout, STOP_GRACE, UpOptions, down, read_env, start, stop, up,
};
pub use member::{Kind, Member};
pub use process::alive;
pub use ready::{Ready, check};

#[cfg(test)]
mod tests {
    use super::process::{Signal, cmdline_names, signal_group};
    use super::*;
    use std::os::unix::process::CommandExt;
    use std::path::Path;
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    const POLL: Duration = Duration::from_millis(50);

    #[test]
    fn env_values_are_shell_words() {
        use local::shell_quote;
        assert_eq!(shell_quote("127.0.0.1:5"), "127.0.0.1:5");
        assert_eq!(shell_quote("node1 node2"), "\"node1 node2\"");
        assert_eq!(shell_quote("it's $x"), r"'it'\''s $x'");
        assert_eq!(shell_quote(""), "\"\"");
    }

    #[test]
    fn a_pid_counts_only_while_alive_and_naming_the_dir() {
        // A member with a helper of its own, in its own process group, as a detached
        // spawn does.
        let mut child = Command::new("sh")
            .args(["-c", "sleep 30; :", "/tmp/refvote-x/node1/votingd.toml"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap();
        let pid = child.id();
        assert!(alive(pid));
        // Right after fork the child still shows the test's command line, until exec.
        let until = Instant::now() + Duration::from_secs(5);
        while !cmdline_names(pid, Path::new("/tmp/refvote-x")) && Instant::now() < until {
            std::thread::sleep(POLL);
        }
        assert!(cmdline_names(pid, Path::new("/tmp/refvote-x")));
        assert!(!cmdline_names(pid, Path::new("/tmp/refvote")));
        assert!(!cmdline_names(pid, Path::new("/tmp/refvote-x/node")));
        // The whole group goes: nothing of it is left behind.
        signal_group(pid, Signal::KILL);
        // Until it is reaped it is a zombie, which does not count as alive.
        let until = Instant::now() + Duration::from_secs(5);
        while alive(pid) && Instant::now() < until {
            std::thread::sleep(POLL);
        }
        assert!(!alive(pid));
        child.wait().unwrap();
        assert!(!alive(u32::MAX));
    }
}
