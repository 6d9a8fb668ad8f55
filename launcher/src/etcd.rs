//! An etcd cluster of 1, 3 or 5 members on one loopback address: each member's name,
//! ports and data directory, and the command line it runs with. The local cluster's
//! `etcd` (or `etcd1`…) and the test harness's members are described here alike; a
//! member started again with the same command line and data rejoins from its WAL
//! (with a data directory etcd ignores the initial-cluster flags).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use crate::member::{Kind, Member};
use crate::ready::Ready;

/// One member.
#[derive(Debug, Clone)]
pub struct EtcdMember {
    /// Its `--name`.
    pub name: String,
    pub client_port: u16,
    pub peer_port: u16,
    pub data_dir: PathBuf,
}

/// The files of an etcd that serves clients over TLS only and wants their
/// certificates (`--client-cert-auth`); peers stay plaintext.
#[derive(Debug, Clone)]
pub struct EtcdServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA clients' certificates are checked against.
    pub ca: PathBuf,
}

/// A whole cluster. See the module docs.
#[derive(Debug, Clone)]
pub struct EtcdPlan {
    pub ip: Ipv4Addr,
    /// `--initial-cluster-token`: one of its own per cluster, so members of two
    /// clusters never join each other.
    pub token: String,
    pub members: Vec<EtcdMember>,
    /// `--heartbeat-interval` and `--election-timeout` in milliseconds (etcd's own
    /// defaults, 100 and 1000, when `None`).
    pub timing: Option<(u64, u64)>,
    pub tls: Option<EtcdServerTls>,
}

impl EtcdPlan {
    /// Members `names` on `ip`, each with two of `ports` (client, peer) and the data
    /// directory `data_dir(name)` gives.
    pub fn new(
        ip: Ipv4Addr,
        names: &[String],
        ports: &[u16],
        data_dir: impl Fn(&str) -> PathBuf,
        token: String,
    ) -> EtcdPlan {
        assert!(ports.len() >= 2 * names.len(), "two ports a member");
        let members = names
            .iter()
            .enumerate()
            .map(|(i, name)| EtcdMember {
                name: name.clone(),
                client_port: ports[2 * i],
                peer_port: ports[2 * i + 1],
                data_dir: data_dir(name),
            })
            .collect();
        EtcdPlan {
            ip,
            token,
            members,
            timing: None,
            tls: None,
        }
    }

    /// `ip:port` of member `i`'s client URL.
    pub fn client_addr(&self, i: usize) -> String {
        format!("{}:{}", self.ip, self.members[i].client_port)
    }

    /// Member `i`'s client URL (`https://` with TLS).
    pub fn endpoint(&self, i: usize) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.client_addr(i))
    }

    /// Every member's client URL, in member order.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.endpoint(i)).collect()
    }

    /// Member `i`'s peer URL.
    pub fn peer_url(&self, i: usize) -> String {
        format!("http://{}:{}", self.ip, self.members[i].peer_port)
    }

    fn initial_cluster(&self) -> String {
        (0..self.members.len())
            .map(|i| format!("{}={}", self.members[i].name, self.peer_url(i)))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Member `i`'s command-line flags.
    pub fn args(&self, i: usize) -> Vec<String> {
        let m = &self.members[i];
        let (client, peer) = (self.endpoint(i), self.peer_url(i));
        let mut args: Vec<String> = [
            "--name",
            &m.name,
            "--data-dir",
            &m.data_dir.display().to_string(),
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            &self.initial_cluster(),
            "--initial-cluster-state",
            "new",
            "--initial-cluster-token",
            &self.token,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Some((heartbeat, election)) = self.timing {
            args.extend([
                "--heartbeat-interval".into(),
                heartbeat.to_string(),
                "--election-timeout".into(),
                election.to_string(),
            ]);
        }
        args.extend(["--logger=zap", "--log-level=warn", "--log-outputs=stderr"].map(String::from));
        if let Some(tls) = &self.tls {
            args.extend([
                "--cert-file".into(),
                tls.cert.display().to_string(),
                "--key-file".into(),
                tls.key.display().to_string(),
                "--trusted-ca-file".into(),
                tls.ca.display().to_string(),
                "--client-cert-auth".into(),
            ]);
        }
        args
    }

    /// Member `i` as a process to start: `program` (etcd) with its flags, healthy once
    /// `/health` says so (over plaintext; a TLS member is checked by its caller).
    pub fn member(&self, i: usize, program: &Path) -> Member {
        Member {
            name: self.members[i].name.clone(),
            kind: Kind::Etcd,
            program: program.to_owned(),
            args: self.args(i),
            env: Vec::new(),
            ready: Ready::EtcdHealth {
                addr: self.client_addr(i),
            },
        }
    }
}
