//! The Deployment controller: one ReplicaSet per pod template (named by the
//! template's hash), rolled over with the strategy's surge and unavailability
//! bounds, old ReplicaSets kept as revision history for `kubectl rollout undo`.

use std::collections::HashSet;

use futures::future::BoxFuture;
use futures::FutureExt;
use serde_json::{json, Map, Value};

use super::{
    controller_of, ids_of, owner_keys, owner_reference, str_at, write_status, Controller, ObjectId,
};
use crate::api::status::ApiResult;
use crate::cache::CacheEvent;
use crate::registry::{DeleteOptions, Registry, WriteOptions};
use crate::resources;

pub struct DeploymentController;

pub const TEMPLATE_HASH_LABEL: &str = "pod-template-hash";
pub const REVISION_ANNOTATION: &str = "deployment.kubernetes.io/revision";

/// A stable hash of the pod template (FNV-1a over canonical JSON): the same
/// template always maps to the same ReplicaSet, also across restarts.
pub fn template_hash(template: &Value) -> String {
    fn canonical(v: &Value) -> Value {
        match v {
            Value::Object(m) => {
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort();
                Value::Object(
                    keys.into_iter()
                        .map(|k| (k.clone(), canonical(&m[k])))
                        .collect::<Map<_, _>>(),
                )
            }
            Value::Array(a) => Value::Array(a.iter().map(canonical).collect()),
            other => other.clone(),
        }
    }
    let mut hash: u32 = 0x811c_9dc5;
    for byte in canonical(template).to_string().bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    format!("{hash:08x}")
}

/// kube's int-or-percent resolution against `total`.
pub fn resolve_int_or_percent(v: Option<&Value>, total: i64, round_up: bool, default: i64) -> i64 {
    match v {
        Some(Value::Number(n)) => n.as_i64().unwrap_or(default),
        Some(Value::String(s)) => match s.strip_suffix('%').and_then(|p| p.parse::<i64>().ok()) {
            Some(pct) if round_up => (pct * total + 99) / 100,
            Some(pct) => pct * total / 100,
            None => s.parse().unwrap_or(default),
        },
        _ => default,
    }
}

/// A ReplicaSet as the rollout sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct RsState {
    pub name: String,
    pub replicas: i64,
    pub available: i64,
}

/// The next replica counts of a rolling update: scale the new ReplicaSet up
/// within maxSurge, scale old ones down (oldest first) within maxUnavailable.
pub fn rolling_step(
    replicas: i64,
    max_surge: i64,
    max_unavailable: i64,
    new: &RsState,
    olds: &[RsState],
) -> (i64, Vec<(String, i64)>) {
    let max_unavailable = if max_surge == 0 && max_unavailable == 0 {
        1
    } else {
        max_unavailable
    };
    let old_total: i64 = olds.iter().map(|o| o.replicas).sum();
    let total = new.replicas + old_total;
    let allowed = replicas + max_surge;
    let new_target = if new.replicas >= replicas {
        replicas
    } else if total < allowed {
        (new.replicas + allowed - total).min(replicas)
    } else {
        new.replicas
    };
    let min_available = replicas - max_unavailable;
    let new_unavailable = (new.replicas - new.available).max(0);
    let mut can_remove = (total - min_available - new_unavailable).max(0);
    let mut old_targets = Vec::new();
    for old in olds {
        let remove = can_remove.min(old.replicas);
        can_remove -= remove;
        old_targets.push((old.name.clone(), old.replicas - remove));
    }
    (new_target, old_targets)
}

fn revision(rs: &Value) -> i64 {
    rs.pointer("/metadata/annotations")
        .and_then(|a| a.get(REVISION_ANNOTATION))
        .and_then(Value::as_str)
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

fn rs_state(rs: &Value) -> RsState {
    RsState {
        name: str_at(rs, "/metadata/name").unwrap_or_default().to_string(),
        replicas: rs
            .pointer("/spec/replicas")
            .and_then(Value::as_i64)
            .unwrap_or(0),
        available: rs
            .pointer("/status/availableReplicas")
            .and_then(Value::as_i64)
            .unwrap_or(0),
    }
}

fn new_replica_set(deploy: &Value, hash: &str, revision: i64) -> Value {
    let name = str_at(deploy, "/metadata/name").unwrap_or_default();
    let mut template = deploy
        .pointer("/spec/template")
        .cloned()
        .unwrap_or(json!({}));
    template["metadata"]["labels"][TEMPLATE_HASH_LABEL] = json!(hash);
    let mut selector = deploy
        .pointer("/spec/selector")
        .cloned()
        .unwrap_or(json!({}));
    selector["matchLabels"][TEMPLATE_HASH_LABEL] = json!(hash);
    json!({
        "apiVersion": "apps/v1", "kind": "ReplicaSet",
        "metadata": {
            "name": format!("{name}-{hash}"),
            "namespace": str_at(deploy, "/metadata/namespace"),
            "labels": template["metadata"]["labels"].clone(),
            "annotations": {REVISION_ANNOTATION: revision.to_string()},
            "ownerReferences": [owner_reference(deploy, "apps/v1", "Deployment")],
        },
        "spec": {
            "replicas": 0,
            "minReadySeconds": deploy.pointer("/spec/minReadySeconds").cloned().unwrap_or(json!(0)),
            "selector": selector,
            "template": template,
        },
    })
}

async fn set_replicas(registry: &Registry, ns: &str, rs: &Value, replicas: i64) -> ApiResult<()> {
    if rs.pointer("/spec/replicas").and_then(Value::as_i64) == Some(replicas) {
        return Ok(());
    }
    let rs_res = resources::find_kind("ReplicaSet").unwrap();
    let mut updated = rs.clone();
    updated["spec"]["replicas"] = json!(replicas);
    let name = str_at(rs, "/metadata/name").unwrap_or_default().to_string();
    registry
        .update(
            rs_res,
            Some(ns),
            &name,
            updated,
            None,
            WriteOptions::default(),
        )
        .await
        .map(|_| ())
}

async fn reconcile(registry: &Registry, ns: &str, name: &str) -> ApiResult<()> {
    let d_res = resources::find_kind("Deployment").unwrap();
    let rs_res = resources::find_kind("ReplicaSet").unwrap();
    let Ok(deploy) = registry.get(d_res, Some(ns), name) else {
        return Ok(());
    };
    let deploy = deploy.value();
    if deploy.pointer("/metadata/deletionTimestamp").is_some() {
        return Ok(());
    }
    let id = (ns.to_string(), name.to_string());
    let mut owned: Vec<Value> = registry
        .cache()
        .list(&rs_res.scope_prefix(Some(ns)), None)
        .0
        .iter()
        .map(|r| r.value())
        .filter(|r| controller_of(r, "Deployment").as_ref() == Some(&id))
        .collect();
    owned.sort_by_key(revision);
    let hash = template_hash(deploy.pointer("/spec/template").unwrap_or(&Value::Null));
    let max_revision = owned.iter().map(revision).max().unwrap_or(0);
    let new_rs = match owned
        .iter()
        .position(|r| str_at(r, "/metadata/labels/pod-template-hash") == Some(&hash))
    {
        Some(i) => {
            let mut rs = owned.remove(i);
            // A rollback to an old template makes its ReplicaSet the newest revision.
            if revision(&rs) < max_revision {
                rs["metadata"]["annotations"][REVISION_ANNOTATION] =
                    json!((max_revision + 1).to_string());
                let rs_name = str_at(&rs, "/metadata/name")
                    .unwrap_or_default()
                    .to_string();
                rs = registry
                    .update(
                        rs_res,
                        Some(ns),
                        &rs_name,
                        rs,
                        None,
                        WriteOptions::default(),
                    )
                    .await?
                    .object();
            }
            rs
        }
        None => registry
            .create(
                rs_res,
                Some(ns),
                new_replica_set(&deploy, &hash, max_revision + 1),
                WriteOptions::default(),
            )
            .await?
            .object(),
    };
    let paused = deploy
        .pointer("/spec/paused")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if !paused {
        roll(registry, ns, &deploy, &new_rs, &owned).await?;
        prune_history(registry, ns, &deploy, &owned).await?;
    }
    update_deployment(registry, ns, &deploy, &new_rs, &owned).await
}

async fn roll(
    registry: &Registry,
    ns: &str,
    deploy: &Value,
    new_rs: &Value,
    olds: &[Value],
) -> ApiResult<()> {
    let replicas = deploy
        .pointer("/spec/replicas")
        .and_then(Value::as_i64)
        .unwrap_or(1);
    let recreate = str_at(deploy, "/spec/strategy/type") == Some("Recreate");
    if recreate {
        for old in olds {
            set_replicas(registry, ns, old, 0).await?;
        }
        let old_pods_left = olds.iter().any(|o| {
            o.pointer("/status/replicas")
                .and_then(Value::as_i64)
                .unwrap_or(0)
                > 0
        });
        if !old_pods_left {
            set_replicas(registry, ns, new_rs, replicas).await?;
        }
        return Ok(());
    }
    let surge = resolve_int_or_percent(
        deploy.pointer("/spec/strategy/rollingUpdate/maxSurge"),
        replicas,
        true,
        1,
    );
    let unavailable = resolve_int_or_percent(
        deploy.pointer("/spec/strategy/rollingUpdate/maxUnavailable"),
        replicas,
        false,
        0,
    );
    let old_states: Vec<RsState> = olds.iter().map(rs_state).collect();
    let (new_target, old_targets) =
        rolling_step(replicas, surge, unavailable, &rs_state(new_rs), &old_states);
    set_replicas(registry, ns, new_rs, new_target).await?;
    for (old, (_, target)) in olds.iter().zip(old_targets) {
        set_replicas(registry, ns, old, target).await?;
    }
    Ok(())
}

/// Keeps `revisionHistoryLimit` scaled-down old ReplicaSets, deleting older ones.
async fn prune_history(
    registry: &Registry,
    ns: &str,
    deploy: &Value,
    olds: &[Value],
) -> ApiResult<()> {
    let limit = deploy
        .pointer("/spec/revisionHistoryLimit")
        .and_then(Value::as_i64)
        .unwrap_or(10)
        .max(0) as usize;
    let idle: Vec<&Value> = olds
        .iter()
        .filter(|o| {
            o.pointer("/spec/replicas").and_then(Value::as_i64) == Some(0)
                && o.pointer("/status/replicas")
                    .and_then(Value::as_i64)
                    .unwrap_or(0)
                    == 0
        })
        .collect();
    let rs_res = resources::find_kind("ReplicaSet").unwrap();
    for old in idle.iter().take(idle.len().saturating_sub(limit)) {
        let name = str_at(old, "/metadata/name").unwrap_or_default();
        match registry
            .delete(rs_res, Some(ns), name, &DeleteOptions::default())
            .await
        {
            Err(e) if e.code != 404 => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

async fn update_deployment(
    registry: &Registry,
    ns: &str,
    deploy: &Value,
    new_rs: &Value,
    olds: &[Value],
) -> ApiResult<()> {
    let d_res = resources::find_kind("Deployment").unwrap();
    let name = str_at(deploy, "/metadata/name")
        .unwrap_or_default()
        .to_string();
    let sum = |field: &str| -> i64 {
        std::iter::once(new_rs)
            .chain(olds)
            .map(|r| {
                r.pointer(&format!("/status/{field}"))
                    .and_then(Value::as_i64)
                    .unwrap_or(0)
            })
            .sum()
    };
    let replicas = deploy
        .pointer("/spec/replicas")
        .and_then(Value::as_i64)
        .unwrap_or(1);
    let available = sum("availableReplicas");
    let updated = new_rs
        .pointer("/status/replicas")
        .and_then(Value::as_i64)
        .unwrap_or(0);
    let total = sum("replicas");
    let max_unavailable = resolve_int_or_percent(
        deploy.pointer("/spec/strategy/rollingUpdate/maxUnavailable"),
        replicas,
        false,
        0,
    );
    let complete = updated == replicas && total == replicas && available >= replicas;
    let condition = |kind: &str, ok: bool, reason: &str, message: String| json!({"type": kind, "status": if ok { "True" } else { "False" }, "reason": reason, "message": message});
    let status = json!({
        "observedGeneration": deploy.pointer("/metadata/generation").cloned().unwrap_or(json!(1)),
        "replicas": total,
        "updatedReplicas": updated,
        "readyReplicas": sum("readyReplicas"),
        "availableReplicas": available,
        "unavailableReplicas": (replicas - available).max(0),
        "conditions": [
            condition("Available", available >= replicas - max_unavailable, if available >= replicas - max_unavailable { "MinimumReplicasAvailable" } else { "MinimumReplicasUnavailable" },
                      format!("{available} of {replicas} replicas available")),
            condition("Progressing", true, if complete { "NewReplicaSetAvailable" } else { "ReplicaSetUpdated" },
                      format!("ReplicaSet \"{}\" is {}", str_at(new_rs, "/metadata/name").unwrap_or_default(), if complete { "up to date" } else { "progressing" })),
        ],
    });
    let revision = revision(new_rs).to_string();
    if deploy
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(REVISION_ANNOTATION))
        .and_then(Value::as_str)
        != Some(&revision)
    {
        let mut annotated = deploy.clone();
        annotated["metadata"]["annotations"][REVISION_ANNOTATION] = json!(revision);
        registry
            .update(
                d_res,
                Some(ns),
                &name,
                annotated,
                None,
                WriteOptions::default(),
            )
            .await?;
    }
    // Re-read: the revision annotation may have just been written.
    let Ok(current) = registry.get(d_res, Some(ns), &name) else {
        return Ok(());
    };
    write_status(registry, "Deployment", &current.value(), status).await
}

impl Controller for DeploymentController {
    type Key = ObjectId;
    const NAME: &'static str = "deployment-controller";

    fn all_keys(&self, registry: &Registry) -> Vec<ObjectId> {
        ids_of(registry, "Deployment")
    }

    fn keys_for(&self, _registry: &Registry, event: &CacheEvent, dirty: &mut HashSet<ObjectId>) {
        owner_keys(event, "Deployment", "ReplicaSet", dirty)
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

    fn rs(name: &str, replicas: i64, available: i64) -> RsState {
        RsState {
            name: name.into(),
            replicas,
            available,
        }
    }

    #[test]
    fn template_hash_ignores_key_order_and_tracks_content() {
        let a = json!({"metadata": {"labels": {"a": "1", "b": "2"}}, "spec": {"containers": [{"name": "c", "image": "x:1"}]}});
        let b = json!({"spec": {"containers": [{"image": "x:1", "name": "c"}]}, "metadata": {"labels": {"b": "2", "a": "1"}}});
        assert_eq!(template_hash(&a), template_hash(&b));
        let c = json!({"metadata": {"labels": {"a": "1", "b": "2"}}, "spec": {"containers": [{"name": "c", "image": "x:2"}]}});
        assert_ne!(template_hash(&a), template_hash(&c));
    }

    #[test]
    fn percentages_round_as_kube() {
        assert_eq!(resolve_int_or_percent(Some(&json!("25%")), 3, true, 0), 1);
        assert_eq!(resolve_int_or_percent(Some(&json!("25%")), 3, false, 0), 0);
        assert_eq!(resolve_int_or_percent(Some(&json!(2)), 3, false, 0), 2);
    }

    #[test]
    fn rolling_update_surges_then_drains_old() {
        // 4 replicas, surge 1, unavailable 1: the new RS may grow to 1 at once;
        // old may shrink by 1 (4 + 1 total, 3 must stay available).
        let (new, olds) = rolling_step(4, 1, 1, &rs("new", 0, 0), &[rs("old", 4, 4)]);
        assert_eq!(new, 1);
        assert_eq!(olds, vec![("old".to_string(), 3)]);
        // Once the new pod is available the next step continues.
        let (new, olds) = rolling_step(4, 1, 1, &rs("new", 1, 1), &[rs("old", 3, 3)]);
        assert_eq!((new, olds), (2, vec![("old".to_string(), 2)]));
        // Finished: everything on the new ReplicaSet.
        let (new, olds) = rolling_step(4, 1, 1, &rs("new", 4, 4), &[rs("old", 0, 0)]);
        assert_eq!((new, olds), (4, vec![("old".to_string(), 0)]));
    }

    #[test]
    fn unavailable_new_pods_block_draining() {
        let (new, olds) = rolling_step(2, 1, 0, &rs("new", 1, 0), &[rs("old", 2, 2)]);
        assert_eq!((new, olds), (1, vec![("old".to_string(), 2)]));
    }

    #[test]
    fn first_rollout_scales_straight_up() {
        let (new, olds) = rolling_step(3, 1, 0, &rs("new", 0, 0), &[]);
        assert_eq!((new, olds.len()), (3, 0));
    }
}
