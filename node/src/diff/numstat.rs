//! Reading `git diff --numstat -z`: `<added>\t<deleted>\t<path>\0`, or for a rename
//! `<added>\t<deleted>\t\0<old path>\0<new path>\0`; binary files count `-` (0 here,
//! as Gitaly reports them). No I/O.

use super::parse::ParseError;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NumStat {
    pub path: Vec<u8>,
    /// Set for a rename or copy.
    pub old_path: Vec<u8>,
    pub additions: i32,
    pub deletions: i32,
}

/// A streaming numstat reader.
#[derive(Default)]
pub struct NumStatParser {
    partial: Vec<u8>,
    /// A rename's counts waiting for its two paths, and the paths read so far.
    rename: Option<(NumStat, usize)>,
}

impl NumStatParser {
    /// Feeds bytes of git's output; the entries they complete go to `out`.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<NumStat>) -> Result<(), ParseError> {
        let mut rest = data;
        while let Some(nul) = rest.iter().position(|b| *b == 0) {
            let mut field = std::mem::take(&mut self.partial);
            field.extend_from_slice(&rest[..nul]);
            rest = &rest[nul + 1..];
            self.field(field, out)?;
        }
        self.partial.extend_from_slice(rest);
        Ok(())
    }

    /// The output has ended; an unfinished entry is an error.
    pub fn finish(&self) -> Result<(), ParseError> {
        if !self.partial.is_empty() || self.rename.is_some() {
            return Err(ParseError("numstat output ended inside an entry".into()));
        }
        Ok(())
    }

    fn field(&mut self, field: Vec<u8>, out: &mut Vec<NumStat>) -> Result<(), ParseError> {
        match self.rename.take() {
            Some((mut stat, 0)) => {
                stat.old_path = field;
                self.rename = Some((stat, 1));
            }
            Some((mut stat, _)) => {
                stat.path = field;
                out.push(stat);
            }
            None => {
                let mut parts = field.splitn(3, |b| *b == b'\t');
                let (Some(added), Some(deleted), Some(path)) =
                    (parts.next(), parts.next(), parts.next())
                else {
                    return Err(ParseError(format!(
                        "numstat entry {:?}",
                        String::from_utf8_lossy(&field)
                    )));
                };
                let stat = NumStat {
                    additions: count(added)?,
                    deletions: count(deleted)?,
                    path: path.to_vec(),
                    old_path: Vec::new(),
                };
                if path.is_empty() {
                    self.rename = Some((stat, 0));
                } else {
                    out.push(stat);
                }
            }
        }
        Ok(())
    }
}

fn count(field: &[u8]) -> Result<i32, ParseError> {
    if field == b"-" {
        return Ok(0);
    }
    std::str::from_utf8(field)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            ParseError(format!(
                "numstat count {:?}",
                String::from_utf8_lossy(field)
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_binary_and_renamed_entries() {
        let input = b"3\t1\ta.txt\0-\t-\tbin\x001\t0\t\0old\0new\0";
        for step in [1, 5, 100] {
            let mut p = NumStatParser::default();
            let mut out = Vec::new();
            for c in input.chunks(step) {
                p.feed(c, &mut out).unwrap();
            }
            p.finish().unwrap();
            assert_eq!(out.len(), 3, "step {step}");
            assert_eq!((out[0].additions, out[0].deletions), (3, 1));
            assert_eq!(out[1].path, b"bin");
            assert_eq!((out[1].additions, out[1].deletions), (0, 0));
            assert_eq!(out[2].old_path, b"old");
            assert_eq!(out[2].path, b"new");
        }
    }

    #[test]
    fn malformed_entries_are_errors() {
        let mut out = Vec::new();
        assert!(
            NumStatParser::default()
                .feed(b"x\t1\ta\0", &mut out)
                .is_err()
        );
        let mut p = NumStatParser::default();
        p.feed(b"1\t1\t\0old\0", &mut out).unwrap();
        assert!(p.finish().is_err());
    }
}
