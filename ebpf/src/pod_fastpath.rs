//! Loader of the pod fast path (`bpf/pod_fastpath.c`, whose header explains
//! what takes the fast path and what does not).
//!
//! Everything lives pinned in one bpffs directory per node, so that it outlives
//! the processes that set it up and a restart picks it up again:
//!
//! ```text
//! DIR/from_pod          the program `ferry cni` attaches to each pod's host veth
//! DIR/fastpath_config   cluster CIDR and node subnet
//! DIR/pods              pod address → host veth, pod MAC, gateway MAC
//! DIR/nat_guard         pod sockets whose flows the stack may NAT
//! DIR/vteps             peer VTEP MAC → peer underlay address (flannel.1's FDB)
//! DIR/stats             packet counters per CPU ([`FastPath::counters`])
//! ```
//!
//! `to_pod` is attached to the node's underlay and tunnel devices and holds the
//! maps itself; tc filters keep both programs alive without any process.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap, Map, MapData, MapInfo, PerCpuArray};
use aya::programs::tc::{self, NlOptions, SchedClassifier, TcAttachOptions, TcAttachType};
use aya::{EbpfLoader, Pod};
use ipnet::Ipv4Net;

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/pod_fastpath.o"));

const CONFIG: &str = "fastpath_config";
const VTEPS: &str = "vteps";
const STATS: &str = "stats";
const MAPS: [&str; 5] = [CONFIG, "pods", "nat_guard", VTEPS, STATS];

/// The packet counters of `enum stat`, in its order: (program, action).
pub const COUNTERS: [(&str, &str); 7] = [
    ("from_pod", "routed"),
    ("from_pod", "encapsulated"),
    ("from_pod", "to_tunnel"),
    ("from_pod", "to_stack"),
    ("to_pod", "delivered"),
    ("to_pod", "decapsulated"),
    ("to_pod", "to_stack"),
];
const FROM_POD: &str = "from_pod";
const TO_POD: &str = "to_pod";

#[derive(Debug, thiserror::Error)]
#[error("pod fast path: {what}: {source}")]
pub struct Error {
    what: String,
    #[source]
    source: Box<dyn std::error::Error + Send + Sync>,
}

pub type Result<T> = std::result::Result<T, Error>;

trait Context<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: std::error::Error + Send + Sync + 'static> Context<T> for std::result::Result<T, E> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error {
            what: what(),
            source: Box::new(e),
        })
    }
}

/// `struct fastpath_config`: addresses, masks, VNI and port in network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FastPathConfig {
    cluster_net: [u8; 4],
    cluster_mask: [u8; 4],
    node_net: [u8; 4],
    node_mask: [u8; 4],
    vxlan_ifindex: u32,
    underlay_ifindex: u32,
    vtep_addr: [u8; 4],
    vni: [u8; 4],
    vxlan_port: [u8; 2],
    vtep_mac: [u8; 6],
}

// SAFETY: plain old data, no padding (4 × 4 + 2 × 4 + 2 × 4 + 2 + 6 bytes).
unsafe impl Pod for FastPathConfig {}

/// The node's VTEP, for VXLAN encapsulation and decapsulation in BPF.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Vtep {
    /// flannel.1: packets routed to it are encapsulated by from_pod instead.
    pub ifindex: u32,
    pub mac: [u8; 6],
    pub vni: u32,
    pub port: u16,
    /// The device encapsulated packets leave by, and its address.
    pub underlay_ifindex: u32,
    pub underlay_addr: Ipv4Addr,
}

impl FastPathConfig {
    /// Pods only: VXLAN, if any, stays with the vxlan driver.
    pub fn new(cluster: Ipv4Net, node_subnet: Ipv4Net) -> FastPathConfig {
        FastPathConfig {
            cluster_net: cluster.network().octets(),
            cluster_mask: cluster.netmask().octets(),
            node_net: node_subnet.network().octets(),
            node_mask: node_subnet.netmask().octets(),
            vxlan_ifindex: 0,
            underlay_ifindex: 0,
            vtep_addr: [0; 4],
            vni: [0; 4],
            vxlan_port: [0; 2],
            vtep_mac: [0; 6],
        }
    }

    /// VXLAN encapsulated and decapsulated in BPF for `vtep`.
    pub fn with_vxlan(self, vtep: Vtep) -> FastPathConfig {
        FastPathConfig {
            vxlan_ifindex: vtep.ifindex,
            underlay_ifindex: vtep.underlay_ifindex,
            vtep_addr: vtep.underlay_addr.octets(),
            // The header's VNI field is 24 bits followed by a reserved byte.
            vni: (vtep.vni << 8).to_be_bytes(),
            vxlan_port: vtep.port.to_be_bytes(),
            vtep_mac: vtep.mac,
            ..self
        }
    }
}

/// `struct vtep_key`: a peer's VTEP MAC.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct VtepKey {
    mac: [u8; 6],
    pad: u16,
}

// SAFETY: plain old data, no padding (6 + 2 bytes).
unsafe impl Pod for VtepKey {}

/// `struct pod_endpoint`: where to_pod delivers a pod's packets.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodEndpoint {
    pub host_ifindex: u32,
    pub pod_mac: [u8; 6],
    pub gateway_mac: [u8; 6],
}

// SAFETY: plain old data, no padding (4 + 6 + 6 bytes).
unsafe impl Pod for PodEndpoint {}

/// The map key of a pod address: its octets in network order.
fn pod_key(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

fn pod_addr(key: u32) -> Ipv4Addr {
    Ipv4Addr::from(key.to_ne_bytes())
}

/// One node's fast path, pinned under `dir`.
#[derive(Clone, Debug)]
pub struct FastPath {
    dir: PathBuf,
}

impl FastPath {
    pub fn new(dir: impl Into<PathBuf>) -> FastPath {
        FastPath { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn pin(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Whether a node's overlay installed it (the program `ferry cni` attaches is pinned).
    pub fn is_installed(&self) -> bool {
        self.pin(FROM_POD).exists()
    }

    /// Loads both programs (reusing the maps an earlier run pinned, so the
    /// pods already wired keep working), writes the config, pins `from_pod`
    /// for `ferry cni` and attaches `to_pod` to the ingress of each of
    /// `devices` in the calling thread's network namespace, replacing an
    /// earlier `to_pod`.
    pub fn install(&self, cfg: FastPathConfig, devices: &[&str]) -> Result<()> {
        crate::bpffs::ensure_dir(&self.dir).context(|| format!("{}", self.dir.display()))?;
        self.drop_stale_config()?;
        let pins: Vec<(&str, PathBuf)> = MAPS.iter().map(|m| (*m, self.pin(m))).collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        let mut bpf = loader
            .load(OBJECT)
            .context(|| "loading bpf/pod_fastpath.c".into())?;
        let mut config: Array<_, FastPathConfig> = Array::try_from(
            bpf.map_mut("fastpath_config")
                .expect("the object defines it"),
        )
        .context(|| "fastpath_config".into())?;
        config
            .set(0, cfg, 0)
            .context(|| "writing fastpath_config".into())?;
        for name in [FROM_POD, TO_POD] {
            let prog: &mut SchedClassifier = bpf
                .program_mut(name)
                .expect("the object defines it")
                .try_into()
                .context(|| name.to_string())?;
            prog.load().context(|| format!("verifying {name}"))?;
        }
        let from_pod: &mut SchedClassifier = bpf
            .program_mut(FROM_POD)
            .expect("loaded above")
            .try_into()
            .context(|| FROM_POD.into())?;
        let pin = self.pin(FROM_POD);
        let _ = std::fs::remove_file(&pin);
        from_pod
            .pin(&pin)
            .context(|| format!("pinning {}", pin.display()))?;
        let to_pod: &mut SchedClassifier = bpf
            .program_mut(TO_POD)
            .expect("loaded above")
            .try_into()
            .context(|| TO_POD.into())?;
        for dev in devices {
            attach(to_pod, dev, TO_POD)?;
        }
        Ok(())
    }

    /// An earlier version's config map has another layout and would not load;
    /// its content is rewritten at every install anyway.
    fn drop_stale_config(&self) -> Result<()> {
        let pin = self.pin(CONFIG);
        let stale = MapInfo::from_pin(&pin)
            .is_ok_and(|i| i.value_size() as usize != std::mem::size_of::<FastPathConfig>());
        if stale {
            std::fs::remove_file(&pin).context(|| format!("removing {}", pin.display()))?;
        }
        Ok(())
    }

    /// Makes the vteps map hold exactly `want` (peer VTEP MAC → underlay
    /// address), as the overlay makes flannel.1's FDB.
    pub fn set_vteps(&self, want: &BTreeMap<[u8; 6], Ipv4Addr>) -> Result<()> {
        let mut map: HashMap<MapData, VtepKey, [u8; 4]> = self.hash_map(VTEPS)?;
        let have: Vec<(VtepKey, [u8; 4])> = map
            .iter()
            .collect::<std::result::Result<_, _>>()
            .context(|| "reading the vteps map".into())?;
        for (k, v) in have {
            if want.get(&k.mac).map(|a| a.octets()) != Some(v) {
                map.remove(&k)
                    .context(|| format!("removing {:02x?} from the vteps map", k.mac))?;
            }
        }
        for (mac, addr) in want {
            let k = VtepKey { mac: *mac, pad: 0 };
            map.insert(k, addr.octets(), 0)
                .context(|| format!("adding {mac:02x?} → {addr} to the vteps map"))?;
        }
        Ok(())
    }

    /// Detaches `to_pod` from `device`, if attached there.
    pub fn detach(&self, device: &str) -> Result<()> {
        detach(device, TO_POD)
    }

    /// Wires one pod: its host veth's ingress runs `from_pod`, and `to_pod`
    /// delivers packets for `pod_ip` straight into its namespace.
    pub fn add_pod(&self, host_veth: &str, pod_ip: Ipv4Addr, ep: PodEndpoint) -> Result<()> {
        let mut pods = self.pods_map()?;
        pods.insert(pod_key(pod_ip), ep, 0)
            .context(|| format!("adding {pod_ip} to the pods map"))?;
        let pin = self.pin(FROM_POD);
        let mut prog =
            SchedClassifier::from_pin(&pin).context(|| format!("opening {}", pin.display()))?;
        attach(&mut prog, host_veth, FROM_POD)
    }

    /// Forgets a pod (its veth, and with it the attached program, is deleted
    /// by the caller). Succeeds when the pod was not there.
    pub fn remove_pod(&self, pod_ip: Ipv4Addr) -> Result<()> {
        let mut pods = self.pods_map()?;
        match pods.remove(&pod_key(pod_ip)) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e).context(|| format!("removing {pod_ip} from the pods map")),
        }
    }

    /// Packets counted since the counters were created, summed over CPUs, in
    /// the order of [`COUNTERS`].
    pub fn counters(&self) -> Result<[u64; COUNTERS.len()]> {
        let pin = self.pin(STATS);
        let data = MapData::from_pin(&pin).context(|| format!("opening {}", pin.display()))?;
        let map: PerCpuArray<MapData, u64> =
            PerCpuArray::try_from(Map::PerCpuArray(data)).context(|| "the stats map".into())?;
        let mut sums = [0u64; COUNTERS.len()];
        for (i, sum) in sums.iter_mut().enumerate() {
            let per_cpu = map
                .get(&(i as u32), 0)
                .context(|| format!("reading counter {i}"))?;
            *sum = per_cpu.iter().sum();
        }
        Ok(sums)
    }

    /// The pods map's entry for `pod_ip`, if any.
    pub fn pod(&self, pod_ip: Ipv4Addr) -> Result<Option<PodEndpoint>> {
        match self.pods_map()?.get(&pod_key(pod_ip), 0) {
            Ok(ep) => Ok(Some(ep)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e).context(|| format!("reading {pod_ip} in the pods map")),
        }
    }

    /// The pods map's entries.
    pub fn pods(&self) -> Result<Vec<(Ipv4Addr, PodEndpoint)>> {
        let pods = self.pods_map()?;
        pods.iter()
            .map(|kv| kv.map(|(k, v)| (pod_addr(k), v)))
            .collect::<std::result::Result<_, _>>()
            .context(|| "reading the pods map".into())
    }

    /// Detaches both programs from the devices named (the tunnel, the
    /// underlay, the pods' host veths), then removes the pins: every pod goes
    /// back to the stack.
    pub fn uninstall(&self, devices: &[String]) -> Result<()> {
        for dev in devices {
            detach(dev, TO_POD)?;
            detach(dev, FROM_POD)?;
        }
        match std::fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).context(|| format!("removing {}", self.dir.display()))
            }
            _ => Ok(()),
        }
    }

    fn pods_map(&self) -> Result<HashMap<MapData, u32, PodEndpoint>> {
        self.hash_map("pods")
    }

    fn hash_map<K: Pod, V: Pod>(&self, name: &str) -> Result<HashMap<MapData, K, V>> {
        let pin = self.pin(name);
        let data = MapData::from_pin(&pin).context(|| format!("opening {}", pin.display()))?;
        HashMap::try_from(Map::HashMap(data)).context(|| format!("the {name} map"))
    }
}

/// Attaches `prog` to `dev`'s ingress as a tc filter, replacing filters of the
/// same program name. Filters stay when this process exits.
fn attach(prog: &mut SchedClassifier, dev: &str, name: &str) -> Result<()> {
    if let Err(e) = tc::qdisc_add_clsact(dev) {
        let exists =
            matches!(&e, tc::TcError::NetlinkError(n) if n.raw_os_error() == Some(libc::EEXIST));
        if !exists {
            return Err(e).context(|| format!("adding the clsact qdisc to {dev}"));
        }
    }
    detach(dev, name)?;
    let id = prog
        .attach_with_options(
            dev,
            TcAttachType::Ingress,
            TcAttachOptions::Netlink(NlOptions::default()),
        )
        .context(|| format!("attaching {name} to {dev}"))?;
    let link = prog.take_link(id).context(|| format!("{name} on {dev}"))?;
    // A netlink tc filter holds the program; dropping the link would detach it.
    std::mem::forget(link);
    Ok(())
}

/// Removes `dev`'s ingress filters running program `name`; none is fine, and
/// so is a device that no longer exists.
fn detach(dev: &str, name: &str) -> Result<()> {
    match tc::qdisc_detach_program(dev, TcAttachType::Ingress, name) {
        Ok(()) => Ok(()),
        Err(tc::TcError::IoError(e)) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).context(|| format!("detaching {name} from {dev}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_in_network_order() {
        let c = FastPathConfig::new(
            "10.244.0.0/16".parse().unwrap(),
            "10.244.3.0/24".parse().unwrap(),
        );
        assert_eq!(c.cluster_net, [10, 244, 0, 0]);
        assert_eq!(c.cluster_mask, [255, 255, 0, 0]);
        assert_eq!(c.node_net, [10, 244, 3, 0]);
        assert_eq!(c.node_mask, [255, 255, 255, 0]);
        assert_eq!(c.vxlan_ifindex, 0, "VXLAN in BPF is off");
        assert_eq!(std::mem::size_of::<FastPathConfig>(), 40);
        let v = c.with_vxlan(Vtep {
            ifindex: 7,
            mac: [2, 0, 0, 0, 0, 1],
            vni: 1,
            port: 8472,
            underlay_ifindex: 3,
            underlay_addr: Ipv4Addr::new(198, 18, 0, 1),
        });
        assert_eq!((v.vxlan_ifindex, v.underlay_ifindex), (7, 3));
        assert_eq!(v.vni, [0, 0, 1, 0], "VNI 1 as the header carries it");
        assert_eq!(v.vxlan_port, [0x21, 0x18], "8472");
        assert_eq!(v.vtep_addr, [198, 18, 0, 1]);
        assert_eq!(v.node_net, c.node_net);
        assert_eq!(std::mem::size_of::<VtepKey>(), 8);
    }

    #[test]
    fn pod_keys_are_the_address_bytes_as_in_the_packet() {
        let ip = Ipv4Addr::new(10, 244, 1, 2);
        assert_eq!(pod_key(ip).to_ne_bytes(), [10, 244, 1, 2]);
        assert_eq!(pod_addr(pod_key(ip)), ip);
        assert_eq!(std::mem::size_of::<PodEndpoint>(), 16);
    }
}
