//! GetTreeEntries' pages, as Gitaly cuts them: a token is base64 of the JSON
//! `{"file_name": <last path>, "tree_oid": <listed tree>}` (written as Go's encoder
//! writes it), and a token that is not one is taken as an older client's object id.
//! Pure functions, unit tested.

use base64::Engine;
use refvote_proto::gitaly::TreeEntry;

/// A decoded page token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Token {
    /// Start after the entry with this path; list the tree `tree_oid` if set.
    Path { path: String, tree_oid: String },
    /// Start after the entry with this object id (clients before file-name tokens).
    Oid(String),
}

pub fn decode(token: &str) -> Token {
    #[derive(serde::Deserialize)]
    struct Raw {
        #[serde(default)]
        file_name: String,
        #[serde(default)]
        tree_oid: String,
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(token)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<Raw>(&bytes).ok());
    match raw {
        Some(r) => Token::Path {
            path: r.file_name,
            tree_oid: r.tree_oid,
        },
        None => Token::Oid(token.to_owned()),
    }
}

/// The token naming `last` as the end of a page of tree `tree_oid`.
pub fn encode(last: &TreeEntry, tree_oid: &str) -> String {
    let json = format!(
        "{{\"file_name\":{},\"tree_oid\":{}}}",
        go_json_string(&String::from_utf8_lossy(&last.path)),
        go_json_string(tree_oid)
    );
    base64::engine::general_purpose::STANDARD.encode(json)
}

/// A page of `entries` after `token` (if any), of at most `limit` entries (negative:
/// all), and the token of the next page (empty when this is the last). A token that
/// names no entry is Gitaly's INTERNAL "could not find starting OID".
pub fn cut(
    entries: Vec<TreeEntry>,
    token: Option<&Token>,
    limit: i32,
    tree_oid: &str,
) -> Result<(Vec<TreeEntry>, String), String> {
    let start = match token {
        None => 0,
        Some(Token::Path { path, .. }) if path.is_empty() => 0,
        Some(t) => {
            let (key, found) = match t {
                Token::Path { path, .. } => (
                    path.clone(),
                    entries.iter().position(|e| e.path == path.as_bytes()),
                ),
                Token::Oid(oid) => (oid.clone(), entries.iter().position(|e| &e.oid == oid)),
            };
            match found {
                Some(i) => i + 1,
                None => return Err(format!("could not find starting OID: {key}")),
            }
        }
    };
    if limit == 0 {
        return Ok((Vec::new(), String::new()));
    }
    let mut rest: Vec<TreeEntry> = entries.into_iter().skip(start).collect();
    if limit < 0 || limit as usize >= rest.len() {
        return Ok((rest, String::new()));
    }
    rest.truncate(limit as usize);
    let next = encode(rest.last().expect("limit > 0"), tree_oid);
    Ok((rest, next))
}

/// A JSON string as Go's `encoding/json` writes it: `<`, `>`, `&`, U+2028 and
/// U+2029 escaped, control characters as `\n`, `\r`, `\t` or `\u00XX`.
fn go_json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '<' | '>' | '&' | '\u{2028}' | '\u{2029}' => {
                out.push_str(&format!("\\u{:04x}", c as u32));
            }
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, oid: &str) -> TreeEntry {
        TreeEntry {
            path: path.as_bytes().to_vec(),
            oid: oid.to_owned(),
            ..Default::default()
        }
    }

    #[test]
    fn tokens_round_trip_and_read_like_gos() {
        let t = encode(&entry("a<b>&\"c\"", "x"), "tree1");
        let json = String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(&t)
                .unwrap(),
        )
        .unwrap();
        assert_eq!(
            json,
            r#"{"file_name":"a\u003cb\u003e\u0026\"c\"","tree_oid":"tree1"}"#
        );
        assert_eq!(
            decode(&t),
            Token::Path {
                path: "a<b>&\"c\"".into(),
                tree_oid: "tree1".into()
            }
        );
        assert_eq!(decode("not base64!"), Token::Oid("not base64!".into()));
    }

    #[test]
    fn pages_cut_at_the_limit_and_resume_after_the_token() {
        let all: Vec<TreeEntry> = (0..5)
            .map(|i| entry(&format!("f{i}"), &format!("o{i}")))
            .collect();
        let (page, next) = cut(all.clone(), None, 2, "T").unwrap();
        assert_eq!(page.len(), 2);
        let token = decode(&next);
        let (page, next) = cut(all.clone(), Some(&token), 2, "T").unwrap();
        assert_eq!(page[0].path, b"f2");
        let (page, next) = cut(all.clone(), Some(&decode(&next)), 2, "T").unwrap();
        assert_eq!(page.len(), 1);
        assert!(next.is_empty());
        // An object id token, the limit edges, and a token naming nothing.
        let (page, _) = cut(all.clone(), Some(&Token::Oid("o3".into())), -1, "T").unwrap();
        assert_eq!(page.len(), 1);
        assert!(cut(all.clone(), None, 0, "T").unwrap().0.is_empty());
        let (page, next) = cut(all.clone(), None, 5, "T").unwrap();
        assert_eq!((page.len(), next.as_str()), (5, ""));
        assert_eq!(
            cut(all, Some(&Token::Oid("zz".into())), 1, "T").unwrap_err(),
            "could not find starting OID: zz"
        );
    }
}
