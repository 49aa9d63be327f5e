//! VXLAN overlay on a real kernel: 3 node namespaces on an underlay bridge in
//! a fabric namespace, pods as namespaces. Needs root.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use ferry_overlay::netlink::ethtool;
use ferry_overlay::node::{Backend, ANN_BACKEND_DATA, ANN_BACKEND_TYPE, ANN_PUBLIC_IP};
use ferry_overlay::reconciler::vxlan_nat_checksum_fixed;
use ferry_testkit::{require_root, wait_for};

#[test]
fn vxlan_device_annotations_and_pod_traffic() {
    if !require_root() {
        return;
    }
    let c = Cluster::new(3, Backend::Vxlan).unwrap();
    // Device: flannel.1, VNI 1, port 8472, learning off, MTU 1500-50, address = network/32.
    for (i, n) in c.nodes.iter().enumerate() {
        let d = n.ns.ip(&["-d", "link", "show", "flannel.1"]).unwrap();
        assert!(d.contains("mtu 1450"), "{d}");
        assert!(d.contains("vxlan id 1 "), "{d}");
        assert!(d.contains("dstport 8472"), "{d}");
        assert!(d.contains("nolearning"), "{d}");
        let a = n.ns.ip(&["-4", "addr", "show", "flannel.1"]).unwrap();
        assert!(a.contains(&format!("inet 10.244.{}.0/32", i + 1)), "{a}");
        let ann = &n.agent().annotations;
        assert_eq!(ann[ANN_BACKEND_TYPE], "vxlan");
        assert_eq!(ann[ANN_PUBLIC_IP], n.ip.to_string());
        let data: serde_json::Value = serde_json::from_str(&ann[ANN_BACKEND_DATA]).unwrap();
        assert_eq!(data["VNI"], 1);
        let mac = data["VtepMAC"].as_str().unwrap();
        assert!(d.contains(&format!("link/ether {mac}")), "{mac} vs {d}");
        let env = std::fs::read_to_string(n.dir.path().join("subnet.env")).unwrap();
        assert_eq!(
            env,
            format!(
                "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.{}.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\nFERRY_FASTPATH_DIR={}\n",
                i + 1,
                n.config().fastpath_dir().display()
            )
        );
        // Per remote node: permanent neighbour, FDB entry, onlink route.
        for (j, m) in c.nodes.iter().enumerate() {
            if i == j {
                continue;
            }
            let rmac =
                serde_json::from_str::<serde_json::Value>(&m.agent().annotations[ANN_BACKEND_DATA])
                    .unwrap()["VtepMAC"]
                    .as_str()
                    .unwrap()
                    .to_string();
            let r = ip_show(&n.ns, &["route"]);
            assert!(
                r.contains(&format!(
                    "10.244.{}.0/24 via 10.244.{}.0 dev flannel.1",
                    j + 1,
                    j + 1
                )) && r.contains("onlink"),
                "{r}"
            );
            let ne = ip_show(&n.ns, &["neigh", "show", "dev", "flannel.1"]);
            assert!(
                ne.contains(&format!("10.244.{}.0 lladdr {rmac} PERMANENT", j + 1)),
                "{ne}"
            );
            let f = bridge_fdb(&n.ns, "flannel.1");
            assert!(
                f.contains(&format!("{rmac} dst {} self permanent", m.ip)),
                "{f}"
            );
        }
    }

    let p1 = c.nodes[0].add_pod("p1").unwrap();
    let p2 = c.nodes[1].add_pod("p2").unwrap();
    let p3 = c.nodes[2].add_pod("p3").unwrap();
    assert!(p1
        .ns
        .ip(&["link", "show", "eth0"])
        .unwrap()
        .contains("mtu 1450"));
    let _s2 = p2.ns.serve_tcp("0.0.0.0:8080", "p2").unwrap();
    let _u2 = p2.ns.serve_udp("0.0.0.0:8081", "p2").unwrap();
    let _s1 = p1.ns.serve_tcp("0.0.0.0:8080", "p1").unwrap();
    let _u3 = p3.ns.serve_udp("0.0.0.0:8081", "p3").unwrap();

    // pod <-> pod across nodes, TCP and UDP, source addresses preserved.
    assert_pod_to_pod(&p1, &p2, "p2");
    assert_eq!(
        tcp(&p3.ns, format!("{}:8080", p1.ip)),
        format!("p1 {}", p3.ip)
    );
    assert_eq!(
        udp(&p1.ns, format!("{}:8081", p3.ip)),
        format!("p3 {}", p1.ip)
    );
    // node -> remote pod (source: the node's flannel.1 address).
    assert_eq!(
        tcp(&c.nodes[0].ns, format!("{}:8080", p2.ip)),
        "p2 10.244.1.0"
    );
    assert_eq!(
        tcp(&c.nodes[2].ns, format!("{}:8080", p1.ip)),
        "p1 10.244.3.0"
    );
    // pod -> another node: leaves the cluster CIDR, so masqueraded to node-1's address.
    let _n2 = c.nodes[1]
        .ns
        .serve_tcp("198.18.0.2:9090", "node-2")
        .unwrap();
    assert_eq!(tcp(&p1.ns, "198.18.0.2:9090".into()), "node-2 198.18.0.1");
    // pod -> outside the cluster (the fabric): masqueraded too.
    let _f = c
        .fabric
        .serve_tcp(&format!("{FABRIC_IP}:9090"), "fabric")
        .unwrap();
    assert_eq!(
        tcp(&p3.ns, format!("{FABRIC_IP}:9090")),
        "fabric 198.18.0.3"
    );
}

#[test]
fn vxlan_underlay_capture_and_16mib_transfer() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::new(2, Backend::Vxlan).unwrap();
    let p1 = c.nodes[0].add_pod("p1").unwrap();
    let p2 = c.nodes[1].add_pod("p2").unwrap();
    let _u2 = p2.ns.serve_udp("0.0.0.0:8081", "p2").unwrap();

    // flannel.1 keeps TX checksum offload exactly when the kernel has the fix for
    // the NAT checksum bug flannel turns it off against.
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let offload = c.nodes[0]
        .ns
        .run(|| Ok(ethtool::tx_checksum("flannel.1")?))
        .unwrap();
    assert_eq!(offload, vxlan_nat_checksum_fixed(&release), "{release}");
    // The underlay as a NIC without checksum offload: the kernel completes every
    // checksum before a frame leaves, so the capture sees the bytes a wire carries
    // (a veth with offload would pass inner checksums still partial, for the
    // receiving kernel to trust).
    for n in &c.nodes {
        n.ns.run(|| Ok(ethtool::set_tx_checksum("eth0", false)?))
            .unwrap();
    }
    // The pods' 3 requests are encapsulated in BPF (the fast path), not by
    // flannel.1 (which may send a packet of its own, IPv6 link-local).
    let vxlan_tx = || counter(&c.nodes[0].ns, "flannel.1", "tx_packets");
    let before = vxlan_tx();
    check_vxlan_checksums(&c, &p1, &p2);
    let sent = vxlan_tx() - before;
    assert!(sent < 3, "{sent} packets went through flannel.1");
    // 16 MiB over TCP at the overlay MTU, verified by length and hash.
    const SIZE: usize = 16 << 20;
    let (tx, rx) = mpsc::channel();
    let server = p2.ns.spawn_thread(move || {
        let l = TcpListener::bind("0.0.0.0:7000")?;
        tx.send(()).ok();
        let (mut s, _) = l.accept()?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let (mut n, mut h) = (0usize, 0xcbf29ce484222325u64);
        let mut buf = vec![0u8; 65536];
        loop {
            let k = s.read(&mut buf)?;
            if k == 0 {
                break;
            }
            for &b in &buf[..k] {
                h = (h ^ b as u64).wrapping_mul(0x100000001b3);
            }
            n += k;
        }
        s.write_all(format!("{n} {h:x}\n").as_bytes())?;
        Ok(())
    });
    rx.recv_timeout(Duration::from_secs(5)).unwrap();
    let dst = format!("{}:7000", p2.ip);
    let started = Instant::now();
    let (sent_hash, reply) = p1
        .ns
        .run(move || {
            let mut x = 0x9e3779b97f4a7c15u64;
            let data: Vec<u8> = (0..SIZE)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let h = data.iter().fold(0xcbf29ce484222325u64, |h, &b| {
                (h ^ b as u64).wrapping_mul(0x100000001b3)
            });
            let mut s = TcpStream::connect_timeout(&dst.parse()?, T)?;
            s.set_write_timeout(Some(Duration::from_secs(30)))?;
            s.set_read_timeout(Some(Duration::from_secs(30)))?;
            s.write_all(&data)?;
            s.shutdown(std::net::Shutdown::Write)?;
            let mut line = String::new();
            BufReader::new(s).read_line(&mut line)?;
            Ok((h, line.trim().to_string()))
        })
        .unwrap();
    server.join().unwrap().unwrap();
    assert_eq!(reply, format!("{SIZE} {sent_hash:x}"));
    eprintln!("16 MiB pod->pod over VXLAN in {:?}", started.elapsed());
    // The pod MTU is the overlay MTU: a full-size DF datagram passes, a larger one is refused.
    let dst = format!("{}:8081", p2.ip);
    p1.ns
        .run(move || {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            let on: libc::c_int = libc::IP_PMTUDISC_DO;
            // SAFETY: setsockopt(IP_MTU_DISCOVER) with an int.
            unsafe {
                libc::setsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(&s),
                    libc::IPPROTO_IP,
                    libc::IP_MTU_DISCOVER,
                    &on as *const _ as *const libc::c_void,
                    4,
                )
            };
            s.connect(&dst)?;
            s.set_read_timeout(Some(T))?;
            s.send(&vec![7u8; 1450 - 28])?;
            let mut b = [0u8; 100];
            s.recv(&mut b)?;
            assert!(
                s.send(&vec![7u8; 1450 - 27]).is_err(),
                "larger than the MTU"
            );
            Ok(())
        })
        .unwrap();

    // Everything above crossed the fast path, encapsulated in BPF. Now node-1
    // without it: its packets take flannel.1 and the stack, as with flannel.
    let mut cfg = c.nodes[0].config();
    cfg.fast_path = false;
    c.nodes[0].agent = None;
    c.nodes[0].agent = Some(Agent::start(&c.nodes[0].ns, cfg).unwrap());
    // A masquerade of the encapsulated packets with random ports, as
    // kube-proxy's KUBE-POSTROUTING does for marked traffic. ferry does not
    // track VXLAN packets, so NAT never sees them.
    c.nodes[0]
        .ns
        .exec(&[
            "nft",
            "add table ip test_masq; add chain ip test_masq post { type nat hook postrouting priority srcnat; }; add rule ip test_masq post udp dport 8472 counter masquerade random,fully-random",
        ])
        .unwrap();
    let masqueraded = || {
        let rule = c.nodes[0]
            .ns
            .exec(&["nft", "list", "chain", "ip", "test_masq", "post"])
            .unwrap();
        !rule.contains("counter packets 0 ")
    };
    check_vxlan_checksums(&c, &p1, &p2);
    assert!(!masqueraded(), "VXLAN packets were tracked and NATed");
    // flannel's bug case (flannel-io/flannel#1279), with the packets tracked as
    // flannel leaves them: NAT rewrites the outer UDP header; its zero
    // checksum must stay zero (a corrupted one makes the receiver drop the packet).
    c.nodes[0]
        .ns
        .exec(&["nft", "delete chain ip ferry_overlay vxlan_out"])
        .unwrap();
    check_vxlan_checksums(&c, &p1, &p2);
    assert!(masqueraded(), "not masqueraded");
}

/// Captures on node-1's port of the underlay bridge while pod 1 sends UDP to
/// pod 2 and back, and checks the VXLAN frames: VNI 1, port 8472, node
/// addresses outside; outer UDP checksum zero (udpcsum off: valid for IPv4 per
/// RFC 7348) or valid; inner UDP checksums complete and valid.
fn check_vxlan_checksums(c: &Cluster, p1: &Pod, p2: &Pod) {
    let (ready_tx, ready_rx) = mpsc::channel();
    let cap = c.fabric.spawn_thread(move || {
        let cap = Capture::open("p1")?;
        ready_tx.send(()).ok();
        Ok(cap.read(Duration::from_secs(3), 200))
    });
    ready_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    for _ in 0..3 {
        assert_eq!(
            udp(&p1.ns, format!("{}:8081", p2.ip)),
            format!("p2 {}", p1.ip)
        );
    }
    let frames = cap.join().unwrap().unwrap();
    let vx: Vec<VxlanPacket> = frames.iter().filter_map(|f| decode_vxlan(f)).collect();
    let req = vx
        .iter()
        .find(|p| p.inner_src == p1.ip && p.inner_dst == p2.ip && p.inner_proto == 17)
        .unwrap_or_else(|| {
            panic!(
                "no VXLAN packet pod1->pod2 among {} frames: {vx:?}",
                frames.len()
            )
        });
    assert_eq!(req.udp_dst, 8472);
    assert_eq!(req.vni, 1);
    assert_eq!(req.outer_src.to_string(), "198.18.0.1");
    assert_eq!(req.outer_dst.to_string(), "198.18.0.2");
    let reply = vx
        .iter()
        .find(|p| p.inner_src == p2.ip && p.inner_dst == p1.ip)
        .expect("VXLAN reply pod2->pod1");
    assert_eq!((reply.vni, reply.udp_dst), (1, 8472));
    for p in &vx {
        assert!(
            p.udp_checksum_ok,
            "bad outer UDP checksum {:#x}: {p:?}",
            p.udp_checksum
        );
        assert_eq!(
            p.inner_udp_checksum_ok,
            Some(true),
            "inner UDP checksum: {p:?}"
        );
    }
}

fn entries(n: &TestNode) -> (String, String, String) {
    (
        ip_show(&n.ns, &["route", "show", "dev", "flannel.1"]),
        ip_show(&n.ns, &["neigh", "show", "dev", "flannel.1"]),
        bridge_fdb(&n.ns, "flannel.1"),
    )
}

#[test]
fn node_removed_and_added_and_bad_nodes_skipped() {
    if !require_root() {
        return;
    }
    let c = Cluster::new(3, Backend::Vxlan).unwrap();
    let all = c.objects();
    let n3_mac = serde_json::from_str::<serde_json::Value>(
        &c.nodes[2].agent().annotations[ANN_BACKEND_DATA],
    )
    .unwrap()["VtepMAC"]
        .as_str()
        .unwrap()
        .to_string();
    let has_n3 = |n: &TestNode| {
        let (r, ne, f) = entries(n);
        (
            r.contains("10.244.3.0/24"),
            ne.contains("10.244.3.0 "),
            f.contains(&n3_mac),
        )
    };
    assert_eq!(has_n3(&c.nodes[0]), (true, true, true));

    // node-3 removed: its entries disappear from node-1 and node-2 within 1 s.
    let without: Vec<_> = all
        .iter()
        .filter(|n| n.metadata.name.as_deref() != Some("node-3"))
        .cloned()
        .collect();
    let t = Instant::now();
    for n in &c.nodes[..2] {
        n.agent().reconcile(&without).unwrap();
    }
    for n in &c.nodes[..2] {
        wait_for(Duration::from_secs(1), || {
            (has_n3(n) == (false, false, false)).then_some(())
        })
        .unwrap_or_else(|| panic!("{} still has node-3: {:?}", n.name, entries(n)));
    }
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());

    // Added back (with malformed and overlapping nodes beside it): entries appear
    // within 1 s, and the bad nodes break nothing.
    let mut with_bad = all.clone();
    let mut bad = node_object("node-9", "10.244.9.0/24", Default::default());
    bad.metadata.annotations.as_mut().unwrap().insert(
        ANN_BACKEND_DATA.into(),
        "{\"VNI\":1,\"VtepMAC\":\"zz\"}".into(),
    );
    bad.metadata
        .annotations
        .as_mut()
        .unwrap()
        .insert(ANN_PUBLIC_IP.into(), "198.18.0.9".into());
    with_bad.push(bad);
    let mut overlap = c.nodes[1].object();
    overlap.metadata.name = Some("node-8".into());
    overlap.spec.as_mut().unwrap().pod_cidr = Some("10.244.2.128/25".into());
    overlap.spec.as_mut().unwrap().pod_cidrs = None;
    with_bad.push(overlap);
    let mut nocidr = node_object("node-7", "x", Default::default());
    nocidr.spec = None;
    with_bad.push(nocidr);
    let t = Instant::now();
    for n in &c.nodes[..2] {
        let rep = n.agent().reconcile(&with_bad).unwrap();
        assert!(rep.errors.is_empty(), "{:?}", rep.errors);
        let names: Vec<_> = rep.skipped.iter().map(|s| s.name.as_str()).collect();
        assert!(
            names.contains(&"node-9") && names.contains(&"node-8") && names.contains(&"node-7"),
            "{names:?}"
        );
    }
    for n in &c.nodes[..2] {
        wait_for(Duration::from_secs(1), || {
            (has_n3(n) == (true, true, true)).then_some(())
        })
        .unwrap_or_else(|| panic!("{} lacks node-3: {:?}", n.name, entries(n)));
    }
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    let p1 = c.nodes[0].add_pod("p1").unwrap();
    let p3 = c.nodes[2].add_pod("p3").unwrap();
    let p2 = c.nodes[1].add_pod("p2").unwrap();
    let _s = p3.ns.serve_tcp("0.0.0.0:8080", "p3").unwrap();
    let _s2 = p2.ns.serve_tcp("0.0.0.0:8080", "p2").unwrap();
    assert_eq!(
        tcp(&p1.ns, format!("{}:8080", p3.ip)),
        format!("p3 {}", p1.ip)
    );
    assert_eq!(
        tcp(&p1.ns, format!("{}:8080", p2.ip)),
        format!("p2 {}", p1.ip)
    );
}

#[test]
fn restart_keeps_connections_and_removes_strays() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::new(2, Backend::Vxlan).unwrap();
    let p1 = c.nodes[0].add_pod("p1").unwrap();
    let p2 = c.nodes[1].add_pod("p2").unwrap();
    // Echo server in pod 2.
    let (tx, rx) = mpsc::channel();
    let _server = p2.ns.spawn_thread(move || {
        let l = TcpListener::bind("0.0.0.0:7001")?;
        tx.send(()).ok();
        let (s, _) = l.accept()?;
        let mut w = s.try_clone()?;
        for line in BufReader::new(s).lines() {
            w.write_all(format!("{}\n", line?).as_bytes())?;
        }
        Ok(())
    });
    rx.recv_timeout(Duration::from_secs(5)).unwrap();
    // Client in pod 1: one connection, a round trip every 10 ms for 3 s.
    let dst = format!("{}:7001", p2.ip);
    let (started_tx, started_rx) = mpsc::channel();
    let client = p1.ns.spawn_thread(move || {
        let s = TcpStream::connect_timeout(&dst.parse()?, T)?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut w = s.try_clone()?;
        let mut r = BufReader::new(s);
        let t = Instant::now();
        let mut n = 0u32;
        while t.elapsed() < Duration::from_secs(3) {
            w.write_all(format!("{n}\n").as_bytes())?;
            let mut line = String::new();
            r.read_line(&mut line)?;
            anyhow::ensure!(line.trim() == n.to_string(), "echo {line:?} for {n}");
            if n == 5 {
                started_tx.send(()).ok();
            }
            n += 1;
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(n)
    });
    started_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("connection up");
    let before: Vec<_> = c.nodes.iter().map(entries).collect();
    let macs: Vec<_> = c
        .nodes
        .iter()
        .map(|n| n.agent().annotations[ANN_BACKEND_DATA].clone())
        .collect();
    for _ in 0..3 {
        for i in 0..2 {
            c.nodes[i].restart_agent().unwrap();
        }
        c.reconcile_all().unwrap();
    }
    let objs = c.objects();
    for n in &c.nodes {
        let rep = n.agent().reconcile(&objs).unwrap();
        assert!(
            rep.changes.is_empty(),
            "a steady-state reconcile changed {:?}",
            rep.changes
        );
    }
    let after: Vec<_> = c.nodes.iter().map(entries).collect();
    assert_eq!(before, after, "a restart changed the kernel state");
    let macs2: Vec<_> = c
        .nodes
        .iter()
        .map(|n| n.agent().annotations[ANN_BACKEND_DATA].clone())
        .collect();
    assert_eq!(macs, macs2, "VTEP MAC changed across restart");
    let rounds = client.join().unwrap().unwrap();
    assert!(rounds > 50, "only {rounds} round trips");

    // Stray entries in ferry's device are removed by the next reconcile; others stay.
    let n1 = &c.nodes[0];
    n1.ns
        .ip(&[
            "route",
            "add",
            "10.244.77.0/24",
            "via",
            "10.244.77.0",
            "dev",
            "flannel.1",
            "onlink",
        ])
        .unwrap();
    n1.ns
        .ip(&[
            "neigh",
            "add",
            "10.244.77.0",
            "lladdr",
            "02:77:77:77:77:77",
            "dev",
            "flannel.1",
            "nud",
            "permanent",
        ])
        .unwrap();
    n1.ns
        .exec(&[
            "bridge",
            "fdb",
            "add",
            "02:77:77:77:77:77",
            "dev",
            "flannel.1",
            "dst",
            "198.18.0.77",
            "self",
            "permanent",
        ])
        .unwrap();
    n1.ns
        .ip(&[
            "route",
            "add",
            "10.99.0.0/24",
            "via",
            "198.18.0.99",
            "dev",
            "eth0",
        ])
        .unwrap();
    let rep = n1.agent().reconcile(&c.objects()).unwrap();
    assert_eq!(rep.removed, 3, "{rep:?}");
    assert_eq!(entries(n1), before[0]);
    assert!(
        ip_show(&n1.ns, &["route"]).contains("10.99.0.0/24 via 198.18.0.99"),
        "foreign route kept"
    );
}
