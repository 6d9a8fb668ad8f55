//! The bundles partition sync writes: git's own format (v2, or v3 for SHA-256
//! repositories), so `git bundle verify` and `git fetch` read them, with a header
//! partition sync writes itself and a pack from `git pack-objects`.
//!
//! Why not `git bundle create`: an incremental bundle from it lists only the refs that
//! moved, and it refuses to write a bundle with no new objects. Here every bundle
//! lists the **complete** ref set at its tip — unchanged refs too, and refs that now
//! point at old commits — so fetching it with `+refs/*:refs/*` and `--prune` (what
//! Gitaly's `FetchBundle` does) leaves the target exactly at the tip: deleted refs are
//! deleted, force-pushed refs follow, and a round that only deletes a branch is a
//! bundle with an empty pack.

use crate::naming::BundleFormat;
use crate::refs::RefSet;

/// The bundle format for a repository's object format.
pub fn format_for(object_format: &str) -> BundleFormat {
    if object_format == "sha256" {
        BundleFormat::V3
    } else {
        BundleFormat::V2
    }
}

/// The header: signature, capabilities, prerequisites, every ref, HEAD, blank line.
pub fn header(format: BundleFormat, prerequisites: &[String], refs: &RefSet) -> Vec<u8> {
    let mut h = String::new();
    match format {
        BundleFormat::V2 => h.push_str("# v2 git bundle\n"),
        BundleFormat::V3 => h.push_str("# v3 git bundle\n@object-format=sha256\n"),
    }
    for p in prerequisites {
        h.push('-');
        h.push_str(p);
        h.push('\n');
    }
    for (name, oid) in &refs.refs {
        h.push_str(oid);
        h.push(' ');
        h.push_str(name);
        h.push('\n');
    }
    // HEAD as `git bundle create --all` lists it; a fetch of refs/* leaves it alone,
    // `FetchBundle` with `update_head` takes it.
    if let Some(oid) = refs.head_oid() {
        h.push_str(oid);
        h.push_str(" HEAD\n");
    }
    h.push('\n');
    h.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_lists_prerequisites_refs_and_head() {
        let a = "1".repeat(40);
        let b = "2".repeat(40);
        let refs = RefSet::parse(
            &format!("{a} refs/heads/main\n{b} refs/tags/v1\n"),
            Some("refs/heads/main".into()),
        )
        .unwrap();
        let h =
            String::from_utf8(header(BundleFormat::V2, std::slice::from_ref(&b), &refs)).unwrap();
        assert_eq!(
            h,
            format!("# v2 git bundle\n-{b}\n{a} refs/heads/main\n{b} refs/tags/v1\n{a} HEAD\n\n")
        );
        let h = String::from_utf8(header(BundleFormat::V3, &[], &RefSet::default())).unwrap();
        assert_eq!(h, "# v3 git bundle\n@object-format=sha256\n\n");
        assert_eq!(format_for("sha256"), BundleFormat::V3);
        assert_eq!(format_for("sha1"), BundleFormat::V2);
    }
}
