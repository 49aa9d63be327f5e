//! host-gw backend on a real kernel: the same pod traffic as VXLAN, plain
//! routes via the peers' underlay addresses, no VXLAN device. Needs root.

mod common;

use common::*;
use ferry_overlay::node::{Backend, ANN_BACKEND_DATA, ANN_BACKEND_TYPE};
use ferry_testkit::require_root;

#[test]
fn host_gw_pod_traffic_without_vxlan_device() {
    if !require_root() {
        return;
    }
    let c = Cluster::new(3, Backend::HostGw).unwrap();
    for (i, n) in c.nodes.iter().enumerate() {
        let links = n.ns.ip(&["-d", "link"]).unwrap();
        assert!(!links.contains("vxlan"), "{links}");
        assert_eq!(n.agent().annotations[ANN_BACKEND_TYPE], "host-gw");
        assert_eq!(n.agent().annotations[ANN_BACKEND_DATA], "null");
        let r = n.ns.ip(&["route"]).unwrap();
        for j in 0..3 {
            if i != j {
                let want = format!(
                    "10.244.{}.0/24 via 198.18.0.{} dev eth0 proto 70",
                    j + 1,
                    j + 1
                );
                assert!(r.contains(&want), "{want} not in {r}");
            }
        }
        assert_eq!(n.agent().env.mtu, 1500);
    }
    let p1 = c.nodes[0].add_pod("p1").unwrap();
    let p2 = c.nodes[1].add_pod("p2").unwrap();
    let p3 = c.nodes[2].add_pod("p3").unwrap();
    let _s2 = p2.ns.serve_tcp("0.0.0.0:8080", "p2").unwrap();
    let _u2 = p2.ns.serve_udp("0.0.0.0:8081", "p2").unwrap();
    let _s1 = p1.ns.serve_tcp("0.0.0.0:8080", "p1").unwrap();
    let _u3 = p3.ns.serve_udp("0.0.0.0:8081", "p3").unwrap();
    assert_pod_to_pod(&p1, &p2, "p2");
    assert_eq!(
        tcp(&p3.ns, format!("{}:8080", p1.ip)),
        format!("p1 {}", p3.ip)
    );
    assert_eq!(
        udp(&p2.ns, format!("{}:8081", p3.ip)),
        format!("p3 {}", p2.ip)
    );
    // node -> remote pod: the node's own address (masquerade keeps it as is).
    assert_eq!(
        tcp(&c.nodes[0].ns, format!("{}:8080", p2.ip)),
        "p2 198.18.0.1"
    );

    // Removing a node removes its route; adding it back restores it.
    let without: Vec<_> = c
        .objects()
        .into_iter()
        .filter(|n| n.metadata.name.as_deref() != Some("node-3"))
        .collect();
    c.nodes[0].agent().reconcile(&without).unwrap();
    assert!(!c.nodes[0]
        .ns
        .ip(&["route"])
        .unwrap()
        .contains("10.244.3.0/24"));
    c.nodes[0].agent().reconcile(&c.objects()).unwrap();
    assert!(c.nodes[0]
        .ns
        .ip(&["route"])
        .unwrap()
        .contains("10.244.3.0/24 via 198.18.0.3"));
}

#[test]
fn switching_vxlan_to_host_gw_removes_the_device() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::new(2, Backend::Vxlan).unwrap();
    assert!(c.nodes[0].ns.ip(&["link", "show", "flannel.1"]).is_ok());
    for n in &mut c.nodes {
        n.backend = Backend::HostGw;
        n.restart_agent().unwrap();
    }
    c.reconcile_all().unwrap();
    for n in &c.nodes {
        assert!(n.ns.ip(&["link", "show", "flannel.1"]).is_err());
    }
    let r = c.nodes[0].ns.ip(&["route"]).unwrap();
    assert!(r.contains("10.244.2.0/24 via 198.18.0.2 dev eth0"), "{r}");
    let p1 = c.nodes[0].add_pod("p1").unwrap();
    let p2 = c.nodes[1].add_pod("p2").unwrap();
    let _s2 = p2.ns.serve_tcp("0.0.0.0:8080", "p2").unwrap();
    assert_eq!(
        tcp(&p1.ns, format!("{}:8080", p2.ip)),
        format!("p2 {}", p1.ip)
    );
}
