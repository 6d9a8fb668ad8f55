//! refvote-gitlab against real servers and real processes: a loopback HTTP server
//! (plain, TLS, Unix socket) standing in for GitLab's internal API that records and
//! checks every request, and custom hooks that are real executables.

mod api;
mod custom_hooks;
mod sequence;
mod server;

use std::path::{Path, PathBuf};

use refvote_gitlab::{ApiConfig, Client, GitlabSettings, HookContext};
use refvote_proto::gitaly::{PostReceivePackRequest, Repository};

/// The shared secret every test server checks.
pub const SECRET: &str = "the-gitlab-shell-secret";
pub const USER_AGENT: &str = "refvote-test/1";

pub const OLD: &str = "1111111111111111111111111111111111111111";
pub const NEW: &str = "2222222222222222222222222222222222222222";

/// The `[gitlab]` section for `url`, the secret in a file below `dir` (with the
/// surrounding whitespace an editor leaves), then `extra` TOML lines.
pub fn settings(dir: &Path, url: &str, extra: &str) -> GitlabSettings {
    let secret_file = dir.join(".gitlab_shell_secret");
    std::fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
    toml::from_str(&format!(
        "url = {url:?}\nsecret_file = {secret_file:?}\n{extra}"
    ))
    .unwrap()
}

pub fn config(dir: &Path, url: &str, extra: &str) -> ApiConfig {
    settings(dir, url, extra).resolve().unwrap().unwrap()
}

pub fn client(dir: &Path, url: &str, extra: &str) -> Client {
    Client::new(&config(dir, url, extra), USER_AGENT).unwrap()
}

/// A bare repository directory (no git needed: hooks only look at `custom_hooks/`).
pub fn repository(dir: &Path) -> PathBuf {
    let repo = dir.join("group/project.git");
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::canonicalize(repo).unwrap()
}

/// What workhorse sends for a push by `gl_id`.
pub fn push_context(gl_id: &str) -> HookContext {
    let request = PostReceivePackRequest {
        repository: Some(Repository {
            storage_name: "default".into(),
            relative_path: "group/project.git".into(),
            gl_repository: "project-42".into(),
            gl_project_path: "group/project".into(),
            ..Default::default()
        }),
        gl_id: gl_id.into(),
        gl_repository: "project-42".into(),
        gl_username: "jane".into(),
        git_protocol: "version=2".into(),
        ..Default::default()
    };
    HookContext::from_post_receive_pack(&request, "corr-id-123").unwrap()
}

/// An executable script at `path`.
pub fn script(path: &Path, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, format!("#!/bin/sh\n{body}")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A throw-away CA and a certificate for `localhost`/127.0.0.1 it signed, made with
/// the `openssl` CLI in `dir`: (ca.pem, cert.pem, key.pem).
pub fn test_ca(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl is installed");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=refvote-gitlab test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
         keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "server.ext",
    ]);
    (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    )
}
