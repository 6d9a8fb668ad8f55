//! The ref changes of a push as git hands them to `pre-receive` and `post-receive` on
//! stdin, and as GitLab's `/allowed` and `/post_receive` take them: one
//! `<old-oid> <new-oid> <refname>\n` line per ref, a zero object id for "none". The
//! `update` hook gets the same three values as arguments, one ref per run.

use std::fmt;

/// One ref update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub old: String,
    pub new: String,
    pub reference: String,
}

/// Why a changes text was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChangesError {
    #[error("hook got no reference updates")]
    Empty,
    #[error("line {line} of the reference updates is not \"<old> <new> <ref>\": {text:?}")]
    Malformed { line: usize, text: String },
    #[error("line {line} of the reference updates has an invalid object id {oid:?}")]
    BadObjectId { line: usize, oid: String },
    #[error("line {line} of the reference updates mixes object id lengths")]
    MixedHashes { line: usize },
    #[error("the reference updates are not UTF-8")]
    NotUtf8,
}

fn is_oid(s: &str) -> bool {
    matches!(s.len(), 40 | 64) && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn is_zero(s: &str) -> bool {
    s.bytes().all(|b| b == b'0')
}

impl Change {
    /// A change, its object ids checked (40 or 64 lower-case hex digits, same length)
    /// and its ref name free of whitespace.
    pub fn new(
        old: impl Into<String>,
        new: impl Into<String>,
        reference: impl Into<String>,
    ) -> Result<Change, ChangesError> {
        let change = Change {
            old: old.into(),
            new: new.into(),
            reference: reference.into(),
        };
        change.check(1)?;
        Ok(change)
    }

    fn check(&self, line: usize) -> Result<(), ChangesError> {
        for oid in [&self.old, &self.new] {
            if !is_oid(oid) {
                return Err(ChangesError::BadObjectId {
                    line,
                    oid: oid.clone(),
                });
            }
        }
        if self.old.len() != self.new.len() {
            return Err(ChangesError::MixedHashes { line });
        }
        if self.reference.is_empty()
            || self
                .reference
                .bytes()
                .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        {
            return Err(ChangesError::Malformed {
                line,
                text: self.to_string(),
            });
        }
        Ok(())
    }

    /// The ref did not exist before.
    pub fn is_create(&self) -> bool {
        is_zero(&self.old)
    }

    /// The ref is deleted.
    pub fn is_delete(&self) -> bool {
        is_zero(&self.new)
    }

    /// The `update` hook's arguments: ref name, old value, new value.
    pub fn update_hook_args(&self) -> [&str; 3] {
        [&self.reference, &self.old, &self.new]
    }
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.old, self.new, self.reference)
    }
}

/// The changes of one hook run: the text exactly as received (what GitLab is sent) and
/// its parsed lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changes {
    text: String,
    list: Vec<Change>,
}

impl Changes {
    /// Parses hook stdin. Every line must be a valid change; at least one is needed.
    /// A missing newline after the last line is accepted (and kept as received).
    pub fn parse(bytes: &[u8]) -> Result<Changes, ChangesError> {
        let text = std::str::from_utf8(bytes).map_err(|_| ChangesError::NotUtf8)?;
        let mut list = Vec::new();
        for (i, line) in text.split_terminator('\n').enumerate() {
            let mut parts = line.splitn(3, ' ');
            let (Some(old), Some(new), Some(reference)) =
                (parts.next(), parts.next(), parts.next())
            else {
                return Err(ChangesError::Malformed {
                    line: i + 1,
                    text: line.to_owned(),
                });
            };
            let change = Change {
                old: old.to_owned(),
                new: new.to_owned(),
                reference: reference.to_owned(),
            };
            change.check(i + 1)?;
            list.push(change);
        }
        if list.is_empty() {
            return Err(ChangesError::Empty);
        }
        Ok(Changes {
            text: text.to_owned(),
            list,
        })
    }

    /// The text git would write for these changes, one line each.
    pub fn from_list(list: Vec<Change>) -> Result<Changes, ChangesError> {
        if list.is_empty() {
            return Err(ChangesError::Empty);
        }
        let text = list.iter().map(|c| format!("{c}\n")).collect();
        Ok(Changes { text, list })
    }

    /// The text as received: what `/allowed`, `/post_receive` and custom hooks get.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn list(&self) -> &[Change] {
        &self.list
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// Always false: a `Changes` holds at least one change.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "1111111111111111111111111111111111111111";
    const B: &str = "2222222222222222222222222222222222222222";
    const Z: &str = "0000000000000000000000000000000000000000";

    #[test]
    fn parses_lines_and_keeps_the_text() {
        let text =
            format!("{A} {B} refs/heads/main\n{Z} {B} refs/tags/v1\n{A} {Z} refs/heads/old\n");
        let c = Changes::parse(text.as_bytes()).unwrap();
        assert_eq!(c.as_str(), text);
        assert_eq!(c.len(), 3);
        assert_eq!(c.list()[0].reference, "refs/heads/main");
        assert!(!c.list()[0].is_create() && !c.list()[0].is_delete());
        assert!(c.list()[1].is_create());
        assert!(c.list()[2].is_delete());
        assert_eq!(c.list()[0].update_hook_args(), ["refs/heads/main", A, B]);
        let no_newline = format!("{A} {B} refs/heads/main");
        assert_eq!(Changes::parse(no_newline.as_bytes()).unwrap().len(), 1);
    }

    #[test]
    fn round_trips_through_the_list() {
        let list = vec![
            Change::new(A, B, "refs/heads/a").unwrap(),
            Change::new(Z, A, "refs/heads/b").unwrap(),
        ];
        let c = Changes::from_list(list.clone()).unwrap();
        assert_eq!(
            c.as_str(),
            format!("{A} {B} refs/heads/a\n{Z} {A} refs/heads/b\n")
        );
        assert_eq!(Changes::parse(c.as_str().as_bytes()).unwrap(), c);
        assert_eq!(Changes::from_list(vec![]).unwrap_err(), ChangesError::Empty);
    }

    #[test]
    fn sha256_ids_are_accepted_but_not_mixed() {
        let a = "a".repeat(64);
        let z = "0".repeat(64);
        Change::new(&a, &z, "refs/heads/x").unwrap();
        assert_eq!(
            Change::new(&a, B, "refs/heads/x").unwrap_err(),
            ChangesError::MixedHashes { line: 1 }
        );
    }

    #[test]
    fn refuses_what_git_never_writes() {
        assert_eq!(Changes::parse(b"").unwrap_err(), ChangesError::Empty);
        assert!(matches!(
            Changes::parse(format!("{A} {B}\n").as_bytes()),
            Err(ChangesError::Malformed { line: 1, .. })
        ));
        assert!(matches!(
            Changes::parse(format!("{A} {B} refs/heads/a\n{A} XYZ refs/heads/b\n").as_bytes()),
            Err(ChangesError::BadObjectId { line: 2, .. })
        ));
        let upper = A.replace('1', "A");
        assert!(matches!(
            Changes::parse(format!("{upper} {B} refs/heads/a\n").as_bytes()),
            Err(ChangesError::BadObjectId { line: 1, .. })
        ));
        assert!(matches!(
            Changes::parse(format!("{A} {B} refs/heads/a b\n").as_bytes()),
            Err(ChangesError::Malformed { line: 1, .. })
        ));
        assert_eq!(
            Changes::parse(&[0xff, b'\n']).unwrap_err(),
            ChangesError::NotUtf8
        );
    }
}
