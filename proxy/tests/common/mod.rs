//! A node namespace programmed by a ferry datapath from a fixed model, a client
//! namespace outside the cluster, and backend namespaces answering with their name.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use ferry_proxy::fixtures::*;
use ferry_proxy::model::{self, ModelConfig, NodePortAddressesConfig, ProxyModel};
use ferry_proxy::{Datapath, Runner};

/// Makes the datapath under test, bound to a node namespace.
pub type MakeDp = fn(Runner) -> Box<dyn Datapath>;
use ferry_testkit::{tcp_request, udp_request, veth, Netns, Server};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

pub const NODE_IP: &str = "198.18.0.1";
pub const CLIENT_IP: &str = "198.18.0.2";
pub const CLUSTER_CIDR: &str = "198.18.128.0/17";
pub const NODE: &str = "node-a";
pub const TCP_PORT: u16 = 8080;
pub const UDP_PORT: u16 = 8053;
pub const BACKENDS: usize = 4;

pub fn backend_ip(i: usize) -> String {
    format!("198.18.{}.2", 128 + i)
}

pub struct Topo {
    pub client: Netns,
    pub node: Netns,
    pub backends: Vec<Netns>,
    _servers: Vec<Server>,
}

impl Topo {
    pub fn new() -> Topo {
        let client = Netns::new("cli").unwrap();
        let node = Netns::new("node").unwrap();
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
        // Nodes have an uplink; service IPs without rules are routed (and so rejected).
        node.add_route("default", CLIENT_IP).unwrap();
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
            servers.push(
                b.serve_tcp(&format!("0.0.0.0:{TCP_PORT}"), &format!("be{i}"))
                    .unwrap(),
            );
            servers.push(
                b.serve_udp(&format!("0.0.0.0:{UDP_PORT}"), &format!("be{i}"))
                    .unwrap(),
            );
            backends.push(b);
        }
        Topo {
            client,
            node,
            backends,
            _servers: servers,
        }
    }

    pub fn runner(&self) -> Runner {
        Runner::in_netns(self.node.name())
    }

    /// Up to `n` TCP requests from the client; stops early once `stop` says so.
    pub fn tcp_names(&self, addr: &str, n: usize, stop_after_all: Option<usize>) -> Vec<String> {
        let addr = addr.to_string();
        self.client
            .run(move || {
                let mut seen = Vec::new();
                let mut distinct = BTreeSet::new();
                for _ in 0..n {
                    let r = tcp_request(&addr, Duration::from_secs(2))?;
                    distinct.insert(r.split(' ').next().unwrap_or("").to_string());
                    seen.push(r);
                    if stop_after_all.is_some_and(|k| distinct.len() >= k) {
                        break;
                    }
                }
                Ok(seen)
            })
            .unwrap()
    }

    pub fn udp_names(&self, addr: &str, n: usize, stop_after_all: Option<usize>) -> Vec<String> {
        let addr = addr.to_string();
        self.client
            .run(move || {
                let mut seen = Vec::new();
                let mut distinct = BTreeSet::new();
                for _ in 0..n {
                    let r = udp_request(&addr, Duration::from_secs(2))?;
                    distinct.insert(r.split(' ').next().unwrap_or("").to_string());
                    seen.push(r);
                    if stop_after_all.is_some_and(|k| distinct.len() >= k) {
                        break;
                    }
                }
                Ok(seen)
            })
            .unwrap()
    }
}

pub fn names(replies: &[String]) -> BTreeSet<String> {
    replies
        .iter()
        .map(|r| r.split(' ').next().unwrap().to_string())
        .collect()
}

const WEB: &[(&str, u16, &str)] = &[("http", 80, "TCP"), ("dns", 53, "UDP")];
const WEB_EP: &[(&str, u16, &str)] = &[("http", TCP_PORT, "TCP"), ("dns", UDP_PORT, "UDP")];
const HTTP: &[(&str, u16, &str)] = &[("http", 80, "TCP")];
const HTTP_EP: &[(&str, u16, &str)] = &[("http", TCP_PORT, "TCP")];

/// The fixed cluster. `web_backends` chooses web's ready endpoints (be3 is
/// always listed but not ready).
pub fn objects(web_backends: &[usize]) -> (Vec<Service>, Vec<EndpointSlice>) {
    let mut lb = with_node_ports(service("ns", "local", "198.19.0.14", HTTP), &[30090]);
    lb.spec.as_mut().unwrap().external_traffic_policy = Some("Local".into());
    lb.spec.as_mut().unwrap().external_ips = Some(vec!["198.19.100.14".into()]);
    let svcs = vec![
        service("ns", "web", "198.19.0.10", WEB),
        service("ns", "none", "198.19.0.11", WEB),
        with_node_ports(service("ns", "np", "198.19.0.12", HTTP), &[30080]),
        with_affinity(service("ns", "sticky", "198.19.0.13", HTTP), 10),
        lb,
    ];
    let mut web_eps: Vec<Ep> = web_backends
        .iter()
        .map(|i| ep(&backend_ip(*i), "node-b"))
        .collect();
    web_eps.push(ep(&backend_ip(3), "node-b").not_ready());
    let slices = vec![
        slice("ns", "web", "web-1", WEB_EP, &web_eps),
        slice(
            "ns",
            "np",
            "np-1",
            HTTP_EP,
            &[ep(&backend_ip(0), "node-b"), ep(&backend_ip(1), "node-b")],
        ),
        slice(
            "ns",
            "sticky",
            "sticky-1",
            HTTP_EP,
            &[
                ep(&backend_ip(0), "node-b"),
                ep(&backend_ip(1), "node-b"),
                ep(&backend_ip(2), "node-b"),
            ],
        ),
        slice(
            "ns",
            "local",
            "local-1",
            HTTP_EP,
            &[ep(&backend_ip(0), NODE), ep(&backend_ip(1), "node-b")],
        ),
    ];
    (svcs, slices)
}

pub fn build_model(web_backends: &[usize]) -> ProxyModel {
    let (svcs, slices) = objects(web_backends);
    let cfg = ModelConfig {
        node_name: NODE.into(),
        cluster_cidrs: vec![CLUSTER_CIDR.parse().unwrap()],
        masquerade_all: false,
        node_port_addresses: NodePortAddressesConfig::Primary,
    };
    let m = model::build(&svcs, &slices, Some(&node(NODE, &[NODE_IP])), &cfg);
    assert!(m.warnings.is_empty(), "{:?}", m.warnings);
    m
}

// ---- the checks, shared by both netfilter modes ----

pub fn check_clusterip_reaches_every_endpoint(mk: MakeDp) {
    let t = Topo::new();
    let mut dp = mk(t.runner());
    dp.sync_full(&build_model(&[0, 1, 2])).unwrap();
    let tcp = t.tcp_names("198.19.0.10:80", 200, Some(3));
    assert_eq!(
        names(&tcp),
        ["be0", "be1", "be2"].map(String::from).into(),
        "tcp: {tcp:?}"
    );
    let udp = t.udp_names("198.19.0.10:53", 200, Some(3));
    assert_eq!(
        names(&udp),
        ["be0", "be1", "be2"].map(String::from).into(),
        "udp: {udp:?}"
    );
    // Off-cluster client: masqueraded to the node's address on the backend link.
    assert!(tcp.iter().all(|r| !r.contains(CLIENT_IP)), "{tcp:?}");
    // The not-ready endpoint (be3) never gets traffic.
    let more = t.tcp_names("198.19.0.10:80", 60, None);
    assert!(!names(&more).contains("be3"), "{more:?}");
}

/// `node_sysctls` are set in the node namespace first (see the iptables test).
pub fn check_no_endpoints_refused_at_once(mk: MakeDp, node_sysctls: &[(&str, &str)]) {
    let t = Topo::new();
    for (k, v) in node_sysctls {
        t.node.sysctl(k, v).unwrap();
    }
    let mut dp = mk(t.runner());
    dp.sync_full(&build_model(&[0, 1, 2])).unwrap();
    let (tcp, udp, elapsed) = t
        .client
        .run(|| {
            let start = Instant::now();
            let tcp = tcp_request("198.19.0.11:80", Duration::from_secs(3)).map_err(|e| e.kind());
            let udp = udp_request("198.19.0.11:53", Duration::from_secs(3)).map_err(|e| e.kind());
            Ok((tcp, udp, start.elapsed()))
        })
        .unwrap();
    assert_eq!(tcp, Err(std::io::ErrorKind::ConnectionRefused));
    assert_eq!(udp, Err(std::io::ErrorKind::ConnectionRefused));
    assert!(elapsed < Duration::from_secs(1), "took {elapsed:?}");
}

pub fn check_nodeport_and_local_policy(mk: MakeDp) {
    let t = Topo::new();
    let mut dp = mk(t.runner());
    dp.sync_full(&build_model(&[0, 1, 2])).unwrap();
    let np = t.tcp_names(&format!("{NODE_IP}:30080"), 200, Some(2));
    assert_eq!(
        names(&np),
        ["be0", "be1"].map(String::from).into(),
        "{np:?}"
    );
    // externalTrafficPolicy Local: only the local endpoint, client IP preserved.
    let local = t.tcp_names(&format!("{NODE_IP}:30090"), 30, None);
    assert!(
        local.iter().all(|r| r == &format!("be0 {CLIENT_IP}")),
        "{local:?}"
    );
    let ext = t.tcp_names("198.19.100.14:80", 10, None);
    assert!(
        ext.iter().all(|r| r == &format!("be0 {CLIENT_IP}")),
        "{ext:?}"
    );
}

pub fn check_affinity_sticks(mk: MakeDp) {
    let t = Topo::new();
    let mut dp = mk(t.runner());
    dp.sync_full(&build_model(&[0, 1, 2])).unwrap();
    let r = t.tcp_names("198.19.0.13:80", 30, None);
    assert_eq!(names(&r).len(), 1, "{r:?}");
}

/// Removing an endpoint from one service touches only that service.
pub fn check_update_changes_only_one_service(mk: MakeDp, snapshot: fn(&Runner) -> String) {
    let t = Topo::new();
    let mut dp = mk(t.runner());
    let old = build_model(&[0, 1, 2]);
    dp.sync_full(&old).unwrap();
    // Traffic first, so counters of untouched rules are non-zero.
    let np = t.tcp_names(&format!("{NODE_IP}:30080"), 10, None);
    assert_eq!(np.len(), 10);
    let before = snapshot(&t.runner());
    let new = build_model(&[0, 1]);
    let d = model::diff(&old, &new);
    assert_eq!(d.len(), 2, "web's tcp and udp ports: {d:?}");
    dp.apply_diff(&new, &d).unwrap();
    let after = snapshot(&t.runner());
    assert_eq!(before, after, "objects of other services changed");
    let r = t.tcp_names("198.19.0.10:80", 60, None);
    assert!(!names(&r).contains("be2"), "{r:?}");
    let np = t.tcp_names(&format!("{NODE_IP}:30080"), 200, Some(2));
    assert_eq!(names(&np).len(), 2);
}

/// `--cleanup` semantics: everything the datapath made is gone.
pub fn check_cleanup(mk: MakeDp, leftovers: fn(&Runner) -> String) {
    let t = Topo::new();
    let mut dp = mk(t.runner());
    dp.sync_full(&build_model(&[0, 1, 2])).unwrap();
    assert!(!leftovers(&t.runner()).is_empty());
    dp.cleanup().unwrap();
    assert_eq!(leftovers(&t.runner()), "");
    // Idempotent.
    dp.cleanup().unwrap();
}

/// A second full sync (periodic resync or restart) keeps working and removes stale objects.
pub fn check_resync(mk: MakeDp) {
    let t = Topo::new();
    let mut dp = mk(t.runner());
    dp.sync_full(&build_model(&[0, 1, 2])).unwrap();
    // A new process (restart): starts from what the kernel has.
    let mut dp2 = mk(t.runner());
    dp2.sync_full(&build_model(&[0])).unwrap();
    let r = t.tcp_names("198.19.0.10:80", 30, None);
    assert_eq!(names(&r), ["be0".to_string()].into(), "{r:?}");
    let r = t.tcp_names("198.19.0.13:80", 5, None);
    assert_eq!(r.len(), 5);
}

/// A UDP client streaming from one source port reaches a new backend within 1 s
/// after its backend is removed (stale conntrack entries are deleted).
pub fn check_udp_stream_moves_after_endpoint_removal(mk: MakeDp) {
    use std::net::UdpSocket;
    let t = Topo::new();
    let mut dp = mk(t.runner());
    let old = build_model(&[0, 1, 2]);
    dp.sync_full(&old).unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<Vec<usize>>();
    let (back_tx, back_rx) = std::sync::mpsc::channel::<String>();
    let client = t.client.spawn_thread(move || {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.connect("198.19.0.10:53")?;
        s.set_read_timeout(Some(Duration::from_millis(100)))?;
        let mut buf = [0u8; 1500];
        let ask = |s: &UdpSocket, buf: &mut [u8]| -> Option<String> {
            s.send(b"ping").ok()?;
            let n = s.recv(buf).ok()?;
            Some(
                String::from_utf8_lossy(&buf[..n])
                    .split(' ')
                    .next()
                    .unwrap_or("")
                    .to_string(),
            )
        };
        let first = ask(&s, &mut buf).unwrap_or_default();
        back_tx.send(first.clone()).unwrap();
        let _ = rx.recv();
        // Stream until a different backend answers (bounded: 1 s).
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(1) {
            if let Some(n) = ask(&s, &mut buf) {
                if n != first {
                    return Ok(Some((n, start.elapsed())));
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(None)
    });
    let first = back_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    let idx: usize = first
        .trim_start_matches("be")
        .parse()
        .expect("a backend answered");
    let keep: Vec<usize> = (0..3).filter(|i| *i != idx).collect();
    let new = build_model(&keep);
    let d = model::diff(&old, &new);
    dp.apply_diff(&new, &d).unwrap();
    let stale = ferry_proxy::conntrack::stale_udp(&new, &d);
    assert!(!stale.is_empty());
    assert_eq!(ferry_proxy::conntrack::apply(&t.runner(), &stale), 0);
    tx.send(keep).unwrap();
    let moved = client.join().unwrap().unwrap();
    let (n, after) = moved.expect("UDP stream did not move to another backend within 1 s");
    assert_ne!(n, first);
    assert!(after < Duration::from_secs(1));
}

/// Starting one mode removes the other's leftovers; --cleanup removes everything.
pub fn check_cross_mode_cleanup() {
    use ferry_proxy::Mode;
    let t = Topo::new();
    let r = t.runner();
    let mut nft = ferry_proxy::new_datapath(Mode::Nftables, "", r.clone());
    nft.sync_full(&build_model(&[0])).unwrap();
    ferry_proxy::cleanup_other_modes(&r, Mode::Iptables, "iptables-nft");
    assert!(!r.succeeds("nft", &["list", "table", "ip", "ferry"]));
    let mut ipt = ferry_proxy::new_datapath(Mode::Iptables, "iptables-nft", r.clone());
    ipt.sync_full(&build_model(&[0])).unwrap();
    // iptables mode with one implementation removes the other's chains.
    let mut legacy = ferry_proxy::new_datapath(Mode::Iptables, "iptables-legacy", r.clone());
    legacy.sync_full(&build_model(&[0])).unwrap();
    ferry_proxy::cleanup_other_modes(&r, Mode::Iptables, "iptables-nft");
    let legacy_save = r.run("iptables-legacy-save", &[]).unwrap();
    assert!(!legacy_save.contains("FERRY"), "{legacy_save}");
    legacy.sync_full(&build_model(&[0])).unwrap();
    let mut nft = ferry_proxy::new_datapath(Mode::Nftables, "", r.clone());
    nft.sync_full(&build_model(&[0])).unwrap();
    let found = ferry_proxy::cleanup_all(&r);
    assert_eq!(found, ["nftables", "iptables-nft", "iptables-legacy"]);
    assert!(!r.succeeds("nft", &["list", "table", "ip", "ferry"]));
    let save = r.run("iptables-save", &[]).unwrap();
    assert!(!save.contains("FERRY"), "{save}");
    assert!(ferry_proxy::cleanup_all(&r).is_empty());
}
