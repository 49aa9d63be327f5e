//! iptables mode against the real kernel, inside network namespaces (needs root).

mod common;

use common::*;
use ferry_proxy::iptables::IptablesDatapath;
use ferry_proxy::{Datapath, Runner};
use ferry_testkit::require_root;

fn mk(r: Runner) -> Box<dyn Datapath> {
    Box::new(IptablesDatapath::new(r))
}

fn mk_legacy(r: Runner) -> Box<dyn Datapath> {
    Box::new(IptablesDatapath::with_binary(r, "iptables-legacy"))
}

/// Rules (with packet counters) of services the update must not touch: a
/// rewritten chain would come back with zeroed counters. Their chains are the
/// targets of their FERRY-SERVICES/FERRY-NODEPORTS rules, and what those jump to.
fn snapshot(r: &Runner) -> String {
    let out = r.run("iptables-save", &["-c", "-t", "nat"]).unwrap();
    let untouched =
        |l: &str| l.contains("ns/np") || l.contains("ns/sticky") || l.contains("ns/local");
    let target = |l: &str| l.rsplit(" -j ").next().unwrap_or_default().to_string();
    let mut chains: std::collections::BTreeSet<String> = out
        .lines()
        .filter(|l| {
            untouched(l) && (l.contains("-A FERRY-SERVICES") || l.contains("-A FERRY-NODEPORTS"))
        })
        .map(target)
        .collect();
    for _ in 0..2 {
        let deeper: Vec<String> = out
            .lines()
            .filter(|l| chains.iter().any(|c| l.contains(&format!("-A {c} "))))
            .map(target)
            .filter(|t| t.starts_with("FERRY-S") || t.starts_with("FERRY-EXT"))
            .collect();
        chains.extend(deeper);
    }
    assert!(chains.len() >= 5, "{chains:?}");
    out.lines()
        .filter(|l| chains.iter().any(|c| l.contains(&format!("-A {c} "))))
        .collect::<Vec<_>>()
        .join("\n")
}

fn leftovers(r: &Runner) -> String {
    let mut s = String::new();
    for t in ["nat", "filter"] {
        s += &r.run("iptables-save", &["-t", t]).unwrap();
    }
    s.lines()
        .filter(|l| l.contains("FERRY"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn legacy_clusterip_tcp_udp_reaches_every_endpoint() {
    if require_root() {
        check_clusterip_reaches_every_endpoint(mk_legacy);
    }
}

#[test]
fn clusterip_tcp_udp_reaches_every_endpoint() {
    if require_root() {
        check_clusterip_reaches_every_endpoint(mk);
    }
}

#[test]
fn no_endpoint_service_refused_at_once() {
    if require_root() {
        // iptables can only REJECT after routing (FORWARD), where the kernel's
        // per-host ICMP rate limit (net.ipv4.icmp_ratelimit, 1 s) swallows the
        // port-unreachable for UDP; kube-proxy's iptables mode behaves the same.
        // TCP (reset) is unaffected. nftables mode rejects in prerouting.
        check_no_endpoints_refused_at_once(mk, &[("net.ipv4.icmp_ratelimit", "0")]);
    }
}

#[test]
fn nodeport_external_ip_and_local_policy() {
    if require_root() {
        check_nodeport_and_local_policy(mk);
    }
}

#[test]
fn affinity_sticks() {
    if require_root() {
        check_affinity_sticks(mk);
    }
}

#[test]
fn update_of_one_service_changes_only_it() {
    if require_root() {
        check_update_changes_only_one_service(mk, snapshot);
    }
}

#[test]
fn cleanup_removes_everything() {
    if require_root() {
        check_cleanup(mk, leftovers);
    }
}

#[test]
fn resync_after_restart_removes_stale_objects() {
    if require_root() {
        check_resync(mk);
    }
}

#[test]
fn udp_stream_moves_to_new_backend_within_1s() {
    if require_root() {
        check_udp_stream_moves_after_endpoint_removal(mk);
    }
}
