//! The router's first-frame parsing and storage rewrite on arbitrary bytes: nothing
//! panics, and a rewrite changes exactly the repository it was asked to change.
#![no_main]

use libfuzzer_sys::fuzz_target;
use refvote_router::frame;

/// Field paths the registry uses (a top-level repository, and one nested a level down).
const PATHS: &[&[u32]] = &[&[1], &[2], &[1, 1], &[3, 1]];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, frame_bytes)) = data.split_first() else {
        return;
    };
    let path = PATHS[selector as usize % PATHS.len()];
    let Ok(original) = frame::repository(frame_bytes, path) else {
        return;
    };
    let rewritten = frame::rewrite_repository(frame_bytes, path, |r| {
        r.storage_name = "node-storage".into();
    })
    .expect("a frame whose repository parses can be rewritten");
    let now = frame::repository(&rewritten, path).expect("the rewrite parses");
    assert_eq!(now.storage_name, "node-storage");
    assert_eq!(now.relative_path, original.relative_path);
    // Rewriting back gives a repository equal to the client's.
    let back = frame::rewrite_repository(&rewritten, path, |r| {
        r.storage_name = original.storage_name.clone();
    })
    .expect("rewriting twice");
    assert_eq!(frame::repository(&back, path).unwrap(), original);
});
