//! The scheduler: binds each pending pod to a node.
//!
//! `choose_node` is a pure function: filter (node ready and schedulable,
//! nodeSelector, required node affinity, taints and tolerations, resource
//! requests fitting allocatable) then score (least allocated plus balanced
//! allocation, the formulas of kube-scheduler's NodeResourcesFit and
//! NodeResourcesBalancedAllocation plugins). A pod that fits nowhere gets a
//! PodScheduled=False condition and an Event that says why, per node count.

use std::collections::{BTreeMap, HashSet};

use futures::future::BoxFuture;
use futures::FutureExt;
use serde_json::{json, Value};

use super::{object_id, str_at, Controller, ObjectId};
use crate::api::status::ApiResult;
use crate::cache::CacheEvent;
use crate::registry::{now_rfc3339, Registry, WriteOptions};
use crate::resources::{self, Subresource};

pub struct Scheduler;

/// A quantity in milli-units (cpu) or bytes (memory).
pub fn parse_quantity(q: &Value) -> Option<i64> {
    let s = match q {
        Value::Number(n) => return n.as_f64().map(|f| (f * 1000.0) as i64),
        Value::String(s) => s.trim(),
        _ => return None,
    };
    const SUFFIXES: &[(&str, f64)] = &[
        ("Ki", 1024.0),
        ("Mi", 1048576.0),
        ("Gi", 1073741824.0),
        ("Ti", 1099511627776.0),
        ("m", 0.001),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
    ];
    let (number, factor) = SUFFIXES
        .iter()
        .find_map(|(suffix, f)| s.strip_suffix(suffix).map(|n| (n, *f)))
        .unwrap_or((s, 1.0));
    number
        .parse::<f64>()
        .ok()
        .map(|n| (n * factor * 1000.0).round() as i64)
}

/// cpu in millicores, memory in bytes ×1000 (both as milli-units).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Resources {
    pub cpu: i64,
    pub memory: i64,
}

/// What a pod's containers request. For scoring, kube-scheduler counts a
/// container without requests as 100m cpu and 200 MB so such pods still spread.
fn requests_with_default(pod: &Value, default: Resources) -> Resources {
    let mut total = Resources::default();
    for c in pod
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let req = c.pointer("/resources/requests");
        total.cpu += req
            .and_then(|r| r.get("cpu"))
            .and_then(parse_quantity)
            .unwrap_or(default.cpu);
        total.memory += req
            .and_then(|r| r.get("memory"))
            .and_then(parse_quantity)
            .unwrap_or(default.memory);
    }
    total
}

fn requests(pod: &Value) -> Resources {
    requests_with_default(pod, Resources::default())
}

/// What a node's pods take: their real requests (for fitting) and the
/// requests scoring counts.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    pub requested: Resources,
    pub scored: Resources,
    /// Running pods with the same controller as the pod being placed.
    pub siblings: i64,
}

/// Score taken off a node per sibling already on it, so replicas of one
/// workload spread over nodes (kube's default spreading: SelectorSpread /
/// PodTopologySpread on hostname).
const SIBLING_PENALTY: i64 = 100;

const SCORING_DEFAULT: Resources = Resources {
    cpu: 100,
    memory: 200 * 1_000_000 * 1000,
};

fn allocatable(node: &Value) -> Resources {
    let a = node
        .pointer("/status/allocatable")
        .or_else(|| node.pointer("/status/capacity"));
    Resources {
        // A node that reports nothing is treated as roomy rather than full.
        cpu: a
            .and_then(|a| a.get("cpu"))
            .and_then(parse_quantity)
            .unwrap_or(64_000),
        memory: a
            .and_then(|a| a.get("memory"))
            .and_then(parse_quantity)
            .unwrap_or(256 << 40),
    }
}

fn node_ready(node: &Value) -> bool {
    node.pointer("/status/conditions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

fn tolerates(pod: &Value, taint: &Value) -> bool {
    pod.pointer("/spec/tolerations")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .any(|t| {
            let key_ok = match t.get("key").and_then(Value::as_str) {
                None | Some("") => t["operator"] == "Exists",
                Some(k) => Some(k) == taint["key"].as_str(),
            };
            let value_ok = t["operator"] == "Exists" || t.get("value") == taint.get("value");
            let effect_ok = t
                .get("effect")
                .and_then(Value::as_str)
                .is_none_or(|e| e.is_empty() || Some(e) == taint["effect"].as_str());
            key_ok && value_ok && effect_ok
        })
}

fn label<'a>(node: &'a Value, key: &str) -> Option<&'a str> {
    node.pointer("/metadata/labels")?.get(key)?.as_str()
}

fn expression_matches(node: &Value, expr: &Value) -> bool {
    let key = expr["key"].as_str().unwrap_or_default();
    let values: Vec<&str> = expr["values"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let value = label(node, key);
    match expr["operator"].as_str().unwrap_or_default() {
        "In" => value.is_some_and(|v| values.contains(&v)),
        "NotIn" => !value.is_some_and(|v| values.contains(&v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" | "Lt" => {
            let (Some(v), Some(bound)) = (
                value.and_then(|v| v.parse::<i64>().ok()),
                values.first().and_then(|b| b.parse::<i64>().ok()),
            ) else {
                return false;
            };
            if expr["operator"] == "Gt" {
                v > bound
            } else {
                v < bound
            }
        }
        _ => false,
    }
}

/// Required node affinity: any term matches, all expressions of a term match.
fn affinity_matches(pod: &Value, node: &Value) -> bool {
    let Some(terms) = pod
        .pointer("/spec/affinity/nodeAffinity/requiredDuringSchedulingIgnoredDuringExecution/nodeSelectorTerms")
        .and_then(Value::as_array)
    else {
        return true;
    };
    terms.iter().any(|term| {
        term.get("matchExpressions")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .all(|e| expression_matches(node, e))
    })
}

fn selector_matches(pod: &Value, node: &Value) -> bool {
    pod.pointer("/spec/nodeSelector")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .all(|(k, v)| label(node, k) == v.as_str())
}

/// The first NoSchedule/NoExecute taint the pod does not tolerate, ignoring
/// taints with the keys in `ignored`.
fn untolerated_taint<'a>(pod: &Value, node: &'a Value, ignored: &[&str]) -> Option<&'a Value> {
    node.pointer("/spec/taints")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|t| !ignored.contains(&t["key"].as_str().unwrap_or_default()))
        .find(|t| {
            matches!(t["effect"].as_str(), Some("NoSchedule" | "NoExecute")) && !tolerates(pod, t)
        })
}

/// Whether a DaemonSet pod belongs on `node`: placement rules only, no
/// readiness or resources — daemon pods tolerate unreachable and not-ready
/// nodes, as kube's DaemonSet controller adds those tolerations.
pub fn node_eligible(pod: &Value, node: &Value) -> bool {
    const DAEMON_TOLERATED: &[&str] = &[
        "node.kubernetes.io/unreachable",
        "node.kubernetes.io/not-ready",
    ];
    selector_matches(pod, node)
        && affinity_matches(pod, node)
        && untolerated_taint(pod, node, DAEMON_TOLERATED).is_none()
}

/// Why a node was rejected, in kube-scheduler's words.
fn rejection(pod: &Value, node: &Value, used: Resources) -> Option<String> {
    if !node_ready(node) {
        return Some("node(s) were not ready".into());
    }
    if node.pointer("/spec/unschedulable").and_then(Value::as_bool) == Some(true) {
        return Some("node(s) were unschedulable".into());
    }
    if !selector_matches(pod, node) || !affinity_matches(pod, node) {
        return Some("node(s) didn't match Pod's node affinity/selector".into());
    }
    if let Some(t) = untolerated_taint(pod, node, &[]) {
        return Some(format!(
            "node(s) had untolerated taint {{{}: {}}}",
            t["key"].as_str().unwrap_or_default(),
            t["value"].as_str().unwrap_or_default()
        ));
    }
    let want = requests(pod);
    let cap = allocatable(node);
    if used.cpu + want.cpu > cap.cpu {
        return Some("Insufficient cpu".into());
    }
    if used.memory + want.memory > cap.memory {
        return Some("Insufficient memory".into());
    }
    None
}

/// kube-scheduler's LeastAllocated plus BalancedAllocation scores (0..=200).
fn score(pod: &Value, node: &Value, used: Resources) -> i64 {
    let cap = allocatable(node);
    let want = requests_with_default(pod, SCORING_DEFAULT);
    let fraction = |used: i64, cap: i64| {
        if cap == 0 {
            1.0
        } else {
            (used as f64 / cap as f64).min(1.0)
        }
    };
    let cpu = fraction(used.cpu + want.cpu, cap.cpu);
    let memory = fraction(used.memory + want.memory, cap.memory);
    let least_allocated = ((1.0 - cpu) + (1.0 - memory)) / 2.0 * 100.0;
    let balanced = (1.0 - (cpu - memory).abs()) * 100.0;
    (least_allocated + balanced).round() as i64
}

/// The best node for `pod`, or the reasons, counted, why none fits.
pub fn choose_node(
    pod: &Value,
    nodes: &[Value],
    used: &BTreeMap<String, Usage>,
) -> Result<String, String> {
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    let mut best: Option<(i64, &str)> = None;
    for node in nodes {
        let name = str_at(node, "/metadata/name").unwrap_or_default();
        let in_use = used.get(name).copied().unwrap_or_default();
        match rejection(pod, node, in_use.requested) {
            Some(why) => *reasons.entry(why).or_default() += 1,
            None => {
                let s = score(pod, node, in_use.scored) - SIBLING_PENALTY * in_use.siblings;
                if best.is_none_or(|(b, _)| s > b) {
                    best = Some((s, name));
                }
            }
        }
    }
    match best {
        Some((_, name)) => Ok(name.to_string()),
        None => {
            let detail: Vec<String> = reasons
                .iter()
                .map(|(why, n)| format!("{n} {why}"))
                .collect();
            Err(format!(
                "0/{} nodes are available: {}.",
                nodes.len(),
                detail.join(", ")
            ))
        }
    }
}

fn controller_uid(pod: &Value) -> Option<&str> {
    pod.pointer("/metadata/ownerReferences")?
        .as_array()?
        .iter()
        .find(|o| o["controller"] == true)?
        .get("uid")?
        .as_str()
}

/// What each node's pods take, and how many are siblings of `pod`.
fn usage(registry: &Registry, pod: &Value) -> BTreeMap<String, Usage> {
    let pods = resources::find_kind("Pod").unwrap();
    let owner = controller_uid(pod);
    let mut used: BTreeMap<String, Usage> = BTreeMap::new();
    for p in registry.cache().list(&pods.key_prefix(), None).0 {
        let p = p.value();
        if let Some(node) = str_at(&p, "/spec/nodeName").filter(|n| !n.is_empty()) {
            if matches!(str_at(&p, "/status/phase"), Some("Succeeded" | "Failed")) {
                continue;
            }
            let (real, scored) = (requests(&p), requests_with_default(&p, SCORING_DEFAULT));
            let entry = used.entry(node.to_string()).or_default();
            entry.requested.cpu += real.cpu;
            entry.requested.memory += real.memory;
            entry.scored.cpu += scored.cpu;
            entry.scored.memory += scored.memory;
            if owner.is_some()
                && controller_uid(&p) == owner
                && p.pointer("/metadata/deletionTimestamp").is_none()
            {
                entry.siblings += 1;
            }
        }
    }
    used
}

fn pending(pod: &Value) -> bool {
    str_at(pod, "/spec/nodeName").is_none_or(str::is_empty)
        && pod.pointer("/metadata/deletionTimestamp").is_none()
        && str_at(pod, "/spec/schedulerName").is_none_or(|s| s == "default-scheduler")
}

async fn reconcile(registry: &Registry, ns: &str, name: &str) -> ApiResult<()> {
    let pod_res = resources::find_kind("Pod").unwrap();
    let node_res = resources::find_kind("Node").unwrap();
    let Ok(pod) = registry.get(pod_res, Some(ns), name) else {
        return Ok(());
    };
    let pod = pod.value();
    if !pending(&pod) {
        return Ok(());
    }
    let nodes: Vec<Value> = registry
        .cache()
        .list(&node_res.key_prefix(), None)
        .0
        .iter()
        .map(|n| n.value())
        .collect();
    match choose_node(&pod, &nodes, &usage(registry, &pod)) {
        Ok(node) => registry.bind(ns, name, &node).await,
        Err(why) => mark_unschedulable(registry, &pod, &why).await,
    }
}

async fn mark_unschedulable(registry: &Registry, pod: &Value, why: &str) -> ApiResult<()> {
    let condition = pod
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .and_then(|c| c.iter().find(|c| c["type"] == "PodScheduled"));
    if condition.is_some_and(|c| c["message"] == why) {
        return Ok(());
    }
    let (ns, name) = object_id(pod).unwrap_or_default();
    let pod_res = resources::find_kind("Pod").unwrap();
    let mut updated = pod.clone();
    let mut conditions: Vec<Value> = pod
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|c| c["type"] != "PodScheduled")
        .collect();
    conditions.push(
        json!({"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                           "message": why, "lastTransitionTime": now_rfc3339()}),
    );
    updated["status"]["conditions"] = json!(conditions);
    registry
        .update(
            pod_res,
            Some(&ns),
            &name,
            updated,
            Some(Subresource::Status),
            WriteOptions::default(),
        )
        .await?;
    let event = json!({
        // kube names events `<object>.<hex time>`.
        "metadata": {"name": format!("{name}.{:x}", chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default()), "namespace": ns},
        "involvedObject": {"kind": "Pod", "namespace": ns, "name": name, "uid": str_at(pod, "/metadata/uid"), "apiVersion": "v1"},
        "reason": "FailedScheduling", "message": why, "type": "Warning",
        "source": {"component": "default-scheduler"}, "reportingComponent": "default-scheduler",
        "firstTimestamp": now_rfc3339(), "lastTimestamp": now_rfc3339(), "count": 1,
    });
    let events = resources::find_kind("Event").unwrap();
    registry
        .create(events, Some(&ns), event, WriteOptions::default())
        .await
        .map(|_| ())
}

impl Controller for Scheduler {
    type Key = ObjectId;
    const NAME: &'static str = "scheduler";

    fn all_keys(&self, registry: &Registry) -> Vec<ObjectId> {
        let pods = resources::find_kind("Pod").unwrap();
        registry
            .cache()
            .list(&pods.key_prefix(), None)
            .0
            .iter()
            .map(|p| p.value())
            .filter(pending)
            .filter_map(|p| object_id(&p))
            .collect()
    }

    fn keys_for(&self, registry: &Registry, event: &CacheEvent, dirty: &mut HashSet<ObjectId>) {
        let pods = resources::find_kind("Pod").unwrap();
        let nodes = resources::find_kind("Node").unwrap();
        if event.object.key.starts_with(&pods.key_prefix()) {
            let pod = event.object.value();
            if pending(&pod) && event.kind != crate::cache::WatchEventType::Deleted {
                dirty.extend(object_id(&pod));
            } else if event.kind == crate::cache::WatchEventType::Deleted {
                // Freed resources may let a waiting pod fit.
                dirty.extend(self.all_keys(registry));
            }
        } else if event.object.key.starts_with(&nodes.key_prefix()) {
            dirty.extend(self.all_keys(registry));
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

    fn node(name: &str, labels: Value, taints: Value, cpu: &str, memory: &str) -> Value {
        json!({"metadata": {"name": name, "labels": labels}, "spec": {"taints": taints},
               "status": {"conditions": [{"type": "Ready", "status": "True"}], "allocatable": {"cpu": cpu, "memory": memory}}})
    }

    fn pod(spec: Value) -> Value {
        json!({"metadata": {"name": "p"}, "spec": spec})
    }

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity(&json!("500m")), Some(500));
        assert_eq!(parse_quantity(&json!("2")), Some(2000));
        assert_eq!(parse_quantity(&json!("128Mi")), Some(128 * 1048576 * 1000));
        assert_eq!(parse_quantity(&json!("1G")), Some(1_000_000_000_000));
        assert_eq!(parse_quantity(&json!("x")), None);
    }

    #[test]
    fn node_selector_and_taints_filter() {
        let nodes = vec![
            node("a", json!({"storage": "hdd"}), json!([]), "4", "8Gi"),
            node(
                "b",
                json!({"storage": "ssd"}),
                json!([{"key": "dedicated", "value": "db", "effect": "NoSchedule"}]),
                "4",
                "8Gi",
            ),
        ];
        let wants_ssd = pod(json!({"nodeSelector": {"storage": "ssd"}, "containers": []}));
        let err = choose_node(&wants_ssd, &nodes, &BTreeMap::new()).unwrap_err();
        assert_eq!(err, "0/2 nodes are available: 1 node(s) didn't match Pod's node affinity/selector, 1 node(s) had untolerated taint {dedicated: db}.");
        let tolerant = pod(json!({"nodeSelector": {"storage": "ssd"}, "containers": [],
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "db", "effect": "NoSchedule"}]}));
        assert_eq!(
            choose_node(&tolerant, &nodes, &BTreeMap::new()).unwrap(),
            "b"
        );
    }

    #[test]
    fn required_affinity_and_resources() {
        let nodes = vec![
            node("small", json!({"zone": "z1"}), json!([]), "1", "1Gi"),
            node("big", json!({"zone": "z2"}), json!([]), "8", "32Gi"),
        ];
        let heavy = pod(
            json!({"containers": [{"name": "c", "resources": {"requests": {"cpu": "2", "memory": "1Gi"}}}]}),
        );
        assert_eq!(
            choose_node(&heavy, &nodes, &BTreeMap::new()).unwrap(),
            "big"
        );
        let z1 = pod(
            json!({"containers": [], "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "In", "values": ["z1"]}]}]}}}}),
        );
        assert_eq!(choose_node(&z1, &nodes, &BTreeMap::new()).unwrap(), "small");
    }

    #[test]
    fn pods_without_requests_still_spread() {
        let nodes = vec![
            node("a", json!({}), json!([]), "4", "8Gi"),
            node("b", json!({}), json!([]), "4", "8Gi"),
        ];
        let p = pod(json!({"containers": [{"name": "c"}]}));
        let one = Usage {
            requested: Resources::default(),
            scored: requests_with_default(&p, SCORING_DEFAULT),
            siblings: 0,
        };
        let used = BTreeMap::from([("a".to_string(), one)]);
        assert_eq!(choose_node(&p, &nodes, &used).unwrap(), "b");
    }

    #[test]
    fn replicas_spread_even_onto_a_busier_node() {
        let nodes = vec![
            node("a", json!({}), json!([]), "4", "8Gi"),
            node("b", json!({}), json!([]), "4", "8Gi"),
        ];
        let p = pod(json!({"containers": [{"name": "c"}]}));
        let busy = Resources {
            cpu: 1000,
            memory: 1073741824 * 1000,
        };
        let used = BTreeMap::from([
            (
                "a".to_string(),
                Usage {
                    requested: busy,
                    scored: busy,
                    siblings: 0,
                },
            ),
            (
                "b".to_string(),
                Usage {
                    requested: Resources::default(),
                    scored: Resources::default(),
                    siblings: 1,
                },
            ),
        ]);
        assert_eq!(choose_node(&p, &nodes, &used).unwrap(), "a");
    }

    #[test]
    fn scoring_spreads_onto_the_least_allocated_node() {
        let nodes = vec![
            node("a", json!({}), json!([]), "4", "8Gi"),
            node("b", json!({}), json!([]), "4", "8Gi"),
        ];
        let p = pod(
            json!({"containers": [{"name": "c", "resources": {"requests": {"cpu": "1", "memory": "1Gi"}}}]}),
        );
        let taken = Resources {
            cpu: 2000,
            memory: 2 * 1073741824 * 1000,
        };
        let used = BTreeMap::from([(
            "a".to_string(),
            Usage {
                requested: taken,
                scored: taken,
                siblings: 0,
            },
        )]);
        assert_eq!(choose_node(&p, &nodes, &used).unwrap(), "b");
    }
}
