//! Reading `git diff --raw -z --patch` output into one [`Diff`] per changed file, with
//! Gitaly's limits (no I/O: bytes go in through [`Parser::feed`], diffs come out of
//! [`Parser::next_diff`]).
//!
//! The raw section (`:<modes> <oids> <status>\0<path>\0[<path>\0]`, ended by an empty
//! field) lists every changed file, also those whose patch is empty or suppressed (a
//! mode change, whitespace ignored); the patch section that follows is matched to them
//! in order by its `diff --git` header. The limits are Gitaly's `diff.Parser` rules,
//! quirks included, because GitLab's diff pages are built around them:
//! - `max_files`/`max_lines`/`max_bytes` (with `enforce_limits`): the file that crosses
//!   one is replaced by an overflow marker and parsing stops (or, with
//!   `collect_all_paths`, every later file comes without its patch, marked);
//! - `safe_max_*` (with `collapse_diffs`): files past them come collapsed (no patch);
//! - `max_patch_bytes` (and per extension): a larger patch comes `too_large`, empty;
//! - each limit is capped by Gitaly's upper bound ([`Limits::capped`]).
//!
//! Lines count from the first `-`, `+`, ` `, `\`, `~` or `Binary` line of a file's
//! patch; hunk headers go into the patch but count for nothing; `---`/`+++` file
//! headers and git's extended headers (`index`, `old mode`, ...) are dropped.
//!
//! Memory: only the current file's patch is held, and with limits enforced only up to
//! its byte limit (past it the patch is dropped anyway).

use std::collections::{HashMap, VecDeque};

/// Gitaly's upper bounds on each limit (`internal/gitaly/diff/diff.go`).
pub const MAX_FILES_UPPER_BOUND: i32 = 5000;
pub const MAX_LINES_UPPER_BOUND: i32 = 250_000;
pub const MAX_BYTES_UPPER_BOUND: i32 = 5000 * 5120;
pub const SAFE_MAX_FILES_UPPER_BOUND: i32 = 500;
pub const SAFE_MAX_LINES_UPPER_BOUND: i32 = 25_000;
pub const SAFE_MAX_BYTES_UPPER_BOUND: i32 = 500 * 5120;
pub const MAX_PATCH_BYTES_UPPER_BOUND: i32 = 512_000;

/// When parsing stops or patches are dropped (Gitaly's `diff.Limits`).
#[derive(Debug, Clone, Default)]
pub struct Limits {
    pub enforce_limits: bool,
    pub collapse_diffs: bool,
    pub collect_all_paths: bool,
    pub max_files: i32,
    pub max_lines: i32,
    pub max_bytes: i32,
    pub safe_max_files: i32,
    pub safe_max_lines: i32,
    pub safe_max_bytes: i32,
    pub max_patch_bytes: i32,
    pub max_patch_bytes_for_extension: HashMap<String, i32>,
    /// Only the per-patch limits apply (DiffBlobs).
    pub patch_limits_only: bool,
}

impl Limits {
    /// Each limit at most Gitaly's upper bound for it.
    pub fn capped(mut self) -> Limits {
        self.max_files = self.max_files.min(MAX_FILES_UPPER_BOUND);
        self.max_lines = self.max_lines.min(MAX_LINES_UPPER_BOUND);
        self.max_bytes = self.max_bytes.min(MAX_BYTES_UPPER_BOUND);
        self.safe_max_files = self.safe_max_files.min(SAFE_MAX_FILES_UPPER_BOUND);
        self.safe_max_lines = self.safe_max_lines.min(SAFE_MAX_LINES_UPPER_BOUND);
        self.safe_max_bytes = self.safe_max_bytes.min(SAFE_MAX_BYTES_UPPER_BOUND);
        self.max_patch_bytes = self.max_patch_bytes.min(MAX_PATCH_BYTES_UPPER_BOUND);
        self
    }

    /// The byte limit of one file's patch: by the extension of its base name (or the
    /// whole base name when it has none), else `max_patch_bytes`.
    fn max_patch_bytes_for(&self, to_path: &[u8]) -> i32 {
        if !self.max_patch_bytes_for_extension.is_empty() {
            let name = to_path.rsplit(|b| *b == b'/').next().unwrap_or(to_path);
            let name = String::from_utf8_lossy(name);
            let key = match name.rfind('.') {
                Some(i) => &name[i..],
                None => &name[..],
            };
            if let Some(limit) = self.max_patch_bytes_for_extension.get(key) {
                return *limit;
            }
        }
        self.max_patch_bytes
    }
}

/// One entry of the raw section.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Raw {
    pub old_mode: i32,
    pub new_mode: i32,
    pub from_id: String,
    pub to_id: String,
    /// `A`, `D`, `M`, `T`, `R`, `C`, `U` or `X`.
    pub status: u8,
    /// The similarity score of a rename or copy.
    pub score: i32,
    pub from_path: Vec<u8>,
    pub to_path: Vec<u8>,
}

impl Raw {
    /// Parses the head of a raw entry, `:<old mode> <new mode> <old id> <new id>
    /// <status>[<score>]`, without its paths.
    pub fn parse_head(field: &[u8]) -> Result<Raw, ParseError> {
        let bad = || {
            ParseError(format!(
                "raw diff entry {:?}",
                String::from_utf8_lossy(field)
            ))
        };
        let text =
            std::str::from_utf8(field.strip_prefix(b":").ok_or_else(bad)?).map_err(|_| bad())?;
        let mut parts = text.split(' ');
        let (Some(old), Some(new), Some(from), Some(to), Some(status), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(bad());
        };
        let mode = |m: &str| i32::from_str_radix(m, 8).map_err(|_| bad());
        let hex = |o: &str| {
            (!o.is_empty() && o.bytes().all(|b| b.is_ascii_hexdigit()))
                .then(|| o.to_owned())
                .ok_or_else(bad)
        };
        let code = *status.as_bytes().first().ok_or_else(bad)?;
        if !b"ADTUXMRC".contains(&code) {
            return Err(bad());
        }
        let score = match &status[1..] {
            "" => 0,
            s => s.parse().map_err(|_| bad())?,
        };
        Ok(Raw {
            old_mode: mode(old)?,
            new_mode: mode(new)?,
            from_id: hex(from)?,
            to_id: hex(to)?,
            status: code,
            score,
            from_path: Vec::new(),
            to_path: Vec::new(),
        })
    }

    /// Renames and copies name two paths.
    pub fn has_two_paths(&self) -> bool {
        matches!(self.status, b'R' | b'C')
    }
}

/// One changed file, as Gitaly's `diff.Diff`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Diff {
    pub from_path: Vec<u8>,
    pub to_path: Vec<u8>,
    pub from_id: String,
    pub to_id: String,
    pub old_mode: i32,
    pub new_mode: i32,
    pub status: u8,
    pub binary: bool,
    pub overflow_marker: bool,
    pub collapsed: bool,
    pub too_large: bool,
    pub lines_added: i32,
    pub lines_removed: i32,
    /// The patch's size before any limit dropped it.
    pub patch_size: i32,
    pub patch: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot parse git's diff output: {0}")]
pub struct ParseError(pub String);

/// The file whose patch lines are being read.
struct Current {
    diff: Diff,
    line_count: i64,
    byte_count: i64,
    /// Bytes the patch has, also those not kept (see the module comment).
    patch_len: usize,
    /// Patch bytes kept at most.
    keep: usize,
}

enum Phase {
    /// Reading NUL-terminated raw fields.
    Raw,
    /// Reading patch lines.
    Patch,
}

/// The streaming parser; see the module comment.
pub struct Parser {
    limits: Limits,
    phase: Phase,
    /// Bytes of an unfinished field or line.
    partial: Vec<u8>,
    /// A raw entry's head waiting for its paths, and the paths read so far.
    raw_head: Option<(Raw, usize)>,
    raws: VecDeque<Raw>,
    current: Option<Current>,
    /// A `diff --git` line no raw entry has claimed yet.
    header: Option<Vec<u8>>,
    files: i64,
    lines: i64,
    bytes: i64,
    stop_patches: bool,
    finished: bool,
    out: VecDeque<Diff>,
}

impl Parser {
    pub fn new(limits: Limits) -> Parser {
        Parser {
            limits,
            phase: Phase::Raw,
            partial: Vec::new(),
            raw_head: None,
            raws: VecDeque::new(),
            current: None,
            header: None,
            files: 0,
            lines: 0,
            bytes: 0,
            stop_patches: false,
            finished: false,
            out: VecDeque::new(),
        }
    }

    /// True once a limit ended the diff: nothing more will come out, stop git.
    pub fn finished(&self) -> bool {
        self.finished
    }

    /// The next parsed diff, if one is complete.
    pub fn next_diff(&mut self) -> Option<Diff> {
        self.out.pop_front()
    }

    /// Feeds the next bytes of git's output.
    pub fn feed(&mut self, mut data: &[u8]) -> Result<(), ParseError> {
        while !data.is_empty() && !self.finished {
            match self.phase {
                Phase::Raw => {
                    let Some(nul) = data.iter().position(|b| *b == 0) else {
                        self.partial.extend_from_slice(data);
                        return Ok(());
                    };
                    let field = if self.partial.is_empty() {
                        data[..nul].to_vec()
                    } else {
                        let mut f = std::mem::take(&mut self.partial);
                        f.extend_from_slice(&data[..nul]);
                        f
                    };
                    data = &data[nul + 1..];
                    self.raw_field(field)?;
                }
                Phase::Patch => {
                    let Some(nl) = data.iter().position(|b| *b == b'\n') else {
                        self.partial.extend_from_slice(data);
                        return Ok(());
                    };
                    let line = if self.partial.is_empty() {
                        data[..=nl].to_vec()
                    } else {
                        let mut l = std::mem::take(&mut self.partial);
                        l.extend_from_slice(&data[..=nl]);
                        l
                    };
                    data = &data[nl + 1..];
                    self.patch_line(line)?;
                }
            }
        }
        Ok(())
    }

    /// git's output has ended: completes the last file and every raw entry left.
    pub fn finish(&mut self) -> Result<(), ParseError> {
        if self.finished {
            return Ok(());
        }
        let rest = std::mem::take(&mut self.partial);
        match self.phase {
            Phase::Raw if !rest.is_empty() => self.raw_field(rest)?,
            Phase::Patch if !rest.is_empty() => self.patch_line(rest)?,
            _ => {}
        }
        if self.raw_head.is_some() {
            return Err(ParseError("the output ended inside a raw entry".into()));
        }
        if self.current.is_some() {
            self.complete_current();
        }
        self.header = None;
        self.advance();
        Ok(())
    }

    fn raw_field(&mut self, field: Vec<u8>) -> Result<(), ParseError> {
        match self.raw_head.take() {
            None if field.is_empty() => self.phase = Phase::Patch,
            None => {
                let raw = Raw::parse_head(&field)?;
                self.raw_head = Some((raw, 0));
            }
            Some((mut raw, 0)) => {
                raw.from_path = field.clone();
                raw.to_path = field;
                if raw.has_two_paths() {
                    self.raw_head = Some((raw, 1));
                } else {
                    self.raws.push_back(raw);
                }
            }
            Some((mut raw, _)) => {
                raw.to_path = field;
                self.raws.push_back(raw);
            }
        }
        Ok(())
    }

    fn patch_line(&mut self, line: Vec<u8>) -> Result<(), ParseError> {
        if line.starts_with(b"diff --git") {
            if self.current.is_some() {
                self.complete_current();
            }
            self.header = Some(line);
            self.advance();
            return Ok(());
        }
        let stop_patches = self.stop_patches;
        let Some(cur) = self.current.as_mut() else {
            if self.raws.is_empty() && self.header.is_some() {
                // Every raw entry is served; Gitaly drops the rest of the output too.
                return Ok(());
            }
            return Err(ParseError(format!(
                "expected a \"diff --git\" header, got {:?}",
                String::from_utf8_lossy(&line)
            )));
        };
        let counted =
            if (line.starts_with(b"---") || line.starts_with(b"+++")) && cur.patch_len == 0 {
                None
            } else if line.starts_with(b"@@") {
                Some(false)
            } else if line.starts_with(b"Binary") {
                cur.diff.binary = true;
                Some(true)
            } else if line.starts_with(b"-")
                || line.starts_with(b"+")
                || line.starts_with(b" ")
                || line.starts_with(b"\\")
                || line.starts_with(b"~\n")
            {
                Some(true)
            } else {
                None
            };
        let Some(counts) = counted else {
            return Ok(());
        };
        if counts {
            match line[0] {
                b'+' => cur.diff.lines_added += 1,
                b'-' => cur.diff.lines_removed += 1,
                _ => {}
            }
            cur.byte_count += line.len() as i64;
            cur.line_count += 1;
        }
        if !stop_patches {
            cur.patch_len += line.len();
            let room = cur.keep.saturating_sub(cur.diff.patch.len());
            cur.diff
                .patch
                .extend_from_slice(&line[..line.len().min(room)]);
        }
        Ok(())
    }

    /// Takes raw entries until one claims the pending header (its patch follows) or
    /// none is left; the ones before it have an empty patch.
    fn advance(&mut self) {
        while !self.finished {
            let Some(raw) = self.raws.pop_front() else {
                return;
            };
            let raw = self.split_type_change(raw);
            self.files += 1;
            let diff = Diff {
                from_path: raw.from_path,
                to_path: raw.to_path,
                from_id: raw.from_id,
                to_id: raw.to_id,
                old_mode: raw.old_mode,
                new_mode: raw.new_mode,
                status: raw.status,
                ..Default::default()
            };
            let claims = self
                .header
                .as_deref()
                .is_some_and(|h| is_header_of(h, &diff.from_path));
            if claims {
                self.header = None;
                let keep = if self.limits.enforce_limits {
                    self.limits.max_patch_bytes_for(&diff.to_path).max(0) as usize
                } else {
                    usize::MAX
                };
                self.current = Some(Current {
                    diff,
                    line_count: 0,
                    byte_count: 0,
                    patch_len: 0,
                    keep,
                });
                return;
            }
            // No patch for this file: no limit applies to it (as in Gitaly).
            self.out.push_back(diff);
        }
    }

    /// GitLab shows a type change as a deletion followed by an addition; git prints
    /// two patches for it.
    fn split_type_change(&mut self, mut raw: Raw) -> Raw {
        if raw.status != b'T' {
            return raw;
        }
        let zero = "0".repeat(raw.from_id.len());
        let added = Raw {
            old_mode: 0,
            new_mode: raw.new_mode,
            from_id: zero.clone(),
            to_id: raw.to_id.clone(),
            status: b'A',
            score: 0,
            from_path: raw.from_path.clone(),
            to_path: raw.from_path.clone(),
        };
        raw.new_mode = 0;
        raw.to_id = zero;
        self.raws.push_front(added);
        raw
    }

    /// Applies the limits to the file whose patch just ended and queues it.
    fn complete_current(&mut self) {
        let Some(mut cur) = self.current.take() else {
            return;
        };
        self.lines += cur.line_count;
        self.bytes += cur.byte_count;
        cur.diff.patch_size = cur.patch_len as i32;
        let l = &self.limits;
        if l.collapse_diffs && self.over_safe_limits() && cur.line_count > 0 {
            self.prune(&mut cur);
            cur.diff.collapsed = true;
        }
        let l = &self.limits;
        if l.enforce_limits {
            if cur.patch_len as i64 >= l.max_patch_bytes_for(&cur.diff.to_path) as i64 {
                self.prune(&mut cur);
                cur.diff.too_large = true;
            }
            let l = &self.limits;
            let exceeded = self.files - l.max_files as i64 > 0
                || self.lines - l.max_lines as i64 >= 0
                || self.bytes - l.max_bytes as i64 >= 0;
            if exceeded && !l.patch_limits_only {
                if l.collect_all_paths {
                    cur.diff.patch.clear();
                    cur.patch_len = 0;
                    self.stop_patches = true;
                } else {
                    self.finished = true;
                    cur.diff = Diff::default();
                }
                cur.diff.overflow_marker = true;
            }
        }
        self.out.push_back(cur.diff);
    }

    fn over_safe_limits(&self) -> bool {
        let l = &self.limits;
        self.files > l.safe_max_files as i64
            || self.lines > l.safe_max_lines as i64
            || self.bytes > l.safe_max_bytes as i64
    }

    /// Drops the current patch and takes its lines and bytes back out of the totals
    /// (Gitaly's arithmetic: the line count stays, so a second prune takes it again).
    fn prune(&mut self, cur: &mut Current) {
        self.lines -= cur.line_count;
        self.bytes -= cur.patch_len as i64;
        cur.diff.patch.clear();
        cur.patch_len = 0;
    }
}

/// Whether `line` is the `diff --git` header git prints for a file diffed from `from`
/// (`core.quotePath=true`, prefix `a/`). Like Gitaly, only the old side is compared:
/// a diff of two blobs names each side after its blob.
pub fn is_header_of(line: &[u8], from: &[u8]) -> bool {
    let mut expected = b"diff --git ".to_vec();
    expected.extend(quote_path(b"a/", from));
    expected.push(b' ');
    line.starts_with(&expected)
}

/// `prefix` + `path` as git quotes a path in its output with `core.quotePath=true`:
/// in double quotes with C escapes when any byte needs one, else as it is.
pub fn quote_path(prefix: &[u8], path: &[u8]) -> Vec<u8> {
    let needs = |b: u8| b < 0x20 || b == b'"' || b == b'\\' || b >= 0x7f;
    let all = prefix.iter().chain(path);
    if !all.clone().any(|b| needs(*b)) {
        return prefix.iter().chain(path).copied().collect();
    }
    let mut out = vec![b'"'];
    for &b in prefix.iter().chain(path) {
        match b {
            0x07 => out.extend(b"\\a"),
            0x08 => out.extend(b"\\b"),
            b'\t' => out.extend(b"\\t"),
            b'\n' => out.extend(b"\\n"),
            0x0b => out.extend(b"\\v"),
            0x0c => out.extend(b"\\f"),
            b'\r' => out.extend(b"\\r"),
            b'"' => out.extend(b"\\\""),
            b'\\' => out.extend(b"\\\\"),
            b if needs(b) => out.extend(format!("\\{b:03o}").as_bytes()),
            b => out.push(b),
        }
    }
    out.push(b'"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "1111111111111111111111111111111111111111";
    const B: &str = "2222222222222222222222222222222222222222";
    const Z: &str = "0000000000000000000000000000000000000000";

    fn raw(status: &str, paths: &[&str]) -> Vec<u8> {
        let mut out = format!(":100644 100644 {A} {B} {status}").into_bytes();
        for p in paths {
            out.push(0);
            out.extend(p.as_bytes());
        }
        out.push(0);
        out
    }

    fn patch(path: &str, body: &str) -> String {
        format!(
            "diff --git a/{path} b/{path}\nindex {A}..{B} 100644\n--- a/{path}\n+++ b/{path}\n{body}"
        )
    }

    fn parse(limits: Limits, input: &[u8], step: usize) -> Vec<Diff> {
        let mut p = Parser::new(limits.capped());
        let mut out = Vec::new();
        for chunk in input.chunks(step) {
            p.feed(chunk).unwrap();
            while let Some(d) = p.next_diff() {
                out.push(d);
            }
        }
        p.finish().unwrap();
        while let Some(d) = p.next_diff() {
            out.push(d);
        }
        out
    }

    fn two_files() -> Vec<u8> {
        let mut input = raw("M", &["a.txt"]);
        input.extend(raw("M", &["b.txt"]));
        input.push(0);
        input.extend(patch("a.txt", "@@ -1,2 +1,2 @@\n x\n-y\n+z\n").as_bytes());
        input.extend(patch("b.txt", "@@ -1 +1 @@\n-1\n+2\n+3\n").as_bytes());
        input
    }

    #[test]
    fn files_come_with_their_patch_and_counts_whatever_the_chunking() {
        let input = two_files();
        for step in [1, 3, 7, 4096] {
            let diffs = parse(Limits::default(), &input, step);
            assert_eq!(diffs.len(), 2, "step {step}");
            assert_eq!(diffs[0].from_path, b"a.txt");
            assert_eq!(diffs[0].patch, b"@@ -1,2 +1,2 @@\n x\n-y\n+z\n");
            assert_eq!((diffs[0].lines_added, diffs[0].lines_removed), (1, 1));
            assert_eq!(diffs[1].patch, b"@@ -1 +1 @@\n-1\n+2\n+3\n");
            assert_eq!((diffs[1].lines_added, diffs[1].lines_removed), (2, 1));
            assert_eq!(diffs[1].from_id, A);
            assert_eq!(diffs[1].to_id, B);
        }
    }

    #[test]
    fn files_without_a_patch_still_come_in_raw_order() {
        let mut input = raw("M", &["mode-only"]);
        input.extend(raw("R087", &["old name", "new name"]));
        input.extend(raw("M", &["z"]));
        input.push(0);
        input.extend(
            b"diff --git a/old name b/new name\nsimilarity index 87%\n@@ -1 +1 @@\n-a\n+b\n",
        );
        let diffs = parse(Limits::default(), &input, 5);
        assert_eq!(diffs.len(), 3);
        assert!(diffs[0].patch.is_empty());
        assert_eq!(diffs[1].from_path, b"old name");
        assert_eq!(diffs[1].to_path, b"new name");
        assert_eq!(diffs[1].lines_added, 1);
        assert!(diffs[2].patch.is_empty());
        assert_eq!(diffs[2].to_path, b"z");
    }

    #[test]
    fn a_type_change_is_a_deletion_then_an_addition() {
        let mut input = format!(":100644 120000 {A} {B} T").into_bytes();
        input.extend(b"\0link\0\0");
        input.extend(
            b"diff --git a/link b/link\ndeleted file mode 100644\n@@ -1 +0,0 @@\n-x\n\
diff --git a/link b/link\nnew file mode 120000\n@@ -0,0 +1 @@\n+target\n\\ No newline at end of file\n",
        );
        let diffs = parse(Limits::default(), &input, 9);
        assert_eq!(diffs.len(), 2);
        assert_eq!((diffs[0].new_mode, diffs[0].to_id.as_str()), (0, Z));
        assert_eq!(diffs[0].lines_removed, 1);
        assert_eq!((diffs[1].old_mode, diffs[1].from_id.as_str()), (0, Z));
        assert_eq!(diffs[1].new_mode, 0o120000);
        assert_eq!(diffs[1].to_id, B);
        assert_eq!(diffs[1].lines_added, 1);
    }

    #[test]
    fn quoted_paths_are_matched_to_their_header() {
        let path = "ü \"q\".txt";
        let mut input = raw("A", &[path]);
        input.push(0);
        input.extend(br#"diff --git "a/\303\274 \"q\".txt" "b/\303\274 \"q\".txt""#);
        input.extend(b"\nnew file mode 100644\n@@ -0,0 +1 @@\n+x\n");
        let diffs = parse(Limits::default(), &input, 4096);
        assert_eq!(diffs.len(), 1);
        assert_eq!(diffs[0].from_path, path.as_bytes());
        assert_eq!(diffs[0].lines_added, 1);
        assert_eq!(quote_path(b"a/", b"plain name"), b"a/plain name");
    }

    #[test]
    fn binary_files_are_flagged() {
        let mut input = raw("A", &["bin"]);
        input.push(0);
        input.extend(b"diff --git a/bin b/bin\nnew file mode 100644\nindex 0..1\nBinary files /dev/null and b/bin differ\n");
        let d = &parse(Limits::default(), &input, 4096)[0];
        assert!(d.binary);
        assert_eq!(d.patch, b"Binary files /dev/null and b/bin differ\n");
        assert_eq!((d.lines_added, d.lines_removed), (0, 0));
    }

    #[test]
    fn max_files_replaces_the_file_past_it_with_an_overflow_marker_and_stops() {
        let limits = Limits {
            enforce_limits: true,
            max_files: 1,
            max_lines: 100,
            max_bytes: 10_000,
            max_patch_bytes: 10_000,
            ..Default::default()
        };
        let diffs = parse(limits, &two_files(), 4096);
        assert_eq!(diffs.len(), 2);
        assert!(!diffs[0].overflow_marker);
        assert_eq!(
            diffs[1],
            Diff {
                overflow_marker: true,
                ..Default::default()
            }
        );
    }

    #[test]
    fn collect_all_paths_keeps_the_files_past_a_limit_without_patches() {
        let limits = Limits {
            enforce_limits: true,
            collect_all_paths: true,
            max_files: 100,
            max_lines: 3,
            max_bytes: 10_000,
            max_patch_bytes: 10_000,
            ..Default::default()
        };
        let diffs = parse(limits, &two_files(), 4096);
        // a.txt has 3 counted lines: it reaches max_lines itself.
        assert!(diffs[0].overflow_marker && diffs[0].patch.is_empty());
        assert_eq!(diffs[0].from_path, b"a.txt");
        assert!(diffs[1].overflow_marker && diffs[1].patch.is_empty());
        assert_eq!(diffs[1].lines_added, 2);
    }

    #[test]
    fn patch_and_safe_limits() {
        let too_large = Limits {
            enforce_limits: true,
            max_files: 100,
            max_lines: 100,
            max_bytes: 10_000,
            max_patch_bytes: 24,
            ..Default::default()
        };
        let diffs = parse(too_large, &two_files(), 4096);
        assert!(diffs[0].too_large && diffs[0].patch.is_empty());
        assert_eq!(diffs[0].patch_size, 25);
        assert!(!diffs[1].too_large, "{:?}", diffs[1]);

        let collapse = Limits {
            collapse_diffs: true,
            safe_max_files: 1,
            safe_max_lines: 100,
            safe_max_bytes: 10_000,
            ..Default::default()
        };
        let diffs = parse(collapse, &two_files(), 4096);
        assert!(!diffs[0].collapsed);
        assert!(diffs[1].collapsed && diffs[1].patch.is_empty());
        assert_eq!(diffs[1].lines_added, 2);

        let by_extension = Limits {
            enforce_limits: true,
            max_files: 100,
            max_lines: 100,
            max_bytes: 10_000,
            max_patch_bytes: 10_000,
            max_patch_bytes_for_extension: HashMap::from([(".txt".to_owned(), 5)]),
            ..Default::default()
        };
        let diffs = parse(by_extension, &two_files(), 4096);
        assert!(diffs.iter().all(|d| d.too_large));
    }

    #[test]
    fn limits_are_capped_at_gitalys_upper_bounds() {
        let l = Limits {
            max_files: i32::MAX,
            max_patch_bytes: i32::MAX,
            safe_max_lines: i32::MAX,
            ..Default::default()
        }
        .capped();
        assert_eq!(l.max_files, MAX_FILES_UPPER_BOUND);
        assert_eq!(l.max_patch_bytes, MAX_PATCH_BYTES_UPPER_BOUND);
        assert_eq!(l.safe_max_lines, SAFE_MAX_LINES_UPPER_BOUND);
    }

    #[test]
    fn raw_only_output_and_bad_input() {
        // --raw without --patch: no separator, no patch section.
        let mut input = raw("D", &["gone"]);
        input.extend(raw("C075", &["src", "copy"]));
        let diffs = parse(Limits::default(), &input, 2);
        assert_eq!(diffs.len(), 2);
        assert_eq!(diffs[1].to_path, b"copy");
        assert!(Raw::parse_head(b":100644 100644 zz 11 M").is_err());
        assert!(Raw::parse_head(b"100644 100644 11 11 M").is_err());
        let mut p = Parser::new(Limits::default());
        p.feed(b":100644 100644 11 22 M\0x\0\0not a header\n")
            .unwrap_err();
    }
}
