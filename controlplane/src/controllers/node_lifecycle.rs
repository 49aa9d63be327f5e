//! Node lifecycle: a node whose heartbeat (its Lease in kube-node-lease, or
//! its Ready condition's heartbeat) is older than the grace period becomes
//! NotReady (Ready=Unknown) and gets the unreachable taints; its pods are
//! evicted after the eviction timeout so their controllers replace them
//! elsewhere. A node that heartbeats again gets its taints removed.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use super::str_at;
use crate::registry::{format_time, DeleteOptions, Registry, WriteOptions};
use crate::resources::{self, Subresource};

pub const UNREACHABLE_TAINT: &str = "node.kubernetes.io/unreachable";
const CHECK_EVERY: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy)]
pub struct LifecycleConfig {
    /// kube-controller-manager's --node-monitor-grace-period.
    pub grace: chrono::Duration,
    /// How long pods stay on an unreachable node before eviction.
    pub eviction_timeout: chrono::Duration,
}

fn parse_time(v: Option<&Value>) -> Option<DateTime<Utc>> {
    v?.as_str()?.parse().ok()
}

fn ready_condition(node: &Value) -> Option<&Value> {
    node.pointer("/status/conditions")?
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Ready")
}

/// The newest sign of life: the Lease's renewTime or the Ready heartbeat.
pub fn last_heartbeat(node: &Value, lease: Option<&Value>) -> Option<DateTime<Utc>> {
    let from_lease = lease.and_then(|l| parse_time(l.pointer("/spec/renewTime")));
    let from_status = ready_condition(node).and_then(|c| parse_time(c.get("lastHeartbeatTime")));
    from_lease.max(from_status)
}

fn has_unreachable_taint(node: &Value) -> bool {
    node.pointer("/spec/taints")
        .and_then(Value::as_array)
        .is_some_and(|t| t.iter().any(|t| t["key"] == UNREACHABLE_TAINT))
}

/// What the controller should do about one node now.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Healthy,
    /// Silent past the grace period and not yet marked.
    MarkUnreachable,
    /// Marked, and its pods are due for eviction.
    Evict,
    /// Marked, not yet due.
    Waiting,
    /// Heartbeating again after having been marked.
    Recovered,
}

pub fn judge(
    node: &Value,
    lease: Option<&Value>,
    now: DateTime<Utc>,
    cfg: &LifecycleConfig,
) -> Verdict {
    let marked = has_unreachable_taint(node);
    let Some(beat) = last_heartbeat(node, lease) else {
        // Never heartbeated: a node registered by hand, not by an agent.
        return Verdict::Healthy;
    };
    let silent_for = now - beat;
    match (silent_for > cfg.grace, marked) {
        (false, false) => Verdict::Healthy,
        (false, true) => Verdict::Recovered,
        (true, false) => Verdict::MarkUnreachable,
        (true, true) if silent_for > cfg.grace + cfg.eviction_timeout => Verdict::Evict,
        (true, true) => Verdict::Waiting,
    }
}

pub async fn run(registry: Arc<Registry>, cfg: LifecycleConfig) {
    let mut tick = tokio::time::interval(CHECK_EVERY);
    loop {
        tick.tick().await;
        if let Err(e) = pass(&registry, &cfg).await {
            tracing::debug!(error = %e, "node lifecycle pass incomplete");
        }
    }
}

async fn pass(
    registry: &Registry,
    cfg: &LifecycleConfig,
) -> Result<(), crate::api::status::ApiError> {
    let nodes = resources::find_kind("Node").unwrap();
    let leases = resources::find_kind("Lease").unwrap();
    let now = Utc::now();
    for node in registry.cache().list(&nodes.key_prefix(), None).0 {
        let node = node.value();
        let name = str_at(&node, "/metadata/name")
            .unwrap_or_default()
            .to_string();
        let lease = registry
            .cache()
            .get(&leases.object_key(Some("kube-node-lease"), &name))
            .map(|l| l.value());
        match judge(&node, lease.as_ref(), now, cfg) {
            Verdict::Healthy | Verdict::Waiting => {}
            Verdict::MarkUnreachable => mark(registry, &node, true, now).await?,
            Verdict::Recovered => mark(registry, &node, false, now).await?,
            Verdict::Evict => evict_pods(registry, &name).await?,
        }
    }
    Ok(())
}

/// Adds (or removes) the unreachable taints and sets Ready=Unknown.
async fn mark(
    registry: &Registry,
    node: &Value,
    unreachable: bool,
    now: DateTime<Utc>,
) -> Result<(), crate::api::status::ApiError> {
    let res = resources::find_kind("Node").unwrap();
    let name = str_at(node, "/metadata/name")
        .unwrap_or_default()
        .to_string();
    let mut updated = node.clone();
    let mut taints: Vec<Value> = node
        .pointer("/spec/taints")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|t| t["key"] != UNREACHABLE_TAINT)
        .collect();
    if unreachable {
        for effect in ["NoSchedule", "NoExecute"] {
            taints.push(
                json!({"key": UNREACHABLE_TAINT, "effect": effect, "timeAdded": format_time(now)}),
            );
        }
        tracing::info!(node = %name, "node stopped heartbeating: NotReady, tainted unreachable");
    } else {
        tracing::info!(node = %name, "node heartbeats again: taints removed");
    }
    updated["spec"]["taints"] = json!(taints);
    let written = registry
        .update(res, None, &name, updated, None, WriteOptions::default())
        .await?
        .object();
    if !unreachable {
        return Ok(());
    }
    let mut with_status = written;
    if let Some(conditions) = with_status
        .pointer_mut("/status/conditions")
        .and_then(Value::as_array_mut)
    {
        for c in conditions.iter_mut().filter(|c| c["type"] == "Ready") {
            c["status"] = json!("Unknown");
            c["reason"] = json!("NodeStatusUnknown");
            c["message"] = json!("Kubelet stopped posting node status.");
            c["lastTransitionTime"] = json!(format_time(now));
        }
    }
    registry
        .update(
            res,
            None,
            &name,
            with_status,
            Some(Subresource::Status),
            WriteOptions::default(),
        )
        .await
        .map(|_| ())
}

/// Deletes the pods bound to an unreachable node; their owners replace them.
async fn evict_pods(registry: &Registry, node: &str) -> Result<(), crate::api::status::ApiError> {
    let pods = resources::find_kind("Pod").unwrap();
    for pod in registry.cache().list(&pods.key_prefix(), None).0 {
        let pod = pod.value();
        if str_at(&pod, "/spec/nodeName") != Some(node)
            || pod.pointer("/metadata/deletionTimestamp").is_some()
        {
            continue;
        }
        let (ns, name) = super::object_id(&pod).unwrap_or_default();
        tracing::info!(%node, pod = %format!("{ns}/{name}"), "evicting a pod from an unreachable node");
        match registry
            .delete(pods, Some(&ns), &name, &DeleteOptions::default())
            .await
        {
            Err(e) if e.code != 404 => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> LifecycleConfig {
        LifecycleConfig {
            grace: chrono::Duration::seconds(40),
            eviction_timeout: chrono::Duration::seconds(30),
        }
    }

    fn node(tainted: bool) -> Value {
        let taints = if tainted {
            json!([{"key": UNREACHABLE_TAINT, "effect": "NoExecute"}])
        } else {
            json!([])
        };
        json!({"metadata": {"name": "n"}, "spec": {"taints": taints},
               "status": {"conditions": [{"type": "Ready", "status": "True", "lastHeartbeatTime": "2026-01-01T00:00:00Z"}]}})
    }

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn lease_renewals_count_as_heartbeats() {
        let lease = json!({"spec": {"renewTime": "2026-01-01T00:01:00.000000Z"}});
        assert_eq!(
            judge(
                &node(false),
                Some(&lease),
                at("2026-01-01T00:01:30Z"),
                &cfg()
            ),
            Verdict::Healthy
        );
        assert_eq!(
            judge(&node(false), None, at("2026-01-01T00:01:30Z"), &cfg()),
            Verdict::MarkUnreachable
        );
    }

    #[test]
    fn marked_nodes_wait_then_evict_or_recover() {
        assert_eq!(
            judge(&node(true), None, at("2026-01-01T00:01:00Z"), &cfg()),
            Verdict::Waiting
        );
        assert_eq!(
            judge(&node(true), None, at("2026-01-01T00:01:11Z"), &cfg()),
            Verdict::Evict
        );
        let lease = json!({"spec": {"renewTime": "2026-01-01T00:02:00Z"}});
        assert_eq!(
            judge(
                &node(true),
                Some(&lease),
                at("2026-01-01T00:02:05Z"),
                &cfg()
            ),
            Verdict::Recovered
        );
    }

    #[test]
    fn hand_registered_nodes_are_left_alone() {
        let n = json!({"metadata": {"name": "n"}});
        assert_eq!(
            judge(&n, None, at("2030-01-01T00:00:00Z"), &cfg()),
            Verdict::Healthy
        );
    }
}
