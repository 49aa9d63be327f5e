//! `ferry proxy` live against `ferry controlplane`, end to end, in both
//! netfilter modes (needs root: network namespaces, netfilter).
//!
//! Topology, all in namespaces this test makes (removed on drop, even on panic):
//!
//! ```text
//!   client (198.18.0.2) ── cli0 198.18.0.1 ┐
//!   api    (198.18.1.2) ── api0 198.18.1.1 ┤ node: `ferry proxy`  ├─ be0 198.18.128.2  (nodeName node-a)
//!     `ferry controlplane`                 │  (node-a)            ├─ be1 198.18.129.2  (nodeName node-a)
//!   uplink (198.18.2.2) ── up0  198.18.2.1 ┤                      ├─ be2 198.18.130.2  (nodeName node-b)
//!                                          ┘                      └─ be3 198.18.131.2  (nodeName node-b)
//! ```
//!
//! The backends are pods (cluster CIDR 198.18.128.0/17) answering `NAME PEER_IP`
//! on TCP 8080 and UDP 8053; the client is outside the cluster. Services,
//! EndpointSlices and the Node are written through the API with kubectl (run in
//! the api namespace); the EndpointSlice controller does not exist yet, so the
//! test writes the slices itself. The node's default route leads to an "uplink"
//! namespace, a router that knows only 198.18.0.0/16: traffic to an address no
//! rule serves (say, the ClusterIP of a deleted Service) is forwarded there and
//! answered at once with ICMP network unreachable; nothing leaves the test's
//! namespaces.

mod support;

use std::collections::BTreeSet;
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_testkit::{
    http_get, tcp_request, udp_request, veth, wait_for, ChildGuard, Netns, Server,
};
use serde_json::{json, Value};
use support::{ferry_bin, ControlPlane};

const NODE: &str = "node-a";
const NODE_IP: &str = "198.18.0.1";
const CLIENT_IP: &str = "198.18.0.2";
const API_GW: &str = "198.18.1.1";
const API_IP: &str = "198.18.1.2";
const UPLINK_GW: &str = "198.18.2.1";
const UPLINK_IP: &str = "198.18.2.2";
const CLUSTER_CIDR: &str = "198.18.128.0/17";
const SERVICE_CIDR: &str = "198.19.0.0/16";
const EXTERNAL_IP: &str = "198.18.50.10";
const LB_IP: &str = "198.18.60.10";
const BACKENDS: usize = 4;
/// Upper bound for a change to show up where the issue sets no bound (not a
/// latency assertion: it only keeps loops finite).
const SETTLE: Duration = Duration::from_secs(20);
/// Per-request timeout of the client.
const REQ: Duration = Duration::from_secs(2);

fn backend_ip(i: usize) -> String {
    format!("198.18.{}.2", 128 + i)
}

/// be0 and be1 run on this node, be2 and be3 on another.
fn backend_node(i: usize) -> &'static str {
    if i < 2 {
        NODE
    } else {
        "node-b"
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Nftables,
    Iptables,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Nftables => "nftables",
            Mode::Iptables => "iptables",
        }
    }
}

// ---- API objects ----

#[derive(Clone, Copy)]
struct Port {
    name: &'static str,
    port: u16,
    target: u16,
    protocol: &'static str,
    node_port: Option<u16>,
}

const HTTP: Port = Port {
    name: "http",
    port: 80,
    target: 8080,
    protocol: "TCP",
    node_port: None,
};
const DNS: Port = Port {
    name: "dns",
    port: 53,
    target: 8053,
    protocol: "UDP",
    node_port: None,
};
/// TCP 7 → the echo servers some cases start on 9090.
const ECHO: Port = Port {
    name: "echo",
    port: 7,
    target: 9090,
    protocol: "TCP",
    node_port: None,
};

impl Port {
    fn node_port(self, p: u16) -> Port {
        Port {
            node_port: Some(p),
            ..self
        }
    }
}

/// A Service in `default` with `ports`; `spec` is merged into its spec.
fn service(name: &str, ports: &[Port], spec: Value) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|p| {
            let mut v = json!({"name": p.name, "port": p.port, "targetPort": p.target,
                               "protocol": p.protocol});
            if let Some(np) = p.node_port {
                v["nodePort"] = json!(np);
            }
            v
        })
        .collect();
    let mut s = json!({"ports": ports});
    for (k, v) in spec.as_object().cloned().unwrap_or_default() {
        s[k] = v;
    }
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": "default"}, "spec": s})
}

/// An endpoint: a backend and its conditions.
#[derive(Clone, Copy)]
struct Ep {
    backend: usize,
    ready: bool,
    serving: bool,
    terminating: bool,
}

fn ready(backend: usize) -> Ep {
    Ep {
        backend,
        ready: true,
        serving: true,
        terminating: false,
    }
}

fn not_ready(backend: usize) -> Ep {
    Ep {
        ready: false,
        serving: false,
        ..ready(backend)
    }
}

/// Being deleted but still serving (ready=false, serving=true, terminating=true).
fn terminating(backend: usize) -> Ep {
    Ep {
        ready: false,
        serving: true,
        terminating: true,
        backend,
    }
}

/// The EndpointSlice `SVC-1` of service `svc` (label `kubernetes.io/service-name`).
fn slice(svc: &str, ports: &[Port], eps: &[Ep]) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|p| json!({"name": p.name, "port": p.target, "protocol": p.protocol}))
        .collect();
    let eps: Vec<Value> = eps
        .iter()
        .map(|e| {
            json!({"addresses": [backend_ip(e.backend)], "nodeName": backend_node(e.backend),
                   "conditions": {"ready": e.ready, "serving": e.serving,
                                  "terminating": e.terminating}})
        })
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": format!("{svc}-1"), "namespace": "default",
                        "labels": {"kubernetes.io/service-name": svc}},
           "addressType": "IPv4", "ports": ports, "endpoints": eps})
}

// ---- the proxy process ----

/// `ferry proxy` running in the node namespace; SIGKILLed on drop.
struct Proxy {
    netns: String,
    mode: Mode,
    kubeconfig: PathBuf,
    log: PathBuf,
    child: Option<ChildGuard>,
}

impl Proxy {
    fn start(&mut self) {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.netns, ferry_bin(), "proxy"])
            .args(["--mode", self.mode.as_str(), "--node-name", NODE])
            .args(["--cluster-cidr", CLUSTER_CIDR, "--kubeconfig"])
            .arg(&self.kubeconfig)
            .env("RUST_LOG", "info,ferry_proxy=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn ferry proxy");
        self.child = Some(ChildGuard::new(child));
    }

    /// kill -9: rules stay in the kernel.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

// ---- the cluster ----

struct Cluster {
    mode: Mode,
    // Processes first: they stop before their namespaces go.
    proxy: Proxy,
    cp: ControlPlane,
    _servers: Vec<Server>,
    backends: Vec<Netns>,
    client: Netns,
    node: Netns,
    _api: Netns,
    _uplink: Netns,
}

impl Cluster {
    /// The topology, a control plane in the api namespace, this Node in the API,
    /// and `ferry proxy` in the node namespace, synced once.
    fn new(mode: Mode) -> Cluster {
        let api = Netns::new("api").unwrap();
        let node = Netns::new("node").unwrap();
        let client = Netns::new("cli").unwrap();
        veth(
            &node,
            "api0",
            &format!("{API_GW}/24"),
            &api,
            "eth0",
            &format!("{API_IP}/24"),
        )
        .unwrap();
        api.add_route("default", API_GW).unwrap();
        veth(
            &client,
            "eth0",
            &format!("{CLIENT_IP}/24"),
            &node,
            "cli0",
            &format!("{NODE_IP}/24"),
        )
        .unwrap();
        client.add_route("default", NODE_IP).unwrap();
        node.sysctl("net.ipv4.ip_forward", "1").unwrap();
        let uplink = Netns::new("up").unwrap();
        veth(
            &node,
            "up0",
            &format!("{UPLINK_GW}/24"),
            &uplink,
            "eth0",
            &format!("{UPLINK_IP}/24"),
        )
        .unwrap();
        node.add_route("default", UPLINK_IP).unwrap();
        uplink.add_route("198.18.0.0/16", UPLINK_GW).unwrap();
        uplink.sysctl("net.ipv4.ip_forward", "1").unwrap();
        let mut backends = Vec::new();
        let mut servers = Vec::new();
        for i in 0..BACKENDS {
            let b = Netns::new(&format!("be{i}")).unwrap();
            let gw = format!("198.18.{}.1", 128 + i);
            veth(
                &node,
                &format!("be{i}"),
                &format!("{gw}/24"),
                &b,
                "eth0",
                &format!("{}/24", backend_ip(i)),
            )
            .unwrap();
            b.add_route("default", &gw).unwrap();
            servers.push(b.serve_tcp("0.0.0.0:8080", &format!("be{i}")).unwrap());
            servers.push(b.serve_udp("0.0.0.0:8053", &format!("be{i}")).unwrap());
            backends.push(b);
        }
        let cp =
            ControlPlane::start_in_netns(api.name(), API_IP, &["--service-cidr", SERVICE_CIDR]);
        let proxy = Proxy {
            netns: node.name().to_string(),
            mode,
            kubeconfig: cp.kubeconfig(),
            log: cp.dir.path().join("proxy.log"),
            child: None,
        };
        let mut c = Cluster {
            mode,
            proxy,
            cp,
            _servers: servers,
            backends,
            client,
            node,
            _api: api,
            _uplink: uplink,
        };
        c.apply(&[json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}})]);
        c.kubectl(&[
            "patch",
            "node",
            NODE,
            "--subresource=status",
            "--type=merge",
            "-p",
            &json!({"status": {"addresses": [{"type": "InternalIP", "address": NODE_IP}]}})
                .to_string(),
        ]);
        c.start_proxy();
        c
    }

    /// Starts `ferry proxy` and waits for its first sync (/healthz 200).
    fn start_proxy(&mut self) {
        self.proxy.start();
        let ok = wait_for(SETTLE, || {
            (self.node_http("127.0.0.1:10256", "/healthz").0 == 200).then_some(())
        });
        assert!(ok.is_some(), "proxy never became healthy");
    }

    fn kubectl(&self, args: &[&str]) -> String {
        self.cp.kubectl_ok(args)
    }

    /// `kubectl apply` of these objects (a stream of JSON documents: a
    /// `kind: List` makes kubectl validate against /openapi/v2, which ferry's
    /// control plane does not serve).
    fn apply(&self, objs: &[Value]) {
        let list = objs
            .iter()
            .map(|o| o.to_string())
            .collect::<Vec<_>>()
            .join("\n");
        let out = self.cp.kubectl_stdin(&["apply", "-f", "-"], Some(&list));
        assert!(
            out.status.success(),
            "kubectl apply failed: {}{}\n{list}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `kubectl get svc NAME -o jsonpath=PATH`.
    fn svc_field(&self, name: &str, path: &str) -> String {
        self.kubectl(&["get", "svc", name, "-o", &format!("jsonpath={{{path}}}")])
    }

    fn cluster_ip(&self, name: &str) -> String {
        let ip = self.svc_field(name, ".spec.clusterIP");
        assert!(ip.starts_with("198.19."), "clusterIP {ip:?}");
        ip
    }

    /// HTTP GET from the node namespace.
    fn node_http(&self, addr: &str, path: &str) -> (u16, String) {
        let (addr, path) = (addr.to_string(), path.to_string());
        self.node
            .run(move || Ok(http_get(&addr, &path, REQ).unwrap_or((0, String::new()))))
            .unwrap()
    }

    /// HTTP GET from the client namespace.
    fn client_http(&self, addr: &str, path: &str) -> (u16, String) {
        let (addr, path) = (addr.to_string(), path.to_string());
        self.client
            .run(move || Ok(http_get(&addr, &path, REQ).unwrap_or((0, String::new()))))
            .unwrap()
    }

    /// Up to `n` requests from the client, each answered with "NAME PEER_IP" or
    /// recorded as "error: KIND"; stops early once `enough` holds.
    fn ask_until(
        &self,
        proto: &str,
        addr: &str,
        n: usize,
        enough: impl Fn(&[String]) -> bool + Send + 'static,
    ) -> Vec<String> {
        let (proto, addr) = (proto.to_string(), addr.to_string());
        self.client
            .run(move || {
                let mut out = Vec::new();
                for _ in 0..n {
                    out.push(request(&proto, &addr));
                    if enough(&out) {
                        break;
                    }
                }
                Ok(out)
            })
            .unwrap()
    }

    fn ask(&self, proto: &str, addr: &str, n: usize) -> Vec<String> {
        self.ask_until(proto, addr, n, |_| false)
    }

    /// Requests until every backend in `want` answered (at most 200); returns all replies.
    fn reach_all(&self, proto: &str, addr: &str, want: &[&str]) -> Vec<String> {
        let want_set: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
        let w = want_set.clone();
        let replies = self.ask_until(proto, addr, 200, move |r| names(r).is_superset(&w));
        assert!(
            names(&replies).is_superset(&want_set),
            "{proto} {addr}: wanted {want:?} within 200 requests; got {:?}",
            summary(&replies)
        );
        replies
    }

    /// Waits until a request to `addr` is answered by a backend.
    fn wait_served(&self, proto: &str, addr: &str) {
        let ok = wait_for(SETTLE, || {
            is_reply(&self.ask(proto, addr, 1)[0]).then_some(())
        });
        assert!(ok.is_some(), "{proto} {addr} never served");
    }

    /// Waits until `n` requests in a row are answered only by backends in `want`.
    fn wait_only(&self, proto: &str, addr: &str, want: &[&str]) -> Duration {
        let start = Instant::now();
        let ok = wait_for(SETTLE, || {
            let r = self.ask(proto, addr, 20);
            let all_in = r
                .iter()
                .all(|x| is_reply(x) && want.contains(&backend_of(x)));
            all_in.then_some(())
        });
        assert!(
            ok.is_some(),
            "{proto} {addr}: never only {want:?}: {:?}",
            summary(&self.ask(proto, addr, 20))
        );
        start.elapsed()
    }

    /// Requests to `addr` for `len` after `t0`, each with the time it was answered.
    fn sample_since(
        &self,
        proto: &str,
        addr: &str,
        t0: Instant,
        len: Duration,
    ) -> Vec<(Duration, String)> {
        let (proto, addr) = (proto.to_string(), addr.to_string());
        self.client
            .run(move || {
                let mut out = Vec::new();
                while t0.elapsed() < len {
                    let r = request(&proto, &addr);
                    out.push((t0.elapsed(), r));
                }
                Ok(out)
            })
            .unwrap()
    }

    /// The node's ruleset as this mode's tool prints it.
    fn ruleset(&self) -> String {
        let nft = self.node.exec(&["nft", "list", "ruleset"]).unwrap();
        let ipt = self.node.exec(&["iptables-save"]).unwrap_or_default();
        let legacy = self
            .node
            .exec(&["iptables-legacy-save"])
            .unwrap_or_default();
        format!("{nft}\n{ipt}\n{legacy}")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // FERRY_E2E_LOGS=1 prints the logs of passing cases too.
        if std::thread::panicking() || std::env::var_os("FERRY_E2E_LOGS").is_some() {
            eprintln!(
                "---- ferry proxy ({:?}) log ----\n{}",
                self.mode,
                self.proxy.log()
            );
            let cp = self.cp.log();
            let tail: Vec<&str> = cp.lines().rev().take(40).collect();
            eprintln!(
                "---- controlplane log (last 40 lines) ----\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
            if let Ok(r) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.ruleset()))
            {
                eprintln!("---- node ruleset ----\n{r}");
            }
        }
    }
}

/// One request from the calling thread: "NAME PEER_IP", or "error: KIND".
fn request(proto: &str, addr: &str) -> String {
    let r = match proto {
        "tcp" => tcp_request(addr, REQ),
        "udp" => udp_request(addr, REQ),
        _ => unreachable!("protocol {proto}"),
    };
    r.unwrap_or_else(|e| format!("error: {:?}", e.kind()))
}

fn is_reply(r: &str) -> bool {
    r.starts_with("be")
}

fn backend_of(r: &str) -> &str {
    r.split(' ').next().unwrap_or("")
}

fn peer_of(r: &str) -> &str {
    r.split(' ').nth(1).unwrap_or("")
}

/// Backends that answered.
fn names(replies: &[String]) -> BTreeSet<String> {
    replies
        .iter()
        .filter(|r| is_reply(r))
        .map(|r| backend_of(r).to_string())
        .collect()
}

/// Distinct replies with counts, for failure messages.
fn summary(replies: &[String]) -> Vec<(String, usize)> {
    let mut m = std::collections::BTreeMap::new();
    for r in replies {
        *m.entry(r.clone()).or_insert(0) += 1;
    }
    m.into_iter().collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// A UDP client sending from one socket (one conntrack flow) every 20 ms and
/// recording each reply with the time it came; stops on drop.
struct UdpStream {
    seen: Arc<Mutex<Vec<(Instant, String)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl UdpStream {
    fn start(ns: &Netns, addr: &str) -> UdpStream {
        let seen: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (seen2, stop2, addr) = (seen.clone(), stop.clone(), addr.to_string());
        let thread = ns.spawn_thread(move || {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.connect(&addr)?;
            s.set_read_timeout(Some(Duration::from_millis(50)))?;
            let mut buf = [0u8; 1500];
            while !stop2.load(Ordering::Relaxed) {
                // Errors (an ICMP error while nothing serves) do not end the stream.
                let _ = s.send(b"tick");
                if let Ok(n) = s.recv(&mut buf) {
                    let r = String::from_utf8_lossy(&buf[..n]).trim().to_string();
                    seen2.lock().unwrap().push((Instant::now(), r));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(())
        });
        UdpStream {
            seen,
            stop,
            thread: Some(thread),
        }
    }

    /// Waits (bounded) for the first reply from `backend` at or after `since`.
    fn first_from(&self, backend: &str, since: Instant) -> Option<Instant> {
        wait_for(Duration::from_secs(5), || {
            self.seen
                .lock()
                .unwrap()
                .iter()
                .find(|(t, r)| *t >= since && backend_of(r) == backend)
                .map(|(t, _)| *t)
        })
    }

    /// Backends that answered at or after `since`.
    fn backends_since(&self, since: Instant) -> BTreeSet<String> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, _)| *t >= since)
            .map(|(_, r)| backend_of(r).to_string())
            .collect()
    }

    fn replies(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

impl Drop for UdpStream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---- the cases ----

/// ClusterIP over TCP and UDP reaches every ready endpoint and never a
/// non-ready one; a removed endpoint gets no new traffic within 1 s; a deleted
/// Service refuses new connections at once.
fn clusterip(mode: Mode) {
    let c = Cluster::new(mode);
    c.apply(&[
        service("web", &[HTTP, DNS], json!({})),
        slice(
            "web",
            &[HTTP, DNS],
            &[ready(0), ready(1), ready(2), not_ready(3)],
        ),
    ]);
    let cip = c.cluster_ip("web");
    let (tcp, udp) = (format!("{cip}:80"), format!("{cip}:53"));
    c.wait_served("tcp", &tcp);
    c.wait_served("udp", &udp);
    for (proto, addr) in [("tcp", &tcp), ("udp", &udp)] {
        let r = c.reach_all(proto, addr, &["be0", "be1", "be2"]);
        let more = c.ask(proto, addr, 60);
        let all: Vec<String> = r.into_iter().chain(more).collect();
        assert!(
            all.iter().all(|r| is_reply(r) && backend_of(r) != "be3"),
            "{proto}: {:?}",
            summary(&all)
        );
        // The client is outside the cluster: masqueraded to the node's address.
        assert!(all.iter().all(|r| peer_of(r) != CLIENT_IP), "{all:?}");
    }

    // be2 leaves the slice: no new connection reaches it 1 s after the write.
    c.apply(&[slice(
        "web",
        &[HTTP, DNS],
        &[ready(0), ready(1), not_ready(3)],
    )]);
    let t0 = Instant::now();
    let samples = c.sample_since("tcp", &tcp, t0, Duration::from_millis(1600));
    let late: Vec<_> = samples
        .iter()
        .filter(|(t, r)| *t >= Duration::from_secs(1) && (!is_reply(r) || backend_of(r) == "be2"))
        .collect();
    let after = samples
        .iter()
        .filter(|(t, _)| *t >= Duration::from_secs(1))
        .count();
    assert!(after >= 10, "too few samples after 1 s: {after}");
    assert!(late.is_empty(), "after 1 s: {late:?}");
    let last_be2 = samples
        .iter()
        .filter(|(_, r)| backend_of(r) == "be2")
        .map(|(t, _)| *t)
        .max();
    eprintln!("[{mode:?}] removed endpoint: last hit {last_be2:?} after the write returned");

    // No usable endpoint left: TCP and UDP are refused at once.
    c.apply(&[slice("web", &[HTTP, DNS], &[not_ready(3)])]);
    for (proto, addr) in [("tcp", &tcp), ("udp", &udp)] {
        let start = Instant::now();
        let refused = wait_for(Duration::from_secs(1), || {
            let r = c.ask(proto, addr, 1).remove(0);
            (r == "error: ConnectionRefused").then_some(())
        });
        assert!(
            refused.is_some(),
            "{proto}: not refused within 1 s: {:?}",
            c.ask(proto, addr, 1)
        );
        eprintln!(
            "[{mode:?}] {proto} refused {:?} after the write",
            start.elapsed()
        );
    }

    // Endpoints again, then the Service is deleted: new connections fail at
    // once (ICMP unreachable from the uplink), answered by no backend.
    c.apply(&[slice("web", &[HTTP, DNS], &[ready(0)])]);
    c.wait_served("tcp", &tcp);
    c.kubectl(&["delete", "svc", "web"]);
    let t0 = Instant::now();
    let last = wait_for(Duration::from_secs(1), || {
        let start = Instant::now();
        let r = c.ask("tcp", &tcp, 1).remove(0);
        (!is_reply(&r)).then(|| (r, start.elapsed()))
    });
    let (err, took) = last.unwrap_or_else(|| panic!("deleted service still served 1 s later"));
    assert!(
        t0.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t0.elapsed()
    );
    assert!(
        took < Duration::from_millis(500) && err != "error: TimedOut",
        "a new connection to a deleted service must fail at once: {err} after {took:?}"
    );
    eprintln!("[{mode:?}] deleted service: {err} after {took:?}");
}

/// NodePort through the node's address from outside the cluster, externalIPs
/// and LoadBalancer ingress IPs (set through the status subresource).
fn nodeport_external_and_lb_ips(mode: Mode) {
    let c = Cluster::new(mode);
    let ports = [HTTP.node_port(30080), DNS.node_port(30053)];
    c.apply(&[
        service(
            "lb",
            &ports,
            json!({"type": "LoadBalancer", "externalIPs": [EXTERNAL_IP]}),
        ),
        slice("lb", &ports, &[ready(0), ready(2)]),
    ]);
    c.kubectl(&[
        "patch",
        "svc",
        "lb",
        "--subresource=status",
        "--type=merge",
        "-p",
        &json!({"status": {"loadBalancer": {"ingress": [{"ip": LB_IP}]}}}).to_string(),
    ]);
    assert_eq!(
        c.svc_field("lb", ".status.loadBalancer.ingress[0].ip"),
        LB_IP
    );
    let frontends = [
        ("tcp", format!("{NODE_IP}:30080")),
        ("udp", format!("{NODE_IP}:30053")),
        ("tcp", format!("{EXTERNAL_IP}:80")),
        ("udp", format!("{EXTERNAL_IP}:53")),
        ("tcp", format!("{LB_IP}:80")),
        ("udp", format!("{LB_IP}:53")),
    ];
    for (proto, addr) in &frontends {
        c.wait_served(proto, addr);
        let r = c.reach_all(proto, addr, &["be0", "be2"]);
        assert!(
            r.iter().all(|x| is_reply(x)),
            "{proto} {addr}: {:?}",
            summary(&r)
        );
        // externalTrafficPolicy Cluster: masqueraded.
        assert!(r.iter().all(|x| peer_of(x) != CLIENT_IP), "{r:?}");
    }
}

/// sessionAffinity ClientIP keeps a client on one backend.
fn session_affinity(mode: Mode) {
    let c = Cluster::new(mode);
    c.apply(&[
        service(
            "sticky",
            &[HTTP, DNS],
            json!({"sessionAffinity": "ClientIP"}),
        ),
        slice("sticky", &[HTTP, DNS], &[ready(0), ready(1), ready(2)]),
    ]);
    let cip = c.cluster_ip("sticky");
    for (proto, addr) in [("tcp", format!("{cip}:80")), ("udp", format!("{cip}:53"))] {
        c.wait_served(proto, &addr);
        let r = c.ask(proto, &addr, 40);
        assert!(r.iter().all(|x| is_reply(x)), "{:?}", summary(&r));
        assert_eq!(names(&r).len(), 1, "{proto}: {:?}", summary(&r));
    }
    // The timeout is honoured: 1 s after its last connection a client may land on
    // another backend (with 3 backends, 10 expiries all on the same one would
    // have probability 3^-9), and within the timeout it sticks.
    c.apply(&[
        service(
            "brief",
            &[HTTP],
            json!({"sessionAffinity": "ClientIP",
                   "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 1}}}),
        ),
        slice("brief", &[HTTP], &[ready(0), ready(1), ready(2)]),
    ]);
    let addr = format!("{}:80", c.cluster_ip("brief"));
    c.wait_served("tcp", &addr);
    let mut seen = BTreeSet::new();
    for _ in 0..10 {
        let r = c.ask("tcp", &addr, 5);
        assert_eq!(
            names(&r).len(),
            1,
            "sticks within the timeout: {:?}",
            summary(&r)
        );
        seen.extend(names(&r));
        if seen.len() > 1 {
            break;
        }
        std::thread::sleep(Duration::from_millis(2200));
    }
    assert!(
        seen.len() > 1,
        "affinity outlived its 1 s timeout: always {seen:?}"
    );
}

/// externalTrafficPolicy Local: only local endpoints, the client's address kept;
/// healthCheckNodePort 200 with local endpoints, 503 without (and then the
/// node does not forward).
fn external_traffic_policy_local(mode: Mode) {
    let c = Cluster::new(mode);
    let ports = [HTTP.node_port(30081), DNS.node_port(30054)];
    c.apply(&[
        service(
            "local",
            &ports,
            json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local"}),
        ),
        slice("local", &ports, &[ready(0), ready(2)]),
    ]);
    let hc: u16 = c
        .svc_field("local", ".spec.healthCheckNodePort")
        .parse()
        .expect("a healthCheckNodePort was allocated");
    for (proto, addr) in [
        ("tcp", format!("{NODE_IP}:30081")),
        ("udp", format!("{NODE_IP}:30054")),
    ] {
        c.wait_served(proto, &addr);
        let r = c.ask(proto, &addr, 40);
        assert!(
            r.iter().all(|x| x == &format!("be0 {CLIENT_IP}")),
            "{proto}: only the local endpoint, seeing the client: {:?}",
            summary(&r)
        );
    }
    let hc_addr = format!("{NODE_IP}:{hc}");
    let ok = wait_for(SETTLE, || {
        let (code, body) = c.client_http(&hc_addr, "/");
        (code == 200).then_some(body)
    })
    .expect("healthCheckNodePort answers 200");
    let v: Value = serde_json::from_str(&ok).unwrap();
    // One local pod on two ports: kube-proxy counts `ip:port`s.
    assert_eq!(v["localEndpoints"], 2, "{v}");
    assert_eq!(v["service"]["name"], "local", "{v}");

    // Only a remote endpoint left: 503, and external traffic is not forwarded.
    c.apply(&[slice("local", &ports, &[ready(2)])]);
    let body = wait_for(SETTLE, || {
        let (code, body) = c.client_http(&hc_addr, "/");
        (code == 503).then_some(body)
    })
    .expect("healthCheckNodePort answers 503 without local endpoints");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["localEndpoints"], 0, "{v}");
    let nodeport = format!("{NODE_IP}:30081");
    wait_for(SETTLE, || {
        (!is_reply(&c.ask("tcp", &nodeport, 1)[0])).then_some(())
    })
    .expect("NodePort not forwarded without local endpoints");
    let r = c.ask("tcp", &nodeport, 1).remove(0);
    assert!(!is_reply(&r), "{r}");
    // The ClusterIP still uses every endpoint.
    let cip = c.cluster_ip("local");
    c.reach_all("tcp", &format!("{cip}:80"), &["be2"]);

    // The local pod back but terminating (still serving): traffic that arrives
    // is served by it, but the health check stays 503 so the LB drains the node.
    c.apply(&[slice("local", &ports, &[terminating(0), ready(2)])]);
    c.wait_served("tcp", &nodeport);
    let r = c.ask("tcp", &nodeport, 10);
    assert!(r.iter().all(|x| x == &format!("be0 {CLIENT_IP}")), "{r:?}");
    assert_eq!(c.client_http(&hc_addr, "/").0, 503);
}

/// internalTrafficPolicy Local: ClusterIP traffic only to this node's endpoints.
fn internal_traffic_policy_local(mode: Mode) {
    let c = Cluster::new(mode);
    c.apply(&[
        service(
            "itl",
            &[HTTP, DNS],
            json!({"internalTrafficPolicy": "Local"}),
        ),
        slice(
            "itl",
            &[HTTP, DNS],
            &[ready(0), ready(1), ready(2), ready(3)],
        ),
    ]);
    let cip = c.cluster_ip("itl");
    for (proto, addr) in [("tcp", format!("{cip}:80")), ("udp", format!("{cip}:53"))] {
        c.wait_served(proto, &addr);
        let mut r = c.reach_all(proto, &addr, &["be0", "be1"]);
        r.extend(c.ask(proto, &addr, 40));
        assert_eq!(
            names(&r),
            set(&["be0", "be1"]),
            "{proto}: {:?}",
            summary(&r)
        );
        assert!(r.iter().all(|x| is_reply(x)), "{:?}", summary(&r));
    }
}

/// All endpoints terminating but serving: still served (never the non-serving one).
fn terminating_fallback(mode: Mode) {
    let c = Cluster::new(mode);
    let gone = Ep {
        serving: false,
        ..terminating(2)
    };
    c.apply(&[
        service("term", &[HTTP, DNS], json!({})),
        slice(
            "term",
            &[HTTP, DNS],
            &[terminating(0), terminating(1), gone],
        ),
    ]);
    let cip = c.cluster_ip("term");
    for (proto, addr) in [("tcp", format!("{cip}:80")), ("udp", format!("{cip}:53"))] {
        c.wait_served(proto, &addr);
        let mut r = c.reach_all(proto, &addr, &["be0", "be1"]);
        r.extend(c.ask(proto, &addr, 40));
        assert_eq!(
            names(&r),
            set(&["be0", "be1"]),
            "{proto}: {:?}",
            summary(&r)
        );
    }
}

/// A UDP client streaming from one socket reaches a new backend within 1 s
/// after its backend is removed (stale conntrack entries are flushed).
fn udp_stream_moves(mode: Mode) {
    let c = Cluster::new(mode);
    c.apply(&[
        service("stream", &[DNS], json!({})),
        slice("stream", &[DNS], &[ready(0)]),
    ]);
    let cip = c.cluster_ip("stream");
    let addr = format!("{cip}:53");
    c.wait_served("udp", &addr);

    let stream = UdpStream::start(&c.client, &addr);
    assert!(
        stream.first_from("be0", Instant::now()).is_some(),
        "stream never answered"
    );
    c.apply(&[slice("stream", &[DNS], &[ready(1)])]);
    let t0 = Instant::now();
    let moved = stream.first_from("be1", t0);
    let moved = moved.expect("the stream never reached the new backend") - t0;
    eprintln!("[{mode:?}] UDP stream moved to the new backend after {moved:?}");
    assert!(moved < Duration::from_secs(1), "took {moved:?}");
}

/// kill -9 and restart of `ferry proxy`: an established connection through the
/// service survives and new connections made meanwhile succeed.
fn proxy_restart(mode: Mode) {
    let mut c = Cluster::new(mode);
    let _echo: Vec<Server> = (0..3)
        .map(|i| {
            c.backends[i]
                .serve_tcp_echo("0.0.0.0:9090", &format!("be{i}"))
                .unwrap()
        })
        .collect();
    c.apply(&[
        service("echo", &[ECHO], json!({})),
        slice("echo", &[ECHO], &[ready(0), ready(1), ready(2)]),
        service("web", &[HTTP], json!({})),
        slice("web", &[HTTP], &[ready(0), ready(1), ready(2)]),
        service("dns", &[DNS], json!({})),
        slice("dns", &[DNS], &[ready(0), ready(1), ready(2), ready(3)]),
        service("dns2", &[DNS], json!({})),
        slice("dns2", &[DNS], &[ready(0), ready(1), ready(2), ready(3)]),
    ]);
    let (echo, web) = (
        format!("{}:7", c.cluster_ip("echo")),
        format!("{}:80", c.cluster_ip("web")),
    );
    c.wait_served("tcp", &web);

    // A long-lived connection through the echo service (greeting, then echo).
    let echo_conn = || -> Option<TcpStream> {
        let echo = echo.clone();
        let mut conn = c
            .client
            .run(move || Ok(TcpStream::connect_timeout(&echo.parse()?, REQ)?))
            .ok()?;
        conn.set_read_timeout(Some(REQ)).ok()?;
        let mut greeting = [0u8; 64];
        let n = conn.read(&mut greeting).ok()?;
        greeting[..n].starts_with(b"be").then_some(conn)
    };
    let mut conn = wait_for(SETTLE, echo_conn).expect("echo service never served");
    let roundtrip = |conn: &mut TcpStream, msg: &str| -> String {
        conn.write_all(msg.as_bytes()).unwrap();
        let mut buf = vec![0u8; msg.len()];
        conn.read_exact(&mut buf).unwrap();
        String::from_utf8(buf).unwrap()
    };
    assert_eq!(roundtrip(&mut conn, "before\n"), "before\n");

    // Two UDP flows (one socket each): `kept` must stay on its backend across the
    // restart; the backend of `moved` leaves the slice while the proxy is down,
    // so the restarted proxy must move that flow.
    let dns = format!("{}:53", c.cluster_ip("dns"));
    let dns2 = format!("{}:53", c.cluster_ip("dns2"));
    c.wait_served("udp", &dns);
    c.wait_served("udp", &dns2);
    let t = Instant::now();
    let (kept, moved) = (
        UdpStream::start(&c.client, &dns),
        UdpStream::start(&c.client, &dns2),
    );
    assert!(
        wait_for(SETTLE, || (kept.replies() > 0 && moved.replies() > 0)
            .then_some(()))
        .is_some()
    );
    let kept_on = kept.backends_since(t);
    let moved_from = moved.backends_since(t);
    assert_eq!(
        (kept_on.len(), moved_from.len()),
        (1, 1),
        "{kept_on:?} {moved_from:?}"
    );
    let moved_from = moved_from.into_iter().next().unwrap();
    let others: Vec<Ep> = (0..BACKENDS)
        .filter(|i| format!("be{i}") != moved_from)
        .map(ready)
        .collect();

    // New connections all along, from kill until the new proxy has synced.
    let stop = Arc::new(AtomicBool::new(false));
    let (stop2, web2) = (stop.clone(), web.clone());
    let prober = c.client.spawn_thread(move || {
        let mut out = Vec::new();
        while !stop2.load(Ordering::Relaxed) {
            out.push(request("tcp", &web2));
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(out)
    });
    std::thread::sleep(Duration::from_millis(200));
    c.proxy.kill();
    c.apply(&[slice("dns2", &[DNS], &others)]);
    std::thread::sleep(Duration::from_millis(500));
    c.start_proxy();
    let restarted = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let probes = prober.join().unwrap().unwrap();
    assert!(probes.len() >= 20, "{}", probes.len());
    assert!(
        probes.iter().all(|r| is_reply(r)),
        "new connections during the restart: {:?}",
        summary(&probes)
    );
    assert_eq!(roundtrip(&mut conn, "after restart\n"), "after restart\n");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        kept.backends_since(t),
        kept_on,
        "a UDP flow changed backend"
    );
    let now_on = moved.backends_since(restarted + Duration::from_millis(700));
    assert!(
        !now_on.is_empty() && !now_on.contains(&moved_from),
        "the UDP flow to a removed endpoint stayed: {now_on:?} (was {moved_from})"
    );
    // The restarted proxy still follows changes.
    c.apply(&[slice("web", &[HTTP], &[ready(3)])]);
    c.wait_only("tcp", &web, &["be3"]);
    assert_eq!(roundtrip(&mut conn, "still\n"), "still\n");
}

/// The API server killed: the programmed rules keep serving. Restarted: the
/// proxy converges to the changes made after.
fn apiserver_restart(mode: Mode) {
    let mut c = Cluster::new(mode);
    c.apply(&[
        service("web", &[HTTP, DNS], json!({})),
        slice("web", &[HTTP, DNS], &[ready(0), ready(1)]),
    ]);
    let cip = c.cluster_ip("web");
    let (tcp, udp) = (format!("{cip}:80"), format!("{cip}:53"));
    c.wait_served("tcp", &tcp);

    c.cp.kill_hard();
    std::thread::sleep(Duration::from_secs(2)); // the watchers notice and retry
    c.reach_all("tcp", &tcp, &["be0", "be1"]);
    c.reach_all("udp", &udp, &["be0", "be1"]);
    assert_eq!(c.node_http("127.0.0.1:10256", "/healthz").0, 200);

    c.cp.restart();
    c.apply(&[
        slice("web", &[HTTP, DNS], &[ready(2)]),
        service("later", &[HTTP], json!({})),
        slice("later", &[HTTP], &[ready(3)]),
    ]);
    let t = c.wait_only("tcp", &tcp, &["be2"]);
    eprintln!("[{mode:?}] converged {t:?} after the post-restart write");
    c.wait_only("udp", &udp, &["be2"]);
    let later = format!("{}:80", c.cluster_ip("later"));
    c.wait_only("tcp", &later, &["be3"]);
}

/// In-cluster clients reach the API server through the `kubernetes` Service
/// (its first ClusterIP, endpoint = the control plane): kubectl from the node
/// namespace with the server set to the ClusterIP.
fn kubernetes_service(mode: Mode) {
    let c = Cluster::new(mode);
    let cip = c.cluster_ip("kubernetes");
    let out = c
        .node
        .command("kubectl")
        .env("HOME", c.cp.dir.path())
        .arg("--kubeconfig")
        .arg(c.cp.kubeconfig())
        .args(["--server", &format!("https://{cip}:443")])
        .args([
            "get",
            "svc",
            "kubernetes",
            "-o",
            "jsonpath={.spec.clusterIP}",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "[{mode:?}] kubectl via {cip}:443: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), cip);
}

/// `ferry proxy --cleanup` removes every rule; service traffic stops.
fn cleanup(mode: Mode) {
    let mut c = Cluster::new(mode);
    c.apply(&[
        service("web", &[HTTP], json!({})),
        slice("web", &[HTTP], &[ready(0)]),
    ]);
    let addr = format!("{}:80", c.cluster_ip("web"));
    c.wait_served("tcp", &addr);
    let before = c.ruleset();
    match mode {
        Mode::Nftables => assert!(before.contains("table ip ferry"), "{before}"),
        Mode::Iptables => assert!(before.contains("FERRY-SERVICES"), "{before}"),
    }
    c.proxy.kill();
    c.node.exec(&[ferry_bin(), "proxy", "--cleanup"]).unwrap();
    let after = c.ruleset();
    assert!(
        !after.contains("ferry") && !after.contains("FERRY"),
        "left after --cleanup:\n{after}"
    );
    let r = c.ask("tcp", &addr, 1).remove(0);
    assert!(!is_reply(&r), "{r}");
}

/// /healthz, /livez and /metrics (kube-proxy's names) over HTTP in the node
/// namespace; the change-to-live latency of EndpointSlice writes.
fn metrics_and_healthz(mode: Mode) {
    let c = Cluster::new(mode);
    let (code, body) = c.node_http("127.0.0.1:10256", "/healthz");
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(
        v["lastUpdated"].is_string() && v["currentTime"].is_string(),
        "{v}"
    );
    assert_eq!(c.node_http(&format!("{NODE_IP}:10256"), "/livez").0, 200);

    c.apply(&[
        service("web", &[HTTP], json!({})),
        slice("web", &[HTTP], &[ready(0)]),
    ]);
    let addr = format!("{}:80", c.cluster_ip("web"));
    c.wait_served("tcp", &addr);

    // Change-to-live: from the write returning until the rule is in the kernel.
    let mut lat = Vec::new();
    for round in 0..5 {
        let b = 1 + round % 3;
        let mut s = slice("web", &[HTTP], &[ready(0), ready(b)]);
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        s["metadata"]["annotations"] =
            json!({"endpoints.kubernetes.io/last-change-trigger-time": now});
        c.apply(&[s]);
        let t0 = Instant::now();
        let needle = backend_ip(b);
        let live = wait_for(SETTLE, || {
            let rules = match mode {
                Mode::Nftables => c.node.exec(&["nft", "list", "table", "ip", "ferry"]),
                Mode::Iptables => c.node.exec(&["iptables-save", "-t", "nat"]),
            };
            rules.unwrap().contains(&needle).then(|| t0.elapsed())
        });
        lat.push(live.expect("endpoint never programmed"));
        c.apply(&[slice("web", &[HTTP], &[ready(0)])]);
        c.wait_only("tcp", &addr, &["be0"]);
    }
    lat.sort();
    eprintln!(
        "[{mode:?}] EndpointSlice write → rule live (polled): min {:?} median {:?} max {:?}",
        lat[0],
        lat[lat.len() / 2],
        lat[lat.len() - 1]
    );

    let (code, text) = c.node_http("127.0.0.1:10249", "/metrics");
    assert_eq!(code, 200);
    for name in [
        "kubeproxy_sync_proxy_rules_duration_seconds_bucket",
        "kubeproxy_sync_full_proxy_rules_duration_seconds_count",
        "kubeproxy_sync_partial_proxy_rules_duration_seconds_count",
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
        "kubeproxy_network_programming_duration_seconds_bucket",
        "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
        "kubeproxy_sync_proxy_rules_endpoint_changes_total",
        "kubeproxy_sync_proxy_rules_service_changes_pending",
        "kubeproxy_sync_proxy_rules_service_changes_total",
    ] {
        assert!(text.contains(name), "/metrics lacks {name}:\n{text}");
    }
    let value = |name: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no sample {name}:\n{text}"))
    };
    assert!(value("kubeproxy_sync_proxy_rules_endpoint_changes_total") >= 10.0);
    assert!(value("kubeproxy_sync_proxy_rules_service_changes_total") >= 1.0);
    assert!(value("kubeproxy_network_programming_duration_seconds_count") >= 5.0);
    assert!(value("kubeproxy_sync_partial_proxy_rules_duration_seconds_count") >= 10.0);
    assert!(value("kubeproxy_sync_proxy_rules_last_timestamp_seconds") > 1.0e9);
    // Not served on the node's other addresses (127.0.0.1 by default).
    assert_eq!(c.node_http(&format!("{NODE_IP}:10249"), "/metrics").0, 0);
}

macro_rules! in_both_modes {
    ($($case:ident),* $(,)?) => {
        mod nftables {
            $(#[test]
            fn $case() {
                if ferry_testkit::require_root() {
                    super::$case(super::Mode::Nftables);
                }
            })*
        }
        mod iptables {
            $(#[test]
            fn $case() {
                if ferry_testkit::require_root() {
                    super::$case(super::Mode::Iptables);
                }
            })*
        }
    };
}

in_both_modes!(
    clusterip,
    nodeport_external_and_lb_ips,
    session_affinity,
    external_traffic_policy_local,
    internal_traffic_policy_local,
    terminating_fallback,
    udp_stream_moves,
    proxy_restart,
    apiserver_restart,
    cleanup,
    metrics_and_healthz,
    kubernetes_service,
);
