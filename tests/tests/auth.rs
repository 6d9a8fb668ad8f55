//! Security against real etcd, real votingd nodes and real `refvote-router` processes
//! (DESIGN.md §6): with Gitaly's v2 token configured on the router and the nodes, a
//! call without a valid token is refused with UNAUTHENTICATED by the router and never
//! reaches a node, a node refuses unsigned calls made to it directly, and a correct
//! token lets a repository be created and read back (real git pushing to it over the
//! router's HTTP port with the secret as its password); the
//! router signs its calls to nodes with its own token (a transitioning router passes a
//! client's bad token on to nobody). With TLS, the router and nodes speak only TLS, a
//! client trusting the CA is served, a plaintext client fails, nodes asking for client
//! certificates get the router's, and a repair between them works; and routers and
//! nodes reach an etcd that serves only TLS and wants client certificates.

use std::path::Path;

use base64::Engine;
use std::time::{Duration, SystemTime};

use refvote_auth::{AuthSettings, Secret};
use refvote_cluster::RepoId;
use refvote_proto::gitaly::ref_service_client::RefServiceClient;
use refvote_proto::gitaly::repository_service_client::RepositoryServiceClient;
use refvote_proto::gitaly::{
    CreateRepositoryRequest, FindDefaultBranchNameRequest, RefExistsRequest,
    ReplicateRepositoryRequest, RepositoryExistsRequest,
};
use refvote_tests::cluster::VoteCluster;
use refvote_tests::etcd::Etcd;
use refvote_tests::git;
use refvote_tests::grpc::repo;
use refvote_tests::node::{Node, NodeOptions};
use refvote_tests::router::{Router, RouterOptions};
use refvote_tests::tls::TestCa;
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

const SECRET: &str = "shared-secret-for-tests";
const REFUSED: &str = "unauthenticated call refused";

/// The `[auth]` section with the shared secret.
fn auth(transitioning: bool) -> AuthSettings {
    AuthSettings {
        token: Some(SECRET.into()),
        token_file: None,
        transitioning,
    }
}

/// `message` with `authorization: <value>` (none when `None`).
fn with_auth<T>(message: T, value: Option<String>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    if let Some(v) = value {
        r.metadata_mut()
            .insert("authorization", MetadataValue::try_from(v).unwrap());
    }
    r
}

fn good() -> Option<String> {
    Some(Secret::new(SECRET).unwrap().bearer_now())
}

/// Tokens that must all be refused, with what the refusal says.
fn bad_tokens() -> Vec<(Option<String>, &'static str)> {
    let secret = Secret::new(SECRET).unwrap();
    let old = SystemTime::now() - Duration::from_secs(120);
    vec![
        (None, "no authorization token"),
        (
            Some(Secret::new("another secret").unwrap().bearer_now()),
            "wrong token",
        ),
        (Some(format!("Bearer {}", secret.token(old))), "expired"),
        (Some("Bearer v2.nothex.1".into()), "malformed"),
        (Some(format!("Bearer {SECRET}")), "malformed"),
    ]
}

async fn create(ch: &Channel, relative: &str, token: Option<String>) -> Result<(), tonic::Status> {
    RepositoryServiceClient::new(ch.clone())
        .create_repository(with_auth(
            CreateRepositoryRequest {
                repository: repo(relative),
                ..Default::default()
            },
            token,
        ))
        .await
        .map(|_| ())
}

fn refusals(node_log: &str) -> usize {
    node_log.lines().filter(|l| l.contains(REFUSED)).count()
}

fn log_of(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name).join(format!("{name}.log"))).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_auth_only_valid_tokens_get_through_and_the_router_signs_for_nodes()
-> anyhow::Result<()> {
    let c = VoteCluster::start_with(
        3,
        1,
        NodeOptions::default().config(|c| c.auth = auth(false)),
    )
    .await?;
    let router = Router::start_with(
        "router1",
        c.dir.path(),
        &c.etcd.endpoints(),
        &RouterOptions::http().config(|c| c.auth = auth(false)),
    )
    .await?;
    let ch = router.channel().await?;

    // Through the router, every bad token is refused by the router itself, and the
    // creation it asked for happens nowhere.
    for (token, why) in bad_tokens() {
        let err = create(&ch, "auth/new.git", token.clone())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{token:?}: {err:?}");
        assert!(
            err.message().starts_with("refvote-router refused the call")
                && err.message().contains(why),
            "{token:?}: {err:?}"
        );
    }
    let id = RepoId::new("default", "auth/new.git")?;
    assert!(c.store.get(&c.store.keys().repo(&id)).await?.is_none());
    for n in &c.nodes {
        assert!(!n.repo("auth/new.git").exists(), "{}", n.name);
        // No node saw a call at all: none refused one.
        assert_eq!(refusals(&log_of(c.dir.path(), &n.name)), 0, "{}", n.name);
    }
    assert!(router.log_tail(200).contains(REFUSED));

    // A correct token: created on every node (the router's own token got it past
    // each node's check), pushed to with real git, and read back.
    create(&ch, "auth/new.git", good()).await?;
    for n in &c.nodes {
        assert!(n.repo("auth/new.git").join("HEAD").exists(), "{}", n.name);
    }
    // Pushed through the router's own git HTTP port, the secret as the password.
    let plain = router.http_url("auth/new.git");
    let url = plain.replace("http://", &format!("http://git:{SECRET}@"));
    let work = c.work("w")?;
    let head = work.commit("main", "first")?;
    let out = git::push(&work.path, Path::new(&url), &["main"], &[]).await?;
    assert!(
        out.status.success(),
        "{out:?}\nrouter log:\n{}",
        router.log_tail(40)
    );
    for n in &c.nodes {
        assert_eq!(
            git::rev(&n.repo("auth/new.git"), "refs/heads/main").as_deref(),
            Some(head.as_str()),
            "{}",
            n.name
        );
    }
    let exists = RefServiceClient::new(ch.clone())
        .ref_exists(with_auth(
            RefExistsRequest {
                repository: repo("auth/new.git"),
                r#ref: b"refs/heads/main".to_vec(),
            },
            good(),
        ))
        .await?
        .into_inner();
    assert!(exists.value);
    let clone = c.path("clone");
    git::git(
        c.dir.path(),
        &["clone", "--quiet", &url, clone.to_str().unwrap()],
    )?;
    assert_eq!(
        git::rev(&clone, "refs/remotes/origin/main"),
        Some(head.clone())
    );
    // A git client without the token gets nowhere: 401 without credentials or with a
    // wrong password, before any call reaches a node; the secret as the password works.
    let no_prompt = |args: &[&str]| {
        std::process::Command::new("git")
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .args(args)
            .output()
    };
    let out = no_prompt(&["ls-remote", &plain])?;
    assert!(!out.status.success(), "{out:?}");
    let wrong = plain.replace("http://", "http://git:wrong@");
    let out = no_prompt(&["ls-remote", &wrong])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("Authentication failed"),
        "{stderr}"
    );
    let out = no_prompt(&["ls-remote", &url])?;
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&head),
        "{out:?}"
    );
    // Gitaly's own token works over HTTP too.
    let bearer = format!(
        "http.extraHeader=Authorization: {}",
        Secret::new(SECRET).unwrap().bearer_now()
    );
    let out = no_prompt(&["-c", &bearer, "ls-remote", &plain])?;
    assert!(out.status.success(), "{out:?}");

    // A node called directly wants the token too, on TCP and on its Unix socket;
    // health answers without one.
    let node = &c.nodes[0];
    let direct = refvote_tests::grpc::channel(node).await;
    for (token, why) in bad_tokens() {
        let err = RepositoryServiceClient::new(direct.clone())
            .repository_exists(with_auth(
                RepositoryExistsRequest {
                    repository: repo("auth/new.git"),
                },
                token.clone(),
            ))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{token:?}: {err:?}");
        assert!(
            err.message()
                .starts_with(&format!("votingd node {} refused the call", node.name))
                && err.message().contains(why),
            "{token:?}: {err:?}"
        );
    }
    assert_eq!(
        refusals(&log_of(c.dir.path(), &node.name)),
        bad_tokens().len()
    );
    let exists = RepositoryServiceClient::new(direct.clone())
        .repository_exists(with_auth(
            RepositoryExistsRequest {
                repository: repo("auth/new.git"),
            },
            good(),
        ))
        .await?
        .into_inner();
    assert!(exists.exists);
    let socket = node.grpc_socket();
    let local = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await?;
    let err = RepositoryServiceClient::new(local)
        .repository_exists(RepositoryExistsRequest {
            repository: repo("auth/new.git"),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let health = tonic_health::pb::health_client::HealthClient::new(direct)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await?
        .into_inner();
    assert_eq!(health.status, 1, "SERVING");

    // A router in transitioning mode lets a client with a bad token through, but what
    // reaches the nodes is its own token, never the client's.
    let transitioning = Router::start_with(
        "router2",
        c.dir.path(),
        &c.etcd.endpoints(),
        &RouterOptions::default().config(|c| c.auth = auth(true)),
    )
    .await?;
    let ch2 = transitioning.channel().await?;
    let before: Vec<usize> = c
        .nodes
        .iter()
        .map(|n| refusals(&log_of(c.dir.path(), &n.name)))
        .collect();
    for (token, _) in bad_tokens() {
        let name = RefServiceClient::new(ch2.clone())
            .find_default_branch_name(with_auth(
                FindDefaultBranchNameRequest {
                    repository: repo("auth/new.git"),
                    head_only: false,
                },
                token,
            ))
            .await?
            .into_inner()
            .name;
        assert_eq!(name, b"refs/heads/main");
    }
    create(&ch2, "auth/second.git", Some("Bearer wrong".into())).await?;
    let after: Vec<usize> = c
        .nodes
        .iter()
        .map(|n| refusals(&log_of(c.dir.path(), &n.name)))
        .collect();
    assert_eq!(before, after, "a node refused a call the router signed");
    assert!(
        transitioning
            .log_tail(200)
            .contains("unauthenticated call accepted (auth.transitioning)")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tls_the_router_and_nodes_serve_only_tls() -> anyhow::Result<()> {
    let dir = tempfile::Builder::new().prefix("refvote-ca-").tempdir()?;
    let ca = TestCa::new(dir.path())?;
    // The nodes want client certificates too: the router presents its own.
    let c = VoteCluster::start_with(
        3,
        1,
        NodeOptions {
            tls: Some(ca.clone()),
            ..NodeOptions::default()
        }
        .config({
            let client_ca = ca.cert.clone();
            move |c| {
                c.tls.client_ca_path = Some(client_ca.clone());
                c.auth = auth(false);
            }
        }),
    )
    .await?;
    // The nodes register TLS addresses, so the router must use TLS to reach them.
    for n in &c.nodes {
        let node = c
            .store
            .get(&c.store.keys().node(&n.name))
            .await?
            .expect("registered");
        let text = String::from_utf8_lossy(&node.value).into_owned();
        assert!(text.contains(&format!("tls://{}", n.grpc_addr())), "{text}");
    }
    let router = Router::start_with(
        "router1",
        c.dir.path(),
        &c.etcd.endpoints(),
        &RouterOptions {
            tls: Some(ca.clone()),
            ..RouterOptions::default()
        }
        .config(|c| c.auth = auth(false)),
    )
    .await?;
    // A client trusting the CA: a repository created on every node over TLS, then
    // read back.
    let ch = router.channel().await?;
    create(&ch, "tls.git", good()).await?;
    for n in &c.nodes {
        assert!(n.repo("tls.git").join("HEAD").exists(), "{}", n.name);
    }
    let exists = RepositoryServiceClient::new(ch.clone())
        .repository_exists(with_auth(
            RepositoryExistsRequest {
                repository: repo("tls.git"),
            },
            good(),
        ))
        .await?
        .into_inner();
    assert!(exists.exists);

    // A plaintext client fails, against the router and against a node.
    for url in [
        format!("http://{}", router.addr()),
        format!("http://{}", c.nodes[0].grpc_addr()),
    ] {
        let plain = Channel::from_shared(url.clone())?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(5))
            .connect_lazy();
        let err = RepositoryServiceClient::new(plain)
            .repository_exists(with_auth(
                RepositoryExistsRequest {
                    repository: repo("tls.git"),
                },
                good(),
            ))
            .await
            .unwrap_err();
        assert!(
            matches!(
                err.code(),
                Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled
            ),
            "{url}: {err:?}"
        );
    }
    // Straight to a node: TLS without a client certificate is refused; with one, the
    // node answers.
    let node_url = c.nodes[0].grpc_url();
    let without = Channel::from_shared(node_url.clone())?
        .tls_config(ca.client()?)?
        .connect()
        .await;
    if let Ok(ch) = without {
        let err = RepositoryServiceClient::new(ch)
            .repository_exists(with_auth(
                RepositoryExistsRequest {
                    repository: repo("tls.git"),
                },
                good(),
            ))
            .await
            .unwrap_err();
        assert_ne!(err.code(), Code::Unauthenticated, "{err:?}");
    }
    let with = Channel::from_shared(node_url)?
        .tls_config(ca.client_with_identity("client")?)?
        .connect()
        .await?;
    let exists = RepositoryServiceClient::new(with)
        .repository_exists(with_auth(
            RepositoryExistsRequest {
                repository: repo("tls.git"),
            },
            good(),
        ))
        .await?
        .into_inner();
    assert!(exists.exists);
    // A repair between two such nodes: the target calls the tls:// source with its
    // own certificate and token (the servers metadata carries no token).
    let (source, target) = (&c.nodes[0], &c.nodes[1]);
    let work = c.work("w")?;
    let head = work.commit("main", "only on the source")?;
    let out = git::push(&work.path, &source.repo("tls.git"), &["main"], &[]).await?;
    anyhow::ensure!(out.status.success(), "{out:?}");
    let servers = format!(
        r#"{{"default": {{"address": "tls://{}", "token": ""}}}}"#,
        source.grpc_addr()
    );
    let mut request = with_auth(
        ReplicateRepositoryRequest {
            repository: repo("tls.git"),
            source: repo("tls.git"),
        },
        good(),
    );
    request.metadata_mut().insert(
        "gitaly-servers",
        MetadataValue::try_from(base64::engine::general_purpose::STANDARD.encode(servers))?,
    );
    let to_target = Channel::from_shared(target.grpc_url())?
        .tls_config(ca.client_with_identity("repairer")?)?
        .connect()
        .await?;
    RepositoryServiceClient::new(to_target)
        .replicate_repository(request)
        .await?;
    assert_eq!(
        git::rev(&target.repo("tls.git"), "refs/heads/main"),
        Some(head)
    );
    // A TLS client that does not trust the CA fails too.
    let other = TestCa::new(&dir.path().join("other"))?;
    let untrusting = Channel::from_shared(router.grpc_url())?
        .tls_config(other.client()?)?
        .connect()
        .await;
    assert!(untrusting.is_err(), "{untrusting:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_client_ca_the_router_wants_a_client_certificate() -> anyhow::Result<()> {
    let c = VoteCluster::start(1, 1).await?;
    let dir = tempfile::Builder::new().prefix("refvote-ca-").tempdir()?;
    let ca = TestCa::new(dir.path())?;
    let router = Router::start_with(
        "router1",
        c.dir.path(),
        &c.etcd.endpoints(),
        &RouterOptions {
            tls: Some(ca.clone()),
            ..RouterOptions::default()
        }
        .config({
            let client_ca = ca.cert.clone();
            move |c| c.tls.client_ca_path = Some(client_ca.clone())
        }),
    )
    .await?;
    let ask = |ch: Channel| async move {
        RepositoryServiceClient::new(ch)
            .repository_exists(RepositoryExistsRequest {
                repository: repo("unknown.git"),
            })
            .await
    };
    // Without a client certificate: no call gets through.
    let without = Channel::from_shared(router.grpc_url())?
        .tls_config(ca.client()?)?
        .connect()
        .await;
    if let Ok(ch) = without {
        let err = ask(ch).await.unwrap_err();
        assert_ne!(err.code(), Code::NotFound, "{err:?}");
    }
    // With one: the router answers (the repository is unknown to it).
    let with = Channel::from_shared(router.grpc_url())?
        .tls_config(ca.client_with_identity("client")?)?
        .connect()
        .await?;
    let err = ask(with).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routers_and_nodes_reach_etcd_over_tls() -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("refvote-etcd-tls-")
        .tempdir()?;
    let ca = TestCa::new(&dir.path().join("ca"))?;
    let etcd = Etcd::start_tls(1, &ca).await?;
    assert!(etcd.endpoints()[0].starts_with("https://"));
    let tls = etcd.tls().expect("a TLS etcd").clone();
    let opts = NodeOptions::default().config({
        let tls = tls.clone();
        move |c| tls.apply(&mut c.etcd)
    });
    // Each node starts only once it holds its etcd lease, over TLS.
    let mut nodes = Vec::new();
    for i in 1..=3 {
        nodes.push(Node::start(&format!("node{i}"), dir.path(), &etcd.endpoints(), &opts).await?);
    }
    let router = Router::start_with(
        "router1",
        dir.path(),
        &etcd.endpoints(),
        &RouterOptions::default().config(move |c| tls.apply(&mut c.etcd)),
    )
    .await?;
    // Placement reads the nodes from etcd, registration and the vote go through it.
    let ch = router.channel().await?;
    create(&ch, "etcd-tls.git", None).await?;
    for n in &nodes {
        assert!(n.repo("etcd-tls.git").join("HEAD").exists(), "{}", n.name);
    }
    // Without the CA, the endpoint is refused at start, naming the key.
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        format!(
            "router_id = \"r\"\n[etcd]\nendpoints = [{:?}]\n",
            etcd.endpoints()[0]
        ),
    )?;
    let out = std::process::Command::new(refvote_tests::node::bin("refvote-router"))
        .arg("--check-config")
        .arg("--config")
        .arg(&bad)
        .output()?;
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("etcd.ca_path"));
    Ok(())
}
