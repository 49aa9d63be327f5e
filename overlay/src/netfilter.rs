//! The overlay's private nftables table (`ip ferry_overlay`), replaced
//! atomically with `nft -f -`: masquerade of pod traffic leaving the cluster
//! CIDR (flannel's four rules) and, for VXLAN, no connection tracking of the
//! encapsulated packets between nodes.

use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use anyhow::{bail, Context};
use ipnet::Ipv4Net;

pub const TABLE: &str = "ferry_overlay";

/// What the table holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rules {
    /// Masquerade, given the cluster CIDR and this node's pod subnet.
    pub masquerade: Option<(Ipv4Net, Ipv4Net)>,
    /// VXLAN between nodes: this node's underlay address and the UDP port.
    pub vxlan_notrack: Option<(Ipv4Addr, u16)>,
}

/// The whole table.
///
/// Masquerade rules, in order (as flannel's):
/// 1. pod → pod inside the cluster: not NATed;
/// 2. pod → outside (not multicast): masquerade;
/// 3. outside → this node's pods: not NATed;
/// 4. outside → other nodes' pods (e.g. node ports): masquerade.
///
/// VXLAN packets this node sends and receives are not tracked: nothing NATs
/// them (NAT of them was flannel's checksum bug), and tracking cost a conntrack
/// lookup per packet at each end. Matched by this node's address, so a pod's
/// traffic to some service on the same port is tracked (and NATed) as usual.
pub fn render(rules: Rules) -> String {
    let mut t = format!("table ip {TABLE}\ndelete table ip {TABLE}\ntable ip {TABLE} {{\n");
    if let Some((cluster, subnet)) = rules.masquerade {
        t.push_str(&format!(
            "\tchain postrouting {{\n\
             \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\tip saddr {cluster} ip daddr {cluster} return\n\
             \t\tip saddr {cluster} ip daddr != 224.0.0.0/4 masquerade fully-random\n\
             \t\tip saddr != {cluster} ip daddr {subnet} return\n\
             \t\tip saddr != {cluster} ip daddr {cluster} masquerade fully-random\n\
             \t}}\n"
        ));
    }
    if let Some((node, port)) = rules.vxlan_notrack {
        for (chain, hook, dir) in [
            ("vxlan_in", "prerouting", "daddr"),
            ("vxlan_out", "output", "saddr"),
        ] {
            t.push_str(&format!(
                "\tchain {chain} {{\n\
                 \t\ttype filter hook {hook} priority raw; policy accept;\n\
                 \t\tip {dir} {node} udp dport {port} notrack\n\
                 \t}}\n"
            ));
        }
    }
    t.push_str("}\n");
    t
}

fn nft(args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
    let mut child = Command::new("nft")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running nft")?;
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "nft {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Installs (or replaces) the table in the calling thread's network namespace.
pub fn apply(rules: Rules) -> anyhow::Result<()> {
    nft(&["-f", "-"], Some(&render(rules))).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_has_flannel_rules() {
        let t = render(Rules {
            masquerade: Some((
                "10.244.0.0/16".parse().unwrap(),
                "10.244.1.0/24".parse().unwrap(),
            )),
            vxlan_notrack: None,
        });
        assert!(t.starts_with("table ip ferry_overlay\ndelete table ip ferry_overlay\n"));
        assert!(t.contains("ip saddr 10.244.0.0/16 ip daddr 10.244.0.0/16 return"));
        assert!(
            t.contains("ip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random")
        );
        assert!(t.contains("ip saddr != 10.244.0.0/16 ip daddr 10.244.1.0/24 return"));
        assert!(t.contains("ip saddr != 10.244.0.0/16 ip daddr 10.244.0.0/16 masquerade"));
        assert!(!t.contains("notrack"));
    }

    #[test]
    fn vxlan_packets_of_this_node_are_not_tracked() {
        let t = render(Rules {
            masquerade: None,
            vxlan_notrack: Some(("198.18.0.1".parse().unwrap(), 8472)),
        });
        assert!(!t.contains("masquerade"));
        assert!(t.contains("hook prerouting priority raw;"));
        assert!(t.contains("ip daddr 198.18.0.1 udp dport 8472 notrack"));
        assert!(t.contains("hook output priority raw;"));
        assert!(t.contains("ip saddr 198.18.0.1 udp dport 8472 notrack"));
        // An empty table is still a valid replacement.
        let empty = render(Rules {
            masquerade: None,
            vxlan_notrack: None,
        });
        assert!(empty.ends_with("table ip ferry_overlay {\n}\n"));
    }
}
