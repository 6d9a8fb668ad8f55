//! Holds at fault points: a process started with [`Hold::env`] stops the task that
//! reaches the named point (see `refvote_cluster::faults::reach`) until the test calls
//! [`Hold::release`], so the test can act at that exact step of the protocol.
//!
//! Each `Hold` has its own directory; dropping it releases the held task, so a failed
//! test never leaves a process waiting.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// One armed hold at one point.
pub struct Hold {
    dir: tempfile::TempDir,
    point: String,
    nth: u64,
}

impl Hold {
    /// A hold at the `nth` arrival (1 = first) at `point`.
    pub fn new(point: &str, nth: u64) -> anyhow::Result<Hold> {
        Ok(Hold {
            dir: tempfile::tempdir().context("hold dir")?,
            point: point.to_owned(),
            nth,
        })
    }

    /// The environment a process needs to hold there.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            (
                refvote_cluster::faults::HOLD_ENV.to_owned(),
                format!("{}:{}", self.point, self.nth),
            ),
            (
                refvote_cluster::faults::HOLD_DIR_ENV.to_owned(),
                self.dir.path().display().to_string(),
            ),
        ]
    }

    fn file(&self, suffix: &str) -> PathBuf {
        self.dir.path().join(format!("{}.{suffix}", self.point))
    }

    /// Whether a task is (or was) held there.
    pub fn reached(&self) -> bool {
        self.file("held").exists()
    }

    /// Waits until a task is held at the point, at most `limit`.
    pub async fn wait_reached(&self, limit: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        while !self.reached() {
            if start.elapsed() > limit {
                bail!(
                    "no task reached fault point {} within {limit:?}",
                    self.point
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }

    /// Lets the held task (and any later arrival) go on.
    pub fn release(&self) {
        let _ = std::fs::write(self.file("release"), b"");
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.release();
    }
}
