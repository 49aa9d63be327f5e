//! Golden tests: a fixed model renders to the rulesets in tests/golden/ (no root needed).
//! Set UPDATE_GOLDEN=1 to rewrite the files after an intended change.

use ferry_proxy::fixtures::*;
use ferry_proxy::model::{self, ModelConfig, NodePortAddressesConfig, ProxyModel};
use ferry_proxy::nftables;

const HTTP: &[(&str, u16, &str)] = &[("http", 80, "TCP")];

fn config() -> ModelConfig {
    ModelConfig {
        node_name: "node-a".into(),
        cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
        masquerade_all: false,
        node_port_addresses: NodePortAddressesConfig::Primary,
    }
}

/// The fixed cluster the goldens describe.
fn objects(
    updated: bool,
) -> (
    Vec<k8s_openapi::api::core::v1::Service>,
    Vec<k8s_openapi::api::discovery::v1::EndpointSlice>,
) {
    let mut svcs = vec![
        service("ns", "web", "10.96.0.10", HTTP),
        service(
            "kube-system",
            "dns",
            "10.96.0.53",
            &[("dns", 53, "UDP"), ("dns-tcp", 53, "TCP")],
        ),
        with_node_ports(service("ns", "np", "10.96.0.30", HTTP), &[30080]),
        with_affinity(service("ns", "sticky", "10.96.0.40", HTTP), 60),
    ];
    let mut lb = with_load_balancer(
        with_node_ports(service("ns", "lb", "10.96.0.20", HTTP), &[30090]),
        &["192.0.2.10"],
    );
    {
        let s = lb.spec.as_mut().unwrap();
        s.external_ips = Some(vec!["192.0.2.20".into()]);
        s.external_traffic_policy = Some("Local".into());
        s.health_check_node_port = Some(32000);
    }
    svcs.push(lb);
    let mut itp = service("ns", "itp", "10.96.0.60", HTTP);
    itp.spec.as_mut().unwrap().internal_traffic_policy = Some("Local".into());
    svcs.push(itp);
    if !updated {
        svcs.push(with_node_ports(
            service("ns", "empty", "10.96.0.99", &[("http", 8080, "TCP")]),
            &[30099],
        ));
    } else {
        svcs.push(service("ns", "new", "10.96.0.70", HTTP));
    }
    let web_eps = if updated {
        vec![ep("10.244.1.1", "node-a"), ep("10.244.2.1", "node-b")]
    } else {
        vec![
            ep("10.244.1.1", "node-a"),
            ep("10.244.2.1", "node-b"),
            ep("10.244.2.2", "node-b"),
            ep("10.244.2.3", "node-b").not_ready(),
        ]
    };
    let mut slices = vec![
        slice("ns", "web", "web-abc", HTTP, &web_eps),
        slice(
            "kube-system",
            "dns",
            "dns-abc",
            &[("dns", 5353, "UDP"), ("dns-tcp", 5353, "TCP")],
            &[ep("10.244.2.53", "node-b")],
        ),
        slice(
            "ns",
            "np",
            "np-abc",
            HTTP,
            &[ep("10.244.2.30", "node-b"), ep("10.244.2.31", "node-b")],
        ),
        slice(
            "ns",
            "sticky",
            "sticky-abc",
            HTTP,
            &[ep("10.244.1.40", "node-a"), ep("10.244.2.40", "node-b")],
        ),
        slice(
            "ns",
            "lb",
            "lb-abc",
            HTTP,
            &[ep("10.244.1.20", "node-a"), ep("10.244.2.20", "node-b")],
        ),
        slice("ns", "itp", "itp-abc", HTTP, &[ep("10.244.2.60", "node-b")]),
    ];
    if updated {
        slices.push(slice(
            "ns",
            "new",
            "new-abc",
            HTTP,
            &[ep("10.244.2.70", "node-b")],
        ));
    }
    (svcs, slices)
}

pub fn golden_model(updated: bool) -> ProxyModel {
    let (svcs, slices) = objects(updated);
    let node = node("node-a", &["192.168.50.2"]);
    let m = model::build(&svcs, &slices, Some(&node), &config());
    assert!(m.warnings.is_empty(), "{:?}", m.warnings);
    m
}

fn check_golden(name: &str, actual: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run with UPDATE_GOLDEN=1 to create it)",
            path.display()
        )
    });
    if expected != actual {
        let first = expected
            .lines()
            .zip(actual.lines())
            .position(|(a, b)| a != b);
        panic!(
            "{} differs from the rendered output (first differing line {:?}); rerun with UPDATE_GOLDEN=1 if intended.\n--- rendered ---\n{actual}",
            path.display(),
            first.map(|l| l + 1)
        );
    }
}

#[test]
fn nftables_table_golden() {
    check_golden(
        "nftables-table.nft",
        &nftables::render_table(&golden_model(false)),
    );
}

#[test]
fn nftables_full_transaction_golden() {
    let existing = nftables::Existing {
        chains: ["svc-OLDOLDOL-ns/gone/tcp/http".to_string()].into(),
        sets: ["affinity-GONE".to_string()].into(),
    };
    check_golden(
        "nftables-full.nft",
        &nftables::render_full_transaction(&golden_model(false), &existing),
    );
}

#[test]
fn nftables_partial_transaction_golden() {
    let old = golden_model(false);
    let new = golden_model(true);
    let diff = model::diff(&old, &new);
    assert!(!diff.globals_changed);
    // web changed, empty removed, new added; nothing else.
    assert_eq!(diff.len(), 3, "{diff:?}");
    let old_objs = nftables::render_services(&old);
    let new_objs = nftables::render_services(&new);
    let pairs: Vec<_> = diff
        .changes
        .keys()
        .map(|k| (old_objs.get(k), new_objs.get(k)))
        .collect();
    let tx = nftables::render_partial_transaction(&pairs);
    check_golden("nftables-partial.nft", &tx);
    // Untouched services are not mentioned.
    assert!(!tx.contains("ns/np"), "{tx}");
    assert!(!tx.contains("dns"), "{tx}");
}

#[test]
fn iptables_full_restore_golden() {
    use ferry_proxy::iptables;
    let m = golden_model(false);
    let rendered = iptables::render_services(&m);
    let stale = ["FERRY-SVC-OLDOLDOLDOLDO".to_string()].into();
    check_golden(
        "iptables-full.rules",
        &iptables::render_restore(&m, &rendered, None, true, &stale),
    );
}

#[test]
fn iptables_partial_restore_golden() {
    use ferry_proxy::iptables;
    let old = golden_model(false);
    let new = golden_model(true);
    let diff = model::diff(&old, &new);
    let mut programmed = iptables::render_services(&old);
    let input = iptables::partial_restore(&mut programmed, &new, &diff);
    assert_eq!(programmed, iptables::render_services(&new));
    check_golden("iptables-partial.rules", &input);
    // Chains of untouched services are not declared (so not flushed).
    let np_chain = format!(
        "FERRY-SVC-{}",
        ferry_proxy::model::short_hash("ns/np:http/tcp")
    );
    assert!(!input.contains(&format!(":{np_chain}")), "{input}");
    assert!(
        input.contains(&format!("-j {np_chain}")),
        "still referenced from FERRY-SERVICES"
    );
}

/// A change of endpoints only rewrites that service's chain: no node-wide chain
/// (FERRY-SERVICES holds a rule per service) and no filter table.
#[test]
fn iptables_endpoint_change_rewrites_only_its_chain() {
    use ferry_proxy::iptables;
    let (svcs, mut slices) = objects(false);
    let node = node("node-a", &["192.168.50.2"]);
    let old = model::build(&svcs, &slices, Some(&node), &config());
    slices[0] = slice(
        "ns",
        "web",
        "web-abc",
        HTTP,
        &[ep("10.244.1.1", "node-a"), ep("10.244.2.9", "node-b")],
    );
    let new = model::build(&svcs, &slices, Some(&node), &config());
    let diff = model::diff(&old, &new);
    assert_eq!(diff.len(), 1);
    let mut programmed = iptables::render_services(&old);
    let input = iptables::partial_restore(&mut programmed, &new, &diff);
    assert!(!input.contains("*filter"), "{input}");
    assert!(!input.contains(iptables::SERVICES), "{input}");
    assert!(input.contains("--to-destination 10.244.2.9:80"), "{input}");
    let declared = input.lines().filter(|l| l.starts_with(':')).count();
    assert_eq!(declared, 1, "one chain declared: {input}");
}
