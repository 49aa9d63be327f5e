//! The pod fast path (eBPF) on a real kernel: cross-node pod traffic skips
//! the nodes' stacks, flows the stack NATs still get their replies de-NATed,
//! a restart keeps it, `fast_path: false` removes it. Needs root.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};

use common::*;
use ferry_ebpf::pod_fastpath::{FastPath, COUNTERS};
use ferry_overlay::node::Backend;
use ferry_overlay::podnet::host_veth_name;
use ferry_testkit::{require_root, Netns};

/// A ClusterIP as ferry proxy / kube-proxy would DNAT it on node-1.
const SERVICE_IP: &str = "10.96.0.10";

const BULK: usize = 4 << 20;

/// Sends 4 MiB over TCP from `from` to a one-shot sink in `to`; the bytes the sink read.
fn bulk(from: &Netns, to: &Netns, ip: std::net::Ipv4Addr) -> usize {
    let (tx, rx) = std::sync::mpsc::channel();
    let sink = to.spawn_thread(move || {
        let l = TcpListener::bind((ip, 9000))?;
        tx.send(()).ok();
        let (mut s, _) = l.accept()?;
        s.set_read_timeout(Some(T))?;
        let mut got = Vec::new();
        s.read_to_end(&mut got)?;
        Ok(got.len())
    });
    rx.recv_timeout(T).unwrap();
    from.run(move || {
        let mut s = TcpStream::connect_timeout(&(ip, 9000).into(), T)?;
        s.set_write_timeout(Some(T))?;
        let chunk = vec![7u8; 64 << 10];
        for _ in 0..BULK / chunk.len() {
            s.write_all(&chunk)?;
        }
        Ok(())
    })
    .unwrap();
    sink.join().unwrap().unwrap()
}

/// A fast-path packet counter, by (program, action).
fn packets(fp: &FastPath, counter: (&str, &str)) -> u64 {
    let i = COUNTERS.iter().position(|c| *c == counter).unwrap();
    fp.counters().unwrap()[i]
}

fn filters(ns: &Netns, dev: &str) -> String {
    ns.exec(&["tc", "filter", "show", "dev", dev, "ingress"])
        .unwrap_or_default()
}

/// The devices carrying to_pod: VXLAN is decapsulated on the underlay.
fn devices(backend: Backend) -> &'static [&'static str] {
    match backend {
        Backend::Vxlan => &["flannel.1", "eth0"],
        Backend::HostGw => &["eth0"],
    }
}

/// The packets counted on the devices the stack path would take through the
/// nodes: node-1's cni0 and flannel.1 (VXLAN) in, node-2's out.
fn stack_packets(c: &Cluster, backend: Backend) -> Vec<(String, u64)> {
    let mut on = vec![("cni0", "rx_packets", "tx_packets")];
    if backend == Backend::Vxlan {
        on.push(("flannel.1", "tx_packets", "rx_packets"));
    }
    let mut v = Vec::new();
    for (dev, n1, n2) in on {
        v.push((
            format!("node-1 {dev} {n1}"),
            counter(&c.nodes[0].ns, dev, n1),
        ));
        v.push((
            format!("node-2 {dev} {n2}"),
            counter(&c.nodes[1].ns, dev, n2),
        ));
    }
    v
}

fn fast_path_carries_pod_traffic_and_keeps_nat_working(backend: Backend) {
    let mut c = Cluster::new(2, backend).unwrap();
    let p1 = c.nodes[0].add_pod("fp1").unwrap();
    let p2 = c.nodes[1].add_pod("fp2").unwrap();
    let _s2 = p2.ns.serve_tcp("0.0.0.0:8080", "p2").unwrap();
    let _u2 = p2.ns.serve_udp("0.0.0.0:8081", "p2").unwrap();
    let _s1 = p1.ns.serve_tcp("0.0.0.0:8080", "p1").unwrap();
    for n in &c.nodes {
        for dev in devices(backend) {
            assert!(filters(&n.ns, dev).contains("to_pod"), "{} {dev}", n.name);
        }
    }
    let veth1 = host_veth_name(&p1.id, "eth0");
    assert!(filters(&c.nodes[0].ns, &veth1).contains("from_pod"));
    let fp = FastPath::new(c.nodes[0].config().fastpath_dir());
    assert!(fp.pods().unwrap().iter().any(|(ip, _)| *ip == p1.ip));
    // CNI CHECK verifies the pod's fast-path entry: a stale one is an error.
    let check = || {
        let (pn, id, path) = (c.nodes[0].pod_network(), p1.id.clone(), netns_path(&p1.ns));
        c.nodes[0]
            .ns
            .run(move || Ok(pn.check(&path, &id, "eth0").map_err(|e| e.to_string())))
            .unwrap()
    };
    check().unwrap();
    let good = fp.pod(p1.ip).unwrap().unwrap();
    let stale = ferry_ebpf::pod_fastpath::PodEndpoint {
        host_ifindex: good.host_ifindex + 1000,
        ..good
    };
    let set_entry = |ep| {
        let (fp, veth, ip) = (fp.clone(), veth1.clone(), p1.ip);
        c.nodes[0]
            .ns
            .run(move || Ok(fp.add_pod(&veth, ip, ep)?))
            .unwrap()
    };
    set_entry(stale);
    let err = check().unwrap_err();
    assert!(err.contains("fast path") && err.contains("stale"), "{err}");
    set_entry(good);
    check().unwrap();

    // pod <-> pod across nodes, source kept, both protocols.
    assert_pod_to_pod(&p1, &p2, "p2");
    // A 4 MiB transfer crosses neither node's cni0 bridge nor, over VXLAN,
    // the vxlan driver (the stack path would put ~100 GSO packets or thousands
    // of segments through each).
    let before = stack_packets(&c, backend);
    assert_eq!(bulk(&p1.ns, &p2.ns, p2.ip), BULK);
    for ((what, b), (_, a)) in before.iter().zip(stack_packets(&c, backend)) {
        assert!(a - b < 10, "{what}: {} packets during the transfer", a - b);
    }
    // ... and the fast path counted them (≥ 64 GSO packets of ≤ 64 KiB).
    let fp2 = FastPath::new(c.nodes[1].config().fastpath_dir());
    let (sent, received) = match backend {
        Backend::Vxlan => (("from_pod", "encapsulated"), ("to_pod", "decapsulated")),
        Backend::HostGw => (("from_pod", "routed"), ("to_pod", "delivered")),
    };
    assert!(packets(&fp, sent) >= 64, "node-1 {sent:?}");
    assert!(packets(&fp2, received) >= 64, "node-2 {received:?}");

    // A ClusterIP DNATed on node-1 to the pod on node-2: the reply must go
    // through node-1's stack to be de-NATed (the client sees the service address).
    c.nodes[0]
        .ns
        .exec(&[
            "nft",
            &format!(
                "add table ip test_svc; add chain ip test_svc pre {{ type nat hook prerouting priority dstnat; }}; \
                 add rule ip test_svc pre ip daddr {SERVICE_IP} tcp dport 80 dnat to {p}:8080; \
                 add rule ip test_svc pre ip daddr {SERVICE_IP} udp dport 53 dnat to {p}:8081",
                p = p2.ip
            ),
        ])
        .unwrap();
    for _ in 0..3 {
        assert_eq!(
            tcp(&p1.ns, format!("{SERVICE_IP}:80")),
            format!("p2 {}", p1.ip)
        );
        assert_eq!(
            udp(&p1.ns, format!("{SERVICE_IP}:53")),
            format!("p2 {}", p1.ip)
        );
    }
    assert!(
        packets(&fp, ("to_pod", "to_stack")) > 0,
        "replies to de-NAT"
    );

    // A restart of `ferry overlay` keeps the fast path and its pods.
    c.nodes[0].restart_agent().unwrap();
    for dev in devices(backend) {
        assert!(filters(&c.nodes[0].ns, dev).contains("to_pod"), "{dev}");
    }
    assert!(fp.pods().unwrap().iter().any(|(ip, _)| *ip == p1.ip));
    assert_eq!(
        tcp(&p2.ns, format!("{}:8080", p1.ip)),
        format!("p1 {}", p2.ip)
    );
    assert_eq!(
        tcp(&p1.ns, format!("{}:8080", p2.ip)),
        format!("p2 {}", p1.ip)
    );

    // Pod DEL forgets the pod.
    let p3 = c.nodes[0].add_pod("fp3").unwrap();
    assert!(fp.pods().unwrap().iter().any(|(ip, _)| *ip == p3.ip));
    let pn = c.nodes[0].pod_network();
    let (id, path) = (p3.id.clone(), netns_path(&p3.ns));
    c.nodes[0]
        .ns
        .run(move || pn.del(Some(&path), &id, "eth0"))
        .unwrap();
    assert!(!fp.pods().unwrap().iter().any(|(ip, _)| *ip == p3.ip));

    // Turned off: programs detached, pins gone, traffic on the stack path.
    let mut cfg = c.nodes[0].config();
    cfg.fast_path = false;
    c.nodes[0].agent = None;
    c.nodes[0].agent = Some(Agent::start(&c.nodes[0].ns, cfg).unwrap());
    for dev in devices(backend) {
        assert!(!filters(&c.nodes[0].ns, dev).contains("to_pod"), "{dev}");
    }
    assert!(!filters(&c.nodes[0].ns, &veth1).contains("from_pod"));
    assert!(!fp.dir().exists());
    assert!(c.nodes[0].agent().env.fastpath.is_none());
    assert_eq!(
        tcp(&p1.ns, format!("{}:8080", p2.ip)),
        format!("p2 {}", p1.ip)
    );
    assert_eq!(
        tcp(&p1.ns, format!("{SERVICE_IP}:80")),
        format!("p2 {}", p1.ip)
    );
}

#[test]
fn vxlan_fast_path() {
    if !require_root() {
        return;
    }
    fast_path_carries_pod_traffic_and_keeps_nat_working(Backend::Vxlan);
}

#[test]
fn host_gw_fast_path() {
    if !require_root() {
        return;
    }
    fast_path_carries_pod_traffic_and_keeps_nat_working(Backend::HostGw);
}
