//! Watches Services, EndpointSlices and this Node with kube-runtime watchers feeding
//! reflector stores. The watcher relists on 410 and retries with backoff while the
//! API server is away; the stores (and so the programmed rules) keep their last state.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Resource};
use tokio::sync::Notify;

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
        while let Some(ev) = stream.next().await {
            let changed = match ev {
                Ok(watcher::Event::InitDone) => {
                    let flag = match kind {
                        Kind::Service => &signals.services_synced,
                        Kind::Slice => &signals.slices_synced,
                        Kind::Node => &signals.node_synced,
                    };
                    flag.store(true, Ordering::Release);
                    true
                }
                Ok(watcher::Event::Apply(o)) | Ok(watcher::Event::Delete(o)) => {
                    if let Some(s) = o.as_slice() {
                        if let Some(t) = trigger_time(s) {
                            signals.trigger_times.lock().unwrap().push(t);
                        }
                    }
                    true
                }
                Ok(watcher::Event::InitApply(_)) | Ok(watcher::Event::Init) => false,
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
