//! The node-side reconciler: sets up this node's device(s), writes subnet.env,
//! installs masquerade rules, and makes routes / neighbours / FDB entries
//! match the current Node set. `ferry overlay` calls [`Reconciler::reconcile`]
//! after every watch event and periodically; tests call it with Nodes they build.
//! Every step is idempotent: a restarted reconciler changes nothing that is right.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Node;
use rtnetlink::packet_route::AddressFamily;

use ferry_ebpf::pod_fastpath::{FastPath, FastPathConfig, Vtep};

use crate::desired::{self, Desired, FdbSpec, NeighSpec, RouteSpec};
use crate::netlink::{Link, Netlink, FERRY_RT_PROTO};
use crate::node::{self, Backend, Mac, Skipped, VxlanBackendData};
use crate::subnet::SubnetEnv;
use rtnetlink::packet_route::route::RouteProtocol;

/// Everything the reconciler needs besides the Node set.
#[derive(Clone, Debug)]
pub struct OverlayConfig {
    pub node_name: String,
    pub backend: Backend,
    /// VXLAN: plain routes to peers on the same L2 segment.
    pub direct_routing: bool,
    pub vxlan_device: String,
    pub vni: u32,
    pub vxlan_port: u16,
    /// Underlay interface; default: the interface of the default route.
    pub iface: Option<String>,
    /// Address published as public-ip; default: the underlay's first IPv4 address.
    pub public_ip: Option<Ipv4Addr>,
    pub cluster_cidr: Ipv4Net,
    /// This node's pod subnet (its podCIDR).
    pub subnet: Ipv4Net,
    pub subnet_file: PathBuf,
    pub ip_masq: bool,
    /// Pod MTU override; default: underlay − 50 (VXLAN) or underlay (host-gw).
    pub mtu: Option<u32>,
    /// Set net.ipv4.ip_forward=1.
    pub enable_forwarding: bool,
    /// Keep TX checksum offload on the VXLAN device. Off makes the kernel
    /// checksum and segment every inner packet before encapsulation (about 5×
    /// less pod-to-pod TCP throughput on veths); flannel turns it off against a
    /// kernel bug fixed in Linux 5.7. Default: on from 5.7 (see
    /// [`vxlan_nat_checksum_fixed`]), off before.
    pub vxlan_tx_checksum_offload: bool,
    /// Cross-node pod-to-pod TCP/UDP skips the node's IP stack (eBPF, see
    /// [`ferry_ebpf::pod_fastpath`]); off: every packet takes the stack, as flannel's.
    pub fast_path: bool,
    /// The fast path's bpffs directory; default [`default_fastpath_dir`].
    pub fastpath_dir: Option<PathBuf>,
}

impl OverlayConfig {
    /// Defaults as flannel's: vxlan, flannel.1, VNI 1, port 8472, ipmasq on.
    pub fn new(node_name: &str, cluster_cidr: Ipv4Net, subnet: Ipv4Net) -> OverlayConfig {
        OverlayConfig {
            node_name: node_name.to_string(),
            backend: Backend::Vxlan,
            direct_routing: false,
            vxlan_device: "flannel.1".into(),
            vni: 1,
            vxlan_port: 8472,
            iface: None,
            public_ip: None,
            cluster_cidr,
            subnet,
            subnet_file: crate::subnet::DEFAULT_SUBNET_FILE.into(),
            ip_masq: true,
            mtu: None,
            enable_forwarding: true,
            vxlan_tx_checksum_offload: vxlan_nat_checksum_fixed(
                &std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default(),
            ),
            fast_path: true,
            fastpath_dir: None,
        }
    }

    pub fn fastpath_dir(&self) -> PathBuf {
        self.fastpath_dir
            .clone()
            .unwrap_or_else(|| default_fastpath_dir(&self.subnet_file))
    }
}

/// One bpffs directory per node: `/sys/fs/bpf/ferry/overlay` for the default
/// subnet file, else one named after the subnet file, so that several nodes on
/// one machine (`ferry cluster`, tests: network namespaces share the mount
/// namespace) never share pinned maps.
pub fn default_fastpath_dir(subnet_file: &Path) -> PathBuf {
    let base = Path::new(ferry_ebpf::bpffs::MOUNT_POINT).join("ferry");
    if subnet_file == Path::new(crate::subnet::DEFAULT_SUBNET_FILE) {
        return base.join("overlay");
    }
    let h = crate::podnet::fnv(&subnet_file.to_string_lossy());
    base.join(format!("overlay-{h:08x}"))
}

/// Whether a kernel release (`uname -r`) has the fix for the VXLAN checksum bug
/// flannel works around by turning TX checksum offload off on flannel.1: NAT
/// (kube-proxy's `MASQUERADE --random-fully` on encapsulated packets) rewrote
/// the zero outer UDP checksum into a wrong one ("netfilter: nat: never update
/// the UDP checksum when it's 0", Linux 5.7; Calico keeps offload on from 5.7
/// too). An unreadable release counts as not fixed.
pub fn vxlan_nat_checksum_fixed(release: &str) -> bool {
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>());
    match (parts.next(), parts.next()) {
        (Some(Ok(major)), Some(Ok(minor))) => (major, minor) >= (5, 7),
        _ => false,
    }
}

/// What one reconcile pass did.
#[derive(Clone, Debug, Default)]
pub struct ReconcileReport {
    pub peers: Vec<String>,
    pub skipped: Vec<Skipped>,
    pub added: usize,
    pub removed: usize,
    /// One line per change made ("+ route ...", "- fdb ...").
    pub changes: Vec<String>,
    pub errors: Vec<String>,
}

/// The underlay interface.
#[derive(Clone, Debug)]
pub struct Underlay {
    pub index: u32,
    pub name: String,
    pub addr: Ipv4Net,
    pub mtu: u32,
}

pub struct Reconciler {
    cfg: OverlayConfig,
    nl: Netlink,
    underlay: Underlay,
    vtep: Option<Link>,
    mtu: u32,
    /// The pod fast path, when installed.
    fastpath: Option<FastPath>,
    /// The VXLAN device the fast path was last set up for (its ifindex).
    fastpath_vtep: Option<u32>,
}

impl Reconciler {
    /// Sets up the node side (device, address, subnet.env, masquerade). Runs in
    /// the calling thread's network namespace, inside a tokio runtime.
    pub async fn new(cfg: OverlayConfig) -> Result<Reconciler> {
        if cfg.subnet.trunc() != cfg.subnet {
            bail!("podCIDR {} has host bits set", cfg.subnet);
        }
        if !cfg.cluster_cidr.contains(&cfg.subnet) {
            bail!(
                "podCIDR {} is outside the cluster CIDR {}",
                cfg.subnet,
                cfg.cluster_cidr
            );
        }
        let nl = Netlink::new()?;
        let underlay = find_underlay(&nl, cfg.iface.as_deref(), cfg.public_ip).await?;
        let mtu = cfg.mtu.unwrap_or(match cfg.backend {
            Backend::Vxlan => desired::vxlan_mtu(underlay.mtu),
            Backend::HostGw => underlay.mtu,
        });
        if cfg.enable_forwarding {
            if let Err(e) = std::fs::write("/proc/sys/net/ipv4/ip_forward", "1") {
                tracing::warn!("cannot enable net.ipv4.ip_forward: {e}");
            }
        }
        let mut r = Reconciler {
            cfg,
            nl,
            underlay,
            vtep: None,
            mtu,
            fastpath: None,
            fastpath_vtep: None,
        };
        r.ensure_device().await?;
        let rules = crate::netfilter::Rules {
            masquerade: r.cfg.ip_masq.then_some((r.cfg.cluster_cidr, r.cfg.subnet)),
            vxlan_notrack: (r.cfg.backend == Backend::Vxlan)
                .then_some((r.underlay.addr.addr(), r.cfg.vxlan_port)),
        };
        crate::netfilter::apply(rules).context("installing the overlay's nftables table")?;
        r.ensure_fastpath().await;
        // Last: `ferry cni` reads the fast path's directory from it.
        r.subnet_env().write(&r.cfg.subnet_file)?;
        tracing::info!(
            node = %r.cfg.node_name,
            backend = r.cfg.backend.as_str(),
            subnet = %r.cfg.subnet,
            underlay = %r.underlay.name,
            public_ip = %r.underlay.addr.addr(),
            mtu = r.mtu,
            vxlan_tx_checksum_offload = r.cfg.vxlan_tx_checksum_offload,
            vtep_mac = ?r.vtep_mac().map(|m| m.to_string()),
            "overlay ready"
        );
        Ok(r)
    }

    /// Creates / checks the VXLAN device (or removes a leftover one for host-gw).
    async fn ensure_device(&mut self) -> Result<()> {
        match self.cfg.backend {
            Backend::Vxlan => {
                let link = self
                    .nl
                    .ensure_vxlan(
                        &self.cfg.vxlan_device,
                        self.cfg.vni,
                        self.cfg.vxlan_port,
                        self.underlay.addr.addr(),
                        self.underlay.index,
                        self.mtu,
                    )
                    .await?;
                let want = self.cfg.vxlan_tx_checksum_offload;
                if crate::netlink::ethtool::tx_checksum(&link.name).ok() != Some(want) {
                    if let Err(e) = crate::netlink::ethtool::set_tx_checksum(&link.name, want) {
                        tracing::warn!(device = %link.name, "cannot turn tx checksum offload {}: {e}", if want { "on" } else { "off" });
                    }
                }
                let addr = Ipv4Net::new(self.cfg.subnet.network(), 32)?;
                self.nl.ensure_addr(link.index, addr, true).await?;
                self.vtep = Some(link);
            }
            Backend::HostGw => {
                if let Some(l) = self.nl.link(&self.cfg.vxlan_device).await? {
                    if l.kind == Some(rtnetlink::packet_route::link::InfoKind::Vxlan) {
                        tracing::info!(device = %l.name, "host-gw: removing the VXLAN device");
                        self.nl.del_link(l.index).await?;
                    }
                }
                self.vtep = None;
            }
        }
        Ok(())
    }

    /// Installs the pod fast path on the backend's device, dropping entries of
    /// pods whose veth is gone; or, when it is off, removes an earlier one. A
    /// failure leaves every pod on the stack path, which always works.
    async fn ensure_fastpath(&mut self) {
        let fp = FastPath::new(self.cfg.fastpath_dir());
        self.fastpath_vtep = self.vtep.as_ref().map(|l| l.index);
        // VXLAN in BPF too, when the tunnel MTU leaves room for the headers on
        // the underlay (the default MTU does); else flannel.1 encapsulates.
        let fits = self.mtu + desired::VXLAN_OVERHEAD <= self.underlay.mtu;
        let bpf_vtep = self.vtep.as_ref().filter(|_| fits).and_then(|l| {
            Some(Vtep {
                ifindex: l.index,
                mac: l.mac?.0,
                vni: self.cfg.vni,
                port: self.cfg.vxlan_port,
                underlay_ifindex: self.underlay.index,
                underlay_addr: self.underlay.addr.addr(),
            })
        });
        // to_pod where packets for this node's pods arrive: flannel.1, and the
        // underlay when VXLAN is decapsulated in BPF or peers route to pods
        // directly (host-gw, DirectRouting).
        let underlay = self.underlay.name.clone();
        let on_underlay = self.vtep.is_none() || self.cfg.direct_routing || bpf_vtep.is_some();
        let mut devices: Vec<&str> = self.vtep.iter().map(|l| l.name.as_str()).collect();
        if on_underlay {
            devices.push(&underlay);
        }
        let pods = fp.pods().unwrap_or_default();
        let mut veths = BTreeMap::new();
        for (ip, ep) in &pods {
            veths.insert(*ip, self.pod_veth(ep.host_ifindex).await);
        }
        if !self.cfg.fast_path {
            if fp.is_installed() {
                let mut names: Vec<String> = veths.into_values().flatten().collect();
                names.extend(devices.iter().map(|d| d.to_string()));
                names.push(underlay.clone());
                match fp.uninstall(&names) {
                    Ok(()) => tracing::info!(dir = %fp.dir().display(), "pod fast path removed"),
                    Err(e) => tracing::warn!("{e}"),
                }
            }
            return;
        }
        let mut cfg = FastPathConfig::new(self.cfg.cluster_cidr, self.cfg.subnet);
        if let Some(v) = bpf_vtep {
            cfg = cfg.with_vxlan(v);
        }
        if let Err(e) = fp.install(cfg, &devices) {
            tracing::warn!("{e}; pods use the stack path only");
            return;
        }
        if !on_underlay {
            // Left by an earlier host-gw run.
            if let Err(e) = fp.detach(&underlay) {
                tracing::warn!("{e}");
            }
        }
        for (ip, _) in veths.iter().filter(|(_, v)| v.is_none()) {
            tracing::info!(pod = %ip, "pod fast path: dropping a pod whose veth is gone");
            if let Err(e) = fp.remove_pod(*ip) {
                tracing::warn!("{e}");
            }
        }
        tracing::info!(dir = %fp.dir().display(), ?devices, vxlan_in_bpf = bpf_vtep.is_some(), "pod fast path installed");
        self.fastpath = Some(fp);
    }

    /// The name of the link `ifindex` when it is a veth on some bridge (the
    /// CNI config names the bridge; the overlay does not know it).
    async fn pod_veth(&self, ifindex: u32) -> Option<String> {
        let l = self.nl.link_by_index(ifindex).await.ok()??;
        let veth = l.kind == Some(rtnetlink::packet_route::link::InfoKind::Veth);
        (veth && l.controller.is_some()).then_some(l.name)
    }

    /// The pod fast path, when installed.
    pub fn fastpath(&self) -> Option<&FastPath> {
        self.fastpath.as_ref()
    }

    pub fn config(&self) -> &OverlayConfig {
        &self.cfg
    }

    pub fn underlay(&self) -> &Underlay {
        &self.underlay
    }

    pub fn mtu(&self) -> u32 {
        self.mtu
    }

    pub fn vtep_mac(&self) -> Option<Mac> {
        self.vtep.as_ref().and_then(|l| l.mac)
    }

    pub fn subnet_env(&self) -> SubnetEnv {
        SubnetEnv {
            network: self.cfg.cluster_cidr,
            subnet: self.cfg.subnet,
            mtu: self.mtu,
            ipmasq: self.cfg.ip_masq,
            fastpath: self.fastpath.as_ref().map(|f| f.dir().to_path_buf()),
        }
    }

    /// The annotations this node publishes (flannel's keys).
    pub fn annotations(&self) -> BTreeMap<String, String> {
        let mut a = BTreeMap::new();
        a.insert(
            node::ANN_BACKEND_TYPE.to_string(),
            self.cfg.backend.as_str().to_string(),
        );
        a.insert(
            node::ANN_PUBLIC_IP.to_string(),
            self.underlay.addr.addr().to_string(),
        );
        a.insert(node::ANN_KUBE_SUBNET_MANAGER.to_string(), "true".into());
        let data = match self.vtep_mac() {
            Some(mac) => serde_json::to_string(&VxlanBackendData {
                vni: self.cfg.vni,
                vtep_mac: mac.to_string(),
            })
            .expect("serializable"),
            None => "null".into(),
        };
        a.insert(node::ANN_BACKEND_DATA.to_string(), data);
        a
    }

    /// Desired state for these Nodes (pure apart from reading self).
    pub fn desired_for(&self, nodes: &[Node]) -> (Desired, Vec<String>, Vec<Skipped>) {
        let vni = (self.cfg.backend == Backend::Vxlan).then_some(self.cfg.vni);
        let (peers, skipped) = node::select_peers(
            &self.cfg.node_name,
            self.cfg.subnet,
            self.underlay.addr.addr(),
            self.cfg.cluster_cidr,
            vni,
            nodes,
        );
        let d = desired::desired(
            self.cfg.backend,
            self.cfg.direct_routing,
            self.underlay.addr,
            &peers,
        );
        (d, peers.into_iter().map(|p| p.name).collect(), skipped)
    }

    /// Makes the kernel match the Node set. Errors on single entries are
    /// reported and do not stop the others.
    pub async fn reconcile(&mut self, nodes: &[Node]) -> Result<ReconcileReport> {
        self.ensure_device().await?;
        if self.cfg.fast_path && self.vtep.as_ref().map(|l| l.index) != self.fastpath_vtep {
            // flannel.1 was re-created: the fast path points at the old one.
            self.ensure_fastpath().await;
        }
        let (want, peers, skipped) = self.desired_for(nodes);
        for s in &skipped {
            tracing::warn!(node = %s.name, "skipping node: {}", s.reason);
        }
        for (n, why) in &want.unreachable {
            tracing::warn!(node = %n, "no route to node: {why}");
        }
        let mut rep = ReconcileReport {
            peers,
            skipped,
            ..Default::default()
        };
        let vtep = self.vtep.as_ref().map(|l| l.index);

        // FDB and neighbours first, so a new route never points at nothing.
        if let Some(vx) = vtep {
            let cur = self.nl.neighbours(AddressFamily::Bridge, vx).await?;
            let mut have = BTreeSet::new();
            for n in &cur {
                let spec = match (n.mac, n.ip) {
                    (Some(mac), Some(dst)) if n.permanent => Some(FdbSpec { mac, dst }),
                    _ => None,
                };
                match spec {
                    Some(s) if want.fdbs.contains(&s) => {
                        have.insert(s);
                    }
                    _ => {
                        if n.mac.is_some_and(|m| self.vtep_mac() == Some(m)) {
                            continue; // the device's own entry
                        }
                        note(
                            &mut rep,
                            format!("- fdb {:?} dst {:?}", n.mac, n.ip),
                            self.nl.del_neigh(n).await,
                            true,
                        );
                    }
                }
            }
            for f in want.fdbs.difference(&have) {
                note(
                    &mut rep,
                    format!("+ fdb {} dst {}", f.mac, f.dst),
                    self.nl.replace_fdb(vx, f.mac, f.dst).await,
                    false,
                );
            }
            // The fast path's copy of the FDB, for VXLAN in BPF.
            if let Some(fp) = &self.fastpath {
                let vteps = want.fdbs.iter().map(|f| (f.mac.0, f.dst)).collect();
                if let Err(e) = fp.set_vteps(&vteps) {
                    rep.errors.push(e.to_string());
                }
            }

            let cur = self.nl.neighbours(AddressFamily::Inet, vx).await?;
            let mut have = BTreeSet::new();
            for n in &cur {
                let spec = match (n.mac, n.ip) {
                    (Some(mac), Some(ip)) if n.permanent => Some(NeighSpec { ip, mac }),
                    _ => None,
                };
                match spec {
                    Some(s) if want.neighs.contains(&s) => {
                        have.insert(s);
                    }
                    _ => note(
                        &mut rep,
                        format!("- neigh {:?} lladdr {:?}", n.ip, n.mac),
                        self.nl.del_neigh(n).await,
                        true,
                    ),
                }
            }
            for n in want.neighs.difference(&have) {
                note(
                    &mut rep,
                    format!("+ neigh {} lladdr {}", n.ip, n.mac),
                    self.nl.replace_neigh(vx, n.ip, n.mac).await,
                    false,
                );
            }
        }

        // Routes: ours are those with ferry's protocol or on the VXLAN device.
        let routes = self.nl.routes().await?;
        let mut have = BTreeSet::new();
        for r in &routes {
            let on_vtep = vtep.is_some() && r.oif == vtep;
            let ours = r.protocol == RouteProtocol::Other(FERRY_RT_PROTO) || on_vtep;
            if !ours {
                continue;
            }
            let spec = match (r.gateway, r.oif) {
                (Some(gateway), Some(_)) if on_vtep && r.onlink => Some(RouteSpec::Vxlan {
                    dst: r.dst,
                    gateway,
                }),
                (Some(gateway), Some(oif)) if oif == self.underlay.index => {
                    Some(RouteSpec::Direct {
                        dst: r.dst,
                        gateway,
                    })
                }
                _ => None,
            };
            match spec {
                Some(s) if want.routes.contains(&s) && !have.contains(&s) => {
                    have.insert(s);
                }
                _ => note(
                    &mut rep,
                    format!("- route {} via {:?} dev {:?}", r.dst, r.gateway, r.oif),
                    self.nl.del_route(r).await,
                    true,
                ),
            }
        }
        for r in want.routes.difference(&have) {
            let what = format!("+ route {:?}", r);
            let res = match (*r, vtep) {
                (RouteSpec::Vxlan { dst, gateway }, Some(vx)) => {
                    self.nl.replace_route(dst, gateway, vx, true).await
                }
                (RouteSpec::Direct { dst, gateway }, _) => {
                    self.nl
                        .replace_route(dst, gateway, self.underlay.index, false)
                        .await
                }
                (RouteSpec::Vxlan { .. }, None) => continue,
            };
            note(&mut rep, what, res, false);
        }
        for e in &rep.errors {
            tracing::warn!("reconcile: {e}");
        }
        if rep.added + rep.removed > 0 {
            tracing::info!(
                peers = rep.peers.len(),
                added = rep.added,
                removed = rep.removed,
                "routes, neighbours and FDB updated"
            );
        }
        Ok(rep)
    }
}

fn note(rep: &mut ReconcileReport, what: String, res: Result<()>, removal: bool) {
    match res {
        Ok(()) => {
            tracing::debug!("{what}");
            if removal {
                rep.removed += 1;
            } else {
                rep.added += 1;
            }
            rep.changes.push(what);
        }
        Err(e) => rep.errors.push(format!("{what}: {e:#}")),
    }
}

/// Finds the underlay interface and address.
pub async fn find_underlay(
    nl: &Netlink,
    iface: Option<&str>,
    public_ip: Option<Ipv4Addr>,
) -> Result<Underlay> {
    let link = match iface {
        Some(name) => nl
            .link(name)
            .await?
            .with_context(|| format!("--iface {name}: no such interface"))?,
        None => {
            let routes = nl.routes().await?;
            let def = routes
                .iter()
                .filter(|r| r.dst.prefix_len() == 0)
                .find_map(|r| r.oif)
                .context("no --iface given and no default route to pick the underlay from")?;
            nl.link_by_index(def)
                .await?
                .context("default route's interface vanished")?
        }
    };
    let addrs = nl.addrs(link.index).await?;
    let addr = match public_ip {
        Some(ip) => addrs
            .iter()
            .map(|(a, _)| *a)
            .find(|a| a.addr() == ip)
            .with_context(|| format!("{ip} is not an address of {}", link.name))?,
        None => addrs
            .first()
            .map(|(a, _)| *a)
            .with_context(|| format!("{} has no IPv4 address", link.name))?,
    };
    Ok(Underlay {
        index: link.index,
        name: link.name,
        addr,
        mtu: link.mtu,
    })
}

#[cfg(test)]
mod tests {
    use super::vxlan_nat_checksum_fixed;

    #[test]
    fn vxlan_nat_checksum_fix_by_kernel_release() {
        for fixed in ["5.7.0", "5.10.0-28-amd64", "6.18.44-fc-v657", "10.0"] {
            assert!(vxlan_nat_checksum_fixed(fixed), "{fixed}");
        }
        for broken in [
            "5.6.19",
            "4.19.0-26-amd64",
            "3.10.0-1160.el7.x86_64",
            "",
            "x",
        ] {
            assert!(!vxlan_nat_checksum_fixed(broken), "{broken}");
        }
    }
}
