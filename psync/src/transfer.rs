//! The two byte pipelines: bundle → seal → upload, and download → open → bundle
//! file. Both stream in fixed pieces with backpressure (a slow bucket slows git's
//! pack, not memory), and count bytes for the progress display.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::crypto::{Cipher, MasterKey, Opener, Sealer};
use crate::error::SyncError;
use crate::fault;
use crate::git::Running;
use crate::store::{Bucket, StoreError};

/// Bytes read from git per step.
const READ: usize = 256 * 1024;
/// Sealed bytes handed to the upload per step.
const HAND_OFF: usize = 1024 * 1024;
/// Tries of a download that breaks off midway (each starts over).
const DOWNLOAD_TRIES: usize = 3;

/// A shared byte counter the progress display reads.
pub type Counter = Arc<AtomicU64>;

/// Sizes of an uploaded bundle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizes {
    pub plain: u64,
    pub sealed: u64,
}

/// Uploads `header` followed by `pack`'s output, sealed for `key`, to `key`. Nothing
/// is visible at `key` unless the whole stream went up and git succeeded.
pub async fn upload_bundle(
    bucket: &Bucket,
    key: &str,
    master: &MasterKey,
    cipher: Cipher,
    header: Vec<u8>,
    mut pack: Running,
    counter: &Counter,
) -> Result<Sizes, SyncError> {
    let mut upload = bucket.upload(key);
    let mut sealer = Sealer::new(master, cipher, key.as_bytes());
    let mut out = Vec::with_capacity(HAND_OFF + READ + 64 * 1024);
    let mut plain = header.len() as u64;
    let result: Result<(), SyncError> = async {
        sealer.push(&header, &mut out)?;
        let mut buf = vec![0u8; READ];
        loop {
            let n =
                pack.stdout
                    .read(&mut buf)
                    .await
                    .map_err(|source| crate::git::GitError::Io {
                        command: "pack-objects".into(),
                        source,
                    })?;
            if n == 0 {
                break;
            }
            plain += n as u64;
            counter.fetch_add(n as u64, Ordering::Relaxed);
            sealer.push(&buf[..n], &mut out)?;
            if out.len() >= HAND_OFF {
                let full =
                    std::mem::replace(&mut out, Vec::with_capacity(HAND_OFF + READ + 64 * 1024));
                upload.write(Bytes::from(full)).await?;
                fault::point(fault::MID_UPLOAD);
            }
        }
        Ok(())
    }
    .await;
    if let Err(e) = result {
        upload.abort().await;
        return Err(e);
    }
    // git must have succeeded before the object may be completed.
    if let Err(e) = pack.wait().await {
        upload.abort().await;
        return Err(e.into());
    }
    sealer.finish(&mut out)?;
    upload.write(Bytes::from(out)).await?;
    let sealed = upload.finish().await?;
    Ok(Sizes { plain, sealed })
}

/// Downloads the sealed object at `key` (expected `size` bytes), opens it with
/// `master` and writes the plaintext to `dest`. Plaintext reaches `dest` only chunk
/// by chunk as each authenticates; on any failure `dest` is removed, so a bundle file
/// that exists is a whole, authentic one.
pub async fn download_bundle(
    bucket: &Bucket,
    key: &str,
    size: u64,
    master: &MasterKey,
    dest: &Path,
    counter: &Counter,
) -> Result<u64, SyncError> {
    let mut tries = 0;
    loop {
        tries += 1;
        match download_once(bucket, key, size, master, dest, counter).await {
            Ok(n) => return Ok(n),
            Err(e) => {
                let _ = std::fs::remove_file(dest);
                let retry = matches!(&e, SyncError::Store(s) if s.is_unavailable());
                if !retry || tries >= DOWNLOAD_TRIES {
                    return Err(e);
                }
                tracing::warn!(%key, "download broke off ({e}); starting it over");
            }
        }
    }
}

async fn download_once(
    bucket: &Bucket,
    key: &str,
    size: u64,
    master: &MasterKey,
    dest: &Path,
    counter: &Counter,
) -> Result<u64, SyncError> {
    let (actual, mut stream) = bucket.get_stream(key).await?;
    if actual != size {
        return Err(SyncError::Store(StoreError::Unavailable {
            store: bucket.describe().to_owned(),
            op: "get",
            key: key.to_owned(),
            cause: format!("the object is {actual} bytes, its manifest says {size}"),
        }));
    }
    let file = tokio::fs::File::create(dest)
        .await
        .map_err(|e| SyncError::io(dest, e))?;
    let mut file = tokio::io::BufWriter::with_capacity(1024 * 1024, file);
    let mut opener = Opener::new(master, key.as_bytes());
    let mut out = Vec::with_capacity(HAND_OFF);
    let mut plain = 0u64;
    while let Some(piece) = stream.next().await {
        let piece = piece?;
        counter.fetch_add(piece.len() as u64, Ordering::Relaxed);
        opener.feed(&piece, &mut out)?;
        if out.len() >= HAND_OFF {
            plain += out.len() as u64;
            file.write_all(&out)
                .await
                .map_err(|e| SyncError::io(dest, e))?;
            out.clear();
        }
    }
    opener.finish(&mut out)?;
    plain += out.len() as u64;
    file.write_all(&out)
        .await
        .map_err(|e| SyncError::io(dest, e))?;
    file.flush().await.map_err(|e| SyncError::io(dest, e))?;
    Ok(plain)
}
