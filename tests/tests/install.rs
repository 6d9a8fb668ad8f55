//! What install/ holds: refvote-hooks.sh against real repositories (sets
//! core.hooksPath everywhere, is idempotent, leaves other repositories' settings alone
//! on undo), the example configs accepted by their binaries (and a bad one refused
//! naming the key), and the systemd units' directives. That each example documents
//! every key with its default is a unit test beside each config type.

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

/// The directives operators rely on, in both units: restart, the git user, hardening,
/// and no start before a config exists. `systemd-analyze verify` of the installed
/// units runs in scripts/check-packages.sh.
#[test]
fn the_systemd_units_run_as_git_hardened_and_only_once_configured() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../install");
    for (unit, binary, config) in [
        (
            "votingd.service",
            "/usr/bin/votingd",
            "/etc/refvote/votingd.toml",
        ),
        (
            "refvote-router.service",
            "/usr/bin/refvote-router",
            "/etc/refvote/router.toml",
        ),
    ] {
        let text = std::fs::read_to_string(dir.join(unit)).unwrap();
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        for want in [
            "User=git".to_owned(),
            "Group=git".to_owned(),
            "Restart=on-failure".to_owned(),
            "NoNewPrivileges=yes".to_owned(),
            "ProtectSystem=strict".to_owned(),
            "ProtectHome=yes".to_owned(),
            "PrivateTmp=yes".to_owned(),
            "CapabilityBoundingSet=".to_owned(),
            "KillSignal=SIGTERM".to_owned(),
            format!("ConditionPathExists={config}"),
            format!("ExecStart={binary} --config {config}"),
            format!("ExecStartPre={binary} --check-config --config {config}"),
        ] {
            assert!(lines.contains(&want.as_str()), "{unit} lacks {want}");
        }
    }
    let node = std::fs::read_to_string(dir.join("votingd.service")).unwrap();
    // votingd writes its hooks dir, its sockets and the storages.
    assert!(
        node.lines().any(|l| l.starts_with("ReadWritePaths=")
            && l.contains("/var/lib/refvote")
            && l.contains("/run/refvote")),
        "{node}"
    );
}

#[test]
fn the_router_example_config_is_valid() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../install/refvote-router.toml");
    let out = Command::new(refvote_tests::node::bin("refvote-router"))
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
}

/// Not only `--check-config`: starting either daemon on a bad file exits 64 before
/// binding anything, naming the key and the reason.
#[test]
fn both_daemons_refuse_to_start_on_a_bad_config_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    for (binary, text, key, reason) in [
        (
            "votingd",
            "node_name = \"n1\"\nprometheus_listen_addr = \"everywhere\"\n",
            "prometheus_listen_addr",
            "is not an ip:port address",
        ),
        (
            "refvote-router",
            "router_id = \"r1\"\n[etcd]\nendpoints = [\"127.0.0.1:2379\"]\n",
            "etcd.endpoints",
            "must start with http:// or https://",
        ),
    ] {
        let config = dir.path().join(format!("{binary}.toml"));
        std::fs::write(&config, text).unwrap();
        let out = Command::new(refvote_tests::node::bin(binary))
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{binary}: {stderr}");
        assert!(
            stderr.contains(key) && stderr.contains(reason),
            "{binary}: {stderr}"
        );
    }
}

/// The partition-sync pairs: each timer starts its own service, which runs its role
/// once, quiet, as git, hardened, with the config checked first and only once it
/// exists; a run that finds the previous one still going (exit 75) is no failure.
#[test]
fn the_partition_sync_timers_start_one_quiet_run_of_their_role() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../install");
    let config = "/etc/refvote/partition-sync.toml";
    for role in ["produce", "consume"] {
        let unit = format!("refvote-partition-sync-{role}.service");
        let text = std::fs::read_to_string(dir.join(&unit)).unwrap();
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        for want in [
            "Type=oneshot".to_owned(),
            "User=git".to_owned(),
            "Group=git".to_owned(),
            "NoNewPrivileges=yes".to_owned(),
            "ProtectSystem=strict".to_owned(),
            "ProtectHome=yes".to_owned(),
            "PrivateTmp=yes".to_owned(),
            "CapabilityBoundingSet=".to_owned(),
            "ReadWritePaths=/var/lib/refvote".to_owned(),
            "SuccessExitStatus=75".to_owned(),
            format!("ConditionPathExists={config}"),
            format!("ExecStartPre=/usr/bin/votingctl partition-sync check --config {config}"),
            format!("ExecStart=/usr/bin/votingctl partition-sync {role} --quiet --config {config}"),
        ] {
            assert!(lines.contains(&want.as_str()), "{unit} lacks {want}");
        }
        let timer = format!("refvote-partition-sync-{role}.timer");
        let text = std::fs::read_to_string(dir.join(&timer)).unwrap();
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        for want in [
            format!("Unit={unit}"),
            "Persistent=true".to_owned(),
            "WantedBy=timers.target".to_owned(),
        ] {
            assert!(lines.contains(&want.as_str()), "{timer} lacks {want}");
        }
        assert!(
            lines.iter().any(|l| l.starts_with("OnCalendar=")),
            "{timer} has no schedule"
        );
    }
}
