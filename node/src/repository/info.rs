//! RepositorySize, GetObjectDirectorySize and RepositoryInfo: what a repository
//! occupies on disk and how its objects and refs are stored, read from the files as
//! Gitaly reads them (`internal/git/stats`), off the async workers. Also the object
//! format from the repository's config.

use std::path::Path;
use std::time::{Duration, SystemTime};

use refvote_proto::gitaly::RepositoryInfoResponse;
use refvote_proto::gitaly::repository_info_response::references_info::ReferenceBackend;
use refvote_proto::gitaly::repository_info_response::{
    AlternatesInfo, BitmapInfo, CommitGraphInfo, MultiPackIndexInfo, ObjectsInfo, ReferencesInfo,
};

/// Loose objects older than this are stale (Gitaly's `StaleObjectsGracePeriod`).
const STALE_AFTER: Duration = Duration::from_secs(10 * 24 * 3600);
/// Gitaly records its last full repack in this file's mtime.
const FULL_REPACK_TIMESTAMP: &str = ".gitaly-full-repack-timestamp";

/// Total bytes of the files under `dir` (symlinks counted as themselves, not
/// followed), as Gitaly's `dirSizeInBytes` with its default filter counts them.
pub fn tree_size(dir: &Path) -> std::io::Result<u64> {
    let mut total = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let entries = match std::fs::read_dir(&d) {
            Ok(e) => e,
            // Gone meanwhile (a concurrent repack or ref deletion): it counts as empty.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let meta = match entry.metadata() {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                total += meta.len();
            }
        }
    }
    Ok(total)
}

/// RepositorySize's and GetObjectDirectorySize's answer: KiB under `dir`.
pub fn size_kib(dir: &Path) -> std::io::Result<i64> {
    Ok(i64::try_from(tree_size(dir)? / 1024).unwrap_or(i64::MAX))
}

/// The repository's object id length in hex: 64 with `extensions.objectFormat =
/// sha256` in its config, else 40.
pub fn hash_len(repo: &Path) -> usize {
    match config_value(repo, "extensions", "objectformat").as_deref() {
        Some(v) if v.eq_ignore_ascii_case("sha256") => 64,
        _ => 40,
    }
}

/// Whether the repository keeps its refs in reftables.
pub fn reftable(repo: &Path) -> bool {
    config_value(repo, "extensions", "refstorage")
        .is_some_and(|v| v.eq_ignore_ascii_case("reftable"))
        || repo.join("reftable").is_dir()
}

/// A value of the repository's own config file (`[section] key = value`, section and
/// key case-insensitive, the last one winning as in git).
fn config_value(repo: &Path, section: &str, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(repo.join("config")).ok()?;
    let mut current = String::new();
    let mut found = None;
    for line in text.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix('[') {
            let name = rest.split([']', ' ', '"']).next().unwrap_or_default();
            current = name.to_ascii_lowercase();
            continue;
        }
        if current != section {
            continue;
        }
        let (k, v) = line.split_once('=').unwrap_or((line, "true"));
        if k.trim().eq_ignore_ascii_case(key) {
            let v = v.split(['#', ';']).next().unwrap_or_default().trim();
            found = Some(v.trim_matches('"').to_owned());
        }
    }
    found
}

/// Loose objects: counted and sized, stale ones (older than the grace period) and
/// garbage (files in a shard that are not object names) apart.
#[derive(Default)]
struct Loose {
    count: u64,
    size: u64,
    stale_count: u64,
    stale_size: u64,
    garbage_count: u64,
}

fn loose(objects: &Path, cutoff: SystemTime) -> std::io::Result<Loose> {
    let mut l = Loose::default();
    for shard in 0..=0xffu32 {
        let Ok(entries) = std::fs::read_dir(objects.join(format!("{shard:02x}"))) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            let name = entry.file_name();
            let valid = name
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')));
            if !valid {
                l.garbage_count += 1;
                continue;
            }
            if meta.modified().is_ok_and(|m| m < cutoff) {
                l.stale_count += 1;
                l.stale_size += meta.len();
            }
            l.count += 1;
            l.size += meta.len();
        }
    }
    Ok(l)
}

#[derive(Default)]
struct Packs {
    count: u64,
    size: u64,
    reverse_index: u64,
    cruft_count: u64,
    cruft_size: u64,
    keep_count: u64,
    keep_size: u64,
    bitmap: Option<BitmapInfo>,
    midx: Option<MultiPackIndexInfo>,
    midx_bitmap: Option<BitmapInfo>,
}

fn packs(pack_dir: &Path) -> std::io::Result<Packs> {
    let mut p = Packs::default();
    let Ok(entries) = std::fs::read_dir(pack_dir) else {
        return Ok(p);
    };
    let names: Vec<String> = entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    let has = |stem: &str, ext: &str| names.iter().any(|n| n == &format!("{stem}.{ext}"));
    for name in &names {
        let path = pack_dir.join(name);
        if let Some(stem) = name
            .strip_suffix(".pack")
            .filter(|s| s.starts_with("pack-"))
        {
            let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            p.count += 1;
            p.size += size;
            if has(stem, "keep") {
                p.keep_count += 1;
                p.keep_size += size;
            } else if has(stem, "mtimes") {
                p.cruft_count += 1;
                p.cruft_size += size;
            }
        } else if name.starts_with("pack-") && name.ends_with(".rev") {
            p.reverse_index += 1;
        } else if name.starts_with("pack-") && name.ends_with(".bitmap") {
            p.bitmap = bitmap(&path);
        } else if name == "multi-pack-index" {
            p.midx = midx(&path);
        } else if name.starts_with("multi-pack-index-") && name.ends_with(".bitmap") {
            p.midx_bitmap = bitmap(&path);
        }
    }
    Ok(p)
}

/// A `.bitmap` header: `BITM`, version 1, flags (hash cache 0x4, lookup table 0x10).
fn bitmap(path: &Path) -> Option<BitmapInfo> {
    let head = read_head(path, 8)?;
    if &head[..4] != b"BITM" || u16::from_be_bytes([head[4], head[5]]) != 1 {
        return None;
    }
    let flags = u16::from_be_bytes([head[6], head[7]]);
    Some(BitmapInfo {
        has_hash_cache: flags & 0x4 != 0,
        has_lookup_table: flags & 0x10 != 0,
        version: 1,
    })
}

/// A multi-pack-index header and its chunk table.
fn midx(path: &Path) -> Option<MultiPackIndexInfo> {
    let head = read_head(path, 12)?;
    if &head[..4] != b"MIDX" || head[4] != 1 || head[7] != 0 {
        return None;
    }
    let chunks = head[6] as usize;
    let all = read_head(path, 12 + 12 * chunks)?;
    let mut info = MultiPackIndexInfo {
        packfile_count: u64::from(u32::from_be_bytes([head[8], head[9], head[10], head[11]])),
        version: 1,
        ..Default::default()
    };
    for c in all[12..].chunks(12) {
        match &c[..4] {
            b"LOFF" => info.has_large_offsets = true,
            b"RIDX" => info.has_reverse_index = true,
            b"BTMP" => info.has_bitmapped_packs = true,
            _ => {}
        }
    }
    Some(info)
}

/// The commit-graph (a chain or one file): chain length and which chunks it has.
fn commit_graph(objects: &Path) -> Option<CommitGraphInfo> {
    let dir = objects.join("info");
    let (paths, chain) = match std::fs::read_to_string(dir.join("commit-graphs/commit-graph-chain"))
    {
        Ok(text) => {
            let ids: Vec<String> = text.split_whitespace().map(str::to_owned).collect();
            let paths = ids
                .iter()
                .map(|id| dir.join(format!("commit-graphs/graph-{id}.graph")))
                .collect();
            (paths, ids.len() as u64)
        }
        Err(_) if dir.join("commit-graph").exists() => (vec![dir.join("commit-graph")], 0),
        Err(_) => return None,
    };
    let mut info = CommitGraphInfo {
        commit_graph_chain_length: chain,
        ..Default::default()
    };
    for path in paths {
        let Some(head) = read_head(&path, 8) else {
            continue;
        };
        if &head[..4] != b"CGPH" || head[4] != 1 {
            continue;
        }
        let chunks = head[6] as usize;
        let Some(table) = read_head(&path, 8 + (chunks + 1) * 12).map(|t| t[8..].to_vec()) else {
            continue;
        };
        let has = |id: &[u8]| table.windows(4).any(|w| w == id);
        info.has_bloom_filters |= has(b"BIDX") && has(b"BDAT");
        info.has_generation_data |= has(b"GDA2");
        info.has_generation_data_overflow |= has(b"GDO2");
    }
    Some(info)
}

fn read_head(path: &Path, n: usize) -> Option<Vec<u8>> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).ok()?;
    let mut buf = vec![0; n];
    f.read_exact(&mut buf).ok()?;
    Some(buf)
}

fn seconds(t: SystemTime) -> prost_types::Timestamp {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    prost_types::Timestamp {
        seconds: secs,
        nanos: 0,
    }
}

/// Number of files under `dir` (loose refs).
fn file_count(dir: &Path) -> u64 {
    let mut count = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            match entry.file_type() {
                Ok(t) if t.is_dir() => stack.push(entry.path()),
                Ok(_) => count += 1,
                _ => {}
            }
        }
    }
    count
}

/// RepositoryInfo's answer for the repository at `repo` (`relative` is its path in
/// the storage: object pools live below `@pools/`).
pub fn info(repo: &Path, relative: &str) -> std::io::Result<RepositoryInfoResponse> {
    let size = tree_size(repo)?;
    let objects = repo.join("objects");
    let cutoff = SystemTime::now() - STALE_AFTER;
    let l = loose(&objects, cutoff)?;
    let p = packs(&objects.join("pack"))?;
    let reftable = reftable(repo);
    let references = ReferencesInfo {
        loose_count: if reftable {
            0
        } else {
            file_count(&repo.join("refs"))
        },
        packed_size: std::fs::metadata(repo.join("packed-refs"))
            .map(|m| m.len())
            .unwrap_or(0),
        reference_backend: if reftable {
            ReferenceBackend::Reftable
        } else {
            ReferenceBackend::Files
        } as i32,
    };
    let alternates_path = objects.join("info").join("alternates");
    let alternates = std::fs::read_to_string(&alternates_path)
        .ok()
        .map(|text| AlternatesInfo {
            object_directories: text
                .lines()
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_owned)
                .collect(),
            last_modified: std::fs::metadata(&alternates_path)
                .and_then(|m| m.modified())
                .ok()
                .map(seconds),
        });
    let last_full_repack = std::fs::metadata(repo.join(FULL_REPACK_TIMESTAMP))
        .and_then(|m| m.modified())
        .ok()
        .map(seconds);
    Ok(RepositoryInfoResponse {
        size,
        references: Some(references),
        objects: Some(ObjectsInfo {
            size: l.size + p.size,
            recent_size: (l.size - l.stale_size) + (p.size - p.cruft_size),
            stale_size: l.stale_size + p.cruft_size,
            keep_size: p.keep_size,
            packfile_count: p.count,
            reverse_index_count: p.reverse_index,
            cruft_count: p.cruft_count,
            keep_count: p.keep_count,
            loose_objects_count: l.count,
            stale_loose_objects_count: l.stale_count,
            loose_objects_garbage_count: l.garbage_count,
        }),
        commit_graph: commit_graph(&objects),
        bitmap: p.bitmap,
        multi_pack_index: p.midx,
        multi_pack_index_bitmap: p.midx_bitmap,
        alternates,
        is_object_pool: relative.starts_with("@pools/"),
        last_full_repack,
    })
}
