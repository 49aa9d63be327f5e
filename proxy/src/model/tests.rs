use super::*;
use crate::fixtures::*;

fn cfg() -> ModelConfig {
    ModelConfig {
        node_name: "node-a".into(),
        cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
        masquerade_all: false,
        node_port_addresses: NodePortAddressesConfig::Primary,
    }
}

fn key(ns: &str, name: &str, port: &str, p: Protocol) -> ServicePortName {
    ServicePortName::new(ns, name, port, p)
}

const HTTP: &[(&str, u16, &str)] = &[("http", 80, "TCP")];

#[test]
fn clusterip_ready_endpoints() {
    let svcs = [service("ns", "web", "10.96.0.10", HTTP)];
    let slices = [slice(
        "ns",
        "web",
        "web-1",
        HTTP,
        &[
            ep("10.244.1.2", "node-b"),
            ep("10.244.1.1", "node-a"),
            ep("10.244.1.3", "node-b").not_ready(),
        ],
    )];
    let m = build(&svcs, &slices, None, &cfg());
    assert!(m.warnings.is_empty(), "{:?}", m.warnings);
    let sp = &m.services[&key("ns", "web", "http", Protocol::Tcp)];
    assert_eq!(sp.cluster_ip, "10.96.0.10".parse::<Ipv4Addr>().unwrap());
    assert_eq!(sp.port, 80);
    let ips: Vec<String> = sp
        .internal_endpoints()
        .iter()
        .map(|e| e.to_string())
        .collect();
    assert_eq!(ips, ["10.244.1.1:80", "10.244.1.2:80"]);
    assert_eq!(sp.local_endpoints.len(), 1);
    assert!(sp.local_endpoints[0].local);
    assert_eq!(sp.node_port, None);
    assert!(!sp.has_external());
}

#[test]
fn terminating_fallback_only_when_no_ready() {
    let svcs = [service("ns", "web", "10.96.0.10", HTTP)];
    let s1 = [slice(
        "ns",
        "web",
        "s",
        HTTP,
        &[ep("10.244.1.1", "n").terminating(), ep("10.244.1.2", "n")],
    )];
    let m = build(&svcs, &s1, None, &cfg());
    let sp = m.services.values().next().unwrap();
    assert_eq!(sp.cluster_endpoints.len(), 1);
    assert_eq!(sp.cluster_endpoints[0].ip.to_string(), "10.244.1.2");

    let s2 = [slice(
        "ns",
        "web",
        "s",
        HTTP,
        &[
            ep("10.244.1.1", "n").terminating(),
            ep("10.244.1.2", "n").not_ready(),
        ],
    )];
    let m = build(&svcs, &s2, None, &cfg());
    let sp = m.services.values().next().unwrap();
    assert_eq!(sp.cluster_endpoints.len(), 1);
    assert_eq!(sp.cluster_endpoints[0].ip.to_string(), "10.244.1.1");
}

#[test]
fn local_terminating_fallback() {
    let svcs = [service("ns", "web", "10.96.0.10", HTTP)];
    let s = [slice(
        "ns",
        "web",
        "s",
        HTTP,
        &[
            ep("10.244.1.1", "node-a").terminating(),
            ep("10.244.2.1", "node-b"),
        ],
    )];
    let m = build(&svcs, &s, None, &cfg());
    let sp = m.services.values().next().unwrap();
    assert_eq!(sp.cluster_endpoints.len(), 1);
    assert_eq!(sp.local_endpoints.len(), 1);
    assert_eq!(sp.local_endpoints[0].ip.to_string(), "10.244.1.1");
}

#[test]
fn skips_headless_externalname_and_other_proxy() {
    let headless = service("ns", "h", "None", HTTP);
    let mut extname = service("ns", "x", "", HTTP);
    extname.spec.as_mut().unwrap().type_ = Some("ExternalName".into());
    let mut other = service("ns", "o", "10.96.0.11", HTTP);
    other.metadata.labels =
        Some([(LABEL_SERVICE_PROXY_NAME.to_string(), "foo".to_string())].into());
    let slices = [
        slice("ns", "h", "h1", HTTP, &[ep("10.244.1.1", "")]),
        slice("ns", "o", "o1", HTTP, &[ep("10.244.1.1", "")]),
    ];
    let m = build(&[headless, extname, other], &slices, None, &cfg());
    assert!(m.services.is_empty());
    assert!(
        m.warnings.is_empty(),
        "slices of skipped services are not warnings: {:?}",
        m.warnings
    );
}

#[test]
fn bad_objects_are_skipped_with_warning_and_do_not_block_others() {
    let good = service("ns", "good", "10.96.0.1", HTTP);
    let bad_ip = service("ns", "badip", "10.96.0.999", HTTP);
    let mut bad_proto = service(
        "ns",
        "badproto",
        "10.96.0.2",
        &[("a", 80, "TCP"), ("b", 81, "QUIC")],
    );
    let _ = &mut bad_proto;
    let zero = service("ns", "zero", "10.96.0.3", &[("z", 0, "TCP")]);
    let slices = [
        slice(
            "ns",
            "good",
            "g",
            HTTP,
            &[ep("10.244.1.1", ""), ep("not-an-ip", "")],
        ),
        slice("ns", "missing", "m", HTTP, &[ep("10.244.1.9", "")]),
    ];
    let m = build(&[good, bad_ip, bad_proto, zero], &slices, None, &cfg());
    let reasons: Vec<String> = m.warnings.iter().map(|w| w.to_string()).collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("badip") && r.contains("invalid clusterIP")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("badproto") && r.contains("unknown protocol")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("zero") && r.contains("invalid port 0")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("invalid endpoint address")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("EndpointSlice ns/m") && r.contains("not found")),
        "{reasons:?}"
    );
    let good = &m.services[&key("ns", "good", "http", Protocol::Tcp)];
    assert_eq!(good.cluster_endpoints.len(), 1);
    // The valid port of the bad-protocol service still works.
    assert!(m
        .services
        .contains_key(&key("ns", "badproto", "a", Protocol::Tcp)));
    assert_eq!(m.services.len(), 2);
}

#[test]
fn protocols_and_port_matching() {
    let ports = &[("dns", 53, "UDP"), ("dns-tcp", 53, "TCP"), ("s", 9, "SCTP")];
    let svcs = [service("kube-system", "dns", "10.96.0.10", ports)];
    let slices = [slice(
        "kube-system",
        "dns",
        "d",
        &[
            ("dns", 5353, "UDP"),
            ("dns-tcp", 5353, "TCP"),
            ("s", 9, "SCTP"),
        ],
        &[ep("10.244.0.5", "")],
    )];
    let m = build(&svcs, &slices, None, &cfg());
    let udp = &m.services[&key("kube-system", "dns", "dns", Protocol::Udp)];
    assert_eq!(udp.cluster_endpoints[0].port, 5353);
    assert_eq!(udp.port, 53);
    assert!(m
        .services
        .contains_key(&key("kube-system", "dns", "dns-tcp", Protocol::Tcp)));
    assert!(m
        .services
        .contains_key(&key("kube-system", "dns", "s", Protocol::Sctp)));
}

#[test]
fn endpoints_dedup_across_slices() {
    let svcs = [service("ns", "web", "10.96.0.10", HTTP)];
    let slices = [
        slice("ns", "web", "a", HTTP, &[ep("10.244.1.1", "")]),
        slice(
            "ns",
            "web",
            "b",
            HTTP,
            &[ep("10.244.1.1", ""), ep("10.244.1.2", "")],
        ),
    ];
    let m = build(&svcs, &slices, None, &cfg());
    assert_eq!(
        m.services.values().next().unwrap().cluster_endpoints.len(),
        2
    );
}

#[test]
fn nodeport_lb_external_ips_and_policies() {
    let mut svc = with_load_balancer(
        with_node_ports(service("ns", "lb", "10.96.0.20", HTTP), &[30080]),
        &["192.0.2.10"],
    );
    {
        let spec = svc.spec.as_mut().unwrap();
        spec.external_ips = Some(vec!["192.0.2.20".into(), "bogus".into()]);
        spec.external_traffic_policy = Some("Local".into());
        spec.internal_traffic_policy = Some("Local".into());
        spec.health_check_node_port = Some(32000);
    }
    let slices = [slice(
        "ns",
        "lb",
        "s",
        HTTP,
        &[ep("10.244.1.1", "node-a"), ep("10.244.2.1", "node-b")],
    )];
    let node = node("node-a", &["192.168.50.2"]);
    let m = build(&[svc], &slices, Some(&node), &cfg());
    assert_eq!(m.warnings.len(), 1, "{:?}", m.warnings);
    let sp = m.services.values().next().unwrap();
    assert_eq!(sp.node_port, Some(30080));
    assert_eq!(
        sp.load_balancer_ips,
        vec!["192.0.2.10".parse::<Ipv4Addr>().unwrap()]
    );
    assert_eq!(
        sp.external_ips,
        vec!["192.0.2.20".parse::<Ipv4Addr>().unwrap()]
    );
    assert_eq!(sp.external_policy, TrafficPolicy::Local);
    assert_eq!(sp.internal_policy, TrafficPolicy::Local);
    assert_eq!(sp.external_endpoints().len(), 1);
    assert_eq!(sp.internal_endpoints().len(), 1);
    assert_eq!(sp.cluster_endpoints.len(), 2);
    assert_eq!(m.health_checks[&32000].local_endpoints, 1);
    assert_eq!(m.health_checks[&32000].name, "lb");
    assert_eq!(
        m.node_port_addresses,
        NodePortAddresses::Ips(vec!["192.168.50.2".parse().unwrap()])
    );
}

#[test]
fn etp_local_ignored_for_clusterip_service() {
    let mut svc = service("ns", "c", "10.96.0.20", HTTP);
    svc.spec.as_mut().unwrap().external_traffic_policy = Some("Local".into());
    let m = build(&[svc], &[], None, &cfg());
    assert_eq!(
        m.services.values().next().unwrap().external_policy,
        TrafficPolicy::Cluster
    );
}

#[test]
fn lb_ip_mode_proxy_is_skipped() {
    let mut svc = with_load_balancer(service("ns", "lb", "10.96.0.20", HTTP), &["192.0.2.10"]);
    svc.status = Some(
        serde_json::from_value(serde_json::json!({"loadBalancer": {"ingress": [{"ip": "192.0.2.10", "ipMode": "Proxy"}]}}))
            .unwrap(),
    );
    let m = build(&[svc], &[], None, &cfg());
    assert!(m
        .services
        .values()
        .next()
        .unwrap()
        .load_balancer_ips
        .is_empty());
}

#[test]
fn session_affinity() {
    let a = with_affinity(service("ns", "a", "10.96.0.1", HTTP), 60);
    let mut d = service("ns", "d", "10.96.0.2", HTTP);
    d.spec.as_mut().unwrap().session_affinity = Some("ClientIP".into());
    let n = service("ns", "n", "10.96.0.3", HTTP);
    let m = build(&[a, d, n], &[], None, &cfg());
    assert_eq!(
        m.services[&key("ns", "a", "http", Protocol::Tcp)].affinity_timeout,
        Some(60)
    );
    assert_eq!(
        m.services[&key("ns", "d", "http", Protocol::Tcp)].affinity_timeout,
        Some(DEFAULT_AFFINITY_TIMEOUT)
    );
    assert_eq!(
        m.services[&key("ns", "n", "http", Protocol::Tcp)].affinity_timeout,
        None
    );
}

#[test]
fn topology_hints() {
    let svcs = [service("ns", "web", "10.96.0.10", HTTP)];
    let mut s = slice(
        "ns",
        "web",
        "s",
        HTTP,
        &[ep("10.244.1.1", "node-a"), ep("10.244.2.1", "node-b")],
    );
    s.endpoints.as_mut().unwrap()[0].hints =
        Some(serde_json::from_value(serde_json::json!({"forZones": [{"name": "z1"}]})).unwrap());
    s.endpoints.as_mut().unwrap()[1].hints =
        Some(serde_json::from_value(serde_json::json!({"forZones": [{"name": "z2"}]})).unwrap());
    let mut n = node("node-b", &["192.168.50.3"]);
    n.metadata.labels = Some([(LABEL_ZONE.to_string(), "z2".to_string())].into());
    let mut c = cfg();
    c.node_name = "node-b".into();
    let m = build(&svcs, std::slice::from_ref(&s), Some(&n), &c);
    let sp = m.services.values().next().unwrap();
    assert_eq!(sp.cluster_endpoints.len(), 1);
    assert_eq!(sp.cluster_endpoints[0].ip.to_string(), "10.244.2.1");

    // PreferSameNode (forNodes hints).
    s.endpoints.as_mut().unwrap()[0].hints = Some(
        serde_json::from_value(serde_json::json!({"forNodes": [{"name": "node-a"}]})).unwrap(),
    );
    s.endpoints.as_mut().unwrap()[1].hints = Some(
        serde_json::from_value(serde_json::json!({"forNodes": [{"name": "node-b"}]})).unwrap(),
    );
    c.node_name = "node-a".into();
    let m = build(&svcs, std::slice::from_ref(&s), None, &c);
    let sp = m.services.values().next().unwrap();
    assert_eq!(sp.cluster_endpoints.len(), 1);
    assert_eq!(sp.cluster_endpoints[0].ip.to_string(), "10.244.1.1");

    // Missing hints on one endpoint: topology is ignored.
    s.endpoints.as_mut().unwrap()[1].hints = None;
    let m = build(&svcs, &[s], None, &c);
    assert_eq!(
        m.services.values().next().unwrap().cluster_endpoints.len(),
        2
    );
}

#[test]
fn nodeport_addresses_resolution() {
    let n = node("node-a", &["192.168.50.2"]);
    let mut c = cfg();
    assert_eq!(
        build(&[], &[], None, &c).node_port_addresses,
        NodePortAddresses::All
    );
    c.node_port_addresses = NodePortAddressesConfig::All;
    assert_eq!(
        build(&[], &[], Some(&n), &c).node_port_addresses,
        NodePortAddresses::All
    );
    c.node_port_addresses = NodePortAddressesConfig::Cidrs(vec!["192.168.0.0/16".parse().unwrap()]);
    assert!(matches!(
        build(&[], &[], Some(&n), &c).node_port_addresses,
        NodePortAddresses::Cidrs(_)
    ));
}

#[test]
fn diff_reports_only_changed_ports() {
    let svcs = vec![
        service("ns", "a", "10.96.0.1", HTTP),
        service("ns", "b", "10.96.0.2", HTTP),
        service("ns", "c", "10.96.0.3", HTTP),
    ];
    let s1 = vec![
        slice("ns", "a", "a", HTTP, &[ep("10.244.1.1", "")]),
        slice("ns", "b", "b", HTTP, &[ep("10.244.1.2", "")]),
    ];
    let m1 = build(&svcs, &s1, None, &cfg());
    assert!(diff(&m1, &m1).is_empty());
    let mut svcs2 = svcs.clone();
    svcs2.remove(2);
    svcs2.push(service("ns", "d", "10.96.0.4", HTTP));
    let s2 = vec![
        slice("ns", "a", "a", HTTP, &[ep("10.244.1.1", "")]),
        slice("ns", "b", "b", HTTP, &[ep("10.244.1.3", "")]),
    ];
    let m2 = build(&svcs2, &s2, None, &cfg());
    let d = diff(&m1, &m2);
    assert!(!d.globals_changed);
    assert_eq!(d.len(), 3);
    assert_eq!(
        d.changes[&key("ns", "b", "http", Protocol::Tcp)],
        Change::Updated
    );
    assert_eq!(
        d.changes[&key("ns", "c", "http", Protocol::Tcp)],
        Change::Removed
    );
    assert_eq!(
        d.changes[&key("ns", "d", "http", Protocol::Tcp)],
        Change::Added
    );
    let old_b = &m1.services[&key("ns", "b", "http", Protocol::Tcp)];
    let new_b = &m2.services[&key("ns", "b", "http", Protocol::Tcp)];
    let gone = removed_endpoints(old_b, Some(new_b));
    assert_eq!(gone.len(), 1);
    assert_eq!(gone[0].ip.to_string(), "10.244.1.2");

    let mut c = cfg();
    c.masquerade_all = true;
    assert!(diff(&m1, &build(&svcs, &s1, None, &c)).globals_changed);
}

#[test]
fn build_is_deterministic_regardless_of_order() {
    let svcs = vec![
        service("ns", "a", "10.96.0.1", HTTP),
        service("ns", "b", "10.96.0.2", HTTP),
    ];
    let slices = vec![
        slice(
            "ns",
            "a",
            "a",
            HTTP,
            &[ep("10.244.1.2", ""), ep("10.244.1.1", "")],
        ),
        slice("ns", "b", "b", HTTP, &[ep("10.244.1.3", "")]),
    ];
    let m1 = build(&svcs, &slices, None, &cfg());
    let mut sr = svcs.clone();
    sr.reverse();
    let mut slr = slices.clone();
    slr.reverse();
    let m2 = build(&sr, &slr, None, &cfg());
    assert_eq!(m1, m2);
}

#[test]
fn short_hash_is_stable() {
    assert_eq!(short_hash("ns/web:http/tcp"), short_hash("ns/web:http/tcp"));
    assert_ne!(short_hash("ns/web:http/tcp"), short_hash("ns/web:http/udp"));
    assert_eq!(short_hash("x").len(), 13);
}

/// Ports of [`local_lb`].
const TWO: &[(&str, u16, &str)] = &[("http", 80, "TCP"), ("dns", 53, "UDP")];

/// A LoadBalancer `ns/lb` (TCP 80 and UDP 53) with externalTrafficPolicy Local
/// and healthCheckNodePort 32000.
fn local_lb() -> Service {
    let mut svc = with_load_balancer(
        with_node_ports(service("ns", "lb", "10.96.0.20", TWO), &[30080, 30053]),
        &["192.0.2.10"],
    );
    let spec = svc.spec.as_mut().unwrap();
    spec.external_traffic_policy = Some("Local".into());
    spec.health_check_node_port = Some(32000);
    svc
}

/// healthCheckNodePort counts like kube-proxy: distinct ready local `ip:port`s
/// over all ports; local endpoints that are only serving-terminating count 0
/// (the load balancer drains the node) although traffic still uses them.
#[test]
fn health_check_counts_ready_local_endpoints() {
    let svc = local_lb();
    let node = node("node-a", &["192.168.50.2"]);
    let one_local = [slice(
        "ns",
        "lb",
        "s",
        TWO,
        &[ep("10.244.1.1", "node-a"), ep("10.244.2.1", "node-b")],
    )];
    let m = build(std::slice::from_ref(&svc), &one_local, Some(&node), &cfg());
    // One pod, two ports: kube-proxy counts ip:port, so 2.
    assert_eq!(m.health_checks[&32000].local_endpoints, 2);

    let terminating = [slice(
        "ns",
        "lb",
        "s",
        TWO,
        &[ep("10.244.1.1", "node-a").terminating()],
    )];
    let m = build(&[svc], &terminating, Some(&node), &cfg());
    assert_eq!(m.health_checks[&32000].local_endpoints, 0);
    let sp = m.services.values().next().unwrap();
    assert_eq!(sp.local_endpoints.len(), 1, "still served (fallback)");
}

/// Service-by-service updates give the same model as a full build after every
/// step, and report exactly the ports that changed, with their previous versions.
#[test]
fn incremental_updates_match_full_builds() {
    let node = node("node-a", &["192.168.50.2"]);
    let lb = local_lb();
    let mut bad = service("ns", "bad", "10.96.0.30", HTTP);
    bad.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].port = 0;
    // Each step: (services, slices) as the caches hold them.
    let steps: Vec<(Vec<Service>, Vec<EndpointSlice>)> = vec![
        (vec![service("ns", "a", "10.96.0.1", HTTP)], vec![]),
        (
            vec![service("ns", "a", "10.96.0.1", HTTP)],
            vec![slice("ns", "a", "a-1", HTTP, &[ep("10.244.1.1", "node-a")])],
        ),
        (
            vec![service("ns", "a", "10.96.0.1", HTTP), lb.clone()],
            vec![
                slice("ns", "a", "a-1", HTTP, &[ep("10.244.1.1", "node-a")]),
                slice("ns", "lb", "lb-1", TWO, &[ep("10.244.1.5", "node-a")]),
            ],
        ),
        (
            vec![service("ns", "a", "10.96.0.1", HTTP), lb.clone()],
            vec![
                slice("ns", "a", "a-1", HTTP, &[ep("10.244.1.1", "node-a")]),
                slice("ns", "a", "a-2", HTTP, &[ep("10.244.2.1", "node-b")]),
                slice("ns", "lb", "lb-1", TWO, &[ep("10.244.1.5", "node-a")]),
            ],
        ),
        (
            vec![service("ns", "a", "10.96.0.1", HTTP), lb.clone(), bad],
            vec![
                slice("ns", "a", "a-2", HTTP, &[ep("10.244.2.1", "node-b")]),
                slice("ns", "lb", "lb-1", TWO, &[ep("10.244.1.5", "node-a")]),
                slice("ns", "ghost", "g-1", HTTP, &[ep("10.244.2.9", "node-b")]),
            ],
        ),
        (
            vec![lb.clone()],
            vec![slice(
                "ns",
                "lb",
                "lb-1",
                TWO,
                &[ep("10.244.1.5", "node-a").terminating()],
            )],
        ),
    ];
    let mut state = ModelState::new(cfg(), Some(&node));
    let mut previous = state.model.clone();
    let mentioned = |(svcs, slices): &(Vec<Service>, Vec<EndpointSlice>)| -> Vec<ServiceKey> {
        svcs.iter()
            .map(|s| object_key(&s.metadata))
            .chain(slices.iter().filter_map(slice_service))
            .collect()
    };
    for (i, (svcs, slices)) in steps.iter().enumerate() {
        // Every service this step or the one before mentions is recomputed from
        // the caches, as the watchers mark them.
        let mut touched: BTreeSet<ServiceKey> = mentioned(&steps[i]).into_iter().collect();
        if i > 0 {
            touched.extend(mentioned(&steps[i - 1]));
        }
        let mut changes = BTreeMap::new();
        let mut prev_ports = BTreeMap::new();
        for k in &touched {
            let svc = svcs.iter().find(|s| &object_key(&s.metadata) == k);
            let sl: Vec<&EndpointSlice> = slices
                .iter()
                .filter(|s| slice_service(s).as_ref() == Some(k))
                .collect();
            let d = state.update(k, svc, &sl);
            changes.extend(d.changes);
            prev_ports.extend(d.previous);
        }
        let full = build(svcs, slices, Some(&node), &cfg());
        assert_eq!(state.model, full, "step {i}: incremental != full build");
        let expected = diff(&previous, &full);
        assert_eq!(changes, expected.changes, "step {i}: changes");
        assert_eq!(prev_ports, expected.previous, "step {i}: previous ports");
        previous = full;
    }
    // A rebuild over unchanged objects reports nothing.
    let (svcs, slices) = steps.last().unwrap();
    let s: Vec<&Service> = svcs.iter().collect();
    let e: Vec<&EndpointSlice> = slices.iter().collect();
    assert!(state.rebuild(&s, &e, Some(&node)).is_empty());
}
