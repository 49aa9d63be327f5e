//! Masquerade of pod traffic leaving the cluster CIDR: flannel's four rules in
//! a private nftables table (`ip ferry_overlay`), replaced atomically with `nft -f -`.

use std::io::Write;
use std::process::{Command, Stdio};

use anyhow::{bail, Context};
use ipnet::Ipv4Net;

pub const TABLE: &str = "ferry_overlay";

/// The whole table. Rules, in order (as flannel's):
/// 1. pod → pod inside the cluster: not NATed;
/// 2. pod → outside (not multicast): masquerade;
/// 3. outside → this node's pods: not NATed;
/// 4. outside → other nodes' pods (e.g. node ports): masquerade.
pub fn render(cluster: Ipv4Net, subnet: Ipv4Net) -> String {
    format!(
        "table ip {TABLE}\n\
         delete table ip {TABLE}\n\
         table ip {TABLE} {{\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tip saddr {cluster} ip daddr {cluster} return\n\
         \t\tip saddr {cluster} ip daddr != 224.0.0.0/4 masquerade fully-random\n\
         \t\tip saddr != {cluster} ip daddr {subnet} return\n\
         \t\tip saddr != {cluster} ip daddr {cluster} masquerade fully-random\n\
         \t}}\n\
         }}\n"
    )
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
pub fn apply(cluster: Ipv4Net, subnet: Ipv4Net) -> anyhow::Result<()> {
    nft(&["-f", "-"], Some(&render(cluster, subnet))).map(|_| ())
}

/// Removes the table if present.
pub fn remove() -> anyhow::Result<()> {
    if nft(&["list", "table", "ip", TABLE], None).is_ok() {
        nft(&["delete", "table", "ip", TABLE], None)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_has_flannel_rules() {
        let t = render(
            "10.244.0.0/16".parse().unwrap(),
            "10.244.1.0/24".parse().unwrap(),
        );
        assert!(t.starts_with("table ip ferry_overlay\ndelete table ip ferry_overlay\n"));
        assert!(t.contains("ip saddr 10.244.0.0/16 ip daddr 10.244.0.0/16 return"));
        assert!(
            t.contains("ip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random")
        );
        assert!(t.contains("ip saddr != 10.244.0.0/16 ip daddr 10.244.1.0/24 return"));
        assert!(t.contains("ip saddr != 10.244.0.0/16 ip daddr 10.244.0.0/16 masquerade"));
    }
}
