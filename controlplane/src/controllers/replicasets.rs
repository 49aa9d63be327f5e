//! The ReplicaSet controller: keeps `spec.replicas` pods from the template,
//! owned by the ReplicaSet, and reports how many are ready and available.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use futures::FutureExt;
use serde_json::{json, Value};

use super::{
    ids_of, object_id, owned_by, owner_keys, owner_reference, str_at, write_status, Controller,
    ObjectId,
};
use crate::api::status::ApiResult;
use crate::cache::CacheEvent;
use crate::registry::{DeleteOptions, Registry, WriteOptions};
use crate::resources;

pub struct ReplicaSetController;

pub fn is_active(pod: &Value) -> bool {
    pod.pointer("/metadata/deletionTimestamp").is_none()
        && !matches!(str_at(pod, "/status/phase"), Some("Succeeded" | "Failed"))
}

fn ready_since(pod: &Value) -> Option<DateTime<Utc>> {
    let ready = pod
        .pointer("/status/conditions")?
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Ready" && c["status"] == "True")?;
    Some(
        ready
            .get("lastTransitionTime")
            .and_then(Value::as_str)
            .and_then(|t| t.parse().ok())
            .unwrap_or(DateTime::<Utc>::MIN_UTC),
    )
}

/// Ready for at least `min_ready_seconds`.
pub fn is_available(pod: &Value, min_ready_seconds: i64, now: DateTime<Utc>) -> bool {
    ready_since(pod).is_some_and(|t| t + chrono::Duration::seconds(min_ready_seconds) <= now)
}

/// Which pods to remove first when scaling down: unscheduled, then not
/// ready, then the newest (kube's ranking, simplified).
pub fn deletion_order(pods: &mut [Value]) {
    pods.sort_by_key(|p| {
        let scheduled = str_at(p, "/spec/nodeName").is_some_and(|n| !n.is_empty());
        let ready = ready_since(p).is_some();
        let created = str_at(p, "/metadata/creationTimestamp")
            .unwrap_or("")
            .to_string();
        (scheduled, ready, std::cmp::Reverse(created))
    });
}

pub fn pod_from_template(owner: &Value, owner_api_version: &str, owner_kind: &str) -> Value {
    let template = owner
        .pointer("/spec/template")
        .cloned()
        .unwrap_or(json!({}));
    let name = str_at(owner, "/metadata/name").unwrap_or_default();
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "generateName": format!("{name}-"),
            "namespace": str_at(owner, "/metadata/namespace"),
            "labels": template.pointer("/metadata/labels").cloned().unwrap_or(json!({})),
            "annotations": template.pointer("/metadata/annotations").cloned().unwrap_or(json!({})),
            "ownerReferences": [owner_reference(owner, owner_api_version, owner_kind)],
        },
        "spec": template.get("spec").cloned().unwrap_or(json!({})),
    })
}

/// Pods of the namespace owned by the object with `uid`.
pub fn owned_pods(registry: &Registry, ns: &str, uid: &str) -> Vec<Value> {
    let pods = resources::find_kind("Pod").unwrap();
    registry
        .cache()
        .list(&pods.scope_prefix(Some(ns)), None)
        .0
        .iter()
        .map(|p| p.value())
        .filter(|p| owned_by(p, uid))
        .collect()
}

async fn reconcile(registry: &Registry, ns: &str, name: &str) -> ApiResult<()> {
    let rs_res = resources::find_kind("ReplicaSet").unwrap();
    let pod_res = resources::find_kind("Pod").unwrap();
    let Ok(rs) = registry.get(rs_res, Some(ns), name) else {
        return Ok(());
    };
    let rs = rs.value();
    if rs.pointer("/metadata/deletionTimestamp").is_some() {
        return Ok(());
    }
    let uid = str_at(&rs, "/metadata/uid").unwrap_or_default();
    let want = rs
        .pointer("/spec/replicas")
        .and_then(Value::as_i64)
        .unwrap_or(1)
        .max(0) as usize;
    let mut active: Vec<Value> = owned_pods(registry, ns, uid)
        .into_iter()
        .filter(is_active)
        .collect();
    if active.len() < want {
        for _ in active.len()..want {
            registry
                .create(
                    pod_res,
                    Some(ns),
                    pod_from_template(&rs, "apps/v1", "ReplicaSet"),
                    WriteOptions::default(),
                )
                .await?;
        }
    } else if active.len() > want {
        deletion_order(&mut active);
        for pod in active.drain(..active.len() - want) {
            let pod_name = str_at(&pod, "/metadata/name").unwrap_or_default();
            match registry
                .delete(pod_res, Some(ns), pod_name, &DeleteOptions::default())
                .await
            {
                Err(e) if e.code != 404 => return Err(e),
                _ => {}
            }
        }
    }
    update_status(registry, &rs).await
}

async fn update_status(registry: &Registry, rs: &Value) -> ApiResult<()> {
    let (ns, _) = object_id(rs).unwrap_or_default();
    let uid = str_at(rs, "/metadata/uid").unwrap_or_default();
    let min_ready = rs
        .pointer("/spec/minReadySeconds")
        .and_then(Value::as_i64)
        .unwrap_or(0);
    let now = Utc::now();
    let active: Vec<Value> = owned_pods(registry, &ns, uid)
        .into_iter()
        .filter(is_active)
        .collect();
    let ready = active.iter().filter(|p| ready_since(p).is_some()).count();
    let available = active
        .iter()
        .filter(|p| is_available(p, min_ready, now))
        .count();
    let status = json!({
        "replicas": active.len(),
        "fullyLabeledReplicas": active.len(),
        "readyReplicas": ready,
        "availableReplicas": available,
        "observedGeneration": rs.pointer("/metadata/generation").cloned().unwrap_or(json!(1)),
    });
    write_status(registry, "ReplicaSet", rs, status).await
}

impl Controller for ReplicaSetController {
    type Key = ObjectId;
    const NAME: &'static str = "replicaset-controller";

    fn all_keys(&self, registry: &Registry) -> Vec<ObjectId> {
        ids_of(registry, "ReplicaSet")
    }

    fn keys_for(&self, _registry: &Registry, event: &CacheEvent, dirty: &mut HashSet<ObjectId>) {
        owner_keys(event, "ReplicaSet", "Pod", dirty)
    }

    fn reconcile<'a>(
        &'a self,
        registry: &'a Registry,
        key: &'a ObjectId,
    ) -> BoxFuture<'a, ApiResult<()>> {
        reconcile(registry, &key.0, &key.1).boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_down_removes_unscheduled_then_unready_then_newest() {
        let pod = |name: &str, node: bool, ready: bool, created: &str| {
            json!({"metadata": {"name": name, "creationTimestamp": created},
                   "spec": if node { json!({"nodeName": "n1"}) } else { json!({}) },
                   "status": {"conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}})
        };
        let mut pods = vec![
            pod("old-ready", true, true, "2026-01-01T00:00:00Z"),
            pod("new-ready", true, true, "2026-01-02T00:00:00Z"),
            pod("unready", true, false, "2026-01-01T00:00:00Z"),
            pod("pending", false, false, "2026-01-01T00:00:00Z"),
        ];
        deletion_order(&mut pods);
        let order: Vec<&str> = pods
            .iter()
            .map(|p| p["metadata"]["name"].as_str().unwrap())
            .collect();
        assert_eq!(order, ["pending", "unready", "new-ready", "old-ready"]);
    }

    #[test]
    fn availability_waits_for_min_ready_seconds() {
        let now: DateTime<Utc> = "2026-01-01T00:00:10Z".parse().unwrap();
        let pod = json!({"status": {"conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:05Z"}]}});
        assert!(is_available(&pod, 5, now));
        assert!(!is_available(&pod, 6, now));
    }

    #[test]
    fn pods_carry_template_labels_and_an_owner() {
        let rs = json!({"metadata": {"name": "web-abc", "namespace": "ns", "uid": "u1"},
                        "spec": {"template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "c"}]}}}});
        let pod = pod_from_template(&rs, "apps/v1", "ReplicaSet");
        assert_eq!(pod["metadata"]["generateName"], "web-abc-");
        assert_eq!(pod["metadata"]["labels"]["app"], "web");
        assert_eq!(pod["metadata"]["ownerReferences"][0]["uid"], "u1");
        assert_eq!(pod["spec"]["containers"][0]["name"], "c");
    }
}
