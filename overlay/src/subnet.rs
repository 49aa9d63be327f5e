//! flannel's `subnet.env`: FLANNEL_NETWORK, FLANNEL_SUBNET, FLANNEL_MTU,
//! FLANNEL_IPMASQ, and ferry's FERRY_FASTPATH_DIR (where the pod fast path is
//! pinned, when the overlay installed it; flannel's readers ignore the key).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use ipnet::Ipv4Net;

/// Default location, read by `ferry cni` unless its config says otherwise.
pub const DEFAULT_SUBNET_FILE: &str = "/run/ferry/subnet.env";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubnetEnv {
    /// The cluster CIDR.
    pub network: Ipv4Net,
    /// This node's pod subnet (network address and prefix).
    pub subnet: Ipv4Net,
    /// MTU for pod interfaces.
    pub mtu: u32,
    /// Whether the overlay masquerades pod traffic leaving the cluster CIDR.
    pub ipmasq: bool,
    /// The pod fast path's bpffs directory ([`ferry_ebpf::pod_fastpath`]).
    pub fastpath: Option<PathBuf>,
}

impl SubnetEnv {
    /// The gateway: the subnet's first host address (on cni0).
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.subnet.network()) + 1)
    }

    /// The file's text. FLANNEL_SUBNET is written as flannel does: gateway/prefix.
    pub fn render(&self) -> String {
        let mut s = format!(
            "FLANNEL_NETWORK={}\nFLANNEL_SUBNET={}/{}\nFLANNEL_MTU={}\nFLANNEL_IPMASQ={}\n",
            self.network,
            self.gateway(),
            self.subnet.prefix_len(),
            self.mtu,
            self.ipmasq
        );
        if let Some(dir) = &self.fastpath {
            s.push_str(&format!("FERRY_FASTPATH_DIR={}\n", dir.display()));
        }
        s
    }

    /// Parses the file's text; each missing or malformed key is named.
    pub fn parse(text: &str) -> Result<SubnetEnv, String> {
        let mut network = None;
        let mut subnet = None;
        let mut mtu = None;
        let mut ipmasq = false;
        let mut fastpath = None;
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((k, v)) = line.split_once('=') else {
                return Err(format!("line {line:?} is not KEY=VALUE"));
            };
            let v = v.trim().trim_matches('"');
            match k.trim() {
                "FLANNEL_NETWORK" => {
                    network = Some(
                        v.parse::<Ipv4Net>()
                            .map_err(|_| format!("FLANNEL_NETWORK {v:?} is not an IPv4 CIDR"))?
                            .trunc(),
                    )
                }
                "FLANNEL_SUBNET" => {
                    subnet = Some(
                        v.parse::<Ipv4Net>()
                            .map_err(|_| format!("FLANNEL_SUBNET {v:?} is not an IPv4 CIDR"))?
                            .trunc(),
                    )
                }
                "FLANNEL_MTU" => {
                    mtu = Some(
                        v.parse::<u32>()
                            .ok()
                            .filter(|m| (576..=65535).contains(m))
                            .ok_or_else(|| format!("FLANNEL_MTU {v:?} is not a valid MTU"))?,
                    )
                }
                "FLANNEL_IPMASQ" => {
                    ipmasq = v
                        .parse()
                        .map_err(|_| format!("FLANNEL_IPMASQ {v:?} is not true/false"))?
                }
                "FERRY_FASTPATH_DIR" => {
                    if !v.starts_with('/') {
                        return Err(format!("FERRY_FASTPATH_DIR {v:?} is not an absolute path"));
                    }
                    fastpath = Some(PathBuf::from(v))
                }
                _ => {}
            }
        }
        let subnet = subnet.ok_or("FLANNEL_SUBNET missing")?;
        let network = network.ok_or("FLANNEL_NETWORK missing")?;
        if subnet.prefix_len() > 30 {
            return Err(format!("FLANNEL_SUBNET {subnet} is too small"));
        }
        Ok(SubnetEnv {
            network,
            subnet,
            mtu: mtu.ok_or("FLANNEL_MTU missing")?,
            ipmasq,
            fastpath,
        })
    }

    pub fn read(path: &Path) -> anyhow::Result<SubnetEnv> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        SubnetEnv::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    /// Writes atomically (temp file + rename), creating the directory.
    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, self.render())
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> SubnetEnv {
        SubnetEnv {
            network: "10.244.0.0/16".parse().unwrap(),
            subnet: "10.244.3.0/24".parse().unwrap(),
            mtu: 1450,
            ipmasq: true,
            fastpath: None,
        }
    }

    #[test]
    fn render_is_flannel_format_and_roundtrips() {
        let text = env().render();
        assert_eq!(
            text,
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
        );
        assert_eq!(SubnetEnv::parse(&text).unwrap(), env());
        assert_eq!(env().gateway().to_string(), "10.244.3.1");
    }

    #[test]
    fn errors_name_the_key() {
        let e = SubnetEnv::parse("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_MTU=1450\n").unwrap_err();
        assert!(e.contains("FLANNEL_SUBNET"), "{e}");
        let e = SubnetEnv::parse("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=x\n").unwrap_err();
        assert!(e.contains("FLANNEL_SUBNET"), "{e}");
        let e = SubnetEnv::parse(
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=12\n",
        )
        .unwrap_err();
        assert!(e.contains("FLANNEL_MTU"), "{e}");
    }

    #[test]
    fn fastpath_dir_roundtrips_and_must_be_absolute() {
        let mut e = env();
        e.fastpath = Some("/sys/fs/bpf/ferry/overlay".into());
        let text = e.render();
        assert!(text.ends_with("FERRY_FASTPATH_DIR=/sys/fs/bpf/ferry/overlay\n"));
        assert_eq!(SubnetEnv::parse(&text).unwrap(), e);
        let bad = text.replace("=/sys", "=sys");
        assert!(SubnetEnv::parse(&bad)
            .unwrap_err()
            .contains("FERRY_FASTPATH_DIR"));
    }

    #[test]
    fn write_and_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/subnet.env");
        env().write(&p).unwrap();
        assert_eq!(SubnetEnv::read(&p).unwrap(), env());
    }
}
