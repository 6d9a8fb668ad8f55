//! The internal API client against a loopback server that checks every request.

use std::sync::Arc;
use std::time::{Duration, Instant};

use refvote_gitlab::{ApiError, Changes, Client, ObjectDirectories};
use serde_json::json;

use crate::server::{FakeGitlab, Reply, always};
use crate::{NEW, OLD, SECRET, USER_AGENT, client, config, push_context, repository, test_ca};

fn changes() -> Changes {
    Changes::parse(format!("{OLD} {NEW} refs/heads/main\n").as_bytes()).unwrap()
}

/// Headers every call carries.
fn assert_common(r: &crate::server::Recorded, request_id: &str) {
    r.assert_jwt(SECRET.as_bytes());
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("user-agent"), Some(USER_AGENT));
    assert_eq!(r.header("x-request-id"), Some(request_id));
}

#[tokio::test]
async fn allowed_sends_what_gitaly_sends() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repository(dir.path());
    let gitlab = FakeGitlab::http(always(Reply::json(
        200,
        json!({"status": true, "gl_id": "user-7"}),
    )))
    .await;
    let client = client(
        dir.path(),
        &gitlab.url,
        "[http-settings]\nuser = \"gitlab\"\npassword = \"pw\"\n",
    );
    let mut context = push_context("user-7");
    context.push_options = vec!["ci.skip".into(), "mr.create".into()];
    context.object_directories = Some(ObjectDirectories {
        object_directory: "objects/incoming-A1b2C3".into(),
        alternate_object_directories: vec!["objects".into()],
    });
    let answer = client.allowed(&context, &repo, &changes()).await.unwrap();
    assert!(answer.status);

    let r = gitlab.single();
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, "/api/v4/internal/allowed");
    assert_common(&r, "corr-id-123");
    assert_eq!(r.basic_auth(), Some(("gitlab".into(), "pw".into())));
    let body = r.json();
    let fields = body.as_object().unwrap();
    assert_eq!(body["action"], "git-receive-pack");
    assert_eq!(body["gl_repository"], "project-42");
    assert_eq!(body["project"], repo.to_str().unwrap());
    assert_eq!(body["relative_path"], "group/project.git");
    assert_eq!(body["changes"], format!("{OLD} {NEW} refs/heads/main\n"));
    assert_eq!(body["protocol"], "http");
    assert_eq!(body["user_id"], "7");
    assert!(!fields.contains_key("key_id") && !fields.contains_key("username"));
    assert_eq!(body["push_options"], json!(["ci.skip", "mr.create"]));
    // env is a JSON document inside the JSON body, as Gitaly sends it.
    let env: serde_json::Value = serde_json::from_str(body["env"].as_str().unwrap()).unwrap();
    assert_eq!(
        env,
        json!({
            "GIT_OBJECT_DIRECTORY_RELATIVE": "objects/incoming-A1b2C3",
            "GIT_ALTERNATE_OBJECT_DIRECTORIES_RELATIVE": ["objects"],
        })
    );
    assert_eq!(fields.len(), 9, "unexpected fields in {body}");
}

#[tokio::test]
async fn allowed_identifies_keys_and_usernames() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repository(dir.path());
    let gitlab = FakeGitlab::http(always(Reply::json(200, json!({"status": true})))).await;
    let client = client(dir.path(), &gitlab.url, "");
    for gl_id in ["key-12", "username-jane"] {
        client
            .allowed(&push_context(gl_id), &repo, &changes())
            .await
            .unwrap();
    }
    let requests = gitlab.requests();
    assert_eq!(requests.len(), 2);
    let key = requests[0].json();
    assert_eq!(key["key_id"], "12");
    assert!(key.get("user_id").is_none() && key.get("username").is_none());
    let name = requests[1].json();
    assert_eq!(name["username"], "jane");
    assert!(name.get("user_id").is_none() && name.get("key_id").is_none());
    // No quarantine and no push options: Gitaly's empty env, no push_options key, no
    // basic auth.
    let env: serde_json::Value = serde_json::from_str(key["env"].as_str().unwrap()).unwrap();
    assert_eq!(
        env,
        json!({"GIT_OBJECT_DIRECTORY_RELATIVE": "", "GIT_ALTERNATE_OBJECT_DIRECTORIES_RELATIVE": null})
    );
    assert!(key.get("push_options").is_none());
    assert_eq!(requests[0].basic_auth(), None);
}

#[tokio::test]
async fn refusals_carry_gitlabs_message() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repository(dir.path());
    for (status, body, refusal, text) in [
        (
            401,
            json!({"status": false, "message": "You are not allowed to push code to protected branches on this project."}),
            true,
            "You are not allowed to push code to protected branches on this project.",
        ),
        (
            403,
            json!({"message": "403 Forbidden"}),
            true,
            "403 Forbidden",
        ),
        (
            404,
            json!({"status": false, "message": "The project you were looking for could not be found or you don't have permission to view it."}),
            true,
            "The project you were looking for could not be found or you don't have permission to view it.",
        ),
        (
            500,
            json!({"message": "500 Internal Server Error"}),
            false,
            "500 Internal Server Error",
        ),
        (503, json!({}), false, "Internal API error (503)"),
    ] {
        let gitlab = FakeGitlab::http(always(Reply::json(status, body))).await;
        let e = client(dir.path(), &gitlab.url, "")
            .allowed(&push_context("user-1"), &repo, &changes())
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ApiError::Status { status: s, .. } if *s == status),
            "{status}: {e:?}"
        );
        assert_eq!(e.is_refusal(), refusal, "{status}");
        assert_eq!(e.gitaly_text(), text, "{status}");
        assert_eq!(gitlab.single().path, "/api/v4/internal/allowed");
    }
    // A 200 that says no.
    let gitlab = FakeGitlab::http(always(Reply::json(
        200,
        json!({"status": false, "message": "Push rule: commit message must mention an issue"}),
    )))
    .await;
    let answer = client(dir.path(), &gitlab.url, "")
        .allowed(&push_context("user-1"), &repo, &changes())
        .await
        .unwrap();
    assert!(!answer.status);
    assert_eq!(
        answer.message.as_deref(),
        Some("Push rule: commit message must mention an issue")
    );
    // HTML where JSON belongs.
    let gitlab = FakeGitlab::http(always(Reply {
        status: 200,
        content_type: "text/html",
        body: "<html>".into(),
        delay: Duration::ZERO,
        retry_after: None,
    }))
    .await;
    let e = client(dir.path(), &gitlab.url, "")
        .allowed(&push_context("user-1"), &repo, &changes())
        .await
        .unwrap_err();
    assert_eq!(
        e.gitaly_text(),
        "/allowed endpoint respond with unsupported content type: text/html"
    );
}

#[tokio::test]
async fn a_slow_gitlab_times_out_and_a_dead_one_is_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repository(dir.path());
    let gitlab = FakeGitlab::http(always(
        Reply::json(200, json!({"status": true})).delayed(Duration::from_secs(10)),
    ))
    .await;
    let client = client(
        dir.path(),
        &gitlab.url,
        "[http-settings]\nread_timeout = 1\n",
    );
    let started = Instant::now();
    let e = client
        .allowed(&push_context("user-1"), &repo, &changes())
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert!(
        matches!(e, ApiError::Timeout { after, .. } if after == Duration::from_secs(1)),
        "{e:?}"
    );
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert_eq!(e.gitaly_text(), "Internal API unreachable");
    assert!(!e.is_refusal());

    // A port nobody listens on: bind one, learn it, close it.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let e = crate::client(dir.path(), &format!("http://127.0.0.1:{port}"), "")
        .pre_receive("r", "project-1")
        .await
        .unwrap_err();
    assert!(
        matches!(e, ApiError::Unreachable { connect: true, .. }),
        "{e:?}"
    );
    assert_eq!(e.gitaly_text(), "Internal API unreachable");
}

#[tokio::test]
async fn pre_receive_post_receive_and_check() {
    let dir = tempfile::tempdir().unwrap();
    let gitlab = FakeGitlab::http(Arc::new(|r| match r.path.as_str() {
        "/api/v4/internal/pre_receive" => {
            Reply::json(200, json!({"reference_counter_increased": true}))
        }
        "/api/v4/internal/post_receive" => Reply::json(
            200,
            json!({"reference_counter_decreased": true, "messages": [
                {"message": "To create a merge request for main, visit:\n  http://gitlab/mr", "type": "basic"}
            ]}),
        ),
        "/api/v4/internal/check" => Reply::json(
            200,
            json!({"api_version": "v4", "gitlab_version": "17.5.0", "gitlab_rev": "abc123", "redis": true}),
        ),
        _ => Reply::json(404, json!({"message": "404 Not Found"})),
    }))
    .await;
    let client = client(dir.path(), &gitlab.url, "");
    assert!(client.pre_receive("id-1", "project-42").await.unwrap());
    let options = vec!["ci.skip".to_owned()];
    let answer = client
        .post_receive("id-2", "project-42", "user-7", &changes(), &options)
        .await
        .unwrap();
    assert!(answer.reference_counter_decreased);
    assert_eq!(answer.messages.len(), 1);
    assert_eq!(answer.messages[0].kind, "basic");
    let info = client.check("id-3").await.unwrap();
    assert_eq!(info.gitlab_version, "17.5.0");
    assert!(info.redis);

    let r = gitlab.requests();
    assert_eq!(r.len(), 3);
    assert_eq!(
        (r[0].method.as_str(), r[0].path.as_str()),
        ("POST", "/api/v4/internal/pre_receive")
    );
    assert_common(&r[0], "id-1");
    assert_eq!(r[0].json(), json!({"gl_repository": "project-42"}));
    assert_eq!(
        (r[1].method.as_str(), r[1].path.as_str()),
        ("POST", "/api/v4/internal/post_receive")
    );
    assert_common(&r[1], "id-2");
    assert_eq!(
        r[1].json(),
        json!({
            "gl_repository": "project-42",
            "identifier": "user-7",
            "changes": format!("{OLD} {NEW} refs/heads/main\n"),
            "push_options": ["ci.skip"],
        })
    );
    assert_eq!(
        (r[2].method.as_str(), r[2].path.as_str()),
        ("GET", "/api/v4/internal/check")
    );
    assert_common(&r[2], "id-3");
    assert!(r[2].body.is_empty());

    // Without push options, Gitaly sends null.
    client
        .post_receive("id-4", "project-42", "user-7", &changes(), &[])
        .await
        .unwrap();
    assert_eq!(
        gitlab.requests()[3].json()["push_options"],
        serde_json::Value::Null
    );
}

#[tokio::test]
async fn pre_receive_not_increased_and_odd_statuses() {
    let dir = tempfile::tempdir().unwrap();
    let gitlab = FakeGitlab::http(always(Reply::json(
        200,
        json!({"reference_counter_increased": false}),
    )))
    .await;
    assert!(
        !client(dir.path(), &gitlab.url, "")
            .pre_receive("r", "project-1")
            .await
            .unwrap()
    );
    let gitlab = FakeGitlab::http(always(Reply::json(201, json!({})))).await;
    let e = client(dir.path(), &gitlab.url, "")
        .pre_receive("r", "project-1")
        .await
        .unwrap_err();
    assert_eq!(e.gitaly_text(), "pre-receive call failed with status: 201");
}

#[tokio::test]
async fn unix_socket_with_a_relative_url_root() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repository(dir.path());
    let socket = dir.path().join("workhorse.socket");
    let gitlab = FakeGitlab::unix(&socket, always(Reply::json(200, json!({"status": true})))).await;
    // As omnibus writes it: the socket path %-encoded, the root on its own.
    let url = format!(
        "http+unix://{}",
        socket.to_str().unwrap().replace('/', "%2F")
    );
    let client = client(dir.path(), &url, "relative_url_root = \"/gitlab/\"\n");
    client
        .allowed(&push_context("user-1"), &repo, &changes())
        .await
        .unwrap();
    let r = gitlab.single();
    assert_eq!(r.path, "/gitlab/api/v4/internal/allowed");
    assert_common(&r, "corr-id-123");
    assert_eq!(r.header("host"), Some("unix"));
}

#[tokio::test]
async fn https_trusts_the_configured_ca_only() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = test_ca(dir.path());
    let gitlab = FakeGitlab::https(
        &cert,
        &key,
        always(Reply::json(200, json!({"status": true}))),
    )
    .await;
    let with_ca = client(
        dir.path(),
        &gitlab.url,
        &format!("[http-settings]\nca_file = {ca:?}\n"),
    );
    assert!(with_ca.pre_receive("r", "project-1").await.is_ok());
    gitlab.single().assert_jwt(SECRET.as_bytes());

    // The same through ca_path, a directory holding the CA.
    let ca_dir = dir.path().join("cas");
    std::fs::create_dir(&ca_dir).unwrap();
    std::fs::copy(&ca, ca_dir.join("test-ca.pem")).unwrap();
    std::fs::write(ca_dir.join("README"), "not a certificate").unwrap();
    let via_dir = client(
        dir.path(),
        &gitlab.url,
        &format!("[http-settings]\nca_path = {ca_dir:?}\n"),
    );
    assert!(via_dir.pre_receive("r", "project-1").await.is_ok());

    // Without it, the server's certificate is not trusted.
    let without = client(dir.path(), &gitlab.url, "");
    let e = without.pre_receive("r", "project-1").await.unwrap_err();
    assert!(
        matches!(&e, ApiError::Unreachable { detail, .. } if detail.contains("certificate")),
        "{e:?}"
    );
    assert_eq!(gitlab.requests().len(), 2);
}

#[tokio::test]
async fn a_request_id_that_is_no_header_is_refused_before_sending() {
    let dir = tempfile::tempdir().unwrap();
    let gitlab = FakeGitlab::http(always(Reply::json(200, json!({})))).await;
    let e = client(dir.path(), &gitlab.url, "")
        .pre_receive("bad\nid", "project-1")
        .await
        .unwrap_err();
    assert!(matches!(e, ApiError::Request { .. }), "{e:?}");
    assert!(gitlab.requests().is_empty());
}

#[tokio::test]
async fn the_secret_file_is_read_trimmed() {
    // The server checks the JWT against the bare secret; the file has a newline.
    let dir = tempfile::tempdir().unwrap();
    let gitlab = FakeGitlab::http(always(Reply::json(
        200,
        json!({"reference_counter_increased": true}),
    )))
    .await;
    let config = config(dir.path(), &gitlab.url, "");
    assert_eq!(config.secret.as_bytes(), SECRET.as_bytes());
    Client::new(&config, USER_AGENT)
        .unwrap()
        .pre_receive("r", "p")
        .await
        .unwrap();
    gitlab.single().assert_jwt(SECRET.as_bytes());
}
