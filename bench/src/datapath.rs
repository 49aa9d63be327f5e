//! Suite `datapath`: client → server directly (the limit), through a ClusterIP and
//! through a NodePort, for each proxy mode: bulk TCP throughput (iperf3), TCP
//! request/response latency over a persistent connection, new connections per
//! second, and UDP request/response rate (ferry-bench's tokio load generator).

use std::net::{IpAddr, SocketAddr};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kube::api::{Api, PostParams};
use serde_json::json;

use crate::cluster::{self, progress, ControlPlane, NsRuntime, Proxy, BENCH_NS};
use crate::loadgen;
use crate::report::{Record, Report};
use crate::stats::{p50_p99, Summary};
use crate::topology::{self, Topology};
use crate::Ctx;
use ferry_testkit::{ChildGuard, Netns};

pub(crate) const IPERF_PORT: u16 = 5201;
pub(crate) const RR_PORT: u16 = 7000;
pub(crate) const UDP_PORT: u16 = 7001;
const OWN: &str = "ferry-bench (tokio load generator)";

/// Run counts and durations of one measurement pass.
pub(crate) struct Sizes {
    /// Runs of the latency, connection and UDP figures.
    pub runs: usize,
    /// Runs of the throughput figure.
    pub tput_runs: usize,
    pub tput_secs: u32,
    pub secs: f64,
    pub conc: usize,
}

/// The namespace a path's load generators run in: iperf3 -c through
/// `ip netns exec`, ferry-bench's tokio load generator on `rt`.
pub(crate) struct Client {
    pub ns: String,
    pub rt: NsRuntime,
}

impl Client {
    pub fn new(ns: &Netns) -> Result<Client> {
        Ok(Client {
            ns: ns.name().to_string(),
            rt: NsRuntime::new(ns.name(), 2)?,
        })
    }
}

/// Where a path sends each kind of traffic, and from which client.
pub(crate) struct Path<'a> {
    pub path: &'static str,
    pub mode: &'static str,
    pub client: &'a Client,
    pub iperf: SocketAddr,
    pub rr: SocketAddr,
    pub udp: SocketAddr,
}

impl<'a> Path<'a> {
    /// A path straight to the servers [`Servers::start`] runs on `ip`.
    pub fn to_servers(
        path: &'static str,
        mode: &'static str,
        client: &'a Client,
        ip: IpAddr,
    ) -> Path<'a> {
        Path {
            path,
            mode,
            client,
            iperf: SocketAddr::new(ip, IPERF_PORT),
            rr: SocketAddr::new(ip, RR_PORT),
            udp: SocketAddr::new(ip, UDP_PORT),
        }
    }
}

/// The servers every path ends at, in one namespace: `iperf3 -s` and the TCP and
/// UDP echo servers, bound to one address; stopped on drop.
pub(crate) struct Servers {
    _iperf: ChildGuard,
    _rt: NsRuntime,
}

impl Servers {
    pub fn start(ns: &Netns, ip: IpAddr) -> Result<Servers> {
        let iperf = ChildGuard::new(
            ns.command("iperf3")
                .args(["-s", "-p", &IPERF_PORT.to_string(), "-B", &ip.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
        );
        let rt = NsRuntime::new(ns.name(), 1)?;
        rt.spawn(loadgen::tcp_echo_server(SocketAddr::new(ip, RR_PORT)));
        rt.spawn(loadgen::udp_echo_server(SocketAddr::new(ip, UDP_PORT)));
        Ok(Servers {
            _iperf: iperf,
            _rt: rt,
        })
    }
}

/// Fails unless iperf3 can be run.
pub(crate) fn require_iperf3() -> Result<()> {
    if Command::new("iperf3")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_err()
    {
        bail!("iperf3 is not installed (`make deps` installs it)");
    }
    Ok(())
}

pub async fn run(ctx: &Ctx) -> Result<Report> {
    let z = if ctx.quick {
        Sizes {
            runs: 3,
            tput_runs: 3,
            tput_secs: 1,
            secs: 0.7,
            conc: 8,
        }
    } else {
        Sizes {
            runs: 3,
            tput_runs: 3,
            tput_secs: 2,
            secs: 1.5,
            conc: 8,
        }
    };
    require_iperf3()?;
    let mut rep = Report::new(
        "datapath",
        "Datapath: client → backend, direct vs through ferry proxy",
    );
    let topo = Topology::full()?;
    progress(format!(
        "datapath: client {}, node {}, backend {}, control plane {}",
        topo.client().name(),
        topo.node.name(),
        topo.backend().name(),
        topo.cp.name()
    ));
    let be: IpAddr = topology::BACKEND_IP.parse()?;
    let servers = Servers::start(topo.backend(), be)?;
    let client = Client::new(topo.client())?;

    // The service and its endpoint.
    let cp = ControlPlane::start(&ctx.ferry, &topo.cp, topology::CP_IP)?;
    let cp_rt = NsRuntime::new(topo.cp.name(), 1)?;
    let kc = cp.kubeconfig();
    let (cluster_ip, node_ports) = cp_rt.run(async move { create_objects(kc).await }).await?;
    progress(format!(
        "datapath: service dp has ClusterIP {cluster_ip}, node ports {node_ports:?}"
    ));

    let direct = Path::to_servers("direct", "-", &client, be);
    wait_path(&direct)
        .await
        .context("direct path does not work")?;
    let mut sm = Samples::default();
    let mut notes = Vec::new();

    let cip: IpAddr = cluster_ip.parse()?;
    let nip: IpAddr = topology::NODE_IP.parse()?;
    let logdir = tempfile::Builder::new()
        .prefix("ferry-bench-dp-")
        .tempdir()?;
    for mode in ["nftables", "iptables"] {
        cluster::proxy_cleanup(&ctx.ferry, &topo.node)?;
        let mut proxy = Proxy::start(
            &ctx.ferry,
            &topo.node,
            mode,
            &cp.kubeconfig(),
            topology::NODE_NAME,
            topology::CLUSTER_CIDR,
            &logdir.path().join(format!("proxy-{mode}.log")),
        )?;
        let paths = [
            Path::to_servers("clusterip", mode, &client, cip),
            Path {
                path: "nodeport",
                mode,
                client: &client,
                iperf: SocketAddr::new(nip, node_ports[0]),
                rr: SocketAddr::new(nip, node_ports[1]),
                udp: SocketAddr::new(nip, node_ports[2]),
            },
        ];
        let mut live = vec![&direct];
        for p in &paths {
            if let Err(e) = wait_path(p).await {
                if let Some(x) = proxy.exited() {
                    bail!("{x}");
                }
                progress(format!(
                    "datapath: {} ({mode}) does not work: {e:#}",
                    p.path
                ));
                rep.note(format!("{} ({mode}): path did not work: {e:#}", p.path));
                continue;
            }
            live.push(p);
        }
        measure(&mut sm, &mut notes, &live, &z, "datapath").await?;
        if let Some((rss, _)) = cluster::rss_mib(proxy.child.id()) {
            progress(format!("datapath: proxy ({mode}) RSS {rss:.0} MiB"));
        }
        proxy.child.kill();
    }
    cluster::proxy_cleanup(&ctx.ferry, &topo.node)?;
    rep.records = sm.records("direct");
    for n in notes {
        rep.note(n);
    }
    rep.fill_ratios();
    for mode in ["nftables", "iptables"] {
        let ratio = rep
            .find("clusterip", mode, "TCP throughput")
            .and_then(|r| r.ratio_to_direct);
        if let Some(r) = ratio {
            rep.note(format!(
                "Target ClusterIP throughput ≥ 0.97 × direct ({mode}): {r:.3} — {}",
                if r >= 0.97 { "met" } else { "NOT met" }
            ));
        }
    }
    rep.note(format!(
        "Topology: client ns → node ns (ferry proxy, forwarding) → backend ns over veths; `direct` is the client talking to the backend's IP through the same node (routed, no NAT), measured while each proxy mode is loaded, as pod-to-pod traffic is in a cluster (so it has 2 × runs samples); it is the limit for the other paths. Runs alternate direct / ClusterIP / NodePort so the machine's noise hits all paths alike. The client is inside the cluster CIDR, so ClusterIP traffic is DNATed only; NodePort traffic (to the node's IP) is DNATed and masqueraded, as kube-proxy does for externalTrafficPolicy Cluster. Throughput: iperf3 -J, one TCP stream, {} s per run. Latency: {MSG}-byte request/response on one persistent TCP connection, {:.1} s per run. Connections: {} concurrent clients, each connection carries one {MSG}-byte request and its response, {:.1} s per run. UDP: {} sockets, one {MSG}-byte datagram in flight each, {:.1} s per run. Everything shares 2 cores, so these are ratios more than absolutes.",
        z.tput_secs, z.secs, z.conc, z.secs, z.conc, z.secs, MSG = loadgen::MSG
    ));
    drop(client);
    drop(servers);
    drop(cp_rt);
    drop(cp);
    drop(topo);
    Ok(rep)
}

async fn create_objects(kubeconfig: std::path::PathBuf) -> Result<(String, Vec<u16>)> {
    let c = ControlPlane::client(kubeconfig).await?;
    cluster::ensure_namespace(&c).await?;
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(c.clone());
    let node = serde_json::from_value(json!({
        "metadata": {"name": topology::NODE_NAME},
        "status": {"addresses": [{"type": "InternalIP", "address": topology::NODE_IP}]},
    }))?;
    nodes.create(&PostParams::default(), &node).await?;
    let svcs: Api<k8s_openapi::api::core::v1::Service> = Api::namespaced(c.clone(), BENCH_NS);
    let svc = serde_json::from_value(json!({
        "metadata": {"name": "dp", "namespace": BENCH_NS},
        "spec": {"type": "NodePort", "ports": [
            {"name": "iperf", "port": IPERF_PORT, "targetPort": IPERF_PORT, "protocol": "TCP"},
            {"name": "rr", "port": RR_PORT, "targetPort": RR_PORT, "protocol": "TCP"},
            {"name": "udp", "port": UDP_PORT, "targetPort": UDP_PORT, "protocol": "UDP"}]},
    }))?;
    let created = svcs.create(&PostParams::default(), &svc).await?;
    let spec = created.spec.context("service without spec")?;
    let ip = spec.cluster_ip.context("no clusterIP")?;
    let ports = spec.ports.unwrap_or_default();
    let np: Vec<u16> = ["iperf", "rr", "udp"]
        .iter()
        .map(|n| {
            ports
                .iter()
                .find(|p| p.name.as_deref() == Some(n))
                .and_then(|p| p.node_port)
                .map(|p| p as u16)
                .context("no nodePort")
        })
        .collect::<Result<_>>()?;
    let slices: Api<k8s_openapi::api::discovery::v1::EndpointSlice> = Api::namespaced(c, BENCH_NS);
    let slice = serde_json::from_value(json!({
        "metadata": {"name": "dp-abcde", "namespace": BENCH_NS, "labels": {"kubernetes.io/service-name": "dp"}},
        "addressType": "IPv4",
        "ports": [
            {"name": "iperf", "port": IPERF_PORT, "protocol": "TCP"},
            {"name": "rr", "port": RR_PORT, "protocol": "TCP"},
            {"name": "udp", "port": UDP_PORT, "protocol": "UDP"}],
        "endpoints": [{"addresses": [topology::BACKEND_IP], "conditions": {"ready": true, "serving": true, "terminating": false}, "nodeName": "bench-node-b"}],
    }))?;
    slices.create(&PostParams::default(), &slice).await?;
    Ok((ip, np))
}

/// Waits (≤ 30 s) until one request/response through the path works.
pub(crate) async fn wait_path(p: &Path<'_>) -> Result<()> {
    let target = p.rr;
    p.client
        .rt
        .run(async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                match loadgen::tcp_ping(target).await {
                    Ok(()) => return Ok(()),
                    Err(e) if Instant::now() > deadline => return Err(e),
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        })
        .await
}

/// iperf3 in the client namespace; Gbit/s received.
fn iperf3(client_ns: &str, target: SocketAddr, secs: u32) -> Result<f64> {
    let mut child = Command::new("ip")
        .args([
            "netns",
            "exec",
            client_ns,
            "iperf3",
            "-J",
            "--connect-timeout",
            "3000",
            "-c",
        ])
        .arg(target.ip().to_string())
        .args(["-p", &target.port().to_string(), "-t", &secs.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(secs as u64 + 15);
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("iperf3 did not finish in time");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 -J output")?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        bail!("iperf3: {e}");
    }
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3: no end.sum_received.bits_per_second")?;
    Ok(bps / 1e9)
}

/// Samples per (path, mode, metric), in first-seen order.
#[derive(Default)]
pub(crate) struct Samples {
    order: Vec<(String, String, &'static str, &'static str, &'static str)>,
    values: Vec<Vec<f64>>,
}

impl Samples {
    fn add(
        &mut self,
        p: &Path<'_>,
        metric: &'static str,
        unit: &'static str,
        tool: &'static str,
        v: f64,
    ) {
        let key = (p.path.to_string(), p.mode.to_string(), metric, unit, tool);
        match self.order.iter().position(|k| *k == key) {
            Some(i) => self.values[i].push(v),
            None => {
                self.order.push(key);
                self.values.push(vec![v]);
            }
        }
    }

    /// One record per (path, mode, metric): mode by mode in the order first
    /// measured, within a mode the `reference` path first, then paths by name.
    pub fn records(&self, reference: &str) -> Vec<Record> {
        let mut out: Vec<Record> = Vec::new();
        for (k, v) in self.order.iter().zip(&self.values) {
            if let Some(s) = Summary::of(v) {
                out.push(Record::new(&k.0, &k.1, k.2, k.3, s, k.4));
            }
        }
        let mut modes: Vec<String> = Vec::new();
        for (_, mode, ..) in &self.order {
            if !modes.contains(mode) {
                modes.push(mode.clone());
            }
        }
        let mode_rank = |m: &str| modes.iter().position(|x| x == m);
        out.sort_by_key(|r| (mode_rank(&r.mode), r.path != reference, r.path.clone()));
        out
    }
}

fn label(p: &Path<'_>) -> String {
    if p.mode == "-" {
        p.path.to_string()
    } else {
        format!("{} ({})", p.path, p.mode)
    }
}

pub(crate) const TPUT: &str = "TCP throughput";
const P50: &str = "TCP request/response latency p50";
const P99: &str = "TCP request/response latency p99";
const CRR: &str = "new TCP connections (1 request each)";
const UDP: &str = "UDP request/response rate";

/// Measures `paths` metric by metric, interleaving the paths run by run so that
/// machine noise hits them alike. Progress lines start with `suite`.
pub(crate) async fn measure(
    sm: &mut Samples,
    notes: &mut Vec<String>,
    paths: &[&Path<'_>],
    z: &Sizes,
    suite: &str,
) -> Result<()> {
    let dur = Duration::from_secs_f64(z.secs);
    for run in 0..z.tput_runs {
        for p in paths {
            let (ns, t, secs) = (p.client.ns.clone(), p.iperf, z.tput_secs);
            match tokio::task::spawn_blocking(move || iperf3(&ns, t, secs)).await? {
                Ok(g) => {
                    progress(format!(
                        "{suite}: {}: TCP throughput run {}: {g:.2} Gbit/s",
                        label(p),
                        run + 1
                    ));
                    sm.add(p, TPUT, "Gbit/s", "iperf3", g)
                }
                Err(e) => progress(format!("{suite}: {}: iperf3 run failed: {e:#}", label(p))),
            }
        }
    }
    for run in 0..z.runs {
        for p in paths {
            let t = p.rr;
            let mut lat = p
                .client
                .rt
                .run(async move { loadgen::tcp_rr(t, dur, 200_000).await })
                .await?;
            let n = lat.len();
            if let Some((a, b)) = p50_p99(&mut lat) {
                progress(format!("{suite}: {}: request/response run {}: p50 {a:.1} µs, p99 {b:.1} µs ({n} requests)", label(p), run + 1));
                sm.add(p, P50, "µs", OWN, a);
                sm.add(p, P99, "µs", OWN, b);
            }
        }
    }
    for run in 0..z.runs {
        for p in paths {
            let (t, conc) = (p.rr, z.conc);
            let (n, e, secs) = p
                .client
                .rt
                .run(async move { loadgen::tcp_crr(t, conc, dur, 500_000).await })
                .await?;
            progress(format!(
                "{suite}: {}: connections run {}: {:.0}/s ({e} failed)",
                label(p),
                run + 1,
                n as f64 / secs
            ));
            sm.add(p, CRR, "conn/s", OWN, n as f64 / secs);
            if e > 0 {
                notes.push(format!(
                    "{}: {e} connections failed or timed out (1 s) in connection-rate run {}",
                    label(p),
                    run + 1
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    for run in 0..z.runs {
        for p in paths {
            let (t, conc) = (p.udp, z.conc);
            let (n, l, secs) = p
                .client
                .rt
                .run(async move { loadgen::udp_rr(t, conc, dur, 2_000_000).await })
                .await?;
            progress(format!(
                "{suite}: {}: UDP run {}: {:.0} req/s ({l} lost)",
                label(p),
                run + 1,
                n as f64 / secs
            ));
            sm.add(p, UDP, "req/s", OWN, n as f64 / secs);
            if l > 0 {
                notes.push(format!(
                    "{}: {l} UDP requests got no reply within 100 ms in run {}",
                    label(p),
                    run + 1
                ));
            }
        }
    }
    Ok(())
}
