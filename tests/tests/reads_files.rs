//! The file-level reads through a real router in front of three real votingd nodes,
//! on the repository `tests/fixtures/read-repo.sh` builds, each answer compared with
//! git's own on a replica: RawBlame (`git blame --porcelain`), GetFileAttributes (`git
//! check-attr`), SearchFilesByName/Content (`git ls-tree`, `git grep`), GetArchive
//! (`git archive`, byte for byte, and `tar t` of it), GetSnapshot (a repository made
//! from it has the same refs and objects), FindLicense, CommitLanguages (a mutator:
//! through a transaction, changing nothing) and CheckBlobsGenerated; with Gitaly's
//! errors for bad input.

use refvote_node::detail::detail_of;
use refvote_proto::gitaly::analysis_service_client::AnalysisServiceClient;
use refvote_proto::gitaly::commit_service_client::CommitServiceClient;
use refvote_proto::gitaly::repository_service_client::RepositoryServiceClient;
use refvote_proto::gitaly::{
    CheckBlobsGeneratedRequest, CommitLanguagesRequest, FindLicenseRequest, GetArchiveRequest,
    GetFileAttributesRequest, GetSnapshotRequest, RawBlameError, RawBlameRequest,
    SearchFilesByContentRequest, SearchFilesByNameRequest, check_blobs_generated_request,
    get_archive_request, raw_blame_error,
};
use refvote_tests::git;
use refvote_tests::reads::{EMPTY, REPO, ReadCluster, collect, git_bytes, repo};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blame_attributes_search_and_license_equal_git() -> anyhow::Result<()> {
    let rc = ReadCluster::start(None).await?;
    let ch = rc.channel().await?;
    let main = rc.rev("main")?;
    let mut commits = CommitServiceClient::new(ch.clone());
    let blame = |revision: &str, path: &str, range: &str| RawBlameRequest {
        repository: repo(REPO),
        revision: revision.as_bytes().to_vec(),
        path: path.as_bytes().to_vec(),
        range: range.as_bytes().to_vec(),
        ..Default::default()
    };
    for (path, range) in [
        ("lib/app.rb", ""),
        ("README.md", ""),
        ("ünï cödé/fïlé.txt", ""),
        ("big.txt", "10,20"),
    ] {
        let ours: Vec<u8> = collect(commits.raw_blame(blame(&main, path, range)))
            .await?
            .into_iter()
            .flat_map(|m| m.data)
            .collect();
        let mut args = vec!["blame", "-p"];
        if !range.is_empty() {
            args.extend(["-L", range]);
        }
        args.extend([main.as_str(), "--", path]);
        assert_eq!(ours, rc.git(&args)?, "{path}");
    }
    let err = collect(commits.raw_blame(blame(&main, "lib/app.rb", "100,200")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let d: RawBlameError = detail_of(&err, "gitaly.RawBlameError").expect("a RawBlameError");
    assert_eq!(
        d.error,
        Some(raw_blame_error::Error::OutOfRange(
            raw_blame_error::OutOfRangeError { actual_lines: 40 }
        ))
    );
    let err = collect(commits.raw_blame(blame(&main, "no/such/file", "")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let d: RawBlameError = detail_of(&err, "gitaly.RawBlameError").expect("a RawBlameError");
    assert!(
        matches!(d.error, Some(raw_blame_error::Error::PathNotFound(p)) if p.path == b"no/such/file")
    );
    for (rev, path, range) in [
        ("--output=/tmp/x", "lib/app.rb", ""),
        (main.as_str(), "../etc/passwd", ""),
        (main.as_str(), "lib/app.rb", "1-2"),
    ] {
        let err = collect(commits.raw_blame(blame(rev, path, range)))
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{rev} {path} {range}: {err:?}"
        );
    }

    // GetFileAttributes: what git check-attr says, unspecified ones left out.
    let mut repos = RepositoryServiceClient::new(ch.clone());
    let paths = ["asset.bin", "lib/app.rb", "page.tmpl", "generated/out.js"];
    let attrs = ["filter", "diff", "linguist-language", "linguist-generated"];
    let answer = repos
        .get_file_attributes(GetFileAttributesRequest {
            repository: repo(REPO),
            revision: main.clone().into_bytes(),
            paths: paths.iter().map(|p| (*p).to_owned()).collect(),
            attributes: attrs.iter().map(|a| (*a).to_owned()).collect(),
        })
        .await?
        .into_inner();
    let ours: Vec<String> = answer
        .attribute_infos
        .iter()
        .map(|a| format!("{}: {}: {}", a.path, a.attribute, a.value))
        .collect();
    let mut args = vec!["check-attr", "--source", main.as_str()];
    args.extend(attrs);
    args.push("--");
    args.extend(paths);
    let theirs: Vec<String> = String::from_utf8(rc.git(&args)?)?
        .lines()
        .filter(|l| !l.ends_with(": unspecified"))
        .map(str::to_owned)
        .collect();
    assert_eq!(ours, theirs);
    assert!(ours.contains(&"asset.bin: filter: lfs".to_owned()));
    let err = repos
        .get_file_attributes(GetFileAttributesRequest {
            repository: repo(REPO),
            revision: main.clone().into_bytes(),
            paths: vec!["x".into()],
            attributes: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::InvalidArgument, "attributes are required")
    );

    // SearchFilesByName: ls-tree's paths, filtered, paged.
    let by_name = |query: &str, filter: &str, offset: u32, limit: u32| SearchFilesByNameRequest {
        repository: repo(REPO),
        query: query.into(),
        r#ref: main.clone().into_bytes(),
        filter: filter.into(),
        offset,
        limit,
    };
    let all: Vec<Vec<u8>> = collect(repos.search_files_by_name(by_name(".", "", 0, 0)))
        .await?
        .into_iter()
        .flat_map(|m| m.files)
        .collect();
    let listed: Vec<Vec<u8>> = rc
        .git(&["ls-tree", "--full-tree", "--name-only", "-r", "-z", &main])?
        .split(|b| *b == 0)
        .filter(|p| !p.is_empty())
        .map(<[u8]>::to_vec)
        .collect();
    assert_eq!(all, listed);
    let many: Vec<Vec<u8>> =
        collect(repos.search_files_by_name(by_name("many", r"file-1\d\.txt$", 2, 3)))
            .await?
            .into_iter()
            .flat_map(|m| m.files)
            .collect();
    let expected: Vec<Vec<u8>> = listed
        .iter()
        .filter(|p| p.starts_with(b"many/") && regex_like_file_1x(p))
        .skip(2)
        .take(3)
        .cloned()
        .collect();
    assert_eq!(many, expected);
    let err = collect(repos.search_files_by_name(by_name("x", "(", 0, 0)))
        .await
        .unwrap_err();
    assert!(
        err.message().starts_with("filter did not compile"),
        "{err:?}"
    );
    let err = collect(repos.search_files_by_name(SearchFilesByNameRequest {
        r#ref: b"--all".to_vec(),
        ..by_name(".", "", 0, 0)
    }))
    .await
    .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::InvalidArgument, "invalid ref argument")
    );

    // SearchFilesByContent: git grep's match blocks, each followed by its end marker.
    let matches = collect(repos.search_files_by_content(SearchFilesByContentRequest {
        repository: repo(REPO),
        query: "method_1[0-2];".into(),
        r#ref: main.clone().into_bytes(),
    }))
    .await?;
    let mut blocks = Vec::new();
    let mut current = Vec::new();
    for m in matches {
        current.extend(m.match_data);
        if m.end_of_match {
            blocks.push(std::mem::take(&mut current));
        }
    }
    let grep = rc.git(&[
        "grep",
        "--ignore-case",
        "-I",
        "--line-number",
        "--null",
        "--before-context",
        "2",
        "--after-context",
        "2",
        "--perl-regexp",
        "-e",
        "method_1[0-2];",
        &main,
    ])?;
    let expected: Vec<Vec<u8>> = String::from_utf8_lossy(&grep)
        .split("--\n")
        .map(|b| b.as_bytes().to_vec())
        .collect();
    assert_eq!(blocks, expected);

    // FindLicense: the fixture's MIT licence; nothing in the empty repository.
    let license = repos
        .find_license(FindLicenseRequest {
            repository: repo(REPO),
        })
        .await?
        .into_inner();
    assert_eq!(
        (
            license.license_short_name.as_str(),
            license.license_name.as_str(),
            license.license_url.as_str(),
            license.license_path.as_str()
        ),
        (
            "mit",
            "MIT License",
            "https://opensource.org/licenses/MIT",
            "LICENSE"
        )
    );
    let none = repos
        .find_license(FindLicenseRequest {
            repository: repo(EMPTY),
        })
        .await?
        .into_inner();
    assert!(none.license_short_name.is_empty() && none.license_path.is_empty());
    Ok(())
}

fn regex_like_file_1x(path: &[u8]) -> bool {
    let s = String::from_utf8_lossy(path);
    s.strip_prefix("many/file-1")
        .and_then(|r| r.strip_suffix(".txt"))
        .is_some_and(|d| d.len() == 1 && d.as_bytes()[0].is_ascii_digit())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archives_equal_git_archive_and_snapshots_rebuild_the_repository() -> anyhow::Result<()> {
    let rc = ReadCluster::start(None).await?;
    let ch = rc.channel().await?;
    let main = rc.rev("main")?;
    let mut repos = RepositoryServiceClient::new(ch.clone());
    let archive = |format: get_archive_request::Format,
                   path: &str,
                   exclude: &[&str],
                   elide: bool| GetArchiveRequest {
        repository: repo(REPO),
        commit_id: main.clone(),
        prefix: "proj".into(),
        format: format as i32,
        path: path.as_bytes().to_vec(),
        exclude: exclude.iter().map(|e| e.as_bytes().to_vec()).collect(),
        elide_path: elide,
        include_lfs_blobs: false,
    };
    let fetch = |req: GetArchiveRequest| {
        let mut repos = repos.clone();
        async move {
            Ok::<Vec<u8>, tonic::Status>(
                collect(repos.get_archive(req))
                    .await?
                    .into_iter()
                    .flat_map(|m| m.data)
                    .collect(),
            )
        }
    };
    use get_archive_request::Format;
    let cases: Vec<(GetArchiveRequest, Vec<&str>)> = vec![
        (
            archive(Format::Tar, "", &[], false),
            vec![
                "archive",
                "--format=tar",
                "--prefix=proj/",
                &main,
                "--",
                ".",
            ],
        ),
        (
            archive(Format::Zip, "", &[], false),
            vec![
                "archive",
                "--format=zip",
                "--prefix=proj/",
                &main,
                "--",
                ".",
            ],
        ),
        (
            archive(Format::TarGz, "", &[], false),
            vec![
                "-c",
                "tar.tar.gz.command=gzip -c -n",
                "archive",
                "--format=tar.gz",
                "--prefix=proj/",
                &main,
                "--",
                ".",
            ],
        ),
        (
            archive(Format::TarBz2, "", &[], false),
            vec![
                "-c",
                "tar.tar.bz2.command=bzip2 -c",
                "archive",
                "--format=tar.bz2",
                "--prefix=proj/",
                &main,
                "--",
                ".",
            ],
        ),
        (
            archive(Format::Tar, "", &["many", "lib"], false),
            vec![
                "archive",
                "--format=tar",
                "--prefix=proj/",
                &main,
                "--",
                ".",
                ":(exclude)many",
                ":(exclude)lib",
            ],
        ),
        (
            archive(Format::Tar, "many", &["many/file-1.txt"], false),
            vec![
                "archive",
                "--format=tar",
                "--prefix=proj/",
                &main,
                "--",
                "many",
                ":(exclude)many/file-1.txt",
            ],
        ),
    ];
    for (req, args) in cases {
        let ours = fetch(req.clone()).await?;
        assert_eq!(ours, rc.git(&args)?, "{args:?}");
    }
    // elide_path: the path's contents at the archive's root.
    let elided = fetch(archive(Format::Tar, "ünï cödé", &[], true)).await?;
    let tar = rc.cluster.path("elided.tar");
    std::fs::write(&tar, &elided)?;
    let listing = String::from_utf8(
        std::process::Command::new("tar")
            .arg("tf")
            .arg(&tar)
            .output()?
            .stdout,
    )?;
    assert_eq!(listing, "proj/\nproj/fïlé.txt\n");
    // The LFS pointer goes in as it is (Gitaly's answer when GitLab has no object).
    let full = fetch(archive(Format::Tar, "", &[], false)).await?;
    let full_tar = rc.cluster.path("full.tar");
    std::fs::write(&full_tar, &full)?;
    let pointer = std::process::Command::new("tar")
        .args(["xOf"])
        .arg(&full_tar)
        .arg("proj/asset.bin")
        .output()?
        .stdout;
    assert!(pointer.starts_with(b"version https://git-lfs.github.com/spec/v1\n"));
    let with_lfs = fetch(GetArchiveRequest {
        include_lfs_blobs: true,
        ..archive(Format::Tar, "", &[], false)
    })
    .await?;
    assert_eq!(with_lfs, full);

    // Errors, in Gitaly's words.
    for (req, code, message) in [
        (
            archive(Format::Tar, "../etc", &[], false),
            Code::InvalidArgument,
            "relative path escapes root directory",
        ),
        (
            archive(Format::Tar, "nope", &[], false),
            Code::FailedPrecondition,
            "path doesn't exist",
        ),
        (
            archive(Format::Tar, "", &["nope"], false),
            Code::FailedPrecondition,
            "exclude[0] doesn't exist",
        ),
        (
            archive(Format::Tar, "many", &["lib"], true),
            Code::InvalidArgument,
            "invalid exclude",
        ),
        (
            GetArchiveRequest {
                commit_id: "--output=/tmp/x".into(),
                ..archive(Format::Tar, "", &[], false)
            },
            Code::InvalidArgument,
            "invalid commitId",
        ),
        (
            GetArchiveRequest {
                format: 9,
                ..archive(Format::Tar, "", &[], false)
            },
            Code::InvalidArgument,
            "invalid format",
        ),
    ] {
        let err = fetch(req).await.unwrap_err();
        assert_eq!(err.code(), code, "{err:?}");
        assert!(err.message().starts_with(message), "{err:?}");
    }

    // GetSnapshot: a repository unpacked from it has the same refs and every object.
    let snapshot: Vec<u8> = collect(repos.get_snapshot(GetSnapshotRequest {
        repository: repo(REPO),
    }))
    .await?
    .into_iter()
    .flat_map(|m| m.data)
    .collect();
    let restored = rc.cluster.path("restored.git");
    std::fs::create_dir_all(&restored)?;
    let tarball = rc.cluster.path("snapshot.tar");
    std::fs::write(&tarball, &snapshot)?;
    let out = std::process::Command::new("tar")
        .arg("xf")
        .arg(&tarball)
        .arg("-C")
        .arg(&restored)
        .output()?;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(git::refs(&restored), git::refs(&rc.replica()));
    git_bytes(&restored, &["fsck", "--full", "--no-dangling"])?;
    let config = std::fs::read_to_string(restored.join("config"))?;
    assert!(!config.contains("hooksPath"), "{config}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_languages_is_voted_and_changes_nothing() -> anyhow::Result<()> {
    let rc = ReadCluster::start(None).await?;
    let ch = rc.channel().await?;
    let acknowledged = |m: &std::collections::BTreeMap<String, f64>| {
        m.iter()
            .filter(|(k, _)| {
                k.starts_with("refvote_router_transactions_total") && k.contains("acknowledged")
            })
            .map(|(_, v)| *v)
            .sum::<f64>()
    };
    let before = acknowledged(&refvote_tests::metrics::scrape(rc.router().metrics_addr()).await?);
    let refs_before = git::refs(&rc.replica());
    let mut commits = CommitServiceClient::new(ch.clone());
    let answer = commits
        .commit_languages(CommitLanguagesRequest {
            repository: repo(REPO),
            revision: b"main".to_vec(),
        })
        .await?
        .into_inner();
    // Expected from git ls-tree: Ruby is lib/app.rb and page.tmpl (linguist-language),
    // not docs/example.rb (linguist-documentation); Go main.go; Python tool.py; Shell
    // bin/run (its #! line). Vendored, generated and prose files do not count.
    let sizes = String::from_utf8(rc.git(&["ls-tree", "-r", "--long", "main"])?)?;
    let size = |path: &str| -> u64 {
        sizes
            .lines()
            .find(|l| l.ends_with(&format!("\t{path}")))
            .and_then(|l| l.split_whitespace().nth(3))
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{path} in ls-tree"))
    };
    let expected = [
        ("Ruby", size("lib/app.rb") + size("page.tmpl")),
        ("Go", size("main.go")),
        ("Python", size("tool.py")),
        ("Shell", size("bin/run")),
    ];
    let total: u64 = expected.iter().map(|(_, b)| b).sum();
    let mut got: Vec<(String, u64)> = answer
        .languages
        .iter()
        .map(|l| (l.name.clone(), l.bytes))
        .collect();
    got.sort();
    let mut want: Vec<(String, u64)> = expected
        .iter()
        .map(|(n, b)| ((*n).to_owned(), *b))
        .collect();
    want.sort();
    assert_eq!(got, want);
    let ruby = &answer.languages[0];
    assert_eq!(
        (ruby.name.as_str(), ruby.color.as_str(), ruby.language_id),
        ("Ruby", "#701516", 326)
    );
    assert!((ruby.share - (100 * expected[0].1) as f32 / total as f32).abs() < 0.001);
    // A voted call that changed no ref: every replica still up to date, refs as before.
    let after = acknowledged(&refvote_tests::metrics::scrape(rc.router().metrics_addr()).await?);
    assert_eq!(
        after,
        before + 1.0,
        "the call was not one acknowledged transaction"
    );
    let view = rc.cluster.store.repo_view(&rc.id).await?;
    assert_eq!(view.up_to_date_live().len(), 3, "{view:?}");
    for n in &rc.cluster.nodes {
        assert_eq!(git::refs(&n.repo(REPO)), refs_before);
    }
    let err = commits
        .commit_languages(CommitLanguagesRequest {
            repository: repo(REPO),
            revision: b"-x".to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_blobs_are_flagged_per_request_message() -> anyhow::Result<()> {
    let rc = ReadCluster::start(None).await?;
    let ch = rc.channel().await?;
    let mut client = AnalysisServiceClient::new(ch.clone());
    let blob = |rev: &str, path: &str| check_blobs_generated_request::Blob {
        revision: rev.as_bytes().to_vec(),
        path: path.as_bytes().to_vec(),
    };
    let requests = vec![
        CheckBlobsGeneratedRequest {
            repository: repo(REPO),
            blobs: vec![
                blob("main:main.go", "main.go"),
                blob("main:README.md", "package-lock.json"),
            ],
        },
        CheckBlobsGeneratedRequest {
            repository: None,
            blobs: vec![blob("main:lib/app.rb", "Cargo.lock")],
        },
    ];
    let answers = collect(client.check_blobs_generated(tokio_stream::iter(requests))).await?;
    let flags: Vec<Vec<bool>> = answers
        .iter()
        .map(|a| a.blobs.iter().map(|b| b.generated).collect())
        .collect();
    assert_eq!(flags, vec![vec![false, true], vec![true]]);
    assert_eq!(answers[0].blobs[0].revision, b"main:main.go");
    let err = collect(client.check_blobs_generated(tokio_stream::iter(vec![
        CheckBlobsGeneratedRequest {
            repository: repo(REPO),
            blobs: vec![blob("main", "x")],
        },
    ])))
    .await
    .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::InvalidArgument, "object is not a blob")
    );
    Ok(())
}
