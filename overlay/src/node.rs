//! Reading peers out of Node objects (pure): podCIDR, public IP and the flannel
//! annotations. A Node that cannot be used is skipped with a reason, never fatal.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Node;
use serde::{Deserialize, Serialize};

/// `{"VNI":1,"VtepMAC":"aa:bb:..."}`
pub const ANN_BACKEND_DATA: &str = "flannel.alpha.coreos.com/backend-data";
/// `vxlan` or `host-gw`.
pub const ANN_BACKEND_TYPE: &str = "flannel.alpha.coreos.com/backend-type";
/// The node's underlay address.
pub const ANN_PUBLIC_IP: &str = "flannel.alpha.coreos.com/public-ip";
/// `"true"`: the subnet comes from the Node's podCIDR.
pub const ANN_KUBE_SUBNET_MANAGER: &str = "flannel.alpha.coreos.com/kube-subnet-manager";

/// The data-plane backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Backend {
    /// Encapsulate in VXLAN (VNI 1, UDP 8472) through `flannel.1`.
    Vxlan,
    /// Plain routes via each peer's address (all nodes on one L2 segment).
    #[value(name = "host-gw")]
    HostGw,
}

impl Backend {
    /// The value of the backend-type annotation.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Vxlan => "vxlan",
            Backend::HostGw => "host-gw",
        }
    }
}

/// flannel's VXLAN backend data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VxlanBackendData {
    #[serde(rename = "VNI")]
    pub vni: u32,
    #[serde(rename = "VtepMAC")]
    pub vtep_mac: String,
}

/// A MAC address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Mac(pub [u8; 6]);

impl std::fmt::Display for Mac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl std::str::FromStr for Mac {
    type Err = String;
    fn from_str(s: &str) -> Result<Mac, String> {
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(format!("{s:?} is not a MAC address"));
        }
        let mut out = [0u8; 6];
        for (o, p) in out.iter_mut().zip(parts) {
            if p.len() != 2 {
                return Err(format!("{s:?} is not a MAC address"));
            }
            *o = u8::from_str_radix(p, 16).map_err(|_| format!("{s:?} is not a MAC address"))?;
        }
        Ok(Mac(out))
    }
}

impl TryFrom<&[u8]> for Mac {
    type Error = String;
    fn try_from(b: &[u8]) -> Result<Mac, String> {
        <[u8; 6]>::try_from(b)
            .map(Mac)
            .map_err(|_| format!("{} bytes is not a MAC address", b.len()))
    }
}

/// A remote node as the data plane needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub name: String,
    pub subnet: Ipv4Net,
    pub public_ip: Ipv4Addr,
    /// Present when the node publishes VXLAN backend data.
    pub vtep_mac: Option<Mac>,
    pub vni: Option<u32>,
}

/// The Node's pod CIDR (IPv4): `spec.podCIDRs`, else `spec.podCIDR`.
pub fn pod_cidr(node: &Node) -> Result<Ipv4Net, String> {
    let spec = node.spec.as_ref();
    let mut cidrs: Vec<&String> = spec
        .and_then(|s| s.pod_cidrs.as_ref())
        .map(|v| v.iter().collect())
        .unwrap_or_default();
    if let Some(c) = spec.and_then(|s| s.pod_cidr.as_ref()) {
        cidrs.push(c);
    }
    if cidrs.is_empty() {
        return Err("no spec.podCIDR".into());
    }
    for c in &cidrs {
        if let Ok(net) = c.parse::<Ipv4Net>() {
            if net.network() != net.addr() {
                return Err(format!("spec.podCIDR {c:?} has host bits set"));
            }
            if net.prefix_len() > 30 {
                return Err(format!("spec.podCIDR {c:?} is too small"));
            }
            return Ok(net);
        }
    }
    if cidrs.iter().all(|c| c.parse::<ipnet::Ipv6Net>().is_ok()) {
        return Err("no IPv4 podCIDR".into());
    }
    Err(format!("malformed spec.podCIDR {:?}", cidrs[0]))
}

fn annotations(node: &Node) -> Option<&BTreeMap<String, String>> {
    node.metadata.annotations.as_ref()
}

/// The Node's underlay address: the public-ip annotation, else its InternalIP.
pub fn public_ip(node: &Node) -> Result<Ipv4Addr, String> {
    if let Some(v) = annotations(node).and_then(|a| a.get(ANN_PUBLIC_IP)) {
        return v
            .parse()
            .map_err(|_| format!("malformed annotation {ANN_PUBLIC_IP}={v:?}"));
    }
    let addrs = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .cloned()
        .unwrap_or_default();
    addrs
        .iter()
        .filter(|a| a.type_ == "InternalIP")
        .find_map(|a| a.address.parse().ok())
        .ok_or_else(|| format!("no {ANN_PUBLIC_IP} annotation and no IPv4 InternalIP"))
}

/// Parses one Node into a peer. `need_vtep`: the VXLAN backend data must be present.
pub fn peer_from_node(node: &Node, need_vtep: bool) -> Result<Peer, String> {
    let name = node.metadata.name.clone().unwrap_or_default();
    let subnet = pod_cidr(node)?;
    let public_ip = public_ip(node)?;
    let ann = annotations(node);
    let (mut vtep_mac, mut vni) = (None, None);
    match ann.and_then(|a| a.get(ANN_BACKEND_DATA)) {
        Some(raw) if !raw.trim().is_empty() && raw.trim() != "null" => {
            let data: VxlanBackendData = serde_json::from_str(raw)
                .map_err(|e| format!("malformed annotation {ANN_BACKEND_DATA}: {e}"))?;
            let mac: Mac = data
                .vtep_mac
                .parse()
                .map_err(|e| format!("malformed annotation {ANN_BACKEND_DATA}: VtepMAC {e}"))?;
            if mac.0 == [0; 6] || mac.0[0] & 1 == 1 {
                return Err(format!(
                    "annotation {ANN_BACKEND_DATA}: VtepMAC {mac} is not a unicast address"
                ));
            }
            vtep_mac = Some(mac);
            vni = Some(data.vni);
        }
        _ if need_vtep => {
            return Err(format!(
                "no {ANN_BACKEND_DATA} annotation (VXLAN not ready)"
            ));
        }
        _ => {}
    }
    Ok(Peer {
        name,
        subnet,
        public_ip,
        vtep_mac,
        vni,
    })
}

/// A Node that was left out, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    pub name: String,
    pub reason: String,
}

/// Picks the usable peers out of all Nodes: not `local`, podCIDR inside the
/// cluster CIDR, no overlap with the local subnet or an earlier peer (by name),
/// distinct public IP, and (VXLAN) valid backend data with a matching VNI.
pub fn select_peers(
    local_name: &str,
    local_subnet: Ipv4Net,
    local_ip: Ipv4Addr,
    cluster_cidr: Ipv4Net,
    vxlan_vni: Option<u32>,
    nodes: &[Node],
) -> (Vec<Peer>, Vec<Skipped>) {
    let mut sorted: Vec<&Node> = nodes.iter().collect();
    sorted.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let mut peers: Vec<Peer> = Vec::new();
    let mut skipped = Vec::new();
    for node in sorted {
        let name = node.metadata.name.clone().unwrap_or_default();
        if name == local_name {
            continue;
        }
        let mut skip = |reason: String| {
            skipped.push(Skipped {
                name: name.clone(),
                reason,
            })
        };
        if node.metadata.deletion_timestamp.is_some() {
            skip("being deleted".into());
            continue;
        }
        let peer = match peer_from_node(node, vxlan_vni.is_some()) {
            Ok(p) => p,
            Err(e) => {
                skip(e);
                continue;
            }
        };
        if !cluster_cidr.contains(&peer.subnet) {
            skip(format!(
                "podCIDR {} is outside the cluster CIDR {cluster_cidr}",
                peer.subnet
            ));
            continue;
        }
        if overlaps(peer.subnet, local_subnet) {
            skip(format!(
                "podCIDR {} overlaps this node's {local_subnet}",
                peer.subnet
            ));
            continue;
        }
        if let Some(other) = peers.iter().find(|p| overlaps(p.subnet, peer.subnet)) {
            skip(format!(
                "podCIDR {} overlaps node {}'s {}",
                peer.subnet, other.name, other.subnet
            ));
            continue;
        }
        if peer.public_ip == local_ip {
            skip(format!("public IP {} is this node's", peer.public_ip));
            continue;
        }
        if let Some(other) = peers.iter().find(|p| p.public_ip == peer.public_ip) {
            skip(format!(
                "public IP {} is also node {}'s",
                peer.public_ip, other.name
            ));
            continue;
        }
        if let (Some(want), Some(got)) = (vxlan_vni, peer.vni) {
            if want != got {
                skip(format!("VNI {got} differs from this node's {want}"));
                continue;
            }
        }
        peers.push(peer);
    }
    (peers, skipped)
}

/// True when two networks share any address.
pub fn overlaps(a: Ipv4Net, b: Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeAddress, NodeSpec, NodeStatus};
    use kube::api::ObjectMeta;

    pub fn node(name: &str, cidr: Option<&str>, ip: &str, mac: Option<&str>) -> Node {
        let mut ann = BTreeMap::new();
        ann.insert(ANN_PUBLIC_IP.to_string(), ip.to_string());
        if let Some(m) = mac {
            ann.insert(
                ANN_BACKEND_DATA.to_string(),
                format!(r#"{{"VNI":1,"VtepMAC":"{m}"}}"#),
            );
        }
        Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                annotations: Some(ann),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                pod_cidr: cidr.map(String::from),
                pod_cidrs: cidr.map(|c| vec![c.to_string()]),
                ..Default::default()
            }),
            status: None,
        }
    }

    const CLUSTER: &str = "10.244.0.0/16";

    fn select(nodes: &[Node], vni: Option<u32>) -> (Vec<Peer>, Vec<Skipped>) {
        select_peers(
            "a",
            "10.244.0.0/24".parse().unwrap(),
            "192.0.2.1".parse().unwrap(),
            CLUSTER.parse().unwrap(),
            vni,
            nodes,
        )
    }

    #[test]
    fn mac_roundtrip() {
        let m: Mac = "0A:1b:2c:3d:4e:5f".parse().unwrap();
        assert_eq!(m.to_string(), "0a:1b:2c:3d:4e:5f");
        assert!("0a:1b:2c:3d:4e".parse::<Mac>().is_err());
        assert!("0a:1b:2c:3d:4e:zz".parse::<Mac>().is_err());
    }

    #[test]
    fn good_peers_are_selected_and_sorted() {
        let nodes = vec![
            node(
                "c",
                Some("10.244.2.0/24"),
                "192.0.2.3",
                Some("02:00:00:00:00:03"),
            ),
            node(
                "a",
                Some("10.244.0.0/24"),
                "192.0.2.1",
                Some("02:00:00:00:00:01"),
            ),
            node(
                "b",
                Some("10.244.1.0/24"),
                "192.0.2.2",
                Some("02:00:00:00:00:02"),
            ),
        ];
        let (peers, skipped) = select(&nodes, Some(1));
        assert!(skipped.is_empty(), "{skipped:?}");
        assert_eq!(
            peers.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
            ["b", "c"]
        );
        assert_eq!(peers[0].vtep_mac.unwrap().to_string(), "02:00:00:00:00:02");
        assert_eq!(peers[0].public_ip.to_string(), "192.0.2.2");
    }

    #[test]
    fn bad_nodes_are_skipped_with_reasons_and_others_survive() {
        let mut bad_ann = node("e", Some("10.244.4.0/24"), "192.0.2.5", None);
        bad_ann
            .metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(ANN_BACKEND_DATA.into(), "{not json".into());
        let nodes = vec![
            node(
                "b",
                Some("10.244.1.0/24"),
                "192.0.2.2",
                Some("02:00:00:00:00:02"),
            ),
            node("c", None, "192.0.2.3", Some("02:00:00:00:00:03")),
            node(
                "d",
                Some("10.244.1.0/25"),
                "192.0.2.4",
                Some("02:00:00:00:00:04"),
            ),
            bad_ann,
            node(
                "f",
                Some("10.244.0.0/24"),
                "192.0.2.6",
                Some("02:00:00:00:00:06"),
            ),
            node(
                "g",
                Some("10.9.0.0/24"),
                "192.0.2.7",
                Some("02:00:00:00:00:07"),
            ),
            node(
                "h",
                Some("10.244.7.0/24"),
                "bogus",
                Some("02:00:00:00:00:08"),
            ),
            node("i", Some("10.244.8.0/24"), "192.0.2.9", None),
            node(
                "j",
                Some("10.244.9.0/24"),
                "192.0.2.2",
                Some("02:00:00:00:00:0a"),
            ),
            node(
                "k",
                Some("10.244.10.1/24"),
                "192.0.2.11",
                Some("02:00:00:00:00:0b"),
            ),
            node(
                "l",
                Some("10.244.11.0/24"),
                "192.0.2.12",
                Some("ff:ff:ff:ff:ff:ff"),
            ),
        ];
        let (peers, skipped) = select(&nodes, Some(1));
        assert_eq!(peers.len(), 1);
        assert_eq!(peers[0].name, "b");
        let reason = |n: &str| {
            skipped
                .iter()
                .find(|s| s.name == n)
                .map(|s| s.reason.clone())
                .unwrap_or_else(|| panic!("{n} not skipped"))
        };
        assert!(reason("c").contains("no spec.podCIDR"));
        assert!(reason("d").contains("overlaps node b"));
        assert!(reason("e").contains("malformed annotation"));
        assert!(reason("f").contains("overlaps this node"));
        assert!(reason("g").contains("outside the cluster CIDR"));
        assert!(reason("h").contains(ANN_PUBLIC_IP));
        assert!(reason("i").contains("VXLAN not ready"));
        assert!(reason("j").contains("also node b"));
        assert!(reason("k").contains("host bits"));
        assert!(reason("l").contains("unicast"));
    }

    #[test]
    fn host_gw_needs_no_backend_data_and_falls_back_to_internal_ip() {
        let mut n = node("b", Some("10.244.1.0/24"), "x", None);
        n.metadata.annotations = None;
        n.status = Some(NodeStatus {
            addresses: Some(vec![NodeAddress {
                type_: "InternalIP".into(),
                address: "192.0.2.2".into(),
            }]),
            ..Default::default()
        });
        let (peers, skipped) = select(&[n], None);
        assert!(skipped.is_empty(), "{skipped:?}");
        assert_eq!(peers[0].public_ip.to_string(), "192.0.2.2");
        assert_eq!(peers[0].vtep_mac, None);
    }

    #[test]
    fn vni_mismatch_is_skipped() {
        let mut n = node("b", Some("10.244.1.0/24"), "192.0.2.2", None);
        n.metadata.annotations.as_mut().unwrap().insert(
            ANN_BACKEND_DATA.into(),
            r#"{"VNI":7,"VtepMAC":"02:00:00:00:00:02"}"#.into(),
        );
        let (peers, skipped) = select(&[n], Some(1));
        assert!(peers.is_empty());
        assert!(skipped[0].reason.contains("VNI 7"));
    }
}
