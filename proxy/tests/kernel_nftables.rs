//! nftables mode against the real kernel, inside network namespaces (needs root).

mod common;

use common::*;
use ferry_proxy::nftables::NftablesDatapath;
use ferry_proxy::{Datapath, Runner};
use ferry_testkit::require_root;

fn mk(r: Runner) -> Box<dyn Datapath> {
    Box::new(NftablesDatapath::new(r))
}

/// Lines of the table that belong to services the update must not touch, with handles.
fn snapshot(r: &Runner) -> String {
    let out = r
        .run("nft", &["-a", "list", "table", "ip", "ferry"])
        .unwrap();
    out.lines()
        .filter(|l| l.contains("ns/np") || l.contains("ns/sticky") || l.contains("ns/local"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn leftovers(r: &Runner) -> String {
    r.run("nft", &["list", "ruleset"])
        .unwrap()
        .trim()
        .to_string()
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
        check_no_endpoints_refused_at_once(mk, &[]);
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

#[test]
fn cross_mode_cleanup() {
    if require_root() {
        check_cross_mode_cleanup();
    }
}

/// Every set and map line of the table, split at element boundaries and sorted
/// (hash sets list their elements in a per-set random order).
fn table_items(r: &Runner) -> Vec<String> {
    let out = r.run("nft", &["list", "table", "ip", "ferry"]).unwrap();
    let mut items: Vec<String> = out
        .split([',', '\n', '{', '}'])
        .map(|s| s.trim().trim_start_matches("elements = ").to_string())
        .filter(|s| !s.is_empty())
        .collect();
    items.sort();
    items
}

/// Elements written over netlink read back exactly as the same elements written
/// by nft from text: keys, values, verdicts and comments.
#[test]
fn netlink_elements_match_nft_text() {
    if !require_root() {
        return;
    }
    use ferry_proxy::nftables::{render_full_transaction, Existing};
    let model = build_model(&[0, 1, 2, 3]);
    let by_netlink = ferry_testkit::Netns::new("nl").unwrap();
    let by_text = ferry_testkit::Netns::new("text").unwrap();
    let (rn, rt) = (
        Runner::in_netns(by_netlink.name()),
        Runner::in_netns(by_text.name()),
    );
    NftablesDatapath::new(rn.clone()).sync_full(&model).unwrap();
    rt.run_stdin(
        "nft",
        &["-f", "-"],
        &render_full_transaction(&model, &Existing::default()),
    )
    .unwrap();
    let (a, b) = (table_items(&rn), table_items(&rt));
    assert!(a.len() > 50, "{a:?}");
    assert_eq!(a, b);
}
