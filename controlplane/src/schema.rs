//! Shape checks against the Kubernetes Go types (via k8s-openapi): a field of
//! the wrong JSON type is a 400 that names the field, and fields the type does
//! not know are reported for `fieldValidation` (Strict rejects, Warn warns).
//!
//! Storing a malformed object would break every typed client watching that
//! resource — a proxy could not decode its Service list — so nothing that
//! fails to decode as its type is ever stored.

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use k8s_openapi::api::apps::v1 as apps;
use k8s_openapi::api::coordination::v1 as coordination;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;

/// Decodes `obj` as `T`; on success returns the dotted paths of fields `T` does
/// not have.
fn roundtrip<T: DeserializeOwned + Serialize>(obj: &Value) -> Result<Vec<String>, String> {
    let typed: T = serde_path_to_error::deserialize(obj).map_err(|e| {
        let path = e.path().to_string();
        format!(
            "{}: {}",
            if path == "." { "<root>".into() } else { path },
            e.inner()
        )
    })?;
    let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    let mut unknown = Vec::new();
    collect_unknown(obj, &back, String::new(), &mut unknown);
    Ok(unknown)
}

fn collect_unknown(input: &Value, known: &Value, path: String, out: &mut Vec<String>) {
    match (input, known) {
        (Value::Object(i), Value::Object(k)) => {
            for (key, value) in i {
                let child = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                match k.get(key) {
                    Some(known_value) => collect_unknown(value, known_value, child, out),
                    // A null or empty value of an unknown field is harmless noise.
                    None if !value.is_null() => out.push(child),
                    None => {}
                }
            }
        }
        (Value::Array(i), Value::Array(k)) => {
            for (n, (a, b)) in i.iter().zip(k).enumerate() {
                collect_unknown(a, b, format!("{path}[{n}]"), out);
            }
        }
        _ => {}
    }
}

/// Checks that `obj` decodes as `kind`; returns its unknown fields.
pub fn check(kind: &str, obj: &Value) -> Result<Vec<String>, String> {
    match kind {
        "Namespace" => roundtrip::<core::Namespace>(obj),
        "Service" => roundtrip::<core::Service>(obj),
        "Endpoints" => roundtrip::<core::Endpoints>(obj),
        "Pod" => roundtrip::<core::Pod>(obj),
        "Node" => roundtrip::<core::Node>(obj),
        "ConfigMap" => roundtrip::<core::ConfigMap>(obj),
        "Event" => roundtrip::<core::Event>(obj),
        "EndpointSlice" => roundtrip::<discovery::EndpointSlice>(obj),
        "Deployment" => roundtrip::<apps::Deployment>(obj),
        "ReplicaSet" => roundtrip::<apps::ReplicaSet>(obj),
        "DaemonSet" => roundtrip::<apps::DaemonSet>(obj),
        "Lease" => roundtrip::<coordination::Lease>(obj),
        _ => Ok(Vec::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn wrong_type_names_the_field() {
        let svc = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a"},
            "spec": {"ports": [{"port": "eighty"}]}});
        let err = check("Service", &svc).unwrap_err();
        assert!(err.starts_with("spec.ports[0].port"), "{err}");
    }

    #[test]
    fn unknown_fields_are_listed() {
        let d = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "a"},
            "spec": {"replica": 3, "selector": {"matchLabels": {"a": "b"}},
                     "template": {"spec": {"containers": [{"name": "c", "imagee": "x"}]}}}});
        assert_eq!(
            check("Deployment", &d).unwrap(),
            vec![
                "spec.replica".to_string(),
                "spec.template.spec.containers[0].imagee".to_string()
            ]
        );
    }

    #[test]
    fn a_full_object_round_trips_clean() {
        let svc = json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "a", "labels": {"x": "y"}, "annotations": {}},
            "spec": {"type": "NodePort", "ports": [{"port": 80, "targetPort": "http", "nodePort": 30080, "protocol": "TCP"}],
                     "selector": {"app": "a"}, "sessionAffinity": "None"},
            "status": {"loadBalancer": {}}});
        assert_eq!(check("Service", &svc).unwrap(), Vec::<String>::new());
    }
}
