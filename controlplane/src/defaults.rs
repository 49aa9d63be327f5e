//! Kubernetes' defaulting: the values kube-apiserver fills in before
//! validation (pkg/apis/*/v1/defaults.go), so objects read back look as they
//! would from a real cluster and controllers can rely on them.

use serde_json::{json, Map, Value};

/// Fills in defaults on `obj`, a `kind` in its JSON form. Idempotent.
pub fn apply_defaults(kind: &str, obj: &mut Value) {
    match kind {
        "Service" => service(obj),
        "Pod" => {
            if let Some(spec) = obj.get_mut("spec") {
                pod_spec(spec);
            }
        }
        "Deployment" => workload(obj, true, |spec| {
            set(spec, "strategy", json!({"type": "RollingUpdate"}));
            if spec.pointer("/strategy/type").and_then(Value::as_str) == Some("RollingUpdate") {
                set(&mut spec["strategy"], "rollingUpdate", json!({}));
                set(
                    &mut spec["strategy"]["rollingUpdate"],
                    "maxSurge",
                    json!("25%"),
                );
                set(
                    &mut spec["strategy"]["rollingUpdate"],
                    "maxUnavailable",
                    json!("25%"),
                );
            }
            set(spec, "revisionHistoryLimit", json!(10));
            set(spec, "progressDeadlineSeconds", json!(600));
        }),
        "ReplicaSet" => workload(obj, true, |_| {}),
        "DaemonSet" => workload(obj, false, |spec| {
            set(spec, "updateStrategy", json!({"type": "RollingUpdate"}));
            if spec.pointer("/updateStrategy/type").and_then(Value::as_str) == Some("RollingUpdate")
            {
                set(&mut spec["updateStrategy"], "rollingUpdate", json!({}));
                set(
                    &mut spec["updateStrategy"]["rollingUpdate"],
                    "maxUnavailable",
                    json!(1),
                );
                set(
                    &mut spec["updateStrategy"]["rollingUpdate"],
                    "maxSurge",
                    json!(0),
                );
            }
            set(spec, "revisionHistoryLimit", json!(10));
        }),
        "Namespace" => {
            set(obj, "spec", json!({}));
            set(&mut obj["spec"], "finalizers", json!(["kubernetes"]));
        }
        "EndpointSlice" => each_port(obj.get_mut("ports"), |_| {}),
        "Endpoints" => {
            if let Some(subsets) = obj.get_mut("subsets").and_then(Value::as_array_mut) {
                for subset in subsets {
                    each_port(subset.get_mut("ports"), |_| {});
                }
            }
        }
        _ => {}
    }
}

/// Sets `field` on an object value when it is missing or null.
fn set(obj: &mut Value, field: &str, value: Value) {
    if let Some(map) = obj.as_object_mut() {
        if map.get(field).is_none_or(Value::is_null) {
            map.insert(field.to_string(), value);
        }
    }
}

fn each_port(ports: Option<&mut Value>, mut extra: impl FnMut(&mut Value)) {
    for port in ports.and_then(Value::as_array_mut).into_iter().flatten() {
        set(port, "protocol", json!("TCP"));
        extra(port);
    }
}

fn service(obj: &mut Value) {
    set(obj, "spec", json!({}));
    let spec = &mut obj["spec"];
    set(spec, "type", json!("ClusterIP"));
    let kind = spec["type"].as_str().unwrap_or("ClusterIP").to_string();
    if kind == "ExternalName" {
        return;
    }
    set(spec, "sessionAffinity", json!("None"));
    each_port(spec.get_mut("ports"), |port| {
        let number = port.get("port").cloned().unwrap_or(Value::Null);
        set(port, "targetPort", number);
    });
    if kind == "NodePort" || kind == "LoadBalancer" {
        set(spec, "externalTrafficPolicy", json!("Cluster"));
    }
    if kind == "LoadBalancer" {
        set(spec, "allocateLoadBalancerNodePorts", json!(true));
    }
    set(spec, "internalTrafficPolicy", json!("Cluster"));
    set(spec, "ipFamilies", json!(["IPv4"]));
    set(spec, "ipFamilyPolicy", json!("SingleStack"));
    if spec["sessionAffinity"] == "ClientIP" {
        set(spec, "sessionAffinityConfig", json!({}));
        set(&mut spec["sessionAffinityConfig"], "clientIP", json!({}));
        set(
            &mut spec["sessionAffinityConfig"]["clientIP"],
            "timeoutSeconds",
            json!(10800),
        );
    }
}

/// Deployment, ReplicaSet and DaemonSet: replicas, the pod template, and the
/// kind's own fields.
fn workload(obj: &mut Value, has_replicas: bool, own: impl FnOnce(&mut Value)) {
    set(obj, "spec", json!({}));
    let spec = &mut obj["spec"];
    if has_replicas {
        set(spec, "replicas", json!(1));
    }
    if let Some(pod) = spec.pointer_mut("/template/spec") {
        pod_spec(pod);
    }
    own(spec);
}

fn pod_spec(spec: &mut Value) {
    if !spec.is_object() {
        return;
    }
    set(spec, "restartPolicy", json!("Always"));
    set(spec, "dnsPolicy", json!("ClusterFirst"));
    set(spec, "terminationGracePeriodSeconds", json!(30));
    set(spec, "schedulerName", json!("default-scheduler"));
    set(spec, "securityContext", json!({}));
    set(spec, "enableServiceLinks", json!(true));
    for list in ["containers", "initContainers"] {
        for c in spec
            .get_mut(list)
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
        {
            container(c);
        }
    }
}

fn container(c: &mut Value) {
    set(c, "terminationMessagePath", json!("/dev/termination-log"));
    set(c, "terminationMessagePolicy", json!("File"));
    let image = c.get("image").and_then(Value::as_str).unwrap_or("");
    // kube: a missing or `latest` tag means "always pull".
    let tag = image
        .rsplit('/')
        .next()
        .and_then(|last| last.split_once(':'))
        .map(|(_, t)| t);
    let policy = if image.contains('@') || tag.is_some_and(|t| t != "latest") {
        "IfNotPresent"
    } else {
        "Always"
    };
    set(c, "imagePullPolicy", json!(policy));
    each_port(c.get_mut("ports"), |_| {});
    set(c, "resources", Value::Object(Map::new()));
    for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
        if let Some(p) = c.get_mut(probe) {
            set(p, "timeoutSeconds", json!(1));
            set(p, "periodSeconds", json!(10));
            set(p, "successThreshold", json!(1));
            set(p, "failureThreshold", json!(3));
            if let Some(http) = p.get_mut("httpGet") {
                set(http, "path", json!("/"));
                set(http, "scheme", json!("HTTP"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_defaults_as_kube() {
        let mut svc = json!({"spec": {"type": "NodePort", "ports": [{"port": 80}]}});
        apply_defaults("Service", &mut svc);
        let spec = &svc["spec"];
        assert_eq!(spec["ports"][0]["protocol"], "TCP");
        assert_eq!(spec["ports"][0]["targetPort"], 80);
        assert_eq!(spec["externalTrafficPolicy"], "Cluster");
        assert_eq!(spec["internalTrafficPolicy"], "Cluster");
        assert_eq!(spec["sessionAffinity"], "None");
        assert_eq!(spec["ipFamilies"], json!(["IPv4"]));
        let once = svc.clone();
        apply_defaults("Service", &mut svc);
        assert_eq!(svc, once, "defaulting is idempotent");
    }

    #[test]
    fn client_ip_affinity_gets_a_timeout_and_named_target_ports_stay() {
        let mut svc = json!({"spec": {"sessionAffinity": "ClientIP", "ports": [{"port": 80, "targetPort": "http"}]}});
        apply_defaults("Service", &mut svc);
        assert_eq!(
            svc["spec"]["sessionAffinityConfig"]["clientIP"]["timeoutSeconds"],
            10800
        );
        assert_eq!(svc["spec"]["ports"][0]["targetPort"], "http");
        assert!(svc["spec"].get("externalTrafficPolicy").is_none());
    }

    #[test]
    fn deployment_and_pod_template_defaults() {
        let mut d = json!({"spec": {"template": {"spec": {"containers": [
            {"name": "a", "image": "nginx"}, {"name": "b", "image": "reg:5000/app:1.2", "readinessProbe": {"httpGet": {"port": 80}}}
        ]}}}});
        apply_defaults("Deployment", &mut d);
        assert_eq!(d["spec"]["replicas"], 1);
        assert_eq!(d["spec"]["strategy"]["rollingUpdate"]["maxSurge"], "25%");
        assert_eq!(d["spec"]["revisionHistoryLimit"], 10);
        let pod = &d["spec"]["template"]["spec"];
        assert_eq!(pod["restartPolicy"], "Always");
        assert_eq!(pod["containers"][0]["imagePullPolicy"], "Always");
        assert_eq!(pod["containers"][1]["imagePullPolicy"], "IfNotPresent");
        assert_eq!(
            pod["containers"][1]["readinessProbe"]["httpGet"]["path"],
            "/"
        );
        assert_eq!(
            pod["containers"][1]["readinessProbe"]["failureThreshold"],
            3
        );
    }

    #[test]
    fn recreate_strategy_gets_no_rolling_update() {
        let mut d = json!({"spec": {"strategy": {"type": "Recreate"}}});
        apply_defaults("Deployment", &mut d);
        assert!(d["spec"]["strategy"].get("rollingUpdate").is_none());
    }
}
