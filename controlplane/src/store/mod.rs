//! The durable key-value store under the API server.
//!
//! Shaped after etcd's model so an etcd backend can replace SQLite without
//! touching the API layer: one global revision counter, every key carries the
//! revision of its last change, writes are compare-and-swap on that revision,
//! and a watch replays the change log from a revision onwards.

mod sqlite;

pub use sqlite::SqliteStore;

use bytes::Bytes;
use futures::future::BoxFuture;
use tokio::sync::mpsc;

pub type Revision = i64;

#[derive(Debug, Clone, PartialEq)]
pub struct KeyValue {
    pub key: String,
    pub value: Bytes,
    /// Revision of the write that created the key.
    pub create_revision: Revision,
    /// Revision of the last write to the key.
    pub mod_revision: Revision,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// A create or an update; `create_revision == mod_revision` tells a create.
    Put,
    Delete,
}

/// One committed change. For `Delete`, `kv` holds the value as it was last stored
/// and `kv.mod_revision` is the deletion's revision.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreEvent {
    pub kind: EventKind,
    pub kv: KeyValue,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("key {0} already exists")]
    AlreadyExists(String),
    #[error("key {0} not found")]
    NotFound(String),
    #[error("key {key} was modified: expected revision {expected}, found {actual}")]
    Conflict {
        key: String,
        expected: Revision,
        actual: Revision,
    },
    #[error("revision {requested} has been compacted; the oldest kept is {oldest}")]
    Compacted {
        requested: Revision,
        oldest: Revision,
    },
    #[error("store backend failed: {0}")]
    Backend(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Events from a revision onwards, in revision order, without gaps.
pub type EventStream = mpsc::Receiver<StoreResult<StoreEvent>>;

/// The store contract. Every acknowledged write is durable.
pub trait Store: Send + Sync + 'static {
    fn get(&self, key: &str) -> BoxFuture<'_, StoreResult<Option<KeyValue>>>;
    /// All keys under `prefix` and the revision the listing reflects.
    fn list(&self, prefix: &str) -> BoxFuture<'_, StoreResult<(Vec<KeyValue>, Revision)>>;
    fn create(&self, key: &str, value: Bytes) -> BoxFuture<'_, StoreResult<Revision>>;
    /// Replaces the value only if the key's `mod_revision` is still `expected`.
    fn update(
        &self,
        key: &str,
        value: Bytes,
        expected: Revision,
    ) -> BoxFuture<'_, StoreResult<Revision>>;
    /// Deletes the key, only at revision `expected` when given.
    fn delete(&self, key: &str, expected: Option<Revision>)
        -> BoxFuture<'_, StoreResult<Revision>>;
    /// Every change with a revision greater than `after`, then live changes.
    fn watch(&self, after: Revision) -> BoxFuture<'_, StoreResult<EventStream>>;
    /// Forgets the change log up to and including `revision`.
    fn compact(&self, revision: Revision) -> BoxFuture<'_, StoreResult<()>>;
    fn current_revision(&self) -> Revision;
}
