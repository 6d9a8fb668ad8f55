//! The three hooks in Gitaly's order, against the loopback GitLab and real custom
//! hooks: what is called, in which order, with what, and what the pusher sees.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use refvote_gitlab::custom::Collect;
use refvote_gitlab::hooks::PostReceiveError;
use refvote_gitlab::{
    Change, Changes, CustomHooks, GitlabHooks, HookKind, HooksSettings, Refusal, RetryPolicy,
    Verdict,
};
use serde_json::json;

use crate::server::{FakeGitlab, Reply, always};
use crate::{NEW, OLD, client, push_context, repository, script};

fn changes() -> Changes {
    Changes::parse(
        format!("{OLD} {NEW} refs/heads/main\n{OLD} {NEW} refs/heads/topic\n").as_bytes(),
    )
    .unwrap()
}

fn gitlab_hooks(dir: &Path, url: Option<&str>, global: Option<PathBuf>) -> GitlabHooks {
    GitlabHooks::new(
        url.map(|u| client(dir, u, "")),
        CustomHooks::new(&HooksSettings {
            custom_hooks_dir: global,
            timeout_secs: 10,
        }),
        PathBuf::from("/usr/bin/git"),
    )
    .with_inherited_env(vec![("PATH".into(), "/usr/bin:/bin".into())])
}

const RECORD_ENV: &str = "env | sort > \"$GIT_DIR/$(basename \"$0\").env\"\n\
                          cat > \"$GIT_DIR/$(basename \"$0\").stdin\"\n";

fn recorded_env(repo: &Path, hook: &str) -> Vec<(String, String)> {
    std::fs::read_to_string(repo.join(format!("{hook}.env")))
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn var<'a>(env: &'a [(String, String)], key: &str) -> Option<&'a str> {
    env.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

#[tokio::test]
async fn pre_receive_is_allowed_then_custom_hooks_then_the_counter() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repository(dir.path());
    let marker = repo.join("pre-receive.stdin");
    let seen = marker.clone();
    // /allowed must come before the custom hook, /pre_receive after it.
    let gitlab = FakeGitlab::http(Arc::new(move |r| match r.path.as_str() {
        "/api/v4/internal/allowed" if !seen.exists() => Reply::json(200, json!({"status": true})),
        "/api/v4/internal/pre_receive" if seen.exists() => {
            Reply::json(200, json!({"reference_counter_increased": true}))
        }
        _ => Reply::json(400, json!({"message": format!("out of order: {}", r.path)})),
    }))
    .await;
    script(
        &repo.join("custom_hooks/pre-receive"),
        &format!("{RECORD_ENV}echo 'custom hook says hi'\n"),
    );
    let hooks = gitlab_hooks(dir.path(), Some(&gitlab.url), None);
    let mut context = push_context("user-7");
    context.push_options = vec!["ci.skip".into(), "mr.create".into()];
    let mut sink = Collect::default();
    hooks
        .pre_receive(&context, &repo, &changes(), &mut sink)
        .await
        .unwrap();
    assert_eq!(sink.stdout, b"custom hook says hi\n");
    let paths: Vec<String> = gitlab.requests().into_iter().map(|r| r.path).collect();
    assert_eq!(
        paths,
        ["/api/v4/internal/allowed", "/api/v4/internal/pre_receive"]
    );
    assert_eq!(
        std::fs::read_to_string(&marker).unwrap(),
        changes().as_str()
    );
    let env = recorded_env(&repo, "pre-receive");
    assert_eq!(var(&env, "GL_ID"), Some("user-7"));
    assert_eq!(var(&env, "GL_USERNAME"), Some("jane"));
    assert_eq!(var(&env, "GL_REPOSITORY"), Some("project-42"));
    assert_eq!(var(&env, "GL_PROJECT_PATH"), Some("group/project"));
    assert_eq!(var(&env, "GL_PROTOCOL"), Some("http"));
    assert_eq!(var(&env, "GIT_DIR"), repo.to_str());
    assert_eq!(var(&env, "GIT_PUSH_OPTION_COUNT"), Some("2"));
    assert_eq!(var(&env, "GIT_PUSH_OPTION_1"), Some("mr.create"));
    assert_eq!(var(&env, "PATH"), Some("/usr/bin:/usr/bin:/bin"));
}

#[tokio::test]
async fn a_denied_push_runs_no_custom_hook_and_no_counter() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repository(dir.path());
    let gitlab = FakeGitlab::http(always(Reply::json(
        401,
        json!({"status": false, "message": "You are not allowed to push code to protected branches on this project."}),
    )))
    .await;
    script(&repo.join("custom_hooks/pre-receive"), RECORD_ENV);
    let hooks = gitlab_hooks(dir.path(), Some(&gitlab.url), None);
    let mut sink = Collect::default();
    let refusal = hooks
        .pre_receive(&push_context("key-3"), &repo, &changes(), &mut sink)
        .await
        .unwrap_err();
    assert_eq!(
        refusal,
        Refusal::AccessCheck {
            message: "You are not allowed to push code to protected branches on this project."
                .into(),
            user_id: "key-3".into(),
            protocol: "http".into(),
            changes: changes().as_str().into(),
        }
    );
    assert_eq!(
        refusal.hook_stderr(),
        "GitLab: You are not allowed to push code to protected branches on this project."
    );
    assert_eq!(gitlab.single().path, "/api/v4/internal/allowed");
    assert!(!repo.join("pre-receive.stdin").exists());
    assert!(matches!(Verdict::from(Err(refusal)), Verdict::Deny { .. }));
}

#[tokio::test]
async fn gitlab_down_refuses_with_gitalys_words() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repository(dir.path());
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let hooks = gitlab_hooks(dir.path(), Some(&format!("http://127.0.0.1:{port}")), None);
    let mut sink = Collect::default();
    let refusal = hooks
        .pre_receive(&push_context("user-1"), &repo, &changes(), &mut sink)
        .await
        .unwrap_err();
    assert_eq!(refusal.hook_stderr(), "GitLab: Internal API unreachable");
}

#[tokio::test]
async fn a_custom_hook_that_exits_1_refuses_and_the_counter_is_not_touched() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repository(dir.path());
    let global = dir.path().join("global-hooks");
    let gitlab = FakeGitlab::http(always(Reply::json(200, json!({"status": true})))).await;
    script(
        &global.join("pre-receive.d/policy"),
        "echo 'GL-HOOK-ERR: main is frozen until Monday' >&2\nexit 1\n",
    );
    let hooks = gitlab_hooks(dir.path(), Some(&gitlab.url), Some(global));
    let mut sink = Collect::default();
    let refusal = hooks
        .pre_receive(&push_context("user-1"), &repo, &changes(), &mut sink)
        .await
        .unwrap_err();
    let Refusal::CustomHook {
        hook,
        exit_code,
        stderr,
        message,
        note,
        ..
    } = &refusal
    else {
        panic!("{refusal:?}");
    };
    assert_eq!(*hook, HookKind::PreReceive);
    assert_eq!(*exit_code, 1);
    assert_eq!(stderr, "GL-HOOK-ERR: main is frozen until Monday\n");
    assert_eq!(message, "GL-HOOK-ERR: main is frozen until Monday\n");
    assert_eq!(*note, None);
    // The pusher already saw the hook's own words, streamed.
    assert_eq!(sink.stderr, b"GL-HOOK-ERR: main is frozen until Monday\n");
    assert_eq!(refusal.hook_stderr(), "");
    assert_eq!(
        refusal.replayed_stderr(),
        "GL-HOOK-ERR: main is frozen until Monday\n"
    );
    assert_eq!(gitlab.single().path, "/api/v4/internal/allowed");
}

#[tokio::test]
async fn a_counter_that_does_not_go_up_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repository(dir.path());
    let gitlab = FakeGitlab::http(Arc::new(|r| match r.path.as_str() {
        "/api/v4/internal/allowed" => Reply::json(200, json!({"status": true})),
        _ => Reply::json(200, json!({"reference_counter_increased": false})),
    }))
    .await;
    let hooks = gitlab_hooks(dir.path(), Some(&gitlab.url), None);
    let mut sink = Collect::default();
    let refusal = hooks
        .pre_receive(&push_context("user-1"), &repo, &changes(), &mut sink)
        .await
        .unwrap_err();
    assert!(
        matches!(&refusal, Refusal::Internal { message } if message.contains("reference counter")),
        "{refusal:?}"
    );
    assert_eq!(gitlab.requests().len(), 2);
}

#[tokio::test]
async fn update_hooks_run_once_per_ref_with_its_arguments() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repository(dir.path());
    script(
        &repo.join("custom_hooks/update"),
        "echo \"$1 $2 $3\" >> \"$GIT_DIR/update.args\"\n\
         [ \"$1\" = refs/heads/topic ] && { echo 'topic is closed' >&2; exit 3; }\n\
         [ -z \"$GIT_PUSH_OPTION_COUNT\" ] || exit 9\nexit 0\n",
    );
    let hooks = gitlab_hooks(dir.path(), None, None);
    let mut context = push_context("user-1");
    context.push_options = vec!["ci.skip".into()];
    let main = Change::new(OLD, NEW, "refs/heads/main").unwrap();
    let topic = Change::new(OLD, NEW, "refs/heads/topic").unwrap();
    let mut sink = Collect::default();
    hooks
        .update(&context, &repo, &main, &mut sink)
        .await
        .unwrap();
    let refusal = hooks
        .update(&context, &repo, &topic, &mut sink)
        .await
        .unwrap_err();
    assert_eq!(refusal.exit_code(), 3);
    assert!(
        matches!(&refusal, Refusal::CustomHook { hook: HookKind::Update, message, .. } if message == "topic is closed\n"),
        "{refusal:?}"
    );
    assert_eq!(
        std::fs::read_to_string(repo.join("update.args")).unwrap(),
        format!("refs/heads/main {OLD} {NEW}\nrefs/heads/topic {OLD} {NEW}\n")
    );
}

#[tokio::test]
async fn without_gitlab_only_custom_hooks_run() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repository(dir.path());
    script(&repo.join("custom_hooks/pre-receive"), RECORD_ENV);
    script(&repo.join("custom_hooks/post-receive"), RECORD_ENV);
    let hooks = gitlab_hooks(dir.path(), None, None);
    let mut sink = Collect::default();
    hooks
        .pre_receive(&push_context("user-1"), &repo, &changes(), &mut sink)
        .await
        .unwrap();
    let outcome = hooks
        .post_receive(&push_context("user-1"), &repo, &changes(), &mut sink)
        .await
        .unwrap();
    assert_eq!(outcome.messages, "");
    assert!(repo.join("pre-receive.stdin").exists());
    assert_eq!(
        std::fs::read_to_string(repo.join("post-receive.stdin")).unwrap(),
        changes().as_str()
    );
}

#[tokio::test]
async fn post_receive_prints_gitlabs_messages_then_runs_custom_hooks() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repository(dir.path());
    let gitlab = FakeGitlab::http(always(Reply::json(
        200,
        json!({"reference_counter_decreased": true, "messages": [
            {"message": "View merge request for topic:\n  http://gitlab/g/p/-/merge_requests/1", "type": "basic"},
            {"message": "The project was moved", "type": "alert"},
        ]}),
    )))
    .await;
    script(
        &repo.join("custom_hooks/post-receive"),
        &format!("{RECORD_ENV}echo 'post hook'\n"),
    );
    let hooks = gitlab_hooks(dir.path(), Some(&gitlab.url), None);
    let mut context = push_context("user-7");
    context.push_options = vec!["ci.skip".into()];
    let mut sink = Collect::default();
    let outcome = hooks
        .post_receive(&context, &repo, &changes(), &mut sink)
        .await
        .unwrap();
    let rule = "=".repeat(72);
    let expected = format!(
        "\nView merge request for topic:\n  http://gitlab/g/p/-/merge_requests/1\n\n\
         \n{rule}\n\n{}The project was moved\n\n{rule}\n\n",
        " ".repeat(25)
    );
    assert_eq!(outcome.messages, expected);
    assert_eq!(
        String::from_utf8(sink.stdout).unwrap(),
        format!("{expected}post hook\n")
    );
    let r = gitlab.single();
    assert_eq!(r.path, "/api/v4/internal/post_receive");
    assert_eq!(
        r.json(),
        json!({
            "gl_repository": "project-42",
            "identifier": "user-7",
            "changes": changes().as_str(),
            "push_options": ["ci.skip"],
        })
    );
    let env = recorded_env(&repo, "post-receive");
    assert_eq!(var(&env, "GIT_PUSH_OPTION_0"), Some("ci.skip"));
    assert_eq!(var(&env, "GL_ID"), Some("user-7"));
}

#[tokio::test]
async fn post_receive_not_decreased_skips_custom_hooks() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repository(dir.path());
    let gitlab = FakeGitlab::http(always(Reply::json(
        200,
        json!({"reference_counter_decreased": false, "messages": []}),
    )))
    .await;
    script(&repo.join("custom_hooks/post-receive"), RECORD_ENV);
    let hooks = gitlab_hooks(dir.path(), Some(&gitlab.url), None);
    let mut sink = Collect::default();
    let e = hooks
        .post_receive(&push_context("user-1"), &repo, &changes(), &mut sink)
        .await
        .unwrap_err();
    assert!(matches!(e, PostReceiveError::NotDecreased), "{e:?}");
    assert!(!repo.join("post-receive.stdin").exists());
}

#[tokio::test]
async fn post_receive_retries_what_gitlab_cannot_have_run() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repository(dir.path());
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    // A gateway error first, then success.
    let gitlab = FakeGitlab::http(Arc::new(move |_| {
        if counter.fetch_add(1, Ordering::SeqCst) == 0 {
            Reply::json(502, json!({"message": "502 Bad Gateway"}))
        } else {
            Reply::json(
                200,
                json!({"reference_counter_decreased": true, "messages": [{"message": "ok", "type": "basic"}]}),
            )
        }
    }))
    .await;
    let hooks = gitlab_hooks(dir.path(), Some(&gitlab.url), None);
    let policy = RetryPolicy {
        attempts: 3,
        backoff: Duration::from_millis(10),
        max_wait: Duration::from_secs(5),
    };
    let mut sink = Collect::default();
    let (result, attempts) = hooks
        .post_receive_with_retries(
            &push_context("user-1"),
            &repo,
            &changes(),
            &mut sink,
            policy,
        )
        .await;
    assert_eq!(result.unwrap().messages, "\nok\n\n");
    assert_eq!(attempts, 2);
    assert_eq!(gitlab.requests().len(), 2);
    // Messages reach the pusher once.
    assert_eq!(sink.stdout, b"\nok\n\n");

    // A 500 may have run GitLab's work: not repeated.
    let gitlab = FakeGitlab::http(always(Reply::json(500, json!({"message": "boom"})))).await;
    let hooks = gitlab_hooks(dir.path(), Some(&gitlab.url), None);
    let (result, attempts) = hooks
        .post_receive_with_retries(
            &push_context("user-1"),
            &repo,
            &changes(),
            &mut sink,
            policy,
        )
        .await;
    let e = result.unwrap_err();
    assert_eq!(attempts, 1);
    assert_eq!(
        e.to_string(),
        "GitLab: http post to gitlab api /post_receive endpoint: boom"
    );
    assert_eq!(gitlab.requests().len(), 1);

    // GitLab down: bounded attempts.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let hooks = gitlab_hooks(dir.path(), Some(&format!("http://127.0.0.1:{port}")), None);
    let (result, attempts) = hooks
        .post_receive_with_retries(
            &push_context("user-1"),
            &repo,
            &changes(),
            &mut sink,
            policy,
        )
        .await;
    assert!(result.unwrap_err().is_transient());
    assert_eq!(attempts, 3);
}

#[tokio::test]
async fn a_throttled_or_failing_access_check_refuses_once_with_gitalys_text() {
    // Gitaly calls /allowed once and refuses with its client's text, whatever the
    // status: no retry on 429 (even with Retry-After) nor on a 5xx; no custom hook,
    // no /pre_receive.
    let dir = tempfile::tempdir().unwrap();
    let repo = repository(dir.path());
    script(&repo.join("custom_hooks/pre-receive"), RECORD_ENV);
    let rails_limiter = json!({"message": {"error": "This endpoint has been requested too many times. Try again later."}});
    for (reply, shown) in [
        (Reply::throttled("1"), "GitLab: Internal API error (429)"),
        (
            Reply::throttled("Sun, 06 Nov 1994 08:49:37 GMT"),
            "GitLab: Internal API error (429)",
        ),
        (
            Reply::json(429, rails_limiter),
            "GitLab: Internal API error (429)",
        ),
        (
            Reply::json(429, json!({"message": "Too many pushes, wait a minute"})),
            "GitLab: Too many pushes, wait a minute",
        ),
        (
            Reply::json(500, json!({"message": "500 Internal Server Error"})),
            "GitLab: 500 Internal Server Error",
        ),
        (
            Reply {
                status: 502,
                content_type: "text/html",
                body: "<html><body><h1>502 Bad Gateway</h1></body></html>".into(),
                delay: Duration::ZERO,
                retry_after: None,
            },
            "GitLab: Internal API error (502)",
        ),
    ] {
        let gitlab = FakeGitlab::http(always(reply.clone())).await;
        let hooks = gitlab_hooks(dir.path(), Some(&gitlab.url), None);
        let mut sink = Collect::default();
        let refusal = hooks
            .pre_receive(&push_context("user-7"), &repo, &changes(), &mut sink)
            .await
            .unwrap_err();
        assert_eq!(refusal.hook_stderr(), shown, "{reply:?}");
        let Refusal::AccessCheck {
            message, user_id, ..
        } = &refusal
        else {
            panic!("{refusal:?}")
        };
        assert_eq!(Some(message.as_str()), shown.strip_prefix("GitLab: "));
        assert_eq!(user_id, "user-7");
        assert_eq!(
            gitlab.single().path,
            "/api/v4/internal/allowed",
            "{reply:?}"
        );
        assert!(!repo.join("pre-receive.stdin").exists());
        assert!(sink.stdout.is_empty() && sink.stderr.is_empty());
    }
}

#[tokio::test]
async fn a_throttled_counter_refuses_with_gitalys_words() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repository(dir.path());
    let gitlab = FakeGitlab::http(Arc::new(|r| match r.path.as_str() {
        "/api/v4/internal/allowed" => Reply::json(200, json!({"status": true})),
        _ => Reply::throttled("5"),
    }))
    .await;
    let hooks = gitlab_hooks(dir.path(), Some(&gitlab.url), None);
    let mut sink = Collect::default();
    let refusal = hooks
        .pre_receive(&push_context("user-7"), &repo, &changes(), &mut sink)
        .await
        .unwrap_err();
    assert_eq!(
        refusal,
        Refusal::Internal {
            message: "calling pre_receive endpoint: http post to gitlab api /pre_receive endpoint: Internal API error (429)".into()
        }
    );
    // Not repeated: a second /pre_receive could count the push in twice.
    assert_eq!(gitlab.requests().len(), 2);
}

#[tokio::test]
async fn post_receive_throttled_waits_for_retry_after_within_the_bound() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repository(dir.path());
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    // Throttled once (come back in 1 s), then served.
    let gitlab = FakeGitlab::http(Arc::new(move |_| {
        if counter.fetch_add(1, Ordering::SeqCst) == 0 {
            Reply::throttled("1")
        } else {
            Reply::json(
                200,
                json!({"reference_counter_decreased": true, "messages": [{"message": "ok", "type": "basic"}]}),
            )
        }
    }))
    .await;
    let hooks = gitlab_hooks(dir.path(), Some(&gitlab.url), None);
    let policy = RetryPolicy {
        attempts: 3,
        backoff: Duration::from_millis(10),
        max_wait: Duration::from_secs(5),
    };
    let mut sink = Collect::default();
    let started = std::time::Instant::now();
    let (result, attempts) = hooks
        .post_receive_with_retries(
            &push_context("user-1"),
            &repo,
            &changes(),
            &mut sink,
            policy,
        )
        .await;
    let took = started.elapsed();
    assert_eq!(result.unwrap().messages, "\nok\n\n");
    assert_eq!(attempts, 2);
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(4),
        "waited {took:?}, not Retry-After's 1 s"
    );
    assert_eq!(gitlab.requests().len(), 2);

    // Throttled without Retry-After: the backoff, then the bound of calls.
    let gitlab =
        FakeGitlab::http(always(Reply::json(429, json!({"message": "Retry later"})))).await;
    let hooks = gitlab_hooks(dir.path(), Some(&gitlab.url), None);
    let (result, attempts) = hooks
        .post_receive_with_retries(
            &push_context("user-1"),
            &repo,
            &changes(),
            &mut sink,
            policy,
        )
        .await;
    assert_eq!(
        result.unwrap_err().to_string(),
        "GitLab: http post to gitlab api /post_receive endpoint: Retry later"
    );
    assert_eq!((attempts, gitlab.requests().len()), (3, 3));
    // The pusher reads the last failure once, as Gitaly's hook prints it.
    assert_eq!(
        String::from_utf8_lossy(&sink.stderr),
        "GitLab: http post to gitlab api /post_receive endpoint: Retry later\n"
    );

    // Asked to come back later than the bound: one call, no wait.
    let gitlab = FakeGitlab::http(always(Reply::throttled("60"))).await;
    let hooks = gitlab_hooks(dir.path(), Some(&gitlab.url), None);
    let started = std::time::Instant::now();
    let (result, attempts) = hooks
        .post_receive_with_retries(
            &push_context("user-1"),
            &repo,
            &changes(),
            &mut sink,
            policy,
        )
        .await;
    let e = result.unwrap_err();
    assert_eq!(e.retry_after(), Some(Duration::from_secs(60)));
    assert_eq!((attempts, gitlab.requests().len()), (1, 1));
    assert!(started.elapsed() < Duration::from_secs(2));
}
