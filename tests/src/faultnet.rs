//! Links that can be cut: a TCP proxy the fault suite puts on every connection between
//! two processes (node → etcd member, routers → node, router → etcd member), so a
//! partition is real lost traffic and dead connections, not a flag in the product.
//!
//! A [`Link`] listens on a free loopback port and forwards to its target. Its state:
//! - `Up`: bytes flow both ways.
//! - `Blackhole`: connections stay open but no byte passes either way, and new ones are
//!   accepted and never answered: what a peer sees when packets are dropped.
//! - `Reset`: every open connection is closed and new ones are closed at once: what a
//!   peer sees when the other side's host is gone.
//!
//! Healing (`Up`) closes the connections that were black-holed, as TCP would after the
//! retransmission timeout; the peers reconnect.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::proc::loopback_ip;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    Up,
    Blackhole,
    Reset,
}

/// One proxied link. Dropping it stops the proxy and closes its connections.
pub struct Link {
    pub name: String,
    listen: SocketAddr,
    target: SocketAddr,
    state: watch::Sender<(LinkState, u64)>,
    epoch: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.task.abort();
        // Wakes every connection task, which then sees the proxy is gone.
        let _ = self.state.send((LinkState::Reset, u64::MAX));
    }
}

impl Link {
    /// A link to `target` listening on a free port of a fresh loopback address.
    pub async fn start(name: &str, target: SocketAddr) -> anyhow::Result<Link> {
        let listener = TcpListener::bind((loopback_ip(), 0)).await?;
        let listen = listener.local_addr()?;
        let (state, rx) = watch::channel((LinkState::Up, 0));
        let epoch = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(accept_loop(listener, target, rx));
        Ok(Link {
            name: name.to_owned(),
            listen,
            target,
            state,
            epoch,
            task,
        })
    }

    /// Where the client side connects.
    pub fn addr(&self) -> SocketAddr {
        self.listen
    }

    pub fn target(&self) -> SocketAddr {
        self.target
    }

    pub fn state(&self) -> LinkState {
        self.state.borrow().0
    }

    pub fn set(&self, state: LinkState) {
        // A new epoch on every change: connections opened under an older one that were
        // black-holed close when the link heals.
        let epoch = self.epoch.fetch_add(1, Ordering::Relaxed) + 1;
        let _ = self.state.send((state, epoch));
    }
}

async fn accept_loop(
    listener: TcpListener,
    target: SocketAddr,
    state: watch::Receiver<(LinkState, u64)>,
) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        let _ = client.set_nodelay(true);
        let state = state.clone();
        tokio::spawn(async move {
            let _ = pipe(client, target, state).await;
        });
    }
}

/// Serves one client connection until either side closes or the link changes state.
async fn pipe(
    mut client: TcpStream,
    target: SocketAddr,
    mut state: watch::Receiver<(LinkState, u64)>,
) -> std::io::Result<()> {
    let (mode, epoch) = *state.borrow_and_update();
    match mode {
        LinkState::Reset => return Ok(()),
        LinkState::Blackhole => {
            // Accepted, never answered; closed when the link heals or resets.
            let _ = state.changed().await;
            return Ok(());
        }
        LinkState::Up => {}
    }
    let Ok(mut server) = TcpStream::connect(target).await else {
        return Ok(());
    };
    let _ = server.set_nodelay(true);
    let (mut cr, mut cw) = client.split();
    let (mut sr, mut sw) = server.split();
    let mut up = [0u8; 16 * 1024];
    let mut down = [0u8; 16 * 1024];
    loop {
        tokio::select! {
            changed = state.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                let (mode, now) = *state.borrow_and_update();
                match mode {
                    LinkState::Up if now != epoch => return Ok(()),
                    LinkState::Up => {}
                    LinkState::Reset => return Ok(()),
                    LinkState::Blackhole => {
                        // Hold both sockets, move nothing, until the next change.
                        let _ = state.changed().await;
                        return Ok(());
                    }
                }
            }
            n = cr.read(&mut up) => {
                let n = n?;
                if n == 0 {
                    return Ok(());
                }
                sw.write_all(&up[..n]).await?;
            }
            n = sr.read(&mut down) => {
                let n = n?;
                if n == 0 {
                    return Ok(());
                }
                cw.write_all(&down[..n]).await?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut c, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = c.read(&mut buf).await {
                        if n == 0 || c.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    async fn round_trip(addr: SocketAddr) -> std::io::Result<Vec<u8>> {
        let mut c = TcpStream::connect(addr).await?;
        c.write_all(b"ping").await?;
        let mut buf = [0u8; 4];
        c.read_exact(&mut buf).await?;
        Ok(buf.to_vec())
    }

    #[tokio::test]
    async fn cuts_and_heals() {
        let link = Link::start("t", echo_server().await).await.unwrap();
        assert_eq!(round_trip(link.addr()).await.unwrap(), b"ping");

        link.set(LinkState::Blackhole);
        let silent = tokio::time::timeout(
            std::time::Duration::from_millis(300),
            round_trip(link.addr()),
        )
        .await;
        assert!(silent.is_err(), "a black-holed link answered: {silent:?}");

        link.set(LinkState::Reset);
        assert!(round_trip(link.addr()).await.is_err());

        link.set(LinkState::Up);
        assert_eq!(round_trip(link.addr()).await.unwrap(), b"ping");
    }

    #[tokio::test]
    async fn a_cut_stops_an_open_connection() {
        let link = Link::start("t", echo_server().await).await.unwrap();
        let mut c = TcpStream::connect(link.addr()).await.unwrap();
        c.write_all(b"a").await.unwrap();
        let mut one = [0u8; 1];
        c.read_exact(&mut one).await.unwrap();
        link.set(LinkState::Reset);
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(std::time::Duration::from_secs(2), async {
            let _ = c.write_all(b"b").await;
            c.read(&mut buf).await
        })
        .await
        .expect("the cut closes the connection");
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    }
}
