//! Suite `controlplane`: list, watch fan-out, sustained writes and memory of
//! `ferry controlplane` holding 10,000 Services and 10,000 EndpointSlices
//! (100,000 endpoints). The control plane and the clients run in a bench namespace.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry_testkit::Netns;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, ListParams, Patch, PatchParams, WatchEvent, WatchParams};
use serde_json::json;

use crate::cluster::{self, progress, ControlPlane, NsRuntime, BENCH_NS};
use crate::report::{Record, Report};
use crate::stats::{p50_p99, Summary};
use crate::Ctx;

const TOOL: &str = "ferry-bench (kube-rs client)";

struct Sizes {
    services: usize,
    list_runs: usize,
    watchers: usize,
    watch_rounds: usize,
    writes_per_round: usize,
    write_runs: usize,
    write_secs: f64,
    writers: usize,
}

pub async fn run(ctx: &Ctx) -> Result<Report> {
    let z = if ctx.quick {
        Sizes {
            services: 1_000,
            list_runs: 3,
            watchers: 100,
            watch_rounds: 3,
            writes_per_round: 30,
            write_runs: 3,
            write_secs: 1.0,
            writers: 64,
        }
    } else {
        Sizes {
            services: 10_000,
            list_runs: 5,
            watchers: 100,
            watch_rounds: 3,
            writes_per_round: 100,
            write_runs: 3,
            write_secs: 3.0,
            writers: 64,
        }
    };
    let mut rep = Report::new(
        "controlplane",
        &format!(
            "Control plane: {} Services, {} EndpointSlices ({} endpoints)",
            z.services,
            z.services,
            z.services * 10
        ),
    );
    let ns = Netns::new("cp")?;
    progress(format!(
        "controlplane: starting ferry controlplane in namespace {}",
        ns.name()
    ));
    let cp = ControlPlane::start(&ctx.ferry, &ns, "127.0.0.1")?;
    let rt = NsRuntime::new(ns.name(), 2)?;
    let kc = cp.kubeconfig();
    let client = rt
        .run(async move { ControlPlane::client(kc).await })
        .await?;
    let mut rss_samples = Vec::new();
    let mut sample_rss = |what: &str| {
        if let Some((rss, hwm)) = cluster::rss_mib(cp.pid()) {
            progress(format!(
                "controlplane: RSS {rss:.0} MiB (peak {hwm:.0} MiB) {what}"
            ));
            rss_samples.push((rss, hwm));
        }
    };
    sample_rss("at start");

    // Load.
    let c = client.clone();
    let n = z.services;
    progress(format!(
        "controlplane: loading {n} services + {n} endpoint slices, 64 creates in flight"
    ));
    let (objects, secs, _) = rt
        .run(async move {
            cluster::ensure_namespace(&c).await?;
            cluster::load_services(c, 0..n, 10, 64, "controlplane").await
        })
        .await?;
    progress(format!(
        "controlplane: loaded {objects} objects in {secs:.1} s ({:.0}/s)",
        objects as f64 / secs
    ));
    rep.push(Record::new(
        "api",
        "-",
        "create rate while loading (64 in flight)",
        "objects/s",
        Summary::of(&[objects as f64 / secs]).unwrap(),
        TOOL,
    ));
    sample_rss("after load");

    // List.
    let mut raw = Vec::new();
    let mut typed = Vec::new();
    let mut slices = Vec::new();
    for run in 0..z.list_runs {
        let c = client.clone();
        let (r, t, s, count, bytes) = rt
            .run(async move {
                let t0 = Instant::now();
                let body = c
                    .request_text(http::Request::get("/api/v1/services").body(vec![])?)
                    .await?;
                let r = t0.elapsed().as_secs_f64() * 1e3;
                let t0 = Instant::now();
                let list = Api::<Service>::all(c.clone())
                    .list(&ListParams::default())
                    .await?;
                let t = t0.elapsed().as_secs_f64() * 1e3;
                let t0 = Instant::now();
                let sbody = c
                    .request_text(
                        http::Request::get("/apis/discovery.k8s.io/v1/endpointslices")
                            .body(vec![])?,
                    )
                    .await?;
                let s = t0.elapsed().as_secs_f64() * 1e3;
                anyhow::ensure!(sbody.len() > 1000, "endpointslice list too short");
                Ok((r, t, s, list.items.len(), body.len()))
            })
            .await?;
        if count < n {
            bail!("list returned {count} services, expected at least {n}");
        }
        progress(format!(
            "controlplane: list run {}: services {r:.0} ms raw ({:.1} MB), {t:.0} ms typed ({count} items); endpointslices {s:.0} ms",
            run + 1,
            bytes as f64 / 1e6
        ));
        raw.push(r);
        typed.push(t);
        slices.push(s);
    }
    rep.push(Record::new(
        "api",
        "-",
        "list all services (JSON body received)",
        "ms",
        Summary::of(&raw).unwrap(),
        TOOL,
    ));
    rep.push(Record::new(
        "api",
        "-",
        "list all services (decoded by kube-rs)",
        "ms",
        Summary::of(&typed).unwrap(),
        TOOL,
    ));
    rep.push(Record::new(
        "api",
        "-",
        "list all endpointslices (JSON body received)",
        "ms",
        Summary::of(&slices).unwrap(),
        TOOL,
    ));
    sample_rss("after lists");

    // Watch fan-out.
    progress(format!(
        "controlplane: watch fan-out: {} watchers on all services, {} rounds of {} writes",
        z.watchers, z.watch_rounds, z.writes_per_round
    ));
    let c = client.clone();
    let w = rt
        .run(watch_fanout(
            c,
            z.watchers,
            z.watch_rounds,
            z.writes_per_round,
            n,
        ))
        .await?;
    let nw = z.watchers;
    rep.push(Record::new(
        "watch",
        "-",
        &format!("write ack → event at each of {nw} watchers, p50"),
        "ms",
        Summary::of(&w.ack_p50).unwrap(),
        TOOL,
    ));
    rep.push(Record::new(
        "watch",
        "-",
        &format!("write ack → event at each of {nw} watchers, p99"),
        "ms",
        Summary::of(&w.ack_p99).unwrap(),
        TOOL,
    ));
    rep.push(Record::new(
        "watch",
        "-",
        &format!("write sent → event at each of {nw} watchers, p50"),
        "ms",
        Summary::of(&w.sent_p50).unwrap(),
        TOOL,
    ));
    rep.push(Record::new(
        "watch",
        "-",
        &format!("write sent → event at each of {nw} watchers, p99"),
        "ms",
        Summary::of(&w.sent_p99).unwrap(),
        TOOL,
    ));
    if w.missing > 0 {
        rep.note(format!(
            "watch: {} (watcher, write) events did not arrive within 10 s",
            w.missing
        ));
    }
    sample_rss("after watch fan-out");

    // Sustained writes.
    let mut rates = Vec::new();
    for run in 0..z.write_runs {
        let c = client.clone();
        let (writers, secs) = (z.writers, z.write_secs);
        let (count, elapsed) = rt
            .run(async move { sustained_writes(c, writers, secs, n, run).await })
            .await?;
        let rate = count as f64 / elapsed;
        progress(format!(
            "controlplane: writes run {}: {count} acknowledged writes in {elapsed:.2} s = {rate:.0}/s ({writers} writers)",
            run + 1
        ));
        rates.push(rate);
    }
    rep.push(Record::new(
        "api",
        "-",
        &format!(
            "sustained writes ({} concurrent writers, merge patch)",
            z.writers
        ),
        "writes/s",
        Summary::of(&rates).unwrap(),
        TOOL,
    ));
    sample_rss("after writes");

    // EndpointSlice controller: pod readiness change → its slice updated.
    let c = client.clone();
    let flips = if ctx.quick { 10 } else { 30 };
    let lat = rt
        .run(async move { endpointslice_latency(c, flips).await })
        .await?;
    let mut sorted = lat.clone();
    if let (Some((p50, p99)), Some(s)) = (p50_p99(&mut sorted), Summary::of(&lat)) {
        progress(format!(
            "controlplane: pod readiness → EndpointSlice: p50 {p50:.1} ms, p99 {p99:.1} ms ({} changes)",
            lat.len()
        ));
        for (q, v) in [("p50", p50), ("p99", p99)] {
            rep.push(Record::new(
                "controller",
                "-",
                &format!("pod Ready flip → EndpointSlice updated (watch event), {q}"),
                "ms",
                Summary { median: v, ..s },
                TOOL,
            ));
        }
        rep.note(format!("EndpointSlice controller: {} pod status writes, each flipping one of 20 pods' Ready condition, 50 ms apart; the figure runs from sending the status PATCH until a watch on the service's EndpointSlices shows that endpoint's `ready` changed (min/max = fastest/slowest change). Target (issue 5): updated within 100 ms.", lat.len()));
    }

    let rss: Vec<f64> = rss_samples.iter().map(|s| s.0).collect();
    let hwm = rss_samples.iter().map(|s| s.1).fold(0.0, f64::max);
    rep.push(Record::new(
        "process",
        "-",
        "control plane RSS (VmRSS, samples after load)",
        "MiB",
        Summary::of(rss.get(1..).unwrap_or(&rss)).context("no RSS samples")?,
        "/proc/PID/status",
    ));
    rep.push(Record::new(
        "process",
        "-",
        "control plane peak RSS (VmHWM)",
        "MiB",
        Summary::of(&[hwm]).unwrap(),
        "/proc/PID/status",
    ));

    // Targets (issue 2).
    let get = |m: &str| {
        rep.records
            .iter()
            .find(|r| r.metric.starts_with(m))
            .map(|r| r.median)
    };
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    let mut notes = Vec::new();
    if let Some(v) = get("list all services (JSON") {
        notes.push(format!(
            "Target list ≤ 200 ms: {:.0} ms — {}",
            v,
            verdict(v <= 200.0)
        ));
    }
    if let Some(v) = rep
        .records
        .iter()
        .find(|r| {
            r.path == "watch" && r.metric.starts_with("write ack") && r.metric.ends_with("p99")
        })
        .map(|r| r.median)
    {
        notes.push(format!(
            "Target watch p99 ≤ 50 ms: {:.1} ms — {}",
            v,
            verdict(v <= 50.0)
        ));
    }
    if let Some(v) = get("sustained writes") {
        notes.push(format!(
            "Target ≥ 2,000 writes/s: {:.0}/s — {}",
            v,
            verdict(v >= 2000.0)
        ));
    }
    notes.push(format!(
        "Target RSS ≤ 300 MiB: peak {:.0} MiB — {}",
        hwm,
        verdict(hwm <= 300.0)
    ));
    for n in notes {
        rep.note(n);
    }
    rep.note("Client and server share the machine's 2 cores; every figure includes TLS and the client's own work. Watch latency is measured from the moment the writer has the write's response to the moment each watcher has decoded the event; an event that arrives before the writer sees its response counts as 0 ms (so p50 is often 0); `write sent → event` measures from the moment the write request was sent instead (write latency included). Writes are JSON merge patches of a label on distinct Services; each acknowledged write is durable (SQLite WAL, synchronous).");
    drop(rt);
    drop(cp);
    drop(ns);
    Ok(rep)
}

/// (write sequence number, when a watcher decoded its event), per watcher.
type Arrivals = Arc<Mutex<Vec<(u64, Instant)>>>;

#[derive(Default)]
struct WatchResult {
    ack_p50: Vec<f64>,
    ack_p99: Vec<f64>,
    sent_p50: Vec<f64>,
    sent_p99: Vec<f64>,
    missing: usize,
}

/// Starts `watchers` watches of all services from the current resourceVersion, then
/// writes `rounds × writes` label patches (10 ms apart). Returns per-round p50 and p99
/// (ms) over every (watcher, write) pair, and how many events never arrived.
async fn watch_fanout(
    client: kube::Client,
    watchers: usize,
    rounds: usize,
    writes: usize,
    services: usize,
) -> Result<WatchResult> {
    let api: Api<Service> = Api::all(client.clone());
    let rv = api
        .list_metadata(&ListParams::default().limit(1))
        .await?
        .metadata
        .resource_version
        .context("list has no resourceVersion")?;
    // arrivals[w] = (seq, when)
    let arrivals: Vec<Arrivals> = (0..watchers)
        .map(|_| Arc::new(Mutex::new(Vec::new())))
        .collect();
    let mut tasks = Vec::new();
    for a in &arrivals {
        let (api, a, rv) = (api.clone(), a.clone(), rv.clone());
        tasks.push(tokio::spawn(async move {
            let wp = WatchParams::default().timeout(290);
            let mut stream = api.watch(&wp, &rv).await?.boxed();
            while let Some(ev) = stream.next().await {
                if let WatchEvent::Modified(s) | WatchEvent::Added(s) = ev? {
                    let now = Instant::now();
                    if let Some(seq) = s
                        .metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get("bench-seq"))
                        .and_then(|v| v.parse::<u64>().ok())
                    {
                        a.lock().unwrap().push((seq, now));
                    }
                }
            }
            anyhow::Ok(())
        }));
    }
    let ns_api: Api<Service> = Api::namespaced(client.clone(), BENCH_NS);
    let patch = |seq: u64| {
        let api = ns_api.clone();
        async move {
            let name = format!("svc-{}", seq as usize % services);
            let sent = Instant::now();
            api.patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"bench-seq": seq.to_string()}}})),
            )
            .await?;
            anyhow::Ok((sent, Instant::now()))
        }
    };
    let wait_all = |seq_end: u64, count: usize| {
        let arrivals = arrivals.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                let done = arrivals.iter().all(|a| {
                    a.lock()
                        .unwrap()
                        .iter()
                        .filter(|(s, _)| *s < seq_end)
                        .count()
                        >= count
                });
                if done {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            false
        }
    };
    // Warm-up: one write every watcher must see (proves all streams are open).
    let mut seq = 1_000_000u64;
    let t_open = Instant::now();
    loop {
        patch(seq).await?;
        let target = seq;
        let all = arrivals
            .iter()
            .all(|a| a.lock().unwrap().iter().any(|(s, _)| *s == target));
        if all || wait_all_seen(&arrivals, target, Duration::from_millis(500)).await {
            break;
        }
        if t_open.elapsed() > Duration::from_secs(20) {
            bail!("not every watcher was receiving events after 20 s");
        }
        seq += 1;
    }
    for a in &arrivals {
        a.lock().unwrap().clear();
    }
    let mut out = WatchResult::default();
    let mut next = 0u64;
    for round in 0..rounds {
        let mut acks = Vec::new();
        for _ in 0..writes {
            acks.push((next, patch(next).await?));
            next += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        wait_all(next, next as usize).await;
        let mut lat = Vec::new();
        let mut from_sent = Vec::new();
        for a in &arrivals {
            let a = a.lock().unwrap();
            for (s, (sent, ack)) in &acks {
                match a.iter().find(|(x, _)| x == s) {
                    Some((_, when)) => {
                        lat.push(when.saturating_duration_since(*ack).as_secs_f64() * 1e3);
                        from_sent.push(when.saturating_duration_since(*sent).as_secs_f64() * 1e3);
                    }
                    None => out.missing += 1,
                }
            }
        }
        let (p50, p99) = p50_p99(&mut lat).context("no watch events")?;
        let (s50, s99) = p50_p99(&mut from_sent).context("no watch events")?;
        progress(format!(
            "controlplane: watch round {}: {} events, from ack p50 {p50:.2} ms p99 {p99:.2} ms; from send p50 {s50:.2} ms p99 {s99:.2} ms",
            round + 1,
            lat.len()
        ));
        out.ack_p50.push(p50);
        out.ack_p99.push(p99);
        out.sent_p50.push(s50);
        out.sent_p99.push(s99);
    }
    for t in tasks {
        t.abort();
    }
    Ok(out)
}

async fn wait_all_seen(arrivals: &[Arrivals], seq: u64, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if arrivals
            .iter()
            .all(|a| a.lock().unwrap().iter().any(|(s, _)| *s == seq))
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// `writers` tasks patching distinct services for `secs` (at most 100,000 writes).
/// A Service selecting 20 pods (running, with IPs); `flips` times, one pod's Ready
/// condition is flipped through pods/status and the time until a watch on the
/// Service's EndpointSlices shows the change is recorded (ms).
async fn endpointslice_latency(client: kube::Client, flips: usize) -> Result<Vec<f64>> {
    use k8s_openapi::api::core::v1::Pod;
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    const PODS: usize = 20;
    let pods: Api<Pod> = Api::namespaced(client.clone(), BENCH_NS);
    let svcs: Api<Service> = Api::namespaced(client.clone(), BENCH_NS);
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), BENCH_NS);
    // Endpoint readiness as the watch last showed it (watching before anything
    // exists, so every slice version arrives as an event).
    let seen: Arc<Mutex<std::collections::HashMap<String, bool>>> = Default::default();
    let notify = Arc::new(tokio::sync::Notify::new());
    let (s2, n2) = (seen.clone(), notify.clone());
    let wp = WatchParams::default().labels("kubernetes.io/service-name=ctl-bench");
    let mut stream = slices.watch(&wp, "0").await?.boxed();
    let watch = tokio::spawn(async move {
        while let Some(Ok(ev)) = stream.next().await {
            if let WatchEvent::Added(sl) | WatchEvent::Modified(sl) = ev {
                let mut m = s2.lock().unwrap();
                for e in sl.endpoints.iter().flatten() {
                    let ready = e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(false);
                    for a in &e.addresses {
                        m.insert(a.clone(), ready);
                    }
                }
                n2.notify_waiters();
            }
        }
    });
    svcs.create(
        &Default::default(),
        &serde_json::from_value(json!({
            "metadata": {"name": "ctl-bench"},
            "spec": {"selector": {"app": "ctl-bench"}, "ports": [{"port": 80, "targetPort": 8080}]},
        }))?,
    )
    .await?;
    let ip = |i: usize| format!("10.250.0.{}", i + 1);
    let status = |i: usize, ready: bool| {
        let s = if ready { "True" } else { "False" };
        json!({"status": {"phase": "Running", "podIP": ip(i), "podIPs": [{"ip": ip(i)}],
            "conditions": [{"type": "Ready", "status": s}, {"type": "ContainersReady", "status": s}]}})
    };
    let created = Instant::now();
    for i in 0..PODS {
        let name = format!("ctl-bench-{i}");
        pods.create(
            &Default::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": name, "labels": {"app": "ctl-bench"}},
                "spec": {"nodeName": "bench-node-ctl", "containers": [{"name": "c", "image": "none"}]},
            }))?,
        )
        .await?;
        pods.patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(status(i, true)),
        )
        .await?;
    }
    let shows = |ip: &str, ready: bool| seen.lock().unwrap().get(ip) == Some(&ready);
    progress(format!(
        "controlplane: {PODS} pods created in {:.1} s",
        created.elapsed().as_secs_f64()
    ));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(0..PODS).all(|i| shows(&ip(i), true)) {
        if Instant::now() > deadline {
            let now = slices
                .list(&ListParams::default().labels("kubernetes.io/service-name=ctl-bench"))
                .await?;
            bail!(
                "the EndpointSlice controller did not make 20 endpoints ready within 10 s: the watch saw {:?}; slices now {}",
                seen.lock().unwrap(),
                serde_json::to_string(&now.items)?
            );
        }
        let _ = tokio::time::timeout(Duration::from_millis(50), notify.notified()).await;
    }
    progress(format!(
        "controlplane: {PODS} endpoints ready {:.1} s after the first pod",
        created.elapsed().as_secs_f64()
    ));
    let mut lat = Vec::new();
    for k in 0..flips {
        let i = k % PODS;
        let ready = (k / PODS) % 2 == 1;
        let t0 = Instant::now();
        pods.patch_status(
            &format!("ctl-bench-{i}"),
            &PatchParams::default(),
            &Patch::Merge(status(i, ready)),
        )
        .await?;
        while !shows(&ip(i), ready) {
            if t0.elapsed() > Duration::from_secs(5) {
                let now = slices
                    .list(&ListParams::default().labels("kubernetes.io/service-name=ctl-bench"))
                    .await?;
                let pod = pods.get(&format!("ctl-bench-{i}")).await?;
                bail!("slice not updated within 5 s: pod {i} ready={ready}; watch saw {:?}; slices now {:?}; pod status {:?}", seen.lock().unwrap(), serde_json::to_string(&now.items), pod.status);
            }
            let _ = tokio::time::timeout(Duration::from_millis(5), notify.notified()).await;
        }
        lat.push(t0.elapsed().as_secs_f64() * 1e3);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    watch.abort();
    Ok(lat)
}

async fn sustained_writes(
    client: kube::Client,
    writers: usize,
    secs: f64,
    services: usize,
    run: usize,
) -> Result<(usize, f64)> {
    let api: Api<Service> = Api::namespaced(client, BENCH_NS);
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let cap = 100_000 / writers;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let api = api.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0usize;
            let mut i = w;
            while Instant::now() < deadline && n < cap {
                let name = format!("svc-{}", i % services);
                api.patch(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(
                        json!({"metadata": {"labels": {"bench-write": format!("{run}-{n}")}}}),
                    ),
                )
                .await?;
                n += 1;
                i += writers;
            }
            anyhow::Ok(n)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok((total, start.elapsed().as_secs_f64()))
}
