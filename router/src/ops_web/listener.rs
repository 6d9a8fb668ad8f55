//! The ops web's listener: HTTP/1.1 on `admin_listen_addr`, TLS with the router's
//! `[tls]` certificate when it has one, and the headers every answer carries (the
//! Content-Security-Policy without script, no framing, no sniffing, no caching).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderName, HeaderValue, header};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use super::OpsWeb;

/// No script from anywhere, styles and images only from the site, forms only to it.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; style-src 'self'; \
     img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The running ops web.
pub struct OpsWebServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

/// The router's TLS identity for browsers: the same certificate, HTTP/1.1 by ALPN
/// (the gRPC listener's acceptor offers only h2).
fn http1_tls(acceptor: &TlsAcceptor) -> TlsAcceptor {
    let mut config = (**acceptor.config()).clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    TlsAcceptor::from(Arc::new(config))
}

fn secure_headers(headers: &mut axum::http::HeaderMap) {
    let set = |h: &mut axum::http::HeaderMap, name: HeaderName, value: &'static str| {
        h.insert(name, HeaderValue::from_static(value));
    };
    set(
        headers,
        header::CONTENT_SECURITY_POLICY,
        CONTENT_SECURITY_POLICY,
    );
    set(headers, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(headers, header::X_FRAME_OPTIONS, "DENY");
    set(headers, header::REFERRER_POLICY, "no-referrer");
    set(headers, header::CACHE_CONTROL, "no-store");
}

impl OpsWebServer {
    /// Binds `addr` and serves the site; `tls` is the router's listener TLS, if any.
    pub(crate) async fn start(
        addr: SocketAddr,
        web: OpsWeb,
        tls: Option<TlsAcceptor>,
    ) -> std::io::Result<OpsWebServer> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let tls = tls.as_ref().map(http1_tls);
        let app = super::pages::router(Arc::new(web));
        let (stop, mut stopped) = oneshot::channel::<()>();
        let served_tls = tls.is_some();
        let task = tokio::spawn(async move {
            let graceful = hyper_util::server::graceful::GracefulShutdown::new();
            loop {
                let (conn, peer) = tokio::select! {
                    _ = &mut stopped => break,
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot accept an ops web connection");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                };
                let _ = conn.set_nodelay(true);
                let app = app.clone();
                let svc = hyper::service::service_fn(move |req| {
                    let app = app.clone();
                    async move {
                        let Ok(mut resp) = tower::ServiceExt::oneshot(app, req).await;
                        secure_headers(resp.headers_mut());
                        Ok::<_, Infallible>(resp)
                    }
                });
                let builder = hyper::server::conn::http1::Builder::new();
                match &tls {
                    None => {
                        let conn = graceful.watch(
                            builder.serve_connection(hyper_util::rt::TokioIo::new(conn), svc),
                        );
                        tokio::spawn(async move {
                            if let Err(e) = conn.await {
                                tracing::debug!(%peer, error = %e, "ops web connection ended with an error");
                            }
                        });
                    }
                    Some(tls) => {
                        let tls = tls.clone();
                        // The handshake runs in the connection's task; a slow client
                        // holds nobody else up.
                        let handshake = tokio::time::timeout(Duration::from_secs(10), async move {
                            tls.accept(conn).await
                        });
                        let watcher = graceful.watcher();
                        tokio::spawn(async move {
                            let stream = match handshake.await {
                                Ok(Ok(s)) => s,
                                Ok(Err(e)) => {
                                    tracing::debug!(%peer, error = %e, "ops web TLS handshake failed");
                                    return;
                                }
                                Err(_) => return,
                            };
                            let conn = watcher.watch(
                                builder.serve_connection(hyper_util::rt::TokioIo::new(stream), svc),
                            );
                            if let Err(e) = conn.await {
                                tracing::debug!(%peer, error = %e, "ops web connection ended with an error");
                            }
                        });
                    }
                }
            }
            drop(listener);
            graceful.shutdown().await;
        });
        tracing::info!(%addr, tls = served_tls, "serving the ops web");
        Ok(OpsWebServer {
            addr,
            stop: Some(stop),
            task,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes the listener and lets requests in flight finish, up to `timeout`.
    pub async fn shutdown(mut self, timeout: Duration) -> bool {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match tokio::time::timeout(timeout, &mut self.task).await {
            Ok(_) => true,
            Err(_) => {
                self.task.abort();
                false
            }
        }
    }
}
