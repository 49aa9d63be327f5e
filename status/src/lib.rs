//! The HTTP status endpoints of ferry's node daemons (`ferry proxy`'s /healthz,
//! /livez and /metrics, `ferry overlay`'s /healthz and /metrics): a plain
//! HTTP/1 server that answers each GET from a path → response function.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A request handler: path → (status, content type, body).
pub type Handler = Arc<dyn Fn(&str) -> (u16, &'static str, String) + Send + Sync>;

/// Prometheus' text exposition format.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4";

/// The answer to a path no handler knows.
pub fn not_found() -> (u16, &'static str, String) {
    (404, "text/plain", "404 page not found\n".into())
}

/// A listen address from a flag or config field named `field`: IP:port, or
/// empty for none (the endpoint is off).
pub fn bind_address(field: &str, value: &str) -> anyhow::Result<Option<SocketAddr>> {
    let v = value.trim();
    if v.is_empty() {
        return Ok(None);
    }
    v.parse().map(Some).map_err(|e| {
        anyhow::anyhow!("{field}: invalid address {value:?} (want IP:port, or empty for none): {e}")
    })
}

/// Serves HTTP/1 on an already-bound listener until the task is aborted.
pub async fn serve(listener: TcpListener, handler: Handler) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let h = handler.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let (status, ctype, body) = h(req.uri().path());
                let resp = Response::builder()
                    .status(status)
                    .header("content-type", ctype)
                    .header("x-content-type-options", "nosniff")
                    .body(Full::new(Bytes::from(body)))
                    .unwrap();
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// Binds `addr` and serves `handler` in a task.
pub async fn spawn_server(addr: SocketAddr, handler: Handler) -> anyhow::Result<JoinHandle<()>> {
    let l = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("binding {addr}: {e}"))?;
    Ok(tokio::spawn(serve(l, handler)))
}

#[cfg(test)]
mod tests {
    #[test]
    fn bind_addresses() {
        let a = super::bind_address("--x", " 127.0.0.1:10262 ").unwrap();
        assert_eq!(a, Some("127.0.0.1:10262".parse().unwrap()));
        assert_eq!(super::bind_address("--x", "").unwrap(), None);
        let e = super::bind_address("--x", "nowhere")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("--x: invalid address \"nowhere\""), "{e}");
    }
}
