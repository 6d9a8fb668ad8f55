//! `partition-sync list`: what the bucket holds per repository, from names alone
//! (nothing is downloaded or opened): committed sequences, the latest and the latest
//! full one, bytes stored, and data objects no manifest names (uploads cut short).

use serde::Serialize;

use crate::context::Context;
use crate::naming::{Entry, Kind};
use crate::report::{self, Refused, human_bytes};

#[derive(Debug, Serialize)]
struct Row {
    repository: String,
    sequences: usize,
    latest: Option<u64>,
    latest_full: Option<u64>,
    bytes: u64,
    uncommitted: usize,
}

pub async fn print(ctx: &Context, json: bool) -> Result<i32, Refused> {
    let unavailable = |e: crate::store::StoreError| Refused {
        code: report::EXIT_UNAVAILABLE,
        message: e.to_string(),
    };
    let dirs = ctx
        .bucket
        .list_dirs(ctx.layout.prefix())
        .await
        .map_err(unavailable)?;
    let mut rows = Vec::new();
    for dir in dirs {
        let Some(repository) = ctx.layout.parse_repo_dir(&dir) else {
            continue;
        };
        let items = ctx.bucket.list(&dir, None).await.map_err(unavailable)?;
        let mut manifests = std::collections::BTreeSet::new();
        let mut data = Vec::new();
        let mut bytes = 0;
        for item in items {
            bytes += item.size;
            match ctx.layout.parse(&item.key) {
                Some(Entry::Manifest { sequence, .. }) => {
                    manifests.insert(sequence);
                }
                Some(Entry::Data(h)) => data.push(h),
                None => {}
            }
        }
        let latest_full = data
            .iter()
            .filter(|h| h.kind == Kind::Full && manifests.contains(&h.sequence))
            .map(|h| h.sequence)
            .max();
        // Data objects beyond one per committed sequence were never committed.
        let uncommitted = data.len().saturating_sub(manifests.len());
        rows.push(Row {
            repository,
            sequences: manifests.len(),
            latest: manifests.iter().next_back().copied(),
            latest_full,
            bytes,
            uncommitted,
        });
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&rows).expect("serializable")
        );
        return Ok(0);
    }
    let opt = |v: Option<u64>| v.map_or("-".into(), |v| v.to_string());
    let mut lines = vec![[
        "REPOSITORY".to_owned(),
        "SEQUENCES".into(),
        "LATEST".into(),
        "LATEST FULL".into(),
        "STORED".into(),
        "UNCOMMITTED".into(),
    ]];
    for r in &rows {
        lines.push([
            r.repository.clone(),
            r.sequences.to_string(),
            opt(r.latest),
            opt(r.latest_full),
            human_bytes(r.bytes),
            r.uncommitted.to_string(),
        ]);
    }
    let widths: Vec<usize> = (0..6)
        .map(|i| {
            lines
                .iter()
                .map(|l| l[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for l in &lines {
        let mut s = String::new();
        for (i, cell) in l.iter().enumerate() {
            if i + 1 == l.len() {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        println!("{}", s.trim_end());
    }
    Ok(0)
}
