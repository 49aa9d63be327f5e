//! Stale UDP conntrack cleanup after each sync, with conntrack(8)
//! (Debian package `conntrack`).
//!
//! UDP has no connection teardown: an entry keeps steering a client's packets to a
//! removed endpoint (or, for a service that had none, nowhere) until it times out.

use std::net::Ipv4Addr;

use crate::datapath::Runner;
use crate::model::{removed_endpoints, Change, ModelDiff, Protocol, ProxyModel};

/// One `conntrack -D` filter.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Deletion {
    /// Flows to `frontend:port` that were NATed to `endpoint`.
    Endpoint {
        frontend: Ipv4Addr,
        port: u16,
        endpoint: Ipv4Addr,
    },
    /// Flows to a NodePort NATed to `endpoint`.
    NodePortEndpoint { node_port: u16, endpoint: Ipv4Addr },
    /// All flows to `frontend:port` (a service that just got its first endpoints).
    Frontend { frontend: Ipv4Addr, port: u16 },
    /// All flows to a NodePort that just got its first endpoints.
    NodePort { node_port: u16 },
}

impl Deletion {
    pub fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = ["-D", "-p", "udp"].map(String::from).to_vec();
        match self {
            Deletion::Endpoint {
                frontend,
                port,
                endpoint,
            } => {
                a.extend([
                    "--orig-dst".into(),
                    frontend.to_string(),
                    "--orig-port-dst".into(),
                    port.to_string(),
                ]);
                a.extend(["--dst-nat".into(), endpoint.to_string()]);
            }
            Deletion::NodePortEndpoint {
                node_port,
                endpoint,
            } => {
                a.extend([
                    "--orig-port-dst".into(),
                    node_port.to_string(),
                    "--dst-nat".into(),
                    endpoint.to_string(),
                ]);
            }
            Deletion::Frontend { frontend, port } => {
                a.extend([
                    "--orig-dst".into(),
                    frontend.to_string(),
                    "--orig-port-dst".into(),
                    port.to_string(),
                ]);
            }
            Deletion::NodePort { node_port } => {
                a.extend(["--orig-port-dst".into(), node_port.to_string()]);
            }
        }
        a
    }
}

/// What to delete after moving from `old` to `new` (pure).
pub fn stale_udp(old: &ProxyModel, new: &ProxyModel, diff: &ModelDiff) -> Vec<Deletion> {
    let mut out = Vec::new();
    for (k, change) in &diff.changes {
        if k.protocol != Protocol::Udp {
            continue;
        }
        let o = old.services.get(k);
        let n = new.services.get(k);
        if let Some(o) = o {
            for e in removed_endpoints(o, n) {
                for ip in o.frontend_ips() {
                    out.push(Deletion::Endpoint {
                        frontend: ip,
                        port: o.port,
                        endpoint: e.ip,
                    });
                }
                if let Some(np) = o.node_port {
                    out.push(Deletion::NodePortEndpoint {
                        node_port: np,
                        endpoint: e.ip,
                    });
                }
            }
        }
        if let Some(n) = n {
            let had =
                o.is_some_and(|o| !o.cluster_endpoints.is_empty()) && *change != Change::Added;
            if !had && !n.cluster_endpoints.is_empty() {
                for ip in n.frontend_ips() {
                    out.push(Deletion::Frontend {
                        frontend: ip,
                        port: n.port,
                    });
                }
                if let Some(np) = n.node_port {
                    out.push(Deletion::NodePort { node_port: np });
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Runs the deletions; "0 flow entries" is not an error. Returns how many commands failed.
pub fn apply(runner: &Runner, deletions: &[Deletion]) -> usize {
    let mut failed = 0;
    for d in deletions {
        let args = d.args();
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = runner.command("conntrack").args(&refs).output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) if String::from_utf8_lossy(&o.stderr).contains("0 flow entries") => {}
            Ok(o) => {
                failed += 1;
                tracing::warn!(
                    "conntrack {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&o.stderr).trim()
                );
            }
            Err(e) => {
                failed += 1;
                tracing::warn!("conntrack: {e}");
            }
        }
    }
    failed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::*;
    use crate::model::{build, diff, ModelConfig};

    #[test]
    fn removed_endpoint_and_first_endpoint() {
        let dns = &[("dns", 53, "UDP")];
        let svcs = [
            with_node_ports(service("ns", "dns", "10.96.0.10", dns), &[30053]),
            service("ns", "e", "10.96.0.11", dns),
        ];
        let c = ModelConfig::default();
        let old = build(
            &svcs,
            &[slice(
                "ns",
                "dns",
                "s",
                dns,
                &[ep("10.244.0.1", ""), ep("10.244.0.2", "")],
            )],
            None,
            &c,
        );
        let new = build(
            &svcs,
            &[
                slice("ns", "dns", "s", dns, &[ep("10.244.0.1", "")]),
                slice("ns", "e", "e", dns, &[ep("10.244.0.3", "")]),
            ],
            None,
            &c,
        );
        let d = stale_udp(&old, &new, &diff(&old, &new));
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        assert_eq!(
            d,
            vec![
                Deletion::Endpoint {
                    frontend: ip("10.96.0.10"),
                    port: 53,
                    endpoint: ip("10.244.0.2")
                },
                Deletion::NodePortEndpoint {
                    node_port: 30053,
                    endpoint: ip("10.244.0.2")
                },
                Deletion::Frontend {
                    frontend: ip("10.96.0.11"),
                    port: 53
                },
            ]
        );
        assert_eq!(
            d[0].args().join(" "),
            "-D -p udp --orig-dst 10.96.0.10 --orig-port-dst 53 --dst-nat 10.244.0.2"
        );
    }
}
