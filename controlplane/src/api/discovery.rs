//! Discovery (/version, /api, /apis, resource lists) and health endpoints:
//! what kubectl and client libraries read to learn which types exist.

use hyper::body::Incoming;
use hyper::{Request, Response};
use serde_json::{json, Value};

use super::status::{ApiError, ApiResult};
use super::{bytes_response, json_response, ApiServer, Body};
use crate::resources::{self, ResourceInfo, Subresource};

/// The Kubernetes version whose API this server speaks.
pub const KUBERNETES_MINOR: &str = "32";

const VERBS: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];
const SUBRESOURCE_VERBS: &[&str] = &["get", "patch", "update"];
/// Types `kubectl get all` shows.
const IN_CATEGORY_ALL: &[&str] = &[
    "pods",
    "services",
    "deployments",
    "replicasets",
    "daemonsets",
];

/// Endpoints served without authentication.
pub fn public(path: &str) -> Response<Body> {
    if path == "/version" {
        return json_response(
            200,
            &json!({
                "major": "1",
                "minor": KUBERNETES_MINOR,
                "gitVersion": format!("v1.{KUBERNETES_MINOR}.0-ferry.{}", env!("CARGO_PKG_VERSION")),
                "gitCommit": "",
                "gitTreeState": "clean",
                "buildDate": "",
                "goVersion": "rust",
                "compiler": "rustc",
                "platform": "linux/amd64",
            }),
        );
    }
    let mut resp = bytes_response(200, "ok");
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn resource_entry(r: &ResourceInfo) -> Value {
    let mut entry = json!({
        "name": r.plural,
        "singularName": r.singular,
        "namespaced": r.namespaced,
        "kind": r.kind,
        "verbs": VERBS,
    });
    if !r.short_names.is_empty() {
        entry["shortNames"] = json!(r.short_names);
    }
    if IN_CATEGORY_ALL.contains(&r.plural) {
        entry["categories"] = json!(["all"]);
    }
    entry
}

fn subresource_entry(r: &ResourceInfo, sub: Subresource) -> Value {
    let mut entry = json!({
        "name": format!("{}/{}", r.plural, sub.as_str()),
        "singularName": "",
        "namespaced": r.namespaced,
        "kind": r.kind,
        "verbs": SUBRESOURCE_VERBS,
    });
    if sub == Subresource::Log {
        entry["verbs"] = json!(["get"]);
    }
    if sub == Subresource::Scale {
        entry["group"] = json!("autoscaling");
        entry["version"] = json!("v1");
        entry["kind"] = json!("Scale");
    }
    entry
}

pub fn resource_list(group: &str, version: &str) -> ApiResult<Response<Body>> {
    let mut list = Vec::new();
    for r in resources::in_group_version(group, version) {
        list.push(resource_entry(r));
        list.extend(r.subresources.iter().map(|s| subresource_entry(r, *s)));
    }
    if list.is_empty() {
        return Err(ApiError::path_not_found());
    }
    let group_version = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Ok(json_response(
        200,
        &json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": list}),
    ))
}

fn api_group(name: &str) -> Value {
    let gv = json!({"groupVersion": format!("{name}/v1"), "version": "v1"});
    json!({"kind": "APIGroup", "apiVersion": "v1", "name": name, "versions": [gv], "preferredVersion": gv})
}

/// Everything outside /api/v1/... and /apis/{group}/{version}/....
pub fn non_resource(
    server: &ApiServer,
    path: &str,
    _req: &Request<Incoming>,
) -> ApiResult<Response<Body>> {
    match path {
        "/api" => Ok(json_response(
            200,
            &json!({
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server.advertise}],
            }),
        )),
        "/apis" => {
            let groups: Vec<Value> = resources::groups().into_iter().map(api_group).collect();
            Ok(json_response(
                200,
                &json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}),
            ))
        }
        "/openapi/v3" => Ok(json_response(200, &openapi_v3_root())),
        _ if path.starts_with("/openapi/v3/") => {
            openapi_v3_group_version(&path["/openapi/v3/".len()..])
        }
        _ => match path.strip_prefix("/apis/") {
            Some(group) if resources::groups().contains(&group) => {
                Ok(json_response(200, &api_group(group)))
            }
            _ => Err(ApiError::path_not_found()),
        },
    }
}

/// Where each group-version's OpenAPI v3 document lives, as kube-apiserver
/// publishes it.
fn openapi_v3_root() -> Value {
    let mut paths = serde_json::Map::new();
    let mut gvs = vec![("".to_string(), "api/v1".to_string())];
    gvs.extend(
        resources::groups()
            .into_iter()
            .map(|g| (g.to_string(), format!("apis/{g}/v1"))),
    );
    for (_, gv_path) in gvs {
        let url = format!(
            "/openapi/v3/{gv_path}?hash={}",
            env!("CARGO_PKG_VERSION").replace('.', "")
        );
        paths.insert(gv_path, json!({"serverRelativeURL": url}));
    }
    json!({"paths": paths})
}

/// The OpenAPI v3 document of one group-version. It declares, per type, the
/// PATCH operation and its `fieldValidation` parameter, which tells kubectl to
/// leave schema validation to this server (which checks every field against
/// the Kubernetes types). It carries no request-body schemas, so `kubectl
/// apply` computes strategic merge patches from its compiled-in types.
fn openapi_v3_group_version(gv_path: &str) -> ApiResult<Response<Body>> {
    let (group, version) = match gv_path.split('/').collect::<Vec<_>>().as_slice() {
        ["api", "v1"] => ("", "v1"),
        ["apis", group, version] => (*group, *version),
        _ => return Err(ApiError::path_not_found()),
    };
    let mut paths = serde_json::Map::new();
    for r in resources::in_group_version(group, version) {
        let gvk = json!({"group": group, "version": version, "kind": r.kind});
        let params = json!([
            {"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
            {"name": "dryRun", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
        ]);
        let op = |verb: &str| {
            json!({
                "operationId": format!("{verb}{}", r.kind),
                "parameters": params,
                "responses": {"200": {"description": "OK"}},
                "x-kubernetes-action": verb,
                "x-kubernetes-group-version-kind": gvk,
            })
        };
        let base = if group.is_empty() {
            "/api/v1".to_string()
        } else {
            format!("/apis/{group}/{version}")
        };
        let item = if r.namespaced {
            format!("{base}/namespaces/{{namespace}}/{}/{{name}}", r.plural)
        } else {
            format!("{base}/{}/{{name}}", r.plural)
        };
        paths.insert(item, json!({"patch": op("patch"), "put": op("put")}));
    }
    if paths.is_empty() {
        return Err(ApiError::path_not_found());
    }
    Ok(json_response(
        200,
        &json!({
            "openapi": "3.0.0",
            "info": {"title": "Kubernetes", "version": format!("v1.{KUBERNETES_MINOR}.0")},
            "paths": paths,
            "components": {"schemas": {}},
        }),
    ))
}
