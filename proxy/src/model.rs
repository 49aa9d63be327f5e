//! The desired-state core: a pure function from (Services, EndpointSlices, this Node,
//! config) to a plain data structure describing every service port this node serves.
//!
//! Nothing here does I/O. Every datapath (nftables, iptables, and later userspace
//! listeners and BPF maps keyed by (ip, proto, port)) consumes [`ProxyModel`].

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// Label kube-proxy honours: objects carrying it belong to another proxy.
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// Label marking headless services' EndpointSlices.
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
/// Label linking an EndpointSlice to its Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Label carrying the zone of a Node.
pub const LABEL_ZONE: &str = "topology.kubernetes.io/zone";
/// Default ClientIP affinity timeout (3 hours), as in Kubernetes.
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10800;

/// Transport protocol of a service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// Parses the Kubernetes spelling ("TCP", "UDP", "SCTP"); `None` for anything else.
    pub fn parse(s: &str) -> Option<Protocol> {
        match s {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }
    /// Lower-case name as nft, iptables and conntrack spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
    /// IANA protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Identity of one port of one service: `namespace/name:port` plus protocol.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServicePortName {
    pub namespace: String,
    pub name: String,
    /// The port's name (empty for a single unnamed port).
    pub port: String,
    pub protocol: Protocol,
}

impl ServicePortName {
    pub fn new(namespace: &str, name: &str, port: &str, protocol: Protocol) -> Self {
        ServicePortName {
            namespace: namespace.into(),
            name: name.into(),
            port: port.into(),
            protocol,
        }
    }
}

impl fmt::Display for ServicePortName {
    /// kube-proxy's spelling: `ns/name:port` (`ns/name` when the port is unnamed).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.port.is_empty() {
            write!(f, "{}/{}", self.namespace, self.name)
        } else {
            write!(f, "{}/{}:{}", self.namespace, self.name, self.port)
        }
    }
}

/// A backend chosen for a service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    pub port: u16,
    /// The endpoint runs on this node.
    pub local: bool,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.ip, self.port)
    }
}

/// internalTrafficPolicy / externalTrafficPolicy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TrafficPolicy {
    #[default]
    Cluster,
    Local,
}

/// Everything a datapath needs for one service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub name: ServicePortName,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    pub node_port: Option<u16>,
    pub external_ips: Vec<Ipv4Addr>,
    pub load_balancer_ips: Vec<Ipv4Addr>,
    /// ClientIP session affinity timeout in seconds, when affinity is on.
    pub affinity_timeout: Option<u32>,
    pub internal_policy: TrafficPolicy,
    pub external_policy: TrafficPolicy,
    pub health_check_node_port: Option<u16>,
    /// Endpoints used when the policy is Cluster (after readiness, the
    /// serving-terminating fallback and topology), sorted.
    pub cluster_endpoints: Vec<Endpoint>,
    /// Endpoints on this node (ready, else serving-terminating), sorted.
    pub local_endpoints: Vec<Endpoint>,
}

impl ServicePort {
    /// Endpoints for traffic to the ClusterIP.
    pub fn internal_endpoints(&self) -> &[Endpoint] {
        match self.internal_policy {
            TrafficPolicy::Cluster => &self.cluster_endpoints,
            TrafficPolicy::Local => &self.local_endpoints,
        }
    }
    /// Endpoints for traffic from outside (NodePort, externalIPs, LoadBalancer IPs).
    pub fn external_endpoints(&self) -> &[Endpoint] {
        match self.external_policy {
            TrafficPolicy::Cluster => &self.cluster_endpoints,
            TrafficPolicy::Local => &self.local_endpoints,
        }
    }
    /// The service is reachable from outside the cluster on this port.
    pub fn has_external(&self) -> bool {
        self.node_port.is_some()
            || !self.external_ips.is_empty()
            || !self.load_balancer_ips.is_empty()
    }
    /// Every endpoint any traffic may reach (for conntrack cleanup and BPF backends).
    pub fn all_used_endpoints(&self) -> BTreeSet<Endpoint> {
        self.internal_endpoints()
            .iter()
            .chain(self.external_endpoints())
            .chain(self.cluster_endpoints.iter())
            .copied()
            .collect()
    }
    /// Every frontend (ip, port) address that is not a NodePort.
    pub fn frontend_ips(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        std::iter::once(self.cluster_ip)
            .chain(self.external_ips.iter().copied())
            .chain(self.load_balancer_ips.iter().copied())
    }
}

/// Where NodePorts are served.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum NodePortAddresses {
    /// Every local address of the node (`fib daddr type local`).
    #[default]
    All,
    /// Exactly these node addresses ("primary": the Node's InternalIPs).
    Ips(Vec<Ipv4Addr>),
    /// Local addresses inside these CIDRs.
    Cidrs(Vec<Ipv4Net>),
}

/// nodePortAddresses as configured (resolved against the Node in [`build`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum NodePortAddressesConfig {
    /// The node's primary (InternalIP) addresses; all local addresses until known.
    #[default]
    Primary,
    All,
    Cidrs(Vec<Ipv4Net>),
}

/// The parts of the proxy configuration the model needs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ModelConfig {
    pub node_name: String,
    /// Pod CIDRs: sources inside are "local" (detectLocalMode=ClusterCIDR).
    pub cluster_cidrs: Vec<Ipv4Net>,
    pub masquerade_all: bool,
    pub node_port_addresses: NodePortAddressesConfig,
}

/// Kind of object a warning refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ObjectKind {
    Service,
    EndpointSlice,
    Node,
}

impl fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ObjectKind::Service => "Service",
            ObjectKind::EndpointSlice => "EndpointSlice",
            ObjectKind::Node => "Node",
        })
    }
}

/// A bad object (or part of one) that was skipped. The caller logs and counts it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ModelWarning {
    pub kind: ObjectKind,
    pub namespace: String,
    pub name: String,
    pub reason: String,
}

impl fmt::Display for ModelWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}/{}: {}",
            self.kind, self.namespace, self.name, self.reason
        )
    }
}

/// A healthCheckNodePort server this node must run (externalTrafficPolicy Local).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub namespace: String,
    pub name: String,
    /// Distinct ready local endpoints (`ip:port`) over the service's ports, as
    /// kube-proxy counts them (terminating ones excluded).
    pub local_endpoints: usize,
}

/// Desired state of this node's service proxy.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProxyModel {
    pub node_name: String,
    pub node_ips: Vec<Ipv4Addr>,
    pub cluster_cidrs: Vec<Ipv4Net>,
    pub masquerade_all: bool,
    pub node_port_addresses: NodePortAddresses,
    pub services: BTreeMap<ServicePortName, ServicePort>,
    /// healthCheckNodePort → service served there.
    pub health_checks: BTreeMap<u16, HealthCheck>,
    pub warnings: Vec<ModelWarning>,
}

impl ProxyModel {
    /// Settings that apply to every service; when these change a datapath resyncs fully.
    pub fn globals_equal(&self, other: &ProxyModel) -> bool {
        self.node_ips == other.node_ips
            && self.cluster_cidrs == other.cluster_cidrs
            && self.masquerade_all == other.masquerade_all
            && self.node_port_addresses == other.node_port_addresses
    }
}

/// What happened to one service port between two models.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Added,
    Updated,
    Removed,
}

/// Difference between two models.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ModelDiff {
    /// Node-wide settings changed: datapaths must do a full sync.
    pub globals_changed: bool,
    pub changes: BTreeMap<ServicePortName, Change>,
    /// The previous version of each updated or removed port (for conntrack cleanup).
    pub previous: BTreeMap<ServicePortName, ServicePort>,
}

impl ModelDiff {
    pub fn is_empty(&self) -> bool {
        !self.globals_changed && self.changes.is_empty()
    }
    /// Number of service ports touched.
    pub fn len(&self) -> usize {
        self.changes.len()
    }
    /// Adds the changes of another service's update.
    pub fn merge(&mut self, other: ModelDiff) {
        self.globals_changed |= other.globals_changed;
        self.changes.extend(other.changes);
        self.previous.extend(other.previous);
    }
}

/// What changed per service port, so datapaths touch only that.
pub fn diff(old: &ProxyModel, new: &ProxyModel) -> ModelDiff {
    let mut changes = BTreeMap::new();
    for (k, v) in &new.services {
        match old.services.get(k) {
            None => {
                changes.insert(k.clone(), Change::Added);
            }
            Some(o) if o != v => {
                changes.insert(k.clone(), Change::Updated);
            }
            _ => {}
        }
    }
    for k in old.services.keys() {
        if !new.services.contains_key(k) {
            changes.insert(k.clone(), Change::Removed);
        }
    }
    let previous = changes
        .keys()
        .filter_map(|k| old.services.get_key_value(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    ModelDiff {
        globals_changed: !old.globals_equal(new),
        changes,
        previous,
    }
}

fn parse_ipv4(s: &str) -> Option<Ipv4Addr> {
    s.parse::<Ipv4Addr>().ok()
}

/// A port's protocol (TCP when unset); an unknown one is reported through `warn`.
fn port_protocol(port: &str, proto: Option<&str>, warn: impl FnOnce(String)) -> Option<Protocol> {
    let p = proto.unwrap_or("TCP");
    let parsed = Protocol::parse(p);
    if parsed.is_none() {
        warn(format!("port {port:?}: unknown protocol {p:?}"));
    }
    parsed
}

fn port_u16(p: i32) -> Option<u16> {
    if (1..=65535).contains(&p) {
        Some(p as u16)
    } else {
        None
    }
}

struct Warn<'a> {
    out: &'a mut Vec<ModelWarning>,
}

impl Warn<'_> {
    fn push(&mut self, kind: ObjectKind, ns: &str, name: &str, reason: String) {
        self.out.push(ModelWarning {
            kind,
            namespace: ns.into(),
            name: name.into(),
            reason,
        });
    }
}

fn has_label(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta, key: &str) -> bool {
    meta.labels.as_ref().is_some_and(|l| l.contains_key(key))
}

/// Node addresses usable for NodePorts ("primary" = InternalIPs, else ExternalIPs).
pub fn node_ipv4s(node: Option<&Node>) -> Vec<Ipv4Addr> {
    let Some(addrs) = node
        .and_then(|n| n.status.as_ref())
        .and_then(|s| s.addresses.as_ref())
    else {
        return Vec::new();
    };
    let pick = |t: &str| -> Vec<Ipv4Addr> {
        addrs
            .iter()
            .filter(|a| a.type_ == t)
            .filter_map(|a| parse_ipv4(&a.address))
            .collect()
    };
    let mut ips = pick("InternalIP");
    if ips.is_empty() {
        ips = pick("ExternalIP");
    }
    ips.sort();
    ips.dedup();
    ips
}

/// One endpoint from a slice, before selection.
#[derive(Debug, Clone)]
struct RawEndpoint {
    ep: Endpoint,
    ready: bool,
    serving: bool,
    terminating: bool,
    zones: Option<Vec<String>>,
    nodes: Option<Vec<String>>,
}

/// Builds the desired state. Pure: same inputs, same model.
pub fn build(
    services: &[Service],
    endpoint_slices: &[EndpointSlice],
    node: Option<&Node>,
    config: &ModelConfig,
) -> ProxyModel {
    let s: Vec<&Service> = services.iter().collect();
    let e: Vec<&EndpointSlice> = endpoint_slices.iter().collect();
    build_refs(&s, &e, node, config)
}

/// [`build`] over borrowed objects (e.g. from reflector stores).
pub fn build_refs(
    services: &[&Service],
    endpoint_slices: &[&EndpointSlice],
    node: Option<&Node>,
    config: &ModelConfig,
) -> ProxyModel {
    let mut state = ModelState::new(config.clone(), node);
    state.rebuild(services, endpoint_slices, node);
    state.model
}

/// A Service's identity: (namespace, name).
pub type ServiceKey = (String, String);

fn object_key(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> ServiceKey {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// The Service an EndpointSlice belongs to (its `kubernetes.io/service-name` label).
pub fn slice_service(slice: &EndpointSlice) -> Option<ServiceKey> {
    let name = slice.metadata.labels.as_ref()?.get(LABEL_SERVICE_NAME)?;
    Some((
        slice.metadata.namespace.clone().unwrap_or_default(),
        name.clone(),
    ))
}

/// Node-wide inputs every service port is computed against.
#[derive(Debug, Clone, PartialEq, Eq)]
struct NodeContext {
    ips: Vec<Ipv4Addr>,
    zone: Option<String>,
    node_port_addresses: NodePortAddresses,
}

impl NodeContext {
    fn new(node: Option<&Node>, config: &ModelConfig) -> Self {
        let ips = node_ipv4s(node);
        let zone = node
            .and_then(|n| n.metadata.labels.as_ref())
            .and_then(|l| l.get(LABEL_ZONE))
            .cloned();
        let node_port_addresses = match &config.node_port_addresses {
            NodePortAddressesConfig::All => NodePortAddresses::All,
            NodePortAddressesConfig::Cidrs(c) => NodePortAddresses::Cidrs(c.clone()),
            NodePortAddressesConfig::Primary if ips.is_empty() => NodePortAddresses::All,
            NodePortAddressesConfig::Primary => NodePortAddresses::Ips(ips.clone()),
        };
        NodeContext {
            ips,
            zone,
            node_port_addresses,
        }
    }
}

/// What one Service and its EndpointSlices put in the model.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Contribution {
    ports: Vec<ServicePort>,
    warnings: Vec<ModelWarning>,
    /// healthCheckNodePort and the distinct ready local `ip:port`s behind it.
    health_check: Option<(u16, usize)>,
}

/// The pure per-service step: one Service (absent when only slices exist) and the
/// slices labelled with its name.
fn build_service(
    key: &ServiceKey,
    svc: Option<&Service>,
    slices: &[&EndpointSlice],
    node: &NodeContext,
    config: &ModelConfig,
) -> Contribution {
    let mut c = Contribution::default();
    let mut w = Warn {
        out: &mut c.warnings,
    };
    let ports = match svc {
        Some(svc) => service_ports(svc, &mut w),
        None => {
            for s in slices {
                let (ns, sname) = object_key(&s.metadata);
                if !has_label(&s.metadata, LABEL_SERVICE_PROXY_NAME) {
                    w.push(
                        ObjectKind::EndpointSlice,
                        &ns,
                        &sname,
                        format!("service {:?} not found", key.1),
                    );
                }
            }
            None
        }
    };
    let Some(mut ports) = ports else {
        c.warnings.sort();
        return c;
    };
    let mut raw = raw_endpoints(&ports, slices, config, &mut w);
    let mut ready_local = BTreeSet::new();
    for sp in &mut ports {
        let eps: Vec<RawEndpoint> = raw
            .remove(&sp.name)
            .map(|m| m.into_values().collect())
            .unwrap_or_default();
        let (cluster, local) = categorize(&eps, &config.node_name, node.zone.as_deref());
        sp.cluster_endpoints = cluster;
        sp.local_endpoints = local;
        // kube-proxy counts distinct ready local `ip:port`s over the service's
        // ports: serving-but-terminating endpoints do not count, so load
        // balancers drain a node whose pods are going.
        ready_local.extend(
            eps.iter()
                .filter(|r| r.ep.local && r.ready)
                .map(|r| (r.ep.ip, r.ep.port)),
        );
    }
    c.health_check = ports
        .first()
        .and_then(|p| p.health_check_node_port)
        .map(|hc| (hc, ready_local.len()));
    c.ports = ports;
    c.warnings.sort();
    c
}

/// The ports of a Service this proxy serves (endpoints not yet filled in); `None`
/// for services it skips (headless, ExternalName, another proxy's, invalid IP).
fn service_ports(svc: &Service, w: &mut Warn) -> Option<Vec<ServicePort>> {
    let (ns, name) = object_key(&svc.metadata);
    if has_label(&svc.metadata, LABEL_SERVICE_PROXY_NAME) {
        return None;
    }
    let spec = svc.spec.as_ref()?;
    let svc_type = spec.type_.as_deref().unwrap_or("ClusterIP");
    if svc_type == "ExternalName" {
        return None;
    }
    let cip = spec.cluster_ip.as_deref().unwrap_or("");
    if cip.is_empty() || cip == "None" {
        return None; // headless
    }
    let cluster_ip = match parse_ipv4(cip) {
        Some(ip) if !ip.is_unspecified() => ip,
        _ => {
            if cip.parse::<std::net::Ipv6Addr>().is_err() {
                w.push(
                    ObjectKind::Service,
                    &ns,
                    &name,
                    format!("invalid clusterIP {cip:?}"),
                );
            }
            // IPv6-only services are for the ip6 table (dual-stack comes later).
            return None;
        }
    };
    let mut external_ips = Vec::new();
    for s in spec.external_ips.iter().flatten() {
        match parse_ipv4(s) {
            Some(ip) => external_ips.push(ip),
            None if s.parse::<std::net::Ipv6Addr>().is_ok() => {}
            None => w.push(
                ObjectKind::Service,
                &ns,
                &name,
                format!("invalid externalIP {s:?}"),
            ),
        }
    }
    external_ips.sort();
    external_ips.dedup();
    let mut lb_ips = Vec::new();
    if svc_type == "LoadBalancer" {
        let ingress = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|l| l.ingress.as_ref());
        for ing in ingress.into_iter().flatten() {
            if ing.ip_mode.as_deref() == Some("Proxy") {
                continue; // the load balancer proxies: nothing to do on the node
            }
            let Some(s) = ing.ip.as_deref() else { continue };
            match parse_ipv4(s) {
                Some(ip) => lb_ips.push(ip),
                None if s.parse::<std::net::Ipv6Addr>().is_ok() => {}
                None => w.push(
                    ObjectKind::Service,
                    &ns,
                    &name,
                    format!("invalid load balancer ingress IP {s:?}"),
                ),
            }
        }
    }
    lb_ips.sort();
    lb_ips.dedup();
    let affinity_timeout = if spec.session_affinity.as_deref() == Some("ClientIP") {
        let t = spec
            .session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .unwrap_or(DEFAULT_AFFINITY_TIMEOUT as i32);
        if (1..=86400).contains(&t) {
            Some(t as u32)
        } else {
            w.push(
                ObjectKind::Service,
                &ns,
                &name,
                format!("invalid sessionAffinity timeoutSeconds {t}; using default"),
            );
            Some(DEFAULT_AFFINITY_TIMEOUT)
        }
    } else {
        None
    };
    let policy = |p: Option<&str>| {
        if p == Some("Local") {
            TrafficPolicy::Local
        } else {
            TrafficPolicy::Cluster
        }
    };
    let internal_policy = policy(spec.internal_traffic_policy.as_deref());
    let externally_visible =
        svc_type == "NodePort" || svc_type == "LoadBalancer" || !external_ips.is_empty();
    let external_policy = if externally_visible {
        policy(spec.external_traffic_policy.as_deref())
    } else {
        TrafficPolicy::Cluster
    };
    let health_check_node_port =
        if external_policy == TrafficPolicy::Local && svc_type == "LoadBalancer" {
            spec.health_check_node_port.and_then(port_u16)
        } else {
            None
        };
    let mut ports = Vec::new();
    for p in spec.ports.iter().flatten() {
        let pname = p.name.clone().unwrap_or_default();
        let Some(protocol) = port_protocol(&pname, p.protocol.as_deref(), |reason| {
            w.push(ObjectKind::Service, &ns, &name, reason)
        }) else {
            continue;
        };
        let Some(port) = port_u16(p.port) else {
            w.push(
                ObjectKind::Service,
                &ns,
                &name,
                format!("port {pname:?}: invalid port {}", p.port),
            );
            continue;
        };
        let node_port = match p.node_port {
            None | Some(0) => None,
            Some(np) if svc_type == "NodePort" || svc_type == "LoadBalancer" => {
                match port_u16(np) {
                    Some(np) => Some(np),
                    None => {
                        w.push(
                            ObjectKind::Service,
                            &ns,
                            &name,
                            format!("port {pname:?}: invalid nodePort {np}"),
                        );
                        None
                    }
                }
            }
            Some(_) => None,
        };
        ports.push(ServicePort {
            name: ServicePortName::new(&ns, &name, &pname, protocol),
            cluster_ip,
            port,
            node_port,
            external_ips: external_ips.clone(),
            load_balancer_ips: lb_ips.clone(),
            affinity_timeout,
            internal_policy,
            external_policy,
            health_check_node_port,
            cluster_endpoints: Vec::new(),
            local_endpoints: Vec::new(),
        });
    }
    Some(ports)
}

/// The endpoints of `ports` found in `slices`, deduplicated by (ip, port).
fn raw_endpoints(
    ports: &[ServicePort],
    slices: &[&EndpointSlice],
    config: &ModelConfig,
    w: &mut Warn,
) -> BTreeMap<ServicePortName, BTreeMap<(Ipv4Addr, u16), RawEndpoint>> {
    let mut raw: BTreeMap<ServicePortName, BTreeMap<(Ipv4Addr, u16), RawEndpoint>> =
        BTreeMap::new();
    for slice in slices {
        let (ns, sname) = object_key(&slice.metadata);
        if has_label(&slice.metadata, LABEL_SERVICE_PROXY_NAME)
            || has_label(&slice.metadata, LABEL_HEADLESS)
        {
            continue;
        }
        if slice.address_type != "IPv4" {
            continue; // IPv6 and FQDN slices are not programmed by the ip table
        }
        let Some((_, svc_name)) = slice_service(slice) else {
            continue;
        };
        for sp in slice.ports.iter().flatten() {
            let pname = sp.name.clone().unwrap_or_default();
            let Some(protocol) = port_protocol(&pname, sp.protocol.as_deref(), |reason| {
                w.push(ObjectKind::EndpointSlice, &ns, &sname, reason)
            }) else {
                continue;
            };
            let Some(port) = sp.port.and_then(port_u16) else {
                w.push(
                    ObjectKind::EndpointSlice,
                    &ns,
                    &sname,
                    format!("port {pname:?}: invalid port {:?}", sp.port),
                );
                continue;
            };
            let key = ServicePortName::new(&ns, &svc_name, &pname, protocol);
            if !ports.iter().any(|p| p.name == key) {
                continue;
            }
            let entry = raw.entry(key).or_default();
            for e in slice.endpoints.iter().flatten() {
                let Some(addr) = e.addresses.first() else {
                    continue;
                };
                let Some(ip) = parse_ipv4(addr) else {
                    w.push(
                        ObjectKind::EndpointSlice,
                        &ns,
                        &sname,
                        format!("invalid endpoint address {addr:?}"),
                    );
                    continue;
                };
                let c = e.conditions.as_ref();
                let ready = c.and_then(|c| c.ready).unwrap_or(true);
                let serving = c.and_then(|c| c.serving).unwrap_or(ready);
                let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
                let local = !config.node_name.is_empty()
                    && e.node_name.as_deref() == Some(config.node_name.as_str());
                let hints = e.hints.as_ref();
                let zones = hints
                    .and_then(|h| h.for_zones.as_ref())
                    .map(|z| z.iter().map(|z| z.name.clone()).collect());
                let nodes = hints
                    .and_then(|h| h.for_nodes.as_ref())
                    .map(|z| z.iter().map(|z| z.name.clone()).collect());
                entry.entry((ip, port)).or_insert(RawEndpoint {
                    ep: Endpoint { ip, port, local },
                    ready,
                    serving,
                    terminating,
                    zones,
                    nodes,
                });
            }
        }
    }
    raw
}

/// What the model holds per Service: the names of its ports (the ports themselves
/// live in [`ProxyModel::services`]), its warnings and its health check.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct ServiceEntry {
    ports: Vec<ServicePortName>,
    warnings: Vec<ModelWarning>,
    health_check: Option<(u16, usize)>,
}

/// The model kept up to date service by service: a change to one Service or one of
/// its slices recomputes only that service, and yields the diff datapaths apply.
/// [`ModelState::rebuild`] recomputes everything (start, relist, node change,
/// periodic resync) and gives the same model as the sum of updates.
#[derive(Debug, Clone)]
pub struct ModelState {
    config: ModelConfig,
    node: NodeContext,
    entries: BTreeMap<ServiceKey, ServiceEntry>,
    /// Slices without the service-name label (found only by a rebuild).
    unlabelled: Vec<ModelWarning>,
    /// The current desired state.
    pub model: ProxyModel,
}

impl ModelState {
    pub fn new(config: ModelConfig, node: Option<&Node>) -> Self {
        let node = NodeContext::new(node, &config);
        let model = ProxyModel {
            node_name: config.node_name.clone(),
            node_ips: node.ips.clone(),
            cluster_cidrs: config.cluster_cidrs.clone(),
            masquerade_all: config.masquerade_all,
            node_port_addresses: node.node_port_addresses.clone(),
            ..Default::default()
        };
        ModelState {
            config,
            node,
            entries: BTreeMap::new(),
            unlabelled: Vec::new(),
            model,
        }
    }

    /// Recomputes everything from all objects and the (possibly changed) Node;
    /// returns what changed against the previous model.
    pub fn rebuild(
        &mut self,
        services: &[&Service],
        slices: &[&EndpointSlice],
        node: Option<&Node>,
    ) -> ModelDiff {
        let previous = std::mem::replace(self, ModelState::new(self.config.clone(), node)).model;
        let mut by_service: BTreeMap<ServiceKey, (Option<&Service>, Vec<&EndpointSlice>)> =
            BTreeMap::new();
        for s in services {
            by_service.entry(object_key(&s.metadata)).or_default().0 = Some(s);
        }
        for s in slices {
            match slice_service(s) {
                Some(k) => by_service.entry(k).or_default().1.push(s),
                None => {
                    let (namespace, name) = object_key(&s.metadata);
                    self.unlabelled.push(ModelWarning {
                        kind: ObjectKind::EndpointSlice,
                        namespace,
                        name,
                        reason: format!("missing label {LABEL_SERVICE_NAME}"),
                    });
                }
            }
        }
        for (k, (svc, sl)) in by_service {
            let c = build_service(&k, svc, &sl, &self.node, &self.config);
            self.insert(k, c);
        }
        self.finish();
        diff(&previous, &self.model)
    }

    /// Recomputes one service from its current objects (`svc` absent when deleted,
    /// `slices` = the slices labelled with its name); returns what changed.
    pub fn update(
        &mut self,
        key: &ServiceKey,
        svc: Option<&Service>,
        slices: &[&EndpointSlice],
    ) -> ModelDiff {
        let mut d = ModelDiff::default();
        let old = self.entries.remove(key).unwrap_or_default();
        for name in &old.ports {
            if let Some(sp) = self.model.services.remove(name) {
                d.previous.insert(name.clone(), sp);
            }
        }
        let c = build_service(key, svc, slices, &self.node, &self.config);
        for p in &c.ports {
            let change = match d.previous.get(&p.name) {
                None => Some(Change::Added),
                Some(o) if o != p => Some(Change::Updated),
                Some(_) => None,
            };
            if let Some(ch) = change {
                d.changes.insert(p.name.clone(), ch);
            }
        }
        for k in d.previous.keys() {
            if !c.ports.iter().any(|p| &p.name == k) {
                d.changes.insert(k.clone(), Change::Removed);
            }
        }
        d.previous.retain(|k, _| d.changes.contains_key(k));
        let refresh = !old.warnings.is_empty()
            || !c.warnings.is_empty()
            || old.health_check.is_some()
            || c.health_check.is_some();
        self.insert(key.clone(), c);
        if refresh {
            self.finish();
        }
        d
    }

    fn insert(&mut self, key: ServiceKey, c: Contribution) {
        let entry = ServiceEntry {
            ports: c.ports.iter().map(|p| p.name.clone()).collect(),
            warnings: c.warnings,
            health_check: c.health_check,
        };
        for p in c.ports {
            self.model.services.insert(p.name.clone(), p);
        }
        if entry != ServiceEntry::default() {
            self.entries.insert(key, entry);
        }
    }

    /// Reassembles the node-wide parts (health checks, warnings) from the entries.
    fn finish(&mut self) {
        let mut hcs = BTreeMap::new();
        let mut warnings = self.unlabelled.clone();
        for ((ns, name), e) in &self.entries {
            warnings.extend(e.warnings.iter().cloned());
            if let Some((port, n)) = e.health_check {
                // On a clash the first service (by namespace/name) keeps the port.
                hcs.entry(port).or_insert(HealthCheck {
                    namespace: ns.clone(),
                    name: name.clone(),
                    local_endpoints: n,
                });
            }
        }
        warnings.sort();
        warnings.dedup();
        self.model.warnings = warnings;
        self.model.health_checks = hcs;
    }
}

/// kube-proxy's endpoint categorisation: ready endpoints, else serving+terminating
/// ones; topology hints (node, then zone) narrow the cluster set when every
/// endpoint has them and some match; local endpoints are those on this node.
fn categorize(
    eps: &[RawEndpoint],
    node: &str,
    zone: Option<&str>,
) -> (Vec<Endpoint>, Vec<Endpoint>) {
    let pick = |filter: &dyn Fn(&RawEndpoint) -> bool| -> Vec<&RawEndpoint> {
        let ready: Vec<&RawEndpoint> = eps.iter().filter(|e| filter(e) && e.ready).collect();
        if !ready.is_empty() {
            return ready;
        }
        eps.iter()
            .filter(|e| filter(e) && e.serving && e.terminating)
            .collect()
    };
    let mut cluster = pick(&|_| true);
    // Topology: PreferSameNode hints, then zone hints.
    if !cluster.is_empty() && !node.is_empty() && cluster.iter().all(|e| e.nodes.is_some()) {
        let same: Vec<&RawEndpoint> = cluster
            .iter()
            .copied()
            .filter(|e| {
                e.nodes
                    .as_ref()
                    .is_some_and(|n| n.iter().any(|n| n == node))
            })
            .collect();
        if !same.is_empty() {
            cluster = same;
        }
    } else if let Some(zone) = zone {
        if !cluster.is_empty() && cluster.iter().all(|e| e.zones.is_some()) {
            let same: Vec<&RawEndpoint> = cluster
                .iter()
                .copied()
                .filter(|e| {
                    e.zones
                        .as_ref()
                        .is_some_and(|z| z.iter().any(|z| z == zone))
                })
                .collect();
            if !same.is_empty() {
                cluster = same;
            }
        }
    }
    let local = pick(&|e| e.ep.local);
    let mut c: Vec<Endpoint> = cluster.into_iter().map(|e| e.ep).collect();
    let mut l: Vec<Endpoint> = local.into_iter().map(|e| e.ep).collect();
    c.sort();
    l.sort();
    (c, l)
}

/// Returns the (ip, port) endpoints of `old` no longer used by `new` (for conntrack).
pub fn removed_endpoints(old: &ServicePort, new: Option<&ServicePort>) -> Vec<Endpoint> {
    let keep: BTreeSet<(Ipv4Addr, u16)> = new
        .map(|n| {
            n.all_used_endpoints()
                .into_iter()
                .map(|e| (e.ip, e.port))
                .collect()
        })
        .unwrap_or_default();
    old.all_used_endpoints()
        .into_iter()
        .filter(|e| !keep.contains(&(e.ip, e.port)))
        .collect()
}

/// A stable, short, lower-case base32 hash (FNV-1a 64) for naming chains and sets.
pub fn short_hash(s: &str) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in s.as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::with_capacity(13);
    for i in 0..13 {
        out.push(ALPHABET[((h >> (i * 5)) & 31) as usize] as char);
    }
    out
}

#[cfg(test)]
pub(crate) mod tests;
