//! The garbage collector: an object whose owners (ownerReferences) are all
//! gone is deleted (background propagation), so deleting a Deployment removes
//! its ReplicaSets and their Pods, and a Service its EndpointSlices.

use std::collections::HashSet;

use futures::future::BoxFuture;
use futures::FutureExt;
use serde_json::Value;

use super::{owned_by, str_at, Controller};
use crate::api::status::ApiResult;
use crate::cache::{CacheEvent, WatchEventType};
use crate::registry::{DeleteOptions, Registry};
use crate::resources::{self, ResourceInfo};

pub struct GarbageCollector;

/// A possibly orphaned object: its type, namespace and name.
pub type Dependent = (&'static str, String, String);

fn dependent(res: &'static ResourceInfo, obj: &Value) -> Option<Dependent> {
    Some((
        res.kind,
        str_at(obj, "/metadata/namespace")?.to_string(),
        str_at(obj, "/metadata/name")?.to_string(),
    ))
}

fn has_owners(obj: &Value) -> bool {
    obj.pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .is_some_and(|r| !r.is_empty())
}

/// True when at least one owner still exists with the referenced uid.
fn an_owner_exists(registry: &Registry, obj: &Value) -> bool {
    let ns = str_at(obj, "/metadata/namespace");
    obj.pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .any(|owner| {
            let (Some(kind), Some(name), Some(uid)) = (
                owner["kind"].as_str(),
                owner["name"].as_str(),
                owner["uid"].as_str(),
            ) else {
                return false;
            };
            // Owners of a kind this server does not serve are left alone.
            let Some(res) = resources::find_kind(kind) else {
                return true;
            };
            let owner_ns = if res.namespaced { ns } else { None };
            registry
                .cache()
                .get(&res.object_key(owner_ns, name))
                .is_some_and(|o| str_at(&o.value(), "/metadata/uid") == Some(uid))
        })
}

impl Controller for GarbageCollector {
    type Key = Dependent;
    const NAME: &'static str = "garbage-collector";

    fn all_keys(&self, registry: &Registry) -> Vec<Dependent> {
        resources::RESOURCES
            .iter()
            .filter(|r| r.namespaced)
            .flat_map(|res| {
                registry
                    .cache()
                    .list(&res.key_prefix(), None)
                    .0
                    .into_iter()
                    .map(|o| o.value())
                    .filter(has_owners)
                    .filter_map(move |o| dependent(res, &o))
            })
            .collect()
    }

    fn keys_for(&self, registry: &Registry, event: &CacheEvent, dirty: &mut HashSet<Dependent>) {
        if event.kind != WatchEventType::Deleted {
            return;
        }
        let gone = event.object.value();
        let (Some(uid), ns) = (
            str_at(&gone, "/metadata/uid"),
            str_at(&gone, "/metadata/namespace"),
        ) else {
            return;
        };
        for res in resources::RESOURCES.iter().filter(|r| r.namespaced) {
            for obj in registry.cache().list(&res.scope_prefix(ns), None).0 {
                let obj = obj.value();
                if owned_by(&obj, uid) {
                    dirty.extend(dependent(res, &obj));
                }
            }
        }
    }

    fn reconcile<'a>(
        &'a self,
        registry: &'a Registry,
        key: &'a Dependent,
    ) -> BoxFuture<'a, ApiResult<()>> {
        async move {
            let (kind, ns, name) = key;
            let res = resources::find_kind(kind).expect("keys name served kinds");
            let Ok(obj) = registry.get(res, Some(ns), name) else { return Ok(()) };
            let obj = obj.value();
            if !has_owners(&obj) || an_owner_exists(registry, &obj) || obj.pointer("/metadata/deletionTimestamp").is_some() {
                return Ok(());
            }
            tracing::debug!(kind, namespace = %ns, name = %name, "deleting an object whose owners are gone");
            match registry.delete(res, Some(ns), name, &DeleteOptions::default()).await {
                Err(e) if e.code != 404 => Err(e),
                _ => Ok(()),
            }
        }
        .boxed()
    }
}
