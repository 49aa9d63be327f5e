//! The EndpointSlice controller (and the legacy Endpoints beside it): from a
//! Service's selector and the Pods it selects, the endpoints proxies use.
//!
//! `desired` is a pure function of (service, pods, node zones); the loop
//! around it reacts to every change of a Service, Pod or Node within a few
//! milliseconds and writes only what differs.

use futures::future::BoxFuture;
use futures::FutureExt;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashMap, HashSet};

use super::{owner_reference, str_at, Controller, ObjectId};
use crate::api::status::ApiResult;

use crate::cache::{CacheEvent, WatchEventType};
use crate::registry::{now_rfc3339, DeleteOptions, Registry, WriteOptions};
use crate::resources::{self, ResourceInfo};
use crate::selector::LabelSelector;

pub const MANAGED_BY: &str = "endpointslice-controller.k8s.io";
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
const MAX_ENDPOINTS_PER_SLICE: usize = 100;
const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

fn selector_matches(selector: &Map<String, Value>, pod: &Value) -> bool {
    let labels = pod.pointer("/metadata/labels").and_then(Value::as_object);
    selector
        .iter()
        .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
}

fn pod_ready(pod: &Value) -> bool {
    pod.pointer("/status/conditions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

/// The port a service port reaches on one pod: a number, or a named container
/// port looked up in the pod (None when the pod has no port of that name).
fn resolve_target_port(service_port: &Value, pod: &Value) -> Option<i64> {
    let target = service_port
        .get("targetPort")
        .or_else(|| service_port.get("port"))?;
    if let Some(n) = target.as_i64() {
        return Some(n);
    }
    let name = target.as_str()?;
    if let Ok(n) = name.parse() {
        return Some(n);
    }
    let protocol = service_port
        .get("protocol")
        .and_then(Value::as_str)
        .unwrap_or("TCP");
    pod.pointer("/spec/containers")?
        .as_array()?
        .iter()
        .flat_map(|c| {
            c.get("ports")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
        })
        .find(|p| {
            p["name"] == name
                && p.get("protocol").and_then(Value::as_str).unwrap_or("TCP") == protocol
        })
        .and_then(|p| p.get("containerPort")?.as_i64())
}

/// One subset of the legacy Endpoints object.
#[derive(Debug, Default)]
struct Subset {
    ports: Vec<Value>,
    ready: Vec<Value>,
    not_ready: Vec<Value>,
}

/// One slice's worth of content, before naming.
#[derive(Debug, Clone, PartialEq)]
pub struct SliceContent {
    pub ports: Vec<Value>,
    pub endpoints: Vec<Value>,
}

/// The endpoint slices and the Endpoints object a service should have.
pub fn desired(
    service: &Value,
    pods: &[Value],
    zones: &HashMap<String, String>,
) -> (Vec<SliceContent>, Value) {
    let service_ports: Vec<Value> = service
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let publish_not_ready = service
        .pointer("/spec/publishNotReadyAddresses")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    // Pods whose named ports resolve differently land in different slices.
    let mut by_ports: BTreeMap<String, (Vec<Value>, Vec<Value>)> = BTreeMap::new();
    let mut subsets: BTreeMap<String, Subset> = BTreeMap::new();
    for pod in pods {
        let Some(ip) = str_at(pod, "/status/podIP").filter(|ip| !ip.is_empty()) else {
            continue;
        };
        if matches!(str_at(pod, "/status/phase"), Some("Succeeded" | "Failed")) {
            continue;
        }
        let ports: Vec<Value> = service_ports
            .iter()
            .filter_map(|sp| {
                let port = resolve_target_port(sp, pod)?;
                let mut p = json!({"port": port, "protocol": sp.get("protocol").cloned().unwrap_or(json!("TCP"))});
                if let Some(name) = sp.get("name") {
                    p["name"] = name.clone();
                }
                if let Some(app) = sp.get("appProtocol") {
                    p["appProtocol"] = app.clone();
                }
                Some(p)
            })
            .collect();
        let terminating = pod.pointer("/metadata/deletionTimestamp").is_some();
        let serving = pod_ready(pod) || publish_not_ready;
        let ready = serving && !terminating;
        let node = str_at(pod, "/spec/nodeName").unwrap_or_default();
        let target_ref = json!({
            "kind": "Pod",
            "namespace": str_at(pod, "/metadata/namespace").unwrap_or_default(),
            "name": str_at(pod, "/metadata/name").unwrap_or_default(),
            "uid": str_at(pod, "/metadata/uid").unwrap_or_default(),
        });
        let mut endpoint = json!({
            "addresses": [ip],
            "conditions": {"ready": ready, "serving": serving, "terminating": terminating},
            "targetRef": target_ref,
        });
        if !node.is_empty() {
            endpoint["nodeName"] = json!(node);
            if let Some(zone) = zones.get(node) {
                endpoint["zone"] = json!(zone);
            }
        }
        let key = serde_json::to_string(&ports).unwrap_or_default();
        let entry = by_ports
            .entry(key.clone())
            .or_insert_with(|| (ports.clone(), Vec::new()));
        entry.1.push(endpoint);
        // Legacy Endpoints: ready addresses, not-ready ones, terminating ones left out.
        if !terminating {
            let subset = subsets.entry(key).or_insert_with(|| Subset {
                ports,
                ..Subset::default()
            });
            let mut address = json!({"ip": ip, "targetRef": target_ref});
            if !node.is_empty() {
                address["nodeName"] = json!(node);
            }
            if ready {
                subset.ready.push(address);
            } else {
                subset.not_ready.push(address);
            }
        }
    }
    let mut slices = Vec::new();
    for (_, (ports, mut endpoints)) in by_ports {
        endpoints.sort_by(|a, b| a["addresses"][0].as_str().cmp(&b["addresses"][0].as_str()));
        for chunk in endpoints.chunks(MAX_ENDPOINTS_PER_SLICE) {
            slices.push(SliceContent {
                ports: ports.clone(),
                endpoints: chunk.to_vec(),
            });
        }
    }
    let subsets: Vec<Value> = subsets
        .into_values()
        .filter(|s| !s.ready.is_empty() || !s.not_ready.is_empty())
        .map(|s| {
            let mut subset = json!({"ports": s.ports});
            if !s.ready.is_empty() {
                subset["addresses"] = json!(s.ready);
            }
            if !s.not_ready.is_empty() {
                subset["notReadyAddresses"] = json!(s.not_ready);
            }
            subset
        })
        .collect();
    (slices, json!(subsets))
}

/// The selectors of the Services that have one, by namespace and name. A pod
/// change is matched against these: parsing every Service of the namespace per
/// pod event cost ~10 ms per thousand Services. Selectorless Services (their
/// endpoints are the user's) are not here and are never reconciled for a pod.
type SelectorIndex = HashMap<String, HashMap<String, Map<String, Value>>>;

#[derive(Default)]
pub struct EndpointSliceController {
    selectors: std::sync::Mutex<SelectorIndex>,
}

fn selector_of(svc: &Value) -> Option<Map<String, Value>> {
    svc.pointer("/spec/selector")
        .and_then(Value::as_object)
        .filter(|s| !s.is_empty())
        .cloned()
}

impl Controller for EndpointSliceController {
    type Key = ObjectId;
    const NAME: &'static str = "endpointslice-controller";
    /// Services are independent (kube-controller-manager runs 5 workers).
    const CONCURRENCY: usize = 16;

    /// Services with a selector, and those whose managed slices remain (a
    /// selector removed while the controller was down); rebuilds the index.
    fn all_keys(&self, registry: &Registry) -> Vec<ObjectId> {
        let svc_res = resources::find_kind("Service").unwrap();
        let slice_res = resources::find_kind("EndpointSlice").unwrap();
        let mut index = SelectorIndex::new();
        let mut keys: HashSet<ObjectId> = HashSet::new();
        for svc in registry.cache().list(&svc_res.key_prefix(), None).0 {
            let svc = svc.value();
            if let (Some(id), Some(sel)) = (service_id(&svc), selector_of(&svc)) {
                index
                    .entry(id.0.clone())
                    .or_default()
                    .insert(id.1.clone(), sel);
                keys.insert(id);
            }
        }
        let managed = LabelSelector::parse(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}"))
            .expect("a valid selector");
        for slice in registry.select(slice_res, None, &managed) {
            let slice = slice.value();
            let label = format!("/metadata/labels/{}", SERVICE_NAME_LABEL.replace('/', "~1"));
            if let (Some(ns), Some(svc)) = (
                str_at(&slice, "/metadata/namespace"),
                str_at(&slice, &label),
            ) {
                keys.insert((ns.to_string(), svc.to_string()));
            }
        }
        *self.selectors.lock().unwrap() = index;
        keys.into_iter().collect()
    }

    fn keys_for(&self, _: &Registry, event: &CacheEvent, dirty: &mut HashSet<ObjectId>) {
        mark_dirty(&self.selectors, event, dirty)
    }

    fn reconcile<'a>(
        &'a self,
        registry: &'a Registry,
        key: &'a ObjectId,
    ) -> BoxFuture<'a, ApiResult<()>> {
        reconcile(registry, &key.0, &key.1).boxed()
    }
}

fn service_id(svc: &Value) -> Option<(String, String)> {
    Some((
        str_at(svc, "/metadata/namespace")?.to_string(),
        str_at(svc, "/metadata/name")?.to_string(),
    ))
}

/// Which services a change may affect, keeping the selector index current.
fn mark_dirty(
    selectors: &std::sync::Mutex<SelectorIndex>,
    event: &CacheEvent,
    dirty: &mut HashSet<ObjectId>,
) {
    let key = &event.object.key;
    let pods_prefix = resources::find_kind("Pod").unwrap().key_prefix();
    let svc_res = resources::find_kind("Service").unwrap();
    if key.starts_with(&svc_res.key_prefix()) {
        let svc = event.object.value();
        let Some((ns, name)) = service_id(&svc) else {
            return;
        };
        let selector = selector_of(&svc).filter(|_| event.kind != WatchEventType::Deleted);
        let mut index = selectors.lock().unwrap();
        let had = match &selector {
            Some(sel) => index
                .entry(ns.clone())
                .or_default()
                .insert(name.clone(), sel.clone())
                .is_some(),
            None => index.get_mut(&ns).and_then(|m| m.remove(&name)).is_some(),
        };
        // Selectorless before and after: its endpoints are the user's.
        if had || selector.is_some() {
            dirty.insert((ns, name));
        }
    } else if key.starts_with(&pods_prefix) {
        let pod = event.object.value();
        let before = event.prev.as_ref().map(|p| p.value());
        let Some(ns) = str_at(&pod, "/metadata/namespace") else {
            return;
        };
        let index = selectors.lock().unwrap();
        for (name, selector) in index.get(ns).into_iter().flatten() {
            if selector_matches(selector, &pod)
                || before
                    .as_ref()
                    .is_some_and(|b| selector_matches(selector, b))
            {
                dirty.insert((ns.to_string(), name.clone()));
            }
        }
    } else if key.starts_with(&resources::find_kind("Node").unwrap().key_prefix()) {
        // A zone label change: rare, so recompute every service with a selector.
        let index = selectors.lock().unwrap();
        for (ns, names) in index.iter() {
            dirty.extend(names.keys().map(|n| (ns.clone(), n.clone())));
        }
    }
}

fn node_zones(registry: &Registry) -> HashMap<String, String> {
    let nodes = resources::find_kind("Node").unwrap();
    registry
        .cache()
        .list(&nodes.key_prefix(), None)
        .0
        .iter()
        .filter_map(|n| {
            let n = n.value();
            Some((
                str_at(&n, "/metadata/name")?.to_string(),
                n.pointer("/metadata/labels")?
                    .get(ZONE_LABEL)?
                    .as_str()?
                    .to_string(),
            ))
        })
        .collect()
}

async fn reconcile(
    registry: &Registry,
    ns: &str,
    name: &str,
) -> Result<(), crate::api::status::ApiError> {
    let svc_res = resources::find_kind("Service").unwrap();
    let slice_res = resources::find_kind("EndpointSlice").unwrap();
    let ep_res = resources::find_kind("Endpoints").unwrap();
    let ours = LabelSelector::parse(&format!(
        "{SERVICE_NAME_LABEL}={name},{MANAGED_BY_LABEL}={MANAGED_BY}"
    ))
    .expect("a valid selector");
    // Our slices are named `<service>-<random>` (generateName): a range of the
    // cache instead of every slice in the namespace (20,000 in the bench).
    let prefix = format!("{}{name}-", slice_res.scope_prefix(Some(ns)));
    let existing: Vec<Value> = registry
        .cache()
        .list(&prefix, None)
        .0
        .iter()
        .filter(|o| ours.matches(&o.labels))
        .map(|o| o.value())
        .collect();
    let service = registry
        .cache()
        .get(&svc_res.object_key(Some(ns), name))
        .map(|s| s.value());
    let selector = service
        .as_ref()
        .and_then(|s| s.pointer("/spec/selector"))
        .and_then(Value::as_object)
        .filter(|s| !s.is_empty())
        .cloned();
    let Some(service) = service else {
        // The service is gone: so are its endpoints.
        for slice in &existing {
            delete(registry, slice_res, ns, slice).await?;
        }
        if let Ok(ep) = registry.get(ep_res, Some(ns), name) {
            delete(registry, ep_res, ns, &ep.value()).await?;
        }
        return Ok(());
    };
    let Some(selector) = selector else {
        // Selectorless: its endpoints are the user's to manage.
        for slice in &existing {
            delete(registry, slice_res, ns, slice).await?;
        }
        return Ok(());
    };
    let pod_res = resources::find_kind("Pod").unwrap();
    let pods: Vec<Value> = registry
        .cache()
        .list(&pod_res.scope_prefix(Some(ns)), None)
        .0
        .iter()
        .map(|p| p.value())
        .filter(|p| selector_matches(&selector, p))
        .collect();
    let (slices, subsets) = desired(&service, &pods, &node_zones(registry));
    write_slices(registry, slice_res, &service, ns, name, existing, slices).await?;
    write_endpoints(registry, ep_res, &service, ns, name, subsets).await
}

async fn write_slices(
    registry: &Registry,
    slice_res: &'static ResourceInfo,
    service: &Value,
    ns: &str,
    name: &str,
    existing: Vec<Value>,
    mut wanted: Vec<SliceContent>,
) -> Result<(), crate::api::status::ApiError> {
    // A service without endpoints keeps one empty slice, as kube does.
    if wanted.is_empty() {
        wanted.push(SliceContent {
            ports: Vec::new(),
            endpoints: Vec::new(),
        });
    }
    let mut existing = existing.into_iter();
    for content in wanted {
        let unchanged = |s: &Value| {
            s.get("endpoints").cloned().unwrap_or(json!([])) == json!(content.endpoints)
                && s.get("ports").cloned().unwrap_or(json!([])) == json!(content.ports)
        };
        match existing.next() {
            Some(current) if unchanged(&current) => {}
            Some(mut current) => {
                current["endpoints"] = json!(content.endpoints);
                current["ports"] = json!(content.ports);
                current["metadata"]["annotations"]
                    ["endpoints.kubernetes.io/last-change-trigger-time"] = json!(now_rfc3339());
                let slice_name = str_at(&current, "/metadata/name")
                    .unwrap_or_default()
                    .to_string();
                registry
                    .update(
                        slice_res,
                        Some(ns),
                        &slice_name,
                        current,
                        None,
                        WriteOptions::default(),
                    )
                    .await?;
            }
            None => {
                let slice = json!({
                    "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                    "metadata": {
                        "generateName": format!("{name}-"), "namespace": ns,
                        "labels": {SERVICE_NAME_LABEL: name, MANAGED_BY_LABEL: MANAGED_BY},
                        "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": now_rfc3339()},
                        "ownerReferences": [owner_reference(service, "v1", "Service")],
                    },
                    "addressType": "IPv4",
                    "endpoints": content.endpoints,
                    "ports": content.ports,
                });
                registry
                    .create(slice_res, Some(ns), slice, WriteOptions::default())
                    .await?;
            }
        }
    }
    let leftover: Vec<Value> = existing.collect();
    for slice in leftover {
        delete(registry, slice_res, ns, &slice).await?;
    }
    Ok(())
}

async fn delete(
    registry: &Registry,
    res: &'static ResourceInfo,
    ns: &str,
    obj: &Value,
) -> Result<(), crate::api::status::ApiError> {
    let name = str_at(obj, "/metadata/name").unwrap_or_default();
    match registry
        .delete(res, Some(ns), name, &DeleteOptions::default())
        .await
    {
        Err(e) if e.code != 404 => Err(e),
        _ => Ok(()),
    }
}

async fn write_endpoints(
    registry: &Registry,
    ep_res: &'static ResourceInfo,
    service: &Value,
    ns: &str,
    name: &str,
    subsets: Value,
) -> Result<(), crate::api::status::ApiError> {
    let current = registry.get(ep_res, Some(ns), name).ok().map(|e| e.value());
    if current
        .as_ref()
        .is_some_and(|c| c.get("subsets").cloned().unwrap_or(json!([])) == subsets)
    {
        return Ok(());
    }
    let mut endpoints = current.unwrap_or_else(|| {
        json!({
            "apiVersion": "v1", "kind": "Endpoints",
            "metadata": {"name": name, "namespace": ns, "labels": service.pointer("/metadata/labels").cloned().unwrap_or(json!({}))},
        })
    });
    endpoints["subsets"] = subsets;
    endpoints["metadata"]["annotations"]["endpoints.kubernetes.io/last-change-trigger-time"] =
        json!(now_rfc3339());
    registry
        .update(
            ep_res,
            Some(ns),
            name,
            endpoints,
            None,
            WriteOptions::default(),
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, ip: &str, ready: bool, labels: Value) -> Value {
        json!({
            "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}"), "labels": labels},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"phase": "Running", "podIP": ip,
                       "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]},
        })
    }

    fn service() -> Value {
        json!({"metadata": {"name": "web", "namespace": "default"},
               "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]}})
    }

    #[test]
    fn named_ports_resolve_and_conditions_follow_readiness() {
        let pods = vec![
            pod("a", "10.244.1.2", true, json!({"app": "web"})),
            pod("b", "10.244.1.3", false, json!({"app": "web"})),
        ];
        let zones = HashMap::from([("n1".to_string(), "z1".to_string())]);
        let (slices, subsets) = desired(&service(), &pods, &zones);
        assert_eq!(slices.len(), 1);
        assert_eq!(
            slices[0].ports,
            vec![json!({"port": 8080, "protocol": "TCP", "name": "http"})]
        );
        let e = &slices[0].endpoints;
        assert_eq!(
            e[0]["conditions"],
            json!({"ready": true, "serving": true, "terminating": false})
        );
        assert_eq!(e[1]["conditions"]["ready"], false);
        assert_eq!(
            (e[0]["zone"].as_str(), e[0]["nodeName"].as_str()),
            (Some("z1"), Some("n1"))
        );
        assert_eq!(subsets[0]["addresses"][0]["ip"], "10.244.1.2");
        assert_eq!(subsets[0]["notReadyAddresses"][0]["ip"], "10.244.1.3");
    }

    #[test]
    fn terminating_pods_stay_in_slices_but_not_in_endpoints() {
        let mut p = pod("a", "10.244.1.2", true, json!({"app": "web"}));
        p["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        let (slices, subsets) = desired(&service(), &[p], &HashMap::new());
        assert_eq!(
            slices[0].endpoints[0]["conditions"],
            json!({"ready": false, "serving": true, "terminating": true})
        );
        assert_eq!(subsets, json!([]));
    }

    #[test]
    fn pods_without_ip_are_skipped_and_slices_hold_at_most_100() {
        let mut pods: Vec<Value> = (0..250)
            .map(|i| {
                pod(
                    &format!("p{i}"),
                    &format!("10.244.{}.{}", i / 200, i % 200 + 1),
                    true,
                    json!({"app": "web"}),
                )
            })
            .collect();
        pods.push(json!({"metadata": {"name": "pending"}, "status": {"phase": "Pending"}}));
        let (slices, _) = desired(&service(), &pods, &HashMap::new());
        let sizes: Vec<usize> = slices.iter().map(|s| s.endpoints.len()).collect();
        assert_eq!(sizes, vec![100, 100, 50]);
    }

    #[test]
    fn selector_matching() {
        let sel = json!({"app": "web"});
        assert!(selector_matches(
            sel.as_object().unwrap(),
            &pod("a", "1.1.1.1", true, json!({"app": "web", "x": "y"}))
        ));
        assert!(!selector_matches(
            sel.as_object().unwrap(),
            &pod("a", "1.1.1.1", true, json!({"app": "db"}))
        ));
    }
}
