//! The HTTP listener: accepts connections and serves each request through [`GitHttp`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::GitHttp;
use crate::forward::Forwarder;
use crate::health::Health;
use crate::limit::LimitSettings;

/// The running HTTP front.
pub struct HttpServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl HttpServer {
    /// Binds `addr` and serves git smart HTTP through `forwarder`.
    pub async fn start(
        addr: SocketAddr,
        forwarder: Arc<Forwarder>,
        create_on_push: bool,
        auth: Option<refvote_auth::AuthPolicy>,
        health: Arc<Health>,
        limits: LimitSettings,
    ) -> std::io::Result<HttpServer> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let front = Arc::new(GitHttp {
            forwarder,
            create_on_push,
            auth,
            creating: Default::default(),
            health,
            limits: limits.clone(),
        });
        let (stop, mut stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            // Every connection is watched: on shutdown each finishes the request it
            // is serving (its response body included) and closes; idle ones close.
            let graceful = hyper_util::server::graceful::GracefulShutdown::new();
            loop {
                let (conn, peer) = tokio::select! {
                    _ = &mut stopped => break,
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            // Out of file descriptors and the like: back off, keep serving.
                            tracing::warn!(error = %e, "cannot accept an HTTP connection");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                };
                let _ = conn.set_nodelay(true);
                let front = front.clone();
                let svc = hyper::service::service_fn(move |req| {
                    let front = front.clone();
                    async move { Ok::<_, Infallible>(front.serve(req).await) }
                });
                // A client that trickles its headers loses the connection after
                // header_timeout_secs (hyper's timer); a trickled body, after
                // idle_timeout_secs without a byte (the body reader).
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(limits.header_timeout())
                    .serve_connection(hyper_util::rt::TokioIo::new(conn), svc);
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
                    }
                });
            }
            drop(listener);
            let open = graceful.count();
            if open > 0 {
                tracing::info!(
                    connections = open,
                    "HTTP listener closed; finishing requests in flight"
                );
            }
            graceful.shutdown().await;
        });
        tracing::info!(%addr, create_on_push, "serving git smart HTTP");
        Ok(HttpServer {
            addr,
            stop: Some(stop),
            task,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes the listener: requests in flight go on (their responses sent whole),
    /// idle connections close.
    pub fn close(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Waits, after [`HttpServer::close`], until every connection has ended, at most
    /// until `deadline`. Returns whether they all did.
    pub async fn closed_by(&mut self, deadline: tokio::time::Instant) -> bool {
        if self.task.is_finished() {
            return true;
        }
        tokio::time::timeout_at(deadline, &mut self.task)
            .await
            .is_ok()
    }

    /// Gives up on the connections still open (they are dropped).
    pub fn abort(&self) {
        self.task.abort();
    }

    /// Closes the listener, lets every request in flight finish (its response sent
    /// whole) and closes idle connections; gives up after `timeout`, dropping what is
    /// left. Returns whether everything finished in time.
    pub async fn shutdown(mut self, timeout: Duration) -> bool {
        self.close();
        let done = self.closed_by(tokio::time::Instant::now() + timeout).await;
        if !done {
            self.abort();
        }
        done
    }
}
