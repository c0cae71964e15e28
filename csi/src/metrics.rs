//! Per-call metrics for the CSI services, as a tower layer around the gRPC server:
//! `ironsan_csi_requests_total{method, code}` and `ironsan_csi_request_seconds{method}`.
//!
//! Unary gRPC answers carry their status in the response headers when the handler failed
//! ("trailers-only") and in the trailers when it succeeded, so a missing `grpc-status` header
//! means OK: the layer never has to look at the body.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use tonic011::Code;

#[derive(Debug, Clone, Copy, Default)]
pub struct ObserveLayer;

impl<S> tower::Layer<S> for ObserveLayer {
    type Service = Observe<S>;
    fn layer(&self, inner: S) -> Observe<S> {
        Observe { inner }
    }
}

#[derive(Debug, Clone)]
pub struct Observe<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, RB> tower::Service<http::Request<B>> for Observe<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    S::Error: 'static,
    RB: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        // `/csi.v1.Controller/CreateVolume` -> `CreateVolume`.
        let method = req
            .uri()
            .path()
            .rsplit('/')
            .next()
            .unwrap_or("")
            .to_string();
        let start = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let res = fut.await;
            let code = match &res {
                Ok(r) => r
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|s| s.parse::<i32>().ok())
                    .map_or(Code::Ok, Code::from_i32),
                Err(_) => Code::Unknown,
            };
            let secs = start.elapsed().as_secs_f64();
            tracing::debug!(%method, ?code, secs, "CSI call");
            metrics::counter!("ironsan_csi_requests_total", "method" => method.clone(), "code" => format!("{code:?}"))
                .increment(1);
            metrics::histogram!("ironsan_csi_request_seconds", "method" => method).record(secs);
            res
        })
    }
}
