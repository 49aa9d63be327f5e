//! The desired kernel state for a set of peers (pure): routes, permanent
//! neighbour entries and FDB entries. The datapath makes the kernel match it.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::node::{Backend, Mac, Peer};

/// A route to a peer's pod subnet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RouteSpec {
    /// `dst via <peer subnet network address> dev flannel.1 onlink`
    Vxlan { dst: Ipv4Net, gateway: Ipv4Addr },
    /// `dst via <peer public IP> dev <underlay>` (host-gw, DirectRouting)
    Direct { dst: Ipv4Net, gateway: Ipv4Addr },
}

impl RouteSpec {
    pub fn dst(&self) -> Ipv4Net {
        match self {
            RouteSpec::Vxlan { dst, .. } | RouteSpec::Direct { dst, .. } => *dst,
        }
    }
    pub fn gateway(&self) -> Ipv4Addr {
        match self {
            RouteSpec::Vxlan { gateway, .. } | RouteSpec::Direct { gateway, .. } => *gateway,
        }
    }
}

/// `ip neigh replace <ip> lladdr <mac> dev flannel.1 nud permanent`
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NeighSpec {
    pub ip: Ipv4Addr,
    pub mac: Mac,
}

/// `bridge fdb replace <mac> dev flannel.1 dst <public ip> self permanent`
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FdbSpec {
    pub mac: Mac,
    pub dst: Ipv4Addr,
}

/// Everything the data plane should hold for the current peers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub routes: BTreeSet<RouteSpec>,
    pub neighs: BTreeSet<NeighSpec>,
    pub fdbs: BTreeSet<FdbSpec>,
    /// Peers that get no entries, with the reason.
    pub unreachable: Vec<(String, String)>,
}

/// Computes the desired state. `underlay` is this node's address on its
/// underlay interface with its prefix (which decides "same L2 segment").
pub fn desired(
    backend: Backend,
    direct_routing: bool,
    underlay: Ipv4Net,
    peers: &[Peer],
) -> Desired {
    let mut d = Desired::default();
    for p in peers {
        let same_l2 = underlay.contains(&p.public_ip) && p.public_ip != underlay.addr();
        match backend {
            Backend::HostGw => {
                if same_l2 {
                    d.routes.insert(RouteSpec::Direct {
                        dst: p.subnet,
                        gateway: p.public_ip,
                    });
                } else {
                    d.unreachable.push((
                        p.name.clone(),
                        format!(
                            "host-gw: {} is not on this node's segment {}",
                            p.public_ip,
                            underlay.trunc()
                        ),
                    ));
                }
            }
            Backend::Vxlan => {
                if direct_routing && same_l2 {
                    d.routes.insert(RouteSpec::Direct {
                        dst: p.subnet,
                        gateway: p.public_ip,
                    });
                    continue;
                }
                let Some(mac) = p.vtep_mac else {
                    d.unreachable
                        .push((p.name.clone(), "no VtepMAC published".into()));
                    continue;
                };
                let gateway = p.subnet.network();
                d.routes.insert(RouteSpec::Vxlan {
                    dst: p.subnet,
                    gateway,
                });
                d.neighs.insert(NeighSpec { ip: gateway, mac });
                d.fdbs.insert(FdbSpec {
                    mac,
                    dst: p.public_ip,
                });
            }
        }
    }
    d
}

/// What to add and remove to get from `current` to `want`.
#[derive(Debug, PartialEq, Eq)]
pub struct Diff<T> {
    pub add: Vec<T>,
    pub remove: Vec<T>,
}

pub fn diff<T: Ord + Clone>(current: &BTreeSet<T>, want: &BTreeSet<T>) -> Diff<T> {
    Diff {
        add: want.difference(current).cloned().collect(),
        remove: current.difference(want).cloned().collect(),
    }
}

/// What VXLAN adds to a frame: outer IPv4 header 20 + UDP 8 + VXLAN 8 + inner
/// Ethernet 14.
pub const VXLAN_OVERHEAD: u32 = 50;

/// The VXLAN device MTU for an underlay MTU.
pub fn vxlan_mtu(underlay_mtu: u32) -> u32 {
    underlay_mtu.saturating_sub(VXLAN_OVERHEAD)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(name: &str, subnet: &str, ip: &str, mac: Option<&str>) -> Peer {
        Peer {
            name: name.into(),
            subnet: subnet.parse().unwrap(),
            public_ip: ip.parse().unwrap(),
            vtep_mac: mac.map(|m| m.parse().unwrap()),
            vni: mac.map(|_| 1),
        }
    }

    fn peers() -> Vec<Peer> {
        vec![
            peer("b", "10.244.1.0/24", "192.0.2.2", Some("02:00:00:00:00:02")),
            peer(
                "c",
                "10.244.2.0/24",
                "198.51.100.3",
                Some("02:00:00:00:00:03"),
            ),
        ]
    }

    const UNDERLAY: &str = "192.0.2.1/24";

    #[test]
    fn vxlan_gives_route_neigh_fdb_per_peer() {
        let d = desired(Backend::Vxlan, false, UNDERLAY.parse().unwrap(), &peers());
        assert_eq!(d.routes.len(), 2);
        assert!(d.routes.contains(&RouteSpec::Vxlan {
            dst: "10.244.1.0/24".parse().unwrap(),
            gateway: "10.244.1.0".parse().unwrap()
        }));
        assert!(d.neighs.contains(&NeighSpec {
            ip: "10.244.2.0".parse().unwrap(),
            mac: "02:00:00:00:00:03".parse().unwrap()
        }));
        assert!(d.fdbs.contains(&FdbSpec {
            mac: "02:00:00:00:00:02".parse().unwrap(),
            dst: "192.0.2.2".parse().unwrap()
        }));
        assert!(d.unreachable.is_empty());
    }

    #[test]
    fn direct_routing_uses_plain_routes_on_the_same_segment_only() {
        let d = desired(Backend::Vxlan, true, UNDERLAY.parse().unwrap(), &peers());
        assert!(d.routes.contains(&RouteSpec::Direct {
            dst: "10.244.1.0/24".parse().unwrap(),
            gateway: "192.0.2.2".parse().unwrap()
        }));
        assert!(d.routes.contains(&RouteSpec::Vxlan {
            dst: "10.244.2.0/24".parse().unwrap(),
            gateway: "10.244.2.0".parse().unwrap()
        }));
        assert_eq!(d.neighs.len(), 1);
        assert_eq!(d.fdbs.len(), 1);
    }

    #[test]
    fn host_gw_skips_peers_off_segment() {
        let d = desired(Backend::HostGw, false, UNDERLAY.parse().unwrap(), &peers());
        assert_eq!(d.routes.len(), 1);
        assert!(d.neighs.is_empty() && d.fdbs.is_empty());
        assert_eq!(d.unreachable.len(), 1);
        assert_eq!(d.unreachable[0].0, "c");
    }

    #[test]
    fn same_input_same_output_and_diff() {
        let u: Ipv4Net = UNDERLAY.parse().unwrap();
        let a = desired(Backend::Vxlan, false, u, &peers());
        let b = desired(Backend::Vxlan, false, u, &peers());
        assert_eq!(a, b);
        let d = diff(&a.routes, &b.routes);
        assert!(d.add.is_empty() && d.remove.is_empty());
        let fewer = desired(Backend::Vxlan, false, u, &peers()[..1]);
        let d = diff(&a.routes, &fewer.routes);
        assert_eq!(d.remove.len(), 1);
        assert_eq!(d.remove[0].dst().to_string(), "10.244.2.0/24");
        assert!(d.add.is_empty());
    }

    #[test]
    fn mtu() {
        assert_eq!(vxlan_mtu(1500), 1450);
        assert_eq!(vxlan_mtu(9000), 8950);
    }
}
