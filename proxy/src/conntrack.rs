//! Stale UDP conntrack cleanup after each sync, with conntrack(8)
//! (Debian package `conntrack`).
//!
//! UDP has no connection teardown: an entry keeps steering a client's packets to a
//! removed endpoint (or, for a service that had none, nowhere) until it times out.
//!
//! Two ways to find stale entries:
//! * after a partial sync, from the diff ([`stale_udp`]): cheap, no listing;
//! * after the first sync of a process, by listing the UDP table and comparing
//!   every flow to a service frontend with the endpoints it may use
//!   ([`reconcile`], like kube-proxy's conntrack reconciler). A restart must not
//!   flush working flows (they would be re-balanced mid-stream), but must catch
//!   flows to endpoints removed while the proxy was down.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use crate::datapath::Runner;
use crate::model::{removed_endpoints, Change, ModelDiff, NodePortAddresses, Protocol, ProxyModel};

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
    /// Exactly one flow, by its original tuple.
    Flow(Flow),
}

/// The original direction of a UDP conntrack entry and where replies come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Flow {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    /// Source of the reply direction: the endpoint when the flow was DNATed,
    /// the original destination when it was not.
    pub reply_src: Ipv4Addr,
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
            Deletion::Flow(f) => {
                a.extend([
                    "--orig-src".into(),
                    f.src.to_string(),
                    "--orig-dst".into(),
                    f.dst.to_string(),
                    "--orig-port-src".into(),
                    f.sport.to_string(),
                    "--orig-port-dst".into(),
                    f.dport.to_string(),
                ]);
            }
        }
        a
    }
}

/// Parses `conntrack -L -p udp` output (IPv4 entries; others are skipped).
pub fn parse_flows(text: &str) -> Vec<Flow> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut src = Vec::new();
        let mut dst = None;
        let (mut sport, mut dport) = (None, None);
        for tok in line.split_whitespace() {
            let Some((k, v)) = tok.split_once('=') else {
                continue;
            };
            match k {
                "src" => src.push(v),
                "dst" if dst.is_none() => dst = Some(v),
                "sport" if sport.is_none() => sport = v.parse::<u16>().ok(),
                "dport" if dport.is_none() => dport = v.parse::<u16>().ok(),
                _ => {}
            }
        }
        let ip = |s: Option<&&str>| s.and_then(|s| s.parse::<Ipv4Addr>().ok());
        if let (Some(s), Some(d), Some(sp), Some(dp), Some(r)) = (
            ip(src.first()),
            ip(dst.as_ref()),
            sport,
            dport,
            ip(src.get(1)),
        ) {
            out.push(Flow {
                src: s,
                dst: d,
                sport: sp,
                dport: dp,
                reply_src: r,
            });
        }
    }
    out
}

/// Flows to a UDP frontend of `model` whose replies do not come from an endpoint
/// that frontend may use: DNATed to an endpoint that is gone, or not DNATed at
/// all (made while the service had no rules). Pure.
pub fn stale_flows(model: &ProxyModel, flows: &[Flow]) -> Vec<Deletion> {
    let mut frontends: BTreeMap<(Ipv4Addr, u16), BTreeSet<Ipv4Addr>> = BTreeMap::new();
    let mut node_ports: BTreeMap<u16, BTreeSet<Ipv4Addr>> = BTreeMap::new();
    for sp in model.services.values() {
        if sp.name.protocol != Protocol::Udp {
            continue;
        }
        let used: BTreeSet<Ipv4Addr> = sp.all_used_endpoints().iter().map(|e| e.ip).collect();
        for ip in sp.frontend_ips() {
            frontends
                .entry((ip, sp.port))
                .or_default()
                .extend(used.iter().copied());
        }
        if let Some(np) = sp.node_port {
            node_ports
                .entry(np)
                .or_default()
                .extend(used.iter().copied());
        }
    }
    // Where NodePorts are served (for All: any address; the port decides).
    let node_port_addr = |ip: Ipv4Addr| match &model.node_port_addresses {
        NodePortAddresses::Ips(ips) => ips.contains(&ip),
        NodePortAddresses::Cidrs(nets) => nets.iter().any(|n| n.contains(&ip)),
        NodePortAddresses::All => true,
    };
    let mut out: Vec<Deletion> = flows
        .iter()
        .filter(|f| {
            if let Some(eps) = frontends.get(&(f.dst, f.dport)) {
                return !eps.contains(&f.reply_src);
            }
            match node_ports.get(&f.dport) {
                Some(eps) => node_port_addr(f.dst) && !eps.contains(&f.reply_src),
                None => false,
            }
        })
        .map(|f| Deletion::Flow(*f))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Lists the UDP conntrack table and deletes the flows [`stale_flows`] finds.
/// Returns how many deletions failed.
pub fn reconcile(runner: &Runner, model: &ProxyModel) -> usize {
    let text = match runner.run("conntrack", &["-L", "-p", "udp"]) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!("listing conntrack entries: {e:#}");
            return 1;
        }
    };
    let stale = stale_flows(model, &parse_flows(&text));
    if !stale.is_empty() {
        tracing::debug!(flows = stale.len(), "deleting stale UDP conntrack entries");
    }
    apply(runner, &stale)
}

/// What to delete after applying `diff`, which led to `new` (pure).
pub fn stale_udp(new: &ProxyModel, diff: &ModelDiff) -> Vec<Deletion> {
    let mut out = Vec::new();
    for (k, change) in &diff.changes {
        if k.protocol != Protocol::Udp {
            continue;
        }
        let o = diff.previous.get(k);
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
        let d = stale_udp(&new, &diff(&old, &new));
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

    #[test]
    fn reconcile_keeps_working_flows_and_finds_stale_ones() {
        let dns = &[("dns", 53, "UDP")];
        let svcs = [with_node_ports(
            service("ns", "dns", "10.96.0.10", dns),
            &[30053],
        )];
        let m = build(
            &svcs,
            &[slice(
                "ns",
                "dns",
                "s",
                dns,
                &[ep("10.244.0.1", ""), ep("10.244.0.2", "")],
            )],
            Some(&node("n", &["192.168.1.10"])),
            &ModelConfig {
                node_name: "n".into(),
                ..Default::default()
            },
        );
        let text = "\
udp      17 29 src=10.0.0.5 dst=10.96.0.10 sport=4000 dport=53 src=10.244.0.1 dst=10.0.0.5 sport=53 dport=4000 [ASSURED] mark=0 use=1
udp      17 29 src=10.0.0.5 dst=10.96.0.10 sport=4001 dport=53 src=10.244.0.9 dst=10.0.0.5 sport=53 dport=4001 [ASSURED] mark=0 use=1
udp      17 29 src=10.0.0.5 dst=10.96.0.10 sport=4002 dport=53 [UNREPLIED] src=10.96.0.10 dst=10.0.0.5 sport=53 dport=4002 mark=0 use=1
udp      17 29 src=10.0.0.6 dst=192.168.1.10 sport=5000 dport=30053 src=10.244.0.2 dst=10.0.0.6 sport=53 dport=5000 mark=0 use=1
udp      17 29 src=10.0.0.6 dst=192.168.1.10 sport=5001 dport=30053 src=10.244.0.7 dst=10.0.0.6 sport=53 dport=5001 mark=0 use=1
udp      17 29 src=10.0.0.6 dst=8.8.8.8 sport=5002 dport=30053 src=8.8.8.8 dst=10.0.0.6 sport=30053 dport=5002 mark=0 use=1
udp      17 29 src=10.0.0.7 dst=10.0.0.8 sport=6000 dport=53 src=10.0.0.8 dst=10.0.0.7 sport=53 dport=6000 mark=0 use=1
";
        let flows = parse_flows(text);
        assert_eq!(flows.len(), 7);
        let d = stale_flows(&m, &flows);
        let sports: Vec<u16> = d
            .iter()
            .map(|d| match d {
                Deletion::Flow(f) => f.sport,
                other => panic!("{other:?}"),
            })
            .collect();
        // Gone endpoint, never DNATed, NodePort to a gone endpoint; the rest stay.
        assert_eq!(sports, vec![4001, 4002, 5001]);
        assert_eq!(
            d[0].args().join(" "),
            "-D -p udp --orig-src 10.0.0.5 --orig-dst 10.96.0.10 \
             --orig-port-src 4001 --orig-port-dst 53"
        );
    }
}
