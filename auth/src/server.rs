//! The check on every gRPC listener: a tower layer in front of all services, so no
//! handler (and, in the router, no node) sees a call whose token is missing or wrong.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::SystemTime;

use tonic::Status;
use tonic::codegen::http;

use crate::settings::AuthPolicy;
use crate::token::METADATA_KEY;

/// Health checks answer without a token, as in Gitaly: load balancers and probes do
/// not hold the secret, and health tells them nothing secret.
const UNAUTHENTICATED_PREFIX: &str = "/grpc.health.v1.Health/";

/// Put in a call's extensions when its token was signed with the read-only secret
/// ([`AuthPolicy::read_only`]): the service behind the layer must refuse it anything
/// but reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadOnly;

/// What `tonic::transport::Server::builder().layer(auth)` is layered with, for
/// callers that name the server's type.
pub type Layered = tower::layer::util::Stack<AuthLayer, tower::layer::util::Identity>;

/// Checks every call's token against the policy; `None` lets every call through.
#[derive(Clone)]
pub struct AuthLayer {
    inner: Option<Arc<Checker>>,
}

struct Checker {
    policy: AuthPolicy,
    /// Who refuses, in the status message (`refvote-router`, `votingd node n1`), so
    /// a caller behind a proxy can tell which hop wants the token.
    who: String,
}

impl AuthLayer {
    pub fn new(policy: Option<AuthPolicy>, who: impl Into<String>) -> AuthLayer {
        let who = who.into();
        AuthLayer {
            inner: policy.map(|policy| Arc::new(Checker { policy, who })),
        }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Authenticated<S>;

    fn layer(&self, inner: S) -> Authenticated<S> {
        Authenticated {
            inner,
            checker: self.inner.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Authenticated<S> {
    inner: S,
    checker: Option<Arc<Checker>>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, R> tower::Service<http::Request<B>> for Authenticated<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = BoxFuture<Result<http::Response<R>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        if let Some(checker) = &self.checker {
            let path = req.uri().path();
            if !path.starts_with(UNAUTHENTICATED_PREFIX) {
                let header = req.headers().get(METADATA_KEY).map(|v| v.as_bytes());
                let now = SystemTime::now();
                let checked = checker.policy.secret.check(header, now);
                let read_only = checked.is_err()
                    && checker
                        .policy
                        .read_only
                        .as_ref()
                        .is_some_and(|ro| ro.check(header, now).is_ok());
                if read_only {
                    req.extensions_mut().insert(ReadOnly);
                } else if let Err(e) = checked {
                    if checker.policy.transitioning {
                        tracing::warn!(method = path, error = %e, "unauthenticated call accepted (auth.transitioning)");
                    } else {
                        tracing::warn!(method = path, error = %e, "unauthenticated call refused");
                        let status = Status::unauthenticated(format!(
                            "{} refused the call: {e}",
                            checker.who
                        ));
                        return Box::pin(std::future::ready(Ok(status.into_http())));
                    }
                }
            }
        }
        Box::pin(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use tower::{Layer, Service, ServiceExt};

    use super::*;
    use crate::token::Secret;

    async fn status_of(layer: &AuthLayer, path: &str, token: Option<String>) -> Option<String> {
        let inner = tower::service_fn(|_req: http::Request<()>| async {
            Ok::<_, Infallible>(http::Response::new(String::from("handled")))
        });
        let mut svc = layer.layer(inner);
        let mut req = http::Request::builder().uri(path);
        if let Some(t) = token {
            req = req.header(METADATA_KEY, t);
        }
        let resp = svc
            .ready()
            .await
            .unwrap()
            .call(req.body(()).unwrap())
            .await
            .unwrap();
        if resp.body() == "handled" {
            return None;
        }
        let status = Status::from_header_map(resp.headers()).expect("a gRPC status");
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        Some(status.message().to_owned())
    }

    fn policy(transitioning: bool) -> Option<AuthPolicy> {
        Some(AuthPolicy {
            secret: Arc::new(Secret::new("s").unwrap()),
            transitioning,
            read_only: None,
        })
    }

    #[tokio::test]
    async fn only_a_valid_token_reaches_the_service() {
        let layer = AuthLayer::new(policy(false), "test-server");
        let m = "/gitaly.RefService/FindBranch";
        let good = Secret::new("s").unwrap().bearer_now();
        let wrong = Secret::new("t").unwrap().bearer_now();
        assert_eq!(status_of(&layer, m, Some(good)).await, None);
        let msg = status_of(&layer, m, None).await.unwrap();
        assert!(
            msg.starts_with("test-server refused the call: no authorization token"),
            "{msg}"
        );
        let msg = status_of(&layer, m, Some(wrong.clone())).await.unwrap();
        assert!(msg.contains("wrong token"), "{msg}");
        // Health needs no token.
        assert_eq!(
            status_of(&layer, "/grpc.health.v1.Health/Check", None).await,
            None
        );
        // Off, or transitioning: everything passes.
        let off = AuthLayer::new(None, "x");
        assert_eq!(status_of(&off, m, None).await, None);
        let transitioning = AuthLayer::new(policy(true), "x");
        assert_eq!(status_of(&transitioning, m, Some(wrong)).await, None);
        assert_eq!(status_of(&transitioning, m, None).await, None);
    }

    /// Whether the call reached the service, and marked read-only.
    async fn marked(layer: &AuthLayer, token: Option<String>) -> Option<bool> {
        let inner = tower::service_fn(|req: http::Request<()>| async move {
            let ro = req.extensions().get::<ReadOnly>().is_some();
            Ok::<_, Infallible>(http::Response::new(format!("handled {ro}")))
        });
        let mut req = http::Request::builder().uri("/gitaly.RefService/FindBranch");
        if let Some(t) = token {
            req = req.header(METADATA_KEY, t);
        }
        let resp = layer
            .layer(inner)
            .ready()
            .await
            .unwrap()
            .call(req.body(()).unwrap())
            .await
            .unwrap();
        match resp.body().as_str() {
            "handled true" => Some(true),
            "handled false" => Some(false),
            _ => None,
        }
    }

    #[tokio::test]
    async fn a_read_only_token_passes_marked() {
        let mut p = policy(false).unwrap();
        p.read_only = Some(Arc::new(Secret::new("ro").unwrap()));
        let layer = AuthLayer::new(Some(p), "test-server");
        let rw = Secret::new("s").unwrap().bearer_now();
        let ro = Secret::new("ro").unwrap().bearer_now();
        let wrong = Secret::new("t").unwrap().bearer_now();
        assert_eq!(marked(&layer, Some(rw)).await, Some(false));
        assert_eq!(marked(&layer, Some(ro)).await, Some(true));
        assert_eq!(marked(&layer, Some(wrong)).await, None);
        assert_eq!(marked(&layer, None).await, None);
    }
}
