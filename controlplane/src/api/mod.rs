//! The HTTP face of the API server: TLS, authentication, routing, and the
//! translation between Kubernetes REST requests and the registry.

mod discovery;
mod handlers;
mod logs;
pub mod status;
mod watch;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::auth::{Authenticator, Authorizer, RequestAttributes};
use crate::registry::Registry;
use crate::resources::{self, ResourceInfo, Subresource};
use status::{ApiError, ApiResult};

pub type Body = UnsyncBoxBody<Bytes, Infallible>;

/// Bodies larger than this are refused (kube-apiserver's limit is 3 MiB).
pub const MAX_BODY_BYTES: usize = 3 * 1024 * 1024;

pub struct ApiServer {
    pub registry: Arc<Registry>,
    pub authenticator: Arc<dyn Authenticator>,
    pub authorizer: Arc<dyn Authorizer>,
    /// The address clients are told to use (discovery's serverAddressByClientCIDRs).
    pub advertise: String,
}

/// Where a request points within the resource tree.
#[derive(Debug)]
pub struct Target {
    pub res: &'static ResourceInfo,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub subresource: Option<Subresource>,
}

pub type Query = HashMap<String, String>;

fn parse_query(q: Option<&str>) -> Query {
    q.map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default()
}

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed_unsync()
}

pub fn json_response(code: u16, body: &Value) -> Response<Body> {
    bytes_response(code, serde_json::to_vec(body).unwrap_or_default())
}

pub fn bytes_response(code: u16, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

pub fn error_response(e: &ApiError) -> Response<Body> {
    json_response(e.code, &e.to_status())
}

/// Resolves `/api/v1/...` and `/apis/{group}/{version}/...` resource paths.
fn resolve(group: &str, version: &str, rest: &[&str]) -> ApiResult<Target> {
    let lookup =
        |plural: &str| resources::find(group, version, plural).ok_or_else(ApiError::path_not_found);
    let namespaced_path = rest.len() >= 3
        && rest[0] == "namespaces"
        && resources::find(group, version, rest[2]).is_some_and(|r| r.namespaced);
    let (namespace, rest) = if namespaced_path {
        (Some(rest[1].to_string()), &rest[2..])
    } else {
        (None, rest)
    };
    let res = lookup(rest[0])?;
    if res.namespaced && namespace.is_none() && rest.len() > 1 {
        // A namespaced object must be addressed within its namespace.
        return Err(ApiError::path_not_found());
    }
    let subresource = match rest.get(2) {
        None => None,
        Some(s) => match Subresource::parse(s).filter(|s| res.has_subresource(*s)) {
            Some(s) => Some(s),
            None => return Err(ApiError::path_not_found()),
        },
    };
    if rest.len() > 3 {
        return Err(ApiError::path_not_found());
    }
    Ok(Target {
        res,
        namespace,
        name: rest.get(1).map(|s| s.to_string()),
        subresource,
    })
}

fn bearer(req: &Request<Incoming>) -> Option<&str> {
    req.headers()
        .get(AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// Reads a request body up to the size limit.
pub async fn read_body(body: Incoming) -> ApiResult<Bytes> {
    match http_body_util::Limited::new(body, MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            Err(ApiError::too_large(MAX_BODY_BYTES))
        }
        Err(e) => Err(ApiError::bad_request(format!(
            "reading the request body: {e}"
        ))),
    }
}

fn verb_of(method: &Method, target: &Target, query: &Query) -> &'static str {
    let is_watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    match (method, target.name.is_some()) {
        (&Method::GET, _) if is_watch => "watch",
        (&Method::GET, true) => "get",
        (&Method::GET, false) => "list",
        (&Method::POST, false) => "create",
        (&Method::PUT, true) => "update",
        (&Method::PATCH, true) => "patch",
        (&Method::DELETE, true) => "delete",
        (&Method::DELETE, false) => "deletecollection",
        _ => "",
    }
}

impl ApiServer {
    pub async fn serve(self: Arc<Self>, listener: TcpListener, tls: TlsAcceptor) {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let server = self.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let stream = match tls.accept(tcp).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                };
                let service = hyper::service::service_fn(move |req| {
                    let server = server.clone();
                    async move { Ok::<_, Infallible>(server.handle(req, peer).await) }
                });
                let builder = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                );
                if let Err(e) = builder
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await
                {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
            });
        }
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let started = std::time::Instant::now();
        let resp = match self.route(req).await {
            Ok(resp) => resp,
            Err(e) => error_response(&e),
        };
        tracing::debug!(%peer, %method, %path, status = resp.status().as_u16(), elapsed_ms = started.elapsed().as_millis() as u64, "request");
        resp
    }

    async fn route(self: Arc<Self>, req: Request<Incoming>) -> ApiResult<Response<Body>> {
        let path = req.uri().path().trim_end_matches('/').to_string();
        let query = parse_query(req.uri().query());
        if matches!(
            path.as_str(),
            "/healthz" | "/livez" | "/readyz" | "/version"
        ) {
            return Ok(discovery::public(&path));
        }
        let user = bearer(&req)
            .and_then(|t| self.authenticator.authenticate(t))
            .ok_or_else(ApiError::unauthorized)?;
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let (group, version, rest) = match segments.as_slice() {
            ["api", "v1", rest @ ..] => ("", "v1", rest),
            ["apis", group, version, rest @ ..] => (*group, *version, rest),
            _ => {
                let attrs = non_resource(&path);
                self.authorizer
                    .authorize(&user, &attrs)
                    .map_err(ApiError::forbidden)?;
                return discovery::non_resource(&self, &path, &req);
            }
        };
        if rest.is_empty() {
            let attrs = non_resource(&path);
            self.authorizer
                .authorize(&user, &attrs)
                .map_err(ApiError::forbidden)?;
            return discovery::resource_list(group, version);
        }
        let target = resolve(group, version, rest)?;
        let verb = verb_of(req.method(), &target, &query);
        if verb.is_empty() {
            return Err(ApiError::method_not_allowed(req.method().as_str(), &path));
        }
        let attrs = RequestAttributes {
            verb,
            group,
            resource: target.res.plural,
            subresource: target.subresource.map(Subresource::as_str),
            namespace: target.namespace.as_deref(),
            name: target.name.as_deref(),
            path: &path,
        };
        self.authorizer
            .authorize(&user, &attrs)
            .map_err(|why| ApiError::forbidden(format!("{}: {why}", user.name)))?;
        handlers::dispatch(&self, verb, target, query, req).await
    }
}

fn non_resource(path: &str) -> RequestAttributes<'_> {
    RequestAttributes {
        verb: "get",
        group: "",
        resource: "",
        subresource: None,
        namespace: None,
        name: None,
        path,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_paths() {
        let t = resolve(
            "",
            "v1",
            &["namespaces", "ns1", "services", "web", "status"],
        )
        .unwrap();
        assert_eq!(
            (t.res.plural, t.namespace.as_deref(), t.name.as_deref()),
            ("services", Some("ns1"), Some("web"))
        );
        assert_eq!(t.subresource, Some(Subresource::Status));
        let t = resolve("", "v1", &["namespaces", "ns1"]).unwrap();
        assert_eq!(
            (t.res.plural, t.name.as_deref()),
            ("namespaces", Some("ns1"))
        );
        let t = resolve("", "v1", &["namespaces", "ns1", "status"]).unwrap();
        assert_eq!(
            (t.res.plural, t.subresource),
            ("namespaces", Some(Subresource::Status))
        );
        let t = resolve("apps", "v1", &["deployments"]).unwrap();
        assert!(t.namespace.is_none() && t.name.is_none());
        assert!(resolve("", "v1", &["services", "x"]).is_err());
        assert!(resolve("", "v1", &["widgets"]).is_err());
        assert!(resolve("", "v1", &["namespaces", "a", "configmaps", "b", "scale"]).is_err());
    }
}
