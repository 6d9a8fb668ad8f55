//! Processes by pid: starting one with its output in a log file, signalling it (or its
//! process group), telling whether it still runs, and reading the end of its log.
//! Shared by the local cluster (whose processes outlive votingctl) and the test
//! harness (whose processes die with the test).

use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use anyhow::Context;
use std::os::unix::process::CommandExt;

pub use rustix::process::Signal;

/// Starts `cmd` as `name`: stdin from /dev/null, stdout and stderr appended to `log`
/// (appending, so a restarted process keeps the earlier log) after a line saying who
/// started what. `detach` puts it in its own process group: a Ctrl-C meant for whoever
/// started it does not reach it, and [`signal_group`] reaches whatever it starts.
pub fn spawn_logged(
    name: &str,
    mut cmd: Command,
    log: &Path,
    by: &str,
    detach: bool,
) -> anyhow::Result<Child> {
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating log dir {}", dir.display()))?;
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let args: Vec<String> = cmd
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    writeln!(
        file,
        "=== {by}: starting {name}: {} {}",
        cmd.get_program().to_string_lossy(),
        args.join(" ")
    )?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(file.try_clone()?))
        .stderr(Stdio::from(file));
    if detach {
        cmd.process_group(0);
    }
    cmd.spawn().with_context(|| {
        format!(
            "starting {name}: cannot run {}",
            cmd.get_program().to_string_lossy()
        )
    })
}

fn pid_of(pid: u32) -> std::io::Result<rustix::process::Pid> {
    i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .ok_or_else(|| std::io::Error::other(format!("{pid} is not a process id")))
}

/// Sends `sig` to the process `pid`.
pub fn signal(pid: u32, sig: Signal) -> std::io::Result<()> {
    Ok(rustix::process::kill_process(pid_of(pid)?, sig)?)
}

/// Sends `sig` to the process group `pid` leads (see `detach` in [`spawn_logged`]), so
/// a helper it started goes with it; to the process alone if there is no such group.
pub fn signal_group(pid: u32, sig: Signal) {
    let Ok(p) = pid_of(pid) else { return };
    if rustix::process::kill_process_group(p, sig).is_err() {
        let _ = rustix::process::kill_process(p, sig);
    }
}

/// Whether `pid` is a process that has not exited (a zombie has).
pub fn alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command name, which is in parentheses and may hold spaces.
    match stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next())
    {
        Some("Z") | Some("X") | None => false,
        Some(_) => true,
    }
}

/// Whether `pid`'s command line names a path inside `dir` (`DIR/`, so that a sibling
/// `DIR2/` does not count).
pub fn cmdline_names(pid: u32, dir: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let mut dir = dir.as_os_str().as_encoded_bytes().to_vec();
    dir.push(b'/');
    cmdline
        .split(|&b| b == 0)
        .any(|arg| arg.windows(dir.len()).any(|w| w == dir.as_slice()))
}

/// The last `n` lines of the file at `path` (lossy UTF-8), or a note saying why not.
pub fn log_tail(path: &Path, n: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}
