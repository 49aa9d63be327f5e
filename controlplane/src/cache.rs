//! The watch cache: every object in memory, encoded once, plus a window of
//! recent changes that many watchers share.
//!
//! Like kube-apiserver's cacher, it follows the store's change log with a
//! single consumer and fans each change out through one broadcast channel, so
//! a hundred watchers cost one store read per change, not a hundred. Objects
//! are kept as their JSON bytes (with `resourceVersion` set) because lists and
//! watch events are written out far more often than they are inspected.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Map, Value};
use tokio::sync::{broadcast, watch};

use crate::store::{EventKind, Revision, Store, StoreError, StoreEvent};

/// One stored object as the API serves it.
#[derive(Debug)]
pub struct CachedObject {
    pub key: String,
    pub revision: Revision,
    /// The object's JSON with `metadata.resourceVersion` set.
    pub json: Bytes,
    pub labels: Map<String, Value>,
}

impl CachedObject {
    pub fn value(&self) -> Value {
        // The bytes were produced by serde_json from a Value, so they parse.
        serde_json::from_slice(&self.json).unwrap_or(Value::Null)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchEventType {
    Added,
    Modified,
    Deleted,
}

impl WatchEventType {
    pub fn as_str(self) -> &'static str {
        match self {
            WatchEventType::Added => "ADDED",
            WatchEventType::Modified => "MODIFIED",
            WatchEventType::Deleted => "DELETED",
        }
    }
}

#[derive(Debug)]
pub struct CacheEvent {
    pub kind: WatchEventType,
    /// The object after the change; for a deletion its last state, stamped with
    /// the deletion's revision.
    pub object: Arc<CachedObject>,
    /// The object before the change, so label-filtered watches can tell an
    /// object leaving their selection.
    pub prev: Option<Arc<CachedObject>>,
}

impl CacheEvent {
    pub fn revision(&self) -> Revision {
        self.object.revision
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("too old resource version: {requested} ({oldest})")]
    TooOld {
        requested: Revision,
        oldest: Revision,
    },
    #[error("Too large resource version: {requested}, current resource version: {current}")]
    TooLarge {
        requested: Revision,
        current: Revision,
    },
}

/// A watch registered with the cache: the changes already past (from the
/// history window) and the live feed, with nothing missed or repeated between.
pub struct CacheWatch {
    pub backlog: Vec<Arc<CacheEvent>>,
    pub live: broadcast::Receiver<Arc<CacheEvent>>,
}

struct State {
    objects: BTreeMap<String, Arc<CachedObject>>,
    history: VecDeque<Arc<CacheEvent>>,
    /// Watches may start from any revision at or after this one.
    history_start: Revision,
    revision: Revision,
}

pub struct Cache {
    store: Arc<dyn Store>,
    state: RwLock<State>,
    events: broadcast::Sender<Arc<CacheEvent>>,
    revision: watch::Sender<Revision>,
    capacity: usize,
}

/// How long a request naming a future resourceVersion waits for it.
const FUTURE_REVISION_WAIT: Duration = Duration::from_secs(3);
/// Each watcher may fall this many events behind before it is cut off.
const WATCHER_BUFFER: usize = 16 * 1024;

fn encode(key: String, revision: Revision, raw: &[u8]) -> CachedObject {
    let mut value: Value = serde_json::from_slice(raw).unwrap_or_else(|e| {
        tracing::error!(%key, error = %e, "stored value is not JSON");
        Value::Object(Map::new())
    });
    let labels = value
        .pointer("/metadata/labels")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    if let Some(meta) = value.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert(
            "resourceVersion".into(),
            Value::String(revision.to_string()),
        );
    }
    let json = Bytes::from(serde_json::to_vec(&value).unwrap_or_default());
    CachedObject {
        key,
        revision,
        json,
        labels,
    }
}

impl Cache {
    /// Loads every object, the recent change history, and starts following
    /// the store.
    pub async fn start(store: Arc<dyn Store>, capacity: usize) -> Result<Arc<Cache>, StoreError> {
        let (items, revision) = store.list("/registry/").await?;
        let objects = items
            .into_iter()
            .map(|kv| {
                let obj = encode(kv.key.clone(), kv.mod_revision, &kv.value);
                (kv.key, Arc::new(obj))
            })
            .collect();
        let (events, _) = broadcast::channel(WATCHER_BUFFER);
        let cache = Arc::new(Cache {
            store: store.clone(),
            state: RwLock::new(State {
                objects,
                history: VecDeque::new(),
                history_start: revision,
                revision,
            }),
            events,
            revision: watch::channel(revision).0,
            capacity: capacity.max(1),
        });
        // Replay what the log still holds of the last `capacity` changes so that
        // watchers can resume across a restart without relisting.
        let replay_from = (revision - capacity as Revision).max(0);
        let mut stream = match store.watch(replay_from).await {
            Ok(stream) => stream,
            Err(StoreError::Compacted { .. }) => store.watch(revision).await?,
            Err(e) => return Err(e),
        };
        let mut replayed = replay_from;
        while replayed < revision {
            let Some(event) = stream.recv().await else {
                break;
            };
            let event = event?;
            replayed = event.kv.mod_revision;
            if replayed <= revision {
                cache.remember(event);
            } else {
                cache.apply(event);
            }
        }
        tokio::spawn(cache.clone().follow(stream));
        tokio::spawn(cache.clone().compact_periodically());
        Ok(cache)
    }

    async fn follow(self: Arc<Self>, mut stream: crate::store::EventStream) {
        while let Some(event) = stream.recv().await {
            match event {
                Ok(event) => self.apply(event),
                Err(e) => {
                    tracing::error!(error = %e, "store watch failed; the API server cannot serve consistent data");
                    std::process::exit(1);
                }
            }
        }
    }

    /// Adds a change from before the initial listing to the history window.
    fn remember(&self, event: StoreEvent) {
        let kind = event_type(&event);
        let object = Arc::new(encode(
            event.kv.key.clone(),
            event.kv.mod_revision,
            &event.kv.value,
        ));
        let mut state = self.state.write().unwrap();
        if state.history.is_empty() {
            state.history_start = object.revision - 1;
        }
        state.history.push_back(Arc::new(CacheEvent {
            kind,
            object,
            prev: None,
        }));
    }

    fn apply(&self, event: StoreEvent) {
        let kind = event_type(&event);
        let object = Arc::new(encode(
            event.kv.key.clone(),
            event.kv.mod_revision,
            &event.kv.value,
        ));
        let revision = object.revision;
        let mut state = self.state.write().unwrap();
        let prev = match kind {
            WatchEventType::Deleted => state.objects.remove(&object.key),
            _ => state.objects.insert(object.key.clone(), object.clone()),
        };
        let event = Arc::new(CacheEvent { kind, object, prev });
        if state.history.is_empty() {
            state.history_start = revision - 1;
        }
        state.history.push_back(event.clone());
        while state.history.len() > self.capacity {
            if let Some(old) = state.history.pop_front() {
                state.history_start = old.revision();
            }
        }
        state.revision = revision;
        // Sent under the lock so a watch registering concurrently sees each
        // change exactly once: in its backlog or on its live feed.
        let _ = self.events.send(event);
        drop(state);
        self.revision.send_replace(revision);
    }

    async fn compact_periodically(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(30));
        loop {
            tick.tick().await;
            let keep_after = self.revision() - self.capacity as Revision;
            if keep_after > 0 {
                if let Err(e) = self.store.compact(keep_after).await {
                    tracing::warn!(error = %e, "compaction failed");
                }
            }
        }
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn revision(&self) -> Revision {
        *self.revision.borrow()
    }

    /// Waits until the cache reflects `revision` (read-your-writes after a write).
    pub async fn wait_for(&self, revision: Revision) -> bool {
        let mut rx = self.revision.subscribe();
        tokio::time::timeout(FUTURE_REVISION_WAIT, rx.wait_for(|r| *r >= revision))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    pub fn get(&self, key: &str) -> Option<Arc<CachedObject>> {
        self.state.read().unwrap().objects.get(key).cloned()
    }

    /// Objects under `prefix` whose key is after `after` (for pagination), and
    /// the revision the list reflects.
    pub fn list(&self, prefix: &str, after: Option<&str>) -> (Vec<Arc<CachedObject>>, Revision) {
        let state = self.state.read().unwrap();
        let items = state
            .objects
            .range(after.unwrap_or(prefix).to_string()..)
            .skip_while(|(k, _)| Some(k.as_str()) == after)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, v)| v.clone())
            .collect();
        (items, state.revision)
    }

    /// Registers a watch on changes after `revision`.
    pub async fn watch_from(&self, revision: Revision) -> Result<CacheWatch, WatchError> {
        if revision > self.revision() && !self.wait_for(revision).await {
            return Err(WatchError::TooLarge {
                requested: revision,
                current: self.revision(),
            });
        }
        let state = self.state.read().unwrap();
        if revision < state.history_start {
            return Err(WatchError::TooOld {
                requested: revision,
                oldest: state.history_start + 1,
            });
        }
        let live = self.events.subscribe();
        let backlog = state
            .history
            .iter()
            .filter(|e| e.revision() > revision)
            .cloned()
            .collect();
        Ok(CacheWatch { backlog, live })
    }

    /// Registers a watch starting now, with the current objects under `prefix`
    /// as its first events.
    pub fn watch_now(&self, prefix: &str) -> (Vec<Arc<CachedObject>>, Revision, CacheWatch) {
        let state = self.state.read().unwrap();
        let live = self.events.subscribe();
        let objects = state
            .objects
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, v)| v.clone())
            .collect();
        let watch = CacheWatch {
            backlog: Vec::new(),
            live,
        };
        (objects, state.revision, watch)
    }
}

fn event_type(event: &StoreEvent) -> WatchEventType {
    match event.kind {
        EventKind::Delete => WatchEventType::Deleted,
        EventKind::Put if event.kv.create_revision == event.kv.mod_revision => {
            WatchEventType::Added
        }
        EventKind::Put => WatchEventType::Modified,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SqliteStore;

    async fn cache(dir: &tempfile::TempDir, capacity: usize) -> Arc<Cache> {
        let store = Arc::new(SqliteStore::open(&dir.path().join("db")).unwrap());
        Cache::start(store, capacity).await.unwrap()
    }

    fn obj(name: &str) -> Bytes {
        Bytes::from(
            serde_json::to_vec(
                &serde_json::json!({"metadata": {"name": name, "labels": {"a": "b"}}}),
            )
            .unwrap(),
        )
    }

    #[tokio::test]
    async fn writes_show_up_with_resource_version() {
        let dir = tempfile::tempdir().unwrap();
        let c = cache(&dir, 10).await;
        let rev = c.store().create("/registry/x/a", obj("a")).await.unwrap();
        assert!(c.wait_for(rev).await);
        let got = c.get("/registry/x/a").unwrap();
        assert_eq!(got.value()["metadata"]["resourceVersion"], rev.to_string());
        assert_eq!(got.labels["a"], "b");
        let (items, at) = c.list("/registry/x/", None);
        assert_eq!((items.len(), at), (1, rev));
    }

    #[tokio::test]
    async fn watch_backlog_then_live_and_too_old() {
        let dir = tempfile::tempdir().unwrap();
        let c = cache(&dir, 3).await;
        let mut last = 0;
        for i in 0..5 {
            last = c
                .store()
                .create(&format!("/registry/x/{i}"), obj("o"))
                .await
                .unwrap();
        }
        assert!(c.wait_for(last).await);
        assert!(matches!(
            c.watch_from(0).await,
            Err(WatchError::TooOld { .. })
        ));
        let mut w = c.watch_from(last - 2).await.unwrap();
        assert_eq!(w.backlog.len(), 2);
        let rev = c.store().delete("/registry/x/0", None).await.unwrap();
        let ev = w.live.recv().await.unwrap();
        assert_eq!((ev.kind, ev.revision()), (WatchEventType::Deleted, rev));
    }

    #[tokio::test]
    async fn history_survives_restart() {
        let dir = tempfile::tempdir().unwrap();
        let first = {
            let c = cache(&dir, 100).await;
            let a = c.store().create("/registry/x/a", obj("a")).await.unwrap();
            c.store().create("/registry/x/b", obj("b")).await.unwrap();
            a
        };
        let c = cache(&dir, 100).await;
        let w = c.watch_from(first).await.unwrap();
        assert_eq!(w.backlog.len(), 1);
        assert_eq!(c.list("/registry/x/", Some("/registry/x/a")).0.len(), 1);
    }
}
