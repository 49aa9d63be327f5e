//! ClusterIP and NodePort bookkeeping for Services.
//!
//! The allocators live in memory and are rebuilt from the stored Services at
//! start-up, so an address or port is never handed out twice, also across
//! restarts. A claim made for a write that then fails is rolled back.

use std::net::Ipv4Addr;
use std::sync::Mutex;

use serde_json::Value;

use crate::allocator::{IpAllocator, PortAllocator};
use crate::validation::{FieldError, FieldReason};

/// What one write newly claimed, to give back if the write does not happen.
#[derive(Debug, Default)]
pub struct Claimed {
    ips: Vec<Ipv4Addr>,
    ports: Vec<u16>,
}

pub struct ServiceAllocations {
    ips: Mutex<IpAllocator>,
    ports: Mutex<PortAllocator>,
}

fn spec_str<'a>(svc: &'a Value, field: &str) -> Option<&'a str> {
    svc.get("spec")?.get(field)?.as_str()
}

fn service_type(svc: &Value) -> &str {
    spec_str(svc, "type").unwrap_or("ClusterIP")
}

fn needs_cluster_ip(svc: &Value) -> bool {
    service_type(svc) != "ExternalName" && spec_str(svc, "clusterIP") != Some("None")
}

fn needs_node_ports(svc: &Value) -> bool {
    match service_type(svc) {
        "NodePort" => true,
        "LoadBalancer" => svc
            .pointer("/spec/allocateLoadBalancerNodePorts")
            .and_then(Value::as_bool)
            .unwrap_or(true),
        _ => false,
    }
}

fn needs_health_check_port(svc: &Value) -> bool {
    service_type(svc) == "LoadBalancer" && spec_str(svc, "externalTrafficPolicy") == Some("Local")
}

fn ports(svc: &Value) -> Vec<Value> {
    svc.pointer("/spec/ports")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

fn port_key(port: &Value) -> (i64, String) {
    (
        port.get("port").and_then(Value::as_i64).unwrap_or(0),
        port.get("protocol")
            .and_then(Value::as_str)
            .unwrap_or("TCP")
            .to_string(),
    )
}

fn node_port(port: &Value) -> Option<u16> {
    port.get("nodePort")
        .and_then(Value::as_u64)
        .filter(|p| *p > 0)
        .and_then(|p| u16::try_from(p).ok())
}

fn cluster_ip(svc: &Value) -> Option<Ipv4Addr> {
    spec_str(svc, "clusterIP").and_then(|ip| ip.parse().ok())
}

fn health_check_port(svc: &Value) -> Option<u16> {
    svc.pointer("/spec/healthCheckNodePort")
        .and_then(Value::as_u64)
        .filter(|p| *p > 0)
        .and_then(|p| u16::try_from(p).ok())
}

/// Every node port a service holds.
fn held_ports(svc: &Value) -> Vec<u16> {
    let mut held: Vec<u16> = ports(svc).iter().filter_map(node_port).collect();
    held.extend(health_check_port(svc));
    held.sort_unstable();
    held.dedup();
    held
}

fn invalid(field: String, message: String) -> FieldError {
    FieldError {
        field,
        reason: FieldReason::Invalid,
        message,
    }
}

impl ServiceAllocations {
    pub fn new(ips: IpAllocator, ports: PortAllocator) -> ServiceAllocations {
        ServiceAllocations {
            ips: Mutex::new(ips),
            ports: Mutex::new(ports),
        }
    }

    pub fn first_cluster_ip(&self) -> Ipv4Addr {
        self.ips.lock().unwrap().first_usable()
    }

    /// Marks a stored service's addresses and ports as taken (start-up rebuild).
    pub fn restore(&self, svc: &Value) {
        if let Some(ip) = cluster_ip(svc) {
            if let Err(e) = self.ips.lock().unwrap().allocate_specific(ip) {
                tracing::warn!(%ip, error = %e, "stored service holds an unavailable cluster IP");
            }
        }
        let mut allocator = self.ports.lock().unwrap();
        for port in held_ports(svc) {
            if let Err(e) = allocator.allocate_specific(port) {
                tracing::warn!(port, error = %e, "stored service holds an unavailable node port");
            }
        }
    }

    /// Fills in and claims the service's cluster IP and node ports. On update,
    /// values the service already holds are kept, as kube-apiserver does.
    pub fn claim(&self, svc: &mut Value, old: Option<&Value>) -> Result<Claimed, Vec<FieldError>> {
        if let Some(old) = old {
            carry_over_allocations(svc, old);
        }
        let mut claimed = Claimed::default();
        let mut errors = Vec::new();
        if let Err(e) = self.claim_cluster_ip(svc, old, &mut claimed) {
            errors.push(e);
        }
        errors.extend(self.claim_node_ports(svc, old, &mut claimed));
        if errors.is_empty() {
            Ok(claimed)
        } else {
            self.give_back(claimed);
            Err(errors)
        }
    }

    fn claim_cluster_ip(
        &self,
        svc: &mut Value,
        old: Option<&Value>,
        claimed: &mut Claimed,
    ) -> Result<(), FieldError> {
        if !needs_cluster_ip(svc) {
            if spec_str(svc, "clusterIP") == Some("None") {
                svc["spec"]["clusterIPs"] = serde_json::json!(["None"]);
            }
            return Ok(());
        }
        let mut ips = self.ips.lock().unwrap();
        let ip = match spec_str(svc, "clusterIP").filter(|s| !s.is_empty()) {
            Some(requested) => {
                let ip: Ipv4Addr = requested.parse().map_err(|_| {
                    invalid(
                        "spec.clusterIPs[0]".into(),
                        format!("Invalid value: {requested:?}: must be a valid IP address"),
                    )
                })?;
                if old.and_then(cluster_ip) != Some(ip) {
                    ips.allocate_specific(ip).map_err(|e| {
                        invalid("spec.clusterIPs[0]".into(), format!("Invalid value: {requested:?}: failed to allocate IP {requested}: {e}"))
                    })?;
                    claimed.ips.push(ip);
                }
                ip
            }
            None => {
                let ip = ips.allocate_next().map_err(|e| {
                    invalid(
                        "spec.clusterIPs".into(),
                        format!("Internal error: failed to allocate a serviceIP: {e}"),
                    )
                })?;
                claimed.ips.push(ip);
                ip
            }
        };
        svc["spec"]["clusterIP"] = Value::String(ip.to_string());
        svc["spec"]["clusterIPs"] = serde_json::json!([ip.to_string()]);
        Ok(())
    }

    fn claim_node_ports(
        &self,
        svc: &mut Value,
        old: Option<&Value>,
        claimed: &mut Claimed,
    ) -> Vec<FieldError> {
        let mut errors = Vec::new();
        let old_held = old.map(held_ports).unwrap_or_default();
        let mut allocator = self.ports.lock().unwrap();
        let mut claim =
            |requested: Option<u16>, field: String, claimed: &mut Claimed| -> Option<u16> {
                match requested {
                    Some(p) if old_held.contains(&p) || claimed.ports.contains(&p) => Some(p),
                    Some(p) => match allocator.allocate_specific(p) {
                        Ok(()) => {
                            claimed.ports.push(p);
                            Some(p)
                        }
                        Err(e) => {
                            errors.push(invalid(field, format!("Invalid value: {p}: {e}")));
                            None
                        }
                    },
                    None => match allocator.allocate_next() {
                        Ok(p) => {
                            claimed.ports.push(p);
                            Some(p)
                        }
                        Err(e) => {
                            errors.push(invalid(
                                field,
                                format!("Internal error: failed to allocate a nodePort: {e}"),
                            ));
                            None
                        }
                    },
                }
            };
        if needs_node_ports(svc) {
            if let Some(list) = svc.pointer_mut("/spec/ports").and_then(Value::as_array_mut) {
                for (i, port) in list.iter_mut().enumerate() {
                    if let Some(p) = claim(
                        node_port(port),
                        format!("spec.ports[{i}].nodePort"),
                        claimed,
                    ) {
                        port["nodePort"] = Value::from(p);
                    }
                }
            }
        }
        if needs_health_check_port(svc) {
            if let Some(p) = claim(
                health_check_port(svc),
                "spec.healthCheckNodePort".into(),
                claimed,
            ) {
                svc["spec"]["healthCheckNodePort"] = Value::from(p);
            }
        }
        errors
    }

    /// Rolls back a claim whose write did not happen.
    pub fn give_back(&self, claimed: Claimed) {
        let mut ips = self.ips.lock().unwrap();
        claimed.ips.into_iter().for_each(|ip| ips.release(ip));
        let mut ports = self.ports.lock().unwrap();
        claimed.ports.into_iter().for_each(|p| ports.release(p));
    }

    /// After a committed update, frees what the old version held and the new does not.
    pub fn release_dropped(&self, old: &Value, new: &Value) {
        if let Some(ip) = cluster_ip(old).filter(|ip| cluster_ip(new) != Some(*ip)) {
            self.ips.lock().unwrap().release(ip);
        }
        let kept = held_ports(new);
        let mut ports = self.ports.lock().unwrap();
        for p in held_ports(old).into_iter().filter(|p| !kept.contains(p)) {
            ports.release(p);
        }
    }

    /// After a committed delete.
    pub fn release(&self, svc: &Value) {
        self.release_dropped(svc, &Value::Null);
    }
}

/// An update that leaves allocated fields unset keeps the old values; a type
/// change that no longer needs node ports drops them (kube's
/// patchAllocatedValues and dropTypeDependentFields).
fn carry_over_allocations(svc: &mut Value, old: &Value) {
    if needs_cluster_ip(svc)
        && needs_cluster_ip(old)
        && spec_str(svc, "clusterIP").unwrap_or("").is_empty()
    {
        if let Some(ip) = spec_str(old, "clusterIP").map(str::to_string) {
            svc["spec"]["clusterIP"] = Value::String(ip);
        }
    }
    let old_ports = ports(old);
    let keep_node_ports = needs_node_ports(svc);
    if let Some(list) = svc.pointer_mut("/spec/ports").and_then(Value::as_array_mut) {
        for port in list.iter_mut() {
            let previous = old_ports
                .iter()
                .find(|o| port_key(o) == port_key(port))
                .and_then(node_port);
            if !keep_node_ports {
                if node_port(port).is_some() && node_port(port) == previous {
                    port.as_object_mut().map(|p| p.remove("nodePort"));
                }
            } else if node_port(port).is_none() && needs_node_ports(old) {
                if let Some(p) = previous {
                    port["nodePort"] = Value::from(p);
                }
            }
        }
    }
    if needs_health_check_port(svc) && health_check_port(svc).is_none() {
        if let Some(p) = health_check_port(old) {
            svc["spec"]["healthCheckNodePort"] = Value::from(p);
        }
    } else if !needs_health_check_port(svc) && health_check_port(svc) == health_check_port(old) {
        if let Some(spec) = svc.get_mut("spec").and_then(Value::as_object_mut) {
            spec.remove("healthCheckNodePort");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn allocations() -> ServiceAllocations {
        ServiceAllocations::new(
            IpAllocator::new("10.96.0.0/28".parse().unwrap()),
            PortAllocator::new(30000, 30003),
        )
    }

    #[test]
    fn allocates_ip_and_node_ports_and_rejects_taken_ones() {
        let a = allocations();
        let mut svc = json!({"spec": {"type": "NodePort", "ports": [{"port": 80}, {"port": 81, "nodePort": 30001}]}});
        a.claim(&mut svc, None).unwrap();
        assert!(svc["spec"]["clusterIP"]
            .as_str()
            .unwrap()
            .starts_with("10.96.0."));
        assert_eq!(svc["spec"]["ports"][1]["nodePort"], 30001);
        let mut other = json!({"spec": {"type": "NodePort", "clusterIP": svc["spec"]["clusterIP"], "ports": [{"port": 80, "nodePort": 30001}]}});
        let errors = a.claim(&mut other, None).unwrap_err();
        let fields: Vec<_> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, vec!["spec.clusterIPs[0]", "spec.ports[0].nodePort"]);
    }

    #[test]
    fn update_keeps_allocations_and_type_change_drops_node_ports() {
        let a = allocations();
        let mut v1 =
            json!({"spec": {"type": "NodePort", "ports": [{"port": 80, "protocol": "TCP"}]}});
        a.claim(&mut v1, None).unwrap();
        let mut v2 =
            json!({"spec": {"type": "NodePort", "ports": [{"port": 80, "protocol": "TCP"}]}});
        let claimed = a.claim(&mut v2, Some(&v1)).unwrap();
        assert!(claimed.ips.is_empty() && claimed.ports.is_empty());
        assert_eq!(
            v2["spec"]["ports"][0]["nodePort"],
            v1["spec"]["ports"][0]["nodePort"]
        );
        let mut v3 = v2.clone();
        v3["spec"]["type"] = json!("ClusterIP");
        a.claim(&mut v3, Some(&v2)).unwrap();
        assert!(v3["spec"]["ports"][0].get("nodePort").is_none());
        a.release_dropped(&v2, &v3);
        assert!(!a
            .ports
            .lock()
            .unwrap()
            .is_allocated(v2["spec"]["ports"][0]["nodePort"].as_u64().unwrap() as u16));
    }

    #[test]
    fn headless_and_external_name_take_nothing() {
        let a = allocations();
        let mut headless = json!({"spec": {"clusterIP": "None", "ports": [{"port": 80}]}});
        let claimed = a.claim(&mut headless, None).unwrap();
        assert!(claimed.ips.is_empty());
        assert_eq!(headless["spec"]["clusterIPs"], json!(["None"]));
        let mut ext = json!({"spec": {"type": "ExternalName", "externalName": "example.com"}});
        assert!(a.claim(&mut ext, None).unwrap().ips.is_empty());
    }
}
