//! The DaemonSet controller: one pod per eligible node (nodeSelector, required
//! node affinity, NoSchedule/NoExecute taints the pod does not tolerate),
//! bound directly to its node as kube's controller does, replaced when the
//! template changes (RollingUpdate, one node at a time within maxUnavailable)
//! or when the pod ends.

use std::collections::HashSet;

use futures::future::BoxFuture;
use futures::FutureExt;
use serde_json::{json, Value};

use super::deployments::{template_hash, TEMPLATE_HASH_LABEL};
use super::replicasets::{is_active, owned_pods, pod_from_template};
use super::scheduler::node_eligible;
use super::{ids_of, object_id, owner_keys, str_at, write_status, Controller, ObjectId};
use crate::api::status::ApiResult;
use crate::cache::CacheEvent;
use crate::registry::{DeleteOptions, Registry, WriteOptions};
use crate::resources;

pub struct DaemonSetController;

/// What to do on one node.
#[derive(Debug, PartialEq, Eq)]
pub enum NodeAction {
    Create,
    /// The pod runs an old template (or the node is no longer eligible).
    Delete(String),
    Keep,
}

/// Per node: create, replace or keep, given the eligible nodes and the pods
/// the DaemonSet owns (pure; `hash` is the current template's hash).
pub fn plan(
    eligible: &[String],
    pods: &[Value],
    hash: &str,
    max_unavailable: usize,
) -> Vec<(String, NodeAction)> {
    let mut actions = Vec::new();
    let mut replacing = 0;
    for pod in pods {
        let node = str_at(pod, "/spec/nodeName").unwrap_or_default();
        if !eligible.iter().any(|n| n == node) {
            actions.push((
                node.to_string(),
                NodeAction::Delete(str_at(pod, "/metadata/name").unwrap_or_default().into()),
            ));
        }
    }
    for node in eligible {
        let here: Vec<&Value> = pods
            .iter()
            .filter(|p| str_at(p, "/spec/nodeName") == Some(node))
            .collect();
        let action = match here.as_slice() {
            [] => NodeAction::Create,
            [pod, ..]
                if str_at(pod, "/metadata/labels/pod-template-hash") != Some(hash)
                    && replacing < max_unavailable =>
            {
                replacing += 1;
                NodeAction::Delete(str_at(pod, "/metadata/name").unwrap_or_default().into())
            }
            _ => NodeAction::Keep,
        };
        actions.push((node.clone(), action));
    }
    actions
}

async fn reconcile(registry: &Registry, ns: &str, name: &str) -> ApiResult<()> {
    let ds_res = resources::find_kind("DaemonSet").unwrap();
    let pod_res = resources::find_kind("Pod").unwrap();
    let node_res = resources::find_kind("Node").unwrap();
    let Ok(ds) = registry.get(ds_res, Some(ns), name) else {
        return Ok(());
    };
    let ds = ds.value();
    if ds.pointer("/metadata/deletionTimestamp").is_some() {
        return Ok(());
    }
    let hash = template_hash(ds.pointer("/spec/template").unwrap_or(&Value::Null));
    let mut template_pod = pod_from_template(&ds, "apps/v1", "DaemonSet");
    template_pod["metadata"]["labels"][TEMPLATE_HASH_LABEL] = json!(hash);
    let nodes: Vec<Value> = registry
        .cache()
        .list(&node_res.key_prefix(), None)
        .0
        .iter()
        .map(|n| n.value())
        .collect();
    let eligible: Vec<String> = nodes
        .iter()
        .filter(|n| node_eligible(&template_pod, n))
        .filter_map(|n| str_at(n, "/metadata/name").map(str::to_string))
        .collect();
    let uid = str_at(&ds, "/metadata/uid").unwrap_or_default();
    let pods: Vec<Value> = owned_pods(registry, ns, uid)
        .into_iter()
        .filter(is_active)
        .collect();
    let max_unavailable = ds
        .pointer("/spec/updateStrategy/rollingUpdate/maxUnavailable")
        .and_then(Value::as_u64)
        .unwrap_or(1)
        .max(1) as usize;
    let on_delete = str_at(&ds, "/spec/updateStrategy/type") == Some("OnDelete");
    for (node, action) in plan(
        &eligible,
        &pods,
        &hash,
        if on_delete { 0 } else { max_unavailable },
    ) {
        match action {
            NodeAction::Keep => {}
            NodeAction::Create => {
                let mut pod = template_pod.clone();
                pod["spec"]["nodeName"] = json!(node);
                registry
                    .create(pod_res, Some(ns), pod, WriteOptions::default())
                    .await?;
            }
            NodeAction::Delete(pod) => match registry
                .delete(pod_res, Some(ns), &pod, &DeleteOptions::default())
                .await
            {
                Err(e) if e.code != 404 => return Err(e),
                _ => {}
            },
        }
    }
    update_status(registry, &ds, eligible.len(), &hash).await
}

async fn update_status(
    registry: &Registry,
    ds: &Value,
    desired: usize,
    hash: &str,
) -> ApiResult<()> {
    let (ns, _) = object_id(ds).unwrap_or_default();
    let uid = str_at(ds, "/metadata/uid").unwrap_or_default();
    let pods: Vec<Value> = owned_pods(registry, &ns, uid)
        .into_iter()
        .filter(is_active)
        .collect();
    let ready = |p: &&Value| {
        p.pointer("/status/conditions")
            .and_then(Value::as_array)
            .is_some_and(|c| {
                c.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            })
    };
    let updated = pods
        .iter()
        .filter(|p| str_at(p, "/metadata/labels/pod-template-hash") == Some(hash))
        .count();
    let ready_count = pods.iter().filter(ready).count();
    let status = json!({
        "desiredNumberScheduled": desired,
        "currentNumberScheduled": pods.len(),
        "numberMisscheduled": 0,
        "numberReady": ready_count,
        "numberAvailable": ready_count,
        "numberUnavailable": desired.saturating_sub(ready_count),
        "updatedNumberScheduled": updated,
        "observedGeneration": ds.pointer("/metadata/generation").cloned().unwrap_or(json!(1)),
    });
    write_status(registry, "DaemonSet", ds, status).await
}

impl Controller for DaemonSetController {
    type Key = ObjectId;
    const NAME: &'static str = "daemonset-controller";

    fn all_keys(&self, registry: &Registry) -> Vec<ObjectId> {
        ids_of(registry, "DaemonSet")
    }

    fn keys_for(&self, registry: &Registry, event: &CacheEvent, dirty: &mut HashSet<ObjectId>) {
        let nodes = resources::find_kind("Node").unwrap();
        if event.object.key.starts_with(&nodes.key_prefix()) {
            dirty.extend(self.all_keys(registry));
        } else {
            owner_keys(event, "DaemonSet", "Pod", dirty);
        }
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

    fn pod(name: &str, node: &str, hash: &str) -> Value {
        json!({"metadata": {"name": name, "labels": {"pod-template-hash": hash}}, "spec": {"nodeName": node}})
    }

    #[test]
    fn one_pod_per_eligible_node() {
        let nodes = vec!["a".to_string(), "b".to_string()];
        let actions = plan(&nodes, &[pod("p-a", "a", "h1")], "h1", 1);
        assert_eq!(
            actions,
            vec![
                ("a".into(), NodeAction::Keep),
                ("b".into(), NodeAction::Create)
            ]
        );
    }

    #[test]
    fn template_change_replaces_within_max_unavailable_and_ineligible_nodes_lose_pods() {
        let nodes = vec!["a".to_string(), "b".to_string()];
        let pods = [
            pod("p-a", "a", "old"),
            pod("p-b", "b", "old"),
            pod("p-c", "c", "new"),
        ];
        let actions = plan(&nodes, &pods, "new", 1);
        assert_eq!(
            actions,
            vec![
                ("c".into(), NodeAction::Delete("p-c".into())),
                ("a".into(), NodeAction::Delete("p-a".into())),
                ("b".into(), NodeAction::Keep),
            ]
        );
    }
}
