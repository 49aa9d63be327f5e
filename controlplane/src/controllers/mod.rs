//! Controllers that run inside the control plane process, on the registry
//! directly (the datapath components only ever see the Kubernetes API).
//!
//! Each controller is a level-triggered reconciler in the kube-controller-
//! manager mould: changes from the watch cache mark keys dirty, dirty keys are
//! reconciled in small batches, a failed key is retried after a back-off, and a
//! periodic full pass repairs anything a missed event left behind.

pub mod daemonsets;
pub mod deployments;
pub mod endpointslices;
pub mod garbage;
pub mod node_cidrs;
pub mod node_lifecycle;
pub mod replicasets;
pub mod scheduler;

use std::collections::HashSet;
use std::fmt::Debug;
use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::StreamExt;
use serde_json::Value;
use tokio::sync::broadcast::error::RecvError;

use crate::api::status::ApiResult;
use crate::cache::CacheEvent;
use crate::registry::Registry;

/// Changes arriving together are handled together.
const BATCH_WINDOW: Duration = Duration::from_millis(5);
const RETRY_AFTER: Duration = Duration::from_millis(500);
const RESYNC_EVERY: Duration = Duration::from_secs(30);

pub trait Controller: Send + Sync + 'static {
    type Key: Hash + Eq + Clone + Debug + Send + Sync;
    const NAME: &'static str;
    /// Keys reconciled at once. One by default: the scheduler places pods one
    /// after another; controllers whose keys are independent raise it so their
    /// writes share the store's group commits.
    const CONCURRENCY: usize = 1;
    /// Every key there is (start-up and periodic resync).
    fn all_keys(&self, registry: &Registry) -> Vec<Self::Key>;
    /// The keys one change may affect.
    fn keys_for(&self, registry: &Registry, event: &CacheEvent, dirty: &mut HashSet<Self::Key>);
    fn reconcile<'a>(
        &'a self,
        registry: &'a Registry,
        key: &'a Self::Key,
    ) -> BoxFuture<'a, ApiResult<()>>;
}

/// Runs a controller until the process stops.
pub async fn run<C: Controller>(controller: C, registry: Arc<Registry>) {
    let mut feed = match registry
        .cache()
        .watch_from(registry.cache().revision())
        .await
    {
        Ok(feed) => feed.live,
        Err(e) => {
            tracing::error!(controller = C::NAME, error = %e, "could not start");
            return;
        }
    };
    let mut dirty: HashSet<C::Key> = controller.all_keys(&registry).into_iter().collect();
    let mut resync =
        tokio::time::interval_at(tokio::time::Instant::now() + RESYNC_EVERY, RESYNC_EVERY);
    loop {
        let (c, r) = (&controller, &*registry);
        let failed: HashSet<C::Key> = futures::stream::iter(std::mem::take(&mut dirty))
            .map(|key| async move {
                let result = c.reconcile(r, &key).await;
                (key, result)
            })
            .buffer_unordered(C::CONCURRENCY)
            .filter_map(|(key, result)| async move {
                let e = result.err()?;
                tracing::debug!(controller = C::NAME, ?key, error = %e, "reconcile failed; retrying");
                Some(key)
            })
            .collect()
            .await;
        let retry = tokio::time::sleep(if failed.is_empty() {
            RESYNC_EVERY
        } else {
            RETRY_AFTER
        });
        tokio::pin!(retry);
        tokio::select! {
            event = feed.recv() => match event {
                Ok(event) => controller.keys_for(&registry, &event, &mut dirty),
                Err(RecvError::Lagged(_)) => dirty.extend(controller.all_keys(&registry)),
                Err(RecvError::Closed) => return,
            },
            _ = &mut retry => {}
            _ = resync.tick() => dirty.extend(controller.all_keys(&registry)),
        }
        dirty.extend(failed);
        let window = tokio::time::sleep(BATCH_WINDOW);
        tokio::pin!(window);
        loop {
            tokio::select! {
                _ = &mut window => break,
                event = feed.recv() => match event {
                    Ok(event) => controller.keys_for(&registry, &event, &mut dirty),
                    Err(_) => break,
                },
            }
        }
    }
}

/// (namespace, name) of an object.
pub type ObjectId = (String, String);

pub fn str_at<'a>(v: &'a Value, pointer: &str) -> Option<&'a str> {
    v.pointer(pointer).and_then(Value::as_str)
}

pub fn object_id(obj: &Value) -> Option<ObjectId> {
    Some((
        str_at(obj, "/metadata/namespace")?.to_string(),
        str_at(obj, "/metadata/name")?.to_string(),
    ))
}

/// The controlling owner of `obj` if it is of `kind`.
pub fn controller_of(obj: &Value, kind: &str) -> Option<ObjectId> {
    let owner = obj
        .pointer("/metadata/ownerReferences")?
        .as_array()?
        .iter()
        .find(|o| o["controller"] == true && o["kind"] == kind)?;
    Some((
        str_at(obj, "/metadata/namespace")?.to_string(),
        owner.get("name")?.as_str()?.to_string(),
    ))
}

pub fn owner_reference(owner: &Value, api_version: &str, kind: &str) -> Value {
    serde_json::json!({
        "apiVersion": api_version, "kind": kind,
        "name": str_at(owner, "/metadata/name").unwrap_or_default(),
        "uid": str_at(owner, "/metadata/uid").unwrap_or_default(),
        "controller": true, "blockOwnerDeletion": true,
    })
}

pub fn owned_by(obj: &Value, uid: &str) -> bool {
    obj.pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .is_some_and(|refs| refs.iter().any(|r| r["uid"] == uid))
}

/// Every object of `kind`, as (namespace, name).
pub fn ids_of(registry: &Registry, kind: &str) -> Vec<ObjectId> {
    let res = crate::resources::find_kind(kind).expect("a served kind");
    registry
        .cache()
        .list(&res.key_prefix(), None)
        .0
        .iter()
        .filter_map(|o| object_id(&o.value()))
        .collect()
}

/// The keys of a controller of `owner_kind` objects that also watches the
/// `child_kind` objects they control: the owner itself, or a child's owner.
pub fn owner_keys(
    event: &CacheEvent,
    owner_kind: &str,
    child_kind: &str,
    dirty: &mut HashSet<ObjectId>,
) {
    let prefix = |kind| {
        crate::resources::find_kind(kind)
            .expect("a served kind")
            .key_prefix()
    };
    let obj = event.object.value();
    if event.object.key.starts_with(&prefix(owner_kind)) {
        dirty.extend(object_id(&obj));
    } else if event.object.key.starts_with(&prefix(child_kind)) {
        dirty.extend(controller_of(&obj, owner_kind));
    }
}

/// Writes `status` through the status subresource unless it is already so.
pub async fn write_status(
    registry: &Registry,
    kind: &str,
    obj: &Value,
    status: Value,
) -> ApiResult<()> {
    if obj.get("status") == Some(&status) {
        return Ok(());
    }
    let res = crate::resources::find_kind(kind).expect("a served kind");
    let (ns, name) = object_id(obj).unwrap_or_default();
    let mut updated = obj.clone();
    updated["status"] = status;
    registry
        .update(
            res,
            Some(&ns),
            &name,
            updated,
            Some(crate::resources::Subresource::Status),
            crate::registry::WriteOptions::default(),
        )
        .await
        .map(|_| ())
}

/// Starts every controller.
pub fn start(
    registry: Arc<Registry>,
    node_cidrs: crate::nodeipam::NodeCidrAllocator,
    lifecycle: node_lifecycle::LifecycleConfig,
) {
    tokio::spawn(run(
        node_cidrs::NodeCidrController::new(node_cidrs),
        registry.clone(),
    ));
    tokio::spawn(node_lifecycle::run(registry.clone(), lifecycle));
    tokio::spawn(run(
        endpointslices::EndpointSliceController::default(),
        registry.clone(),
    ));
    tokio::spawn(run(garbage::GarbageCollector, registry.clone()));
    tokio::spawn(run(replicasets::ReplicaSetController, registry.clone()));
    tokio::spawn(run(deployments::DeploymentController, registry.clone()));
    tokio::spawn(run(daemonsets::DaemonSetController, registry.clone()));
    tokio::spawn(run(scheduler::Scheduler, registry));
}
