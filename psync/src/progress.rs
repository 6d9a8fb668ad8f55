//! The progress line on a terminal: repositories done out of all, bytes moved, and
//! their rates, redrawn on stderr four times a second by a background task while the
//! pipelines only bump counters. Off when stderr is not a terminal, with `--quiet`
//! and with `--json` (a timer's journal gets the per-repository lines and the summary,
//! not a redraw every 250 ms). A small renderer of our own: one line does not need a
//! progress-bar crate.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::report::{Outcome, RepoReport, human_bytes};
use crate::transfer::Counter;

/// What a run prints besides the progress line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A line per repository on stdout as it finishes, and the summary.
    Lines,
    /// Only failures, on stderr.
    Quiet,
    /// Nothing but the JSON summary at the end.
    Json,
}

struct State {
    mode: Mode,
    enabled: bool,
    started: Instant,
    bytes: Counter,
    done: AtomicU64,
    total: AtomicU64,
    current: Mutex<(String, &'static str)>,
    drawn: AtomicBool,
    stop: AtomicBool,
}

/// The display of one run; clones share it.
#[derive(Clone)]
pub struct Progress {
    state: Arc<State>,
}

impl Progress {
    /// A display for `mode`; the progress line is drawn only in [`Mode::Lines`] and
    /// when stderr is a terminal. Needs a tokio runtime when it draws.
    pub fn new(mode: Mode) -> Progress {
        let enabled = mode == Mode::Lines && std::io::stderr().is_terminal();
        let p = Progress {
            state: Arc::new(State {
                mode,
                enabled,
                started: Instant::now(),
                bytes: Arc::new(AtomicU64::new(0)),
                done: AtomicU64::new(0),
                total: AtomicU64::new(0),
                current: Mutex::new((String::new(), "")),
                drawn: AtomicBool::new(false),
                stop: AtomicBool::new(false),
            }),
        };
        if enabled {
            let state = p.state.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(250));
                while !state.stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    draw(&state);
                }
            });
        }
        p
    }

    /// The counter the pipelines add their bytes to.
    pub fn bytes(&self) -> &Counter {
        &self.state.bytes
    }

    pub fn total_bytes(&self) -> u64 {
        self.state.bytes.load(Ordering::Relaxed)
    }

    pub fn set_total(&self, repositories: usize) {
        self.state
            .total
            .store(repositories as u64, Ordering::Relaxed);
    }

    /// What is being done now (`fetching`, `uploading`, `applying`...).
    pub fn at(&self, repository: &str, phase: &'static str) {
        *self.state.current.lock().expect("not poisoned") = (repository.to_owned(), phase);
    }

    pub fn repository_done(&self) {
        self.state.done.fetch_add(1, Ordering::Relaxed);
    }

    /// Tells the person about a repository's outcome, as the mode wants.
    pub fn report(&self, r: &RepoReport) {
        match self.state.mode {
            Mode::Lines => self.println(&r.line()),
            Mode::Quiet if r.outcome == Outcome::Failed => {
                self.clear();
                eprintln!("{}", r.line());
            }
            Mode::Quiet | Mode::Json => {}
        }
    }

    pub fn mode(&self) -> Mode {
        self.state.mode
    }

    /// Prints a line above the progress line.
    pub fn println(&self, line: &str) {
        self.clear();
        println!("{line}");
        if self.state.enabled {
            draw(&self.state);
        }
    }

    /// Removes the progress line for good.
    pub fn finish(&self) {
        self.state.stop.store(true, Ordering::Relaxed);
        self.clear();
    }

    fn clear(&self) {
        if self.state.drawn.swap(false, Ordering::Relaxed) {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K");
            let _ = err.flush();
        }
    }
}

fn draw(state: &State) {
    if state.stop.load(Ordering::Relaxed) {
        return;
    }
    let (repo, phase) = state.current.lock().expect("not poisoned").clone();
    let line = render(
        state.done.load(Ordering::Relaxed),
        state.total.load(Ordering::Relaxed),
        state.bytes.load(Ordering::Relaxed),
        state.started.elapsed(),
        &repo,
        phase,
    );
    let mut err = std::io::stderr().lock();
    let _ = write!(err, "\r\x1b[2K{line}");
    let _ = err.flush();
    state.drawn.store(true, Ordering::Relaxed);
}

/// The progress line's text.
pub fn render(
    done: u64,
    total: u64,
    bytes: u64,
    elapsed: Duration,
    repo: &str,
    phase: &str,
) -> String {
    let secs = elapsed.as_secs_f64().max(0.001);
    let mut s = format!(
        "[{done}/{total} repositories, {:.1}/min] {} at {}/s",
        done as f64 * 60.0 / secs,
        human_bytes(bytes),
        human_bytes((bytes as f64 / secs) as u64)
    );
    if !repo.is_empty() {
        s.push_str(&format!("  {repo}: {phase}"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_shows_counts_and_rates() {
        let l = render(
            2,
            5,
            10 * 1024 * 1024,
            Duration::from_secs(2),
            "g/p.git",
            "uploading",
        );
        assert_eq!(
            l,
            "[2/5 repositories, 60.0/min] 10.0 MiB at 5.0 MiB/s  g/p.git: uploading"
        );
    }
}
