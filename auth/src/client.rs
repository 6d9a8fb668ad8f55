//! Signing outgoing calls: a wrapper around a channel that sets a fresh token on every
//! request. It replaces any `authorization` already there, which matters in the
//! router: it forwards the client's metadata unchanged, and the client's token is for
//! the router, not for the nodes.

use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::codegen::http;
use tonic::codegen::http::HeaderValue;

use crate::token::{METADATA_KEY, Secret};

/// `inner` with every request signed by `secret` (unchanged when `None`).
#[derive(Clone, Debug)]
pub struct Signed<S> {
    inner: S,
    secret: Option<Arc<Secret>>,
}

impl<S> Signed<S> {
    pub fn new(inner: S, secret: Option<Arc<Secret>>) -> Signed<S> {
        Signed { inner, secret }
    }
}

impl<S, B> tower::Service<http::Request<B>> for Signed<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        if let Some(secret) = &self.secret {
            let value =
                HeaderValue::from_str(&secret.bearer_now()).expect("a token is printable ASCII");
            req.headers_mut().insert(METADATA_KEY, value);
        }
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;

    #[tokio::test]
    async fn signing_replaces_the_forwarded_token() {
        use tower::{Service, ServiceExt};
        let secret = Arc::new(Secret::new("s").unwrap());
        let seen = tower::service_fn(|req: http::Request<()>| async move {
            Ok::<_, std::convert::Infallible>(
                req.headers()
                    .get_all(METADATA_KEY)
                    .iter()
                    .map(|v| v.as_bytes().to_vec())
                    .collect::<Vec<_>>(),
            )
        });
        let mut svc = Signed::new(seen, Some(secret.clone()));
        let req = http::Request::builder()
            .header(METADATA_KEY, "Bearer v2.client.token")
            .body(())
            .unwrap();
        let values = svc.ready().await.unwrap().call(req).await.unwrap();
        assert_eq!(values.len(), 1);
        assert_eq!(secret.check(Some(&values[0]), SystemTime::now()), Ok(()));
        // Unsigned: the metadata passes unchanged.
        let mut plain = Signed::new(seen, None);
        let req = http::Request::builder()
            .header(METADATA_KEY, "Bearer x")
            .body(())
            .unwrap();
        let values = plain.ready().await.unwrap().call(req).await.unwrap();
        assert_eq!(values, vec![b"Bearer x".to_vec()]);
    }
}
