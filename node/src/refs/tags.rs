//! Tags as Gitaly presents them: FindTag (one tag by name, looked up through the read
//! engine), FindAllTags (sorted, paged by full ref name), GetTagMessages and
//! GetTagSignatures (tags named by id or revision walks).
//!
//! An annotated tag's message is trimmed of trailing newlines and cut to 10 KiB in
//! FindTag and FindAllTags but sent whole by GetTagMessages; its target commit is the
//! commit it leads to through any chain of tags.

use refvote_proto::gitaly::get_tag_signatures_response::TagSignature;
use refvote_proto::gitaly::{
    FindAllTagsRequest, FindAllTagsResponse, FindTagError, FindTagRequest, FindTagResponse,
    GetTagMessagesRequest, GetTagMessagesResponse, GetTagSignaturesRequest,
    GetTagSignaturesResponse, ReferenceNotFoundError, SortDirection, Tag, find_all_tags_request,
    find_tag_error,
};
use tonic::codegen::BoxStream;
use tonic::{Code, Status};

use crate::detail::status_with_detail;
use crate::engine::{Kind, MAX_OBJECT, Object, Reader};
use crate::error::NodeError;
use crate::object::{self, extract_tag_signature, parse_tag, trim_tag_message};
use crate::records::Records;
use crate::respond::{Batches, send_bytes, stream_from};
use crate::state::NodeState;

/// A tag from the object `oid` (what the ref points at) and its short `name`.
async fn tag_of(reader: &mut Reader, oid: &str, name: &[u8]) -> Result<Tag, NodeError> {
    let Some(obj) = reader.object(oid, MAX_OBJECT).await? else {
        return Err(NodeError::NotFound(format!("object not found: {oid}")));
    };
    match obj.info.kind {
        Kind::Tag => {
            let (mut tag, tagged) = parse_tag(&obj.info.oid, name, &obj.data);
            trim_tag_message(&mut tag);
            tag.target_commit = match tagged.kind.as_str() {
                "commit" => reader.commit(&tagged.oid).await?,
                // A tag of a tag: peeled to whatever it ends at, a commit or not.
                "tag" => match reader
                    .object(&format!("{}^{{}}", tagged.oid), MAX_OBJECT)
                    .await?
                {
                    Some(o) if o.info.kind == Kind::Commit => {
                        Some(object::parse_commit(&o.info.oid, &o.data).commit)
                    }
                    _ => None,
                },
                _ => None,
            };
            Ok(tag)
        }
        Kind::Commit => Ok(Tag {
            name: name.to_vec(),
            id: obj.info.oid.clone(),
            target_commit: Some(object::parse_commit(&obj.info.oid, &obj.data).commit),
            ..Default::default()
        }),
        _ => Ok(Tag {
            name: name.to_vec(),
            id: obj.info.oid,
            ..Default::default()
        }),
    }
}

fn tag_not_found(name: &[u8]) -> Status {
    status_with_detail(
        Code::NotFound,
        "tag does not exist",
        "gitaly.FindTagError",
        &FindTagError {
            error: Some(find_tag_error::Error::TagNotFound(ReferenceNotFoundError {
                reference_name: [b"refs/tags/".as_slice(), name].concat(),
            })),
        },
    )
}

pub async fn find_tag(node: &NodeState, req: FindTagRequest) -> Result<FindTagResponse, Status> {
    let repo = node.storages.existing(req.repository.as_ref())?;
    if req.tag_name.is_empty() {
        return Err(Status::invalid_argument("tag name is empty"));
    }
    let name = String::from_utf8_lossy(&req.tag_name).into_owned();
    let full = format!("refs/tags/{name}");
    let mut reader = node.reads.reader(&repo).await?;
    // `git tag -l <name>` takes the name as a pattern; a plain name is one ref.
    let target = if name.contains(['*', '?', '[', '\\']) {
        let (out, exit) = node
            .git
            .command(["tag", "-l", "--format=%(objectname)"])
            .arg(&name)
            .repo(&repo)
            .spawn()
            .map_err(NodeError::from)?
            .output(1 << 20)
            .await
            .map_err(NodeError::from)?;
        exit.check().map_err(NodeError::from)?;
        String::from_utf8_lossy(&out)
            .lines()
            .next()
            .map(str::to_owned)
    } else if crate::refs::names::valid_ref_name(&full) {
        reader.info(&full).await?.map(|i| i.oid)
    } else {
        None
    };
    let Some(oid) = target else {
        return Err(tag_not_found(&req.tag_name));
    };
    let tag = tag_of(&mut reader, &oid, &req.tag_name)
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
    Ok(FindTagResponse { tag: Some(tag) })
}

/// for-each-ref's `--sort` for FindAllTags.
fn tag_sort(sort: Option<&find_all_tags_request::SortBy>) -> Result<String, Status> {
    use find_all_tags_request::sort_by::Key;
    let Some(sort) = sort else {
        return Ok(String::new());
    };
    let dir = match SortDirection::try_from(sort.direction) {
        Ok(SortDirection::Ascending) => "",
        Ok(SortDirection::Descending) => "-",
        _ => {
            return Err(Status::invalid_argument(format!(
                "unsupported sorting direction: {}",
                sort.direction
            )));
        }
    };
    let key = match Key::try_from(sort.key) {
        Ok(Key::Refname) => "refname",
        Ok(Key::Creatordate) => "creatordate",
        Ok(Key::VersionRefname) => "version:refname",
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "unsupported sorting key: {}",
                sort.key
            )));
        }
    };
    Ok(format!("{dir}{key}"))
}

pub fn find_all_tags(
    node: &NodeState,
    req: FindAllTagsRequest,
) -> Result<BoxStream<FindAllTagsResponse>, Status> {
    let repo = node.storages.existing(req.repository.as_ref())?;
    let sort = tag_sort(req.sort_by.as_ref())?;
    let (token, limit) = match &req.pagination_params {
        None => (None, i64::from(i32::MAX)),
        Some(p) => (
            (!p.page_token.is_empty()).then(|| p.page_token.clone().into_bytes()),
            if p.limit >= 0 {
                i64::from(p.limit)
            } else {
                i64::from(i32::MAX)
            },
        ),
    };
    let mut cmd = node
        .git
        .command(["for-each-ref", "--format=%(objectname)%00%(refname)"])
        .repo(&repo);
    if !sort.is_empty() {
        cmd = cmd.arg(format!("--sort={sort}"));
    }
    let run = cmd.arg("refs/tags/").spawn().map_err(NodeError::from)?;
    let reads = node.reads.clone();
    Ok(stream_from(move |tx| async move {
        let mut records = Records::new(run, b'\n');
        let mut reader = reads.reader(&repo).await?;
        let mut found = token.is_none();
        let mut sent: i64 = 0;
        let mut out = Batches::new(tx, |tags| FindAllTagsResponse { tags });
        while let Some(line) = records.next().await? {
            if sent >= limit {
                break;
            }
            let Some(i) = line.iter().position(|b| *b == 0) else {
                continue;
            };
            let (oid, refname) = (String::from_utf8_lossy(&line[..i]), &line[i + 1..]);
            if !found {
                found = token.as_deref() == Some(refname);
                continue;
            }
            let name = refname.strip_prefix(b"refs/tags/").unwrap_or(refname);
            let tag = tag_of(&mut reader, &oid, name)
                .await
                .map_err(|e| Status::internal(format!("iterating over tags: {e}")))?;
            sent += 1;
            if out.push(tag).await.is_err() {
                return Ok(());
            }
        }
        if !found {
            return Err(Status::invalid_argument("could not find page token"));
        }
        let _ = out.finish().await;
        Ok(())
    }))
}

/// Each tag's id alone, then its whole message (signature included) in 128 KiB pieces.
pub fn get_tag_messages(
    node: &NodeState,
    req: GetTagMessagesRequest,
) -> Result<BoxStream<GetTagMessagesResponse>, Status> {
    let repo = node.storages.existing(req.repository.as_ref())?;
    let reads = node.reads.clone();
    Ok(stream_from(move |tx| async move {
        let mut reader = reads.reader(&repo).await?;
        for id in req.tag_ids {
            let obj = reader.object(&id, MAX_OBJECT).await?;
            let message = match obj {
                Some(Object { info, data }) if info.kind == Kind::Tag => {
                    parse_tag(&info.oid, b"", &data).0.message
                }
                Some(o) => {
                    return Err(Status::internal(format!(
                        "getting tag: expected tag, got {}",
                        o.info.kind.as_str()
                    )));
                }
                None => return Err(Status::internal("getting tag: object not found")),
            };
            let head = GetTagMessagesResponse {
                tag_id: id.clone(),
                message: Vec::new(),
            };
            if tx.send(Ok(head)).await.is_err() {
                return Ok(());
            }
            if !message.is_empty()
                && send_bytes(&tx, None, &message, |_, message| GetTagMessagesResponse {
                    message,
                    tag_id: String::new(),
                })
                .await
                .is_err()
            {
                return Ok(());
            }
        }
        Ok(())
    }))
}

/// The annotated tags the revisions reach (`rev-list --objects`, tags only), each
/// split into its signature and the signed text.
pub fn get_tag_signatures(
    node: &NodeState,
    req: GetTagSignaturesRequest,
) -> Result<BoxStream<GetTagSignaturesResponse>, Status> {
    let repo = node.storages.existing(req.repository.as_ref())?;
    if req.tag_revisions.is_empty() {
        return Err(Status::invalid_argument("missing revisions"));
    }
    for r in &req.tag_revisions {
        crate::refs::names::revision_or_pseudo(r.as_bytes())
            .map_err(|e| Status::invalid_argument(format!("invalid revision: {e}")))?;
    }
    let input = req.tag_revisions.join("\n").into_bytes();
    let run = node
        .git
        .command([
            "rev-list",
            "--stdin",
            "--in-commit-order",
            "--objects",
            "--object-names",
            "--filter=object:type=tag",
            "--filter-provided-objects",
        ])
        .repo(&repo)
        .stdin(Box::pin(tokio_stream::once(Ok(input))))
        .spawn()
        .map_err(NodeError::from)?;
    let reads = node.reads.clone();
    Ok(stream_from(move |tx| async move {
        let mut records = Records::new(run, b'\n');
        let mut reader = reads.reader(&repo).await?;
        let mut out = Batches::new(tx, |signatures| GetTagSignaturesResponse { signatures });
        while let Some(line) = records.next().await? {
            let text = String::from_utf8_lossy(&line);
            let oid = text.split(' ').next().unwrap_or_default().to_owned();
            let Some(obj) = reader.object(&oid, MAX_OBJECT).await? else {
                return Err(Status::internal(format!(
                    "cat-file iterator stop: object not found: {oid}"
                )));
            };
            let (signature, content) = match extract_tag_signature(&obj.data) {
                Some((s, c)) => (s.to_vec(), c.to_vec()),
                None => (Vec::new(), obj.data.clone()),
            };
            let item = TagSignature {
                tag_id: obj.info.oid,
                signature,
                content,
            };
            if out.push(item).await.is_err() {
                return Ok(());
            }
        }
        if let Some(exit) = records.exit().filter(|e| !e.success()) {
            return Err(Status::internal(format!(
                "cat-file iterator stop: rev-list pipeline command: exit status {}, stderr: {:?}",
                exit.code().unwrap_or(-1),
                exit.stderr
            )));
        }
        let _ = out.finish().await;
        Ok(())
    }))
}
