//! Suite `programming`: how fast `ferry proxy` puts 1,000 and 10,000 services ×
//! 10 endpoints into the kernel (nftables and iptables modes), how fast one
//! EndpointSlice change reaches the kernel, and the proxy's memory.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

use crate::cluster::{self, progress, ControlPlane, NsRuntime, Proxy, BENCH_NS};
use crate::report::{Record, Report};
use crate::stats::{p50_p99, Summary};
use crate::topology::{self, Topology};
use crate::Ctx;

/// Proxy modes measured (see [`cluster::proxy_mode_args`]): iptables mode once
/// with each iptables implementation.
const MODES: [&str; 3] = ["nftables", "iptables-legacy", "iptables-nft"];

/// kube-proxy v1.30.3's first full sync on this kind of machine (shared/FACTS.md):
/// (mode, services, seconds).
const KUBE_PROXY_SYNC: &[(&str, usize, f64, &str)] = &[
    ("nftables", 1_000, 1.51, "1.51 s"),
    ("nftables", 10_000, 164.0, "2 min 44 s"),
    ("iptables-legacy", 1_000, 0.4, "≈ 0.4 s"),
    ("iptables-legacy", 10_000, 9.94, "9.94 s"),
    ("iptables-nft", 1_000, 5.27, "5.27 s"),
    (
        "iptables-nft",
        10_000,
        1560.0,
        "> 26 min (iptables-restore aborted)",
    ),
];

/// Scrapes the proxy's /metrics inside the node namespace.
fn scrape_metrics(node: &ferry_testkit::Netns) -> Option<String> {
    node.run(|| {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect_timeout(
            &"127.0.0.1:10249".parse()?,
            Duration::from_millis(500),
        )?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })
    .ok()
}

/// Value of `name` (a sample line without labels) in Prometheus text.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?;
        let rest = rest.strip_prefix(' ')?;
        rest.trim().parse().ok()
    })
}

/// The first full sync's duration, once the proxy reports one: (sum / count) of the
/// full-sync histogram while count is 1 (falls back to the all-syncs histogram).
fn first_sync_seconds(text: &str) -> Option<f64> {
    for h in [
        "kubeproxy_sync_full_proxy_rules_duration_seconds",
        "kubeproxy_sync_proxy_rules_duration_seconds",
    ] {
        let count = metric_value(text, &format!("{h}_count")).unwrap_or(0.0);
        if count >= 1.0 {
            let sum = metric_value(text, &format!("{h}_sum"))?;
            return Some(sum / count);
        }
    }
    None
}

struct FullSync {
    wall_s: f64,
    metric_s: Option<f64>,
    rss: Option<(f64, f64)>,
}

pub async fn run(ctx: &Ctx) -> Result<Report> {
    let sizes: Vec<usize> = if ctx.quick {
        vec![100, 1_000]
    } else {
        vec![1_000, 10_000]
    };
    let runs = 3;
    let changes = if ctx.quick { 10 } else { 25 };
    let run_limit = Duration::from_secs(if ctx.quick { 60 } else { 120 });
    let big = *sizes.last().unwrap();
    let mut rep = Report::new(
        "programming",
        &format!(
            "Rule programming: {} services × 10 endpoints, nftables mode and iptables mode (legacy and nft)",
            sizes
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join(" and ")
        ),
    );

    let topo = Topology::control_and_node()?;
    progress(format!(
        "programming: control plane in {}, proxy in {}",
        topo.cp.name(),
        topo.node.name()
    ));
    let _probe_listener = topo
        .node
        .serve_tcp(&format!("0.0.0.0:{}", topology::PROBE_PORT), "probe")?;
    let cp = ControlPlane::start(&ctx.ferry, &topo.cp, topology::CP_IP)?;
    let rt = NsRuntime::new(topo.cp.name(), 2)?;
    let kc = cp.kubeconfig();
    let client = rt
        .run(async move { ControlPlane::client(kc).await })
        .await?;
    let c = client.clone();
    rt.run(async move {
        cluster::ensure_namespace(&c).await?;
        let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(c);
        let node = serde_json::from_value(json!({
            "metadata": {"name": topology::NODE_NAME},
            "status": {"addresses": [{"type": "InternalIP", "address": topology::NODE_CP_IP}]},
        }))?;
        nodes.create(&PostParams::default(), &node).await?;
        Ok(())
    })
    .await?;
    let logdir = tempfile::Builder::new()
        .prefix("ferry-bench-proxy-")
        .tempdir()?;

    let mut loaded = 0;
    let mut cluster_ips: Vec<(usize, String)> = Vec::new();
    for &size in &sizes {
        let c = client.clone();
        let from = loaded;
        progress(format!(
            "programming: loading services {from}..{size} (+ slices)"
        ));
        let (objs, secs, ips) = rt
            .run(async move { cluster::load_services(c, from..size, 10, 64, "programming").await })
            .await?;
        progress(format!("programming: loaded {objs} objects in {secs:.1} s"));
        cluster_ips.extend(ips);
        loaded = size;
        // The last service's endpoints are the probe listener on the node itself, so
        // a connection to its ClusterIP succeeds exactly when its rules are live.
        let c = client.clone();
        let last_i = size - 1;
        rt.run(async move { point_at_probe(c, last_i).await })
            .await?;
        let last = size - 1;
        let last_ip = cluster_ips[last].1.clone();
        for (round, mode) in MODES.into_iter().enumerate() {
            let mut results = Vec::new();
            let mut kept: Option<Proxy> = None;
            for run in 0..runs {
                cluster::proxy_cleanup(&ctx.ferry, &topo.node)?;
                anyhow::ensure!(
                    traffic_probe(&topo.node, &last_ip, Duration::from_millis(300))
                        .await?
                        .is_none(),
                    "service answers after cleanup"
                );
                let mut proxy = Proxy::start(
                    &ctx.ferry,
                    &topo.node,
                    mode,
                    &cp.kubeconfig(),
                    topology::NODE_NAME,
                    topology::CLUSTER_CIDR,
                    &logdir.path().join(format!("proxy-{mode}-{size}-{run}.log")),
                )?;
                let r = measure_full_sync(&mut proxy, &topo.node, &last_ip, run_limit).await;
                match r {
                    Ok(fs) => {
                        progress(format!(
                            "programming: {mode} {size} services run {}: the last service answers after {:.2} s; proxy metric {}; RSS {}",
                            run + 1,
                            fs.wall_s,
                            fs.metric_s.map_or("n/a".into(), |m| format!("{m:.3} s")),
                            fs.rss.map_or("n/a".into(), |r| format!("{:.0} MiB", r.0)),
                        ));
                        results.push(fs);
                    }
                    Err(e) => {
                        progress(format!(
                            "programming: {mode} {size} services run {}: {e:#}",
                            run + 1
                        ));
                        let rss = cluster::rss_mib(proxy.child.id()).map_or(String::new(), |r| {
                            format!(" (proxy RSS then {:.0} MiB)", r.0)
                        });
                        rep.note(format!(
                            "{mode} at {size} services, run {}: {e:#}{rss}; no figure recorded.",
                            run + 1
                        ));
                        break;
                    }
                }
                let slow = results.last().is_some_and(|r: &FullSync| r.wall_s > 20.0);
                if slow && run + 1 < runs {
                    progress(format!("programming: {mode} {size}: a run takes > 20 s; one run only, to stay within the time budget"));
                    rep.note(format!("{mode} at {size} services: one run only (a run takes > 20 s; `make bench` must finish in 10 minutes)."));
                }
                if (run + 1 == runs || slow) && size == big {
                    kept = Some(proxy);
                }
                if slow {
                    break;
                }
            }
            if results.is_empty() {
                continue;
            }
            let walls: Vec<f64> = results.iter().map(|r| r.wall_s).collect();
            let metr: Vec<f64> = results.iter().filter_map(|r| r.metric_s).collect();
            let rss: Vec<f64> = results.iter().filter_map(|r| r.rss.map(|x| x.0)).collect();
            rep.push(Record::new(
                "kernel",
                mode,
                &format!("full sync, {size} services (proxy metric)"),
                "s",
                Summary::of(&metr).unwrap_or(nan()),
                "kubeproxy_sync_proxy_rules_duration_seconds",
            ));
            rep.push(Record::new(
                "kernel",
                mode,
                &format!("proxy start → last service live, {size} services"),
                "s",
                Summary::of(&walls).unwrap(),
                "ferry-bench (traffic probe)",
            ));
            if let Some(s) = Summary::of(&rss) {
                rep.push(Record::new(
                    "process",
                    mode,
                    &format!("proxy RSS after first sync, {size} services"),
                    "MiB",
                    s,
                    "/proc/PID/status",
                ));
            }
            if let Some(&(_, _, kp, kp_text)) = KUBE_PROXY_SYNC
                .iter()
                .find(|(m, n, _, _)| *m == mode && *n == size)
            {
                if let Some(s) = Summary::of(&metr) {
                    rep.note(format!(
                        "{mode}, {size} services: ferry's first full sync {:.3} s vs kube-proxy v1.30.3 {kp_text} → {:.0}× faster (kube-proxy figure from shared/FACTS.md, not re-measured here)",
                        s.median,
                        kp / s.median
                    ));
                }
            }
            if let Some(mut proxy) = kept {
                let r = change_to_live(
                    &rt,
                    &client,
                    &topo,
                    &mut proxy,
                    big,
                    &cluster_ips,
                    changes,
                    round,
                )
                .await;
                match r {
                    Ok(lat) => {
                        let mut l = lat.clone();
                        let (p50, p99) = p50_p99(&mut l).context("no changes")?;
                        let s = Summary::of(&lat).unwrap();
                        progress(format!("programming: {mode} change-to-live at {big} services: p50 {p50:.1} ms, p99 {p99:.1} ms ({} changes)", lat.len()));
                        let tool = "ferry-bench (traffic probe)";
                        rep.push(Record::new("kernel", mode, &format!("EndpointSlice write → rule live, {big} services, p50 (min/max = fastest/slowest)"), "ms", Summary { median: p50, ..s }, tool));
                        rep.push(Record::new(
                            "kernel",
                            mode,
                            &format!("EndpointSlice write → rule live, {big} services, p99"),
                            "ms",
                            Summary { median: p99, ..s },
                            tool,
                        ));
                    }
                    Err(e) => {
                        progress(format!("programming: {mode} change-to-live failed: {e:#}"));
                        rep.note(format!("{mode} change-to-live: {e:#}"));
                    }
                }
                if let Some((rss, _)) = cluster::rss_mib(proxy.child.id()) {
                    rep.push(Record::new(
                        "process",
                        mode,
                        &format!("proxy RSS after {changes} changes, {big} services"),
                        "MiB",
                        Summary::of(&[rss]).unwrap(),
                        "/proc/PID/status",
                    ));
                }
                proxy.child.kill();
            }
            cluster::proxy_cleanup(&ctx.ferry, &topo.node)?;
        }
    }
    rep.note("Full sync: the proxy starts against a control plane already holding the services; `proxy metric` is the first full sync as ferry's kubeproxy_sync_full_proxy_rules_duration_seconds reports it (build + render + kernel transaction); `proxy start → last service live` is wall time from spawning `ferry proxy` until a connection from the node namespace to the last service's ClusterIP is answered (its 10 endpoints are a listener on the node's loopback; before its DNAT rule exists the SYN is routed away and dropped): the kernel proves the rule live by using it. It includes process start, the initial LIST of all objects and the sync. (Polling `nft get element`/`nft list` instead costs 0.2 s per probe at 1,000 services and over a minute at 10,000 while the proxy syncs, and slows the proxy it measures.) Rules are removed (`ferry proxy --cleanup`) before every run. Each run is bounded (120 s; 60 s with --quick); a configuration whose first run takes over 20 s is run once.");
    rep.note(format!("Change-to-live: up to {changes} EndpointSlice PATCHes at the API (at most 30 s of them), 100 ms apart, each to a different service, replacing its endpoints with the probe listener's addresses; the figure runs from sending the PATCH until a connection from the node namespace to that service's ClusterIP, tried every millisecond, is answered by the listener (before the rule is live the SYN goes to the service's old endpoints, which do not exist, and is dropped: each attempt gives up after 3 ms, which bounds the figure's resolution). The proxy runs with its default config (minSyncPeriod 10 ms)."));
    rep.note("kube-proxy RSS on this machine (FACTS.md): nftables 97 MB at 1k and ≈ 416 MB at 10k services; iptables-legacy 332 MB at 10k.");
    rep.note("Targets (issue 3): nftables full sync of 10,000 services ≤ 1 s, iptables ≤ 3 s; change-to-live p99 ≤ 50 ms.");
    drop(rt);
    drop(cp);
    drop(topo);
    Ok(rep)
}

fn nan() -> Summary {
    Summary {
        median: f64::NAN,
        min: f64::NAN,
        max: f64::NAN,
        runs: 0,
    }
}

async fn measure_full_sync(
    proxy: &mut Proxy,
    node: &ferry_testkit::Netns,
    cluster_ip: &str,
    limit: Duration,
) -> Result<FullSync> {
    let started = proxy.started;
    let live = traffic_probe(node, cluster_ip, limit.saturating_sub(started.elapsed())).await?;
    if let Some(e) = proxy.exited() {
        anyhow::bail!("{e}");
    }
    let when =
        live.with_context(|| format!("last service not live after {} s", limit.as_secs()))?;
    let wall_s = when.duration_since(started).as_secs_f64();
    // The proxy's own figure.
    let mut metric_s = None;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Some(v) = scrape_metrics(node).as_deref().and_then(first_sync_seconds) {
            metric_s = Some(v);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rss = cluster::rss_mib(proxy.child.id());
    Ok(FullSync {
        wall_s,
        metric_s,
        rss,
    })
}

/// Connects from the node namespace to `cluster_ip:80` every 5 ms until the probe
/// listener answers (the kernel DNATs the service to it) or `limit` passes.
async fn traffic_probe(
    node: &ferry_testkit::Netns,
    cluster_ip: &str,
    limit: Duration,
) -> Result<Option<Instant>> {
    traffic_probe_every(node, cluster_ip, limit, Duration::from_millis(5)).await
}

async fn traffic_probe_every(
    node: &ferry_testkit::Netns,
    cluster_ip: &str,
    limit: Duration,
    every: Duration,
) -> Result<Option<Instant>> {
    let addr: std::net::SocketAddr = format!("{cluster_ip}:80").parse()?;
    let h = node.spawn_thread(move || {
        let deadline = Instant::now() + limit;
        loop {
            if answered_by_probe(&addr) {
                return Ok(Some(Instant::now()));
            }
            if Instant::now() > deadline {
                return Ok(None);
            }
            std::thread::sleep(every);
        }
    });
    match tokio::task::spawn_blocking(move || h.join()).await? {
        Ok(r) => r,
        Err(_) => anyhow::bail!("probe thread panicked"),
    }
}

/// `changes` EndpointSlice writes, each to a different service: its endpoints are
/// replaced by the probe listener's addresses on the node. For each, ms from sending
/// the write until a connection from the node namespace to that service's ClusterIP
/// is answered by the probe listener (see [`answered_by_probe`]).
#[allow(clippy::too_many_arguments)]
async fn change_to_live(
    rt: &NsRuntime,
    client: &kube::Client,
    topo: &Topology,
    proxy: &mut Proxy,
    services: usize,
    cluster_ips: &[(usize, String)],
    changes: usize,
    round: usize,
) -> Result<Vec<f64>> {
    // Let the first sync's follow-ups settle.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut lat = Vec::new();
    let loop_start = Instant::now();
    for k in 0..changes {
        if k >= 5 && loop_start.elapsed() > Duration::from_secs(30) {
            progress(format!(
                "programming: change-to-live: stopping after {k} changes (30 s bound)"
            ));
            break;
        }
        // Distinct services per round, never the last one (already a probe target).
        let i = (round * 5003 + k * 7919 + 13) % (services - 1);
        let ip = &cluster_ips[i].1;
        anyhow::ensure!(
            quick_probe(&topo.node, ip).await?.is_none(),
            "svc-{i} answers before its change"
        );
        let c = client.clone();
        let t0 = Instant::now();
        rt.run(async move { point_at_probe(c, i).await }).await?;
        let live = traffic_probe_every(
            &topo.node,
            ip,
            Duration::from_secs(10),
            Duration::from_millis(1),
        )
        .await?;
        if let Some(e) = proxy.exited() {
            anyhow::bail!("{e}");
        }
        let when = live.context("change not live after 10 s")?;
        lat.push(when.duration_since(t0).as_secs_f64() * 1e3);
        // Space the changes so each is measured alone (not coalesced with the next).
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(lat)
}

/// Replaces the endpoints of service `svc-I` with the probe listener's addresses
/// on the node: a connection to its ClusterIP then succeeds exactly when the
/// change is live in the kernel.
async fn point_at_probe(client: kube::Client, i: usize) -> Result<()> {
    let api: Api<k8s_openapi::api::discovery::v1::EndpointSlice> =
        Api::namespaced(client, BENCH_NS);
    let ips: Vec<Ipv4Addr> = (1..=10)
        .map(|i| topology::probe_ip(i).parse().unwrap())
        .collect();
    api.patch(
        &format!("svc-{i}-abcde"),
        &PatchParams::default(),
        &Patch::Merge(json!({"endpoints": cluster::endpoints_json(&ips, "bench-node-b")})),
    )
    .await?;
    Ok(())
}

/// One connection attempt from the calling thread: true when the probe listener
/// answered. Before a change is live the SYN goes to the old endpoints and is
/// dropped, so the connect timeout is the probe's resolution: keep it short (the
/// listener is on the node itself and accepts in well under a millisecond).
fn answered_by_probe(addr: &std::net::SocketAddr) -> bool {
    use std::io::Read;
    let Ok(mut s) = std::net::TcpStream::connect_timeout(addr, Duration::from_millis(3)) else {
        return false;
    };
    let mut out = String::new();
    s.set_read_timeout(Some(Duration::from_millis(500))).is_ok()
        && s.read_to_string(&mut out).is_ok()
        && out.starts_with("probe")
}

/// One connection attempt: Some(now) when the probe listener answered.
async fn quick_probe(node: &ferry_testkit::Netns, cluster_ip: &str) -> Result<Option<Instant>> {
    traffic_probe_every(node, cluster_ip, Duration::ZERO, Duration::from_millis(1)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_first_sync_from_metrics() {
        let text = "# HELP x\nkubeproxy_sync_full_proxy_rules_duration_seconds_bucket{le=\"0.1\"} 1\nkubeproxy_sync_full_proxy_rules_duration_seconds_sum 0.25\nkubeproxy_sync_full_proxy_rules_duration_seconds_count 1\n";
        assert_eq!(first_sync_seconds(text), Some(0.25));
        assert_eq!(
            first_sync_seconds("kubeproxy_sync_full_proxy_rules_duration_seconds_count 0\n"),
            None
        );
        assert_eq!(metric_value("a_b 3\na 2\n", "a"), Some(2.0));
    }
}
