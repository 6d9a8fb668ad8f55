//! RepositoryService.GetSnapshot: a tar of the repository's files as Gitaly's
//! `CreateSnapshot` picks them: HEAD, packed-refs, the config reduced to
//! `core.repositoryformatversion` and `[extensions]`, refs/, reftable/, branches/,
//! loose objects and packfiles (`.pack`, `.idx`), shallow, and the objects of any
//! alternate. Files vanishing while it runs are skipped (a snapshot can race a push;
//! GitLab takes it for what it is). File modes are widened as Gitaly does (rw for
//! all, x for all when the owner has x).
//!
//! The tar is written on a blocking thread into 32 KiB messages through a bounded
//! channel: a slow client holds the writer, nothing collects the archive.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};

use refvote_proto::gitaly::{GetSnapshotRequest, GetSnapshotResponse};
use regex::Regex;
use tokio::sync::mpsc;
use tonic::codegen::BoxStream;
use tonic::{Response, Status};

use crate::state::NodeState;

const CHUNK: usize = 32 * 1024;

static OBJECT_FILE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(/[[:xdigit:]]{2}/[[:xdigit:]]{38}|/pack/pack-[[:xdigit:]]{40}\.(pack|idx)|/[[:xdigit:]]{2}/[[:xdigit:]]{62}|/pack/pack-[[:xdigit:]]{64}\.(pack|idx))$",
    )
    .expect("a valid pattern")
});

pub(crate) async fn get_snapshot(
    node: &Arc<NodeState>,
    req: GetSnapshotRequest,
) -> Result<Response<BoxStream<GetSnapshotResponse>>, Status> {
    let repo = node.storages.existing(req.repository.as_ref())?;
    let (tx, rx) = mpsc::channel::<Result<GetSnapshotResponse, Status>>(4);
    tokio::task::spawn_blocking(move || {
        let out = ChannelWriter {
            tx: tx.clone(),
            buf: Vec::with_capacity(CHUNK),
        };
        if let Err(e) = write_snapshot(&repo.path, &repo.root, out) {
            // A client that went away is not an error worth reporting to it.
            let _ = tx.blocking_send(Err(Status::internal(format!(
                "building snapshot failed: {e}"
            ))));
        }
    });
    Ok(Response::new(Box::pin(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    )))
}

/// Sends what the tar writer writes, [`CHUNK`] bytes per message.
struct ChannelWriter {
    tx: mpsc::Sender<Result<GetSnapshotResponse, Status>>,
    buf: Vec<u8>,
}

impl ChannelWriter {
    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let data = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.tx
            .blocking_send(Ok(GetSnapshotResponse { data }))
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the client went away")
            })
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

fn write_snapshot(repo: &Path, storage_root: &Path, out: ChannelWriter) -> std::io::Result<()> {
    let mut tar = tar::Builder::new(out);
    tar.mode(tar::HeaderMode::Complete);
    for f in ["HEAD", "packed-refs"] {
        add_file(&mut tar, &repo.join(f), f)?;
    }
    if let Ok(config) = std::fs::read(repo.join("config")) {
        let filtered = filter_config(&config);
        if !filtered.is_empty() {
            let meta = std::fs::metadata(repo.join("config"))?;
            let mut header = header_for(&meta);
            header.set_size(filtered.len() as u64);
            tar.append_data(&mut header, "config", filtered.as_slice())?;
        }
    }
    for d in ["refs", "reftable", "branches"] {
        add_dir(&mut tar, repo, &repo.join(d), "", None)?;
    }
    add_dir(
        &mut tar,
        repo,
        &repo.join("objects"),
        "",
        Some(&OBJECT_FILE),
    )?;
    add_file(&mut tar, &repo.join("shallow"), "shallow")?;
    for alternate in alternates(repo, storage_root) {
        add_dir(
            &mut tar,
            &alternate,
            &alternate,
            "objects",
            Some(&OBJECT_FILE),
        )?;
    }
    let mut out = tar.into_inner()?;
    out.flush()
}

/// Object directories listed in `objects/info/alternates` that exist inside the
/// storage (relative entries are relative to the objects directory).
fn alternates(repo: &Path, storage_root: &Path) -> Vec<PathBuf> {
    let objects = repo.join("objects");
    let Ok(text) = std::fs::read_to_string(objects.join("info/alternates")) else {
        return Vec::new();
    };
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| objects.join(l))
        .filter_map(|p| p.canonicalize().ok())
        .filter(|p| p.starts_with(storage_root) && p.is_dir())
        .collect()
}

fn header_for(meta: &std::fs::Metadata) -> tar::Header {
    use std::os::unix::fs::MetadataExt;
    let mut header = tar::Header::new_gnu();
    header.set_metadata_in_mode(meta, tar::HeaderMode::Complete);
    let mut mode = meta.mode() & 0o7777 | 0o666;
    if mode & 0o100 != 0 {
        mode |= 0o111;
    }
    if meta.is_dir() {
        mode |= 0o777;
    }
    header.set_mode(mode);
    header
}

/// Adds `path` as `name` if it is a regular file that still exists.
fn add_file<W: Write>(tar: &mut tar::Builder<W>, path: &Path, name: &str) -> std::io::Result<()> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.is_file() {
        return Ok(());
    }
    let Ok(mut file) = std::fs::File::open(path) else {
        return Ok(());
    };
    let mut header = header_for(&meta);
    tar.append_data(&mut header, name, &mut file)
}

/// Adds `dir` and what is below it, named relative to `base` under `prefix`; with
/// `only`, files whose path does not match it are left out.
fn add_dir<W: Write>(
    tar: &mut tar::Builder<W>,
    base: &Path,
    dir: &Path,
    prefix: &str,
    only: Option<&Regex>,
) -> std::io::Result<()> {
    let Ok(meta) = std::fs::symlink_metadata(dir) else {
        return Ok(());
    };
    if !meta.is_dir() {
        return Ok(());
    }
    let rel = dir.strip_prefix(base).unwrap_or(dir);
    let name = Path::new(prefix).join(rel);
    if only.is_none() && !name.as_os_str().is_empty() {
        let mut header = header_for(&meta);
        header.set_size(0);
        tar.append_data(
            &mut header,
            format!("{}/", name.display()),
            std::io::empty(),
        )?;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    let mut entries: Vec<_> = entries.filter_map(Result::ok).collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_dir() {
            add_dir(tar, base, &path, prefix, only)?;
        } else if ft.is_file() {
            let rel = path.strip_prefix(base).unwrap_or(&path);
            let name = Path::new(prefix).join(rel);
            let text = format!("/{}", name.display());
            if only.is_some_and(|r| !r.is_match(&text)) {
                continue;
            }
            add_file(tar, &path, &name.display().to_string())?;
        }
    }
    Ok(())
}

/// Only `core.repositoryformatversion` and the `[extensions]` section (the object
/// format) of the config.
fn filter_config(data: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(data);
    let mut section = String::new();
    let mut kept = Vec::new();
    for line in text.split('\n') {
        let trimmed = line.trim();
        if let Some(rest) = trimmed.strip_prefix('[')
            && let Some(end) = rest.find(']')
        {
            section = rest[..end]
                .split(' ')
                .next()
                .unwrap_or("")
                .to_ascii_lowercase();
        }
        match section.as_str() {
            "core"
                if trimmed.starts_with('[')
                    || trimmed
                        .to_ascii_lowercase()
                        .contains("repositoryformatversion") =>
            {
                kept.push(line)
            }
            "extensions" => kept.push(line),
            _ => {}
        }
    }
    if kept.is_empty() {
        return Vec::new();
    }
    let mut out = kept.join("\n").into_bytes();
    out.push(b'\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_keeps_only_the_format() {
        let cfg = b"[core]\n\trepositoryformatversion = 1\n\tbare = true\n\thooksPath = /x\n[extensions]\n\tobjectformat = sha256\n[remote \"o\"]\n\turl = x\n";
        assert_eq!(
            String::from_utf8(filter_config(cfg)).unwrap(),
            "[core]\n\trepositoryformatversion = 1\n[extensions]\n\tobjectformat = sha256\n"
        );
    }

    #[test]
    fn only_object_files_are_taken_from_objects() {
        assert!(OBJECT_FILE.is_match(&format!("/objects/ab/{}", "c".repeat(38))));
        assert!(OBJECT_FILE.is_match(&format!("/objects/pack/pack-{}.idx", "a".repeat(40))));
        assert!(!OBJECT_FILE.is_match("/objects/info/packs"));
        assert!(!OBJECT_FILE.is_match(&format!("/objects/pack/pack-{}.rev", "a".repeat(40))));
    }
}
