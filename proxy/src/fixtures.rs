//! Small builders for Services, EndpointSlices and Nodes, for tests, goldens,
//! benchmarks and kernel tests (no API server needed).

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::{json, Value};

/// A ClusterIP service with `(port name, port, protocol)` ports whose targetPort equals the port.
pub fn service(ns: &str, name: &str, cluster_ip: &str, ports: &[(&str, u16, &str)]) -> Service {
    let ports: Vec<Value> = ports
        .iter()
        .map(|(n, p, proto)| json!({"name": n, "port": p, "protocol": proto, "targetPort": p}))
        .collect();
    serde_json::from_value(json!({
        "metadata": {"namespace": ns, "name": name},
        "spec": {"type": "ClusterIP", "clusterIP": cluster_ip, "clusterIPs": [cluster_ip], "ports": ports},
    }))
    .expect("valid service")
}

/// Turns a service into a NodePort service, giving node ports in port order.
pub fn with_node_ports(mut svc: Service, node_ports: &[u16]) -> Service {
    let spec = svc.spec.as_mut().unwrap();
    spec.type_ = Some("NodePort".into());
    for (p, np) in spec.ports.as_mut().unwrap().iter_mut().zip(node_ports) {
        p.node_port = Some(*np as i32);
    }
    svc
}

/// Turns a service into a LoadBalancer with these ingress IPs.
pub fn with_load_balancer(mut svc: Service, ingress: &[&str]) -> Service {
    svc.spec.as_mut().unwrap().type_ = Some("LoadBalancer".into());
    let v: Value = json!({"loadBalancer": {"ingress": ingress.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>()}});
    svc.status = Some(serde_json::from_value(v).unwrap());
    svc
}

/// Sets ClientIP session affinity with a timeout.
pub fn with_affinity(mut svc: Service, timeout: i32) -> Service {
    let spec = svc.spec.as_mut().unwrap();
    spec.session_affinity = Some("ClientIP".into());
    spec.session_affinity_config =
        Some(serde_json::from_value(json!({"clientIP": {"timeoutSeconds": timeout}})).unwrap());
    svc
}

/// One endpoint of a slice.
#[derive(Debug, Clone)]
pub struct Ep {
    pub ip: String,
    pub node: Option<String>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

/// A ready endpoint on `node`.
pub fn ep(ip: &str, node: &str) -> Ep {
    Ep {
        ip: ip.into(),
        node: if node.is_empty() {
            None
        } else {
            Some(node.into())
        },
        ready: true,
        serving: true,
        terminating: false,
    }
}

impl Ep {
    pub fn not_ready(mut self) -> Self {
        self.ready = false;
        self.serving = false;
        self
    }
    /// Terminating but still serving.
    pub fn terminating(mut self) -> Self {
        self.ready = false;
        self.serving = true;
        self.terminating = true;
        self
    }
}

/// An IPv4 EndpointSlice for service `svc` with `(port name, port, protocol)` ports.
pub fn slice(
    ns: &str,
    svc: &str,
    slice_name: &str,
    ports: &[(&str, u16, &str)],
    eps: &[Ep],
) -> EndpointSlice {
    let ports: Vec<Value> = ports
        .iter()
        .map(|(n, p, proto)| json!({"name": n, "port": p, "protocol": proto}))
        .collect();
    let eps: Vec<Value> = eps
        .iter()
        .map(|e| {
            let mut v = json!({
                "addresses": [e.ip],
                "conditions": {"ready": e.ready, "serving": e.serving, "terminating": e.terminating},
            });
            if let Some(n) = &e.node {
                v["nodeName"] = json!(n);
            }
            v
        })
        .collect();
    serde_json::from_value(json!({
        "metadata": {"namespace": ns, "name": slice_name, "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4",
        "endpoints": eps,
        "ports": ports,
    }))
    .expect("valid slice")
}

/// A Node with InternalIPs.
pub fn node(name: &str, internal_ips: &[&str]) -> Node {
    let addrs: Vec<Value> = internal_ips
        .iter()
        .map(|ip| json!({"type": "InternalIP", "address": ip}))
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "status": {"addresses": addrs},
    }))
    .expect("valid node")
}
