//! Watch streams: newline-delimited JSON events over a chunked response.
//!
//! A watch is a small state machine per client:
//! 1. start — from a resourceVersion (backlog from the cache's history, or
//!    410 Expired when that version is gone) or "now" with the current
//!    objects as synthetic ADDED events (`resourceVersion` unset or "0", or
//!    `sendInitialEvents=true`, which ends them with the
//!    `k8s.io/initial-events-end` bookmark);
//! 2. follow — each change, filtered by namespace, labels and fields; an
//!    object leaving the selection is sent as DELETED, one entering as ADDED;
//! 3. idle — a BOOKMARK every few seconds when asked for, so clients can
//!    resume from a recent version;
//! 4. end — at `timeoutSeconds`, when the client goes, or when it falls so far
//!    behind that the shared feed dropped events for it (it then re-watches).

use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::Response;
use serde_json::json;
use tokio::sync::{broadcast, mpsc};

use super::handlers::{include_object, table, Encoding, Filter};
use super::status::{ApiError, ApiResult};
use super::{ApiServer, Body, Query, Target};
use crate::cache::{CacheEvent, CachedObject, WatchError, WatchEventType};
use crate::resources::ResourceInfo;
use crate::store::Revision;

const BOOKMARK_EVERY: Duration = Duration::from_secs(5);
/// kube-apiserver's default: a random timeout between 30 and 60 minutes, so
/// that watches spread over the API servers of a cluster.
const DEFAULT_TIMEOUT_MIN: u64 = 1800;

struct Watcher {
    res: &'static ResourceInfo,
    prefix: String,
    filter: Filter,
    encoding: Encoding,
    include_object: String,
    bookmarks: bool,
    /// The first table event carries the column definitions; later ones don't.
    columns_sent: bool,
    /// Revision of the last change looked at (sent or filtered out).
    seen: Revision,
    out: mpsc::Sender<Bytes>,
}

fn frame(kind: &str, object: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(object.len() + 32);
    b.put_slice(b"{\"type\":\"");
    b.put_slice(kind.as_bytes());
    b.put_slice(b"\",\"object\":");
    b.put_slice(object);
    b.put_slice(b"}\n");
    b.freeze()
}

impl Watcher {
    async fn send_object(&mut self, kind: WatchEventType, obj: &CachedObject) -> bool {
        let bytes = match self.encoding {
            Encoding::Json => frame(kind.as_str(), &obj.json),
            Encoding::Table => {
                let t = table(
                    self.res,
                    &[obj.value()],
                    &obj.revision.to_string(),
                    None,
                    &self.include_object,
                    !self.columns_sent,
                );
                self.columns_sent = true;
                frame(kind.as_str(), &serde_json::to_vec(&t).unwrap_or_default())
            }
        };
        self.out.send(bytes).await.is_ok()
    }

    async fn send_bookmark(&mut self, initial_events_end: bool) -> bool {
        let mut metadata = json!({"resourceVersion": self.seen.to_string()});
        if initial_events_end {
            metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        let object = json!({"kind": self.res.kind, "apiVersion": self.res.api_version(), "metadata": metadata});
        self.out
            .send(frame(
                "BOOKMARK",
                &serde_json::to_vec(&object).unwrap_or_default(),
            ))
            .await
            .is_ok()
    }

    fn selects(&self, obj: &CachedObject) -> bool {
        obj.key.starts_with(&self.prefix) && self.filter.matches(obj)
    }

    /// Sends what a change means for this watcher's selection.
    async fn on_event(&mut self, event: &CacheEvent) -> bool {
        self.seen = event.revision();
        let now = self.selects(&event.object);
        let before = event.prev.as_ref().is_some_and(|p| self.selects(p));
        let kind = match (event.kind, before, now) {
            (WatchEventType::Deleted, _, true) => WatchEventType::Deleted,
            (WatchEventType::Deleted, _, false) => return true,
            (_, false, true) => WatchEventType::Added,
            (_, true, true) => WatchEventType::Modified,
            (_, true, false) => WatchEventType::Deleted,
            (_, false, false) => return true,
        };
        self.send_object(kind, &event.object).await
    }

    async fn follow(
        mut self,
        backlog: Vec<Arc<CacheEvent>>,
        mut live: broadcast::Receiver<Arc<CacheEvent>>,
        timeout: Duration,
    ) {
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        for event in backlog {
            if !self.on_event(&event).await {
                return;
            }
        }
        let mut bookmark =
            tokio::time::interval_at(tokio::time::Instant::now() + BOOKMARK_EVERY, BOOKMARK_EVERY);
        loop {
            tokio::select! {
                _ = &mut deadline => return,
                _ = self.out.closed() => return,
                _ = bookmark.tick(), if self.bookmarks => {
                    if !self.send_bookmark(false).await { return; }
                }
                event = live.recv() => match event {
                    // The backlog already covered it.
                    Ok(event) if event.revision() <= self.seen => {}
                    Ok(event) => if !self.on_event(&event).await { return },
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::info!(resource = self.res.plural, dropped = n, "watcher fell behind; closing its watch");
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    }
}

fn flag(query: &Query, name: &str) -> bool {
    matches!(query.get(name).map(String::as_str), Some("true" | "1"))
}

fn timeout(query: &Query) -> ApiResult<Duration> {
    match query.get("timeoutSeconds") {
        Some(t) => t.parse::<u64>().map(Duration::from_secs).map_err(|_| {
            ApiError::bad_request(format!(
                "timeoutSeconds must be a non-negative integer, got {t:?}"
            ))
        }),
        None => Ok(Duration::from_secs(
            DEFAULT_TIMEOUT_MIN + rand::random::<u64>() % DEFAULT_TIMEOUT_MIN,
        )),
    }
}

pub async fn serve(
    server: Arc<ApiServer>,
    target: Target,
    query: Query,
    encoding: Encoding,
) -> ApiResult<Response<Body>> {
    let filter = Filter::from_query(target.res, &query)?;
    let timeout = timeout(&query)?;
    let send_initial = flag(&query, "sendInitialEvents");
    let rv = query.get("resourceVersion").cloned().unwrap_or_default();
    if send_initial && query.get("resourceVersionMatch").map(String::as_str) != Some("NotOlderThan")
    {
        return Err(ApiError::bad_request(
            "sendInitialEvents=true requires resourceVersionMatch=NotOlderThan",
        ));
    }
    let prefix = target.res.scope_prefix(target.namespace.as_deref());
    let (out, rx) = mpsc::channel::<Bytes>(256);
    let mut watcher = Watcher {
        res: target.res,
        prefix: prefix.clone(),
        filter,
        encoding,
        include_object: include_object(&query).to_string(),
        bookmarks: flag(&query, "allowWatchBookmarks"),
        columns_sent: false,
        seen: 0,
        out,
    };
    let cache = server.registry.cache().clone();
    if send_initial || rv.is_empty() || rv == "0" {
        let (objects, revision, feed) = cache.watch_now(&prefix);
        watcher.seen = revision;
        tokio::spawn(async move {
            for obj in &objects {
                if watcher.selects(obj) && !watcher.send_object(WatchEventType::Added, obj).await {
                    return;
                }
            }
            if send_initial && !watcher.send_bookmark(true).await {
                return;
            }
            watcher.follow(feed.backlog, feed.live, timeout).await;
        });
    } else {
        let from: Revision = rv.parse().map_err(|_| {
            ApiError::bad_request(format!("resourceVersion must be an integer, got {rv:?}"))
        })?;
        match cache.watch_from(from).await {
            Ok(feed) => {
                watcher.seen = from;
                tokio::spawn(watcher.follow(feed.backlog, feed.live, timeout));
            }
            Err(e @ WatchError::TooOld { .. }) => {
                // As kube-apiserver does: the stream opens, then one ERROR event.
                let status = ApiError::gone(e.to_string()).to_status();
                let _ = watcher
                    .out
                    .send(frame(
                        "ERROR",
                        &serde_json::to_vec(&status).unwrap_or_default(),
                    ))
                    .await;
            }
            Err(e @ WatchError::TooLarge { .. }) => return Err(ApiError::timeout(e.to_string())),
        }
    }
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok(hyper::body::Frame::data(b)), rx))
    });
    let mut resp = Response::new(http_body_util::StreamBody::new(stream).boxed_unsync());
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(resp)
}
