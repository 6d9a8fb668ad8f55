//! A git process's stdout as records split at one byte (a newline, NUL, or log's
//! `\x01`), read as git writes them, never collected whole; at the end, how git
//! exited, for the caller to judge (several RPCs read git's complaint on stderr).

use crate::error::NodeError;
use crate::git::{Exit, Run};

pub struct Records {
    run: Option<Run>,
    delimiter: u8,
    buf: Vec<u8>,
    pos: usize,
    exit: Option<Exit>,
}

impl Records {
    pub fn new(run: Run, delimiter: u8) -> Records {
        Records {
            run: Some(run),
            delimiter,
            buf: Vec::new(),
            pos: 0,
            exit: None,
        }
    }

    /// The next record without its delimiter; `None` once git's output ended (then
    /// [`Records::exit`] tells how git ended).
    pub async fn next(&mut self) -> Result<Option<Vec<u8>>, NodeError> {
        loop {
            if let Some(i) = self.buf[self.pos..]
                .iter()
                .position(|b| *b == self.delimiter)
            {
                let record = self.buf[self.pos..self.pos + i].to_vec();
                self.pos += i + 1;
                return Ok(Some(record));
            }
            let Some(run) = self.run.as_mut() else {
                if self.pos < self.buf.len() {
                    let record = self.buf[self.pos..].to_vec();
                    self.pos = self.buf.len();
                    return Ok(Some(record));
                }
                return Ok(None);
            };
            self.buf.drain(..self.pos);
            self.pos = 0;
            match run.chunk().await {
                Some(chunk) => self.buf.extend_from_slice(&chunk?),
                None => {
                    let run = self.run.take().expect("checked above");
                    self.exit = Some(run.wait().await?);
                }
            }
        }
    }

    /// How git exited, once [`Records::next`] returned `None`.
    pub fn exit(&mut self) -> Option<Exit> {
        self.exit.take()
    }
}
