//! The kube-rs client and runtime watcher (what ferry's proxy uses) against a
//! real `ferry controlplane`: list+watch, bookmarks, streaming lists, a forced
//! 410 and relist, kill -9 + restart durability, and label-filtered watches.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::runtime::watcher;
use kube::ResourceExt;
use support::ControlPlane;

/// Upper bound for waiting on any single expected event.
const EVENT_WAIT: Duration = Duration::from_secs(20);

type Watcher = BoxStream<'static, Result<watcher::Event<ConfigMap>, watcher::Error>>;
type RawWatch = BoxStream<'static, kube::Result<WatchEvent<ConfigMap>>>;

fn configmap(name: &str, labels: &[(&str, &str)], data: &[(&str, &str)]) -> ConfigMap {
    let mut cm = ConfigMap::default();
    cm.metadata.name = Some(name.to_string());
    if !labels.is_empty() {
        cm.metadata.labels = Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
    }
    cm.data = Some(
        data.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    );
    cm
}

fn rv_of(cm: &ConfigMap) -> u64 {
    cm.resource_version()
        .expect("objects carry a resourceVersion")
        .parse()
        .expect("ferry's resourceVersions are integers")
}

/// A one-line description of a runtime watcher item, for assertions and messages.
fn describe(item: &Result<watcher::Event<ConfigMap>, watcher::Error>) -> String {
    match item {
        Ok(watcher::Event::Init) => "Init".into(),
        Ok(watcher::Event::InitApply(o)) => format!("InitApply({})", o.name_any()),
        Ok(watcher::Event::InitDone) => "InitDone".into(),
        Ok(watcher::Event::Apply(o)) => format!("Apply({})", o.name_any()),
        Ok(watcher::Event::Delete(o)) => format!("Delete({})", o.name_any()),
        Err(watcher::Error::WatchError(status)) => format!("WatchError({})", status.code),
        Err(e) => format!("Err({e})"),
    }
}

/// Polls the watcher until `done` holds for an item, recording every item. The
/// watcher retries by itself after an error; a short pause stands in for the
/// backoff a real consumer applies.
async fn watch_until(
    w: &mut Watcher,
    log: &mut Vec<String>,
    wait: Duration,
    done: impl Fn(&Result<watcher::Event<ConfigMap>, watcher::Error>) -> bool,
) {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let item = match tokio::time::timeout_at(deadline, w.next()).await {
            Ok(Some(item)) => item,
            Ok(None) => panic!("the watcher stream ended; seen so far: {log:?}"),
            Err(_) => panic!("no matching watcher event within {wait:?}; seen so far: {log:?}"),
        };
        log.push(describe(&item));
        if done(&item) {
            return;
        }
        if item.is_err() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The next runtime watcher event, which must not be an error.
async fn next_ok(w: &mut Watcher, log: &mut Vec<String>) -> watcher::Event<ConfigMap> {
    match tokio::time::timeout(EVENT_WAIT, w.next()).await {
        Ok(Some(Ok(event))) => {
            log.push(describe(&Ok(event.clone())));
            event
        }
        Ok(Some(Err(e))) => panic!("watcher error {e}; seen so far: {log:?}"),
        Ok(None) => panic!("the watcher stream ended; seen so far: {log:?}"),
        Err(_) => panic!("no watcher event within {EVENT_WAIT:?}; seen so far: {log:?}"),
    }
}

/// Expects the initial listing: Init, InitApply for exactly `names`, InitDone.
async fn expect_initial_sync(w: &mut Watcher, log: &mut Vec<String>, names: &[&str]) {
    assert!(
        matches!(next_ok(w, log).await, watcher::Event::Init),
        "{log:?}"
    );
    let mut listed = BTreeSet::new();
    for _ in 0..1000 {
        match next_ok(w, log).await {
            watcher::Event::InitApply(cm) => {
                listed.insert(cm.name_any());
            }
            watcher::Event::InitDone => {
                let expected: BTreeSet<String> = names.iter().map(|s| s.to_string()).collect();
                assert_eq!(listed, expected, "initial objects; events: {log:?}");
                return;
            }
            other => panic!(
                "unexpected {} during the initial list; events: {log:?}",
                describe(&Ok(other))
            ),
        }
    }
    panic!("no InitDone after 1000 events: {log:?}");
}

/// The next raw watch event that is not a bookmark.
async fn next_raw(s: &mut RawWatch, what: &str) -> WatchEvent<ConfigMap> {
    let deadline = tokio::time::Instant::now() + EVENT_WAIT;
    loop {
        match tokio::time::timeout_at(deadline, s.next()).await {
            Ok(Some(Ok(WatchEvent::Bookmark(_)))) => continue,
            Ok(Some(Ok(event))) => return event,
            Ok(Some(Err(e))) => panic!("watch stream error while waiting for {what}: {e}"),
            Ok(None) => panic!("the watch stream ended while waiting for {what}"),
            Err(_) => panic!("no watch event within {EVENT_WAIT:?} while waiting for {what}"),
        }
    }
}

async fn list_rv(api: &Api<ConfigMap>) -> String {
    api.list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .expect("lists carry a resourceVersion")
}

#[tokio::test]
async fn list_then_watch_sees_create_update_delete() {
    let cp = ControlPlane::start();
    let api: Api<ConfigMap> = Api::namespaced(cp.client().await, "default");
    api.create(
        &PostParams::default(),
        &configmap("existing", &[], &[("k", "v")]),
    )
    .await
    .unwrap();

    let mut w: Watcher = watcher(api.clone(), watcher::Config::default()).boxed();
    let mut log = Vec::new();
    expect_initial_sync(&mut w, &mut log, &["existing"]).await;

    let created = api
        .create(&PostParams::default(), &configmap("w1", &[], &[("a", "1")]))
        .await
        .unwrap();
    match next_ok(&mut w, &mut log).await {
        watcher::Event::Apply(cm) => {
            assert_eq!(cm.name_any(), "w1");
            assert_eq!(cm.data.as_ref().unwrap()["a"], "1");
            assert_eq!(cm.resource_version(), created.resource_version());
        }
        other => panic!(
            "expected Apply(w1) for the create, got {}",
            describe(&Ok(other))
        ),
    }

    let patch = serde_json::json!({"data": {"a": "2"}});
    let updated = api
        .patch("w1", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    assert!(rv_of(&updated) > rv_of(&created));
    match next_ok(&mut w, &mut log).await {
        watcher::Event::Apply(cm) => {
            assert_eq!(cm.name_any(), "w1");
            assert_eq!(cm.data.as_ref().unwrap()["a"], "2", "the update's content");
            assert_eq!(cm.resource_version(), updated.resource_version());
        }
        other => panic!(
            "expected Apply(w1) for the update, got {}",
            describe(&Ok(other))
        ),
    }

    api.delete("w1", &DeleteParams::default()).await.unwrap();
    match next_ok(&mut w, &mut log).await {
        watcher::Event::Delete(cm) => {
            assert_eq!(cm.name_any(), "w1");
            assert!(
                rv_of(&cm) > rv_of(&updated),
                "a deletion has its own, newer version"
            );
        }
        other => panic!("expected Delete(w1), got {}", describe(&Ok(other))),
    }
    assert_eq!(
        log,
        [
            "Init",
            "InitApply(existing)",
            "InitDone",
            "Apply(w1)",
            "Apply(w1)",
            "Delete(w1)"
        ]
    );
}

#[tokio::test]
async fn bookmarks_arrive_on_an_idle_watch() {
    let cp = ControlPlane::start();
    let api: Api<ConfigMap> = Api::namespaced(cp.client().await, "default");
    api.create(&PostParams::default(), &configmap("a", &[], &[]))
        .await
        .unwrap();
    let rv = list_rv(&api).await;

    // WatchParams::default() asks for bookmarks (allowWatchBookmarks=true).
    let mut s: RawWatch = api
        .watch(&WatchParams::default().timeout(20), &rv)
        .await
        .unwrap()
        .boxed();
    // Nothing changes, so the first item must be a bookmark.
    let bookmark = match tokio::time::timeout(Duration::from_secs(11), s.next()).await {
        Ok(Some(Ok(WatchEvent::Bookmark(b)))) => b,
        Ok(Some(Ok(other))) => panic!("nothing changed, yet the watch sent {other:?}"),
        Ok(Some(Err(e))) => panic!("watch stream error: {e}"),
        Ok(None) => panic!("the watch ended before a bookmark"),
        Err(_) => panic!("no bookmark within 11 s (the server sends one every 5 s)"),
    };
    let bookmark_rv: u64 = bookmark.metadata.resource_version.parse().unwrap();
    assert!(
        bookmark_rv >= rv.parse::<u64>().unwrap(),
        "bookmark {bookmark_rv} older than {rv}"
    );
    assert!(
        !bookmark
            .metadata
            .annotations
            .contains_key("k8s.io/initial-events-end"),
        "a periodic bookmark is not the end of initial events"
    );

    // A write after the bookmark shows up on the same stream.
    api.create(&PostParams::default(), &configmap("b", &[], &[]))
        .await
        .unwrap();
    match next_raw(&mut s, "ADDED b").await {
        WatchEvent::Added(cm) => assert_eq!(cm.name_any(), "b"),
        other => panic!("expected ADDED b, got {other:?}"),
    }
}

#[tokio::test]
async fn streaming_list_sends_initial_objects_and_initial_events_end() {
    let cp = ControlPlane::start();
    let api: Api<ConfigMap> = Api::namespaced(cp.client().await, "default");
    for name in ["s1", "s2", "s3"] {
        api.create(&PostParams::default(), &configmap(name, &[], &[]))
            .await
            .unwrap();
    }

    // Raw: sendInitialEvents=true&resourceVersionMatch=NotOlderThan.
    let mut s: RawWatch = api
        .watch(&WatchParams::streaming_lists().timeout(20), "0")
        .await
        .unwrap()
        .boxed();
    let mut added = BTreeSet::new();
    let end = loop {
        match tokio::time::timeout(EVENT_WAIT, s.next()).await {
            Ok(Some(Ok(WatchEvent::Added(cm)))) => {
                added.insert(cm.name_any());
            }
            Ok(Some(Ok(WatchEvent::Bookmark(b)))) => {
                if b.metadata
                    .annotations
                    .contains_key("k8s.io/initial-events-end")
                {
                    break b;
                }
            }
            other => panic!("unexpected item in a streaming list: {other:?}"),
        }
    };
    assert_eq!(
        added,
        BTreeSet::from(["s1".to_string(), "s2".into(), "s3".into()])
    );
    assert_eq!(
        end.metadata.annotations["k8s.io/initial-events-end"],
        "true"
    );
    assert_eq!(end.metadata.resource_version, list_rv(&api).await);
    drop(s);

    // The runtime watcher's streaming-list strategy.
    let mut w: Watcher = watcher(api.clone(), watcher::Config::default().streaming_lists()).boxed();
    let mut log = Vec::new();
    expect_initial_sync(&mut w, &mut log, &["s1", "s2", "s3"]).await;
    api.create(&PostParams::default(), &configmap("s4", &[], &[]))
        .await
        .unwrap();
    match next_ok(&mut w, &mut log).await {
        watcher::Event::Apply(cm) => assert_eq!(cm.name_any(), "s4"),
        other => panic!("expected Apply(s4), got {}", describe(&Ok(other))),
    }
}

#[tokio::test]
async fn watch_from_a_compacted_version_gets_410() {
    let cp = ControlPlane::start_with(&["--watch-cache-size", "20"]);
    let api: Api<ConfigMap> = Api::namespaced(cp.client().await, "default");
    for i in 0..45 {
        api.create(
            &PostParams::default(),
            &configmap(&format!("c{i}"), &[], &[]),
        )
        .await
        .unwrap();
    }
    let mut s: RawWatch = api
        .watch(&WatchParams::default().timeout(10), "1")
        .await
        .unwrap()
        .boxed();
    match next_raw(&mut s, "the 410 ERROR event").await {
        WatchEvent::Error(status) => {
            assert_eq!(status.code, 410, "{status:?}");
            assert_eq!(status.reason, "Expired", "{status:?}");
            assert!(
                status.message.contains("too old resource version"),
                "{status:?}"
            );
        }
        other => panic!("expected an ERROR event with code 410, got {other:?}"),
    }

    // A recent version is still inside the window and resumes normally.
    let recent = list_rv(&api).await;
    let mut s: RawWatch = api
        .watch(&WatchParams::default().timeout(10), &recent)
        .await
        .unwrap()
        .boxed();
    api.create(&PostParams::default(), &configmap("after", &[], &[]))
        .await
        .unwrap();
    match next_raw(&mut s, "ADDED after").await {
        WatchEvent::Added(cm) => assert_eq!(cm.name_any(), "after"),
        other => panic!("expected ADDED after, got {other:?}"),
    }
}

#[tokio::test]
async fn watcher_relists_after_410_across_a_restart() {
    let mut cp = ControlPlane::start_with(&["--watch-cache-size", "20"]);
    let client = cp.client().await;
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    api.create(
        &PostParams::default(),
        &configmap("m1", &[("watched", "yes")], &[]),
    )
    .await
    .unwrap();

    // Without bookmarks the watcher's resourceVersion only moves with events
    // it receives, and it receives none for objects outside its selector.
    let config = watcher::Config::default()
        .labels("watched=yes")
        .disable_bookmarks();
    let mut w: Watcher = watcher(api.clone(), config).boxed();
    let mut log = Vec::new();
    expect_initial_sync(&mut w, &mut log, &["m1"]).await;
    let synced_at = list_rv(&api).await.parse::<u64>().unwrap();

    // Push the watcher's version out of the 20-change window.
    for i in 0..60 {
        api.create(
            &PostParams::default(),
            &configmap(&format!("other{i}"), &[("watched", "no")], &[]),
        )
        .await
        .unwrap();
    }
    assert!(list_rv(&api).await.parse::<u64>().unwrap() >= synced_at + 60);

    cp.kill_hard();
    cp.restart();

    // The watcher reconnects (failing while the server is down), resumes from
    // its old version, gets 410, and relists.
    watch_until(
        &mut w,
        &mut log,
        Duration::from_secs(40),
        |item| matches!(item, Err(watcher::Error::WatchError(s)) if s.code == 410),
    )
    .await;
    let before_relist = log.len();
    expect_initial_sync(&mut w, &mut log, &["m1"]).await;
    assert_eq!(log[before_relist..], ["Init", "InitApply(m1)", "InitDone"]);

    // And it keeps following the (restarted) server.
    api.create(
        &PostParams::default(),
        &configmap("m2", &[("watched", "yes")], &[]),
    )
    .await
    .unwrap();
    api.create(
        &PostParams::default(),
        &configmap("other-late", &[("watched", "no")], &[]),
    )
    .await
    .unwrap();
    match next_ok(&mut w, &mut log).await {
        watcher::Event::Apply(cm) => assert_eq!(cm.name_any(), "m2"),
        other => panic!(
            "expected Apply(m2), got {}; events: {log:?}",
            describe(&Ok(other))
        ),
    }
    // Errors before the 410: only failed reconnects while the server was down.
    let first_410 = log.iter().position(|e| e == "WatchError(410)").unwrap();
    assert!(
        log[3..first_410].iter().all(|e| e.starts_with("Err(")),
        "unexpected events before the 410: {log:?}"
    );
}

#[tokio::test]
async fn acknowledged_writes_survive_kill_9_and_watches_resume() {
    let mut cp = ControlPlane::start();
    let api: Api<ConfigMap> = Api::namespaced(cp.client().await, "default");
    let start_rv = list_rv(&api).await;

    // A watch records what it saw before the crash.
    let mut s: RawWatch = api
        .watch(&WatchParams::default().timeout(60), &start_rv)
        .await
        .unwrap()
        .boxed();

    let created: Vec<ConfigMap> = futures::stream::iter(0..50)
        .map(|i| {
            let api = api.clone();
            async move {
                api.create(
                    &PostParams::default(),
                    &configmap(
                        &format!("d{i:02}"),
                        &[("durable", "yes")],
                        &[("i", &i.to_string())],
                    ),
                )
                .await
            }
        })
        .buffer_unordered(50)
        .try_collect()
        .await
        .unwrap();
    assert_eq!(created.len(), 50);
    let acked: BTreeMap<String, String> = created
        .iter()
        .map(|cm| (cm.name_any(), cm.resource_version().unwrap()))
        .collect();
    assert_eq!(acked.len(), 50, "50 distinct objects");
    let distinct_rvs: BTreeSet<&String> = acked.values().collect();
    assert_eq!(
        distinct_rvs.len(),
        50,
        "each write has its own resourceVersion"
    );

    let mut last_seen = 0u64;
    let mut seen = BTreeSet::new();
    for _ in 0..50 {
        match next_raw(&mut s, "the 50 ADDED events").await {
            WatchEvent::Added(cm) => {
                let rv = rv_of(&cm);
                assert!(rv > last_seen, "watch events in version order");
                last_seen = rv;
                seen.insert(cm.name_any());
            }
            other => panic!("expected ADDED, got {other:?}"),
        }
    }
    assert_eq!(seen.len(), 50);
    let max_acked = created.iter().map(rv_of).max().unwrap();
    assert_eq!(last_seen, max_acked);
    drop(s);

    cp.kill_hard();
    cp.restart();
    let api: Api<ConfigMap> = Api::namespaced(cp.client().await, "default");

    let list = api
        .list(&ListParams::default().labels("durable=yes"))
        .await
        .unwrap();
    let listed: BTreeMap<String, String> = list
        .items
        .iter()
        .map(|cm| (cm.name_any(), cm.resource_version().unwrap()))
        .collect();
    assert_eq!(
        listed, acked,
        "every acknowledged object, at its acknowledged version"
    );
    let list_version: u64 = list.metadata.resource_version.unwrap().parse().unwrap();
    assert!(list_version >= max_acked);

    // Versions keep increasing after the restart.
    let after1 = api
        .create(&PostParams::default(), &configmap("after1", &[], &[]))
        .await
        .unwrap();
    assert!(rv_of(&after1) > list_version.max(max_acked));

    // Resuming from the last version seen before the crash: only newer events.
    let mut s: RawWatch = api
        .watch(&WatchParams::default().timeout(20), &last_seen.to_string())
        .await
        .unwrap()
        .boxed();
    let after2 = api
        .create(&PostParams::default(), &configmap("after2", &[], &[]))
        .await
        .unwrap();
    assert!(rv_of(&after2) > rv_of(&after1));
    for expected in [&after1, &after2] {
        match next_raw(&mut s, "the post-restart events").await {
            WatchEvent::Added(cm) => {
                assert_eq!(
                    cm.name_any(),
                    expected.name_any(),
                    "only events after {last_seen}"
                );
                assert_eq!(cm.resource_version(), expected.resource_version());
                assert!(rv_of(&cm) > last_seen);
            }
            other => panic!("expected ADDED {}, got {other:?}", expected.name_any()),
        }
    }
}

#[tokio::test]
async fn relabelled_object_leaves_a_label_filtered_watch_as_deleted() {
    let cp = ControlPlane::start();
    let api: Api<ConfigMap> = Api::namespaced(cp.client().await, "default");
    api.create(
        &PostParams::default(),
        &configmap("web-1", &[("tier", "web")], &[]),
    )
    .await
    .unwrap();
    api.create(
        &PostParams::default(),
        &configmap("db-1", &[("tier", "db")], &[]),
    )
    .await
    .unwrap();

    // The runtime watcher, as the proxy runs it.
    let mut w: Watcher =
        watcher(api.clone(), watcher::Config::default().labels("tier=web")).boxed();
    let mut log = Vec::new();
    expect_initial_sync(&mut w, &mut log, &["web-1"]).await;
    // A raw watch shows the exact event types.
    let rv = list_rv(&api).await;
    let mut s: RawWatch = api
        .watch(&WatchParams::default().labels("tier=web").timeout(30), &rv)
        .await
        .unwrap()
        .boxed();

    let relabel = |tier: &'static str| serde_json::json!({"metadata": {"labels": {"tier": tier}}});
    let moved = api
        .patch(
            "web-1",
            &PatchParams::default(),
            &Patch::Merge(&relabel("db")),
        )
        .await
        .unwrap();
    match next_ok(&mut w, &mut log).await {
        watcher::Event::Delete(cm) => {
            assert_eq!(cm.name_any(), "web-1");
            assert_eq!(cm.resource_version(), moved.resource_version());
        }
        other => panic!("expected Delete(web-1), got {}", describe(&Ok(other))),
    }
    match next_raw(&mut s, "DELETED web-1").await {
        WatchEvent::Deleted(cm) => assert_eq!(cm.name_any(), "web-1"),
        other => panic!("expected DELETED web-1, got {other:?}"),
    }

    // Changes outside the selection are not sent; entering it is an ADDED.
    api.patch(
        "db-1",
        &PatchParams::default(),
        &Patch::Merge(&serde_json::json!({"data": {"x": "1"}})),
    )
    .await
    .unwrap();
    api.patch(
        "db-1",
        &PatchParams::default(),
        &Patch::Merge(&relabel("web")),
    )
    .await
    .unwrap();
    match next_ok(&mut w, &mut log).await {
        watcher::Event::Apply(cm) => assert_eq!(cm.name_any(), "db-1"),
        other => panic!("expected Apply(db-1), got {}", describe(&Ok(other))),
    }
    match next_raw(&mut s, "ADDED db-1").await {
        WatchEvent::Added(cm) => {
            assert_eq!(cm.name_any(), "db-1");
            assert_eq!(cm.data.as_ref().unwrap()["x"], "1");
        }
        other => panic!("expected ADDED db-1, got {other:?}"),
    }
    assert_eq!(log[3..], ["Delete(web-1)", "Apply(db-1)"]);
}
