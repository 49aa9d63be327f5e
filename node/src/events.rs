//! core/v1 Events about pods, as the kubelet reports them (source component
//! "kubelet", the node as host).

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::{Event, Pod};
use kube::api::PostParams;
use kube::{Api, Client};
use serde_json::json;

use crate::status::time;

/// The Event object for `reason`/`message` about `pod` (`kind` Normal or Warning).
pub fn pod_event(
    pod: &Pod,
    node: &str,
    kind: &str,
    reason: &str,
    message: &str,
    field_path: Option<&str>,
    now: DateTime<Utc>,
) -> serde_json::Value {
    let ns = pod
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let name = pod.metadata.name.clone().unwrap_or_default();
    let suffix = format!("{:x}", now.timestamp_nanos_opt().unwrap_or_default());
    let mut involved = json!({
        "kind": "Pod", "apiVersion": "v1", "namespace": ns, "name": name,
        "uid": pod.metadata.uid, "resourceVersion": pod.metadata.resource_version,
    });
    if let Some(f) = field_path {
        involved["fieldPath"] = json!(f);
    }
    json!({
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": format!("{name}.{suffix}"), "namespace": ns},
        "involvedObject": involved,
        "reason": reason,
        "message": message,
        "type": kind,
        "source": {"component": "kubelet", "host": node},
        "firstTimestamp": time(now),
        "lastTimestamp": time(now),
        "eventTime": serde_json::Value::Null,
        "count": 1,
        "reportingComponent": "kubelet",
        "reportingInstance": node,
    })
}

/// Posts an Event in the background; failures are only logged.
pub fn emit(
    client: &Client,
    pod: &Pod,
    node: &str,
    kind: &str,
    reason: &str,
    message: &str,
    field_path: Option<&str>,
) {
    let v = pod_event(pod, node, kind, reason, message, field_path, Utc::now());
    let ns = pod
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let api: Api<Event> = Api::namespaced(client.clone(), &ns);
    if kind == "Warning" {
        tracing::warn!(pod = ?pod.metadata.name, reason, "{message}");
    } else {
        tracing::info!(pod = ?pod.metadata.name, reason, "{message}");
    }
    tokio::spawn(async move {
        let ev: Event = match serde_json::from_value(v) {
            Ok(e) => e,
            Err(e) => return tracing::debug!("event: {e}"),
        };
        if let Err(e) = api.create(&PostParams::default(), &ev).await {
            tracing::debug!("posting event: {e}");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_shape() {
        let pod: Pod = serde_json::from_value(
            json!({"metadata": {"name": "web", "namespace": "shop", "uid": "u"}}),
        )
        .unwrap();
        let now = DateTime::from_timestamp(1_700_000_000, 5).unwrap();
        let e = pod_event(
            &pod,
            "n1",
            "Warning",
            "Failed",
            "boom",
            Some("spec.containers{c}"),
            now,
        );
        assert_eq!(e["involvedObject"]["name"], "web");
        assert_eq!(e["involvedObject"]["fieldPath"], "spec.containers{c}");
        assert_eq!(e["metadata"]["namespace"], "shop");
        assert!(e["metadata"]["name"].as_str().unwrap().starts_with("web."));
        assert_eq!(e["source"]["host"], "n1");
        let _: Event = serde_json::from_value(e).unwrap();
    }
}
