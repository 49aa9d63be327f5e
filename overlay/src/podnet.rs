//! The pod side of the network: bridge `cni0` holding the subnet's gateway
//! address, a veth pair per pod (one end on the bridge, the other renamed to
//! `ifname` inside the pod's namespace), an address from the node's podCIDR
//! (persisted by [`Ipam`]) and a default route via the gateway.
//!
//! The methods block (each runs its netlink work on short-lived threads of its
//! own); from async code call them inside `spawn_blocking`.

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use ipnet::Ipv4Net;

use ferry_ebpf::pod_fastpath::{FastPath, PodEndpoint};

use crate::ipam::Ipam;
use crate::netlink::Netlink;
use crate::netns::block_on_in;
use crate::node::Mac;
use crate::subnet::SubnetEnv;

/// Default bridge name (as flannel's CNI setup).
pub const DEFAULT_BRIDGE: &str = "cni0";

#[derive(Debug, thiserror::Error)]
pub enum PodNetError {
    #[error("container {container_id} interface {ifname} has no address on this network")]
    UnknownContainer {
        container_id: String,
        ifname: String,
    },
    #[error("invalid interface name {0:?}: 1 to 15 characters, no '/', ':' or whitespace")]
    InvalidIfname(String),
    #[error("invalid container id {0:?}")]
    InvalidContainerId(String),
}

#[derive(Clone, Debug)]
pub struct PodNetworkConfig {
    pub bridge: String,
    pub env: SubnetEnv,
    /// The network's IPAM directory.
    pub ipam_dir: PathBuf,
}

/// What a pod got.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodAddress {
    /// Address with the subnet's prefix.
    pub address: Ipv4Net,
    pub gateway: Ipv4Addr,
    pub mtu: u32,
    pub bridge: String,
    pub bridge_mac: Option<Mac>,
    pub host_veth: String,
    pub host_veth_mac: Option<Mac>,
    pub ifname: String,
    pub pod_mac: Option<Mac>,
}

#[derive(Clone, Debug)]
pub struct PodNetwork {
    cfg: PodNetworkConfig,
    ipam: Ipam,
}

/// A stable 32-bit FNV-1a hash, for interface names.
pub(crate) fn fnv(s: &str) -> u32 {
    s.bytes().fold(0x811c9dc5u32, |h, b| {
        (h ^ b as u32).wrapping_mul(0x01000193)
    })
}

/// The host-side veth name for a pod interface: `veth` + 8 hex digits.
pub fn host_veth_name(container_id: &str, ifname: &str) -> String {
    format!("veth{:08x}", fnv(&format!("{container_id}/{ifname}")))
}

fn tmp_peer_name(container_id: &str, ifname: &str) -> String {
    format!("fpeer{:08x}", fnv(&format!("{container_id}/{ifname}")))
}

pub fn validate_ifname(ifname: &str) -> Result<(), PodNetError> {
    if ifname.is_empty()
        || ifname.len() > 15
        || ifname == "."
        || ifname == ".."
        || ifname
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        return Err(PodNetError::InvalidIfname(ifname.to_string()));
    }
    Ok(())
}

fn validate_container_id(id: &str) -> Result<(), PodNetError> {
    let ok = !id.is_empty()
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if !ok {
        return Err(PodNetError::InvalidContainerId(id.to_string()));
    }
    Ok(())
}

impl PodNetwork {
    pub fn new(cfg: PodNetworkConfig) -> PodNetwork {
        let ipam = Ipam::new(&cfg.ipam_dir, cfg.env.subnet);
        PodNetwork { cfg, ipam }
    }

    /// From the overlay's subnet.env, the IPAM data directory and network name.
    pub fn from_subnet_file(
        subnet_file: &Path,
        data_dir: &Path,
        network: &str,
    ) -> Result<PodNetwork> {
        let env = SubnetEnv::read(subnet_file)?;
        Ok(PodNetwork::new(PodNetworkConfig {
            bridge: DEFAULT_BRIDGE.into(),
            env,
            ipam_dir: data_dir.join(network),
        }))
    }

    pub fn config(&self) -> &PodNetworkConfig {
        &self.cfg
    }

    pub fn ipam(&self) -> &Ipam {
        &self.ipam
    }

    fn gateway_net(&self) -> Ipv4Net {
        Ipv4Net::new(self.cfg.env.gateway(), self.cfg.env.subnet.prefix_len())
            .expect("valid prefix")
    }

    /// Connects the pod's namespace: allocates an address, creates the veth
    /// pair and configures both ends. A retried ADD gets the same address.
    pub fn add(&self, netns: &Path, container_id: &str, ifname: &str) -> Result<PodAddress> {
        validate_ifname(ifname)?;
        validate_container_id(container_id)?;
        // Open the namespace first: a bad path fails before anything is allocated.
        let ns_file = std::fs::File::open(netns)
            .with_context(|| format!("opening netns {}", netns.display()))?;
        let ip = self.ipam.allocate(container_id, ifname)?;
        match self.setup(&ns_file, netns, ip, container_id, ifname) {
            Ok(a) => Ok(a),
            Err(e) => {
                let _ = self.del(Some(netns), container_id, ifname);
                Err(e)
            }
        }
    }

    fn setup(
        &self,
        ns_file: &std::fs::File,
        netns: &Path,
        ip: Ipv4Addr,
        container_id: &str,
        ifname: &str,
    ) -> Result<PodAddress> {
        let host = host_veth_name(container_id, ifname);
        let tmp = tmp_peer_name(container_id, ifname);
        let mtu = self.cfg.env.mtu;
        let bridge = self.cfg.bridge.clone();
        let gw_net = self.gateway_net();
        let fd = ns_file.as_raw_fd();
        let (bridge_mac, host_mac, host_index) = block_on_in(None, || async {
            let nl = Netlink::new()?;
            let br = nl.ensure_bridge(&bridge, mtu).await?;
            nl.ensure_addr(br.index, gw_net, false).await?;
            for name in [&host, &tmp] {
                if let Some(old) = nl.link(name).await? {
                    nl.del_link(old.index).await?;
                }
            }
            nl.add_veth(&host, &tmp, mtu).await?;
            let peer = nl.link(&tmp).await?.context("veth peer missing")?;
            nl.move_to_netns(peer.index, fd).await?;
            let h = nl.link(&host).await?.context("host veth missing")?;
            nl.attach(h.index, br.index, mtu).await?;
            Ok((br.mac, h.mac, h.index))
        })?;
        let address = Ipv4Net::new(ip, self.cfg.env.subnet.prefix_len())?;
        let gateway = self.cfg.env.gateway();
        let ifn = ifname.to_string();
        let pod_mac = block_on_in(Some(netns), || async {
            let nl = Netlink::new()?;
            if let Some(lo) = nl.link("lo").await? {
                nl.set_up(lo.index).await?;
            }
            if nl.link(&ifn).await?.is_some() {
                bail!("interface {ifn} already exists in the pod's namespace");
            }
            let l = nl
                .link(&tmp)
                .await?
                .context("veth peer missing in the pod's namespace")?;
            nl.rename(l.index, &ifn).await?;
            nl.set_mtu(l.index, mtu).await?;
            nl.ensure_addr(l.index, address, false).await?;
            nl.set_up(l.index).await?;
            let def: Ipv4Net = "0.0.0.0/0".parse().expect("valid");
            nl.replace_route(def, gateway, l.index, false).await?;
            Ok(nl.link(&ifn).await?.and_then(|l| l.mac))
        })?;
        if let (Some(fp), Some(pod_mac), Some(gateway_mac)) = (self.fastpath(), pod_mac, bridge_mac)
        {
            let ep = PodEndpoint {
                host_ifindex: host_index,
                pod_mac: pod_mac.0,
                gateway_mac: gateway_mac.0,
            };
            // The stack path works without it: say so and go on.
            if let Err(e) = fp.add_pod(&host, ip, ep) {
                tracing::warn!("{e}; pod {ip} uses the stack path");
            }
        }
        Ok(PodAddress {
            address,
            gateway,
            mtu,
            bridge,
            bridge_mac,
            host_veth: host,
            host_veth_mac: host_mac,
            ifname: ifname.to_string(),
            pod_mac,
        })
    }

    /// Disconnects the pod and releases its address. Succeeds when some or all
    /// of it is already gone (the namespace too), so a repeated DEL succeeds.
    pub fn del(&self, netns: Option<&Path>, container_id: &str, ifname: &str) -> Result<()> {
        validate_ifname(ifname)?;
        if let Some(ns) = netns.filter(|p| p.exists()) {
            let ifn = ifname.to_string();
            let r = block_on_in(Some(ns), || async {
                let nl = Netlink::new()?;
                if let Some(l) = nl.link(&ifn).await? {
                    nl.del_link(l.index).await?;
                }
                Ok(())
            });
            if let Err(e) = r {
                tracing::debug!("DEL: pod namespace {}: {e:#}", ns.display());
            }
        }
        let host = host_veth_name(container_id, ifname);
        let tmp = tmp_peer_name(container_id, ifname);
        block_on_in(None, || async {
            let nl = Netlink::new()?;
            for name in [&host, &tmp] {
                if let Some(l) = nl.link(name).await? {
                    nl.del_link(l.index).await?;
                }
            }
            Ok(())
        })?;
        if let Some(fp) = self.fastpath() {
            if let Some(ip) = self.ipam.lookup(container_id, ifname)? {
                // Not fatal: DEL must succeed; the overlay drops stale entries
                // at its next start, and an ADD reusing the address replaces it.
                if let Err(e) = fp.remove_pod(ip) {
                    tracing::warn!("{e}");
                }
            }
        }
        self.ipam.release(container_id, ifname)?;
        Ok(())
    }

    /// The node's pod fast path, when its overlay installed one.
    fn fastpath(&self) -> Option<FastPath> {
        let fp = FastPath::new(self.cfg.env.fastpath.as_ref()?);
        fp.is_installed().then_some(fp)
    }

    /// Verifies that the pod is connected as ADD left it.
    pub fn check(&self, netns: &Path, container_id: &str, ifname: &str) -> Result<PodAddress> {
        validate_ifname(ifname)?;
        let ip = self.ipam.lookup(container_id, ifname)?.ok_or_else(|| {
            PodNetError::UnknownContainer {
                container_id: container_id.to_string(),
                ifname: ifname.to_string(),
            }
        })?;
        let address = Ipv4Net::new(ip, self.cfg.env.subnet.prefix_len())?;
        let gateway = self.cfg.env.gateway();
        let ifn = ifname.to_string();
        let pod_mac = block_on_in(Some(netns), || async {
            let nl = Netlink::new()?;
            let l = nl
                .link(&ifn)
                .await?
                .with_context(|| format!("interface {ifn} missing in the pod's namespace"))?;
            if !l.up {
                bail!("interface {ifn} is down");
            }
            if !nl.addrs(l.index).await?.iter().any(|(a, _)| *a == address) {
                bail!("interface {ifn} lacks address {address}");
            }
            let has_default = nl.routes().await?.iter().any(|r| {
                r.dst.prefix_len() == 0 && r.gateway == Some(gateway) && r.oif == Some(l.index)
            });
            if !has_default {
                bail!("no default route via {gateway} on {ifn}");
            }
            Ok(l.mac)
        })?;
        let host = host_veth_name(container_id, ifname);
        let bridge = self.cfg.bridge.clone();
        let gw_net = self.gateway_net();
        let (bridge_mac, host_mac, host_index) = block_on_in(None, || async {
            let nl = Netlink::new()?;
            let br = nl
                .link(&bridge)
                .await?
                .with_context(|| format!("bridge {bridge} missing"))?;
            if !nl.addrs(br.index).await?.iter().any(|(a, _)| *a == gw_net) {
                bail!("bridge {bridge} lacks the gateway address {gw_net}");
            }
            let h = nl
                .link(&host)
                .await?
                .with_context(|| format!("host veth {host} missing"))?;
            if h.controller != Some(br.index) {
                bail!("host veth {host} is not attached to {bridge}");
            }
            Ok((br.mac, h.mac, h.index))
        })?;
        // No fast-path entry is fine (the pod uses the stack path); a stale
        // one would deliver the pod's packets to the wrong place.
        if let Some(fp) = self.fastpath() {
            if let Some(have) = fp.pod(ip)? {
                let want = PodEndpoint {
                    host_ifindex: host_index,
                    pod_mac: pod_mac.map(|m| m.0).unwrap_or_default(),
                    gateway_mac: bridge_mac.map(|m| m.0).unwrap_or_default(),
                };
                if have != want {
                    bail!("the pod fast path's entry for {ip} is stale: {have:?}, want {want:?}");
                }
            }
        }
        Ok(PodAddress {
            address,
            gateway,
            mtu: self.cfg.env.mtu,
            bridge,
            bridge_mac,
            host_veth: host,
            host_veth_mac: host_mac,
            ifname: ifname.to_string(),
            pod_mac,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_stable_and_short() {
        let a = host_veth_name("abc", "eth0");
        assert_eq!(a, host_veth_name("abc", "eth0"));
        assert_ne!(a, host_veth_name("abd", "eth0"));
        assert!(a.len() <= 15 && tmp_peer_name("abc", "eth0").len() <= 15);
    }

    #[test]
    fn ifname_and_id_validation() {
        assert!(validate_ifname("eth0").is_ok());
        for bad in ["", "a/b", "0123456789abcdef", "a b", "..", "a:b"] {
            assert!(validate_ifname(bad).is_err(), "{bad}");
        }
        assert!(validate_container_id("abc-123_x.y").is_ok());
        assert!(validate_container_id("a/b").is_err());
        assert!(validate_container_id("").is_err());
    }
}
