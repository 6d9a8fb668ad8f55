//! The custom hooks runner with real executables: output, exit codes, stdin, the
//! deadline, and that nothing a hook started outlives the run.

use std::path::Path;
use std::time::{Duration, Instant};

use refvote_gitlab::custom::{Collect, CustomHookError, HookExit, Invocation, hook_env};
use refvote_gitlab::{CustomHooks, HookKind, HooksSettings};

use crate::{push_context, repository, script};

fn hooks(timeout_secs: u64) -> CustomHooks {
    CustomHooks::new(&HooksSettings {
        custom_hooks_dir: None,
        timeout_secs,
    })
}

fn invocation<'a>(repo: &'a Path, stdin: &'a [u8]) -> Invocation<'a> {
    Invocation {
        kind: HookKind::PreReceive,
        repo_path: repo,
        args: Vec::new(),
        stdin,
        env: hook_env(
            &push_context("user-1"),
            repo,
            std::env::vars_os(),
            Path::new("git"),
        ),
    }
}

/// Whether `pid` is a live process (a zombie counts as dead).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat.rsplit(')').next().unwrap_or("").trim_start();
            !state.starts_with('Z')
        }
        Err(_) => false,
    }
}

/// Waits (bounded) until `pid` is gone.
async fn gone(pid: u32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if !alive(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// Waits (bounded) for a pid a hook wrote into `file`.
async fn pid_in(file: &Path) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(text) = std::fs::read_to_string(file)
            && let Ok(pid) = text.trim().parse()
        {
            return pid;
        }
        assert!(Instant::now() < deadline, "no pid in {}", file.display());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_hook_that_succeeds_streams_its_output() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repository(dir.path());
    script(
        &repo.join("custom_hooks/pre-receive"),
        "cat > \"$GIT_DIR/stdin.seen\"\npwd > \"$GIT_DIR/cwd.seen\"\necho to-stdout\necho to-stderr >&2\necho more-stdout\n",
    );
    let mut sink = Collect::default();
    hooks(10)
        .run(&invocation(&repo, b"the changes\n"), &mut sink)
        .await
        .unwrap();
    assert_eq!(sink.stdout, b"to-stdout\nmore-stdout\n");
    assert_eq!(sink.stderr, b"to-stderr\n");
    assert_eq!(
        std::fs::read(repo.join("stdin.seen")).unwrap(),
        b"the changes\n"
    );
    assert_eq!(
        std::fs::read_to_string(repo.join("cwd.seen"))
            .unwrap()
            .trim(),
        repo.to_str().unwrap()
    );
}

#[tokio::test]
async fn a_hook_that_exits_1_refuses_with_its_message_and_stops_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repository(dir.path());
    let own = repo.join("custom_hooks/pre-receive.d");
    script(&own.join("10-ok"), "echo first ran\n");
    script(
        &own.join("20-refuse"),
        "echo 'checking policy'\necho 'GL-HOOK-ERR: pushes to main are frozen' >&2\nexit 1\n",
    );
    script(&own.join("30-never"), "touch \"$GIT_DIR/third.ran\"\n");
    let mut sink = Collect::default();
    let e = hooks(10)
        .run(&invocation(&repo, b"x\n"), &mut sink)
        .await
        .unwrap_err();
    match &e {
        CustomHookError::Failed {
            hook,
            exit,
            stdout,
            stderr,
            kind,
        } => {
            assert_eq!(hook, &own.join("20-refuse"));
            assert_eq!(*exit, HookExit::Code(1));
            assert_eq!(*kind, HookKind::PreReceive);
            assert_eq!(stdout, b"checking policy\n");
            assert_eq!(stderr, b"GL-HOOK-ERR: pushes to main are frozen\n");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(e.exit_code(), 1);
    assert_eq!(e.message(), "GL-HOOK-ERR: pushes to main are frozen\n");
    assert_eq!(sink.stdout, b"first ran\nchecking policy\n");
    assert!(!repo.join("third.ran").exists());
}

#[tokio::test]
async fn a_hook_that_runs_too_long_is_killed_with_its_children() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repository(dir.path());
    script(
        &repo.join("custom_hooks/pre-receive"),
        "echo starting\nsleep 60 &\necho $! > \"$GIT_DIR/child.pid\"\nwait\n",
    );
    let started = Instant::now();
    let mut sink = Collect::default();
    let e = hooks(1)
        .run(&invocation(&repo, b"x\n"), &mut sink)
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(4),
        "{took:?}"
    );
    match &e {
        CustomHookError::TimedOut { after, stdout, .. } => {
            assert_eq!(*after, Duration::from_secs(1));
            assert_eq!(stdout, b"starting\n");
        }
        other => panic!("{other:?}"),
    }
    assert!(e.to_string().contains("hooks.timeout_secs"), "{e}");
    let child = pid_in(&repo.join("child.pid")).await;
    assert!(gone(child).await, "the hook's child {child} outlived it");
}

#[tokio::test]
async fn dropping_a_run_kills_the_hook() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repository(dir.path());
    script(
        &repo.join("custom_hooks/pre-receive"),
        "echo $$ > \"$GIT_DIR/hook.pid\"\nsleep 60\n",
    );
    let hooks = hooks(60);
    let pid_file = repo.join("hook.pid");
    let run = async {
        let mut sink = Collect::default();
        hooks.run(&invocation(&repo, b"x\n"), &mut sink).await
    };
    // Give the run until the hook has written its pid, then drop it.
    let pid = tokio::select! {
        r = run => panic!("the hook cannot finish: {r:?}"),
        pid = pid_in(&pid_file) => pid,
    };
    assert!(gone(pid).await, "hook {pid} outlived its dropped run");
}

#[tokio::test]
async fn a_hook_that_exits_but_leaves_a_child_holding_its_output() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repository(dir.path());
    script(
        &repo.join("custom_hooks/pre-receive"),
        "sleep 60 &\necho $! > \"$GIT_DIR/child.pid\"\necho done\nexit 0\n",
    );
    let started = Instant::now();
    let mut sink = Collect::default();
    hooks(30)
        .run(&invocation(&repo, b"x\n"), &mut sink)
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(sink.stdout, b"done\n");
    let child = pid_in(&repo.join("child.pid")).await;
    assert!(
        gone(child).await,
        "the leftover child {child} was not stopped"
    );
}

#[tokio::test]
async fn a_hook_that_ignores_a_large_stdin_is_fine() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repository(dir.path());
    script(&repo.join("custom_hooks/pre-receive"), "exit 0\n");
    let stdin = vec![b'x'; 4 << 20];
    let mut sink = Collect::default();
    hooks(10)
        .run(&invocation(&repo, &stdin), &mut sink)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_hook_killed_by_a_signal_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repository(dir.path());
    script(&repo.join("custom_hooks/pre-receive"), "kill -TERM $$\n");
    let mut sink = Collect::default();
    let e = hooks(10)
        .run(&invocation(&repo, b"x\n"), &mut sink)
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            CustomHookError::Failed {
                exit: HookExit::Signal(15),
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(e.exit_code(), 1);
}

#[tokio::test]
async fn a_hook_that_cannot_start_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repository(dir.path());
    let hook = repo.join("custom_hooks/pre-receive");
    std::fs::create_dir_all(hook.parent().unwrap()).unwrap();
    // Executable, but no interpreter line and not a binary.
    std::fs::write(&hook, [0x7f, b'E', b'L', b'F', 0, 0]).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let mut sink = Collect::default();
    let e = hooks(10)
        .run(&invocation(&repo, b"x\n"), &mut sink)
        .await
        .unwrap_err();
    assert!(matches!(e, CustomHookError::Spawn { .. }), "{e:?}");
}
