//! RepositoryService.FindLicense: the licence of the default branch's root, answered
//! as Gitaly answers it (go-license-detector's SPDX id in lower case, the SPDX name,
//! the first URL of its database, the licence file's path, choosealicense's nickname
//! where it has one; "Other" for a licence file nothing matches; an empty answer when
//! HEAD resolves to nothing or no licence file exists).
//!
//! Gitaly scores each root file that looks like a licence against every SPDX text;
//! this node recognises the licences GitLab projects mostly carry by the phrases
//! each text must contain ([`identify`]): MIT, Apache-2.0, GPL-2.0/3.0, LGPL-2.1/3.0,
//! AGPL-3.0, BSD-2/3-Clause, MPL-2.0, ISC and the Unlicense. Any other text in a
//! licence file is "Other", where Gitaly might name a rarer licence. A licence file
//! whose whole content is the name of another root file stands for that file.
//! Among matches a canonical name (LICENSE, COPYING, UNLICENSE, with .md/.txt/...)
//! wins over variants (LICENSE-3RD-PARTY.md), then the short name decides.

use std::sync::{Arc, LazyLock};

use refvote_proto::gitaly::{FindLicenseRequest, FindLicenseResponse};
use regex::Regex;
use tonic::{Response, Status};

use crate::engine::Reader;
use crate::error::NodeError;
use crate::object::TreeItem;
use crate::state::NodeState;

/// Licence files larger than this are not read (licence texts are far smaller).
const MAX_LICENSE_FILE: u64 = 1024 * 1024;

/// What the answer says about one licence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct License {
    pub short_name: &'static str,
    pub name: &'static str,
    pub url: &'static str,
    pub nickname: &'static str,
}

const fn license(
    short_name: &'static str,
    name: &'static str,
    url: &'static str,
    nickname: &'static str,
) -> License {
    License {
        short_name,
        name,
        url,
        nickname,
    }
}

pub const MIT: License = license(
    "mit",
    "MIT License",
    "https://opensource.org/licenses/MIT",
    "",
);
pub const APACHE_2: License = license(
    "apache-2.0",
    "Apache License 2.0",
    "https://www.apache.org/licenses/LICENSE-2.0",
    "",
);
pub const GPL_2: License = license(
    "gpl-2.0",
    "GNU General Public License v2.0 only",
    "https://www.gnu.org/licenses/old-licenses/gpl-2.0-standalone.html",
    "GNU GPLv2",
);
pub const GPL_3: License = license(
    "gpl-3.0",
    "GNU General Public License v3.0 only",
    "https://www.gnu.org/licenses/gpl-3.0-standalone.html",
    "GNU GPLv3",
);
pub const LGPL_2_1: License = license(
    "lgpl-2.1",
    "GNU Lesser General Public License v2.1 only",
    "https://www.gnu.org/licenses/old-licenses/lgpl-2.1-standalone.html",
    "GNU LGPLv2.1",
);
pub const LGPL_3: License = license(
    "lgpl-3.0",
    "GNU Lesser General Public License v3.0 only",
    "https://www.gnu.org/licenses/lgpl-3.0-standalone.html",
    "GNU LGPLv3",
);
pub const AGPL_3: License = license(
    "agpl-3.0",
    "GNU Affero General Public License v3.0",
    "https://www.gnu.org/licenses/agpl.txt",
    "GNU AGPLv3",
);
pub const BSD_2: License = license(
    "bsd-2-clause",
    "BSD 2-Clause \"Simplified\" License",
    "https://opensource.org/licenses/BSD-2-Clause",
    "",
);
pub const BSD_3: License = license(
    "bsd-3-clause",
    "BSD 3-Clause \"New\" or \"Revised\" License",
    "https://opensource.org/licenses/BSD-3-Clause",
    "",
);
pub const MPL_2: License = license(
    "mpl-2.0",
    "Mozilla Public License 2.0",
    "https://www.mozilla.org/MPL/2.0/",
    "",
);
pub const ISC: License = license("isc", "ISC License", "https://www.isc.org/licenses/", "");
pub const UNLICENSE: License = license("unlicense", "The Unlicense", "https://unlicense.org/", "");

/// Lower case, every run of non-alphanumerics one space.
fn normalize(text: &[u8]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut space = true;
    for c in String::from_utf8_lossy(text).chars() {
        if c.is_alphanumeric() {
            out.extend(c.to_lowercase());
            space = false;
        } else if !space {
            out.push(' ');
            space = true;
        }
    }
    out.trim_end().to_owned()
}

/// The licence a file's text is, if it is one this node knows (see the module comment).
pub fn identify(text: &[u8]) -> Option<License> {
    let t = normalize(text);
    let has = |p: &str| t.contains(p);
    // The title names GNU licences (the GPL's own text mentions the others later on):
    // the words before the first "general public license", and the version after it.
    if let Some(at) = t.find("general public license") {
        let before = &t[..at];
        let after: String = t[at..].chars().take(80).collect();
        let v3 = after.contains("version 3");
        if before.ends_with("gnu affero ") && v3 {
            return Some(AGPL_3);
        }
        if before.ends_with("gnu lesser ") {
            if v3 {
                return Some(LGPL_3);
            }
            if after.contains("version 2 1") {
                return Some(LGPL_2_1);
            }
        }
        if before.ends_with("gnu ") {
            if after.contains("version 3 29 june 2007") {
                return Some(GPL_3);
            }
            if after.contains("version 2 june 1991") {
                return Some(GPL_2);
            }
        }
    }
    if has("apache license")
        && has("version 2 0")
        && has("terms and conditions for use reproduction and distribution")
    {
        return Some(APACHE_2);
    }
    if has("mozilla public license version 2 0") {
        return Some(MPL_2);
    }
    if has("permission is hereby granted free of charge to any person obtaining a copy")
        && has("the above copyright notice and this permission notice shall be included")
    {
        return Some(MIT);
    }
    if has("this is free and unencumbered software released into the public domain") {
        return Some(UNLICENSE);
    }
    if has(
        "permission to use copy modify and or distribute this software for any purpose with or without fee is hereby granted",
    ) {
        return Some(ISC);
    }
    if has(
        "redistribution and use in source and binary forms with or without modification are permitted provided that the following conditions are met",
    ) {
        return Some(
            if has("neither the name of") || has("the name of the author may not be used") {
                BSD_3
            } else {
                BSD_2
            },
        );
    }
    None
}

/// go-license-detector's licence file names.
static LICENSE_FILE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^(|.*[-_. ])(li[cs]en[cs]e(s?)|legal|copy(left|right|ing)|unlicense|l?gpl([-_ v]?)(\d\.?\d)?|bsd|mit|apache)(|[-_. ].*)$")
        .expect("a valid pattern")
});
/// READMEs, which Gitaly keeps away from the detector.
static README: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(readme|guidelines)(\.md|\.rst|\.html|\.txt)?$").expect("a valid pattern")
});
static CANONICAL: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)^((un)?licen[sc]e|copying)(\.md|\.txt|\.html|\.rst)?$")
        .expect("a valid pattern")
});

pub(crate) async fn find_license(
    node: &Arc<NodeState>,
    req: FindLicenseRequest,
) -> Result<Response<FindLicenseResponse>, Status> {
    let repo = node.storages.existing(req.repository.as_ref())?;
    let mut cat = node.reads.reader(&repo).await?;
    let Some(commit) = cat.commit("HEAD").await? else {
        return Ok(Response::new(FindLicenseResponse::default()));
    };
    let Some((_, tree)) = cat.tree(&format!("{}^{{tree}}", commit.id)).await? else {
        return Ok(Response::new(FindLicenseResponse::default()));
    };
    let entries: Vec<TreeItem> = tree
        .into_iter()
        .filter(|e| e.mode & 0o170000 == 0o100000)
        .filter(|e| {
            let lower = String::from_utf8_lossy(&e.name).to_lowercase();
            !README.is_match(&lower) && LICENSE_FILE.is_match(&lower)
        })
        .collect();
    let mut first_read: Option<String> = None;
    let mut matches: Vec<(String, License)> = Vec::new();
    for e in &entries {
        let name = String::from_utf8_lossy(&e.name).into_owned();
        let Some(text) = read_small(&mut cat, &e.oid).await? else {
            continue;
        };
        first_read.get_or_insert_with(|| name.clone());
        if let Some(l) = identify(&text) {
            matches.push((name, l));
            continue;
        }
        // A file that only names another file stands for it.
        let pointer = String::from_utf8_lossy(&text).trim().to_owned();
        if let Some(target) = entries
            .iter()
            .find(|t| t.name == pointer.as_bytes() && t.oid != e.oid)
            && let Some(text) = read_small(&mut cat, &target.oid).await?
            && let Some(l) = identify(&text)
        {
            matches.push((pointer, l));
        }
    }
    matches.sort_by(|(a, la), (b, lb)| {
        CANONICAL
            .is_match(b)
            .cmp(&CANONICAL.is_match(a))
            .then_with(|| la.short_name.cmp(lb.short_name))
    });
    let answer = match (matches.first(), first_read) {
        (Some((path, l)), _) => FindLicenseResponse {
            license_short_name: l.short_name.to_owned(),
            license_name: l.name.to_owned(),
            license_url: l.url.to_owned(),
            license_path: path.clone(),
            license_nickname: l.nickname.to_owned(),
        },
        (None, Some(path)) => FindLicenseResponse {
            license_short_name: "other".into(),
            license_name: "Other".into(),
            license_nickname: "LICENSE".into(),
            license_path: path,
            license_url: String::new(),
        },
        (None, None) => FindLicenseResponse::default(),
    };
    Ok(Response::new(answer))
}

/// The blob `oid` whole, unless it is larger than a licence file can be.
async fn read_small(cat: &mut Reader, oid: &str) -> Result<Option<Vec<u8>>, NodeError> {
    match cat.info(oid).await? {
        Some(h) if h.size <= MAX_LICENSE_FILE => {
            Ok(cat.object(oid, MAX_LICENSE_FILE).await?.map(|o| o.data))
        }
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIT_TEXT: &str = "MIT License\n\nCopyright (c) 2024 A\n\nPermission is hereby granted, free of charge, to any person obtaining a copy\nof this software and associated documentation files (the \"Software\"), to deal\nin the Software without restriction...\n\nThe above copyright notice and this permission notice shall be included in all\ncopies or substantial portions of the Software.\n";

    #[test]
    fn common_licences_are_recognised() {
        assert_eq!(identify(MIT_TEXT.as_bytes()), Some(MIT));
        assert_eq!(
            identify(b"                                 Apache License\n                           Version 2.0, January 2004\n\n   TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION\n"),
            Some(APACHE_2)
        );
        assert_eq!(
            identify(b"                    GNU GENERAL PUBLIC LICENSE\n                       Version 3, 29 June 2007\n ... GNU Affero General Public License ... GNU Lesser General Public License"),
            Some(GPL_3)
        );
        assert_eq!(
            identify(b"GNU GENERAL PUBLIC LICENSE\nVersion 2, June 1991\n"),
            Some(GPL_2)
        );
        assert_eq!(identify(b"this doesn't match any known license"), None);
    }

    #[test]
    fn licence_file_names() {
        for yes in [
            "license",
            "licence.md",
            "copying",
            "license-3rd-party.md",
            "unlicense",
            "mit.txt",
        ] {
            assert!(LICENSE_FILE.is_match(yes), "{yes}");
        }
        for no in ["readme.md", "main.rs", "licensing-notes-x"] {
            assert!(!LICENSE_FILE.is_match(no) || README.is_match(no), "{no}");
        }
        assert!(CANONICAL.is_match("LICENSE.md"));
        assert!(!CANONICAL.is_match("LICENSE-3RD-PARTY.md"));
    }
}
