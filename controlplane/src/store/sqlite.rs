//! SQLite backend: WAL journal, synchronous commits, group commit.
//!
//! One writer thread owns the write connection. Concurrent writes queue up and
//! are committed together in one transaction (one fsync), then acknowledged —
//! so throughput grows with concurrency while every acknowledged write is on
//! disk. The change log (`log` table) lets watches replay from any revision
//! that was not compacted, also across restarts.

use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::{mpsc, oneshot, watch};

use super::{
    EventKind, EventStream, KeyValue, Revision, Store, StoreError, StoreEvent, StoreResult,
};

/// How many queued writes share one transaction at most.
const MAX_BATCH: usize = 512;
/// Log rows read per query when replaying to a watcher.
const REPLAY_PAGE: i64 = 1024;

enum WriteOp {
    Create {
        key: String,
        value: Bytes,
    },
    Update {
        key: String,
        value: Bytes,
        expected: Revision,
    },
    Delete {
        key: String,
        expected: Option<Revision>,
    },
    Compact {
        revision: Revision,
    },
}

struct WriteRequest {
    op: WriteOp,
    reply: oneshot::Sender<StoreResult<Revision>>,
}

pub struct SqliteStore {
    reader: Arc<Mutex<Connection>>,
    writes: mpsc::UnboundedSender<WriteRequest>,
    revision: Arc<AtomicI64>,
    committed: watch::Receiver<Revision>,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn open(path: &Path) -> StoreResult<Connection> {
    let conn = Connection::open(path).map_err(backend)?;
    // WAL lets readers run beside the writer; FULL makes each commit durable.
    conn.execute_batch(
        "PRAGMA journal_mode=WAL;
         PRAGMA synchronous=FULL;
         PRAGMA busy_timeout=5000;",
    )
    .map_err(backend)?;
    Ok(conn)
}

fn init_schema(conn: &Connection) -> StoreResult<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS kv (
             key TEXT PRIMARY KEY,
             value BLOB NOT NULL,
             create_rev INTEGER NOT NULL,
             mod_rev INTEGER NOT NULL
         ) WITHOUT ROWID;
         CREATE TABLE IF NOT EXISTS log (
             rev INTEGER PRIMARY KEY,
             key TEXT NOT NULL,
             deleted INTEGER NOT NULL,
             value BLOB NOT NULL,
             create_rev INTEGER NOT NULL
         );
         CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);",
    )
    .map_err(backend)
}

fn meta(conn: &Connection, name: &str) -> StoreResult<Revision> {
    conn.query_row("SELECT value FROM meta WHERE name = ?1", [name], |r| {
        r.get(0)
    })
    .optional()
    .map(|v| v.unwrap_or(0))
    .map_err(backend)
}

impl SqliteStore {
    /// Opens (or creates) the database file at `path`.
    pub fn open(path: &Path) -> StoreResult<SqliteStore> {
        let writer = open(path)?;
        init_schema(&writer)?;
        let revision = meta(&writer, "revision")?;
        let reader = open(path)?;
        let revision_counter = Arc::new(AtomicI64::new(revision));
        let (writes, queue) = mpsc::unbounded_channel();
        let (committed_tx, committed) = watch::channel(revision);
        let counter = revision_counter.clone();
        std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || run_writer(writer, queue, counter, committed_tx))
            .map_err(backend)?;
        Ok(SqliteStore {
            reader: Arc::new(Mutex::new(reader)),
            writes,
            revision: revision_counter,
            committed,
        })
    }

    async fn submit(&self, op: WriteOp) -> StoreResult<Revision> {
        let (reply, answer) = oneshot::channel();
        self.writes
            .send(WriteRequest { op, reply })
            .map_err(|_| backend("writer thread has stopped"))?;
        answer
            .await
            .map_err(|_| backend("writer thread has stopped"))?
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
    ) -> StoreResult<T> {
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || {
            let conn = reader.lock().map_err(|_| backend("reader lock poisoned"))?;
            f(&conn)
        })
        .await
        .map_err(backend)?
    }
}

fn row_to_kv(row: &rusqlite::Row<'_>) -> rusqlite::Result<KeyValue> {
    Ok(KeyValue {
        key: row.get(0)?,
        value: Bytes::from(row.get::<_, Vec<u8>>(1)?),
        create_revision: row.get(2)?,
        mod_revision: row.get(3)?,
    })
}

/// The smallest string greater than every string starting with `prefix`.
fn prefix_end(prefix: &str) -> String {
    let mut end = prefix.to_string();
    end.push(char::MAX);
    end
}

fn list_prefix(conn: &Connection, prefix: &str) -> StoreResult<(Vec<KeyValue>, Revision)> {
    let tx = conn.unchecked_transaction().map_err(backend)?;
    let revision = meta(&tx, "revision")?;
    let mut stmt = tx
        .prepare_cached(
            "SELECT key, value, create_rev, mod_rev FROM kv WHERE key >= ?1 AND key < ?2 ORDER BY key",
        )
        .map_err(backend)?;
    let rows = stmt
        .query_map(params![prefix, prefix_end(prefix)], row_to_kv)
        .map_err(backend)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(backend)?;
    drop(stmt);
    tx.finish().map_err(backend)?;
    Ok((rows, revision))
}

fn read_log(conn: &Connection, after: Revision) -> StoreResult<Vec<StoreEvent>> {
    let compacted = meta(conn, "compacted")?;
    if after < compacted {
        return Err(StoreError::Compacted {
            requested: after,
            oldest: compacted,
        });
    }
    let mut stmt = conn
        .prepare_cached(
            "SELECT rev, key, deleted, value, create_rev FROM log WHERE rev > ?1 ORDER BY rev LIMIT ?2",
        )
        .map_err(backend)?;
    let events = stmt
        .query_map(params![after, REPLAY_PAGE], |row| {
            let deleted: bool = row.get(2)?;
            Ok(StoreEvent {
                kind: if deleted {
                    EventKind::Delete
                } else {
                    EventKind::Put
                },
                kv: KeyValue {
                    key: row.get(1)?,
                    value: Bytes::from(row.get::<_, Vec<u8>>(3)?),
                    create_revision: row.get(4)?,
                    mod_revision: row.get(0)?,
                },
            })
        })
        .map_err(backend)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(backend)?;
    Ok(events)
}

impl Store for SqliteStore {
    fn get(&self, key: &str) -> BoxFuture<'_, StoreResult<Option<KeyValue>>> {
        let key = key.to_string();
        self.read(move |conn| {
            conn.query_row(
                "SELECT key, value, create_rev, mod_rev FROM kv WHERE key = ?1",
                [key],
                row_to_kv,
            )
            .optional()
            .map_err(backend)
        })
        .boxed()
    }

    fn list(&self, prefix: &str) -> BoxFuture<'_, StoreResult<(Vec<KeyValue>, Revision)>> {
        let prefix = prefix.to_string();
        self.read(move |conn| list_prefix(conn, &prefix)).boxed()
    }

    fn create(&self, key: &str, value: Bytes) -> BoxFuture<'_, StoreResult<Revision>> {
        let key = key.to_string();
        self.submit(WriteOp::Create { key, value }).boxed()
    }

    fn update(
        &self,
        key: &str,
        value: Bytes,
        expected: Revision,
    ) -> BoxFuture<'_, StoreResult<Revision>> {
        let key = key.to_string();
        self.submit(WriteOp::Update {
            key,
            value,
            expected,
        })
        .boxed()
    }

    fn delete(
        &self,
        key: &str,
        expected: Option<Revision>,
    ) -> BoxFuture<'_, StoreResult<Revision>> {
        let key = key.to_string();
        self.submit(WriteOp::Delete { key, expected }).boxed()
    }

    fn watch(&self, after: Revision) -> BoxFuture<'_, StoreResult<EventStream>> {
        async move {
            // Fail fast on a compacted revision, before handing out a stream.
            let first = self.read(move |conn| read_log(conn, after)).await?;
            let (tx, rx) = mpsc::channel(REPLAY_PAGE as usize);
            let reader = self.reader.clone();
            let mut committed = self.committed.clone();
            tokio::spawn(async move {
                let mut last = after;
                let mut page = first;
                loop {
                    for event in page.drain(..) {
                        last = event.kv.mod_revision;
                        if tx.send(Ok(event)).await.is_err() {
                            return;
                        }
                    }
                    if *committed.borrow_and_update() <= last && committed.changed().await.is_err()
                    {
                        return;
                    }
                    let reader = reader.clone();
                    let next = tokio::task::spawn_blocking(move || {
                        let conn = reader.lock().map_err(|_| backend("reader lock poisoned"))?;
                        read_log(&conn, last)
                    })
                    .await
                    .map_err(backend)
                    .and_then(|r| r);
                    match next {
                        Ok(events) => page = events,
                        Err(e) => {
                            let _ = tx.send(Err(e)).await;
                            return;
                        }
                    }
                }
            });
            Ok(rx)
        }
        .boxed()
    }

    fn compact(&self, revision: Revision) -> BoxFuture<'_, StoreResult<()>> {
        async move {
            self.submit(WriteOp::Compact { revision }).await?;
            Ok(())
        }
        .boxed()
    }

    fn current_revision(&self) -> Revision {
        self.revision.load(Ordering::Acquire)
    }
}

fn run_writer(
    mut conn: Connection,
    mut queue: mpsc::UnboundedReceiver<WriteRequest>,
    revision: Arc<AtomicI64>,
    committed: watch::Sender<Revision>,
) {
    while let Some(first) = queue.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(req) => batch.push(req),
                Err(_) => break,
            }
        }
        let start = revision.load(Ordering::Acquire);
        match commit_batch(&mut conn, start, &batch) {
            Ok((results, end)) => {
                revision.store(end, Ordering::Release);
                committed.send_replace(end);
                for (req, result) in batch.into_iter().zip(results) {
                    let _ = req.reply.send(result);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "store commit failed; batch rejected");
                for req in batch {
                    let _ = req.reply.send(Err(backend(&e)));
                }
            }
        }
    }
}

/// Applies a batch in one transaction. Each op succeeds or fails on its own;
/// only a failing commit fails them all.
fn commit_batch(
    conn: &mut Connection,
    start: Revision,
    batch: &[WriteRequest],
) -> StoreResult<(Vec<StoreResult<Revision>>, Revision)> {
    let tx = conn.transaction().map_err(backend)?;
    let mut rev = start;
    let mut results = Vec::with_capacity(batch.len());
    for req in batch {
        results.push(apply_op(&tx, &mut rev, &req.op)?);
    }
    tx.execute(
        "INSERT INTO meta(name, value) VALUES('revision', ?1)
         ON CONFLICT(name) DO UPDATE SET value = excluded.value",
        [rev],
    )
    .map_err(backend)?;
    tx.commit().map_err(backend)?;
    Ok((results, rev))
}

/// Current (create_rev, mod_rev, value) of a key.
fn current(
    tx: &rusqlite::Transaction<'_>,
    key: &str,
) -> StoreResult<Option<(Revision, Revision, Vec<u8>)>> {
    tx.prepare_cached("SELECT create_rev, mod_rev, value FROM kv WHERE key = ?1")
        .map_err(backend)?
        .query_row([key], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()
        .map_err(backend)
}

fn check_expected(key: &str, expected: Option<Revision>, actual: Revision) -> StoreResult<()> {
    match expected {
        Some(expected) if expected != actual => Err(StoreError::Conflict {
            key: key.to_string(),
            expected,
            actual,
        }),
        _ => Ok(()),
    }
}

/// Outer error: the transaction is broken. Inner error: this op was refused.
fn apply_op(
    tx: &rusqlite::Transaction<'_>,
    rev: &mut Revision,
    op: &WriteOp,
) -> StoreResult<StoreResult<Revision>> {
    let log = |rev: Revision, key: &str, deleted: bool, value: &[u8], create: Revision| {
        tx.prepare_cached(
            "INSERT INTO log(rev, key, deleted, value, create_rev) VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .map_err(backend)?
        .execute(params![rev, key, deleted, value, create])
        .map_err(backend)
    };
    match op {
        WriteOp::Create { key, value } => {
            if current(tx, key)?.is_some() {
                return Ok(Err(StoreError::AlreadyExists(key.clone())));
            }
            *rev += 1;
            tx.prepare_cached(
                "INSERT INTO kv(key, value, create_rev, mod_rev) VALUES (?1, ?2, ?3, ?3)",
            )
            .map_err(backend)?
            .execute(params![key, &value[..], *rev])
            .map_err(backend)?;
            log(*rev, key, false, value, *rev)?;
        }
        WriteOp::Update {
            key,
            value,
            expected,
        } => {
            let Some((create, actual, _)) = current(tx, key)? else {
                return Ok(Err(StoreError::NotFound(key.clone())));
            };
            if let Err(e) = check_expected(key, Some(*expected), actual) {
                return Ok(Err(e));
            }
            *rev += 1;
            tx.prepare_cached("UPDATE kv SET value = ?2, mod_rev = ?3 WHERE key = ?1")
                .map_err(backend)?
                .execute(params![key, &value[..], *rev])
                .map_err(backend)?;
            log(*rev, key, false, value, create)?;
        }
        WriteOp::Delete { key, expected } => {
            let Some((create, actual, old)) = current(tx, key)? else {
                return Ok(Err(StoreError::NotFound(key.clone())));
            };
            if let Err(e) = check_expected(key, *expected, actual) {
                return Ok(Err(e));
            }
            *rev += 1;
            tx.prepare_cached("DELETE FROM kv WHERE key = ?1")
                .map_err(backend)?
                .execute([key])
                .map_err(backend)?;
            log(*rev, key, true, &old, create)?;
        }
        WriteOp::Compact { revision } => {
            let upto = (*revision).min(*rev);
            tx.execute("DELETE FROM log WHERE rev <= ?1", [upto])
                .map_err(backend)?;
            tx.execute(
                "INSERT INTO meta(name, value) VALUES('compacted', ?1)
                 ON CONFLICT(name) DO UPDATE SET value = max(value, excluded.value)",
                [upto],
            )
            .map_err(backend)?;
            return Ok(Ok(upto));
        }
    }
    Ok(Ok(*rev))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("state.db")).unwrap();
        (dir, store)
    }

    #[tokio::test]
    async fn create_update_delete_with_revisions() {
        let (_dir, s) = store();
        let r1 = s.create("/a/x", Bytes::from_static(b"1")).await.unwrap();
        assert!(matches!(
            s.create("/a/x", Bytes::from_static(b"2")).await,
            Err(StoreError::AlreadyExists(_))
        ));
        let r2 = s
            .update("/a/x", Bytes::from_static(b"2"), r1)
            .await
            .unwrap();
        assert!(r2 > r1);
        assert!(matches!(
            s.update("/a/x", Bytes::from_static(b"3"), r1).await,
            Err(StoreError::Conflict { .. })
        ));
        let kv = s.get("/a/x").await.unwrap().unwrap();
        assert_eq!(
            (kv.create_revision, kv.mod_revision, &kv.value[..]),
            (r1, r2, &b"2"[..])
        );
        s.create("/b/y", Bytes::from_static(b"b")).await.unwrap();
        let (items, rev) = s.list("/a/").await.unwrap();
        assert_eq!(items.len(), 1);
        assert_eq!(rev, s.current_revision());
        s.delete("/a/x", Some(r2)).await.unwrap();
        assert!(s.get("/a/x").await.unwrap().is_none());
        assert!(matches!(
            s.delete("/a/x", None).await,
            Err(StoreError::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn watch_replays_then_follows_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let rev = {
            let s = SqliteStore::open(&path).unwrap();
            s.create("/k/1", Bytes::from_static(b"1")).await.unwrap();
            s.create("/k/2", Bytes::from_static(b"2")).await.unwrap()
        };
        let s = SqliteStore::open(&path).unwrap();
        assert_eq!(s.current_revision(), rev);
        let mut events = s.watch(0).await.unwrap();
        assert_eq!(events.recv().await.unwrap().unwrap().kv.key, "/k/1");
        assert_eq!(events.recv().await.unwrap().unwrap().kv.key, "/k/2");
        s.delete("/k/1", None).await.unwrap();
        let deleted = events.recv().await.unwrap().unwrap();
        assert_eq!(
            (deleted.kind, &deleted.kv.value[..]),
            (EventKind::Delete, &b"1"[..])
        );
        s.compact(rev).await.unwrap();
        assert!(matches!(
            s.watch(0).await,
            Err(StoreError::Compacted { .. })
        ));
    }

    #[tokio::test]
    async fn concurrent_writes_are_batched_and_all_acknowledged() {
        let (_dir, s) = store();
        let s = Arc::new(s);
        let tasks: Vec<_> = (0..200)
            .map(|i| {
                let s = s.clone();
                tokio::spawn(
                    async move { s.create(&format!("/c/{i}"), Bytes::from_static(b"v")).await },
                )
            })
            .collect();
        let mut revs = Vec::new();
        for t in tasks {
            revs.push(t.await.unwrap().unwrap());
        }
        revs.sort();
        revs.dedup();
        assert_eq!(revs.len(), 200);
        assert_eq!(s.list("/c/").await.unwrap().0.len(), 200);
    }
}
