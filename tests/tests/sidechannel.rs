//! GitLab's clients as they dial today, against a real etcd, three real votingd nodes,
//! a real `refvote-router` and real git: a client that dials as gitlab-shell and
//! workhorse do (backchannel, yamux, sidechannel) clones and fetches through the
//! router with `SSHUploadPackWithSidechannel` (git over SSH through `ssh-sidechannel`)
//! and `PostUploadPackWithSidechannel` (git over HTTP through a workhorse stand-in),
//! protocol v0 and v2, checked against the replicas with real git (refs, fsck); plain
//! gRPC keeps working on the same ports, with TLS and tokens too, and the token check
//! covers backchannel connections; clients that stall, send garbage, close early or
//! reset get Gitaly's codes and leave no git running on any node and no proxy open on
//! the router; an outdated replica is never read; the router answers ServerService
//! and RepositoryReplicas truthfully, nodes down included; FindRemoteRepository is
//! answered by a live node.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use refvote_auth::AuthSettings;
use refvote_cluster::RepoId;
use refvote_proto::gitaly::praefect_info_service_client::PraefectInfoServiceClient;
use refvote_proto::gitaly::remote_service_client::RemoteServiceClient;
use refvote_proto::gitaly::repository_service_client::RepositoryServiceClient;
use refvote_proto::gitaly::server_service_client::ServerServiceClient;
use refvote_proto::gitaly::smart_http_service_client::SmartHttpServiceClient;
use refvote_proto::gitaly::ssh_service_client::SshServiceClient;
use refvote_proto::gitaly::{
    CalculateChecksumRequest, DiskStatisticsRequest, FindRemoteRepositoryRequest,
    PostUploadPackWithSidechannelRequest, ReadinessCheckRequest, RepositoryExistsRequest,
    RepositoryReplicasRequest, ServerInfoRequest, ServerSignatureRequest,
    SshUploadPackWithSidechannelRequest, readiness_check_response,
};
use refvote_tests::cluster::VoteCluster;
use refvote_tests::git::{self, WorkRepo};
use refvote_tests::gitlab_client::GitlabClient;
use refvote_tests::grpc::repo;
use refvote_tests::metrics::scrape;
use refvote_tests::node::{NodeOptions, bin};
use refvote_tests::proc::{descendants, wait_until};
use refvote_tests::router::{Router, RouterOptions};
use refvote_tests::smarthttp::{GitHttpProxy, Target};
use refvote_tests::tls::TestCa;
use refvote_tests::workhorse::{Served, Workhorse};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

const REPO: &str = "group/project.git";
/// The nodes' `[timeout] upload_pack_negotiation_secs` here.
const NEGOTIATION_SECS: u64 = 2;
const SECRET: &str = "sidechannel-test-secret";

fn node_options() -> NodeOptions {
    NodeOptions::default().config(|c| c.timeout.upload_pack_negotiation_secs = NEGOTIATION_SECS)
}

/// `[auth] token = SECRET`.
fn auth() -> AuthSettings {
    AuthSettings {
        token: Some(SECRET.into()),
        token_file: None,
        transitioning: false,
    }
}
struct Setup {
    c: VoteCluster,
    router: Router,
    work: WorkRepo,
    id: RepoId,
}

/// Three nodes, one router, and `REPO` on every node with two branches, an annotated
/// tag and a few commits, registered in etcd.
async fn setup(nodes: NodeOptions, router: RouterOptions) -> anyhow::Result<Setup> {
    let c = VoteCluster::start_with(3, 1, nodes).await?;
    let id = c.create_repo(REPO).await?;
    let work = c.work("w")?;
    for i in 0..4 {
        work.commit("main", &format!("main {i}"))?;
    }
    work.commit("feature", "feature work")?;
    git::git(&work.path, &["checkout", "--quiet", "main"])?;
    git::git(&work.path, &["tag", "-a", "v1.0", "-m", "release 1.0"])?;
    for n in &c.nodes {
        let out = git::push(&work.path, &n.repo(REPO), &["--all"], &[]).await?;
        anyhow::ensure!(out.status.success(), "{out:?}");
        let out = git::push(&work.path, &n.repo(REPO), &["--tags"], &[]).await?;
        anyhow::ensure!(out.status.success(), "{out:?}");
    }
    let router = Router::start_with("router1", c.dir.path(), &c.etcd.endpoints(), &router).await?;
    Ok(Setup {
        c,
        router,
        work,
        id,
    })
}

/// How git reaches the gRPC port at `addr` over SSH: through `ssh-sidechannel`.
fn ssh_env(addr: SocketAddr, ca: Option<&Path>, token: Option<&str>) -> Vec<(String, String)> {
    let mut env = vec![
        (
            "GIT_SSH_COMMAND".to_owned(),
            bin("ssh-sidechannel").display().to_string(),
        ),
        ("GIT_SSH_VARIANT".to_owned(), "ssh".to_owned()),
        ("REFVOTE_SSH_ADDR".to_owned(), addr.to_string()),
    ];
    if let Some(ca) = ca {
        env.push(("REFVOTE_SSH_CA".into(), ca.display().to_string()));
    }
    if let Some(t) = token {
        env.push(("REFVOTE_SSH_TOKEN".into(), t.to_owned()));
    }
    env
}

const SSH_URL: &str = "ssh://gitlab-shell/group/project.git";

/// Real git in `dir`, with `env`, bounded in time.
async fn run_git(dir: &Path, args: &[&str], env: &[(String, String)]) -> anyhow::Result<Output> {
    let mut cmd = tokio::process::Command::new("git");
    cmd.current_dir(dir)
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("HOME", dir)
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    Ok(tokio::time::timeout(Duration::from_secs(120), cmd.output()).await??)
}

async fn git_ok(dir: &Path, args: &[&str], env: &[(String, String)]) -> anyhow::Result<String> {
    let out = run_git(dir, args, env).await?;
    anyhow::ensure!(
        out.status.success(),
        "git {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A mirror clone of `url` into `dest` with protocol `version`.
async fn mirror(
    url: &str,
    dest: &Path,
    version: u8,
    env: &[(String, String)],
) -> anyhow::Result<()> {
    let parent = dest.parent().expect("dest has a parent");
    std::fs::create_dir_all(parent)?;
    let v = format!("protocol.version={version}");
    git_ok(
        parent,
        &[
            "-c",
            &v,
            "clone",
            "--quiet",
            "--mirror",
            url,
            dest.to_str().unwrap(),
        ],
        env,
    )
    .await?;
    Ok(())
}

/// The clone has exactly the replica's refs, and every object they need, intact.
fn same_as_replica(clone: &Path, replica: &Path) -> anyhow::Result<()> {
    let (got, want) = (git::refs(clone), git::refs(replica));
    anyhow::ensure!(!want.is_empty(), "the replica has no refs");
    anyhow::ensure!(got == want, "refs differ:\nclone:\n{got}\nreplica:\n{want}");
    git::git(clone, &["fsck", "--full", "--strict", "--no-dangling"])?;
    Ok(())
}

/// Reads a `key=value` statistics file written by `ssh-sidechannel`.
fn stats_file(path: &Path) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    Ok(std::fs::read_to_string(path)?
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect())
}

/// Pushes a new commit on `main` and a new branch through the router (a voted write).
async fn push_through(s: &Setup, tag: &str) -> anyhow::Result<()> {
    let proxy = GitHttpProxy::start(vec![Target {
        url: s.router.grpc_url(),
        storage: "default".into(),
        transaction: None,
    }])
    .await?;
    s.work.commit("main", &format!("pushed {tag}"))?;
    s.work.commit(&format!("topic-{tag}"), "topic")?;
    git::git(&s.work.path, &["checkout", "--quiet", "main"])?;
    let out = tokio::process::Command::new("git")
        .current_dir(&s.work.path)
        .args([
            "push",
            "--quiet",
            &proxy.url(REPO),
            "main",
            &format!("topic-{tag}"),
        ])
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .output()
        .await?;
    anyhow::ensure!(out.status.success(), "push: {out:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gitlab_shell_and_workhorse_clone_and_fetch_through_the_router() -> anyhow::Result<()> {
    let s = setup(node_options(), RouterOptions::default()).await?;
    let replica = s.c.node("node1").repo(REPO);
    let ssh = ssh_env(s.router.addr(), None, None);
    let client = GitlabClient::dial(s.router.addr(), None, None).await?;
    let workhorse = Workhorse::start(client.clone()).await?;
    let root = s.c.path("clones");
    let mut clones = Vec::new();
    for version in [0u8, 2] {
        // gitlab-shell: git over SSH, SSHUploadPackWithSidechannel.
        let dest = root.join(format!("ssh-v{version}.git"));
        let stats = s.c.path(&format!("ssh-v{version}.stats"));
        let mut env = ssh.clone();
        env.push(("REFVOTE_SSH_STATS".into(), stats.display().to_string()));
        mirror(SSH_URL, &dest, version, &env).await?;
        same_as_replica(&dest, &replica)?;
        let st = stats_file(&stats)?;
        assert!(st["wants"].parse::<i64>()? >= 2, "{st:?}");
        assert!(
            st["packets"].parse::<i64>()? > st["wants"].parse::<i64>()?,
            "{st:?}"
        );
        if version == 0 {
            // v0 announces capabilities on its first want line.
            assert!(st["caps"].contains("side-band-64k"), "{st:?}");
        } else {
            assert_eq!(
                st["caps"], "",
                "v2 sends capabilities as lines of their own"
            );
        }
        clones.push((dest, env));
        // workhorse: git over HTTP, PostUploadPackWithSidechannel.
        let dest = root.join(format!("http-v{version}.git"));
        mirror(&workhorse.url(REPO), &dest, version, &[]).await?;
        same_as_replica(&dest, &replica)?;
        clones.push((dest, Vec::new()));
    }
    let served = workhorse.served.lock().unwrap().clone();
    assert!(!served.is_empty());
    let mut wanting = 0;
    for f in &served {
        let Served::Fetch(stats) = f else {
            panic!("a fetch failed: {f:?}")
        };
        assert!(stats.packets >= 1, "{stats:?}");
        // v2's ls-refs request wants nothing; the fetch requests do.
        wanting += usize::from(stats.wants >= 2);
    }
    assert!(wanting >= 2, "{served:?}");

    // A voted write through the router, then every clone fetches it.
    push_through(&s, "a").await?;
    let mains: Vec<_> =
        s.c.nodes
            .iter()
            .map(|n| git::rev(&n.repo(REPO), "refs/heads/main"))
            .collect();
    assert!(mains.iter().all(|m| *m == mains[0]), "{mains:?}");
    for (dest, env) in &clones {
        git_ok(dest, &["fetch", "--quiet", "--prune"], env).await?;
        same_as_replica(dest, &replica)?;
    }

    // A shallow clone over HTTP: upload-pack exits non-zero after a deepen by design.
    let shallow = root.join("shallow");
    git_ok(
        &root,
        &[
            "-c",
            "protocol.version=0",
            "clone",
            "--quiet",
            "--depth",
            "1",
            &workhorse.url(REPO),
            "shallow",
        ],
        &[],
    )
    .await?;
    assert_eq!(
        git::rev(&shallow, "HEAD"),
        git::rev(&replica, "refs/heads/main")
    );
    let last = workhorse.served.lock().unwrap().last().cloned();
    assert!(
        matches!(&last, Some(Served::Fetch(st)) if st.deepen == "deepen 1"),
        "{last:?}"
    );

    // Straight to a node the same client works too (the node's listener multiplexes).
    let node1 = s.c.node("node1");
    let direct = root.join("direct.git");
    mirror(SSH_URL, &direct, 2, &ssh_env(node1.grpc_addr(), None, None)).await?;
    same_as_replica(&direct, &replica)?;

    // And plain HTTP/2 gRPC on the same ports: the router's and a node's.
    for channel in [
        s.router.channel().await?,
        node1_channel(node1.grpc_url()).await?,
    ] {
        let exists = RepositoryServiceClient::new(channel)
            .repository_exists(RepositoryExistsRequest {
                repository: repo(REPO),
            })
            .await?
            .into_inner()
            .exists;
        assert!(exists);
    }

    // Both ports counted both kinds of connection: the router's (this test's clients),
    // node1's (the router's backchannel to it, ssh-sidechannel and the plain client).
    let r = scrape(s.router.metrics_addr()).await?;
    let n = scrape(node1.metrics_addr()).await?;
    for (name, m, prefix) in [("router", &r, "refvote_router"), ("node1", &n, "votingd")] {
        for kind in ["plain", "backchannel"] {
            let key = format!("{prefix}_grpc_connections_total{{kind=\"{kind}\"}}");
            assert!(
                m.get(&key).copied().unwrap_or(0.0) >= 1.0,
                "{name} {key}: {m:#?}"
            );
        }
        // (The harness's readiness probe of the router is such a connection.)
        let dropped = format!("{prefix}_grpc_connections_dropped_total");
        assert!(m.contains_key(&dropped), "{name}: {m:#?}");
    }
    Ok(())
}

async fn node1_channel(url: String) -> anyhow::Result<tonic::transport::Channel> {
    Ok(tonic::transport::Channel::from_shared(url)?
        .connect()
        .await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_tokens_cover_backchannel_and_plain_clients_on_one_port() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = TestCa::new(&dir.path().join("ca"))?;
    let mut nodes = node_options().config(|c| c.auth = auth());
    nodes.tls = Some(ca.clone());
    let router_opts = RouterOptions {
        tls: Some(ca.clone()),
        ..RouterOptions::default()
    }
    .config(|c| c.auth = auth());
    let s = setup(nodes, router_opts).await?;
    let replica = s.c.node("node1").repo(REPO);
    let root = s.c.path("clones");
    // gitlab-shell over TLS with the token: through the router, and straight to a node.
    for (name, addr) in [
        ("router", s.router.addr()),
        ("node1", s.c.node("node1").grpc_addr()),
    ] {
        let dest = root.join(format!("{name}.git"));
        mirror(
            SSH_URL,
            &dest,
            2,
            &ssh_env(addr, Some(&ca.cert), Some(SECRET)),
        )
        .await?;
        same_as_replica(&dest, &replica)?;
    }
    // workhorse over TLS with the token.
    let client = GitlabClient::dial(s.router.addr(), Some(&ca.cert), Some(SECRET)).await?;
    let workhorse = Workhorse::start(client).await?;
    let dest = root.join("http.git");
    mirror(&workhorse.url(REPO), &dest, 0, &[]).await?;
    same_as_replica(&dest, &replica)?;

    // Without the token a backchannel call is refused like any other, on both.
    for addr in [s.router.addr(), s.c.node("node1").grpc_addr()] {
        let anonymous = GitlabClient::dial(addr, Some(&ca.cert), None).await?;
        let e = anonymous
            .ssh_upload_pack(REPO, "", &b"0000"[..], tokio::io::sink(), tokio::io::sink())
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{addr}: {e:?}");
        let e = anonymous.info_refs(REPO, "").await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{addr}: {e:?}");
    }
    // Plain TLS gRPC on the same port, with and without the token.
    let signed = refvote_auth::Signed::new(
        s.router.channel().await?,
        refvote_auth::Secret::new(SECRET).map(std::sync::Arc::new),
    );
    let exists = RepositoryServiceClient::new(signed)
        .repository_exists(RepositoryExistsRequest {
            repository: repo(REPO),
        })
        .await?
        .into_inner()
        .exists;
    assert!(exists);
    let e = RepositoryServiceClient::new(s.router.channel().await?)
        .repository_exists(RepositoryExistsRequest {
            repository: repo(REPO),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    // A plaintext client gets nothing from a TLS port.
    let plain = GitlabClient::dial(s.router.addr(), None, Some(SECRET)).await;
    assert!(plain.is_err(), "a plaintext backchannel dial must fail");
    Ok(())
}

/// What a misbehaving client does once its sidechannel is open.
#[derive(Debug, Clone, Copy)]
enum Misbehaviour {
    /// Sends nothing and keeps the stream open.
    Stall,
    /// Sends bytes that are not sidechannel chunks.
    Garbage,
    /// Sends half a want line, then ends the stream without `0000`.
    CloseEarly,
    /// Resets the stream.
    Reset,
}

/// One fetch call on `client` whose sidechannel does `how`; the call's status.
async fn misbehave(client: &GitlabClient, ssh: bool, how: Misbehaviour) -> tonic::Status {
    let waiter = client.connection().register();
    let storage = client.storage.clone();
    let repository = Some(refvote_proto::gitaly::Repository {
        storage_name: storage,
        relative_path: REPO.into(),
        ..Default::default()
    });
    let behave = |sc: refvote_sidechannel::ClientSidechannel| async move {
        let mut raw = sc.into_raw();
        match how {
            Misbehaviour::Stall => {
                // Hold the stream until the server gives up on it.
                let mut rest = Vec::new();
                let _ = raw.read_to_end(&mut rest).await;
            }
            Misbehaviour::Garbage => {
                let _ = raw.write_all(b"zzzz not a chunk").await;
                let mut rest = Vec::new();
                let _ = raw.read_to_end(&mut rest).await;
            }
            Misbehaviour::CloseEarly => {
                let _ = raw.write_all(b"0010want 1e292f").await;
                let _ = raw.shutdown().await;
                let mut rest = Vec::new();
                let _ = raw.read_to_end(&mut rest).await;
            }
            Misbehaviour::Reset => raw.reset(),
        }
    };
    let answer = if ssh {
        let mut request = tonic::Request::new(SshUploadPackWithSidechannelRequest {
            repository,
            ..Default::default()
        });
        waiter.attach(request.metadata_mut());
        let mut c = SshServiceClient::new(client.channel());
        waiter
            .serve(c.ssh_upload_pack_with_sidechannel(request), behave)
            .await
            .0
            .map(|_| ())
    } else {
        let mut request = tonic::Request::new(PostUploadPackWithSidechannelRequest {
            repository,
            ..Default::default()
        });
        waiter.attach(request.metadata_mut());
        let mut c = SmartHttpServiceClient::new(client.channel());
        waiter
            .serve(c.post_upload_pack_with_sidechannel(request), behave)
            .await
            .0
            .map(|_| ())
    };
    answer.expect_err("a misbehaving client's fetch must fail")
}

/// git processes (upload-pack, pack-objects) running under any node's votingd.
fn git_left(c: &VoteCluster) -> Vec<(u32, String)> {
    c.nodes
        .iter()
        .filter_map(|n| n.pid())
        .flat_map(descendants)
        .filter(|(_, cmd)| cmd.contains("upload-pack") || cmd.contains("pack-objects"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_sidechannel_clients_get_gitalys_codes_and_leave_nothing_running()
-> anyhow::Result<()> {
    let s = setup(node_options(), RouterOptions::default()).await?;
    let router = GitlabClient::dial(s.router.addr(), None, None).await?;
    let node = GitlabClient::dial(s.c.node("node2").grpc_addr(), None, None).await?;
    use Misbehaviour::*;
    // (behaviour, SSH?, Gitaly's code): a stall runs into the negotiation deadline;
    // any read failure is a hang-up to git, which SSH answers CANCELED and HTTP
    // FAILED_PRECONDITION.
    let cases = [
        (Stall, true, Code::DeadlineExceeded),
        (Stall, false, Code::DeadlineExceeded),
        (Garbage, true, Code::Cancelled),
        (Garbage, false, Code::FailedPrecondition),
        (CloseEarly, true, Code::Cancelled),
        (CloseEarly, false, Code::FailedPrecondition),
        (Reset, true, Code::Cancelled),
        (Reset, false, Code::FailedPrecondition),
    ];
    // While a stalled fetch waits for its deadline, its git is seen: the check below
    // looks at the right processes.
    let stalled = {
        let router = router.clone();
        tokio::spawn(async move { misbehave(&router, true, Stall).await })
    };
    wait_until(
        "the stalled fetch's git upload-pack is seen",
        Duration::from_secs(NEGOTIATION_SECS),
        || async {
            git_left(&s.c)
                .iter()
                .any(|(_, cmd)| cmd.contains("upload-pack"))
        },
    )
    .await?;
    assert_eq!(stalled.await?.code(), Code::DeadlineExceeded);
    for (via, client) in [("router", &router), ("node2", &node)] {
        for (how, ssh, code) in cases {
            let what = format!(
                "{how:?} over {} via {via}",
                if ssh { "SSH" } else { "HTTP" }
            );
            let started = tokio::time::Instant::now();
            let status = misbehave(client, ssh, how).await;
            let took = started.elapsed();
            assert_eq!(status.code(), code, "{what}: {status:?}");
            let bound = Duration::from_secs(NEGOTIATION_SECS + 6);
            assert!(took < bound, "{what}: answered after {took:?}");
            wait_until(
                &format!("{what}: no git left on the nodes"),
                Duration::from_secs(10),
                || async { git_left(&s.c).is_empty() },
            )
            .await
            .map_err(|e| anyhow::anyhow!("{e:#}: {:?}", git_left(&s.c)))?;
            // The client's own session is back to its gRPC stream: every sidechannel
            // the server opened to it is closed.
            wait_until(
                &format!("{what}: the client's streams closed"),
                Duration::from_secs(10),
                || async { client.connection().session().open_streams() == 1 },
            )
            .await?;
        }
    }
    // The router proxies nothing any more.
    wait_until(
        "the router's sidechannels all ended",
        Duration::from_secs(10),
        || async {
            let m = refvote_tests::metrics::scrape(s.router.metrics_addr()).await;
            matches!(m, Ok(m) if m.get("refvote_router_sidechannels_in_flight") == Some(&0.0))
        },
    )
    .await?;
    // A call without a backchannel connection cannot have a sidechannel: plain gRPC
    // with the metadata is refused at once (Gitaly's INTERNAL for both RPCs).
    let mut request = tonic::Request::new(PostUploadPackWithSidechannelRequest {
        repository: repo(REPO),
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("gitaly-sidechannel-id", "1".parse()?);
    let e = SmartHttpServiceClient::new(s.router.channel().await?)
        .post_upload_pack_with_sidechannel(request)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Internal, "{e:?}");
    assert!(e.message().contains("backchannel"), "{e:?}");
    // And the path still works.
    let dest = s.c.path("after.git");
    mirror(SSH_URL, &dest, 2, &ssh_env(s.router.addr(), None, None)).await?;
    same_as_replica(&dest, &s.c.node("node1").repo(REPO))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidechannel_read_never_goes_to_an_outdated_replica() -> anyhow::Result<()> {
    let s = setup(node_options(), RouterOptions::default()).await?;
    let node1 = s.c.node("node1").repo(REPO);
    let main = git::rev(&node1, "refs/heads/main").unwrap();
    git::git(&node1, &["update-ref", "refs/heads/only-on-node1", &main])?;
    let client = GitlabClient::dial(s.router.addr(), None, None).await?;
    let workhorse = Workhorse::start(client).await?;
    let ssh = ssh_env(s.router.addr(), None, None);
    let dir = s.c.path("ls");
    std::fs::create_dir_all(&dir)?;
    // ls-remote over SSH (v0: the advertisement comes over the sidechannel) and over
    // HTTP v2 (ls-refs is a POST: PostUploadPackWithSidechannel).
    let sees = |ssh_side: bool| {
        let (dir, ssh, url) = (dir.clone(), ssh.clone(), workhorse.url(REPO));
        async move {
            let out = if ssh_side {
                git_ok(
                    &dir,
                    &["-c", "protocol.version=0", "ls-remote", SSH_URL],
                    &ssh,
                )
                .await?
            } else {
                git_ok(&dir, &["-c", "protocol.version=2", "ls-remote", &url], &[]).await?
            };
            anyhow::ensure!(out.contains("refs/heads/main"), "{out}");
            Ok::<_, anyhow::Error>(out.contains("refs/heads/only-on-node1"))
        }
    };
    // Reads spread over the replicas: node1 answers some of them.
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..6 {
        seen.insert(sees(i % 2 == 0).await?);
    }
    assert_eq!(
        seen,
        [false, true].into(),
        "reads did not spread over the replicas"
    );
    s.c.store
        .mark_outdated(&s.id, "node1", "test: diverged")
        .await?;
    for i in 0..9 {
        assert!(
            !sees(i % 2 == 0).await?,
            "read {i} went to the outdated replica"
        );
    }
    Ok(())
}

fn ready(r: &readiness_check_response::Result) -> Result<(), String> {
    match r {
        readiness_check_response::Result::OkResponse(_) => Ok(()),
        readiness_check_response::Result::FailureResponse(f) => Err(f
            .failed_checks
            .iter()
            .map(|c| format!("{}: {}", c.name, c.error_message))
            .collect::<Vec<_>>()
            .join("\n")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_answers_server_and_replica_calls_from_the_cluster() -> anyhow::Result<()> {
    let mut s = setup(node_options(), RouterOptions::default()).await?;
    let ch = s.router.channel().await?;
    let mut server = ServerServiceClient::new(ch.clone());
    let git_version = git::git(&s.work.path, &["version"])?;

    let info = server.server_info(ServerInfoRequest {}).await?.into_inner();
    assert!(
        git_version.contains(&info.git_version),
        "{info:?} vs {git_version}"
    );
    assert!(info.server_version.contains("votingd"), "{info:?}");
    assert_eq!(info.storage_statuses.len(), 1, "{info:?}");
    let st = &info.storage_statuses[0];
    assert_eq!(st.storage_name, "default");
    assert!(st.readable && st.writeable, "{st:?}");
    assert_eq!(st.replication_factor, 3);
    // Praefect's id of the virtual storage "default" (UUIDv5, computed independently
    // with Python's uuid module), the same through every router.
    assert_eq!(st.filesystem_id, "d9f04423-6b13-5949-9ffa-c06279e0796e");
    assert!(!st.fs_type.is_empty());

    let disk = server
        .disk_statistics(DiskStatisticsRequest {})
        .await?
        .into_inner();
    assert_eq!(disk.storage_statuses.len(), 1, "{disk:?}");
    let d = &disk.storage_statuses[0];
    assert_eq!(d.storage_name, "default");
    assert!(d.available > 0 && d.used > 0, "{d:?}");

    let r = server
        .readiness_check(ReadinessCheckRequest { timeout: None })
        .await?
        .into_inner();
    assert_eq!(ready(r.result.as_ref().unwrap()), Ok(()));
    let sig = server
        .server_signature(ServerSignatureRequest {})
        .await?
        .into_inner();
    assert!(sig.public_key.is_empty(), "nodes sign no commits");

    // RepositoryReplicas: every replica with the checksum its node computes.
    let replicas = || async {
        Ok::<_, anyhow::Error>(
            PraefectInfoServiceClient::new(ch.clone())
                .repository_replicas(RepositoryReplicasRequest {
                    repository: repo(REPO),
                })
                .await?
                .into_inner(),
        )
    };
    let mut checksums = std::collections::BTreeMap::new();
    for n in &s.c.nodes {
        let channel = node1_channel(n.grpc_url()).await?;
        let sum = RepositoryServiceClient::new(channel)
            .calculate_checksum(CalculateChecksumRequest {
                repository: repo(REPO),
            })
            .await?
            .into_inner()
            .checksum;
        checksums.insert(n.name.clone(), sum);
    }
    let r = replicas().await?;
    let primary = r.primary.clone().unwrap();
    let mut all = vec![primary.clone()];
    all.extend(r.replicas.clone());
    let names: std::collections::BTreeSet<String> = all
        .iter()
        .map(|d| d.repository.as_ref().unwrap().storage_name.clone())
        .collect();
    assert_eq!(names, ["node1", "node2", "node3"].map(String::from).into());
    for d in &all {
        let r = d.repository.as_ref().unwrap();
        assert_eq!(r.relative_path, REPO);
        assert_eq!(d.checksum, checksums[&r.storage_name], "{d:?}");
    }
    let e = PraefectInfoServiceClient::new(ch.clone())
        .repository_replicas(RepositoryReplicasRequest {
            repository: repo("nope.git"),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");

    // node3 down: readiness names it; writes still have a quorum.
    s.c.nodes[2].stop()?;
    let r = server
        .readiness_check(ReadinessCheckRequest { timeout: None })
        .await?
        .into_inner();
    let failed = ready(r.result.as_ref().unwrap()).unwrap_err();
    assert!(
        failed.contains("storage node connectivity & disk access: node3: holds no lease"),
        "{failed}"
    );
    assert!(!failed.contains("unavailable repositories"), "{failed}");
    let st = server.server_info(ServerInfoRequest {}).await?.into_inner();
    let st = &st.storage_statuses[0];
    assert!(st.readable && st.writeable, "{st:?}");
    let r = replicas().await?;
    let node3 = r
        .replicas
        .iter()
        .chain(r.primary.iter())
        .find(|d| d.repository.as_ref().unwrap().storage_name == "node3")
        .expect("node3 is still assigned");
    assert_eq!(
        node3.checksum, "",
        "an unreachable replica's checksum is unknown"
    );
    assert_ne!(r.primary.unwrap().repository.unwrap().storage_name, "node3");

    // node2 down too: reads go on, writes cannot.
    s.c.nodes[1].stop()?;
    let st = server.server_info(ServerInfoRequest {}).await?.into_inner();
    let st = &st.storage_statuses[0];
    assert!(st.readable && !st.writeable, "{st:?}");
    let r = server
        .readiness_check(ReadinessCheckRequest { timeout: None })
        .await?
        .into_inner();
    let failed = ready(r.result.as_ref().unwrap()).unwrap_err();
    assert!(failed.contains("node2: holds no lease"), "{failed}");
    assert!(
        failed.contains("unavailable repositories: virtual storage \"default\" has 1 repository that cannot be written"),
        "{failed}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn find_remote_repository_is_answered_by_a_live_node() -> anyhow::Result<()> {
    let s = setup(node_options(), RouterOptions::default()).await?;
    let mut remote = RemoteServiceClient::new(s.router.channel().await?);
    let ask = |url: PathBuf| FindRemoteRepositoryRequest {
        remote: url.display().to_string(),
        storage_name: "default".into(),
    };
    // A repository any node can read as a URL (the work repository is local to all).
    for _ in 0..3 {
        let r = remote
            .find_remote_repository(ask(s.work.path.clone()))
            .await?;
        assert!(r.into_inner().exists);
    }
    let r = remote
        .find_remote_repository(ask(s.c.path("not-a-repository")))
        .await?;
    assert!(!r.into_inner().exists);
    let e = remote
        .find_remote_repository(FindRemoteRepositoryRequest {
            remote: String::new(),
            storage_name: "default".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = remote
        .find_remote_repository(FindRemoteRepositoryRequest {
            remote: "--upload-pack=touch /tmp/x".into(),
            storage_name: "default".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = remote
        .find_remote_repository(FindRemoteRepositoryRequest {
            remote: s.work.path.display().to_string(),
            storage_name: "../etc".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    Ok(())
}
