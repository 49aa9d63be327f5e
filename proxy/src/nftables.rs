//! nftables mode (the default): one private table `ip ferry`.
//!
//! The renderer is pure (model → nft text); [`NftablesDatapath`] feeds that text to
//! `nft -f -`, one atomic transaction per sync. See proxy/README.md for the rules.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::Ipv4Addr;

use anyhow::Context;

use crate::datapath::{Datapath, Runner};
use crate::model::{
    short_hash, Endpoint, ModelDiff, NodePortAddresses, Protocol, ProxyModel, ServicePort,
    TrafficPolicy,
};
use crate::nft_netlink::{ElementOp, NftSocket};

pub const TABLE: &str = "ferry";
pub const FAMILY: &str = "ip";
/// Packet mark bit asking the postrouting chain to masquerade (kube-proxy's value).
pub const MASQ_MARK: &str = "0x4000";

/// The named maps and sets service ports put elements in: four verdict maps, the
/// endpoint-choice (DNAT) maps (one per kind and protocol) and the hairpin set.
/// Per-service rules use only these named objects: anonymous sets make big kernel
/// transactions quadratic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NftMap {
    ServiceIps,
    ServiceNodeports,
    NoEndpointServices,
    NoEndpointNodeports,
    /// `frontend ip . port . index` → `endpoint ip . port` (ClusterIP: internal
    /// endpoints; externalIPs/LB IPs: cluster endpoints).
    ServiceBackends(Protocol),
    /// externalIPs/LB IPs with externalTrafficPolicy Local → local endpoints.
    ServiceLocalBackends(Protocol),
    /// `nodePort . index` → `endpoint ip . port` (cluster endpoints).
    NodeportBackends(Protocol),
    /// NodePorts with externalTrafficPolicy Local → local endpoints.
    NodeportLocalBackends(Protocol),
    /// `endpoint ip . ClusterIP . proto . port`: an endpoint calling its own service.
    ServiceHairpin,
}

const PROTOCOLS: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

impl NftMap {
    /// Every map and set, in creation order.
    pub fn all() -> Vec<NftMap> {
        let mut v = vec![
            NftMap::ServiceIps,
            NftMap::ServiceNodeports,
            NftMap::NoEndpointServices,
            NftMap::NoEndpointNodeports,
        ];
        for p in PROTOCOLS {
            v.extend([
                NftMap::ServiceBackends(p),
                NftMap::ServiceLocalBackends(p),
                NftMap::NodeportBackends(p),
                NftMap::NodeportLocalBackends(p),
            ]);
        }
        v.push(NftMap::ServiceHairpin);
        v
    }
    pub fn name(self) -> String {
        match self {
            NftMap::ServiceIps => "service-ips".into(),
            NftMap::ServiceNodeports => "service-nodeports".into(),
            NftMap::NoEndpointServices => "no-endpoint-services".into(),
            NftMap::NoEndpointNodeports => "no-endpoint-nodeports".into(),
            NftMap::ServiceBackends(p) => format!("service-backends-{}", p.as_str()),
            NftMap::ServiceLocalBackends(p) => format!("service-local-backends-{}", p.as_str()),
            NftMap::NodeportBackends(p) => format!("nodeport-backends-{}", p.as_str()),
            NftMap::NodeportLocalBackends(p) => format!("nodeport-local-backends-{}", p.as_str()),
            NftMap::ServiceHairpin => "service-hairpin".into(),
        }
    }
    /// `map`/`set` keyword and the declaration inside the braces. The DNAT maps are
    /// per protocol because their value is typed `ip daddr . <proto> dport`: nft
    /// 1.0.6 rejects a later rule `meta l4proto udp dnat … map @m` when m's typeof
    /// value is `th dport` or another protocol's port ("conflicting protocols").
    fn decl(self) -> (&'static str, String) {
        match self {
            NftMap::ServiceIps | NftMap::NoEndpointServices => (
                "map",
                "type ipv4_addr . inet_proto . inet_service : verdict;".into(),
            ),
            NftMap::ServiceNodeports | NftMap::NoEndpointNodeports => {
                ("map", "type inet_proto . inet_service : verdict;".into())
            }
            NftMap::ServiceBackends(p) | NftMap::ServiceLocalBackends(p) => (
                "map",
                format!(
                    "typeof ip daddr . th dport . numgen random mod 1 : ip daddr . {} dport;",
                    p.as_str()
                ),
            ),
            NftMap::NodeportBackends(p) | NftMap::NodeportLocalBackends(p) => (
                "map",
                format!(
                    "typeof th dport . numgen random mod 1 : ip daddr . {} dport;",
                    p.as_str()
                ),
            ),
            NftMap::ServiceHairpin => (
                "set",
                "typeof ip saddr . ip daddr . meta l4proto . th dport;".into(),
            ),
        }
    }
}

/// One field of a concatenated element key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KeyField {
    Ip(Ipv4Addr),
    Proto(Protocol),
    Port(u16),
    /// A `numgen random mod N` result: the endpoint's index.
    Index(u32),
}

impl std::fmt::Display for KeyField {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyField::Ip(ip) => write!(f, "{ip}"),
            KeyField::Proto(p) => f.write_str(p.as_str()),
            KeyField::Port(p) => write!(f, "{p}"),
            KeyField::Index(i) => write!(f, "{i}"),
        }
    }
}

/// What a map element maps its key to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ElementValue {
    /// A set element.
    None,
    Goto(String),
    Drop,
    /// An endpoint `ip . port` (DNAT maps).
    Endpoint(Ipv4Addr, u16),
}

/// One map or set element.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Element {
    pub map: NftMap,
    pub key: Vec<KeyField>,
    pub comment: String,
    pub value: ElementValue,
}

impl Element {
    fn key_text(&self) -> String {
        let fields: Vec<String> = self.key.iter().map(|k| k.to_string()).collect();
        fields.join(" . ")
    }
    fn text(&self) -> String {
        let mut t = self.key_text();
        if !self.comment.is_empty() {
            let _ = write!(t, " comment \"{}\"", self.comment);
        }
        match &self.value {
            ElementValue::None => {}
            ElementValue::Goto(c) => {
                let _ = write!(t, " : goto {c}");
            }
            ElementValue::Drop => t.push_str(" : drop"),
            ElementValue::Endpoint(ip, port) => {
                let _ = write!(t, " : {ip} . {port}");
            }
        }
        t
    }
}

/// Everything rendered for one service port: chains, affinity sets and map elements.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceObjects {
    /// chain name → rules.
    pub chains: BTreeMap<String, Vec<String>>,
    /// affinity set name → timeout (seconds).
    pub sets: BTreeMap<String, u32>,
    pub elements: BTreeSet<Element>,
    /// Endpoint-choice chains shared with other service ports (`backends-tcp-3`,
    /// `local-backends-udp-2`): created when first needed, deleted by a full sync
    /// once unused, never by a partial one.
    pub shared_chains: BTreeMap<String, Vec<String>>,
}

/// A base (node-wide) chain.
struct BaseChain {
    name: &'static str,
    hook: Option<&'static str>,
    rules: Vec<String>,
}

fn chain_base(sp: &ServicePort) -> (String, String) {
    let n = &sp.name;
    let port = if n.port.is_empty() {
        sp.port.to_string()
    } else {
        n.port.clone()
    };
    let readable = format!("{}/{}/{}/{}", n.namespace, n.name, n.protocol, port);
    let hash = short_hash(&format!(
        "{}/{}:{}/{}",
        n.namespace, n.name, n.port, n.protocol
    ));
    (hash[..8].to_string(), readable)
}

fn node_port_match(model: &ProxyModel) -> String {
    match &model.node_port_addresses {
        NodePortAddresses::All => "fib daddr type local ip daddr != 127.0.0.0/8 ".to_string(),
        NodePortAddresses::Ips(_) => "ip daddr @nodeport-ips ".to_string(),
        NodePortAddresses::Cidrs(c) => {
            let list: Vec<String> = c.iter().map(|c| c.to_string()).collect();
            format!("ip daddr {{ {} }} fib daddr type local ", list.join(", "))
        }
    }
}

fn base_chains(model: &ProxyModel) -> Vec<BaseChain> {
    let np = node_port_match(model);
    vec![
        BaseChain {
            name: "mark-for-masquerade",
            hook: None,
            rules: vec![format!("meta mark set meta mark | {MASQ_MARK}")],
        },
        BaseChain {
            name: "masquerading",
            hook: None,
            rules: vec![
                format!("meta mark & {MASQ_MARK} == 0 return"),
                format!("meta mark set meta mark ^ {MASQ_MARK}"),
                "masquerade fully-random".into(),
            ],
        },
        BaseChain {
            name: "reject-chain",
            hook: None,
            rules: vec![
                "meta l4proto tcp reject with tcp reset".into(),
                "reject".into(),
            ],
        },
        BaseChain {
            name: "services",
            hook: None,
            rules: vec![
                "ip saddr . ip daddr . meta l4proto . th dport @service-hairpin jump mark-for-masquerade".into(),
                "ip daddr . meta l4proto . th dport vmap @service-ips".into(),
                format!("{np}meta l4proto . th dport vmap @service-nodeports"),
            ],
        },
        BaseChain {
            name: "service-endpoints-check",
            hook: None,
            rules: vec![
                "ip daddr . meta l4proto . th dport vmap @no-endpoint-services".into(),
                format!("{np}meta l4proto . th dport vmap @no-endpoint-nodeports"),
            ],
        },
        BaseChain {
            name: "filter-prerouting",
            hook: Some("type filter hook prerouting priority dstnat - 10; policy accept;"),
            rules: vec!["ct state new jump service-endpoints-check".into()],
        },
        BaseChain {
            name: "filter-output",
            hook: Some("type filter hook output priority -110; policy accept;"),
            rules: vec!["ct state new jump service-endpoints-check".into()],
        },
        BaseChain {
            name: "nat-prerouting",
            hook: Some("type nat hook prerouting priority dstnat; policy accept;"),
            rules: vec!["jump services".into()],
        },
        BaseChain {
            name: "nat-output",
            hook: Some("type nat hook output priority -100; policy accept;"),
            rules: vec!["jump services".into()],
        },
        BaseChain {
            name: "nat-postrouting",
            hook: Some("type nat hook postrouting priority srcnat; policy accept;"),
            rules: vec!["jump masquerading".into()],
        },
    ]
}

/// Names of the base chains, maps and sets, for telling stale objects apart.
fn base_names(model: &ProxyModel) -> BTreeSet<String> {
    let mut s: BTreeSet<String> = base_chains(model)
        .iter()
        .map(|c| c.name.to_string())
        .collect();
    for m in NftMap::all() {
        s.insert(m.name());
    }
    s.insert("cluster-cidrs".into());
    s.insert("nodeport-ips".into());
    s
}

/// Where a dispatch rule looks its endpoint up: the frontend IPs (keyed by
/// `ip daddr . meta l4proto . th dport`) or the NodePort (`meta l4proto . th dport`).
enum Lookup<'a> {
    Ips(NftMap, &'a [Ipv4Addr]),
    NodePort(NftMap, u16),
}

/// The endpoint-choice chain shared by every service port with this protocol,
/// endpoint kind and endpoint count N: it DNATs through the IP map, then the
/// NodePort map, at index `numgen random mod N`. Shared because the kernel checks
/// each new map element against every rule using the map: one lookup rule per
/// service makes a full sync quadratic.
fn backends_chain(o: &mut ServiceObjects, proto: Protocol, n: usize, local: bool) -> String {
    let (ip_map, np_map, kind) = if local {
        (
            NftMap::ServiceLocalBackends(proto),
            NftMap::NodeportLocalBackends(proto),
            "local-",
        )
    } else {
        (
            NftMap::ServiceBackends(proto),
            NftMap::NodeportBackends(proto),
            "",
        )
    };
    let p = proto.as_str();
    let name = format!("{kind}backends-{p}-{n}");
    o.shared_chains.entry(name.clone()).or_insert_with(|| {
        vec![
            format!(
                "meta l4proto {p} dnat ip to ip daddr . th dport . numgen random mod {n} map @{}",
                ip_map.name()
            ),
            format!(
                "meta l4proto {p} dnat ip to th dport . numgen random mod {n} map @{}",
                np_map.name()
            ),
        ]
    });
    name
}

/// The elements choosing endpoint `i` of `eps` for each frontend of `lookups`.
fn backend_elements(o: &mut ServiceObjects, port: u16, eps: &[Endpoint], lookups: &[Lookup]) {
    for l in lookups {
        let (map, keys): (NftMap, Vec<Vec<KeyField>>) = match l {
            Lookup::Ips(map, ips) => (
                *map,
                ips.iter()
                    .map(|ip| vec![KeyField::Ip(*ip), KeyField::Port(port)])
                    .collect(),
            ),
            Lookup::NodePort(map, np) => (*map, vec![vec![KeyField::Port(*np)]]),
        };
        for k in keys {
            for (i, e) in eps.iter().enumerate() {
                let mut key = k.clone();
                key.push(KeyField::Index(i as u32));
                o.elements.insert(Element {
                    map,
                    key,
                    comment: String::new(),
                    value: ElementValue::Endpoint(e.ip, e.port),
                });
            }
        }
    }
}

/// Adds a service port's own chain, named `base` plus a hash of its rules: a chain
/// name never gets different rules, so a change creates a new chain, switches the
/// elements to it and deletes the old one — live chains are never rewritten, and
/// the element switch is one transaction.
fn own_chain(o: &mut ServiceObjects, base: String, rules: Vec<String>) -> String {
    let name = format!("{base}-{}", &short_hash(&rules.join("\n"))[..6]);
    o.chains.insert(name.clone(), rules);
    name
}

/// The masquerade rule for ClusterIP traffic (node-wide settings).
fn cluster_ip_masquerade(model: &ProxyModel) -> Option<String> {
    if model.masquerade_all {
        Some("jump mark-for-masquerade".to_string())
    } else if !model.cluster_cidrs.is_empty() {
        Some("ip saddr != @cluster-cidrs jump mark-for-masquerade".to_string())
    } else {
        None
    }
}

/// Renders the objects of one service port.
///
/// Service ports without affinity and with externalTrafficPolicy Cluster own no
/// chain: their verdict-map elements jump to chains shared by every port with the
/// same protocol and endpoint count (`svc-PROTO-N`, `ext-PROTO-N`), and their
/// endpoints are map elements. So a service costs only map elements, which is
/// what keeps a 10,000-service sync small.
pub fn render_service(model: &ProxyModel, sp: &ServicePort) -> ServiceObjects {
    let mut o = ServiceObjects::default();
    let (hash, readable) = chain_base(sp);
    let p = sp.name.protocol;
    let proto = p.as_str();
    let comment = sp.name.to_string();
    let has_cidrs = !model.cluster_cidrs.is_empty();

    // Endpoint selection inside a service's own chain: inline for one endpoint,
    // else a shared backends chain. With affinity, per-endpoint chains remember
    // the client in a timed set.
    let dispatch = |o: &mut ServiceObjects,
                    prefix: &str,
                    eps: &[Endpoint],
                    lookups: &[Lookup]|
     -> Vec<String> {
        let mut rules = Vec::new();
        if let Some(timeout) = sp.affinity_timeout {
            let mut targets = Vec::new();
            for e in eps {
                let ep_chain = format!("ep-{hash}-{readable}__{}/{}", e.ip, e.port);
                let set = format!("affinity-{}", short_hash(&format!("{ep_chain}/{timeout}")));
                o.sets.insert(set.clone(), timeout);
                o.chains.insert(
                    ep_chain.clone(),
                    vec![
                        format!("update @{set} {{ ip saddr }}"),
                        format!("meta l4proto {proto} dnat ip to {}:{}", e.ip, e.port),
                    ],
                );
                rules.push(format!("{prefix}ip saddr @{set} goto {ep_chain}"));
                targets.push(ep_chain);
            }
            let arms: Vec<String> = targets
                .iter()
                .enumerate()
                .map(|(i, c)| format!("{i} : goto {c}"))
                .collect();
            rules.push(format!(
                "{prefix}numgen random mod {} vmap {{ {} }}",
                targets.len(),
                arms.join(", ")
            ));
        } else if eps.len() == 1 {
            rules.push(format!(
                "{prefix}meta l4proto {proto} dnat ip to {}:{}",
                eps[0].ip, eps[0].port
            ));
        } else {
            let local = matches!(
                lookups.first(),
                Some(Lookup::Ips(NftMap::ServiceLocalBackends(_), _))
            );
            let chain = backends_chain(o, p, eps.len(), local);
            rules.push(format!("{prefix}jump {chain}"));
            backend_elements(o, sp.port, eps, lookups);
        }
        rules
    };

    // Internal (ClusterIP) traffic.
    let internal = sp.internal_endpoints();
    let frontend = |ip: Ipv4Addr| {
        vec![
            KeyField::Ip(ip),
            KeyField::Proto(p),
            KeyField::Port(sp.port),
        ]
    };
    let cip_key = frontend(sp.cluster_ip);
    if !internal.is_empty() {
        if !model.masquerade_all {
            // Hairpin: a local endpoint calling its own service (rule in
            // `services`). Remote endpoints' calls are NATed on their own node.
            for e in internal.iter().filter(|e| e.local) {
                o.elements.insert(Element {
                    map: NftMap::ServiceHairpin,
                    key: [KeyField::Ip(e.ip)]
                        .into_iter()
                        .chain(cip_key.iter().copied())
                        .collect(),
                    comment: String::new(),
                    value: ElementValue::None,
                });
            }
        }
        let cip = [sp.cluster_ip];
        let lookups = [Lookup::Ips(NftMap::ServiceBackends(p), &cip)];
        let chain = if sp.affinity_timeout.is_none() {
            let n = internal.len();
            let backends = backends_chain(&mut o, p, n, false);
            backend_elements(&mut o, sp.port, internal, &lookups);
            let name = format!("svc-{proto}-{n}");
            let mut rules: Vec<String> = cluster_ip_masquerade(model).into_iter().collect();
            rules.push(format!("jump {backends}"));
            o.shared_chains.insert(name.clone(), rules);
            name
        } else {
            let mut rules: Vec<String> = cluster_ip_masquerade(model).into_iter().collect();
            rules.extend(dispatch(&mut o, "", internal, &lookups));
            own_chain(&mut o, format!("svc-{hash}-{readable}"), rules)
        };
        o.elements.insert(Element {
            map: NftMap::ServiceIps,
            key: cip_key,
            comment: comment.clone(),
            value: ElementValue::Goto(chain),
        });
    } else {
        // No endpoints at all: refuse at once. Endpoints only elsewhere with
        // internalTrafficPolicy Local: drop, as kube-proxy does.
        let verdict = if sp.cluster_endpoints.is_empty() {
            ElementValue::Goto("reject-chain".into())
        } else {
            ElementValue::Drop
        };
        o.elements.insert(Element {
            map: NftMap::NoEndpointServices,
            key: cip_key,
            comment: comment.clone(),
            value: verdict,
        });
    }

    // External traffic: NodePort, externalIPs, LoadBalancer ingress IPs.
    if sp.has_external() {
        let usable = !sp.cluster_endpoints.is_empty();
        let ext_ips: Vec<Ipv4Addr> = sp
            .external_ips
            .iter()
            .chain(&sp.load_balancer_ips)
            .copied()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        // The ext chain is reached from both kinds of frontend; a lookup that
        // misses (NodePort packet in the IP map or the reverse) does not match.
        let lookups = |ip_map: NftMap, np_map: NftMap| {
            let mut l = vec![Lookup::Ips(ip_map, &ext_ips)];
            if let Some(np) = sp.node_port {
                l.push(Lookup::NodePort(np_map, np));
            }
            l
        };
        let cluster_lookups = lookups(NftMap::ServiceBackends(p), NftMap::NodeportBackends(p));
        let local_lookups = lookups(
            NftMap::ServiceLocalBackends(p),
            NftMap::NodeportLocalBackends(p),
        );
        let mut ext_chain = String::new();
        if usable {
            match sp.external_policy {
                TrafficPolicy::Cluster if sp.affinity_timeout.is_none() => {
                    let n = sp.cluster_endpoints.len();
                    let backends = backends_chain(&mut o, p, n, false);
                    backend_elements(&mut o, sp.port, &sp.cluster_endpoints, &cluster_lookups);
                    ext_chain = format!("ext-{proto}-{n}");
                    o.shared_chains.insert(
                        ext_chain.clone(),
                        vec![
                            "jump mark-for-masquerade".to_string(),
                            format!("jump {backends}"),
                        ],
                    );
                }
                TrafficPolicy::Cluster => {
                    let mut rules = vec!["jump mark-for-masquerade".to_string()];
                    rules.extend(dispatch(
                        &mut o,
                        "",
                        &sp.cluster_endpoints,
                        &cluster_lookups,
                    ));
                    ext_chain = own_chain(&mut o, format!("ext-{hash}-{readable}"), rules);
                }
                TrafficPolicy::Local => {
                    let mut rules = Vec::new();
                    if has_cidrs {
                        // Pods inside the cluster may use any endpoint.
                        rules.extend(dispatch(
                            &mut o,
                            "ip saddr @cluster-cidrs ",
                            &sp.cluster_endpoints,
                            &cluster_lookups,
                        ));
                    }
                    // Traffic from the node itself is masqueraded and may use any endpoint.
                    rules.push("fib saddr type local jump mark-for-masquerade".to_string());
                    rules.extend(dispatch(
                        &mut o,
                        "fib saddr type local ",
                        &sp.cluster_endpoints,
                        &cluster_lookups,
                    ));
                    if sp.local_endpoints.is_empty() {
                        rules.push("drop".to_string());
                    } else {
                        rules.extend(dispatch(&mut o, "", &sp.local_endpoints, &local_lookups));
                    }
                    ext_chain = own_chain(&mut o, format!("ext-{hash}-{readable}"), rules);
                }
            }
        }
        let (ip_map, verdict) = if usable {
            (NftMap::ServiceIps, ElementValue::Goto(ext_chain))
        } else {
            (
                NftMap::NoEndpointServices,
                ElementValue::Goto("reject-chain".into()),
            )
        };
        for ip in &ext_ips {
            o.elements.insert(Element {
                map: ip_map,
                key: frontend(*ip),
                comment: comment.clone(),
                value: verdict.clone(),
            });
        }
        if let Some(np) = sp.node_port {
            o.elements.insert(Element {
                map: if usable {
                    NftMap::ServiceNodeports
                } else {
                    NftMap::NoEndpointNodeports
                },
                key: vec![KeyField::Proto(p), KeyField::Port(np)],
                comment: comment.clone(),
                value: verdict,
            });
        }
    }
    o
}

/// Renders every service port.
pub fn render_services(
    model: &ProxyModel,
) -> BTreeMap<crate::model::ServicePortName, ServiceObjects> {
    model
        .services
        .iter()
        .map(|(k, sp)| (k.clone(), render_service(model, sp)))
        .collect()
}

fn push_elements(out: &mut String, elems: &[&Element]) {
    for (i, e) in elems.iter().enumerate() {
        let sep = if i + 1 == elems.len() { " }" } else { "," };
        if i == 0 {
            let _ = writeln!(out, "\t\telements = {{ {}{sep}", e.text());
        } else {
            let _ = writeln!(out, "\t\t\t     {}{sep}", e.text());
        }
    }
}

/// The whole table in nft's declarative syntax (goldens, docs, `nft -c` checks).
pub fn render_table(model: &ProxyModel) -> String {
    let services = render_services(model);
    let mut out = String::new();
    let _ = writeln!(out, "table {FAMILY} {TABLE} {{");
    let _ = writeln!(out, "\tcomment \"rules for ferry proxy\"");
    if !model.cluster_cidrs.is_empty() {
        let c: Vec<String> = model.cluster_cidrs.iter().map(|c| c.to_string()).collect();
        let _ = writeln!(
            out,
            "\n\tset cluster-cidrs {{\n\t\ttype ipv4_addr; flags interval;\n\t\telements = {{ {} }}\n\t}}",
            c.join(", ")
        );
    }
    if let NodePortAddresses::Ips(ips) = &model.node_port_addresses {
        let c: Vec<String> = ips.iter().map(|c| c.to_string()).collect();
        let _ = writeln!(
            out,
            "\n\tset nodeport-ips {{\n\t\ttype ipv4_addr;\n\t\telements = {{ {} }}\n\t}}",
            c.join(", ")
        );
    }
    let all_elements: BTreeSet<&Element> =
        services.values().flat_map(|s| s.elements.iter()).collect();
    for m in NftMap::all() {
        let (kind, decl) = m.decl();
        let _ = write!(out, "\n\t{kind} {} {{\n\t\t{decl}\n", m.name());
        let elems: Vec<&Element> = all_elements
            .iter()
            .copied()
            .filter(|e| e.map == m)
            .collect();
        push_elements(&mut out, &elems);
        let _ = writeln!(out, "\t}}");
    }
    let sets: BTreeMap<&String, &u32> = services.values().flat_map(|s| s.sets.iter()).collect();
    for (name, timeout) in sets {
        let _ = writeln!(
            out,
            "\n\tset {name} {{\n\t\ttype ipv4_addr; flags dynamic,timeout; timeout {timeout}s;\n\t}}"
        );
    }
    for c in base_chains(model) {
        let _ = write!(out, "\n\tchain {} {{\n", c.name);
        if let Some(h) = c.hook {
            let _ = writeln!(out, "\t\t{h}");
        }
        for r in &c.rules {
            let _ = writeln!(out, "\t\t{r}");
        }
        let _ = writeln!(out, "\t}}");
    }
    let chains: BTreeMap<&String, &Vec<String>> = services
        .values()
        .flat_map(|s| s.shared_chains.iter().chain(s.chains.iter()))
        .collect();
    for (name, rules) in chains {
        let _ = write!(out, "\n\tchain {name} {{\n");
        for r in rules {
            let _ = writeln!(out, "\t\t{r}");
        }
        let _ = writeln!(out, "\t}}");
    }
    let _ = writeln!(out, "}}");
    out
}

const T: &str = "ip ferry";

fn add_elements_cmd(
    out: &mut String,
    verb: &str,
    map: NftMap,
    elems: &[&Element],
    with_value: bool,
) {
    if elems.is_empty() {
        return;
    }
    let _ = writeln!(out, "{verb} element {T} {} {{", map.name());
    for (i, e) in elems.iter().enumerate() {
        let sep = if i + 1 == elems.len() { "" } else { "," };
        if with_value {
            let _ = writeln!(out, "\t{}{sep}", e.text());
        } else {
            let _ = writeln!(out, "\t{}{sep}", e.key_text());
        }
    }
    let _ = writeln!(out, "}}");
}

fn chain_cmds(out: &mut String, name: &str, rules: &[String]) {
    let _ = writeln!(out, "add chain {T} {name}");
    let _ = writeln!(out, "flush chain {T} {name}");
    for r in rules {
        let _ = writeln!(out, "add rule {T} {name} {r}");
    }
}

/// What already exists in the kernel table (names only).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Existing {
    pub chains: BTreeSet<String>,
    pub sets: BTreeSet<String>,
}

/// Elements as `add element` / `delete element` commands, grouped by map.
fn element_cmds(out: &mut String, verb: &str, elems: &[&Element]) {
    let with_value = verb == "add";
    for m in NftMap::all() {
        let of_map: Vec<&Element> = elems.iter().copied().filter(|e| e.map == m).collect();
        add_elements_cmd(out, verb, m, &of_map, with_value);
    }
}

/// A sync split where the kernel sees it: `before` (nft commands creating or
/// rewriting sets and chains), then the element changes (`flush` these maps,
/// `delete`, then `add` elements), then `after` (nft commands deleting chains and
/// sets nothing references any more). Sent as one nft transaction, or — when the
/// element changes go over netlink — as up to three transactions in this order,
/// so no element ever points at a missing chain.
#[derive(Debug, Default)]
pub struct SyncPlan<'a> {
    pub before: String,
    pub flush: Vec<NftMap>,
    pub delete: Vec<&'a Element>,
    pub add: Vec<&'a Element>,
    pub after: String,
    /// `before` rewrites chains that live elements already jump to: only one
    /// transaction keeps such a change atomic for traffic.
    pub rewrites_live_chains: bool,
}

impl SyncPlan<'_> {
    pub fn is_empty(&self) -> bool {
        self.before.is_empty()
            && self.flush.is_empty()
            && self.delete.is_empty()
            && self.add.is_empty()
            && self.after.is_empty()
    }
    /// The whole plan as one nft transaction.
    pub fn transaction(&self) -> String {
        let mut out = self.before.clone();
        for m in &self.flush {
            let _ = writeln!(out, "flush {} {T} {}", m.decl().0, m.name());
        }
        element_cmds(&mut out, "delete", &self.delete);
        element_cmds(&mut out, "add", &self.add);
        out.push_str(&self.after);
        out
    }
    /// The element changes, in order, for the netlink writer.
    pub fn element_ops(&self) -> Vec<ElementOp<'_>> {
        self.flush
            .iter()
            .map(|m| ElementOp::Flush(*m))
            .chain(self.delete.iter().map(|e| ElementOp::Delete(e)))
            .chain(self.add.iter().map(|e| ElementOp::Add(e)))
            .collect()
    }
}

/// A full sync: creates or refreshes every object, flushes and refills every map,
/// and deletes stale chains and sets. Affinity sets that survive keep their
/// entries, and established connections are untouched.
pub fn plan_full_sync<'a>(
    model: &ProxyModel,
    services: &'a BTreeMap<crate::model::ServicePortName, ServiceObjects>,
    existing: &Existing,
) -> SyncPlan<'a> {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "add table {T} {{ comment \"rules for ferry proxy\"; }}"
    );
    // Sets and maps first: chains reference them.
    let _ = writeln!(
        out,
        "add set {T} cluster-cidrs {{ type ipv4_addr; flags interval; }}"
    );
    let _ = writeln!(out, "flush set {T} cluster-cidrs");
    if !model.cluster_cidrs.is_empty() {
        let c: Vec<String> = model.cluster_cidrs.iter().map(|c| c.to_string()).collect();
        let _ = writeln!(out, "add element {T} cluster-cidrs {{ {} }}", c.join(", "));
    }
    let _ = writeln!(out, "add set {T} nodeport-ips {{ type ipv4_addr; }}");
    let _ = writeln!(out, "flush set {T} nodeport-ips");
    if let NodePortAddresses::Ips(ips) = &model.node_port_addresses {
        let c: Vec<String> = ips.iter().map(|c| c.to_string()).collect();
        let _ = writeln!(out, "add element {T} nodeport-ips {{ {} }}", c.join(", "));
    }
    for m in NftMap::all() {
        let (kind, decl) = m.decl();
        let _ = writeln!(out, "add {kind} {T} {} {{ {decl} }}", m.name());
    }
    let mut desired_sets = BTreeSet::new();
    for s in services.values() {
        for (name, timeout) in &s.sets {
            desired_sets.insert(name.clone());
            let _ = writeln!(out, "add set {T} {name} {{ type ipv4_addr; flags dynamic,timeout; timeout {timeout}s; }}");
        }
    }
    // Base chains (hooks included), then service chains.
    let mut desired_chains = BTreeSet::new();
    for c in base_chains(model) {
        desired_chains.insert(c.name.to_string());
        match c.hook {
            Some(h) => {
                let _ = writeln!(out, "add chain {T} {} {{ {h} }}", c.name);
            }
            None => {
                let _ = writeln!(out, "add chain {T} {}", c.name);
            }
        }
    }
    let mut all_chains: BTreeMap<&String, &Vec<String>> = BTreeMap::new();
    for s in services.values() {
        all_chains.extend(s.shared_chains.iter());
        all_chains.extend(s.chains.iter());
    }
    for name in all_chains.keys() {
        desired_chains.insert((*name).clone());
        let _ = writeln!(out, "add chain {T} {name}");
    }
    for c in base_chains(model) {
        let _ = writeln!(out, "flush chain {T} {}", c.name);
        for r in &c.rules {
            let _ = writeln!(out, "add rule {T} {} {r}", c.name);
        }
    }
    for (name, rules) in &all_chains {
        let _ = writeln!(out, "flush chain {T} {name}");
        for r in rules.iter() {
            let _ = writeln!(out, "add rule {T} {name} {r}");
        }
    }
    let mut add: Vec<&Element> = services.values().flat_map(|s| s.elements.iter()).collect();
    add.sort();
    add.dedup();
    // Stale chains go once no element or rule points at them: flush them all
    // (they may jump to each other), then delete.
    let mut after = String::new();
    let stale_chains: Vec<&String> = existing
        .chains
        .iter()
        .filter(|c| !desired_chains.contains(*c))
        .collect();
    for c in &stale_chains {
        let _ = writeln!(after, "flush chain {T} {c}");
    }
    for c in &stale_chains {
        let _ = writeln!(after, "delete chain {T} {c}");
    }
    let base = base_names(model);
    for s in existing
        .sets
        .iter()
        .filter(|s| !desired_sets.contains(*s) && !base.contains(*s))
    {
        let _ = writeln!(after, "delete set {T} {s}");
    }
    SyncPlan {
        before: out,
        flush: NftMap::all(),
        delete: Vec::new(),
        add,
        after,
        // Chain names fix their rules (see `own_chain`; shared chains by
        // construction): an existing chain is rewritten with the same rules.
        rewrites_live_chains: false,
    }
}

/// [`plan_full_sync`] as one nft transaction (goldens, docs, `nft -c` checks).
pub fn render_full_transaction(model: &ProxyModel, existing: &Existing) -> String {
    plan_full_sync(model, &render_services(model), existing).transaction()
}

/// A partial sync turning `old` objects into `new` ones for the changed service
/// ports only (`None` = absent).
pub fn plan_partial_sync<'a>(
    changes: &[(Option<&'a ServiceObjects>, Option<&'a ServiceObjects>)],
) -> SyncPlan<'a> {
    static EMPTY: ServiceObjects = ServiceObjects {
        chains: BTreeMap::new(),
        sets: BTreeMap::new(),
        elements: BTreeSet::new(),
        shared_chains: BTreeMap::new(),
    };
    let mut add_sets = BTreeMap::new();
    let mut write_chains: BTreeMap<&String, &Vec<String>> = BTreeMap::new();
    let mut del_chains = BTreeSet::new();
    let mut del_sets = BTreeSet::new();
    let mut del_elems: BTreeSet<&Element> = BTreeSet::new();
    let mut add_elems: BTreeSet<&Element> = BTreeSet::new();
    let mut write_shared: BTreeMap<&String, &Vec<String>> = BTreeMap::new();
    let mut rewrites_live_chains = false;
    for (old, new) in changes {
        let old = old.unwrap_or(&EMPTY);
        let new = new.unwrap_or(&EMPTY);
        // Another service port may already use it; rewriting it with the same
        // rules (its name fixes them) is harmless.
        for (c, rules) in &new.shared_chains {
            if !old.shared_chains.contains_key(c) {
                write_shared.insert(c, rules);
            }
        }
        for (s, t) in &new.sets {
            if !old.sets.contains_key(s) {
                add_sets.insert(s.clone(), *t);
            }
        }
        for (c, rules) in &new.chains {
            match old.chains.get(c) {
                Some(old_rules) if old_rules == rules => {}
                Some(_) => {
                    rewrites_live_chains = true;
                    write_chains.insert(c, rules);
                }
                None => {
                    write_chains.insert(c, rules);
                }
            }
        }
        for c in old.chains.keys() {
            if !new.chains.contains_key(c) {
                del_chains.insert(c.clone());
            }
        }
        for s in old.sets.keys() {
            if !new.sets.contains_key(s) {
                del_sets.insert(s.clone());
            }
        }
        for e in &old.elements {
            if !new.elements.contains(e) {
                del_elems.insert(e);
            }
        }
        for e in &new.elements {
            if !old.elements.contains(e) {
                add_elems.insert(e);
            }
        }
    }
    // A chain removed by one port and created by another (never expected) is kept.
    del_chains.retain(|c| !write_chains.contains_key(c));
    del_sets.retain(|s| !add_sets.contains_key(s));
    let mut before = String::new();
    for (s, t) in &add_sets {
        let _ = writeln!(
            before,
            "add set {T} {s} {{ type ipv4_addr; flags dynamic,timeout; timeout {t}s; }}"
        );
    }
    for (c, rules) in write_shared.iter().chain(&write_chains) {
        chain_cmds(&mut before, c, rules);
    }
    let mut after = String::new();
    for c in &del_chains {
        let _ = writeln!(after, "flush chain {T} {c}");
    }
    for c in &del_chains {
        let _ = writeln!(after, "delete chain {T} {c}");
    }
    for s in &del_sets {
        let _ = writeln!(after, "delete set {T} {s}");
    }
    SyncPlan {
        before,
        flush: Vec::new(),
        // Deletions first, so a key can move to a new verdict or map.
        delete: del_elems.into_iter().collect(),
        add: add_elems.into_iter().collect(),
        after,
        rewrites_live_chains,
    }
}

/// [`plan_partial_sync`] as one nft transaction; empty when nothing changed.
pub fn render_partial_transaction(
    changes: &[(Option<&ServiceObjects>, Option<&ServiceObjects>)],
) -> String {
    plan_partial_sync(changes).transaction()
}

/// Adds the chains, sets and maps of table `ip ferry` found in `nft -j list …`
/// output to `e`.
pub fn parse_existing(json: &str, e: &mut Existing) -> anyhow::Result<()> {
    let v: serde_json::Value = serde_json::from_str(json).context("parsing nft -j output")?;
    for item in v["nftables"].as_array().into_iter().flatten() {
        for kind in ["chain", "set", "map"] {
            let Some(o) = item.get(kind) else { continue };
            if o["table"] != TABLE || o["family"] != FAMILY {
                continue;
            }
            if let Some(n) = o["name"].as_str() {
                let names = if kind == "chain" {
                    &mut e.chains
                } else {
                    &mut e.sets
                };
                names.insert(n.to_string());
            }
        }
    }
    Ok(())
}

/// Sends a plan: element changes over netlink between the nft parts, or the whole
/// plan as one nft transaction.
fn send_plan(
    runner: &Runner,
    netlink: Option<&mut NftSocket>,
    plan: &SyncPlan,
) -> anyhow::Result<()> {
    let nft = |tx: &str| -> anyhow::Result<()> {
        if !tx.is_empty() {
            runner.run_stdin("nft", &["-f", "-"], tx)?;
        }
        Ok(())
    };
    match netlink {
        Some(sock) if !plan.rewrites_live_chains => {
            nft(&plan.before)?;
            sock.apply(TABLE, &plan.element_ops())?;
            nft(&plan.after)
        }
        _ => nft(&plan.transaction()),
    }
}

/// The nftables datapath: chains and rules through `nft -f -`, map elements over
/// netlink ([`crate::nft_netlink`]); everything through nft when no netlink socket
/// could be opened.
pub struct NftablesDatapath {
    runner: Runner,
    netlink: Option<NftSocket>,
    /// Objects as last programmed, per service port.
    programmed: BTreeMap<crate::model::ServicePortName, ServiceObjects>,
    needs_full: bool,
}

impl NftablesDatapath {
    pub fn new(runner: Runner) -> Self {
        let netlink = match NftSocket::open(runner.netns.as_deref()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(
                    "nf_tables netlink socket unavailable, using nft for elements too: {e:#}"
                );
                None
            }
        };
        NftablesDatapath {
            runner,
            netlink,
            programmed: BTreeMap::new(),
            needs_full: true,
        }
    }

    /// Names of the table's chains, sets and maps. Listed per kind with `-t`:
    /// `nft list table` fetches every element (seconds at 100,000 elements),
    /// these listings do not.
    fn existing(&self) -> anyhow::Result<Existing> {
        let mut e = Existing::default();
        for what in [
            &["-j", "list", "chains", FAMILY][..],
            &["-j", "-t", "list", "sets", FAMILY],
            &["-j", "-t", "list", "maps", FAMILY],
        ] {
            parse_existing(&self.runner.run("nft", what)?, &mut e)?;
        }
        Ok(e)
    }

    /// Removes the table if present (static so other modes can clean it up).
    pub fn remove(runner: &Runner) -> anyhow::Result<bool> {
        let chains = runner.run("nft", &["-j", "list", "chains", FAMILY])?;
        let mut e = Existing::default();
        parse_existing(&chains, &mut e)?;
        if e.chains.is_empty() && !runner.succeeds("nft", &["list", "table", FAMILY, TABLE]) {
            return Ok(false);
        }
        runner.run("nft", &["delete", "table", FAMILY, TABLE])?;
        Ok(true)
    }
}

impl Datapath for NftablesDatapath {
    fn name(&self) -> &'static str {
        "nftables"
    }

    fn sync_full(&mut self, model: &ProxyModel) -> anyhow::Result<()> {
        let existing = self.existing()?;
        let services = render_services(model);
        let plan = plan_full_sync(model, &services, &existing);
        let result = send_plan(&self.runner, self.netlink.as_mut(), &plan);
        self.needs_full = result.is_err();
        if result.is_ok() {
            self.programmed = services;
        }
        result
    }

    fn apply_diff(&mut self, new: &ProxyModel, diff: &ModelDiff) -> anyhow::Result<()> {
        if self.needs_full || diff.globals_changed {
            return self.sync_full(new);
        }
        let rendered: Vec<_> = diff
            .changes
            .keys()
            .map(|k| {
                (
                    k.clone(),
                    new.services.get(k).map(|sp| render_service(new, sp)),
                )
            })
            .collect();
        let pairs: Vec<(Option<&ServiceObjects>, Option<&ServiceObjects>)> = rendered
            .iter()
            .map(|(k, n)| (self.programmed.get(k), n.as_ref()))
            .collect();
        let plan = plan_partial_sync(&pairs);
        if plan.is_empty() {
            return Ok(());
        }
        // The plan borrows the programmed objects: send it before updating them.
        let result = send_plan(&self.runner, self.netlink.as_mut(), &plan);
        if let Err(e) = result {
            self.needs_full = true;
            return Err(e);
        }
        for (k, n) in rendered {
            match n {
                Some(n) => {
                    self.programmed.insert(k, n);
                }
                None => {
                    self.programmed.remove(&k);
                }
            }
        }
        Ok(())
    }

    fn cleanup(&mut self) -> anyhow::Result<()> {
        Self::remove(&self.runner)?;
        self.programmed.clear();
        self.needs_full = true;
        Ok(())
    }
}
