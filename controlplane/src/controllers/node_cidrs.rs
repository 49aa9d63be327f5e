//! Node IPAM: gives each Node a pod CIDR (`spec.podCIDR`/`podCIDRs`) from the
//! cluster CIDR. The allocator's view is re-synced from the stored Nodes on
//! every pass, so a CIDR is never handed out twice (also across restarts) and
//! a deleted Node's CIDR returns to the pool.

use std::collections::{BTreeSet, HashSet};
use std::sync::Mutex;

use futures::future::BoxFuture;
use futures::FutureExt;
use ipnet::IpNet;
use serde_json::{json, Value};

use super::{str_at, Controller};
use crate::api::status::ApiResult;
use crate::cache::CacheEvent;
use crate::nodeipam::NodeCidrAllocator;
use crate::registry::{now_rfc3339, Registry, WriteOptions};
use crate::resources;

pub struct NodeCidrController {
    allocator: Mutex<NodeCidrAllocator>,
}

impl NodeCidrController {
    pub fn new(allocator: NodeCidrAllocator) -> NodeCidrController {
        NodeCidrController {
            allocator: Mutex::new(allocator),
        }
    }
}

fn pod_cidr(node: &Value) -> Option<IpNet> {
    str_at(node, "/spec/podCIDR")?.parse().ok()
}

fn nodes(registry: &Registry) -> Vec<Value> {
    let res = resources::find_kind("Node").unwrap();
    registry
        .cache()
        .list(&res.key_prefix(), None)
        .0
        .iter()
        .map(|n| n.value())
        .collect()
}

/// Makes the allocator hold exactly the CIDRs stored Nodes have.
fn sync(allocator: &mut NodeCidrAllocator, nodes: &[Value]) {
    let stored: BTreeSet<IpNet> = nodes.iter().filter_map(pod_cidr).collect();
    for e in allocator.set_used(stored) {
        tracing::warn!(error = %e, "a node holds a pod CIDR outside the cluster CIDR, or one another node holds");
    }
}

async fn report_full(registry: &Registry, node: &Value, why: &str) -> ApiResult<()> {
    let name = str_at(node, "/metadata/name").unwrap_or_default();
    let events = resources::find_kind("Event").unwrap();
    let event = json!({
        "metadata": {"name": format!("{name}.cidr-not-available"), "namespace": "default"},
        "involvedObject": {"kind": "Node", "name": name, "uid": str_at(node, "/metadata/uid"), "apiVersion": "v1"},
        "reason": "CIDRNotAvailable", "message": format!("Node {name} status is now: CIDRNotAvailable ({why})"),
        "type": "Normal", "source": {"component": "cidrAllocator"}, "reportingComponent": "cidrAllocator",
        "firstTimestamp": now_rfc3339(), "lastTimestamp": now_rfc3339(), "count": 1,
    });
    registry
        .update(
            events,
            Some("default"),
            &format!("{name}.cidr-not-available"),
            event,
            None,
            WriteOptions::default(),
        )
        .await
        .map(|_| ())
}

impl Controller for NodeCidrController {
    type Key = String;
    const NAME: &'static str = "node-ipam";

    fn all_keys(&self, registry: &Registry) -> Vec<String> {
        nodes(registry)
            .iter()
            .filter(|n| pod_cidr(n).is_none())
            .filter_map(|n| str_at(n, "/metadata/name").map(str::to_string))
            .collect()
    }

    fn keys_for(&self, registry: &Registry, event: &CacheEvent, dirty: &mut HashSet<String>) {
        let res = resources::find_kind("Node").unwrap();
        if !event.object.key.starts_with(&res.key_prefix()) {
            return;
        }
        if event.kind == crate::cache::WatchEventType::Deleted {
            // A CIDR came free: nodes still waiting may get it.
            dirty.extend(self.all_keys(registry));
        } else {
            let node = event.object.value();
            if pod_cidr(&node).is_none() {
                dirty.extend(str_at(&node, "/metadata/name").map(str::to_string));
            }
        }
    }

    fn reconcile<'a>(
        &'a self,
        registry: &'a Registry,
        key: &'a String,
    ) -> BoxFuture<'a, ApiResult<()>> {
        async move {
            let res = resources::find_kind("Node").unwrap();
            let Ok(node) = registry.get(res, None, key) else {
                return Ok(());
            };
            let mut node = node.value();
            if pod_cidr(&node).is_some() || node.pointer("/metadata/deletionTimestamp").is_some() {
                return Ok(());
            }
            let cidr = {
                let mut allocator = self.allocator.lock().unwrap();
                sync(&mut allocator, &nodes(registry));
                allocator.allocate()
            };
            let cidr = match cidr {
                Ok(c) => c,
                Err(e) => return report_full(registry, &node, &e.to_string()).await,
            };
            node["spec"]["podCIDR"] = json!(cidr.to_string());
            node["spec"]["podCIDRs"] = json!([cidr.to_string()]);
            let written = registry
                .update(res, None, key, node, None, WriteOptions::default())
                .await;
            if written.is_err() {
                self.allocator.lock().unwrap().release(cidr).ok();
            }
            written.map(|_| ())
        }
        .boxed()
    }
}
