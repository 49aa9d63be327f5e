//! Server-side printing: the `meta.k8s.io/v1` Table columns and row cells that
//! kube-apiserver produces for `kubectl get` (pkg/printers/internalversion).
//!
//! The server always prints every column, including the `priority: 1` ones
//! that kubectl shows only with `-o wide`, so `cells` returns one value per
//! column of `columns`.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Duration, SecondsFormat, Utc};
use serde_json::{json, Value};

use super::selector::LabelSelector;

/// One Table column definition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Column {
    pub name: &'static str,
    /// The OpenAPI type of the cells: "string", "integer", "date", ...
    pub kind: &'static str,
    /// "name" for the column holding the object name, "" otherwise.
    pub format: &'static str,
    pub description: &'static str,
    /// 0 is always shown, 1 only with `-o wide`.
    pub priority: i32,
}

const fn column(name: &'static str, kind: &'static str, description: &'static str) -> Column {
    Column {
        name,
        kind,
        format: "",
        description,
        priority: 0,
    }
}

const fn wide(name: &'static str, kind: &'static str, description: &'static str) -> Column {
    Column {
        priority: 1,
        ..column(name, kind, description)
    }
}

const NAME_DESCRIPTION: &str = "Name must be unique within a namespace. Is required when creating resources, although some resources may allow a client to request the generation of an appropriate name automatically. Name is primarily intended for creation idempotence and configuration definition. Cannot be updated. More info: https://kubernetes.io/docs/concepts/overview/working-with-objects/names#names";
const CREATED_DESCRIPTION: &str = "CreationTimestamp is a timestamp representing the server time when this object was created. It is not guaranteed to be set in happens-before order across separate operations. Clients may not set this value. It is represented in RFC3339 form and is in UTC.\n\nPopulated by the system. Read-only. Null for lists. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#metadata";
const CONTAINERS_DESCRIPTION: &str = "Names of each container in the template.";
const IMAGES_DESCRIPTION: &str = "Images referenced by each container in the template.";
const READY_PODS_DESCRIPTION: &str = "Number of the pod with ready state";

const NAME: Column = Column {
    format: "name",
    ..column("Name", "string", NAME_DESCRIPTION)
};
const AGE: Column = column("Age", "string", CREATED_DESCRIPTION);
const CONTAINERS: Column = wide("Containers", "string", CONTAINERS_DESCRIPTION);
const IMAGES: Column = wide("Images", "string", IMAGES_DESCRIPTION);

/// The Table columns kube-apiserver uses for `kind`. Kinds without a printer
/// get the default table convertor's columns: Name and "Created At".
pub fn columns(kind: &str) -> Vec<Column> {
    match kind {
        "Pod" => pod_columns(),
        "Service" => service_columns(),
        "Endpoints" => vec![
            NAME,
            column("Endpoints", "string", "The set of all endpoints is the union of all subsets. Addresses are placed into subsets according to the IPs they share."),
            AGE,
        ],
        "EndpointSlice" => vec![
            NAME,
            column("AddressType", "string", "addressType specifies the type of address carried by this EndpointSlice. All addresses in this slice must be the same type."),
            column("Ports", "string", "ports specifies the list of network ports exposed by each endpoint in this slice."),
            column("Endpoints", "string", "endpoints is a list of unique endpoints in this slice. Each slice may include a maximum of 1000 endpoints."),
            AGE,
        ],
        "Node" => node_columns(),
        "Deployment" => deployment_columns(),
        "ReplicaSet" => replica_set_columns(),
        "DaemonSet" => daemon_set_columns(),
        "StatefulSet" => vec![
            NAME,
            column("Ready", "string", READY_PODS_DESCRIPTION),
            AGE,
            CONTAINERS,
            IMAGES,
        ],
        "Namespace" => vec![
            NAME,
            column("Status", "string", "The status of the namespace"),
            AGE,
        ],
        "ConfigMap" => vec![
            NAME,
            column("Data", "string", "Data contains the configuration data. Each key must consist of alphanumeric characters, '-', '_' or '.'."),
            AGE,
        ],
        "Secret" => vec![
            NAME,
            column("Type", "string", "Used to facilitate programmatic handling of secret data."),
            column("Data", "string", "Data contains the secret data. Each key must consist of alphanumeric characters, '-', '_' or '.'."),
            AGE,
        ],
        "ServiceAccount" => vec![
            NAME,
            column("Secrets", "string", "Secrets is a list of the secrets in the same namespace that pods running using this ServiceAccount are allowed to use."),
            AGE,
        ],
        "Event" => event_columns(),
        "Lease" => vec![
            NAME,
            column("Holder", "string", "holderIdentity contains the identity of the holder of a current lease."),
            AGE,
        ],
        _ => vec![NAME, column("Created At", "date", CREATED_DESCRIPTION)],
    }
}

fn pod_columns() -> Vec<Column> {
    vec![
        NAME,
        column("Ready", "string", "The aggregate readiness state of this pod for accepting traffic."),
        column("Status", "string", "The aggregate status of the containers in this pod."),
        column("Restarts", "string", "The number of times the containers in this pod have been restarted and when the last container in this pod has restarted."),
        AGE,
        wide("IP", "string", "podIP address allocated to the pod. Routable at least within the cluster. Empty if not yet allocated."),
        wide("Node", "string", "NodeName indicates in which node this pod is scheduled. If empty, this pod is a candidate for scheduling by the scheduler defined in schedulerName."),
        wide("Nominated Node", "string", "nominatedNodeName is set only when this pod preempts other pods on the node, but it cannot be scheduled right away as preemption victims receive their graceful termination periods."),
        wide("Readiness Gates", "string", "If specified, all readiness gates will be evaluated for pod readiness."),
    ]
}

fn service_columns() -> Vec<Column> {
    vec![
        NAME,
        column("Type", "string", "type determines how the Service is exposed. Defaults to ClusterIP. Valid options are ExternalName, ClusterIP, NodePort, and LoadBalancer."),
        column("Cluster-IP", "string", "clusterIP is the IP address of the service and is usually assigned randomly."),
        column("External-IP", "string", "externalIPs is a list of IP addresses for which nodes in the cluster will also accept traffic for this service."),
        column("Port(s)", "string", "The list of ports that are exposed by this service."),
        AGE,
        wide("Selector", "string", "Route service traffic to pods with label keys and values matching this selector."),
    ]
}

fn node_columns() -> Vec<Column> {
    const ADDRESSES: &str =
        "List of addresses reachable to the node. Queried from cloud provider, if available.";
    vec![
        NAME,
        column("Status", "string", "The status of the node"),
        column("Roles", "string", "The roles of the node"),
        AGE,
        column("Version", "string", "Kubelet Version reported by the node."),
        wide("Internal-IP", "string", ADDRESSES),
        wide("External-IP", "string", ADDRESSES),
        wide("OS-Image", "string", "OS Image reported by the node from /etc/os-release (e.g. Debian GNU/Linux 7 (wheezy))."),
        wide("Kernel-Version", "string", "Kernel Version reported by the node from 'uname -r' (e.g. 3.16.0-0.bpo.4-amd64)."),
        wide("Container-Runtime", "string", "ContainerRuntime Version reported by the node through runtime remote API (e.g. containerd://1.4.2)."),
    ]
}

fn deployment_columns() -> Vec<Column> {
    vec![
        NAME,
        column("Ready", "string", READY_PODS_DESCRIPTION),
        column("Up-to-date", "string", "Total number of non-terminated pods targeted by this deployment that have the desired template spec."),
        column("Available", "string", "Total number of available pods (ready for at least minReadySeconds) targeted by this deployment."),
        AGE,
        CONTAINERS,
        IMAGES,
        wide("Selector", "string", "Label selector for pods. Existing ReplicaSets whose pods are selected by this will be the ones affected by this deployment."),
    ]
}

fn replica_set_columns() -> Vec<Column> {
    vec![
        NAME,
        column("Desired", "integer", "Replicas is the number of desired replicas. This is a pointer to distinguish between explicit zero and unspecified. Defaults to 1."),
        column("Current", "integer", "Replicas is the most recently observed number of replicas."),
        column("Ready", "integer", "The number of ready replicas for this replica set."),
        AGE,
        CONTAINERS,
        IMAGES,
        wide("Selector", "string", "Selector is a label query over pods that should match the replica count."),
    ]
}

fn daemon_set_columns() -> Vec<Column> {
    vec![
        NAME,
        column("Desired", "integer", "The total number of nodes that should be running the daemon pod (including nodes correctly running the daemon pod)."),
        column("Current", "integer", "The number of nodes that are running at least 1 daemon pod and are supposed to run the daemon pod."),
        column("Ready", "integer", "The number of nodes that should be running the daemon pod and have one or more of the daemon pod running and ready."),
        column("Up-to-date", "integer", "The total number of nodes that are running updated daemon pod"),
        column("Available", "integer", "The number of nodes that should be running the daemon pod and have one or more of the daemon pod running and available (ready for at least spec.minReadySeconds)"),
        column("Node Selector", "string", "NodeSelector is a selector which must be true for the pod to fit on a node. Selector which must match a node's labels for the pod to be scheduled on that node."),
        AGE,
        CONTAINERS,
        IMAGES,
        wide("Selector", "string", "A label query over pods that are managed by the daemon set. Must match in order to be controlled."),
    ]
}

fn event_columns() -> Vec<Column> {
    vec![
        column("Last Seen", "string", "The time at which the most recent occurrence of this event was recorded."),
        column("Type", "string", "Type of this event (Normal, Warning), new types could be added in the future"),
        column("Reason", "string", "This should be a short, machine understandable string that gives the reason for the transition into the object's current status."),
        column("Object", "string", "The object that this event is about."),
        wide("Subobject", "string", "If referring to a piece of an object instead of an entire object, this string should contain a valid JSON/Go field access statement, such as desiredState.manifest.containers[2]."),
        wide("Source", "string", "The component reporting this event. Should be a short machine understandable string."),
        column("Message", "string", "A human-readable description of the status of this operation."),
        wide("First Seen", "string", "The time at which the event was first recorded. (Time of server receipt is in TypeMeta.)"),
        wide("Count", "string", "The number of times this event has occurred."),
        Column {
            priority: 1,
            ..NAME
        },
    ]
}

/// The `columnDefinitions` array of a `meta.k8s.io/v1` Table for `kind`.
pub fn column_definitions_json(kind: &str) -> Value {
    columns(kind)
        .iter()
        .map(|c| {
            json!({
                "name": c.name,
                "type": c.kind,
                "format": c.format,
                "description": c.description,
                "priority": c.priority,
            })
        })
        .collect()
}

/// One Table row for `obj`: a cell per column of `columns(kind)`, same order.
/// Ages are computed relative to `now`.
pub fn cells(kind: &str, obj: &Value, now: DateTime<Utc>) -> Vec<Value> {
    match kind {
        "Pod" => pod_cells(obj, now),
        "Service" => service_cells(obj, now),
        "Endpoints" => vec![name(obj), json!(endpoints_summary(obj)), age(obj, now)],
        "EndpointSlice" => endpoint_slice_cells(obj, now),
        "Node" => node_cells(obj, now),
        "Deployment" => deployment_cells(obj, now),
        "ReplicaSet" => replica_set_cells(obj, now),
        "DaemonSet" => daemon_set_cells(obj, now),
        "StatefulSet" => stateful_set_cells(obj, now),
        "Namespace" => vec![name(obj), json!(text(obj, "/status/phase")), age(obj, now)],
        "ConfigMap" => {
            let keys = key_count(obj, "/data") + key_count(obj, "/binaryData");
            vec![name(obj), json!(keys), age(obj, now)]
        }
        "Secret" => secret_cells(obj, now),
        "ServiceAccount" => {
            let secrets = list(obj, "/secrets").len();
            vec![name(obj), json!(secrets), age(obj, now)]
        }
        "Event" => event_cells(obj, now),
        "Lease" => vec![
            name(obj),
            json!(text(obj, "/spec/holderIdentity")),
            age(obj, now),
        ],
        _ => vec![name(obj), json!(created_at(obj))],
    }
}

/// Exactly k8s.io/apimachinery/pkg/util/duration.HumanDuration: about two
/// significant units, e.g. "10s", "5m2s", "3h", "2d5h", "45d", "3y90d".
pub fn human_duration(d: Duration) -> String {
    // Up to a second of clock skew in the future still counts as "now".
    let seconds = d.num_seconds();
    if seconds < -1 {
        return "<invalid>".to_string();
    }
    if seconds < 0 {
        return "0s".to_string();
    }
    if seconds < 60 * 2 {
        return format!("{seconds}s");
    }
    let minutes = d.num_minutes();
    if minutes < 10 {
        return with_remainder(minutes, "m", seconds % 60, "s");
    }
    if minutes < 60 * 3 {
        return format!("{minutes}m");
    }
    let hours = d.num_hours();
    if hours < 8 {
        return with_remainder(hours, "h", minutes % 60, "m");
    }
    if hours < 48 {
        return format!("{hours}h");
    }
    let days = hours / 24;
    if hours < 24 * 8 {
        return with_remainder(days, "d", hours % 24, "h");
    }
    if hours < 24 * 365 * 2 {
        return format!("{days}d");
    }
    if hours < 24 * 365 * 8 {
        return with_remainder(days / 365, "y", days % 365, "d");
    }
    format!("{}y", days / 365)
}

/// "5m2s", or just "5m" when the smaller unit is zero.
fn with_remainder(major: i64, major_unit: &str, minor: i64, minor_unit: &str) -> String {
    if minor == 0 {
        format!("{major}{major_unit}")
    } else {
        format!("{major}{major_unit}{minor}{minor_unit}")
    }
}

// ---------------------------------------------------------------------------
// Pods
// ---------------------------------------------------------------------------

fn pod_cells(pod: &Value, now: DateTime<Utc>) -> Vec<Value> {
    let summary = PodSummary::of(pod);
    vec![
        name(pod),
        json!(format!("{}/{}", summary.ready, summary.total)),
        json!(summary.reason),
        json!(summary.restarts.describe(now)),
        age(pod, now),
        json!(or_none(&pod_ip(pod))),
        json!(or_none(text(pod, "/spec/nodeName"))),
        json!(or_none(text(pod, "/status/nominatedNodeName"))),
        json!(readiness_gates(pod)),
    ]
}

/// Restart count plus when the most recent restart happened.
#[derive(Debug, Clone, Copy, Default)]
struct Restarts {
    count: i64,
    last: Option<DateTime<Utc>>,
}

impl Restarts {
    fn add(&mut self, container_status: &Value) {
        self.count += integer(container_status, "/restartCount");
        let finished = timestamp(container_status, "/lastState/terminated/finishedAt");
        self.last = self.last.max(finished);
    }

    /// "3", or "3 (5m ago)" once a restart time is known, as kubectl 1.2x shows.
    fn describe(&self, now: DateTime<Utc>) -> String {
        match self.last {
            Some(last) if self.count != 0 => {
                format!("{} ({} ago)", self.count, human_duration(now - last))
            }
            _ => self.count.to_string(),
        }
    }
}

/// The READY, STATUS and RESTARTS columns, derived the way kube's printPod does.
struct PodSummary {
    reason: String,
    ready: usize,
    total: usize,
    restarts: Restarts,
    /// Restarts of restartable ("sidecar") init containers only.
    sidecar_restarts: Restarts,
}

impl PodSummary {
    fn of(pod: &Value) -> PodSummary {
        let mut summary = PodSummary {
            reason: initial_pod_reason(pod),
            ready: 0,
            total: list(pod, "/spec/containers").len() + sidecar_names(pod).len(),
            restarts: Restarts::default(),
            sidecar_restarts: Restarts::default(),
        };
        let initializing = summary.scan_init_containers(pod);
        if !initializing || has_true_condition(pod, "Initialized") {
            // Once initialized, only sidecar restarts still count from init containers.
            summary.restarts = summary.sidecar_restarts;
            summary.scan_app_containers(pod);
        }
        summary.apply_deletion(pod);
        summary
    }

    /// Walks init containers until the first one that has not finished; returns
    /// whether the pod is still initializing.
    fn scan_init_containers(&mut self, pod: &Value) -> bool {
        let sidecars = sidecar_names(pod);
        let init_count = list(pod, "/spec/initContainers").len();
        for (index, status) in list(pod, "/status/initContainerStatuses")
            .iter()
            .enumerate()
        {
            let is_sidecar = sidecars.contains(text(status, "/name"));
            self.restarts.add(status);
            if is_sidecar {
                self.sidecar_restarts.add(status);
            }
            if present(status, "/state/terminated")
                && integer(status, "/state/terminated/exitCode") == 0
            {
                continue;
            }
            if is_sidecar && flag(status, "/started") {
                self.ready += usize::from(flag(status, "/ready"));
                continue;
            }
            self.reason = init_container_reason(status, index, init_count);
            return true;
        }
        false
    }

    /// Regular containers, last to first so the first container's state wins.
    fn scan_app_containers(&mut self, pod: &Value) {
        let mut has_running = false;
        for status in list(pod, "/status/containerStatuses").iter().rev() {
            self.restarts.add(status);
            let waiting = text(status, "/state/waiting/reason");
            let terminated = text(status, "/state/terminated/reason");
            if !waiting.is_empty() {
                self.reason = waiting.to_string();
            } else if !terminated.is_empty() {
                self.reason = terminated.to_string();
            } else if present(status, "/state/terminated") {
                self.reason = exit_description("", &status["state"]["terminated"]);
            } else if flag(status, "/ready") && present(status, "/state/running") {
                has_running = true;
                self.ready += 1;
            }
        }
        // A pod whose first container completed but others still run is not "Completed".
        if self.reason == "Completed" && has_running {
            self.reason = if has_true_condition(pod, "Ready") {
                "Running"
            } else {
                "NotReady"
            }
            .to_string();
        }
    }

    fn apply_deletion(&mut self, pod: &Value) {
        if !present(pod, "/metadata/deletionTimestamp") {
            return;
        }
        let phase = text(pod, "/status/phase");
        if text(pod, "/status/reason") == "NodeLost" {
            self.reason = "Unknown".to_string();
        } else if phase != "Succeeded" && phase != "Failed" {
            self.reason = "Terminating".to_string();
        }
    }
}

/// The phase, overridden by status.reason, or "SchedulingGated".
fn initial_pod_reason(pod: &Value) -> String {
    let gated = list(pod, "/status/conditions")
        .iter()
        .any(|c| text(c, "/type") == "PodScheduled" && text(c, "/reason") == "SchedulingGated");
    if gated {
        return "SchedulingGated".to_string();
    }
    let reason = text(pod, "/status/reason");
    if reason.is_empty() {
        text(pod, "/status/phase").to_string()
    } else {
        reason.to_string()
    }
}

/// Init containers with restartPolicy Always run alongside the app containers.
fn sidecar_names(pod: &Value) -> BTreeSet<&str> {
    list(pod, "/spec/initContainers")
        .iter()
        .filter(|c| text(c, "/restartPolicy") == "Always")
        .map(|c| text(c, "/name"))
        .collect()
}

/// STATUS for a pod blocked on init container `index`: "Init:Error", "Init:1/3", ...
fn init_container_reason(status: &Value, index: usize, init_count: usize) -> String {
    let waiting = text(status, "/state/waiting/reason");
    if present(status, "/state/terminated") {
        let terminated = &status["state"]["terminated"];
        match text(terminated, "/reason") {
            "" => exit_description("Init:", terminated),
            reason => format!("Init:{reason}"),
        }
    } else if !waiting.is_empty() && waiting != "PodInitializing" {
        format!("Init:{waiting}")
    } else {
        format!("Init:{index}/{init_count}")
    }
}

/// "Signal:9" or "ExitCode:2" for a terminated container without a reason.
fn exit_description(prefix: &str, terminated: &Value) -> String {
    let signal = integer(terminated, "/signal");
    if signal != 0 {
        format!("{prefix}Signal:{signal}")
    } else {
        format!("{prefix}ExitCode:{}", integer(terminated, "/exitCode"))
    }
}

fn has_true_condition(obj: &Value, condition_type: &str) -> bool {
    list(obj, "/status/conditions")
        .iter()
        .any(|c| text(c, "/type") == condition_type && text(c, "/status") == "True")
}

/// kube shows status.podIPs[0]; fall back to the legacy status.podIP.
fn pod_ip(pod: &Value) -> String {
    let first = text(pod, "/status/podIPs/0/ip");
    if first.is_empty() {
        text(pod, "/status/podIP").to_string()
    } else {
        first.to_string()
    }
}

/// "<none>", or "true conditions/gates" for the pod's readiness gates.
fn readiness_gates(pod: &Value) -> String {
    let gates = list(pod, "/spec/readinessGates");
    if gates.is_empty() {
        return "<none>".to_string();
    }
    let conditions = list(pod, "/status/conditions");
    let satisfied = gates
        .iter()
        .filter(|gate| {
            let wanted = text(gate, "/conditionType");
            conditions
                .iter()
                .find(|c| text(c, "/type") == wanted)
                .is_some_and(|c| text(c, "/status") == "True")
        })
        .count();
    format!("{satisfied}/{}", gates.len())
}

// ---------------------------------------------------------------------------
// Services and endpoints
// ---------------------------------------------------------------------------

fn service_cells(service: &Value, now: DateTime<Utc>) -> Vec<Value> {
    let ports = service_ports(service);
    vec![
        name(service),
        json!(service_type(service)),
        json!(cluster_ip(service)),
        json!(external_ip(service)),
        json!(or_none(&ports)),
        age(service, now),
        json!(format_labels(service.pointer("/spec/selector"))),
    ]
}

/// The API server defaults spec.type to ClusterIP.
fn service_type(service: &Value) -> &str {
    match text(service, "/spec/type") {
        "" => "ClusterIP",
        other => other,
    }
}

fn cluster_ip(service: &Value) -> String {
    [
        text(service, "/spec/clusterIPs/0"),
        text(service, "/spec/clusterIP"),
    ]
    .into_iter()
    .find(|ip| !ip.is_empty())
    .unwrap_or("<none>")
    .to_string()
}

fn external_ip(service: &Value) -> String {
    let external_ips = strings(service, "/spec/externalIPs");
    match service_type(service) {
        "ClusterIP" | "NodePort" => or_none(&external_ips.join(",")),
        "LoadBalancer" => {
            let mut addresses = load_balancer_addresses(service);
            addresses.extend(external_ips);
            if addresses.is_empty() {
                "<pending>".to_string()
            } else {
                addresses.join(",")
            }
        }
        "ExternalName" => text(service, "/spec/externalName").to_string(),
        _ => "<unknown>".to_string(),
    }
}

/// Ingress IPs (or hostnames when there is no IP), sorted and de-duplicated.
fn load_balancer_addresses(service: &Value) -> Vec<&str> {
    let unique: BTreeSet<&str> = list(service, "/status/loadBalancer/ingress")
        .iter()
        .map(|ingress| match text(ingress, "/ip") {
            "" => text(ingress, "/hostname"),
            ip => ip,
        })
        .filter(|address| !address.is_empty())
        .collect();
    unique.into_iter().collect()
}

/// "80/TCP,443:30443/TCP" (port:nodePort/protocol).
fn service_ports(service: &Value) -> String {
    let ports: Vec<String> = list(service, "/spec/ports")
        .iter()
        .map(|port| {
            let number = integer(port, "/port");
            let protocol = match text(port, "/protocol") {
                "" => "TCP",
                protocol => protocol,
            };
            match integer(port, "/nodePort") {
                node_port if node_port > 0 => format!("{number}:{node_port}/{protocol}"),
                _ => format!("{number}/{protocol}"),
            }
        })
        .collect();
    ports.join(",")
}

/// kube lists at most three endpoints before summarising the rest.
const MAX_LISTED: usize = 3;

/// Collects the first few entries and counts them all for the "+ N more..." suffix.
#[derive(Default)]
struct ShortList {
    shown: Vec<String>,
    total: usize,
}

impl ShortList {
    fn push(&mut self, item: impl FnOnce() -> String) {
        if self.shown.len() < MAX_LISTED {
            self.shown.push(item());
        }
        self.total += 1;
    }

    fn render(&self, when_empty: &str) -> String {
        let joined = self.shown.join(",");
        if self.total > MAX_LISTED {
            format!("{joined} + {} more...", self.total - MAX_LISTED)
        } else if joined.is_empty() {
            when_empty.to_string()
        } else {
            joined
        }
    }
}

/// "10.0.0.1:80,10.0.0.2:80 + 3 more..." over every subset address × port.
fn endpoints_summary(endpoints: &Value) -> String {
    let subsets = list(endpoints, "/subsets");
    if subsets.is_empty() {
        return "<none>".to_string();
    }
    let mut endpoints_list = ShortList::default();
    for subset in subsets {
        let addresses = list(subset, "/addresses");
        let ports = list(subset, "/ports");
        if ports.is_empty() {
            // Headless services may have addresses without ports.
            for address in addresses {
                endpoints_list.push(|| text(address, "/ip").to_string());
            }
        }
        for port in ports {
            for address in addresses {
                endpoints_list.push(|| host_port(text(address, "/ip"), integer(port, "/port")));
            }
        }
    }
    endpoints_list.render("")
}

/// Like Go's net.JoinHostPort: IPv6 addresses get brackets.
fn host_port(host: &str, port: i64) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

fn endpoint_slice_cells(slice: &Value, now: DateTime<Utc>) -> Vec<Value> {
    let mut ports = ShortList::default();
    for port in list(slice, "/ports") {
        ports.push(|| endpoint_slice_port(port));
    }
    let mut addresses = ShortList::default();
    for endpoint in list(slice, "/endpoints") {
        for address in list(endpoint, "/addresses") {
            addresses.push(|| address.as_str().unwrap_or_default().to_string());
        }
    }
    vec![
        name(slice),
        json!(text(slice, "/addressType")),
        json!(ports.render("<unset>")),
        json!(addresses.render("<unset>")),
        age(slice, now),
    ]
}

/// The port number, else its name, else "*" (all ports).
fn endpoint_slice_port(port: &Value) -> String {
    if let Some(number) = port.get("port").and_then(Value::as_i64) {
        number.to_string()
    } else if let Some(port_name) = port.get("name").and_then(Value::as_str) {
        port_name.to_string()
    } else {
        "*".to_string()
    }
}

// ---------------------------------------------------------------------------
// Nodes
// ---------------------------------------------------------------------------

const NODE_ROLE_PREFIX: &str = "node-role.kubernetes.io/";
const LEGACY_NODE_ROLE_LABEL: &str = "kubernetes.io/role";

fn node_cells(node: &Value, now: DateTime<Utc>) -> Vec<Value> {
    let roles = node_roles(node).join(",");
    vec![
        name(node),
        json!(node_status(node)),
        json!(or_none(&roles)),
        age(node, now),
        json!(text(node, "/status/nodeInfo/kubeletVersion")),
        json!(node_address(node, "InternalIP")),
        json!(node_address(node, "ExternalIP")),
        json!(or_unknown(text(node, "/status/nodeInfo/osImage"))),
        json!(or_unknown(text(node, "/status/nodeInfo/kernelVersion"))),
        json!(or_unknown(text(
            node,
            "/status/nodeInfo/containerRuntimeVersion"
        ))),
    ]
}

/// "Ready", "NotReady" or "Unknown", plus ",SchedulingDisabled" when cordoned.
fn node_status(node: &Value) -> String {
    let ready = list(node, "/status/conditions")
        .iter()
        .rev() // the last Ready condition wins, as kube builds a map by type
        .find(|c| text(c, "/type") == "Ready");
    let mut status = match ready {
        Some(c) if text(c, "/status") == "True" => "Ready".to_string(),
        Some(_) => "NotReady".to_string(),
        None => "Unknown".to_string(),
    };
    if flag(node, "/spec/unschedulable") {
        status.push_str(",SchedulingDisabled");
    }
    status
}

/// Roles from `node-role.kubernetes.io/<role>` keys and the legacy `kubernetes.io/role=<role>`.
fn node_roles(node: &Value) -> Vec<&str> {
    let Some(labels) = node.pointer("/metadata/labels").and_then(Value::as_object) else {
        return Vec::new();
    };
    let roles: BTreeSet<&str> = labels
        .iter()
        .filter_map(|(key, value)| match key.strip_prefix(NODE_ROLE_PREFIX) {
            Some(role) => Some(role),
            None if key == LEGACY_NODE_ROLE_LABEL => value.as_str(),
            None => None,
        })
        .filter(|role| !role.is_empty())
        .collect();
    roles.into_iter().collect()
}

fn node_address(node: &Value, address_type: &str) -> String {
    list(node, "/status/addresses")
        .iter()
        .find(|a| text(a, "/type") == address_type)
        .map(|a| text(a, "/address").to_string())
        .unwrap_or_else(|| "<none>".to_string())
}

// ---------------------------------------------------------------------------
// Workloads
// ---------------------------------------------------------------------------

fn deployment_cells(deployment: &Value, now: DateTime<Utc>) -> Vec<Value> {
    let (containers, images) = template_containers(deployment);
    // A Deployment prints its selector verbatim: "" rather than "<none>".
    let selector = LabelSelector::from_label_selector_object(selector_object(deployment))
        .map(|s| s.to_string())
        .unwrap_or_else(|_| "<invalid>".to_string());
    vec![
        name(deployment),
        json!(ready_of_desired(deployment)),
        json!(integer(deployment, "/status/updatedReplicas")),
        json!(integer(deployment, "/status/availableReplicas")),
        age(deployment, now),
        json!(containers),
        json!(images),
        json!(selector),
    ]
}

fn replica_set_cells(replica_set: &Value, now: DateTime<Utc>) -> Vec<Value> {
    let (containers, images) = template_containers(replica_set);
    vec![
        name(replica_set),
        json!(desired_replicas(replica_set)),
        json!(integer(replica_set, "/status/replicas")),
        json!(integer(replica_set, "/status/readyReplicas")),
        age(replica_set, now),
        json!(containers),
        json!(images),
        json!(format_label_selector(replica_set)),
    ]
}

fn daemon_set_cells(daemon_set: &Value, now: DateTime<Utc>) -> Vec<Value> {
    let (containers, images) = template_containers(daemon_set);
    let count = |field: &str| json!(integer(daemon_set, &format!("/status/{field}")));
    vec![
        name(daemon_set),
        count("desiredNumberScheduled"),
        count("currentNumberScheduled"),
        count("numberReady"),
        count("updatedNumberScheduled"),
        count("numberAvailable"),
        json!(format_labels(
            daemon_set.pointer("/spec/template/spec/nodeSelector")
        )),
        age(daemon_set, now),
        json!(containers),
        json!(images),
        json!(format_label_selector(daemon_set)),
    ]
}

fn stateful_set_cells(stateful_set: &Value, now: DateTime<Utc>) -> Vec<Value> {
    let (containers, images) = template_containers(stateful_set);
    vec![
        name(stateful_set),
        json!(ready_of_desired(stateful_set)),
        age(stateful_set, now),
        json!(containers),
        json!(images),
    ]
}

/// spec.replicas, which the API server defaults to 1 for apps/v1 workloads.
fn desired_replicas(workload: &Value) -> i64 {
    workload
        .pointer("/spec/replicas")
        .and_then(Value::as_i64)
        .unwrap_or(1)
}

/// "readyReplicas/replicas", e.g. "2/3".
fn ready_of_desired(workload: &Value) -> String {
    let ready = integer(workload, "/status/readyReplicas");
    format!("{ready}/{}", desired_replicas(workload))
}

/// Comma-joined container names and images of the pod template.
fn template_containers(workload: &Value) -> (String, String) {
    let containers = list(workload, "/spec/template/spec/containers");
    let names: Vec<&str> = containers.iter().map(|c| text(c, "/name")).collect();
    let images: Vec<&str> = containers.iter().map(|c| text(c, "/image")).collect();
    (names.join(","), images.join(","))
}

fn selector_object(workload: &Value) -> &Value {
    workload.pointer("/spec/selector").unwrap_or(&Value::Null)
}

/// metav1.FormatLabelSelector: "<none>" when empty, "<error>" when invalid.
fn format_label_selector(workload: &Value) -> String {
    match LabelSelector::from_label_selector_object(selector_object(workload)) {
        Ok(selector) => or_none(&selector.to_string()),
        Err(_) => "<error>".to_string(),
    }
}

/// labels.FormatLabels: "k1=v1,k2=v2" sorted by key, or "<none>".
fn format_labels(map: Option<&Value>) -> String {
    let sorted: BTreeMap<&str, &str> = map
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.as_str(), v.as_str().unwrap_or_default()))
                .collect()
        })
        .unwrap_or_default();
    let pairs: Vec<String> = sorted.iter().map(|(k, v)| format!("{k}={v}")).collect();
    or_none(&pairs.join(","))
}

// ---------------------------------------------------------------------------
// Secrets and events
// ---------------------------------------------------------------------------

fn secret_cells(secret: &Value, now: DateTime<Utc>) -> Vec<Value> {
    // stringData is merged into data on write, so count the union of keys.
    let keys: BTreeSet<&String> = ["/data", "/stringData"]
        .iter()
        .filter_map(|pointer| secret.pointer(pointer).and_then(Value::as_object))
        .flat_map(|map| map.keys())
        .collect();
    vec![
        name(secret),
        json!(text(secret, "/type")),
        json!(keys.len()),
        age(secret, now),
    ]
}

fn event_cells(event: &Value, now: DateTime<Utc>) -> Vec<Value> {
    let first = timestamp(event, "/firstTimestamp").or_else(|| timestamp(event, "/eventTime"));
    let first_seen = since(first, now);
    let (last_seen, count) = if present(event, "/series") {
        let last = timestamp(event, "/series/lastObservedTime");
        (since(last, now), integer(event, "/series/count"))
    } else {
        let last_seen = match timestamp(event, "/lastTimestamp") {
            Some(last) => since(Some(last), now),
            None => first_seen.clone(),
        };
        // Singleton events from the events.k8s.io API have no count.
        let count = match integer(event, "/count") {
            0 => 1,
            count => count,
        };
        (last_seen, count)
    };
    vec![
        json!(last_seen),
        json!(text(event, "/type")),
        json!(text(event, "/reason")),
        json!(involved_object(event)),
        json!(text(event, "/involvedObject/fieldPath")),
        json!(event_source(event)),
        json!(text(event, "/message").trim()),
        json!(first_seen),
        json!(count),
        name(event),
    ]
}

/// "pod/web-1", or just "node" when the involved object has no name.
fn involved_object(event: &Value) -> String {
    let kind = text(event, "/involvedObject/kind").to_lowercase();
    match text(event, "/involvedObject/name") {
        "" => kind,
        object_name => format!("{kind}/{object_name}"),
    }
}

/// "component, host", falling back to the events.k8s.io reporting fields.
fn event_source(event: &Value) -> String {
    let first_non_empty = |a: &'static str, b: &'static str| match text(event, a) {
        "" => text(event, b),
        value => value,
    };
    let component = first_non_empty("/source/component", "/reportingComponent");
    match first_non_empty("/source/host", "/reportingInstance") {
        "" => component.to_string(),
        instance => format!("{component}, {instance}"),
    }
}

// ---------------------------------------------------------------------------
// JSON and time helpers
// ---------------------------------------------------------------------------

fn text<'a>(obj: &'a Value, pointer: &str) -> &'a str {
    obj.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_default()
}

fn integer(obj: &Value, pointer: &str) -> i64 {
    obj.pointer(pointer).and_then(Value::as_i64).unwrap_or(0)
}

fn flag(obj: &Value, pointer: &str) -> bool {
    obj.pointer(pointer)
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

/// Present and not null (an empty `running: {}` state still counts).
fn present(obj: &Value, pointer: &str) -> bool {
    obj.pointer(pointer).is_some_and(|v| !v.is_null())
}

fn list<'a>(obj: &'a Value, pointer: &str) -> &'a [Value] {
    obj.pointer(pointer)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
}

fn strings<'a>(obj: &'a Value, pointer: &str) -> Vec<&'a str> {
    list(obj, pointer)
        .iter()
        .filter_map(Value::as_str)
        .collect()
}

fn key_count(obj: &Value, pointer: &str) -> usize {
    obj.pointer(pointer)
        .and_then(Value::as_object)
        .map_or(0, |map| map.len())
}

fn or_none(value: &str) -> String {
    if value.is_empty() {
        "<none>".to_string()
    } else {
        value.to_string()
    }
}

fn or_unknown(value: &str) -> &str {
    if value.is_empty() {
        "<unknown>"
    } else {
        value
    }
}

fn name(obj: &Value) -> Value {
    json!(text(obj, "/metadata/name"))
}

fn timestamp(obj: &Value, pointer: &str) -> Option<DateTime<Utc>> {
    let raw = text(obj, pointer);
    DateTime::parse_from_rfc3339(raw)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// HumanDuration since `time`, or "<unknown>" when it is not set.
fn since(time: Option<DateTime<Utc>>, now: DateTime<Utc>) -> String {
    time.map_or_else(|| "<unknown>".to_string(), |t| human_duration(now - t))
}

fn age(obj: &Value, now: DateTime<Utc>) -> Value {
    json!(since(timestamp(obj, "/metadata/creationTimestamp"), now))
}

/// The default table convertor prints creationTimestamp as RFC 3339 in UTC;
/// an unset time prints as Go's zero time.
fn created_at(obj: &Value) -> String {
    timestamp(obj, "/metadata/creationTimestamp").map_or_else(
        || "0001-01-01T00:00:00Z".to_string(),
        |t| t.to_rfc3339_opts(SecondsFormat::Secs, true),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2024-05-01T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    /// An RFC 3339 timestamp `seconds` before `now()`.
    fn ago(seconds: i64) -> String {
        (now() - Duration::seconds(seconds)).to_rfc3339_opts(SecondsFormat::Secs, true)
    }

    fn row(kind: &str, obj: Value) -> Vec<Value> {
        cells(kind, &obj, now())
    }

    fn human(seconds: i64) -> String {
        human_duration(Duration::seconds(seconds))
    }

    #[test]
    fn human_duration_thresholds() {
        const MIN: i64 = 60;
        const HOUR: i64 = 60 * MIN;
        const DAY: i64 = 24 * HOUR;
        const YEAR: i64 = 365 * DAY;
        let cases = [
            (-2, "<invalid>"),
            (-1, "0s"),
            (0, "0s"),
            (10, "10s"),
            (119, "119s"),
            (2 * MIN, "2m"),
            (5 * MIN + 2, "5m2s"),
            (9 * MIN + 59, "9m59s"),
            (10 * MIN + 30, "10m"),
            (179 * MIN, "179m"),
            (3 * HOUR, "3h"),
            (3 * HOUR + 20 * MIN, "3h20m"),
            (7 * HOUR + 59 * MIN, "7h59m"),
            (8 * HOUR + 30 * MIN, "8h"),
            (47 * HOUR, "47h"),
            (2 * DAY, "2d"),
            (2 * DAY + 5 * HOUR, "2d5h"),
            (7 * DAY + 23 * HOUR, "7d23h"),
            (8 * DAY + 5 * HOUR, "8d"),
            (45 * DAY, "45d"),
            (2 * YEAR - DAY, "729d"),
            (2 * YEAR, "2y"),
            (3 * YEAR + 90 * DAY, "3y90d"),
            (8 * YEAR + 90 * DAY, "8y"),
        ];
        for (seconds, expected) in cases {
            assert_eq!(human(seconds), expected, "{seconds}s");
        }
        assert_eq!(human_duration(Duration::milliseconds(-1500)), "0s");
    }

    #[test]
    fn every_kind_has_one_cell_per_column() {
        for kind in [
            "Pod",
            "Service",
            "Endpoints",
            "EndpointSlice",
            "Node",
            "Deployment",
            "ReplicaSet",
            "DaemonSet",
            "StatefulSet",
            "Namespace",
            "ConfigMap",
            "Secret",
            "ServiceAccount",
            "Event",
            "Lease",
            "Widget",
        ] {
            assert_eq!(row(kind, json!({})).len(), columns(kind).len(), "{kind}");
        }
    }

    #[test]
    fn column_definitions_match_kube() {
        let names: Vec<&str> = columns("Pod").iter().map(|c| c.name).collect();
        assert_eq!(
            names,
            [
                "Name",
                "Ready",
                "Status",
                "Restarts",
                "Age",
                "IP",
                "Node",
                "Nominated Node",
                "Readiness Gates"
            ]
        );
        let priorities: Vec<i32> = columns("Pod").iter().map(|c| c.priority).collect();
        assert_eq!(priorities, [0, 0, 0, 0, 0, 1, 1, 1, 1]);
        let event: Vec<&str> = columns("Event")
            .iter()
            .filter(|c| c.priority == 0)
            .map(|c| c.name)
            .collect();
        assert_eq!(event, ["Last Seen", "Type", "Reason", "Object", "Message"]);

        let definitions = column_definitions_json("Lease");
        assert_eq!(definitions[0]["name"], "Name");
        assert_eq!(definitions[0]["type"], "string");
        assert_eq!(definitions[0]["format"], "name");
        assert_eq!(definitions[0]["priority"], 0);
        assert_eq!(definitions[1]["name"], "Holder");
        assert_eq!(definitions[1]["format"], "");
        assert!(definitions[2]["description"]
            .as_str()
            .unwrap()
            .starts_with("CreationTimestamp"));
    }

    #[test]
    fn unknown_kinds_use_the_default_convertor() {
        let names: Vec<&str> = columns("Widget").iter().map(|c| c.name).collect();
        assert_eq!(names, ["Name", "Created At"]);
        assert_eq!(columns("Widget")[1].kind, "date");
        let widget = json!({"metadata": {"name": "w", "creationTimestamp": "2024-01-02T03:04:05.000+02:00"}});
        assert_eq!(
            row("Widget", widget),
            [json!("w"), json!("2024-01-02T01:04:05Z")]
        );
        assert_eq!(row("Widget", json!({}))[1], "0001-01-01T00:00:00Z");
    }

    fn service(spec: Value, status: Value) -> Value {
        json!({"metadata": {"name": "svc", "creationTimestamp": ago(3 * 3600)},
               "spec": spec, "status": status})
    }

    #[test]
    fn cluster_ip_service_row() {
        let svc = service(
            json!({"type": "ClusterIP", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                   "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}],
                   "selector": {"k8s-app": "kube-dns", "app": "dns"}}),
            json!({}),
        );
        assert_eq!(
            row("Service", svc),
            [
                json!("svc"),
                json!("ClusterIP"),
                json!("10.96.0.10"),
                json!("<none>"),
                json!("53/UDP,53/TCP"),
                json!("3h"),
                json!("app=dns,k8s-app=kube-dns")
            ]
        );
    }

    #[test]
    fn node_port_service_row() {
        let svc = service(
            json!({"type": "NodePort", "clusterIPs": ["10.96.1.1"], "externalIPs": ["1.2.3.4", "5.6.7.8"],
                   "ports": [{"port": 80, "nodePort": 30080}, {"port": 443, "protocol": "TCP"}]}),
            json!({}),
        );
        let cells = row("Service", svc);
        assert_eq!(cells[1], "NodePort");
        assert_eq!(cells[3], "1.2.3.4,5.6.7.8");
        assert_eq!(cells[4], "80:30080/TCP,443/TCP");
        assert_eq!(cells[6], "<none>");
    }

    #[test]
    fn load_balancer_service_row() {
        let spec = json!({"type": "LoadBalancer", "clusterIPs": ["10.96.2.2"],
                          "ports": [{"port": 80, "nodePort": 31000, "protocol": "TCP"}]});
        let pending = row("Service", service(spec.clone(), json!({})));
        assert_eq!(pending[3], "<pending>");
        assert_eq!(pending[4], "80:31000/TCP");

        let ingress = json!({"loadBalancer": {"ingress": [
            {"ip": "203.0.113.9"}, {"hostname": "lb.example.com"}, {"ip": "203.0.113.1"}]}});
        let ready = row("Service", service(spec.clone(), ingress.clone()));
        assert_eq!(ready[3], "203.0.113.1,203.0.113.9,lb.example.com");

        let mut with_external = spec;
        with_external["externalIPs"] = json!(["198.51.100.7"]);
        let both = row("Service", service(with_external, ingress));
        assert_eq!(
            both[3],
            "203.0.113.1,203.0.113.9,lb.example.com,198.51.100.7"
        );
    }

    #[test]
    fn headless_and_external_name_service_rows() {
        let headless = row(
            "Service",
            service(
                json!({"clusterIP": "None", "clusterIPs": ["None"], "selector": {"app": "db"}}),
                json!({}),
            ),
        );
        assert_eq!(headless[1], "ClusterIP");
        assert_eq!(headless[2], "None");
        assert_eq!(headless[3], "<none>");
        assert_eq!(headless[4], "<none>");

        let external = row(
            "Service",
            service(
                json!({"type": "ExternalName", "externalName": "db.example.com"}),
                json!({}),
            ),
        );
        assert_eq!(external[2], "<none>");
        assert_eq!(external[3], "db.example.com");
    }

    fn pod(status: Value) -> Value {
        json!({
            "metadata": {"name": "web", "creationTimestamp": ago(2 * 86400 + 5 * 3600)},
            "spec": {"containers": [{"name": "app"}, {"name": "log"}], "nodeName": "n1"},
            "status": status,
        })
    }

    fn running(ready: bool) -> Value {
        json!({"name": "app", "ready": ready, "restartCount": 0,
               "state": {"running": {"startedAt": ago(600)}}})
    }

    #[test]
    fn running_pod_row() {
        let cells = row(
            "Pod",
            pod(
                json!({"phase": "Running", "podIP": "10.0.0.5", "podIPs": [{"ip": "10.0.0.5"}],
                       "containerStatuses": [running(true), running(false)]}),
            ),
        );
        assert_eq!(
            cells,
            [
                json!("web"),
                json!("1/2"),
                json!("Running"),
                json!("0"),
                json!("2d5h"),
                json!("10.0.0.5"),
                json!("n1"),
                json!("<none>"),
                json!("<none>")
            ]
        );
    }

    #[test]
    fn pod_status_from_container_states() {
        let waiting = json!({"name": "app", "restartCount": 4,
            "state": {"waiting": {"reason": "CrashLoopBackOff"}},
            "lastState": {"terminated": {"exitCode": 1, "finishedAt": ago(300)}}});
        let cells = row(
            "Pod",
            pod(json!({"phase": "Running", "containerStatuses": [waiting, running(true)]})),
        );
        assert_eq!(cells[1], "1/2");
        assert_eq!(cells[2], "CrashLoopBackOff");
        assert_eq!(cells[3], "4 (5m ago)");

        let oom = json!({"name": "app", "state": {"terminated": {"reason": "OOMKilled", "exitCode": 137}}});
        assert_eq!(
            row(
                "Pod",
                pod(json!({"phase": "Running", "containerStatuses": [oom]}))
            )[2],
            "OOMKilled"
        );

        let signal = json!({"name": "app", "state": {"terminated": {"exitCode": 0, "signal": 9}}});
        assert_eq!(
            row("Pod", pod(json!({"containerStatuses": [signal]})))[2],
            "Signal:9"
        );
        let exit = json!({"name": "app", "state": {"terminated": {"exitCode": 3}}});
        assert_eq!(
            row("Pod", pod(json!({"containerStatuses": [exit]})))[2],
            "ExitCode:3"
        );
    }

    #[test]
    fn completed_pod_rows() {
        let done =
            json!({"name": "app", "state": {"terminated": {"reason": "Completed", "exitCode": 0}}});
        let finished = row(
            "Pod",
            pod(json!({"phase": "Succeeded", "containerStatuses": [done.clone(), done.clone()]})),
        );
        assert_eq!(finished[1], "0/2");
        assert_eq!(finished[2], "Completed");

        // First container finished, second still running: Running or NotReady, not Completed.
        let ready_condition = json!([{"type": "Ready", "status": "True"}]);
        let partly = row(
            "Pod",
            pod(json!({"phase": "Running", "conditions": ready_condition,
                                         "containerStatuses": [done.clone(), running(true)]})),
        );
        assert_eq!(partly[2], "Running");
        let not_ready = row(
            "Pod",
            pod(json!({"phase": "Running", "containerStatuses": [done, running(true)]})),
        );
        assert_eq!(not_ready[2], "NotReady");
    }

    #[test]
    fn pending_and_reason_pod_rows() {
        assert_eq!(row("Pod", pod(json!({"phase": "Pending"})))[2], "Pending");
        assert_eq!(
            row("Pod", pod(json!({"phase": "Failed", "reason": "Evicted"})))[2],
            "Evicted"
        );
        let gated = json!({"phase": "Pending", "conditions": [
            {"type": "PodScheduled", "status": "False", "reason": "SchedulingGated"}]});
        assert_eq!(row("Pod", pod(gated))[2], "SchedulingGated");
        let image = json!({"name": "app", "state": {"waiting": {"reason": "ImagePullBackOff"}}});
        assert_eq!(
            row(
                "Pod",
                pod(json!({"phase": "Pending", "containerStatuses": [image]}))
            )[2],
            "ImagePullBackOff"
        );
    }

    #[test]
    fn terminating_pod_rows() {
        let mut deleting =
            pod(json!({"phase": "Running", "containerStatuses": [running(true), running(true)]}));
        deleting["metadata"]["deletionTimestamp"] = json!(ago(0));
        assert_eq!(row("Pod", deleting.clone())[2], "Terminating");

        deleting["status"]["reason"] = json!("NodeLost");
        assert_eq!(row("Pod", deleting.clone())[2], "Unknown");

        let mut succeeded = pod(json!({"phase": "Succeeded"}));
        succeeded["metadata"]["deletionTimestamp"] = json!(ago(0));
        assert_eq!(row("Pod", succeeded)[2], "Succeeded");
    }

    fn pod_with_init(init_statuses: Value, sidecar: bool) -> Value {
        let mut pod = pod(json!({"phase": "Pending", "initContainerStatuses": init_statuses}));
        let policy = if sidecar {
            json!("Always")
        } else {
            Value::Null
        };
        pod["spec"]["initContainers"] = json!([
            {"name": "setup"}, {"name": "proxy", "restartPolicy": policy}
        ]);
        pod
    }

    #[test]
    fn init_container_pod_rows() {
        let done = json!({"name": "setup", "restartCount": 1,
                          "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}});
        let waiting = json!({"name": "proxy", "state": {"waiting": {"reason": "PodInitializing"}}});
        let progress = row("Pod", pod_with_init(json!([done.clone(), waiting]), false));
        assert_eq!(progress[2], "Init:1/2");
        assert_eq!(progress[3], "1");

        let failed =
            json!({"name": "setup", "state": {"terminated": {"exitCode": 1, "reason": "Error"}}});
        assert_eq!(
            row("Pod", pod_with_init(json!([failed]), false))[2],
            "Init:Error"
        );
        let coded = json!({"name": "setup", "state": {"terminated": {"exitCode": 2}}});
        assert_eq!(
            row("Pod", pod_with_init(json!([coded]), false))[2],
            "Init:ExitCode:2"
        );
        let backoff =
            json!({"name": "setup", "state": {"waiting": {"reason": "CrashLoopBackOff"}}});
        assert_eq!(
            row("Pod", pod_with_init(json!([backoff]), false))[2],
            "Init:CrashLoopBackOff"
        );
    }

    #[test]
    fn sidecar_init_containers_count_as_containers() {
        let done = json!({"name": "setup", "restartCount": 2,
                          "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}});
        let sidecar = json!({"name": "proxy", "started": true, "ready": true, "restartCount": 1,
                             "state": {"running": {}},
                             "lastState": {"terminated": {"exitCode": 1, "finishedAt": ago(120)}}});
        let mut pod = pod_with_init(json!([done, sidecar]), true);
        pod["status"]["phase"] = json!("Running");
        pod["status"]["containerStatuses"] = json!([running(true), running(true)]);
        let cells = row("Pod", pod);
        assert_eq!(cells[1], "3/3");
        assert_eq!(cells[2], "Running");
        assert_eq!(
            cells[3], "1 (2m ago)",
            "only sidecar restarts survive initialization"
        );
    }

    #[test]
    fn pod_wide_columns() {
        let mut gated = pod(
            json!({"phase": "Running", "podIPs": [{"ip": "fd00::5"}, {"ip": "10.0.0.5"}],
            "nominatedNodeName": "n2",
            "conditions": [{"type": "example.com/a", "status": "True"}, {"type": "example.com/b", "status": "False"}]}),
        );
        gated["spec"]["readinessGates"] = json!([
            {"conditionType": "example.com/a"}, {"conditionType": "example.com/b"}, {"conditionType": "example.com/c"}]);
        let cells = row("Pod", gated);
        assert_eq!(cells[5], "fd00::5");
        assert_eq!(cells[7], "n2");
        assert_eq!(cells[8], "1/3");
    }

    #[test]
    fn pod_without_creation_timestamp_has_unknown_age() {
        assert_eq!(
            row("Pod", json!({"metadata": {"name": "x"}}))[4],
            "<unknown>"
        );
    }

    #[test]
    fn endpoints_rows() {
        let endpoints = json!({"metadata": {"name": "web"}, "subsets": [
            {"addresses": [{"ip": "10.0.0.1"}, {"ip": "10.0.0.2"}], "ports": [{"port": 80}, {"port": 443}]},
            {"addresses": [{"ip": "fd00::1"}], "ports": [{"port": 80}]}
        ]});
        assert_eq!(
            row("Endpoints", endpoints)[1],
            "10.0.0.1:80,10.0.0.2:80,10.0.0.1:443 + 2 more..."
        );
        let few = json!({"subsets": [{"addresses": [{"ip": "fd00::1"}], "ports": [{"port": 80}]}]});
        assert_eq!(row("Endpoints", few)[1], "[fd00::1]:80");
        let headless = json!({"subsets": [{"addresses": [{"ip": "10.0.0.7"}]}]});
        assert_eq!(row("Endpoints", headless)[1], "10.0.0.7");
        assert_eq!(row("Endpoints", json!({}))[1], "<none>");
    }

    #[test]
    fn endpoint_slice_rows() {
        let slice = json!({"metadata": {"name": "web-abc"}, "addressType": "IPv4",
            "ports": [{"port": 80, "name": "http"}, {"name": "metrics"}, {}],
            "endpoints": [{"addresses": ["10.0.0.1"]}, {"addresses": ["10.0.0.2", "10.0.0.3", "10.0.0.4"]}]});
        let cells = row("EndpointSlice", slice);
        assert_eq!(cells[1], "IPv4");
        assert_eq!(cells[2], "80,metrics,*");
        assert_eq!(cells[3], "10.0.0.1,10.0.0.2,10.0.0.3 + 1 more...");
        let empty = row("EndpointSlice", json!({"addressType": "IPv4"}));
        assert_eq!(empty[2], "<unset>");
        assert_eq!(empty[3], "<unset>");
    }

    fn node(labels: Value, conditions: Value, unschedulable: bool) -> Value {
        json!({"metadata": {"name": "n1", "labels": labels, "creationTimestamp": ago(45 * 86400)},
               "spec": {"unschedulable": unschedulable},
               "status": {"conditions": conditions,
                          "addresses": [{"type": "Hostname", "address": "n1"}, {"type": "InternalIP", "address": "192.168.1.10"}],
                          "nodeInfo": {"kubeletVersion": "v1.30.0", "osImage": "Debian GNU/Linux 12",
                                       "kernelVersion": "6.1.0", "containerRuntimeVersion": "containerd://1.7.0"}}})
    }

    #[test]
    fn node_roles_and_status() {
        let ready = json!([{"type": "Ready", "status": "True"}]);
        let control_plane = json!({"node-role.kubernetes.io/control-plane": "", "node-role.kubernetes.io/master": "",
                                   "kubernetes.io/hostname": "n1"});
        assert_eq!(
            row("Node", node(control_plane, ready.clone(), false)),
            [
                json!("n1"),
                json!("Ready"),
                json!("control-plane,master"),
                json!("45d"),
                json!("v1.30.0"),
                json!("192.168.1.10"),
                json!("<none>"),
                json!("Debian GNU/Linux 12"),
                json!("6.1.0"),
                json!("containerd://1.7.0")
            ]
        );
        let legacy = json!({"kubernetes.io/role": "worker", "node-role.kubernetes.io/": "x"});
        assert_eq!(row("Node", node(legacy, ready.clone(), false))[2], "worker");
        assert_eq!(
            row("Node", node(json!({}), ready, true))[1],
            "Ready,SchedulingDisabled"
        );
        let plain = row(
            "Node",
            node(
                json!({"kubernetes.io/role": ""}),
                json!([{"type": "Ready", "status": "False"}]),
                false,
            ),
        );
        assert_eq!(plain[1], "NotReady");
        assert_eq!(plain[2], "<none>");
        assert_eq!(row("Node", node(json!({}), json!([]), false))[1], "Unknown");
        assert_eq!(row("Node", json!({}))[7], "<unknown>");
    }

    #[test]
    fn workload_rows() {
        let template = json!({"spec": {"containers": [
            {"name": "app", "image": "nginx:1.25"}, {"name": "log", "image": "busybox"}]}});
        let deployment = json!({"metadata": {"name": "web", "creationTimestamp": ago(90)},
            "spec": {"replicas": 3, "template": template,
                     "selector": {"matchLabels": {"app": "web"}}},
            "status": {"readyReplicas": 2, "updatedReplicas": 3, "availableReplicas": 2}});
        assert_eq!(
            row("Deployment", deployment),
            [
                json!("web"),
                json!("2/3"),
                json!(3),
                json!(2),
                json!("90s"),
                json!("app,log"),
                json!("nginx:1.25,busybox"),
                json!("app=web")
            ]
        );
        let defaulted = row("Deployment", json!({"spec": {}}));
        assert_eq!(defaulted[1], "0/1");
        assert_eq!(defaulted[7], "");

        let replica_set = json!({"spec": {"template": template, "selector": {}},
                                 "status": {"replicas": 2, "readyReplicas": 1}});
        let cells = row("ReplicaSet", replica_set);
        assert_eq!(&cells[1..4], &[json!(1), json!(2), json!(1)]);
        assert_eq!(cells[7], "<none>");
        let bad =
            json!({"spec": {"selector": {"matchExpressions": [{"key": "a", "operator": "Nope"}]}}});
        assert_eq!(row("ReplicaSet", bad)[7], "<error>");

        let daemon_set = json!({"spec": {"template": {"spec": {"nodeSelector": {"os": "linux"}, "containers": []}},
                                         "selector": {"matchLabels": {"app": "agent"}}},
                                "status": {"desiredNumberScheduled": 3, "currentNumberScheduled": 3,
                                           "numberReady": 2, "updatedNumberScheduled": 3, "numberAvailable": 2}});
        let cells = row("DaemonSet", daemon_set);
        assert_eq!(
            &cells[1..7],
            &[
                json!(3),
                json!(3),
                json!(2),
                json!(3),
                json!(2),
                json!("os=linux")
            ]
        );
        assert_eq!(cells[10], "app=agent");
    }

    #[test]
    fn simple_kind_rows() {
        let meta = json!({"name": "x", "creationTimestamp": ago(3 * 3600 + 20 * 60)});
        assert_eq!(
            row(
                "Namespace",
                json!({"metadata": meta, "status": {"phase": "Active"}})
            ),
            [json!("x"), json!("Active"), json!("3h20m")]
        );
        assert_eq!(
            row(
                "ConfigMap",
                json!({"metadata": meta, "data": {"a": "1", "b": "2"}, "binaryData": {"c": ""}})
            )[1],
            3
        );
        assert_eq!(
            row(
                "Lease",
                json!({"metadata": meta, "spec": {"holderIdentity": "node-1"}})
            ),
            [json!("x"), json!("node-1"), json!("3h20m")]
        );
        assert_eq!(
            row(
                "Secret",
                json!({"type": "Opaque", "data": {"a": ""}, "stringData": {"a": "", "b": ""}})
            ),
            [json!(""), json!("Opaque"), json!(2), json!("<unknown>")]
        );
    }

    #[test]
    fn event_rows() {
        let event = json!({"metadata": {"name": "web.17a"}, "type": "Warning", "reason": "BackOff",
            "involvedObject": {"kind": "Pod", "name": "web", "fieldPath": "spec.containers{app}"},
            "source": {"component": "kubelet", "host": "n1"}, "message": " Back-off restarting \n",
            "firstTimestamp": ago(3600), "lastTimestamp": ago(30), "count": 12});
        assert_eq!(
            row("Event", event),
            [
                json!("30s"),
                json!("Warning"),
                json!("BackOff"),
                json!("pod/web"),
                json!("spec.containers{app}"),
                json!("kubelet, n1"),
                json!("Back-off restarting"),
                json!("60m"),
                json!(12),
                json!("web.17a")
            ]
        );

        let new_api = json!({"type": "Normal", "reason": "Scheduled", "involvedObject": {"kind": "Node"},
            "reportingComponent": "scheduler", "eventTime": "2024-05-01T11:58:59.500000Z"});
        let cells = row("Event", new_api);
        assert_eq!(cells[0], "60s");
        assert_eq!(cells[3], "node");
        assert_eq!(cells[5], "scheduler");
        assert_eq!(cells[7], "60s");
        assert_eq!(cells[8], 1);

        let series =
            json!({"series": {"count": 5, "lastObservedTime": ago(10)}, "eventTime": ago(500)});
        let cells = row("Event", series);
        assert_eq!(cells[0], "10s");
        assert_eq!(cells[8], 5);
        assert_eq!(row("Event", json!({}))[0], "<unknown>");
    }
}
