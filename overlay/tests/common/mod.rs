//! Test topology for the overlay: a fabric namespace holding the underlay
//! bridge, N node namespaces attached to it, pods as namespaces. Each node runs
//! a [`Reconciler`] on a thread inside its namespace, driven with Node objects
//! built here (the same call `ferry overlay` makes after each watch event).
#![allow(dead_code)] // each test binary uses its own subset

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use ferry_overlay::node::Backend;
use ferry_overlay::reconciler::ReconcileReport;
use ferry_overlay::subnet::SubnetEnv;
use ferry_overlay::{OverlayConfig, PodNetwork, PodNetworkConfig, Reconciler};
use ferry_testkit::Netns;
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{Node, NodeSpec};
use kube::api::ObjectMeta;

pub const CLUSTER: &str = "10.244.0.0/16";
pub const FABRIC_IP: &str = "198.18.0.254";

/// Timeout of each request the helpers below make.
pub const T: Duration = Duration::from_secs(3);

/// One TCP request from `from`: the answer, or the error as "ERR ...".
pub fn tcp(from: &Netns, addr: String) -> String {
    from.run(move || Ok(ferry_testkit::tcp_request(&addr, T)?))
        .unwrap_or_else(|e| format!("ERR {e:#}"))
}

/// One UDP request from `from`: the answer, or the error as "ERR ...".
pub fn udp(from: &Netns, addr: String) -> String {
    from.run(move || Ok(ferry_testkit::udp_request(&addr, T)?))
        .unwrap_or_else(|e| format!("ERR {e:#}"))
}

/// `to` serves TCP :8080 and UDP :8081 as `name`: both answer `from` and see its address.
pub fn assert_pod_to_pod(from: &Pod, to: &Pod, name: &str) {
    assert_eq!(
        tcp(&from.ns, format!("{}:8080", to.ip)),
        format!("{name} {}", from.ip)
    );
    assert_eq!(
        udp(&from.ns, format!("{}:8081", to.ip)),
        format!("{name} {}", from.ip)
    );
}

/// A statistics counter of `dev` in `ns`.
pub fn counter(ns: &Netns, dev: &str, what: &str) -> u64 {
    ns.exec(&["cat", &format!("/sys/class/net/{dev}/statistics/{what}")])
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

pub fn netns_path(ns: &Netns) -> PathBuf {
    PathBuf::from(format!("/var/run/netns/{}", ns.name()))
}

enum Cmd {
    Reconcile(Vec<Node>, mpsc::Sender<Result<ReconcileReport>>),
}

/// A reconciler running on a thread inside a node's namespace.
pub struct Agent {
    tx: Option<mpsc::Sender<Cmd>>,
    handle: Option<JoinHandle<()>>,
    pub annotations: BTreeMap<String, String>,
    pub env: SubnetEnv,
}

impl Agent {
    pub fn start(ns: &Netns, cfg: OverlayConfig) -> Result<Agent> {
        let path = netns_path(ns);
        let (tx, rx) = mpsc::channel::<Cmd>();
        let (init_tx, init_rx) = mpsc::channel();
        let handle = std::thread::spawn(move || {
            let setup = || -> Result<(tokio::runtime::Runtime, Reconciler)> {
                ferry_overlay::netns::enter(&path)?;
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                let rec = rt.block_on(Reconciler::new(cfg))?;
                Ok((rt, rec))
            };
            let (rt, mut rec) = match setup() {
                Ok(v) => v,
                Err(e) => {
                    let _ = init_tx.send(Err(e));
                    return;
                }
            };
            let _ = init_tx.send(Ok((rec.annotations(), rec.subnet_env())));
            while let Ok(cmd) = rx.recv() {
                match cmd {
                    Cmd::Reconcile(nodes, reply) => {
                        let _ = reply.send(rt.block_on(rec.reconcile(&nodes)));
                    }
                }
            }
        });
        let (annotations, env) = init_rx
            .recv_timeout(Duration::from_secs(20))
            .context("agent did not start")??;
        Ok(Agent {
            tx: Some(tx),
            handle: Some(handle),
            annotations,
            env,
        })
    }

    pub fn reconcile(&self, nodes: &[Node]) -> Result<ReconcileReport> {
        let (tx, rx) = mpsc::channel();
        self.tx
            .as_ref()
            .expect("running")
            .send(Cmd::Reconcile(nodes.to_vec(), tx))
            .map_err(|_| anyhow!("agent thread gone"))?;
        rx.recv_timeout(Duration::from_secs(20))
            .context("reconcile timed out")?
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

pub fn node_object(name: &str, cidr: &str, annotations: BTreeMap<String, String>) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            annotations: Some(annotations),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            pod_cidr: Some(cidr.into()),
            pod_cidrs: Some(vec![cidr.into()]),
            ..Default::default()
        }),
        status: None,
    }
}

pub struct TestNode {
    pub name: String,
    pub ns: Netns,
    pub ip: Ipv4Addr,
    pub subnet: Ipv4Net,
    pub dir: tempfile::TempDir,
    pub agent: Option<Agent>,
    pub backend: Backend,
}

impl TestNode {
    pub fn config(&self) -> OverlayConfig {
        let mut cfg = OverlayConfig::new(&self.name, CLUSTER.parse().unwrap(), self.subnet);
        cfg.backend = self.backend;
        cfg.iface = Some("eth0".into());
        cfg.subnet_file = self.dir.path().join("subnet.env");
        cfg
    }

    pub fn object(&self) -> Node {
        let a = self.agent.as_ref().expect("agent running");
        node_object(&self.name, &self.subnet.to_string(), a.annotations.clone())
    }

    pub fn agent(&self) -> &Agent {
        self.agent.as_ref().expect("agent running")
    }

    /// Stops and starts this node's reconciler (as a restart of `ferry overlay`).
    pub fn restart_agent(&mut self) -> Result<()> {
        self.agent = None;
        self.agent = Some(Agent::start(&self.ns, self.config())?);
        Ok(())
    }

    pub fn pod_network(&self) -> PodNetwork {
        PodNetwork::new(PodNetworkConfig {
            bridge: "cni0".into(),
            env: self.agent().env.clone(),
            ipam_dir: self.dir.path().join("ipam/ferry"),
        })
    }

    /// Creates a pod namespace connected with [`PodNetwork::add`] (run inside the node).
    pub fn add_pod(&self, tag: &str) -> Result<Pod> {
        let ns = Netns::new(tag)?;
        let pn = self.pod_network();
        let path = netns_path(&ns);
        let id = format!("pod-{}", ns.name());
        let id2 = id.clone();
        let addr = self.ns.run(move || pn.add(&path, &id2, "eth0"))?;
        Ok(Pod {
            ns,
            ip: addr.address.addr(),
            id,
        })
    }
}

impl Drop for TestNode {
    /// The fast path's pins live in bpffs, outside the node's namespace.
    fn drop(&mut self) {
        self.agent = None;
        let _ = std::fs::remove_dir_all(self.config().fastpath_dir());
    }
}

pub struct Pod {
    pub ns: Netns,
    pub ip: Ipv4Addr,
    pub id: String,
}

/// The fabric and its nodes.
pub struct Cluster {
    pub nodes: Vec<TestNode>,
    pub fabric: Netns,
}

impl Cluster {
    /// `n` nodes `node-1..n` on 198.18.0.0/24, podCIDRs 10.244.i.0/24, agents started.
    pub fn new(n: usize, backend: Backend) -> Result<Cluster> {
        let mut c = Cluster::topology(n, backend)?;
        for node in &mut c.nodes {
            node.agent = Some(Agent::start(&node.ns, node.config())?);
        }
        c.reconcile_all()?;
        Ok(c)
    }

    /// The namespaces and links only, no agents.
    pub fn topology(n: usize, backend: Backend) -> Result<Cluster> {
        let (fabric, namespaces) = ferry_testkit::underlay("", u8::try_from(n)?)?;
        fabric.add_addr("br0", &format!("{FABRIC_IP}/24"))?;
        let mut nodes = Vec::new();
        for (i, ns) in (1..=n).zip(namespaces) {
            nodes.push(TestNode {
                name: format!("node-{i}"),
                ns,
                ip: ferry_testkit::underlay_ip(u8::try_from(i)?),
                subnet: format!("10.244.{i}.0/24").parse()?,
                dir: tempfile::tempdir()?,
                agent: None,
                backend,
            });
        }
        Ok(Cluster { nodes, fabric })
    }

    pub fn objects(&self) -> Vec<Node> {
        self.nodes
            .iter()
            .filter(|n| n.agent.is_some())
            .map(|n| n.object())
            .collect()
    }

    pub fn reconcile_all(&self) -> Result<()> {
        let objs = self.objects();
        for n in &self.nodes {
            if let Some(a) = &n.agent {
                let rep = a.reconcile(&objs)?;
                anyhow::ensure!(rep.errors.is_empty(), "{}: {:?}", n.name, rep.errors);
                anyhow::ensure!(rep.skipped.is_empty(), "{}: {:?}", n.name, rep.skipped);
            }
        }
        Ok(())
    }
}

/// Runs `f` inside `ns` (on a helper thread).
pub fn in_ns<R: Send + 'static>(
    ns: &Netns,
    f: impl FnOnce() -> Result<R> + Send + 'static,
) -> Result<R> {
    ns.run(f)
}

/// Contents of `ip -n NS <args>` (for snapshots of routes / neighbours / FDB).
pub fn ip_show(ns: &Netns, args: &[&str]) -> String {
    ns.ip(args).unwrap_or_default()
}

pub fn bridge_fdb(ns: &Netns, dev: &str) -> String {
    ns.exec(&["bridge", "fdb", "show", "dev", dev])
        .unwrap_or_default()
}

/// An AF_PACKET capture on one interface of the calling thread's namespace.
pub struct Capture {
    fd: i32,
}

impl Capture {
    pub fn open(ifname: &str) -> Result<Capture> {
        let proto = (libc::ETH_P_ALL as u16).to_be() as i32;
        // SAFETY: plain socket(2).
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        let cname = std::ffi::CString::new(ifname)?;
        // SAFETY: valid C string.
        let idx = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        if idx == 0 {
            unsafe { libc::close(fd) };
            return Err(anyhow!("no interface {ifname}"));
        }
        // SAFETY: zeroed sockaddr_ll is valid; we fill the fields bind needs.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto as u16;
        sll.sll_ifindex = idx as i32;
        let rc = unsafe {
            libc::bind(
                fd,
                &sll as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            unsafe { libc::close(fd) };
            return Err(e.into());
        }
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        // SAFETY: setsockopt with a timeval of the right size.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        Ok(Capture { fd })
    }

    /// Reads frames until `deadline` passes or `max` frames are read.
    pub fn read(&self, limit: Duration, max: usize) -> Vec<Vec<u8>> {
        let start = std::time::Instant::now();
        let mut out = Vec::new();
        let mut buf = vec![0u8; 65536];
        while start.elapsed() < limit && out.len() < max {
            // SAFETY: reading into a buffer we own.
            let n =
                unsafe { libc::recv(self.fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
            if n > 0 {
                out.push(buf[..n as usize].to_vec());
            }
        }
        out
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        // SAFETY: closing our own fd.
        unsafe { libc::close(self.fd) };
    }
}

/// A VXLAN packet decoded from an underlay frame.
#[derive(Debug, Clone)]
pub struct VxlanPacket {
    pub outer_src: Ipv4Addr,
    pub outer_dst: Ipv4Addr,
    pub udp_dst: u16,
    pub udp_checksum: u16,
    pub udp_checksum_ok: bool,
    pub vni: u32,
    pub inner_src: Ipv4Addr,
    pub inner_dst: Ipv4Addr,
    pub inner_proto: u8,
    pub inner_payload: Vec<u8>,
    /// Inner UDP checksum verified (None: not UDP).
    pub inner_udp_checksum_ok: Option<bool>,
}

/// Decodes Ethernet/IPv4/UDP/VXLAN/Ethernet/IPv4 with etherparse.
pub fn decode_vxlan(frame: &[u8]) -> Option<VxlanPacket> {
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};
    let outer = SlicedPacket::from_ethernet(frame).ok()?;
    let Some(NetSlice::Ipv4(ip)) = &outer.net else {
        return None;
    };
    let Some(TransportSlice::Udp(udp)) = &outer.transport else {
        return None;
    };
    let payload = udp.payload();
    if payload.len() < 8 || payload[0] & 0x08 == 0 {
        return None;
    }
    let vni = u32::from_be_bytes([0, payload[4], payload[5], payload[6]]);
    let hdr = ip.header();
    let udp_hdr = udp.to_header();
    let checksum_ok = udp_hdr.checksum == 0
        || udp_hdr
            .calc_checksum_ipv4(&hdr.to_header(), payload)
            .map(|c| c == udp_hdr.checksum)
            .unwrap_or(false);
    let inner = SlicedPacket::from_ethernet(&payload[8..]).ok()?;
    let Some(NetSlice::Ipv4(iip)) = &inner.net else {
        return None;
    };
    let ih = iip.header();
    let inner_udp_checksum_ok = match &inner.transport {
        Some(TransportSlice::Udp(u)) => {
            let h = u.to_header();
            Some(
                h.checksum != 0
                    && h.calc_checksum_ipv4(&ih.to_header(), u.payload())
                        .map(|c| c == h.checksum)
                        .unwrap_or(false),
            )
        }
        _ => None,
    };
    Some(VxlanPacket {
        inner_udp_checksum_ok,
        outer_src: hdr.source_addr(),
        outer_dst: hdr.destination_addr(),
        udp_dst: udp_hdr.destination_port,
        udp_checksum: udp_hdr.checksum,
        udp_checksum_ok: checksum_ok,
        vni,
        inner_src: ih.source_addr(),
        inner_dst: ih.destination_addr(),
        inner_proto: ih.protocol().0,
        inner_payload: iip.payload().payload.to_vec(),
    })
}

pub fn path_str(p: &Path) -> String {
    p.display().to_string()
}
