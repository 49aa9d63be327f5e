//! Namespaces the programming and datapath suites run in (all made with testkit and
//! removed when dropped):
//!
//! ```text
//!  client ns                 node ns (ferry proxy)                 backend ns
//!  eth0 198.18.0.2/24 ─── cli0 198.18.0.1/24    be0 198.18.128.1/24 ─── eth0 198.18.128.2/24
//!                            cp0 198.18.250.2/30                         (iperf3 -s, echo servers)
//!                              │
//!  cp ns: eth0 198.18.250.1/30 (ferry controlplane on :6443)
//! ```
//!
//! The client routes everything via the node; the node forwards. The client counts
//! as a pod for the proxy (`--cluster-cidr 198.18.0.0/16`), so ClusterIP traffic is
//! DNATed but not masqueraded, as pod-to-service traffic is; NodePort traffic
//! (externalTrafficPolicy Cluster) is masqueraded, as kube-proxy does.

use anyhow::Result;
use ferry_testkit::{veth, Netns};

pub const CP_IP: &str = "198.18.250.1";
pub const NODE_CP_IP: &str = "198.18.250.2";
pub const NODE_IP: &str = "198.18.0.1";
pub const CLIENT_IP: &str = "198.18.0.2";
pub const BACKEND_GW: &str = "198.18.128.1";
pub const BACKEND_IP: &str = "198.18.128.2";
pub const CLUSTER_CIDR: &str = "198.18.0.0/16";
pub const NODE_NAME: &str = "bench-node";
pub const SERVICE_CIDR: &str = "10.96.0.0/12";
/// Port the probe listener answers on in the node namespace.
pub const PROBE_PORT: u16 = 8080;

/// The `i`-th (1..=10) address of the node's probe endpoints.
pub fn probe_ip(i: usize) -> String {
    format!("198.18.251.{i}")
}

/// The control-plane namespace and the node namespace, linked by a veth.
pub struct Topology {
    pub cp: Netns,
    pub node: Netns,
    pub client: Option<Netns>,
    pub backend: Option<Netns>,
}

impl Topology {
    /// cp ns + node ns only (the programming suite).
    pub fn control_and_node() -> Result<Topology> {
        let cp = Netns::new("cp")?;
        let node = Netns::new("node")?;
        veth(
            &cp,
            "eth0",
            &format!("{CP_IP}/30"),
            &node,
            "cp0",
            &format!("{NODE_CP_IP}/30"),
        )?;
        // For the programming suite's traffic probe: service IPs route towards the
        // cp namespace (which drops them) until a DNAT rule sends them to one of
        // the probe addresses on the node's own loopback.
        node.add_route(SERVICE_CIDR, CP_IP)?;
        // ...where every service address is local (AnyIP) with nothing listening,
        // so a probe without a rule is refused at once instead of timing out.
        cp.ip(&["route", "add", "local", SERVICE_CIDR, "dev", "lo"])?;
        for i in 1..=10 {
            node.add_addr("lo", &format!("{}/32", probe_ip(i)))?;
        }
        Ok(Topology {
            cp,
            node,
            client: None,
            backend: None,
        })
    }

    /// Everything: cp, node, a client outside and a backend behind the node.
    pub fn full() -> Result<Topology> {
        let mut t = Topology::control_and_node()?;
        let client = Netns::new("client")?;
        let backend = Netns::new("backend")?;
        veth(
            &client,
            "eth0",
            &format!("{CLIENT_IP}/24"),
            &t.node,
            "cli0",
            &format!("{NODE_IP}/24"),
        )?;
        veth(
            &t.node,
            "be0",
            &format!("{BACKEND_GW}/24"),
            &backend,
            "eth0",
            &format!("{BACKEND_IP}/24"),
        )?;
        client.add_route("default", NODE_IP)?;
        backend.add_route("default", BACKEND_GW)?;
        t.node.sysctl("net.ipv4.ip_forward", "1")?;
        // Service IPs without rules are routed towards the client side (and so
        // rejected by the proxy's rules, never leaked).
        t.node.add_route("default", CLIENT_IP)?;
        tune_client(&client)?;
        t.client = Some(client);
        t.backend = Some(backend);
        Ok(t)
    }

    pub fn client(&self) -> &Netns {
        self.client.as_ref().expect("full topology")
    }

    pub fn backend(&self) -> &Netns {
        self.backend.as_ref().expect("full topology")
    }
}

/// Many short connections from one client: use the whole port range and reuse
/// TIME_WAIT ports, so connection-rate runs never starve.
pub fn tune_client(ns: &Netns) -> Result<()> {
    ns.sysctl("net.ipv4.ip_local_port_range", "1024 65000")?;
    ns.sysctl("net.ipv4.tcp_tw_reuse", "1")
}
