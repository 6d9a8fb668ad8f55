//! `votingctl cluster` and plain git over the router's HTTP port, against clusters
//! started exactly as a person starts one (`votingctl cluster up`): real etcd, real
//! votingd nodes, a real router, real `git` and `curl` as the clients.
//!
//! - the cluster's life: `cluster.env` keys present and usable from a shell, pid files
//!   naming live processes that outlive votingctl, one member stopped and started with
//!   its data, `up` again on a running cluster, `down` leaving no process (and again,
//!   idempotent); a 3-member etcd losing and regaining one member;
//! - git over HTTP: create on first push (and, with `create_on_push = false`, a clear
//!   refusal), clone, fetch, a multi-MiB push, several branches and an annotated tag in
//!   one push, a branch deletion, a gzip-encoded upload-pack request and a broken one,
//!   404 for an unknown repository, 400/405 for requests that are not smart HTTP;
//! - 16 concurrent `git push` clients creating and filling one new repository, then a
//!   push with two of three nodes stopped rejected with the reason in git's own output
//!   (503 for a client that asks for no report), reads going on from the survivor, 503
//!   with the reason when no node is left, and pushes working again once they are back;
//! - a member that fails to start named with its log, and nothing left running.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use refvote_launcher::alive;
use refvote_tests::git::{self, WorkRepo, rev};
use refvote_tests::local::{LocalCluster, git_in};

fn text_of(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn push(work: &Path, url: &str, args: &[&str]) -> anyhow::Result<Output> {
    let mut all = vec!["push", url];
    all.extend(args);
    git_in(work, &all)
}

fn ok(out: Output) -> anyhow::Result<Output> {
    anyhow::ensure!(out.status.success(), "{}", text_of(&out));
    Ok(out)
}

/// Every node's value of `refname` in `relative`, in node order.
fn replicas(c: &LocalCluster, relative: &str, refname: &str) -> Vec<Option<String>> {
    c.var("NODES")
        .split(' ')
        .map(|n| rev(&c.replica(n, relative), refname))
        .collect()
}

/// `curl` with the status code on the last line of stdout.
fn curl(args: &[&str]) -> anyhow::Result<(u16, String)> {
    let out = Command::new("curl")
        .args(["-s", "-S", "--max-time", "30", "-w", "\n%{http_code}"])
        .args(args)
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    Ok((code.trim().parse()?, body.to_owned()))
}

#[test]
fn cluster_up_stop_start_down() -> anyhow::Result<()> {
    let c = LocalCluster::up(&[])?;
    // Every key DESIGN.md §7 names, with values a client can use.
    assert_eq!(c.var("NODES"), "node1 node2 node3");
    for key in ["ROUTER_ADDR", "NODE1_ADDR", "NODE2_ADDR", "NODE3_ADDR"] {
        let addr: std::net::SocketAddr = c.var(key).parse()?;
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    }
    assert!(c.var("ROUTER_HTTP").starts_with("http://"));
    let (code, _) = curl(&[&format!("{}/", c.var("ROUTER_HTTP"))])?;
    assert_eq!(code, 404, "the HTTP port answers");
    let endpoints = c.var("ETCD_ENDPOINTS");
    assert!(endpoints.starts_with("http://") && !endpoints.contains(','));
    // The file is valid shell, and gives the same values.
    let out = ok(Command::new("bash")
        .arg("-c")
        .arg(format!(
            ". {}/cluster.env && echo \"$NODES|$ROUTER_HTTP|$ETCD_ENDPOINTS\"",
            c.dir.display()
        ))
        .output()?)?;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!(
            "node1 node2 node3|{}|{}",
            c.var("ROUTER_HTTP"),
            c.var("ETCD_ENDPOINTS")
        )
    );
    // A pid file per process, each naming a live process that outlived votingctl.
    let names = ["etcd", "node1", "node2", "node3", "router"];
    for name in names {
        let pid = c.pid_file(name).unwrap_or_else(|| panic!("{name}.pid"));
        assert!(alive(pid), "{name} (pid {pid}) runs");
    }
    // Every node is healthy by its own account.
    let status = c.votingctl(&["status", "--config", c.var("NODE2_CONFIG")])?;
    assert!(status.status.success(), "{}", text_of(&status));

    // One node stopped: its process is gone, the others are untouched.
    let node2 = c.pid_file("node2").expect("node2.pid");
    let said = c.stop("node2")?;
    assert!(said.contains("node2 stopped"), "{said}");
    assert!(!alive(node2));
    assert_eq!(c.pid_file("node2"), None);
    let status = c.votingctl(&["status", "--config", c.var("NODE2_CONFIG")])?;
    assert!(!status.status.success(), "{}", text_of(&status));
    assert!(alive(c.pid_file("node1").expect("node1.pid")));
    // Stopping it again is not an error.
    c.stop("node2")?;
    // Started again with its config and data: same address, healthy.
    c.start("node2")?;
    let again = c.pid_file("node2").expect("node2.pid");
    assert!(alive(again) && again != node2);
    let status = c.votingctl(&["status", "--config", c.var("NODE2_CONFIG")])?;
    assert!(status.status.success(), "{}", text_of(&status));
    // The router too.
    c.stop("router")?;
    assert!(std::net::TcpStream::connect(c.var("ROUTER_ADDR")).is_err());
    c.start("router")?;
    std::net::TcpStream::connect(c.var("ROUTER_ADDR"))?;
    // An unknown member is refused with the names that exist.
    let out = c.votingctl(&["cluster", "stop", "--dir", c.dir.to_str().unwrap(), "node9"])?;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("node1, node2, node3"),
        "{}",
        text_of(&out)
    );
    // `up` on a running cluster starts nothing new.
    let out = ok(c.votingctl(&["cluster", "up", "--dir", c.dir.to_str().unwrap()])?)?;
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("node1 is already running"),
        "{}",
        text_of(&out)
    );

    // Down: every process the cluster ever had is gone, and the pid files with them.
    let said = c.down()?;
    assert!(
        said.contains("router stopped") && said.contains("etcd stopped"),
        "{said}"
    );
    for (name, pid) in c.seen_pids() {
        assert!(!alive(pid), "{name} (pid {pid}) still runs after down");
    }
    for name in names {
        assert_eq!(c.pid_file(name), None, "{name}.pid is gone");
    }
    assert_eq!(processes_naming(&c.dir), Vec::<u32>::new());
    // Idempotent.
    c.down()?;

    // `up` on a stopped cluster brings every member back with its data.
    let out = ok(c.votingctl(&["cluster", "up", "--dir", c.dir.to_str().unwrap()])?)?;
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("starting its stopped members"),
        "{}",
        text_of(&out)
    );
    for name in names {
        assert!(alive(c.pid_file(name).expect("pid file")), "{name}");
    }
    let status = c.votingctl(&["status", "--config", c.var("NODE3_CONFIG")])?;
    assert!(status.status.success(), "{}", text_of(&status));
    Ok(())
}

/// A directory holding a fake program named like a real one, first on PATH.
fn fake_path(dir: &Path, name: &str, script: &str) -> anyhow::Result<String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{script}\n"))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok(format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    ))
}

#[test]
fn a_member_that_fails_to_start_is_named_with_its_log_and_nothing_is_left() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let votingctl = refvote_tests::node::bin("votingctl");
    // An etcd that dies at once.
    let path = fake_path(
        &tmp.path().join("bin1"),
        "etcd",
        "echo 'etcd: bad flag' >&2; exit 3",
    )?;
    let dir = tmp.path().join("c1");
    let out = Command::new(&votingctl)
        .args([
            "cluster",
            "up",
            "--dir",
            dir.to_str().unwrap(),
            "--host",
            "127.0.0.1",
        ])
        .env("PATH", &path)
        .output()?;
    assert!(!out.status.success(), "{}", text_of(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("etcd exited at start-up"), "{err}");
    assert!(
        err.contains(&format!("{}/logs/etcd.log", dir.canonicalize()?.display())),
        "{err}"
    );
    assert!(
        err.contains("etcd: bad flag"),
        "the log's tail is shown: {err}"
    );

    // A directory that holds something else is left alone.
    let busy = tmp.path().join("busy");
    std::fs::create_dir_all(&busy)?;
    std::fs::write(busy.join("notes.txt"), "mine")?;
    let out = Command::new(&votingctl)
        .args(["cluster", "up", "--dir", busy.to_str().unwrap()])
        .output()?;
    assert!(!out.status.success(), "{}", text_of(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not empty and holds no cluster"),
        "{}",
        text_of(&out)
    );
    assert_eq!(std::fs::read_dir(&busy)?.count(), 1);

    // An etcd that never becomes healthy: bounded by --timeout, then stopped.
    let path = fake_path(&tmp.path().join("bin2"), "etcd", "sleep 600")?;
    let dir = tmp.path().join("c2");
    let started = Instant::now();
    let out = Command::new(&votingctl)
        .args([
            "cluster",
            "up",
            "--dir",
            dir.to_str().unwrap(),
            "--timeout",
            "2",
        ])
        .env("PATH", &path)
        .output()?;
    assert!(!out.status.success(), "{}", text_of(&out));
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("etcd did not become healthy within 2s"),
        "{err}"
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("stopping what was started: etcd"), "{said}");
    assert!(said.contains("etcd stopped"), "{said}");
    assert!(!dir.join("etcd.pid").exists());
    assert_eq!(processes_naming(&dir.canonicalize()?), Vec::<u32>::new());
    Ok(())
}

/// Live processes whose command line names `dir`.
fn processes_naming(dir: &Path) -> Vec<u32> {
    let dir = format!("{}/", dir.display());
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            alive(pid) && String::from_utf8_lossy(&cmdline).contains(&dir)
        })
        .collect()
}

#[test]
fn a_three_member_etcd_survives_losing_one() -> anyhow::Result<()> {
    let c = LocalCluster::up(&["--nodes", "1", "--etcd-members", "3"])?;
    assert_eq!(c.var("NODES"), "node1");
    assert_eq!(c.var("ETCD_MEMBERS"), "etcd1 etcd2 etcd3");
    assert_eq!(c.var("ETCD_ENDPOINTS").split(',').count(), 3);
    for name in ["etcd1", "etcd2", "etcd3"] {
        assert!(alive(c.pid_file(name).expect("pid file")));
    }
    c.stop("etcd2")?;
    // The node keeps (or regains) its lease through the two members left.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = c.votingctl(&["status", "--config", c.var("NODE1_CONFIG")])?;
        if status.status.success() {
            break;
        }
        assert!(Instant::now() < deadline, "{}", text_of(&status));
        std::thread::sleep(Duration::from_millis(200));
    }
    c.start("etcd2")?;
    c.down()?;
    for (name, pid) in c.seen_pids() {
        assert!(!alive(pid), "{name} (pid {pid}) still runs after down");
    }
    Ok(())
}

#[test]
fn git_clone_fetch_and_push_over_the_routers_http_port() -> anyhow::Result<()> {
    let c = LocalCluster::up(&[])?;
    let tmp = tempfile::tempdir()?;
    let url = c.url("group/project.git");

    // An unknown repository: 404 with the reason, for git and for curl.
    let out = git_in(
        tmp.path(),
        &[
            "clone",
            &c.url("no/such.git"),
            tmp.path().join("x").to_str().unwrap(),
        ],
    )?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("remote: refvote: repository default/no/such.git"),
        "{err}"
    );
    assert!(err.contains("not found"), "{err}");
    let (code, body) = curl(&[&format!(
        "{}/info/refs?service=git-upload-pack",
        c.url("no/such.git")
    )])?;
    assert_eq!(code, 404, "{body}");
    // The dumb protocol: not served, so not found.
    let (code, body) = curl(&[&format!("{url}/info/refs")])?;
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("dumb HTTP"), "{body}");
    let (code, _) = curl(&[&format!("{url}/git-receive-pack")])?;
    assert_eq!(code, 405);
    // A path that leaves the storage never reaches a node.
    let (code, body) = curl(&[
        "--path-as-is",
        &format!(
            "{}/a/%2E%2E/%2E%2E/etc/x.git/info/refs?service=git-upload-pack",
            c.var("ROUTER_HTTP")
        ),
    ])?;
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("leaves the storage"), "{body}");

    // The first push creates the repository on all three nodes.
    let work = WorkRepo::new(&tmp.path().join("work"))?;
    let first = work.commit("main", "first")?;
    ok(push(&work.path, &url, &["main"])?)?;
    assert_eq!(
        replicas(&c, "group/project.git", "refs/heads/main"),
        vec![Some(first.clone()); 3]
    );

    // Clone it back.
    let clone = tmp.path().join("clone");
    ok(git_in(
        tmp.path(),
        &["clone", "--quiet", &url, clone.to_str().unwrap()],
    )?)?;
    assert_eq!(rev(&clone, "refs/remotes/origin/main"), Some(first.clone()));

    // A push of a few MiB that does not compress: git sends it chunked, and it crosses
    // the router in many messages.
    let blob: Vec<u8> = (0..3 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(work.path.join("blob.bin"), &blob)?;
    git::git(&work.path, &["add", "blob.bin"])?;
    git::git(&work.path, &["commit", "--quiet", "-m", "a large file"])?;
    let large = git::git(&work.path, &["rev-parse", "HEAD"])?;
    ok(push(&work.path, &url, &["main"])?)?;
    assert_eq!(
        replicas(&c, "group/project.git", "refs/heads/main"),
        vec![Some(large.clone()); 3]
    );
    ok(git_in(&clone, &["pull", "--quiet", "--ff-only"])?)?;
    assert_eq!(std::fs::read(clone.join("blob.bin"))?, blob);
    let first = large;

    // Several branches and an annotated tag in one push.
    let a = work.commit("feature-a", "a")?;
    let b = work.commit("feature-b", "b")?;
    git::git(&work.path, &["tag", "-a", "v1.0", "-m", "release", &first])?;
    let tag = git::git(&work.path, &["rev-parse", "refs/tags/v1.0"])?;
    let out = ok(push(&work.path, &url, &["feature-a", "feature-b", "v1.0"])?)?;
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("[new tag]") && said.contains("feature-b"),
        "{said}"
    );
    assert_eq!(
        replicas(&c, "group/project.git", "refs/heads/feature-a"),
        vec![Some(a.clone()); 3]
    );
    assert_eq!(
        replicas(&c, "group/project.git", "refs/heads/feature-b"),
        vec![Some(b.clone()); 3]
    );
    assert_eq!(
        replicas(&c, "group/project.git", "refs/tags/v1.0"),
        vec![Some(tag.clone()); 3]
    );

    // Fetch sees them.
    ok(git_in(&clone, &["fetch", "--quiet", "--tags", "origin"])?)?;
    assert_eq!(rev(&clone, "refs/remotes/origin/feature-a"), Some(a));
    assert_eq!(rev(&clone, "refs/remotes/origin/feature-b"), Some(b));
    assert_eq!(rev(&clone, "refs/tags/v1.0"), Some(tag));

    // A deletion.
    ok(push(&work.path, &url, &[":feature-b"])?)?;
    assert_eq!(
        replicas(&c, "group/project.git", "refs/heads/feature-b"),
        vec![None; 3]
    );
    ok(git_in(&clone, &["fetch", "--quiet", "--prune", "origin"])?)?;
    assert_eq!(rev(&clone, "refs/remotes/origin/feature-b"), None);

    // A fetch from a clone with many commits of its own sends a long negotiation
    // (git gzips request bodies over 1 KiB).
    let local = WorkRepo::new(&tmp.path().join("local"))?;
    ok(git_in(
        &local.path,
        &["fetch", "--quiet", &url, "main:refs/heads/upstream"],
    )?)?;
    for i in 0..60 {
        local.commit("mine", &format!("local {i}"))?;
    }
    let second = work.commit("main", "second")?;
    ok(push(&work.path, &url, &["main"])?)?;
    ok(git_in(
        &local.path,
        &["fetch", "--quiet", &url, "main:refs/heads/upstream"],
    )?)?;
    assert_eq!(
        rev(&local.path, "refs/heads/upstream"),
        Some(second.clone())
    );

    // An explicitly gzip-encoded upload-pack request (protocol v0) gets a pack.
    let mut request = Vec::new();
    let want = format!("want {second} ofs-delta\n");
    request.extend(format!("{:04x}{want}", want.len() + 4).bytes());
    request.extend(b"00000009done\n");
    let mut gz = Command::new("gzip")
        .arg("-c")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    use std::io::Write;
    gz.stdin.take().unwrap().write_all(&request)?;
    let body = gz.wait_with_output()?.stdout;
    let body_path = tmp.path().join("req.gz");
    std::fs::write(&body_path, &body)?;
    let out_path = tmp.path().join("resp");
    let (code, _) = curl(&[
        "-H",
        "Content-Type: application/x-git-upload-pack-request",
        "-H",
        "Content-Encoding: gzip",
        "--data-binary",
        &format!("@{}", body_path.display()),
        "-o",
        out_path.to_str().unwrap(),
        &format!("{url}/git-upload-pack"),
    ])?;
    assert_eq!(code, 200);
    let resp = std::fs::read(&out_path)?;
    assert!(
        resp.starts_with(b"0008NAK\n"),
        "{:?}",
        String::from_utf8_lossy(&resp[..resp.len().min(64)])
    );
    assert!(resp.windows(4).any(|w| w == b"PACK"), "a pack follows");
    // A body that claims gzip but is not: 400, and the router keeps serving.
    let (code, body) = curl(&[
        "-H",
        "Content-Type: application/x-git-upload-pack-request",
        "-H",
        "Content-Encoding: gzip",
        "--data-binary",
        "not gzip at all",
        &format!("{url}/git-upload-pack"),
    ])?;
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("gzip"), "{body}");
    ok(git_in(&clone, &["fetch", "--quiet", "origin"])?)?;
    assert_eq!(rev(&clone, "refs/remotes/origin/main"), Some(second));

    // With create_on_push off, a push to an unknown repository is refused and says so.
    let config = c.var("ROUTER_CONFIG");
    let text = std::fs::read_to_string(config)?;
    assert!(text.contains("create_on_push = true"), "{text}");
    std::fs::write(
        config,
        text.replace("create_on_push = true", "create_on_push = false"),
    )?;
    c.stop("router")?;
    c.start("router")?;
    let out = push(&work.path, &c.url("other.git"), &["main"])?;
    assert!(!out.status.success(), "{}", text_of(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("create_on_push = false"), "{err}");
    assert!(err.contains("not found"), "{err}");
    assert_eq!(rev(&c.replica("node1", "other.git"), "HEAD"), None);
    // Existing repositories are served as before.
    ok(push(&work.path, &url, &["main:refs/heads/after-restart"])?)?;
    Ok(())
}

#[test]
fn sixteen_concurrent_pushes_then_no_quorum_is_refused_with_the_reason() -> anyhow::Result<()> {
    let c = LocalCluster::up(&[])?;
    let tmp = tempfile::tempdir()?;
    let url = c.url("team/app.git");
    // 16 clients, each with its own branch, pushing at once to a repository that does
    // not exist yet: one push creates it, the others wait for that, and all land.
    let mut clients = Vec::new();
    for i in 0..16 {
        let work = WorkRepo::new(&tmp.path().join(format!("client{i}")))?;
        let head = work.commit(&format!("client-{i}"), &format!("client {i}"))?;
        clients.push((i, work.path.clone(), head));
    }
    let started = Instant::now();
    let outs: Vec<(usize, String, Output)> = std::thread::scope(|s| {
        let handles: Vec<_> = clients
            .iter()
            .map(|(i, dir, head)| {
                let url = &url;
                s.spawn(move || {
                    let out = push(dir, url, &[&format!("client-{i}")]).expect("git runs");
                    (*i, head.clone(), out)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    let took = started.elapsed();
    for (i, head, out) in &outs {
        assert!(out.status.success(), "client {i}: {}", text_of(out));
        assert_eq!(
            replicas(&c, "team/app.git", &format!("refs/heads/client-{i}")),
            vec![Some(head.clone()); 3],
            "client {i}"
        );
    }
    eprintln!("16 concurrent pushes took {took:?}");
    let seed = WorkRepo::new(&tmp.path().join("seed"))?;
    let base = seed.commit("main", "base")?;
    ok(push(&seed.path, &url, &["main"])?)?;

    // Two of three nodes down: the push is refused at once, git shows why.
    c.stop("node2")?;
    c.stop("node3")?;
    let next = seed.commit("main", "no quorum")?;
    let started = Instant::now();
    let out = push(&seed.path, &url, &["main"])?;
    assert!(!out.status.success(), "{}", text_of(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("remote: refvote: cannot write to default/team/app.git: not enough replicas are up to date: 1 of 3 up, 2 needed"),
        "{err}"
    );
    assert!(
        err.contains("! [remote rejected] main -> main (no quorum: 1 of 3 up, 2 needed)"),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        rev(&c.replica("node1", "team/app.git"), "refs/heads/main"),
        Some(base)
    );
    // Reads go on from the survivor.
    let clone = tmp.path().join("read");
    ok(git_in(
        tmp.path(),
        &["clone", "--quiet", &url, clone.to_str().unwrap()],
    )?)?;
    // A client that asks for no report (here, an empty push) gets the HTTP status.
    let (code, body) = curl(&[
        "-X",
        "POST",
        "-H",
        "Content-Type: application/x-git-receive-pack-request",
        "--data-binary",
        "",
        &format!("{url}/git-receive-pack"),
    ])?;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("1 of 3 up, 2 needed"), "{body}");

    // No node at all: reads fail with 503 and the reason.
    c.stop("node1")?;
    let out = git_in(
        tmp.path(),
        &["clone", &url, tmp.path().join("none").to_str().unwrap()],
    )?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("remote: refvote: no replica of default/team/app.git can serve reads"),
        "{err}"
    );
    assert!(err.contains("503"), "{err}");

    // Back: nothing was written meanwhile, so all are still up to date and vote.
    c.start("node1")?;
    c.start("node2")?;
    c.start("node3")?;
    ok(push(&seed.path, &url, &["main"])?)?;
    assert_eq!(
        replicas(&c, "team/app.git", "refs/heads/main"),
        vec![Some(next); 3]
    );
    Ok(())
}
