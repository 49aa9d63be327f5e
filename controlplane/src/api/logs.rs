//! `kubectl logs`: the pods/log subresource, proxied to the node agent that
//! runs the pod (as kube-apiserver proxies to the kubelet).

use futures::StreamExt;
use http_body_util::BodyExt;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::Response;
use serde_json::Value;

use super::status::{ApiError, ApiResult};
use super::{ApiServer, Body, Query};
use crate::resources;

fn str_at<'a>(v: &'a Value, pointer: &str) -> Option<&'a str> {
    v.pointer(pointer).and_then(Value::as_str)
}

/// The container a log request means: the one named, or the only one.
fn container_name(pod: &Value, requested: Option<&str>) -> ApiResult<String> {
    let names: Vec<&str> = pod
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|c| c.get("name").and_then(Value::as_str))
        .collect();
    let pod_name = str_at(pod, "/metadata/name").unwrap_or_default();
    match requested {
        Some(c) if names.contains(&c) => Ok(c.to_string()),
        Some(c) => Err(ApiError::bad_request(format!(
            "container {c} is not valid for pod {pod_name}"
        ))),
        None if names.len() == 1 => Ok(names[0].to_string()),
        None => Err(ApiError::bad_request(format!(
            "a container name must be specified for pod {pod_name}, choose one of: [{}]",
            names.join(" ")
        ))),
    }
}

/// Where the pod's node agent serves logs: its InternalIP and kubelet port.
fn node_endpoint(node: &Value) -> Option<(String, u64)> {
    let ip = node
        .pointer("/status/addresses")?
        .as_array()?
        .iter()
        .find(|a| a["type"] == "InternalIP")?
        .get("address")?
        .as_str()?
        .to_string();
    let port = node
        .pointer("/status/daemonEndpoints/kubeletEndpoint/Port")
        .and_then(Value::as_u64)
        .unwrap_or(10250);
    Some((ip, port))
}

pub async fn serve(
    server: &ApiServer,
    ns: &str,
    name: &str,
    query: &Query,
) -> ApiResult<Response<Body>> {
    let pods = resources::find_kind("Pod").unwrap();
    let pod = server.registry.get(pods, Some(ns), name)?.value();
    let container = container_name(&pod, query.get("container").map(String::as_str))?;
    let node_name = str_at(&pod, "/spec/nodeName")
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            ApiError::bad_request(format!("pod {name} is not scheduled to a node yet"))
        })?;
    let nodes = resources::find_kind("Node").unwrap();
    let node = server.registry.get(nodes, None, node_name)?.value();
    let (ip, port) = node_endpoint(&node).ok_or_else(|| {
        ApiError::internal(format!(
            "node {node_name} reports no InternalIP to fetch logs from"
        ))
    })?;
    let upstream_query: String = {
        let mut q = form_urlencoded::Serializer::new(String::new());
        for key in [
            "follow",
            "tailLines",
            "previous",
            "timestamps",
            "sinceSeconds",
            "limitBytes",
        ] {
            if let Some(v) = query.get(key) {
                q.append_pair(key, v);
            }
        }
        q.finish()
    };
    let path = format!("/containerLogs/{ns}/{name}/{container}?{upstream_query}");
    let stream = tokio::net::TcpStream::connect((ip.as_str(), port as u16))
        .await
        .map_err(|e| {
            ApiError::internal(format!(
                "dialing node {node_name}'s agent at {ip}:{port}: {e}"
            ))
        })?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| ApiError::internal(format!("node {node_name}'s agent: {e}")))?;
    tokio::spawn(conn);
    let request = hyper::Request::get(path)
        .header("host", format!("{ip}:{port}"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(ApiError::internal)?;
    let upstream = sender
        .send_request(request)
        .await
        .map_err(|e| ApiError::internal(format!("node {node_name}'s agent: {e}")))?;
    let code = upstream.status().as_u16();
    // The agent's body streams through (follow=true stays open); a transport
    // error ends the stream.
    let frames = futures::stream::unfold(upstream.into_body(), |mut body| async move {
        match body.frame().await {
            Some(Ok(frame)) => Some((Ok(frame), body)),
            _ => None,
        }
    })
    .boxed();
    let mut resp = Response::new(http_body_util::StreamBody::new(frames).boxed_unsync());
    *resp.status_mut() =
        hyper::StatusCode::from_u16(code).unwrap_or(hyper::StatusCode::BAD_GATEWAY);
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn container_choice_as_kube() {
        let one = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "app"}]}});
        assert_eq!(container_name(&one, None).unwrap(), "app");
        let two = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "a"}, {"name": "b"}]}});
        let err = container_name(&two, None).unwrap_err();
        assert!(
            err.message.contains("choose one of: [a b]"),
            "{}",
            err.message
        );
        assert!(container_name(&two, Some("c")).is_err());
        assert_eq!(container_name(&two, Some("b")).unwrap(), "b");
    }

    #[test]
    fn node_endpoint_from_status() {
        let node = json!({"status": {"addresses": [{"type": "Hostname", "address": "n1"}, {"type": "InternalIP", "address": "10.0.0.2"}],
                                     "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}}}});
        assert_eq!(node_endpoint(&node), Some(("10.0.0.2".to_string(), 10250)));
    }
}
