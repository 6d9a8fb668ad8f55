//! Tests of the harness itself: [`Proc`] signals and logs, [`wait_until`], and real etcd
//! clusters started, written to, partly stopped, killed, paused, restarted and dropped.

use std::process::Command;
use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions};
use refvote_tests::etcd::Etcd;
use refvote_tests::proc::{Proc, free_ports, loopback_ip, pid_exists, wait_for, wait_until};

fn sh(script: &str) -> Command {
    let mut cmd = Command::new("sh");
    cmd.args(["-c", script]);
    cmd
}

async fn get_value(client: &mut Client, key: &str) -> anyhow::Result<Option<Vec<u8>>> {
    let resp = client.get(key, None).await?;
    Ok(resp.kvs().first().map(|kv| kv.value().to_vec()))
}

#[test]
fn loopback_ips_and_ports() {
    for _ in 0..1000 {
        let ip = loopback_ip();
        let o = ip.octets();
        assert_eq!(o[0], 127);
        assert!(o[1] != 0 && o[1] != 255, "{ip}");
        assert!(o[3] != 0 && o[3] != 255, "{ip}");
    }
    let ports = free_ports(loopback_ip(), 10).unwrap();
    let mut dedup = ports.clone();
    dedup.sort();
    dedup.dedup();
    assert_eq!(dedup.len(), 10, "{ports:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn proc_signals_and_log_tail() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // Ignores SIGTERM, so terminate has to fall back to SIGKILL.
    let mut p = Proc::spawn(
        "stubborn",
        sh("trap '' TERM; printf 'al%s\\n' pha; printf 'be%s\\n' ta; exec sleep 30"),
        dir.path(),
    )?;
    let log = p.log_path().to_owned();
    wait_until("stubborn to log two lines", Duration::from_secs(5), || {
        let log = log.clone();
        async move { std::fs::read_to_string(log).is_ok_and(|s| s.contains("beta\n")) }
    })
    .await?;
    assert_eq!(p.log_tail(2), "alpha\nbeta");
    assert!(p.is_running());
    p.pause()?;
    p.resume()?;
    let t = Instant::now();
    let status = p.terminate(Duration::from_millis(300))?;
    assert!(t.elapsed() >= Duration::from_millis(300));
    assert!(!status.success());
    assert!(!p.is_running());
    assert!(p.pause().is_err());

    // A process that honours SIGTERM exits at once, even when paused.
    let mut p = Proc::spawn("polite", sh("exec sleep 30"), dir.path())?;
    p.pause()?;
    let t = Instant::now();
    p.terminate(Duration::from_secs(10))?;
    assert!(t.elapsed() < Duration::from_secs(5));

    // Drop kills.
    let p = Proc::spawn("dropped", sh("exec sleep 30"), dir.path())?;
    let pid = p.pid();
    drop(p);
    assert!(!pid_exists(pid));

    let err = wait_until("the impossible", Duration::from_millis(100), || async {
        false
    })
    .await
    .unwrap_err();
    assert!(format!("{err:#}").contains("the impossible"), "{err:#}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn one_member_put_get() -> anyhow::Result<()> {
    let t = Instant::now();
    let etcd = Etcd::start(1).await?;
    eprintln!("1-member etcd healthy after {:?}", t.elapsed());
    assert_eq!(etcd.endpoints(), vec![etcd.endpoint(0)]);
    let mut client = etcd.client().await?;
    client.put("greeting", "hello", None).await?;
    assert_eq!(
        get_value(&mut client, "greeting").await?,
        Some(b"hello".to_vec())
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn three_members_lose_and_regain_quorum() -> anyhow::Result<()> {
    let t = Instant::now();
    let mut etcd = Etcd::start(3).await?;
    eprintln!("3-member etcd healthy after {:?}", t.elapsed());
    let mut client = etcd.client().await?;
    client.put("k", "v1", None).await?;
    let ids_before = {
        let mut ids: Vec<u64> = client
            .member_list()
            .await?
            .members()
            .iter()
            .map(|m| m.id())
            .collect();
        ids.sort();
        ids
    };
    assert_eq!(ids_before.len(), 3);

    let t = Instant::now();
    etcd.stop(1)?;
    etcd.stop(2)?;
    eprintln!(
        "stopping two members (SIGTERM, wait) took {:?}",
        t.elapsed()
    );
    assert!(!etcd.is_running(1) && !etcd.is_running(2) && etcd.is_running(0));

    // Linearizable read through the survivor: no quorum, so it cannot be served.
    let mut lone = etcd.member_client(0).await?;
    let t = Instant::now();
    let res = tokio::time::timeout(Duration::from_secs(3), lone.get("k", None)).await;
    eprintln!(
        "linearizable get without quorum: {:?} after {:?}",
        res.as_ref()
            .map(|r| r.as_ref().map(|_| ()).map_err(|e| e.to_string())),
        t.elapsed()
    );
    assert!(!matches!(res, Ok(Ok(_))), "read succeeded without quorum");
    assert!(t.elapsed() < Duration::from_millis(3500));

    let t = Instant::now();
    etcd.restart(1)?;
    etcd.restart(2)?;
    etcd.wait_healthy(Duration::from_secs(15)).await?;
    eprintln!("restart of two members to healthy took {:?}", t.elapsed());
    for i in 0..3 {
        let mut c = etcd.member_client(i).await?;
        assert_eq!(
            get_value(&mut c, "k").await?,
            Some(b"v1".to_vec()),
            "via member {i}"
        );
    }
    // Restarting with the original `--initial-cluster-state new` flags rejoined the same
    // cluster: same member ids, no new cluster formed.
    let mut ids_after: Vec<u64> = client
        .member_list()
        .await?
        .members()
        .iter()
        .map(|m| m.id())
        .collect();
    ids_after.sort();
    assert_eq!(ids_before, ids_after);
    client.put("k", "v2", None).await?;
    assert_eq!(get_value(&mut lone, "k").await?, Some(b"v2".to_vec()));
    Ok(())
}

/// Puts `key` through `client`, retrying until it succeeds: if the member that just
/// died or froze was the leader, a write in flight is lost with it and times out.
async fn put_retrying(client: &Client, key: &str, value: &str) -> anyhow::Result<()> {
    let t = Instant::now();
    wait_for(&format!("a put of {key}"), Duration::from_secs(10), || {
        let mut client = client.clone();
        async move {
            client.put(key, value, None).await?;
            Ok(())
        }
    })
    .await?;
    eprintln!("put of {key} succeeded after {:?}", t.elapsed());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_pause_and_catch_up() -> anyhow::Result<()> {
    let mut etcd = Etcd::start(3).await?;
    let c0 = etcd.member_client(0).await?;

    // SIGKILL one member; the other two keep a quorum.
    etcd.kill(2)?;
    assert!(!etcd.is_running(2));
    put_retrying(&c0, "during-outage", "x").await?;
    etcd.restart(2)?;
    etcd.wait_member_healthy(2, Duration::from_secs(10)).await?;
    let mut c2 = etcd.member_client(2).await?;
    assert_eq!(
        get_value(&mut c2, "during-outage").await?,
        Some(b"x".to_vec())
    );

    // A paused member answers nothing (its kernel still accepts connections); the
    // others still do. Only member 0's client: a balanced client would also route to
    // the paused member and time out.
    etcd.pause(1)?;
    assert!(etcd.is_running(1));
    let mut c1 = Client::connect(
        [etcd.endpoint(1)],
        Some(ConnectOptions::new().with_timeout(Duration::from_millis(500))),
    )
    .await?;
    assert!(c1.get("during-outage", None).await.is_err());
    put_retrying(&c0, "during-pause", "z").await?;
    etcd.resume(1)?;
    etcd.wait_member_healthy(1, Duration::from_secs(10)).await?;
    // A linearizable read through the resumed member sees the write made while it slept.
    assert_eq!(
        get_value(&mut c1, "during-pause").await?,
        Some(b"z".to_vec())
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn drop_kills_every_member() -> anyhow::Result<()> {
    let mut etcd = Etcd::start(3).await?;
    etcd.pause(0)?; // a stopped process must die too
    let pids = etcd.pids();
    assert_eq!(pids.len(), 3);
    assert!(pids.iter().all(|&p| pid_exists(p)));
    let dir = etcd.data_dir(0).parent().unwrap().to_owned();
    drop(etcd);
    for pid in pids {
        assert!(!pid_exists(pid), "etcd pid {pid} still exists after drop");
    }
    assert!(!dir.exists(), "temp dir {} not removed", dir.display());
    Ok(())
}
