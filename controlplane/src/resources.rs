//! The resource types this API server serves, and how each one is addressed.
//!
//! One static table drives routing, discovery, storage keys and OpenAPI, so a new
//! type is one entry here plus, where it has special behaviour, a strategy hook.

/// A subresource the API exposes under `.../{name}/{subresource}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subresource {
    Status,
    Scale,
    /// A pod's container output, proxied from its node agent.
    Log,
}

impl Subresource {
    pub fn parse(s: &str) -> Option<Subresource> {
        match s {
            "status" => Some(Subresource::Status),
            "scale" => Some(Subresource::Scale),
            "log" => Some(Subresource::Log),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Subresource::Status => "status",
            Subresource::Scale => "scale",
            Subresource::Log => "log",
        }
    }
}

#[derive(Debug)]
pub struct ResourceInfo {
    /// API group; "" for the core group.
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
    pub singular: &'static str,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
    pub subresources: &'static [Subresource],
    /// `metadata.generation` increases on changes outside metadata and status.
    pub tracks_generation: bool,
}

impl ResourceInfo {
    /// `apiVersion` as objects carry it: `v1` or `apps/v1`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    pub fn list_kind(&self) -> String {
        format!("{}List", self.kind)
    }

    pub fn has_subresource(&self, sub: Subresource) -> bool {
        self.subresources.contains(&sub)
    }

    /// The name used in messages, as kube-apiserver spells it: `services`, `deployments.apps`.
    pub fn qualified_plural(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// Storage key prefix for every object of this type: `/registry/apps/deployments/`.
    pub fn key_prefix(&self) -> String {
        if self.group.is_empty() {
            format!("/registry/core/{}/", self.plural)
        } else {
            format!("/registry/{}/{}/", self.group, self.plural)
        }
    }

    /// Key prefix for one namespace, or the whole type when `namespace` is None.
    pub fn scope_prefix(&self, namespace: Option<&str>) -> String {
        match (self.namespaced, namespace) {
            (true, Some(ns)) => format!("{}{}/", self.key_prefix(), ns),
            _ => self.key_prefix(),
        }
    }

    pub fn object_key(&self, namespace: Option<&str>, name: &str) -> String {
        match (self.namespaced, namespace) {
            (true, Some(ns)) => format!("{}{}/{}", self.key_prefix(), ns, name),
            _ => format!("{}{}", self.key_prefix(), name),
        }
    }
}

const STATUS: &[Subresource] = &[Subresource::Status];
const STATUS_SCALE: &[Subresource] = &[Subresource::Status, Subresource::Scale];
const STATUS_LOG: &[Subresource] = &[Subresource::Status, Subresource::Log];

macro_rules! resource {
    ($group:expr, $version:expr, $kind:expr, $plural:expr, $singular:expr, $namespaced:expr, $short:expr, $subs:expr, $gen:expr) => {
        ResourceInfo {
            group: $group,
            version: $version,
            kind: $kind,
            plural: $plural,
            singular: $singular,
            namespaced: $namespaced,
            short_names: $short,
            subresources: $subs,
            tracks_generation: $gen,
        }
    };
}

pub static RESOURCES: &[ResourceInfo] = &[
    resource!(
        "",
        "v1",
        "Namespace",
        "namespaces",
        "namespace",
        false,
        &["ns"],
        STATUS,
        false
    ),
    resource!(
        "",
        "v1",
        "Service",
        "services",
        "service",
        true,
        &["svc"],
        STATUS,
        false
    ),
    resource!(
        "",
        "v1",
        "Endpoints",
        "endpoints",
        "endpoints",
        true,
        &["ep"],
        &[],
        false
    ),
    resource!(
        "",
        "v1",
        "Pod",
        "pods",
        "pod",
        true,
        &["po"],
        STATUS_LOG,
        false
    ),
    resource!(
        "",
        "v1",
        "Node",
        "nodes",
        "node",
        false,
        &["no"],
        STATUS,
        false
    ),
    resource!(
        "",
        "v1",
        "ConfigMap",
        "configmaps",
        "configmap",
        true,
        &["cm"],
        &[],
        false
    ),
    resource!(
        "",
        "v1",
        "Event",
        "events",
        "event",
        true,
        &["ev"],
        &[],
        false
    ),
    resource!(
        "discovery.k8s.io",
        "v1",
        "EndpointSlice",
        "endpointslices",
        "endpointslice",
        true,
        &[],
        &[],
        false
    ),
    resource!(
        "apps",
        "v1",
        "Deployment",
        "deployments",
        "deployment",
        true,
        &["deploy"],
        STATUS_SCALE,
        true
    ),
    resource!(
        "apps",
        "v1",
        "ReplicaSet",
        "replicasets",
        "replicaset",
        true,
        &["rs"],
        STATUS_SCALE,
        true
    ),
    resource!(
        "apps",
        "v1",
        "DaemonSet",
        "daemonsets",
        "daemonset",
        true,
        &["ds"],
        STATUS,
        true
    ),
    resource!(
        "coordination.k8s.io",
        "v1",
        "Lease",
        "leases",
        "lease",
        true,
        &[],
        &[],
        false
    ),
];

/// The API groups besides core, in the order discovery lists them.
pub fn groups() -> Vec<&'static str> {
    let mut groups: Vec<&'static str> = Vec::new();
    for r in RESOURCES.iter().filter(|r| !r.group.is_empty()) {
        if !groups.contains(&r.group) {
            groups.push(r.group);
        }
    }
    groups
}

pub fn find(group: &str, version: &str, plural: &str) -> Option<&'static ResourceInfo> {
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.version == version && r.plural == plural)
}

pub fn find_kind(kind: &str) -> Option<&'static ResourceInfo> {
    RESOURCES.iter().find(|r| r.kind == kind)
}

pub fn in_group_version<'a>(
    group: &'a str,
    version: &'a str,
) -> impl Iterator<Item = &'static ResourceInfo> + 'a {
    RESOURCES
        .iter()
        .filter(move |r| r.group == group && r.version == version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_separate_types_and_namespaces() {
        let svc = find("", "v1", "services").unwrap();
        assert_eq!(
            svc.object_key(Some("default"), "web"),
            "/registry/core/services/default/web"
        );
        assert_eq!(
            svc.scope_prefix(Some("default")),
            "/registry/core/services/default/"
        );
        let deploy = find("apps", "v1", "deployments").unwrap();
        assert_eq!(deploy.api_version(), "apps/v1");
        assert_eq!(deploy.qualified_plural(), "deployments.apps");
        let node = find_kind("Node").unwrap();
        assert_eq!(node.object_key(None, "n1"), "/registry/core/nodes/n1");
    }

    #[test]
    fn groups_are_listed_once() {
        assert_eq!(
            groups(),
            vec!["discovery.k8s.io", "apps", "coordination.k8s.io"]
        );
    }
}
