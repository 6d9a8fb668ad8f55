//! CommitService.CommitLanguages: the languages of a commit's tree by bytes, as
//! Gitaly's linguist counts them: every blob of the tree (`git ls-tree -r --long`)
//! that is neither documentation nor vendored (linguist's path rules, overridden by
//! the `linguist-documentation`/`linguist-vendored` attributes), not generated
//! (`linguist-generated`, else linguist's rules on its first 16 KiB), of a programming
//! or markup language (`linguist-language` names one; `linguist-detectable` forces
//! counting in or out), counted with its whole size.
//!
//! Gitaly marks this RPC a mutator because it writes a language cache into the
//! repository; refvote keeps the annotation, so it arrives inside a transaction. It
//! writes nothing here (no cache, no ref): it joins the transaction, computes, and
//! reports itself done with the RPC's outcome, so finalize promotes exactly the
//! replicas that answered.

use std::collections::HashMap;
use std::sync::Arc;

use refvote_proto::gitaly::{
    CommitLanguagesRequest, CommitLanguagesResponse, commit_languages_response,
};
use sha2::Digest;
use tonic::{Request, Response, Status};

use crate::attributes::{self, CheckAttr};
use crate::catfile::CatFile;
use crate::error::NodeError;
use crate::linguist::{self, Kind};
use crate::refs::names;
use crate::state::NodeState;
use crate::storage::RepoPath;
use crate::tx::WriteContext;

/// Bytes of a file's start that decide whether it is generated.
const SNIFF: usize = 16 * 1024;

const ATTRIBUTES: [&str; 5] = [
    "linguist-documentation",
    "linguist-detectable",
    "linguist-generated",
    "linguist-vendored",
    "linguist-language",
];

pub(crate) async fn commit_languages(
    node: &Arc<NodeState>,
    request: Request<CommitLanguagesRequest>,
) -> Result<Response<CommitLanguagesResponse>, Status> {
    let repo = node
        .storages
        .existing(request.get_ref().repository.as_ref())?;
    let revision = request.get_ref().revision.clone();
    let revision = if revision.is_empty() {
        default_branch(&repo)?
    } else {
        names::revision("revision", &revision).map(str::to_owned)?
    };
    let ctx = WriteContext::from_metadata(&node.tx, request.metadata()).await?;
    let result = languages(node, &repo, &revision).await;
    let detail = match &result {
        Ok(_) => String::new(),
        Err(e) => e.message().to_owned(),
    };
    ctx.finish(result.is_ok(), &detail).await;
    Ok(Response::new(result?))
}

/// The branch HEAD names (Gitaly's default branch), also when it has no commit yet.
fn default_branch(repo: &RepoPath) -> Result<String, NodeError> {
    let head = std::fs::read_to_string(repo.path.join("HEAD"))
        .map_err(|e| NodeError::io(format!("reading {}/HEAD", repo.path.display()), e))?;
    Ok(head
        .trim()
        .strip_prefix("ref: ")
        .unwrap_or(head.trim())
        .to_owned())
}

async fn languages(
    node: &NodeState,
    repo: &RepoPath,
    revision: &str,
) -> Result<CommitLanguagesResponse, Status> {
    let mut cat = CatFile::start(&node.git, repo)?;
    let commit = match cat.commit(revision).await? {
        Some(c) => c.id,
        None => {
            return Err(Status::internal(format!(
                "looking up revision: {revision:?} names no commit"
            )));
        }
    };
    let names: Vec<String> = ATTRIBUTES.iter().map(|s| (*s).to_owned()).collect();
    let mut attrs = CheckAttr::start(&node.git, repo, &commit, &names)?;
    let mut tree = node
        .git
        .command(["ls-tree", "-r", "-z", "--long", "--end-of-options"])
        .arg(&commit)
        .repo(repo)
        .spawn()
        .map_err(NodeError::from)?;
    let mut totals: HashMap<&'static str, u64> = HashMap::new();
    let mut buf = Vec::new();
    loop {
        let chunk = tree.chunk().await;
        let ended = chunk.is_none();
        if let Some(c) = chunk {
            buf.extend(c.map_err(NodeError::from)?);
        }
        while let Some(i) = buf.iter().position(|b| *b == 0) {
            let entry: Vec<u8> = buf.drain(..=i).collect();
            let Some((kind, oid, size, path)) = parse_long_entry(&entry[..entry.len() - 1]) else {
                continue;
            };
            if kind != "blob" {
                continue;
            }
            if let Some(lang) = count_file(&mut cat, &mut attrs, &oid, &path).await? {
                *totals.entry(lang).or_default() += size;
            }
        }
        if ended {
            break;
        }
    }
    tree.wait()
        .await
        .and_then(|e| e.check())
        .map_err(NodeError::from)?;
    Ok(response(totals))
}

/// `<mode> <type> <oid> <size>\t<path>` of `ls-tree --long`.
fn parse_long_entry(entry: &[u8]) -> Option<(String, String, u64, String)> {
    let tab = entry.iter().position(|b| *b == b'\t')?;
    let head = std::str::from_utf8(&entry[..tab]).ok()?;
    let mut parts = head.split_whitespace();
    let (_mode, kind, oid, size) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let size = size.parse().unwrap_or(0);
    let path = String::from_utf8_lossy(&entry[tab + 1..]).into_owned();
    Some((kind.to_owned(), oid.to_owned(), size, path))
}

/// The language `path` counts for, if any (see the module comment).
async fn count_file(
    cat: &mut CatFile,
    attrs: &mut CheckAttr,
    oid: &str,
    path: &str,
) -> Result<Option<&'static str>, Status> {
    let a = attrs.check(path.as_bytes()).await?;
    let flag = |name: &str| match attributes::state(&a, name) {
        Some("set") => Some(true),
        Some("unset") => Some(false),
        _ => None,
    };
    let documentation =
        flag("linguist-documentation").unwrap_or_else(|| linguist::is_documentation(path));
    let vendored = flag("linguist-vendored").unwrap_or_else(|| linguist::is_vendored(path));
    if documentation || vendored {
        return Ok(None);
    }
    let Some(_) = cat.header(oid).await? else {
        return Ok(None);
    };
    let content = crate::analysis::read_prefix(cat, SNIFF).await?;
    let generated =
        flag("linguist-generated").unwrap_or_else(|| linguist::is_generated(path, &content));
    if generated {
        return Ok(None);
    }
    let lang = match attributes::state(&a, "linguist-language") {
        Some(name) => linguist::by_name(name),
        None => linguist::language(path, &content),
    };
    let Some(lang) = lang else {
        return Ok(None);
    };
    let counted = match flag("linguist-detectable") {
        Some(forced) => forced,
        None => matches!(lang.kind, Kind::Programming | Kind::Markup),
    };
    Ok(counted.then_some(lang.name))
}

/// Shares of the total, largest first (ties by name).
fn response(totals: HashMap<&'static str, u64>) -> CommitLanguagesResponse {
    let total: u64 = totals.values().sum();
    if total == 0 {
        return CommitLanguagesResponse::default();
    }
    let mut languages: Vec<commit_languages_response::Language> = totals
        .into_iter()
        .map(|(name, bytes)| {
            let lang = linguist::by_name(name).expect("counted languages are known");
            commit_languages_response::Language {
                name: name.to_owned(),
                share: (100 * bytes) as f32 / total as f32,
                color: color(lang.name, lang.color),
                bytes,
                language_id: lang.id,
            }
        })
        .collect();
    languages.sort_by(|a, b| {
        b.share
            .total_cmp(&a.share)
            .then_with(|| a.name.cmp(&b.name))
    });
    CommitLanguagesResponse { languages }
}

/// linguist's colour, or (for a language without one) Gitaly's: the first three bytes
/// of the name's SHA-256.
fn color(name: &str, color: &str) -> String {
    if !color.is_empty() && color != "#cccccc" {
        return color.to_owned();
    }
    let digest = sha2::Sha256::digest(name.as_bytes());
    format!("#{}", hex::encode(&digest[..3]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_are_sorted_and_add_up() {
        let r = response(HashMap::from([("Ruby", 300), ("Go", 100)]));
        assert_eq!(r.languages[0].name, "Ruby");
        assert_eq!(r.languages[0].share, 75.0);
        assert_eq!(r.languages[0].color, "#701516");
        assert_eq!(r.languages[0].language_id, 326);
        assert_eq!(r.languages[1].bytes, 100);
        assert!(response(HashMap::new()).languages.is_empty());
        assert_eq!(color("X", "").len(), 7);
    }

    #[test]
    fn long_tree_entries_parse() {
        let e = b"100644 blob 1111111111111111111111111111111111111111     123\tdir/a b.rb";
        let (kind, _, size, path) = parse_long_entry(e).unwrap();
        assert_eq!(
            (kind.as_str(), size, path.as_str()),
            ("blob", 123, "dir/a b.rb")
        );
    }
}
