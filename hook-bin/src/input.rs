//! Parsing what git writes on the hook's stdin, and deriving the vote key from it.

use sha2::{Digest, Sha256};

/// One `<old-oid> <new-oid> <refname>` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub old: String,
    pub new: String,
    pub refname: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    pub lines: Vec<Line>,
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn is_oid(s: &str) -> bool {
    (s.len() == 40 || s.len() == 64) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn is_zero(s: &str) -> bool {
    s.bytes().all(|b| b == b'0')
}

/// A value in a line: an object id, or a symref target (`ref:<name>`).
fn is_value(s: &str) -> bool {
    is_oid(s) || s.strip_prefix("ref:").is_some_and(|r| !r.is_empty())
}

pub fn parse(stdin: &[u8]) -> Result<Update, String> {
    let text =
        std::str::from_utf8(stdin).map_err(|_| "ref updates are not valid UTF-8".to_string())?;
    let mut lines = Vec::new();
    // git ends every line with LF; a CR is part of the line (and so refused below),
    // never a line ending, or the same bytes could parse two ways.
    let body = text.strip_suffix('\n').unwrap_or(text);
    let raw_lines = body.split('\n').filter(|_| !body.is_empty());
    for (i, raw) in raw_lines.enumerate() {
        let n = i + 1;
        let mut parts = raw.splitn(3, ' ');
        let (Some(old), Some(new), Some(refname)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(format!(
                "malformed ref update on line {n}: expected '<old> <new> <ref>'"
            ));
        };
        if !is_value(old) || !is_value(new) {
            return Err(format!("malformed ref update on line {n}: bad object id"));
        }
        // git never writes a ref name with a space or a control character
        // (check-ref-format); such a line is not from git.
        if refname.is_empty() || refname.chars().any(|c| c == ' ' || c.is_ascii_control()) {
            return Err(format!("malformed ref update on line {n}: bad ref name"));
        }
        lines.push(Line {
            old: old.into(),
            new: new.into(),
            refname: refname.into(),
        });
    }
    if lines.is_empty() {
        return Err("no ref updates on stdin".into());
    }
    Ok(Update { lines })
}

impl Update {
    /// Every line is `0…0 0…0 <ref>`: git's packed-refs side of a deletion.
    pub fn is_packed_refs_side(&self) -> bool {
        self.lines
            .iter()
            .all(|l| is_oid(&l.old) && is_zero(&l.old) && is_oid(&l.new) && is_zero(&l.new))
    }

    /// Hex digest of the sorted set of ref names, leaving out HEAD and symref lines
    /// (those stay in the hash). Votes are matched by this, not by arrival order.
    pub fn key_base(&self) -> String {
        let mut names: Vec<&str> = self
            .lines
            .iter()
            .filter(|l| {
                l.refname != "HEAD" && !l.old.starts_with("ref:") && !l.new.starts_with("ref:")
            })
            .map(|l| l.refname.as_str())
            .collect();
        names.sort_unstable();
        names.dedup();
        hex::encode(&sha256(names.join("\n").as_bytes())[..16])
    }
}

/// Reads `name = true|false` from the hook's config file (`#` comments allowed).
pub fn conf_flag(text: &str, name: &str) -> Result<bool, String> {
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        if let Some((k, v)) = line.split_once('=')
            && k.trim() == name
        {
            return match v.trim() {
                "true" => Ok(true),
                "false" => Ok(false),
                other => Err(format!(
                    "hook config: {name} must be true or false, not {other}"
                )),
            };
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "1111111111111111111111111111111111111111";
    const B: &str = "2222222222222222222222222222222222222222";
    const Z: &str = "0000000000000000000000000000000000000000";

    /// Found by the `hook_stdin` fuzz target: a CR before the LF used to be dropped as
    /// a line ending, so two different inputs gave one ref name (and one vote key).
    #[test]
    fn control_characters_in_ref_names_are_refused() {
        for bad in [
            "refs/heads/a\r",
            "refs/heads/a\x1fb",
            "refs/heads/\x7f",
            "refs/heads/a\tb",
        ] {
            let line = format!("{A} {B} {bad}\n");
            let err = parse(line.as_bytes()).unwrap_err();
            assert!(err.contains("bad ref name"), "{bad:?}: {err}");
        }
        assert!(parse(format!("{A} {B} refs/heads/a\r\n").as_bytes()).is_err());
        assert_eq!(parse(b"").unwrap_err(), "no ref updates on stdin");
        let two = parse(format!("{A} {B} refs/heads/a\n{A} {B} refs/heads/b").as_bytes());
        assert_eq!(two.unwrap().lines.len(), 2, "the last LF is optional");
    }

    #[test]
    fn parses_lines() {
        let u = parse(format!("{A} {B} refs/heads/main\n").as_bytes()).unwrap();
        assert_eq!(u.lines[0].refname, "refs/heads/main");
    }

    #[test]
    fn refuses_malformed_input() {
        assert!(parse(b"").is_err());
        assert!(parse(b"garbage\n").is_err());
        assert!(parse(format!("{A} xyz refs/heads/a\n").as_bytes()).is_err());
        assert!(parse(format!("{A} {B} \n").as_bytes()).is_err());
        assert!(parse(&[0xff, 0xfe]).is_err());
    }

    #[test]
    fn key_ignores_order_head_and_symrefs_but_not_names() {
        let one =
            parse(format!("{A} {B} refs/heads/a\n{A} {B} refs/heads/b\n").as_bytes()).unwrap();
        let other = parse(
            format!("{A} {B} refs/heads/b\n{Z} ref:refs/heads/b HEAD\n{A} {B} refs/heads/a\n")
                .as_bytes(),
        )
        .unwrap();
        assert_eq!(one.key_base(), other.key_base());
        let third = parse(format!("{A} {B} refs/heads/c\n").as_bytes()).unwrap();
        assert_ne!(one.key_base(), third.key_base());
        // Old ids are not in the key but are in the hash.
        let drifted =
            parse(format!("{B} {B} refs/heads/a\n{A} {B} refs/heads/b\n").as_bytes()).unwrap();
        assert_eq!(drifted.key_base(), one.key_base());
    }

    #[test]
    fn packed_refs_side_is_recognised() {
        assert!(
            parse(format!("{Z} {Z} refs/heads/a\n").as_bytes())
                .unwrap()
                .is_packed_refs_side()
        );
        assert!(
            !parse(format!("{A} {Z} refs/heads/a\n").as_bytes())
                .unwrap()
                .is_packed_refs_side()
        );
    }

    #[test]
    fn conf_flags() {
        assert!(conf_flag("# x\nrequire_transaction = true\n", "require_transaction").unwrap());
        assert!(!conf_flag("", "require_transaction").unwrap());
        assert!(conf_flag("require_transaction = yes", "require_transaction").is_err());
    }
}
