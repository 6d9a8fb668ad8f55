//! install/refvote-hooks.sh against real repositories: sets core.hooksPath everywhere,
//! is idempotent, leaves other repositories' settings alone on undo.

use std::path::Path;
use std::process::Command;

use refvote_tests::git::git;

fn script(args: &[&str]) -> std::process::Output {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../install/refvote-hooks.sh");
    Command::new("bash").arg(path).args(args).output().unwrap()
}

fn hooks_path(repo: &Path) -> Option<String> {
    git(repo, &["config", "--get", "core.hooksPath"])
        .ok()
        .filter(|s| !s.is_empty())
}

#[test]
fn sets_and_undoes_hooks_path_idempotently() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let storage = dir.path().join("storage");
    for repo in ["a.git", "group/b.git", "@hashed/12/34/c.git"] {
        std::fs::create_dir_all(storage.join(repo))?;
        git(&storage.join(repo), &["init", "--bare", "--quiet"])?;
    }
    git(
        &storage.join("a.git"),
        &["config", "core.logAllRefUpdates", "true"],
    )?;
    let hooks = dir.path().join("hooks");
    let hooks_arg = hooks.to_str().unwrap();
    let storage_arg = storage.to_str().unwrap();

    let out = script(&["--hooks-dir", hooks_arg, storage_arg]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("3 repositories: 3 set, 0 already"), "{text}");
    for repo in ["a.git", "group/b.git", "@hashed/12/34/c.git"] {
        assert_eq!(hooks_path(&storage.join(repo)).as_deref(), Some(hooks_arg));
    }
    let out = script(&["--hooks-dir", hooks_arg, storage_arg]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("3 repositories: 0 set, 3 already"));

    // A repository pointing elsewhere is not touched by undo.
    git(
        &storage.join("group/b.git"),
        &["config", "core.hooksPath", "/elsewhere"],
    )?;
    let out = script(&["--undo", "--hooks-dir", hooks_arg, storage_arg]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("3 repositories: 2 unset, 1 already"));
    assert_eq!(hooks_path(&storage.join("a.git")), None);
    assert_eq!(
        hooks_path(&storage.join("group/b.git")).as_deref(),
        Some("/elsewhere")
    );

    // Bad usage says what to do.
    let out = script(&[]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("name at least one storage directory"));
    let out = script(&["--hooks-dir", "relative", storage_arg]);
    assert_eq!(out.status.code(), Some(64));
    Ok(())
}

#[test]
fn the_example_config_is_valid_and_a_bad_one_names_the_key() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../install/votingd.toml");
    let votingd = refvote_tests::node::bin("votingd");
    let out = Command::new(&votingd)
        .arg("--check-config")
        .arg("--config")
        .arg(&example)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "node_name = \"n1\"\n[etcd]\nrequest_timeout_ms = 5\n").unwrap();
    let out = Command::new(&votingd)
        .arg("--check-config")
        .arg("--config")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("etcd.request_timeout_ms"));

    // The security keys are documented, each under its section.
    let text = std::fs::read_to_string(&example).unwrap();
    let section = |name: &str| {
        let start = text
            .find(&format!("\n[{name}]\n"))
            .unwrap_or_else(|| panic!("no [{name}] section"));
        let rest = &text[start + 1..];
        let end = rest[1..].find("\n[").map_or(rest.len(), |i| i + 1);
        rest[..end].to_owned()
    };
    for (name, keys) in [
        ("etcd", &["ca_path", "certificate_path", "key_path"][..]),
        ("auth", &["token", "token_file", "transitioning"][..]),
        (
            "tls",
            &["certificate_path", "key_path", "client_ca_path", "ca_path"][..],
        ),
    ] {
        let body = section(name);
        for key in keys {
            assert!(
                body.lines()
                    .any(|l| l.trim_start_matches("# ").starts_with(&format!("{key} = "))),
                "[{name}] {key} is not documented in install/votingd.toml"
            );
        }
    }
    // An empty token is refused, naming the key.
    std::fs::write(&bad, "node_name = \"n1\"\n[auth]\ntoken = \"\"\n").unwrap();
    let out = Command::new(&votingd)
        .arg("--check-config")
        .arg("--config")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("auth.token"));
}
