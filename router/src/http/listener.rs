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
    ) -> std::io::Result<HttpServer> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let front = Arc::new(GitHttp {
            forwarder,
            create_on_push,
            auth,
            creating: Default::default(),
        });
        let (stop, mut stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
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
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let front = front.clone();
                        async move { Ok::<_, Infallible>(front.serve(req).await) }
                    });
                    if let Err(e) = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(conn), svc)
                        .await
                    {
                        tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
                    }
                });
            }
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

    /// Stops accepting connections; requests in flight finish on their own.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}
