//! Decoding of Kubernetes protobuf request bodies (`application/vnd.kubernetes.protobuf`).
//!
//! kubectl's imperative commands (`kubectl create namespace|configmap|service|deployment`,
//! `kubectl run`) send built-in objects as protobuf. A body is the magic `k8s\0` followed by a
//! `runtime.Unknown` envelope whose `raw` field holds the encoded object; see
//! k8s.io/apimachinery/pkg/runtime/serializer/protobuf. [`decode`] turns such a body into the
//! JSON form kubectl would have sent, so the rest of the server only ever sees JSON.
//!
//! The conversion is written by hand for the kinds kubectl's generators produce. Go's protobuf
//! marshaller writes every non-pointer field, so empty strings, `false`, zero numbers and empty
//! structs arrive as set fields; they are dropped here where the JSON form has `omitempty`.
//! Fields this module does not convert are not silently lost: if any of them carries a value the
//! request is rejected with a message that names the protobuf message and field numbers.

use std::collections::BTreeMap;

use base64::Engine as _;
use k8s_pb::api::apps::v1 as apps;
use k8s_pb::api::core::v1 as core;
use k8s_pb::apimachinery::pkg::api::resource::Quantity;
use k8s_pb::apimachinery::pkg::apis::meta::v1 as meta;
use k8s_pb::apimachinery::pkg::runtime::Unknown;
use k8s_pb::apimachinery::pkg::util::intstr::IntOrString;
use prost::Message;
use serde_json::{Map, Value};

/// The prefix of every Kubernetes protobuf body.
const MAGIC: &[u8] = b"k8s\0";

/// Kinds with a protobuf decoder, and the apiVersion each is served under.
const SUPPORTED: [(&str, &str); 5] = [
    ("Namespace", "v1"),
    ("ConfigMap", "v1"),
    ("Service", "v1"),
    ("Deployment", "apps/v1"),
    ("Pod", "v1"),
];

/// Decodes a Kubernetes protobuf request body (the "k8s\0" magic + runtime.Unknown envelope) for `kind`
/// into its JSON form, with apiVersion and kind set from the envelope's TypeMeta.
pub fn decode(kind: &str, body: &[u8]) -> Result<serde_json::Value, String> {
    let Some(&(_, api_version)) = SUPPORTED.iter().find(|(k, _)| *k == kind) else {
        return Err(format!(
            "protobuf bodies are supported for Namespace, ConfigMap, Service, Deployment, Pod; \
             send {kind} as application/json"
        ));
    };
    let rest = body.strip_prefix(MAGIC).ok_or_else(|| {
        format!("protobuf body for {kind} does not start with the \"k8s\\0\" magic")
    })?;
    let envelope = Unknown::decode(rest).map_err(|e| format!("protobuf body for {kind}: {e}"))?;
    if let Some(encoding) = envelope
        .content_encoding
        .as_deref()
        .filter(|s| !s.is_empty())
    {
        return Err(format!(
            "protobuf body for {kind}: content encoding {encoding:?} is not supported"
        ));
    }
    if let Some(ct) = envelope
        .content_type
        .as_deref()
        .filter(|s| !s.is_empty() && *s != "application/vnd.kubernetes.protobuf")
    {
        return Err(format!(
            "protobuf body for {kind}: embedded content type {ct:?} is not supported"
        ));
    }
    let type_meta = envelope.type_meta.unwrap_or_default();
    let body_kind = type_meta.kind.filter(|s| !s.is_empty());
    if let Some(body_kind) = body_kind.as_deref().filter(|k| *k != kind) {
        return Err(format!("protobuf body is a {body_kind}, expected {kind}"));
    }
    let body_version = type_meta.api_version.filter(|s| !s.is_empty());
    if let Some(v) = body_version.as_deref().filter(|v| *v != api_version) {
        return Err(format!(
            "protobuf body for {kind} has apiVersion {v}, expected {api_version}"
        ));
    }
    let raw = envelope.raw.unwrap_or_default();

    let mut obj = J::default();
    obj.put(
        "apiVersion",
        body_version.unwrap_or_else(|| api_version.to_string()),
    );
    obj.put("kind", body_kind.unwrap_or_else(|| kind.to_string()));
    let wrap = |e: String| format!("protobuf body for {kind}: {e}");
    let bad = |e: prost::DecodeError| format!("protobuf body for {kind}: {e}");
    match kind {
        "Namespace" => {
            let ns = core::Namespace::decode(raw.as_slice()).map_err(bad)?;
            obj.object_meta(ns.metadata).map_err(wrap)?;
            if let Some(mut spec) = ns.spec {
                let mut s = J::default();
                s.strs("finalizers", std::mem::take(&mut spec.finalizers));
                leftover("spec", &spec).map_err(wrap)?;
                obj.obj("spec", s);
            }
        }
        "ConfigMap" => {
            let cm = core::ConfigMap::decode(raw.as_slice()).map_err(bad)?;
            obj.object_meta(cm.metadata).map_err(wrap)?;
            obj.opt("immutable", cm.immutable);
            obj.map("data", cm.data);
            if !cm.binary_data.is_empty() {
                let engine = base64::engine::general_purpose::STANDARD;
                let binary: Map<String, Value> = cm
                    .binary_data
                    .into_iter()
                    .map(|(k, v)| (k, Value::String(engine.encode(v))))
                    .collect();
                obj.put("binaryData", binary);
            }
        }
        "Service" => {
            let svc = core::Service::decode(raw.as_slice()).map_err(bad)?;
            obj.object_meta(svc.metadata).map_err(wrap)?;
            if let Some(spec) = svc.spec {
                obj.obj("spec", service_spec(spec).map_err(wrap)?);
            }
        }
        "Deployment" => {
            let d = apps::Deployment::decode(raw.as_slice()).map_err(bad)?;
            obj.object_meta(d.metadata).map_err(wrap)?;
            if let Some(spec) = d.spec {
                obj.obj("spec", deployment_spec(spec).map_err(wrap)?);
            }
        }
        "Pod" => {
            let pod = core::Pod::decode(raw.as_slice()).map_err(bad)?;
            obj.object_meta(pod.metadata).map_err(wrap)?;
            if let Some(spec) = pod.spec {
                obj.obj("spec", pod_spec(spec, "spec").map_err(wrap)?);
            }
        }
        _ => unreachable!("kind checked against SUPPORTED"),
    }
    Ok(Value::Object(obj.0))
}

/// Fails if `rest` (a message whose converted fields have been taken out) still carries a value.
fn leftover<M: Message>(path: &str, rest: &M) -> Result<(), String> {
    let tags = set_fields(&rest.encode_to_vec());
    if tags.is_empty() {
        return Ok(());
    }
    let name = std::any::type_name::<M>()
        .rsplit("::")
        .next()
        .unwrap_or("message");
    let tags: Vec<String> = tags.iter().map(u32::to_string).collect();
    Err(format!(
        "{path} ({name}) sets protobuf field(s) {} that this server does not decode; \
         send the object as application/json",
        tags.join(", ")
    ))
}

/// Field numbers of an encoded message that carry a non-zero / non-empty value.
fn set_fields(mut buf: &[u8]) -> Vec<u32> {
    fn varint(buf: &mut &[u8]) -> Option<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = buf.split_first()?;
            *buf = rest;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }
    fn skip(buf: &mut &[u8], n: usize) -> Option<bool> {
        let (head, rest) = buf.split_at_checked(n)?;
        *buf = rest;
        Some(head.iter().any(|&b| b != 0))
    }
    let mut tags = Vec::new();
    while !buf.is_empty() {
        let Some(key) = varint(&mut buf) else {
            tags.push(0);
            break;
        };
        let tag = (key >> 3) as u32;
        let set = match key & 7 {
            0 => varint(&mut buf).map(|v| v != 0),
            1 => skip(&mut buf, 8),
            2 => varint(&mut buf).and_then(|len| {
                let len = usize::try_from(len).ok()?;
                skip(&mut buf, len).map(|_| len > 0)
            }),
            5 => skip(&mut buf, 4),
            _ => None,
        };
        match set {
            Some(false) => {}
            Some(true) => {
                if !tags.contains(&tag) {
                    tags.push(tag);
                }
            }
            None => {
                tags.push(tag);
                break;
            }
        }
    }
    tags
}

/// A JSON object under construction; every setter drops empty values.
#[derive(Default)]
struct J(Map<String, Value>);

impl J {
    fn put(&mut self, key: &str, value: impl Into<Value>) {
        self.0.insert(key.to_string(), value.into());
    }

    /// A string field with `omitempty`: `None` and `""` are left out.
    fn s(&mut self, key: &str, value: Option<String>) {
        if let Some(v) = value.filter(|v| !v.is_empty()) {
            self.put(key, v);
        }
    }

    /// A pointer field (`*int32`, `*bool`, ...): any present value is kept, zero included.
    fn opt<T: Into<Value>>(&mut self, key: &str, value: Option<T>) {
        if let Some(v) = value {
            self.put(key, v);
        }
    }

    /// A non-pointer integer with `omitempty`: zero is left out.
    fn nz<T: Into<i64> + Copy>(&mut self, key: &str, value: Option<T>) {
        if let Some(v) = value.filter(|v| (*v).into() != 0) {
            self.put(key, v.into());
        }
    }

    /// A non-pointer bool with `omitempty`: false is left out.
    fn yes(&mut self, key: &str, value: Option<bool>) {
        if value == Some(true) {
            self.put(key, true);
        }
    }

    fn strs(&mut self, key: &str, values: Vec<String>) {
        if !values.is_empty() {
            self.put(key, values);
        }
    }

    fn map(&mut self, key: &str, map: BTreeMap<String, String>) {
        if !map.is_empty() {
            let m: Map<String, Value> = map
                .into_iter()
                .map(|(k, v)| (k, Value::String(v)))
                .collect();
            self.put(key, m);
        }
    }

    fn quantities(&mut self, key: &str, map: BTreeMap<String, Quantity>) {
        if !map.is_empty() {
            let m: Map<String, Value> = map
                .into_iter()
                .map(|(k, q)| (k, Value::String(q.string.unwrap_or_default())))
                .collect();
            self.put(key, m);
        }
    }

    /// A nested object, left out when it ended up empty.
    fn obj(&mut self, key: &str, value: J) {
        if !value.0.is_empty() {
            self.put(key, value.0);
        }
    }

    fn list(&mut self, key: &str, values: Vec<J>) {
        if !values.is_empty() {
            self.put(
                key,
                values
                    .into_iter()
                    .map(|j| Value::Object(j.0))
                    .collect::<Vec<_>>(),
            );
        }
    }

    /// Converts `metadata`, keeping what a client may send (server-managed timestamps and
    /// managedFields are dropped).
    fn object_meta(&mut self, meta: Option<meta::ObjectMeta>) -> Result<(), String> {
        if let Some(meta) = meta {
            self.obj("metadata", object_meta(meta, "metadata")?);
        }
        Ok(())
    }
}

fn object_meta(mut m: meta::ObjectMeta, path: &str) -> Result<J, String> {
    let mut j = J::default();
    j.s("name", m.name.take());
    j.s("generateName", m.generate_name.take());
    j.s("namespace", m.namespace.take());
    j.s("uid", m.uid.take());
    j.s("resourceVersion", m.resource_version.take());
    j.map("labels", std::mem::take(&mut m.labels));
    j.map("annotations", std::mem::take(&mut m.annotations));
    let owners = std::mem::take(&mut m.owner_references)
        .into_iter()
        .map(|o| {
            let mut r = J::default();
            r.s("apiVersion", o.api_version);
            r.s("kind", o.kind);
            r.s("name", o.name);
            r.s("uid", o.uid);
            r.opt("controller", o.controller);
            r.opt("blockOwnerDeletion", o.block_owner_deletion);
            r
        })
        .collect();
    j.list("ownerReferences", owners);
    j.strs("finalizers", std::mem::take(&mut m.finalizers));
    // Set by the server; ignored on input like the JSON path does.
    m.self_link = None;
    m.generation = None;
    m.creation_timestamp = None;
    m.deletion_timestamp = None;
    m.deletion_grace_period_seconds = None;
    m.managed_fields.clear();
    leftover(path, &m)?;
    Ok(j)
}

fn int_or_string(v: IntOrString) -> Value {
    if v.r#type == Some(1) {
        Value::String(v.str_val.unwrap_or_default())
    } else {
        Value::from(v.int_val.unwrap_or(0))
    }
}

/// True for the zero IntOrString (int 0 or ""), which Go always writes for non-pointer fields.
fn int_or_string_is_zero(v: &IntOrString) -> bool {
    if v.r#type == Some(1) {
        v.str_val.as_deref().unwrap_or("").is_empty()
    } else {
        v.int_val.unwrap_or(0) == 0
    }
}

fn label_selector(mut s: meta::LabelSelector, path: &str) -> Result<J, String> {
    let mut j = J::default();
    j.map("matchLabels", std::mem::take(&mut s.match_labels));
    let exprs = std::mem::take(&mut s.match_expressions)
        .into_iter()
        .map(|r| {
            let mut e = J::default();
            e.s("key", r.key);
            e.s("operator", r.operator);
            e.strs("values", r.values);
            e
        })
        .collect();
    j.list("matchExpressions", exprs);
    leftover(path, &s)?;
    Ok(j)
}

fn service_spec(mut s: core::ServiceSpec) -> Result<J, String> {
    let mut j = J::default();
    let mut ports = Vec::new();
    for (i, mut p) in std::mem::take(&mut s.ports).into_iter().enumerate() {
        let mut port = J::default();
        port.s("name", p.name.take());
        port.s("protocol", p.protocol.take());
        port.opt("appProtocol", p.app_protocol.take());
        port.opt("port", p.port.take());
        if let Some(target) = p.target_port.take().filter(|t| !int_or_string_is_zero(t)) {
            port.put("targetPort", int_or_string(target));
        }
        port.nz("nodePort", p.node_port.take());
        leftover(&format!("spec.ports[{i}]"), &p)?;
        ports.push(port);
    }
    j.list("ports", ports);
    j.map("selector", std::mem::take(&mut s.selector));
    j.s("clusterIP", s.cluster_ip.take());
    j.strs("clusterIPs", std::mem::take(&mut s.cluster_ips));
    j.s("type", s.r#type.take());
    j.strs("externalIPs", std::mem::take(&mut s.external_ips));
    j.s("sessionAffinity", s.session_affinity.take());
    j.s("loadBalancerIP", s.load_balancer_ip.take());
    j.strs(
        "loadBalancerSourceRanges",
        std::mem::take(&mut s.load_balancer_source_ranges),
    );
    j.s("externalName", s.external_name.take());
    j.s("externalTrafficPolicy", s.external_traffic_policy.take());
    j.nz("healthCheckNodePort", s.health_check_node_port.take());
    j.yes(
        "publishNotReadyAddresses",
        s.publish_not_ready_addresses.take(),
    );
    if let Some(cfg) = s.session_affinity_config.take() {
        let mut c = J::default();
        if let Some(ip) = cfg.client_ip {
            let mut ipj = J::default();
            ipj.opt("timeoutSeconds", ip.timeout_seconds);
            c.put("clientIP", ipj.0);
        }
        j.put("sessionAffinityConfig", c.0);
    }
    j.strs("ipFamilies", std::mem::take(&mut s.ip_families));
    j.opt("ipFamilyPolicy", s.ip_family_policy.take());
    j.opt(
        "allocateLoadBalancerNodePorts",
        s.allocate_load_balancer_node_ports.take(),
    );
    j.opt("loadBalancerClass", s.load_balancer_class.take());
    j.opt("internalTrafficPolicy", s.internal_traffic_policy.take());
    j.opt("trafficDistribution", s.traffic_distribution.take());
    leftover("spec", &s)?;
    Ok(j)
}

fn deployment_spec(mut s: apps::DeploymentSpec) -> Result<J, String> {
    let mut j = J::default();
    j.opt("replicas", s.replicas.take());
    if let Some(sel) = s.selector.take() {
        j.obj("selector", label_selector(sel, "spec.selector")?);
    }
    if let Some(mut t) = s.template.take() {
        let mut tj = J::default();
        if let Some(m) = t.metadata.take() {
            tj.obj("metadata", object_meta(m, "spec.template.metadata")?);
        }
        if let Some(ps) = t.spec.take() {
            tj.obj("spec", pod_spec(ps, "spec.template.spec")?);
        }
        j.obj("template", tj);
    }
    if let Some(mut st) = s.strategy.take() {
        let mut sj = J::default();
        sj.s("type", st.r#type.take());
        if let Some(ru) = st.rolling_update.take() {
            let mut r = J::default();
            if let Some(v) = ru.max_unavailable {
                r.put("maxUnavailable", int_or_string(v));
            }
            if let Some(v) = ru.max_surge {
                r.put("maxSurge", int_or_string(v));
            }
            sj.put("rollingUpdate", r.0);
        }
        leftover("spec.strategy", &st)?;
        j.obj("strategy", sj);
    }
    j.nz("minReadySeconds", s.min_ready_seconds.take());
    j.opt("revisionHistoryLimit", s.revision_history_limit.take());
    j.yes("paused", s.paused.take());
    j.opt(
        "progressDeadlineSeconds",
        s.progress_deadline_seconds.take(),
    );
    leftover("spec", &s)?;
    Ok(j)
}

fn pod_spec(mut s: core::PodSpec, path: &str) -> Result<J, String> {
    let mut j = J::default();
    let mut volumes = Vec::new();
    for (i, v) in std::mem::take(&mut s.volumes).into_iter().enumerate() {
        volumes.push(volume(v, &format!("{path}.volumes[{i}]"))?);
    }
    j.list("volumes", volumes);
    let mut init = Vec::new();
    for (i, c) in std::mem::take(&mut s.init_containers)
        .into_iter()
        .enumerate()
    {
        init.push(container(c, &format!("{path}.initContainers[{i}]"))?);
    }
    j.list("initContainers", init);
    let mut containers = Vec::new();
    for (i, c) in std::mem::take(&mut s.containers).into_iter().enumerate() {
        containers.push(container(c, &format!("{path}.containers[{i}]"))?);
    }
    j.list("containers", containers);
    j.s("restartPolicy", s.restart_policy.take());
    j.opt(
        "terminationGracePeriodSeconds",
        s.termination_grace_period_seconds.take(),
    );
    j.opt("activeDeadlineSeconds", s.active_deadline_seconds.take());
    j.s("dnsPolicy", s.dns_policy.take());
    j.map("nodeSelector", std::mem::take(&mut s.node_selector));
    j.s("serviceAccountName", s.service_account_name.take());
    j.s("serviceAccount", s.service_account.take());
    j.opt(
        "automountServiceAccountToken",
        s.automount_service_account_token.take(),
    );
    j.s("nodeName", s.node_name.take());
    j.yes("hostNetwork", s.host_network.take());
    j.yes("hostPID", s.host_pid.take());
    j.yes("hostIPC", s.host_ipc.take());
    j.opt("shareProcessNamespace", s.share_process_namespace.take());
    let secrets = std::mem::take(&mut s.image_pull_secrets)
        .into_iter()
        .map(|r| {
            let mut o = J::default();
            o.s("name", r.name);
            o
        })
        .collect();
    j.list("imagePullSecrets", secrets);
    j.s("hostname", s.hostname.take());
    j.s("subdomain", s.subdomain.take());
    j.s("schedulerName", s.scheduler_name.take());
    let tolerations = std::mem::take(&mut s.tolerations)
        .into_iter()
        .map(|t| {
            let mut o = J::default();
            o.s("key", t.key);
            o.s("operator", t.operator);
            o.s("value", t.value);
            o.s("effect", t.effect);
            o.opt("tolerationSeconds", t.toleration_seconds);
            o
        })
        .collect();
    j.list("tolerations", tolerations);
    j.s("priorityClassName", s.priority_class_name.take());
    j.opt("priority", s.priority.take());
    j.opt("enableServiceLinks", s.enable_service_links.take());
    j.opt("preemptionPolicy", s.preemption_policy.take());
    j.opt("setHostnameAsFQDN", s.set_hostname_as_fqdn.take());
    j.opt("hostUsers", s.host_users.take());
    leftover(path, &s)?;
    Ok(j)
}

fn local_name(r: Option<core::LocalObjectReference>, j: &mut J) {
    j.s("name", r.and_then(|r| r.name));
}

fn volume(mut v: core::Volume, path: &str) -> Result<J, String> {
    let mut j = J::default();
    j.s("name", v.name.take());
    if let Some(mut src) = v.volume_source.take() {
        if let Some(e) = src.empty_dir.take() {
            let mut o = J::default();
            o.s("medium", e.medium);
            o.s("sizeLimit", e.size_limit.and_then(|q| q.string));
            j.put("emptyDir", o.0);
        }
        if let Some(mut cm) = src.config_map.take() {
            let mut o = J::default();
            local_name(cm.local_object_reference.take(), &mut o);
            o.list("items", key_to_paths(std::mem::take(&mut cm.items)));
            o.opt("defaultMode", cm.default_mode.take());
            o.opt("optional", cm.optional.take());
            j.put("configMap", o.0);
        }
        if let Some(sec) = src.secret.take() {
            let mut o = J::default();
            o.s("secretName", sec.secret_name);
            o.list("items", key_to_paths(sec.items));
            o.opt("defaultMode", sec.default_mode);
            o.opt("optional", sec.optional);
            j.put("secret", o.0);
        }
        if let Some(hp) = src.host_path.take() {
            let mut o = J::default();
            o.s("path", hp.path);
            o.opt("type", hp.r#type);
            j.put("hostPath", o.0);
        }
        if let Some(pvc) = src.persistent_volume_claim.take() {
            let mut o = J::default();
            o.s("claimName", pvc.claim_name);
            o.yes("readOnly", pvc.read_only);
            j.put("persistentVolumeClaim", o.0);
        }
        leftover(path, &src)?;
    }
    leftover(path, &v)?;
    Ok(j)
}

fn key_to_paths(items: Vec<core::KeyToPath>) -> Vec<J> {
    items
        .into_iter()
        .map(|k| {
            let mut o = J::default();
            o.s("key", k.key);
            o.s("path", k.path);
            o.opt("mode", k.mode);
            o
        })
        .collect()
}

fn container(mut c: core::Container, path: &str) -> Result<J, String> {
    let mut j = J::default();
    j.s("name", c.name.take());
    j.s("image", c.image.take());
    j.strs("command", std::mem::take(&mut c.command));
    j.strs("args", std::mem::take(&mut c.args));
    j.s("workingDir", c.working_dir.take());
    let ports = std::mem::take(&mut c.ports)
        .into_iter()
        .map(|p| {
            let mut o = J::default();
            o.s("name", p.name);
            o.nz("hostPort", p.host_port);
            o.opt("containerPort", p.container_port);
            o.s("protocol", p.protocol);
            o.s("hostIP", p.host_ip);
            o
        })
        .collect();
    j.list("ports", ports);
    let mut env_from = Vec::new();
    for (i, mut e) in std::mem::take(&mut c.env_from).into_iter().enumerate() {
        let mut o = J::default();
        o.s("prefix", e.prefix.take());
        if let Some(cm) = e.config_map_ref.take() {
            let mut r = J::default();
            local_name(cm.local_object_reference, &mut r);
            r.opt("optional", cm.optional);
            o.put("configMapRef", r.0);
        }
        if let Some(sec) = e.secret_ref.take() {
            let mut r = J::default();
            local_name(sec.local_object_reference, &mut r);
            r.opt("optional", sec.optional);
            o.put("secretRef", r.0);
        }
        leftover(&format!("{path}.envFrom[{i}]"), &e)?;
        env_from.push(o);
    }
    j.list("envFrom", env_from);
    let mut env = Vec::new();
    for (i, mut e) in std::mem::take(&mut c.env).into_iter().enumerate() {
        let mut o = J::default();
        o.s("name", e.name.take());
        o.s("value", e.value.take());
        if let Some(src) = e.value_from.take() {
            o.put(
                "valueFrom",
                env_var_source(src, &format!("{path}.env[{i}].valueFrom"))?.0,
            );
        }
        env.push(o);
    }
    j.list("env", env);
    if let Some(mut r) = c.resources.take() {
        let mut o = J::default();
        o.quantities("limits", std::mem::take(&mut r.limits));
        o.quantities("requests", std::mem::take(&mut r.requests));
        leftover(&format!("{path}.resources"), &r)?;
        j.obj("resources", o);
    }
    let mounts = std::mem::take(&mut c.volume_mounts)
        .into_iter()
        .map(|m| {
            let mut o = J::default();
            o.s("name", m.name);
            o.yes("readOnly", m.read_only);
            o.opt("recursiveReadOnly", m.recursive_read_only);
            o.s("mountPath", m.mount_path);
            o.s("subPath", m.sub_path);
            o.opt("mountPropagation", m.mount_propagation);
            o.s("subPathExpr", m.sub_path_expr);
            o
        })
        .collect();
    j.list("volumeMounts", mounts);
    if let Some(p) = c.liveness_probe.take() {
        j.put(
            "livenessProbe",
            probe(p, &format!("{path}.livenessProbe"))?.0,
        );
    }
    if let Some(p) = c.readiness_probe.take() {
        j.put(
            "readinessProbe",
            probe(p, &format!("{path}.readinessProbe"))?.0,
        );
    }
    if let Some(p) = c.startup_probe.take() {
        j.put("startupProbe", probe(p, &format!("{path}.startupProbe"))?.0);
    }
    j.s("terminationMessagePath", c.termination_message_path.take());
    j.s(
        "terminationMessagePolicy",
        c.termination_message_policy.take(),
    );
    j.s("imagePullPolicy", c.image_pull_policy.take());
    if let Some(mut sc) = c.security_context.take() {
        let mut o = J::default();
        if let Some(caps) = sc.capabilities.take() {
            let mut cj = J::default();
            cj.strs("add", caps.add);
            cj.strs("drop", caps.drop);
            o.put("capabilities", cj.0);
        }
        o.opt("privileged", sc.privileged.take());
        o.opt("runAsUser", sc.run_as_user.take());
        o.opt("runAsGroup", sc.run_as_group.take());
        o.opt("runAsNonRoot", sc.run_as_non_root.take());
        o.opt(
            "readOnlyRootFilesystem",
            sc.read_only_root_filesystem.take(),
        );
        o.opt(
            "allowPrivilegeEscalation",
            sc.allow_privilege_escalation.take(),
        );
        leftover(&format!("{path}.securityContext"), &sc)?;
        j.put("securityContext", o.0);
    }
    j.yes("stdin", c.stdin.take());
    j.yes("stdinOnce", c.stdin_once.take());
    j.yes("tty", c.tty.take());
    leftover(path, &c)?;
    Ok(j)
}

fn env_var_source(mut s: core::EnvVarSource, path: &str) -> Result<J, String> {
    let mut o = J::default();
    if let Some(f) = s.field_ref.take() {
        let mut r = J::default();
        r.s("apiVersion", f.api_version);
        r.s("fieldPath", f.field_path);
        o.put("fieldRef", r.0);
    }
    if let Some(f) = s.resource_field_ref.take() {
        let mut r = J::default();
        r.s("containerName", f.container_name);
        r.s("resource", f.resource);
        r.s("divisor", f.divisor.and_then(|q| q.string));
        o.put("resourceFieldRef", r.0);
    }
    if let Some(k) = s.config_map_key_ref.take() {
        let mut r = J::default();
        local_name(k.local_object_reference, &mut r);
        r.s("key", k.key);
        r.opt("optional", k.optional);
        o.put("configMapKeyRef", r.0);
    }
    if let Some(k) = s.secret_key_ref.take() {
        let mut r = J::default();
        local_name(k.local_object_reference, &mut r);
        r.s("key", k.key);
        r.opt("optional", k.optional);
        o.put("secretKeyRef", r.0);
    }
    leftover(path, &s)?;
    Ok(o)
}

fn probe(mut p: core::Probe, path: &str) -> Result<J, String> {
    let mut o = J::default();
    if let Some(mut h) = p.handler.take() {
        if let Some(e) = h.exec.take() {
            let mut r = J::default();
            r.strs("command", e.command);
            o.put("exec", r.0);
        }
        if let Some(g) = h.http_get.take() {
            let mut r = J::default();
            r.s("path", g.path);
            if let Some(port) = g.port {
                r.put("port", int_or_string(port));
            }
            r.s("host", g.host);
            r.s("scheme", g.scheme);
            let headers = g
                .http_headers
                .into_iter()
                .map(|h| {
                    let mut x = J::default();
                    x.put("name", h.name.unwrap_or_default());
                    x.put("value", h.value.unwrap_or_default());
                    x
                })
                .collect();
            r.list("httpHeaders", headers);
            o.put("httpGet", r.0);
        }
        if let Some(t) = h.tcp_socket.take() {
            let mut r = J::default();
            if let Some(port) = t.port {
                r.put("port", int_or_string(port));
            }
            r.s("host", t.host);
            o.put("tcpSocket", r.0);
        }
        if let Some(g) = h.grpc.take() {
            let mut r = J::default();
            r.opt("port", g.port);
            r.opt("service", g.service);
            o.put("grpc", r.0);
        }
        leftover(path, &h)?;
    }
    o.nz("initialDelaySeconds", p.initial_delay_seconds.take());
    o.nz("timeoutSeconds", p.timeout_seconds.take());
    o.nz("periodSeconds", p.period_seconds.take());
    o.nz("successThreshold", p.success_threshold.take());
    o.nz("failureThreshold", p.failure_threshold.take());
    o.opt(
        "terminationGracePeriodSeconds",
        p.termination_grace_period_seconds.take(),
    );
    leftover(path, &p)?;
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_pb::apimachinery::pkg::runtime::TypeMeta;
    use serde_json::json;

    fn s(v: &str) -> Option<String> {
        Some(v.to_string())
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn envelope(api_version: &str, kind: &str, raw: Vec<u8>) -> Vec<u8> {
        let unknown = Unknown {
            type_meta: Some(TypeMeta {
                api_version: s(api_version),
                kind: s(kind),
            }),
            raw: Some(raw),
            content_encoding: s(""),
            content_type: s(""),
        };
        let mut body = MAGIC.to_vec();
        body.extend(unknown.encode_to_vec());
        body
    }

    /// ObjectMeta the way Go writes it: every non-pointer field present, mostly empty.
    fn go_meta(name: &str, labels: BTreeMap<String, String>) -> meta::ObjectMeta {
        meta::ObjectMeta {
            name: s(name),
            generate_name: s(""),
            namespace: s(""),
            self_link: s(""),
            uid: s(""),
            resource_version: s(""),
            generation: Some(0),
            creation_timestamp: Some(meta::Time::default()),
            labels,
            ..Default::default()
        }
    }

    fn go_container(name: &str, image: &str) -> core::Container {
        core::Container {
            name: s(name),
            image: s(image),
            working_dir: s(""),
            resources: Some(core::ResourceRequirements::default()),
            termination_message_path: s(""),
            termination_message_policy: s(""),
            image_pull_policy: s(""),
            stdin: Some(false),
            stdin_once: Some(false),
            tty: Some(false),
            ..Default::default()
        }
    }

    fn go_pod_spec(containers: Vec<core::Container>) -> core::PodSpec {
        core::PodSpec {
            containers,
            restart_policy: s(""),
            dns_policy: s(""),
            service_account_name: s(""),
            service_account: s(""),
            node_name: s(""),
            host_network: Some(false),
            host_pid: Some(false),
            host_ipc: Some(false),
            hostname: s(""),
            subdomain: s(""),
            scheduler_name: s(""),
            priority_class_name: s(""),
            ..Default::default()
        }
    }

    #[test]
    fn namespace() {
        let ns = core::Namespace {
            metadata: Some(go_meta("demo", BTreeMap::new())),
            spec: Some(core::NamespaceSpec::default()),
            status: Some(core::NamespaceStatus {
                phase: s(""),
                ..Default::default()
            }),
        };
        let body = envelope("v1", "Namespace", ns.encode_to_vec());
        assert_eq!(
            decode("Namespace", &body).unwrap(),
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "demo"}})
        );
    }

    #[test]
    fn configmap() {
        let cm = core::ConfigMap {
            metadata: Some(meta::ObjectMeta {
                namespace: s("ns1"),
                annotations: labels(&[("note", "x")]),
                finalizers: vec!["f1".into()],
                ..go_meta("cfg", BTreeMap::new())
            }),
            immutable: Some(false),
            data: labels(&[("a", "b"), ("empty", "")]),
            binary_data: [("bin".to_string(), vec![0u8, 1, 2, 255])]
                .into_iter()
                .collect(),
        };
        let body = envelope("v1", "ConfigMap", cm.encode_to_vec());
        assert_eq!(
            decode("ConfigMap", &body).unwrap(),
            json!({
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "cfg", "namespace": "ns1", "annotations": {"note": "x"},
                             "finalizers": ["f1"]},
                "immutable": false,
                "data": {"a": "b", "empty": ""},
                "binaryData": {"bin": "AAEC/w=="}
            })
        );
    }

    #[test]
    fn service_like_kubectl_create_service() {
        let port = |name: &str, port: i32, target: IntOrString, node_port: i32| core::ServicePort {
            name: s(name),
            protocol: s("TCP"),
            port: Some(port),
            target_port: Some(target),
            node_port: Some(node_port),
            ..Default::default()
        };
        let svc = core::Service {
            metadata: Some(go_meta("web", labels(&[("app", "web")]))),
            spec: Some(core::ServiceSpec {
                ports: vec![
                    port(
                        "80-8080",
                        80,
                        IntOrString {
                            r#type: Some(0),
                            int_val: Some(8080),
                            str_val: s(""),
                        },
                        30080,
                    ),
                    port(
                        "named",
                        443,
                        IntOrString {
                            r#type: Some(1),
                            int_val: Some(0),
                            str_val: s("https"),
                        },
                        0,
                    ),
                    port(
                        "plain",
                        53,
                        IntOrString {
                            r#type: Some(0),
                            int_val: Some(0),
                            str_val: s(""),
                        },
                        0,
                    ),
                ],
                selector: labels(&[("app", "web")]),
                cluster_ip: s(""),
                r#type: s("NodePort"),
                session_affinity: s(""),
                load_balancer_ip: s(""),
                external_name: s(""),
                external_traffic_policy: s("Local"),
                health_check_node_port: Some(0),
                publish_not_ready_addresses: Some(false),
                internal_traffic_policy: s("Cluster"),
                external_ips: vec!["10.1.1.1".into()],
                cluster_ips: vec![],
                ..Default::default()
            }),
            status: Some(core::ServiceStatus::default()),
        };
        let body = envelope("v1", "Service", svc.encode_to_vec());
        assert_eq!(
            decode("Service", &body).unwrap(),
            json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "web", "labels": {"app": "web"}},
                "spec": {
                    "ports": [
                        {"name": "80-8080", "protocol": "TCP", "port": 80, "targetPort": 8080,
                         "nodePort": 30080},
                        {"name": "named", "protocol": "TCP", "port": 443, "targetPort": "https"},
                        {"name": "plain", "protocol": "TCP", "port": 53}
                    ],
                    "selector": {"app": "web"},
                    "type": "NodePort",
                    "externalIPs": ["10.1.1.1"],
                    "externalTrafficPolicy": "Local",
                    "internalTrafficPolicy": "Cluster"
                }
            })
        );
    }

    #[test]
    fn deployment_like_kubectl_create_deployment() {
        let mut c = go_container("nginx", "nginx:1.27");
        c.command = vec!["sleep".into(), "3600".into()];
        c.ports = vec![core::ContainerPort {
            name: s(""),
            host_port: Some(0),
            container_port: Some(80),
            protocol: s(""),
            host_ip: s(""),
        }];
        let d = apps::Deployment {
            metadata: Some(go_meta("nginx", labels(&[("app", "nginx")]))),
            spec: Some(apps::DeploymentSpec {
                replicas: Some(3),
                selector: Some(meta::LabelSelector {
                    match_labels: labels(&[("app", "nginx")]),
                    match_expressions: vec![meta::LabelSelectorRequirement {
                        key: s("tier"),
                        operator: s("In"),
                        values: vec!["web".into()],
                    }],
                }),
                template: Some(core::PodTemplateSpec {
                    metadata: Some(go_meta("", labels(&[("app", "nginx")]))),
                    spec: Some(go_pod_spec(vec![c])),
                }),
                strategy: Some(apps::DeploymentStrategy {
                    r#type: s(""),
                    rolling_update: None,
                }),
                min_ready_seconds: Some(0),
                paused: Some(false),
                ..Default::default()
            }),
            status: Some(apps::DeploymentStatus::default()),
        };
        let body = envelope("apps/v1", "Deployment", d.encode_to_vec());
        assert_eq!(
            decode("Deployment", &body).unwrap(),
            json!({
                "apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "nginx", "labels": {"app": "nginx"}},
                "spec": {
                    "replicas": 3,
                    "selector": {
                        "matchLabels": {"app": "nginx"},
                        "matchExpressions": [{"key": "tier", "operator": "In", "values": ["web"]}]
                    },
                    "template": {
                        "metadata": {"labels": {"app": "nginx"}},
                        "spec": {"containers": [{
                            "name": "nginx", "image": "nginx:1.27",
                            "command": ["sleep", "3600"],
                            "ports": [{"containerPort": 80}]
                        }]}
                    }
                }
            })
        );
    }

    #[test]
    fn deployment_strategy_and_replicas_zero() {
        let d = apps::Deployment {
            metadata: Some(go_meta("d", BTreeMap::new())),
            spec: Some(apps::DeploymentSpec {
                replicas: Some(0),
                strategy: Some(apps::DeploymentStrategy {
                    r#type: s("RollingUpdate"),
                    rolling_update: Some(apps::RollingUpdateDeployment {
                        max_unavailable: Some(IntOrString {
                            r#type: Some(1),
                            int_val: None,
                            str_val: s("25%"),
                        }),
                        max_surge: Some(IntOrString {
                            r#type: Some(0),
                            int_val: Some(1),
                            str_val: None,
                        }),
                    }),
                }),
                revision_history_limit: Some(2),
                ..Default::default()
            }),
            status: None,
        };
        let body = envelope("apps/v1", "Deployment", d.encode_to_vec());
        assert_eq!(
            decode("Deployment", &body).unwrap()["spec"],
            json!({
                "replicas": 0,
                "strategy": {"type": "RollingUpdate",
                             "rollingUpdate": {"maxUnavailable": "25%", "maxSurge": 1}},
                "revisionHistoryLimit": 2
            })
        );
    }

    #[test]
    fn pod_like_kubectl_run_with_common_fields() {
        let mut c = go_container("app", "busybox");
        c.args = vec!["echo".into(), "hi".into()];
        c.image_pull_policy = s("IfNotPresent");
        c.ports = vec![core::ContainerPort {
            name: s("http"),
            host_port: Some(8081),
            container_port: Some(8080),
            protocol: s("TCP"),
            host_ip: s(""),
        }];
        c.env = vec![
            core::EnvVar {
                name: s("A"),
                value: s("1"),
                value_from: None,
            },
            core::EnvVar {
                name: s("B"),
                value: s(""),
                value_from: Some(core::EnvVarSource {
                    config_map_key_ref: Some(core::ConfigMapKeySelector {
                        local_object_reference: Some(core::LocalObjectReference { name: s("cfg") }),
                        key: s("k"),
                        optional: Some(true),
                    }),
                    ..Default::default()
                }),
            },
            core::EnvVar {
                name: s("NODE"),
                value: s(""),
                value_from: Some(core::EnvVarSource {
                    field_ref: Some(core::ObjectFieldSelector {
                        api_version: s("v1"),
                        field_path: s("spec.nodeName"),
                    }),
                    ..Default::default()
                }),
            },
        ];
        c.resources = Some(core::ResourceRequirements {
            limits: [("cpu".to_string(), Quantity { string: s("500m") })].into(),
            requests: [("memory".to_string(), Quantity { string: s("64Mi") })].into(),
            claims: vec![],
        });
        c.volume_mounts = vec![core::VolumeMount {
            name: s("conf"),
            read_only: Some(true),
            mount_path: s("/etc/conf"),
            sub_path: s(""),
            sub_path_expr: s(""),
            ..Default::default()
        }];
        c.readiness_probe = Some(core::Probe {
            handler: Some(core::ProbeHandler {
                http_get: Some(core::HttpGetAction {
                    path: s("/healthz"),
                    port: Some(IntOrString {
                        r#type: Some(1),
                        int_val: Some(0),
                        str_val: s("http"),
                    }),
                    host: s(""),
                    scheme: s("HTTP"),
                    http_headers: vec![],
                }),
                ..Default::default()
            }),
            initial_delay_seconds: Some(5),
            timeout_seconds: Some(0),
            period_seconds: Some(10),
            success_threshold: Some(0),
            failure_threshold: Some(0),
            termination_grace_period_seconds: None,
        });
        c.liveness_probe = Some(core::Probe {
            handler: Some(core::ProbeHandler {
                exec: Some(core::ExecAction {
                    command: vec!["true".into()],
                }),
                tcp_socket: None,
                ..Default::default()
            }),
            ..Default::default()
        });
        c.stdin = Some(true);
        c.tty = Some(true);
        let mut init = go_container("init", "busybox");
        init.command = vec!["sh".into(), "-c".into(), "true".into()];
        let mut spec = go_pod_spec(vec![c]);
        spec.init_containers = vec![init];
        spec.restart_policy = s("Always");
        spec.dns_policy = s("ClusterFirst");
        spec.host_network = Some(true);
        spec.termination_grace_period_seconds = Some(0);
        spec.node_selector = labels(&[("disk", "ssd")]);
        spec.volumes = vec![
            core::Volume {
                name: s("conf"),
                volume_source: Some(core::VolumeSource {
                    config_map: Some(core::ConfigMapVolumeSource {
                        local_object_reference: Some(core::LocalObjectReference { name: s("cfg") }),
                        items: vec![],
                        default_mode: Some(420),
                        optional: None,
                    }),
                    ..Default::default()
                }),
            },
            core::Volume {
                name: s("scratch"),
                volume_source: Some(core::VolumeSource {
                    empty_dir: Some(core::EmptyDirVolumeSource {
                        medium: s(""),
                        size_limit: None,
                    }),
                    ..Default::default()
                }),
            },
        ];
        let pod = core::Pod {
            metadata: Some(go_meta("app", labels(&[("run", "app")]))),
            spec: Some(spec),
            status: Some(core::PodStatus::default()),
        };
        let body = envelope("v1", "Pod", pod.encode_to_vec());
        assert_eq!(
            decode("Pod", &body).unwrap(),
            json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "app", "labels": {"run": "app"}},
                "spec": {
                    "volumes": [
                        {"name": "conf", "configMap": {"name": "cfg", "defaultMode": 420}},
                        {"name": "scratch", "emptyDir": {}}
                    ],
                    "initContainers": [{"name": "init", "image": "busybox",
                                        "command": ["sh", "-c", "true"]}],
                    "containers": [{
                        "name": "app", "image": "busybox", "args": ["echo", "hi"],
                        "ports": [{"name": "http", "hostPort": 8081, "containerPort": 8080,
                                   "protocol": "TCP"}],
                        "env": [
                            {"name": "A", "value": "1"},
                            {"name": "B", "valueFrom": {"configMapKeyRef":
                                {"name": "cfg", "key": "k", "optional": true}}},
                            {"name": "NODE", "valueFrom": {"fieldRef":
                                {"apiVersion": "v1", "fieldPath": "spec.nodeName"}}}
                        ],
                        "resources": {"limits": {"cpu": "500m"}, "requests": {"memory": "64Mi"}},
                        "volumeMounts": [{"name": "conf", "readOnly": true,
                                          "mountPath": "/etc/conf"}],
                        "livenessProbe": {"exec": {"command": ["true"]}},
                        "readinessProbe": {
                            "httpGet": {"path": "/healthz", "port": "http", "scheme": "HTTP"},
                            "initialDelaySeconds": 5, "periodSeconds": 10
                        },
                        "imagePullPolicy": "IfNotPresent",
                        "stdin": true, "tty": true
                    }],
                    "restartPolicy": "Always",
                    "terminationGracePeriodSeconds": 0,
                    "dnsPolicy": "ClusterFirst",
                    "nodeSelector": {"disk": "ssd"},
                    "hostNetwork": true
                }
            })
        );
    }

    #[test]
    fn owner_references_and_generate_name() {
        let ns = core::Namespace {
            metadata: Some(meta::ObjectMeta {
                generate_name: s("tmp-"),
                owner_references: vec![meta::OwnerReference {
                    api_version: s("v1"),
                    kind: s("ConfigMap"),
                    name: s("owner"),
                    uid: s("1234"),
                    controller: Some(false),
                    block_owner_deletion: None,
                }],
                ..Default::default()
            }),
            spec: Some(core::NamespaceSpec {
                finalizers: vec!["kubernetes".into()],
            }),
            status: None,
        };
        let body = envelope("v1", "Namespace", ns.encode_to_vec());
        assert_eq!(
            decode("Namespace", &body).unwrap(),
            json!({
                "apiVersion": "v1", "kind": "Namespace",
                "metadata": {"generateName": "tmp-", "ownerReferences": [
                    {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": "1234",
                     "controller": false}
                ]},
                "spec": {"finalizers": ["kubernetes"]}
            })
        );
    }

    #[test]
    fn unconverted_fields_are_rejected_not_dropped() {
        let mut spec = go_pod_spec(vec![go_container("a", "b")]);
        spec.affinity = Some(core::Affinity {
            node_affinity: Some(core::NodeAffinity::default()),
            ..Default::default()
        });
        let pod = core::Pod {
            metadata: Some(go_meta("p", BTreeMap::new())),
            spec: Some(spec),
            status: None,
        };
        let err = decode("Pod", &envelope("v1", "Pod", pod.encode_to_vec())).unwrap_err();
        assert!(
            err.starts_with("protobuf body for Pod: spec (PodSpec) sets protobuf field(s) 18"),
            "{err}"
        );

        let mut c = go_container("a", "b");
        c.lifecycle = Some(core::Lifecycle {
            stop_signal: s("SIGTERM"),
            ..Default::default()
        });
        let d = apps::Deployment {
            spec: Some(apps::DeploymentSpec {
                template: Some(core::PodTemplateSpec {
                    metadata: None,
                    spec: Some(go_pod_spec(vec![c])),
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let err = decode(
            "Deployment",
            &envelope("apps/v1", "Deployment", d.encode_to_vec()),
        )
        .unwrap_err();
        assert!(
            err.contains("spec.template.spec.containers[0] (Container)"),
            "{err}"
        );
    }

    #[test]
    fn malformed_bodies() {
        let cm = core::ConfigMap {
            metadata: Some(go_meta("cfg", BTreeMap::new())),
            ..Default::default()
        };
        let good = envelope("v1", "ConfigMap", cm.encode_to_vec());
        assert!(decode("ConfigMap", &good).is_ok());

        // Unsupported kind.
        let err = decode("Lease", &good).unwrap_err();
        assert_eq!(
            err,
            "protobuf bodies are supported for Namespace, ConfigMap, Service, Deployment, Pod; \
             send Lease as application/json"
        );
        // No magic.
        let err = decode("ConfigMap", &good[4..]).unwrap_err();
        assert!(err.contains("magic"), "{err}");
        let err = decode("ConfigMap", b"{\"kind\":\"ConfigMap\"}").unwrap_err();
        assert!(err.contains("magic"), "{err}");
        // Truncated envelope.
        let err = decode("ConfigMap", &good[..good.len() - 3]).unwrap_err();
        assert!(err.starts_with("protobuf body for ConfigMap: "), "{err}");
        // Envelope of another kind.
        let err = decode("Pod", &good).unwrap_err();
        assert_eq!(err, "protobuf body is a ConfigMap, expected Pod");
        // Wrong apiVersion.
        let other = envelope("apps/v1", "ConfigMap", cm.encode_to_vec());
        assert!(decode("ConfigMap", &other)
            .unwrap_err()
            .contains("apiVersion apps/v1"));
        // Garbage in raw.
        let garbage = envelope("v1", "ConfigMap", vec![0x0a, 0x05, 0x01]);
        assert!(decode("ConfigMap", &garbage)
            .unwrap_err()
            .starts_with("protobuf body for ConfigMap: "));
        // Content encoding.
        let mut unknown = Unknown::decode(&good[4..]).unwrap();
        unknown.content_encoding = s("gzip");
        let mut gz = MAGIC.to_vec();
        gz.extend(unknown.encode_to_vec());
        assert!(decode("ConfigMap", &gz).unwrap_err().contains("gzip"));
        // Empty body.
        assert!(decode("ConfigMap", b"").is_err());
    }

    #[test]
    fn missing_type_meta_falls_back_to_kind() {
        let unknown = Unknown {
            type_meta: None,
            raw: Some(
                core::Namespace {
                    metadata: Some(go_meta("x", BTreeMap::new())),
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
            content_encoding: None,
            content_type: None,
        };
        let mut body = MAGIC.to_vec();
        body.extend(unknown.encode_to_vec());
        assert_eq!(
            decode("Namespace", &body).unwrap(),
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}})
        );
    }
}
