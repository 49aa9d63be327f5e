//! Watches Services, EndpointSlices and this Node with kube-runtime watchers feeding
//! reflector stores. The watcher relists on 410 and retries with backoff while the
//! API server is away; the stores (and so the programmed rules) keep their last state.
//!
//! Besides the stores, the watchers record which Services changed ([`Dirty`]) and
//! which slices belong to which Service ([`SliceIndex`]), so a sync recomputes only
//! the services touched since the last one.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Resource};
use tokio::sync::Notify;

use crate::model::{slice_service, ServiceKey};

/// Annotation the EndpointSlice controller sets; the start of network programming latency.
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// Change signals shared between the watchers and the sync loop.
#[derive(Default)]
pub struct WatchSignals {
    pub notify: Notify,
    pub services_synced: AtomicBool,
    pub slices_synced: AtomicBool,
    pub node_synced: AtomicBool,
    pub service_changes: AtomicI64,
    pub endpoint_changes: AtomicI64,
    /// Trigger times of EndpointSlice changes not yet programmed.
    pub trigger_times: Mutex<Vec<SystemTime>>,
    /// Services to recompute at the next sync.
    pub dirty: Mutex<Dirty>,
    /// Which slices belong to which Service (as of the slice store).
    pub slice_index: Mutex<SliceIndex>,
}

/// What changed since the last sync.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Dirty {
    /// Recompute everything: a relist, a Node change, a slice with no service label.
    pub all: bool,
    pub services: BTreeSet<ServiceKey>,
}

/// EndpointSlice names by the Service they belong to.
#[derive(Debug, Default, Clone)]
pub struct SliceIndex {
    by_service: HashMap<ServiceKey, BTreeSet<String>>,
    owner: HashMap<(String, String), ServiceKey>,
}

impl SliceIndex {
    /// Records a slice's current owner; returns its previous one.
    pub fn set(&mut self, slice: (String, String), owner: ServiceKey) -> Option<ServiceKey> {
        let previous = self.remove(&slice);
        self.by_service
            .entry(owner.clone())
            .or_default()
            .insert(slice.1.clone());
        self.owner.insert(slice, owner);
        previous
    }
    /// Forgets a slice; returns its owner.
    pub fn remove(&mut self, slice: &(String, String)) -> Option<ServiceKey> {
        let owner = self.owner.remove(slice)?;
        if let Some(names) = self.by_service.get_mut(&owner) {
            names.remove(&slice.1);
            if names.is_empty() {
                self.by_service.remove(&owner);
            }
        }
        Some(owner)
    }
    /// References to the slices of one Service.
    pub fn slices_of(&self, svc: &ServiceKey) -> Vec<ObjectRef<EndpointSlice>> {
        self.by_service
            .get(svc)
            .into_iter()
            .flatten()
            .map(|n| ObjectRef::new(n).within(&svc.0))
            .collect()
    }
}

fn object_key<K: Resource>(o: &K) -> (String, String) {
    (
        o.meta().namespace.clone().unwrap_or_default(),
        o.meta().name.clone().unwrap_or_default(),
    )
}

impl WatchSignals {
    /// Services and EndpointSlices have both been listed once.
    pub fn ready(&self) -> bool {
        self.services_synced.load(Ordering::Acquire) && self.slices_synced.load(Ordering::Acquire)
    }
}

/// Reader side of the three caches.
#[derive(Clone)]
pub struct Caches {
    pub services: Store<Service>,
    pub slices: Store<EndpointSlice>,
    pub node: Store<Node>,
}

#[derive(Clone, Copy)]
enum Kind {
    Service,
    Slice,
    Node,
}

fn trigger_time(s: &EndpointSlice) -> Option<SystemTime> {
    let v = s
        .meta()
        .annotations
        .as_ref()?
        .get(TRIGGER_TIME_ANNOTATION)?;
    let t = chrono::DateTime::parse_from_rfc3339(v).ok()?;
    Some(SystemTime::from(t))
}

fn spawn_watch<K>(
    api: Api<K>,
    cfg: watcher::Config,
    kind: Kind,
    signals: Arc<WatchSignals>,
) -> Store<K>
where
    K: Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
    K: AsAny,
{
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, cfg).default_backoff());
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        // The slice index being rebuilt during a (re)list; swapped in at InitDone,
        // when the reflector swaps its store.
        let mut relisting = SliceIndex::default();
        while let Some(ev) = stream.next().await {
            let changed = match ev {
                Ok(watcher::Event::Init) => {
                    relisting = SliceIndex::default();
                    false
                }
                Ok(watcher::Event::InitApply(o)) => {
                    if let Some(owner) = o.as_slice().and_then(slice_service) {
                        relisting.set(object_key(&o), owner);
                    }
                    false
                }
                Ok(watcher::Event::InitDone) => {
                    let flag = match kind {
                        Kind::Service => &signals.services_synced,
                        Kind::Slice => &signals.slices_synced,
                        Kind::Node => &signals.node_synced,
                    };
                    if let Kind::Slice = kind {
                        *signals.slice_index.lock().unwrap() = std::mem::take(&mut relisting);
                    }
                    signals.dirty.lock().unwrap().all = true;
                    flag.store(true, Ordering::Release);
                    true
                }
                Ok(watcher::Event::Apply(o)) => {
                    record_change(&signals, kind, &o, false);
                    true
                }
                Ok(watcher::Event::Delete(o)) => {
                    record_change(&signals, kind, &o, true);
                    true
                }
                Err(e) => {
                    tracing::warn!("watch error (retrying; last state kept): {e}");
                    false
                }
            };
            if changed {
                match kind {
                    Kind::Service => signals.service_changes.fetch_add(1, Ordering::Relaxed),
                    Kind::Slice => signals.endpoint_changes.fetch_add(1, Ordering::Relaxed),
                    Kind::Node => 0,
                };
                signals.notify.notify_one();
            }
        }
    });
    reader
}

/// Marks what an applied or deleted object makes dirty.
fn record_change<K: Resource + AsAny>(signals: &WatchSignals, kind: Kind, o: &K, deleted: bool) {
    let mut dirty = signals.dirty.lock().unwrap();
    match kind {
        Kind::Node => dirty.all = true,
        Kind::Service => {
            dirty.services.insert(object_key(o));
        }
        Kind::Slice => {
            let Some(slice) = o.as_slice() else { return };
            if let Some(t) = trigger_time(slice) {
                signals.trigger_times.lock().unwrap().push(t);
            }
            let mut index = signals.slice_index.lock().unwrap();
            let owner = slice_service(slice).filter(|_| !deleted);
            let previous = match &owner {
                Some(owner) => index.set(object_key(o), owner.clone()),
                None => index.remove(&object_key(o)),
            };
            dirty.services.extend(previous);
            match owner {
                Some(owner) => {
                    dirty.services.insert(owner);
                }
                // Unlabelled slices are only reported by a full rebuild.
                None if !deleted => dirty.all = true,
                None => {}
            }
        }
    }
}

/// Lets the generic watcher see EndpointSlices' trigger times.
pub trait AsAny {
    fn as_slice(&self) -> Option<&EndpointSlice> {
        None
    }
}
impl AsAny for Service {}
impl AsAny for Node {}
impl AsAny for EndpointSlice {
    fn as_slice(&self) -> Option<&EndpointSlice> {
        Some(self)
    }
}

/// Starts the three watchers.
pub fn start(client: Client, node_name: &str, signals: Arc<WatchSignals>) -> Caches {
    let services = spawn_watch(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
        Kind::Service,
        signals.clone(),
    );
    let slices = spawn_watch(
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default(),
        Kind::Slice,
        signals.clone(),
    );
    let node = spawn_watch(
        Api::<Node>::all(client),
        watcher::Config::default().fields(&format!("metadata.name={node_name}")),
        Kind::Node,
        signals,
    );
    Caches {
        services,
        slices,
        node,
    }
}
