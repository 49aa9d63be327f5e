//! Bad requests get a clear metav1.Status error — code, reason, and a message
//! (and for 422 the `details.causes[].field`) naming the problem — and change
//! nothing: the affected lists, item by item with their resourceVersions, and
//! the list resourceVersion (the store's revision) are the same afterwards.

mod support;

use serde_json::{json, Value};
use support::{curl_with, curl_with_args, ControlPlane};

const CONFIGMAPS: &str = "/api/v1/namespaces/default/configmaps";
const SERVICES: &str = "/api/v1/namespaces/default/services";
const ALL_CONFIGMAPS: &str = "/api/v1/configmaps";
const ALL_SERVICES: &str = "/api/v1/services";
const NAMESPACES: &str = "/api/v1/namespaces";
const JSON: &str = "application/json";

/// A list as the server reports it: its resourceVersion and every item
/// (whole objects, so their resourceVersions too).
#[derive(Debug, PartialEq)]
struct Snapshot {
    resource_version: String,
    items: Vec<Value>,
}

fn snapshot(cp: &ControlPlane, list_path: &str) -> Snapshot {
    let (code, body) = cp.curl("GET", list_path, JSON, None);
    assert_eq!(code, 200, "GET {list_path}: {body}");
    let list: Value = serde_json::from_str(&body).unwrap();
    Snapshot {
        resource_version: list["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .to_string(),
        items: list["items"].as_array().unwrap().clone(),
    }
}

/// One bad request and the error it must get.
struct Bad<'a> {
    what: &'a str,
    method: &'a str,
    path: &'a str,
    content_type: &'a str,
    body: Option<Vec<u8>>,
    code: u16,
    reason: &'a str,
    /// Substrings the Status message must contain.
    message_has: &'a [&'a str],
    /// `details.causes[].field` values that must be present (422s).
    fields: &'a [&'a str],
    /// Sent over HTTP/1.1: see `ControlPlane::curl_http1`.
    http1: bool,
}

impl<'a> Bad<'a> {
    fn new(what: &'a str, method: &'a str, path: &'a str, code: u16, reason: &'a str) -> Bad<'a> {
        Bad {
            what,
            method,
            path,
            content_type: JSON,
            body: None,
            code,
            reason,
            message_has: &[],
            fields: &[],
            http1: false,
        }
    }

    /// The server may answer before reading the body; curl 7.88 only copes
    /// with that over HTTP/1.1 (see `ControlPlane::curl_http1`).
    fn early_response(mut self) -> Self {
        self.http1 = true;
        self
    }

    fn json(mut self, body: Value) -> Self {
        self.body = Some(serde_json::to_vec(&body).unwrap());
        self
    }

    fn raw(mut self, content_type: &'a str, body: impl Into<Vec<u8>>) -> Self {
        self.content_type = content_type;
        self.body = Some(body.into());
        self
    }

    fn message(mut self, has: &'a [&'a str]) -> Self {
        self.message_has = has;
        self
    }

    fn fields(mut self, fields: &'a [&'a str]) -> Self {
        self.fields = fields;
        self
    }
}

/// Checks that `(code, body)` is the Status described by `bad`; returns it.
fn check_status(bad: &Bad, code: u16, body: &str) -> Value {
    let what = bad.what;
    assert_eq!(code, bad.code, "{what}: status code; body: {body}");
    let status: Value = serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("{what}: the error body is not JSON ({e}): {body}"));
    assert_eq!(status["kind"], "Status", "{what}: {status}");
    assert_eq!(status["status"], "Failure", "{what}: {status}");
    assert_eq!(status["code"], bad.code, "{what}: {status}");
    assert_eq!(status["reason"], bad.reason, "{what}: {status}");
    let message = status["message"].as_str().unwrap_or_default();
    for needle in bad.message_has {
        assert!(
            message.contains(needle),
            "{what}: message {message:?} should mention {needle:?}"
        );
    }
    let causes: Vec<&str> = status["details"]["causes"]
        .as_array()
        .map(|c| c.iter().filter_map(|c| c["field"].as_str()).collect())
        .unwrap_or_default();
    for field in bad.fields {
        assert!(
            causes.contains(field),
            "{what}: causes {causes:?} should include field {field:?}; status: {status}"
        );
        assert!(
            message.contains(field),
            "{what}: message {message:?} should name {field:?}"
        );
    }
    status
}

/// Sends `bad` with the admin token and checks the error, and that none of the
/// lists in `watched` changed (items, their versions, the list version).
fn rejected(cp: &ControlPlane, watched: &[&str], bad: Bad) -> Value {
    let before: Vec<Snapshot> = watched.iter().map(|p| snapshot(cp, p)).collect();
    let send = if bad.http1 {
        ControlPlane::curl_http1
    } else {
        ControlPlane::curl
    };
    let (code, body) = send(
        cp,
        bad.method,
        bad.path,
        bad.content_type,
        bad.body.as_deref(),
    );
    let status = check_status(&bad, code, &body);
    let after: Vec<Snapshot> = watched.iter().map(|p| snapshot(cp, p)).collect();
    for ((path, b), a) in watched.iter().zip(&before).zip(&after) {
        assert_eq!(
            b, a,
            "{}: {path} changed although the request was rejected",
            bad.what
        );
    }
    status
}

fn create_ok(cp: &ControlPlane, path: &str, body: Value) -> Value {
    let (code, text) = cp.curl(
        "POST",
        path,
        JSON,
        Some(&serde_json::to_vec(&body).unwrap()),
    );
    assert_eq!(code, 201, "POST {path} {body}: {text}");
    serde_json::from_str(&text).unwrap()
}

fn service(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name}, "spec": spec})
}

/// A Service with these ports (and a selector), otherwise valid.
fn service_with_ports(ports: Value) -> Value {
    service("bad", json!({"selector": {"app": "web"}, "ports": ports}))
}

fn configmap(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {"a": "1"}})
}

/// Runs every case (each checked by `rejected`), then fails listing all the
/// cases that failed, so one report shows the whole corpus.
fn corpus(cp: &ControlPlane, watched: &[&str], cases: Vec<Bad>) {
    let mut failed = Vec::new();
    for bad in cases {
        let what = bad.what.to_string();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            rejected(cp, watched, bad);
        }));
        if outcome.is_err() {
            failed.push(what);
        }
    }
    assert!(
        failed.is_empty(),
        "failed cases (details above): {failed:?}"
    );
}

#[test]
fn malformed_bodies_are_400() {
    let cp = ControlPlane::start();
    create_ok(&cp, CONFIGMAPS, configmap("existing"));
    create_ok(
        &cp,
        SERVICES,
        service("existing", json!({"ports": [{"port": 80}]})),
    );
    let plain = serde_json::to_vec(&configmap("plain")).unwrap();
    corpus(
        &cp,
        &[ALL_CONFIGMAPS, ALL_SERVICES],
        vec![
            Bad::new("malformed JSON", "POST", CONFIGMAPS, 400, "BadRequest")
                .raw(
                    JSON,
                    r#"{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x""#,
                )
                .message(&["JSON"]),
            Bad::new("malformed YAML", "POST", CONFIGMAPS, 400, "BadRequest")
                .raw(
                    "application/yaml",
                    "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: [unclosed\ndata: {a: 1\n",
                )
                .message(&["YAML"]),
            Bad::new("unknown kind", "POST", CONFIGMAPS, 400, "BadRequest")
                .json(json!({"apiVersion": "v1", "kind": "Widget", "metadata": {"name": "w"}}))
                .message(&["Widget"]),
            Bad::new("wrong apiVersion", "POST", CONFIGMAPS, 400, "BadRequest")
                .json(json!({"apiVersion": "apps/v1", "kind": "ConfigMap", "metadata": {"name": "w"}}))
                .message(&["apps/v1"]),
            Bad::new("port of the wrong JSON type", "POST", SERVICES, 400, "BadRequest")
                .json(service_with_ports(json!([{"port": "eighty"}])))
                .message(&["spec.ports[0].port"]),
            Bad::new(
                "unknown field with fieldValidation=Strict",
                "POST",
                "/api/v1/namespaces/default/services?fieldValidation=Strict",
                400,
                "BadRequest",
            )
            .json(service("strict", json!({"ports": [{"port": 80}], "colour": "blue"})))
            .message(&["spec.colour"]),
            Bad::new(
                "POST with an unsupported content type",
                "POST",
                CONFIGMAPS,
                415,
                "UnsupportedMediaType",
            )
            .raw("text/plain", plain)
            .message(&["text/plain"])
            .early_response(),
        ],
    );
}

#[test]
fn unknown_paths_and_namespaces_are_404() {
    let cp = ControlPlane::start();
    create_ok(&cp, CONFIGMAPS, configmap("existing"));
    corpus(
        &cp,
        &[ALL_CONFIGMAPS, NAMESPACES],
        vec![
            Bad::new(
                "GET of an unknown resource",
                "GET",
                "/api/v1/namespaces/default/widgets",
                404,
                "NotFound",
            ),
            Bad::new(
                "POST to an unknown resource",
                "POST",
                "/api/v1/namespaces/default/widgets",
                404,
                "NotFound",
            )
            .json(json!({"apiVersion": "v1", "kind": "Widget", "metadata": {"name": "w"}}))
            .early_response(),
            Bad::new(
                "unknown group",
                "GET",
                "/apis/example.com/v1/namespaces/default/widgets",
                404,
                "NotFound",
            ),
            Bad::new(
                "create in a namespace that does not exist",
                "POST",
                "/api/v1/namespaces/nope/configmaps",
                404,
                "NotFound",
            )
            .json(configmap("x"))
            .message(&["namespaces \"nope\" not found"]),
        ],
    );
}

#[test]
fn missing_or_invalid_names_are_422() {
    let cp = ControlPlane::start();
    corpus(
        &cp,
        &[ALL_CONFIGMAPS, ALL_SERVICES],
        vec![
            Bad::new("missing name", "POST", CONFIGMAPS, 422, "Invalid")
                .json(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {}, "data": {"a": "1"}}))
                .fields(&["metadata.name"]),
            Bad::new("invalid DNS-1123 name", "POST", CONFIGMAPS, 422, "Invalid")
                .json(configmap("Bad_Name"))
                .message(&["ConfigMap \"Bad_Name\" is invalid"])
                .fields(&["metadata.name"]),
            Bad::new("invalid Service name", "POST", SERVICES, 422, "Invalid")
                .json(service("Bad_Name", json!({"ports": [{"port": 80}]})))
                .message(&["Service \"Bad_Name\" is invalid"])
                .fields(&["metadata.name"]),
        ],
    );
}

#[test]
fn invalid_service_ports_are_422() {
    let cp = ControlPlane::start();
    let cases: [(&str, Value, &[&str]); 5] = [
        ("port 0", json!([{"port": 0}]), &["spec.ports[0].port"]),
        (
            "port 70000",
            json!([{"port": 70000}]),
            &["spec.ports[0].port"],
        ),
        (
            "duplicate port and protocol",
            json!([{"name": "a", "port": 80, "protocol": "TCP"},
                   {"name": "b", "port": 80, "protocol": "TCP"}]),
            &["spec.ports[1]"],
        ),
        (
            "unsupported protocol",
            json!([{"port": 80, "protocol": "XTP"}]),
            &["spec.ports[0].protocol"],
        ),
        (
            "two unnamed ports",
            json!([{"port": 80}, {"port": 81}]),
            &["spec.ports[0].name", "spec.ports[1].name"],
        ),
    ];
    let cases = cases
        .into_iter()
        .map(|(what, ports, fields)| {
            Bad::new(what, "POST", SERVICES, 422, "Invalid")
                .json(service_with_ports(ports))
                .message(&["Service \"bad\" is invalid"])
                .fields(fields)
        })
        .collect();
    corpus(&cp, &[ALL_SERVICES], cases);
}

#[test]
fn out_of_range_or_taken_node_ports_and_cluster_ips_are_422() {
    let cp = ControlPlane::start();
    create_ok(
        &cp,
        SERVICES,
        service(
            "holder",
            json!({"type": "NodePort", "clusterIP": "10.96.0.50",
                   "ports": [{"port": 80, "nodePort": 30080}]}),
        ),
    );
    let svcs = &[ALL_SERVICES];
    let node_port = |n: u16| {
        service(
            "bad",
            json!({"type": "NodePort", "ports": [{"port": 80, "nodePort": n}]}),
        )
    };
    corpus(
        &cp,
        svcs,
        vec![
            Bad::new("nodePort out of range", "POST", SERVICES, 422, "Invalid")
                .json(node_port(29999))
                .message(&["29999", "30000-32767"])
                .fields(&["spec.ports[0].nodePort"]),
            Bad::new("nodePort already taken", "POST", SERVICES, 422, "Invalid")
                .json(node_port(30080))
                .message(&["30080", "already allocated"])
                .fields(&["spec.ports[0].nodePort"]),
        ],
    );
    let cluster_ip_fields = |status: &Value| -> Vec<String> {
        status["details"]["causes"]
            .as_array()
            .map(|causes| {
                causes
                    .iter()
                    .filter_map(|c| c["field"].as_str())
                    .filter(|f| f.starts_with("spec.clusterIP"))
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    };
    let status = rejected(
        &cp,
        svcs,
        Bad::new(
            "clusterIP outside the service CIDR",
            "POST",
            SERVICES,
            422,
            "Invalid",
        )
        .json(service(
            "bad",
            json!({"clusterIP": "192.168.7.7", "ports": [{"port": 80}]}),
        ))
        .message(&["192.168.7.7"]),
    );
    assert!(
        !cluster_ip_fields(&status).is_empty(),
        "a spec.clusterIP(s) cause: {status}"
    );
    let status = rejected(
        &cp,
        svcs,
        Bad::new("clusterIP already taken", "POST", SERVICES, 422, "Invalid")
            .json(service(
                "bad",
                json!({"clusterIP": "10.96.0.50", "ports": [{"port": 80}]}),
            ))
            .message(&["10.96.0.50", "already allocated"]),
    );
    assert!(
        !cluster_ip_fields(&status).is_empty(),
        "a spec.clusterIP(s) cause: {status}"
    );

    // A rejected write holds on to nothing it asked for: the free IP and node
    // port requested next to a bad node port are still free afterwards.
    rejected(
        &cp,
        svcs,
        Bad::new(
            "one bad nodePort next to good requests",
            "POST",
            SERVICES,
            422,
            "Invalid",
        )
        .json(service(
            "bad",
            json!({"type": "NodePort", "clusterIP": "10.96.0.60",
                   "ports": [{"name": "a", "port": 80, "nodePort": 30090},
                             {"name": "b", "port": 81, "nodePort": 29999}]}),
        ))
        .fields(&["spec.ports[1].nodePort"]),
    );
    let good = create_ok(
        &cp,
        SERVICES,
        service(
            "good",
            json!({"type": "NodePort", "clusterIP": "10.96.0.60",
                   "ports": [{"port": 80, "nodePort": 30090}]}),
        ),
    );
    assert_eq!(good["spec"]["clusterIP"], "10.96.0.60");
    assert_eq!(good["spec"]["ports"][0]["nodePort"], 30090);
}

#[test]
fn stale_resource_version_on_put_is_409() {
    let cp = ControlPlane::start();
    let first = create_ok(&cp, CONFIGMAPS, configmap("s"));
    let mut second = first.clone();
    second["data"]["a"] = json!("2");
    let (code, body) = cp.curl(
        "PUT",
        &format!("{CONFIGMAPS}/s"),
        JSON,
        Some(&serde_json::to_vec(&second).unwrap()),
    );
    assert_eq!(code, 200, "{body}");
    let second: Value = serde_json::from_str(&body).unwrap();
    assert_ne!(
        second["metadata"]["resourceVersion"],
        first["metadata"]["resourceVersion"]
    );

    // `first` still carries the old resourceVersion.
    let mut stale = first.clone();
    stale["data"]["a"] = json!("3");
    let status = rejected(
        &cp,
        &[ALL_CONFIGMAPS],
        Bad::new(
            "PUT with a stale resourceVersion",
            "PUT",
            "/api/v1/namespaces/default/configmaps/s",
            409,
            "Conflict",
        )
        .json(stale)
        .message(&["the object has been modified"]),
    );
    assert_eq!(status["details"]["name"], "s", "{status}");
    let (_, now) = cp.curl("GET", &format!("{CONFIGMAPS}/s"), JSON, None);
    let now: Value = serde_json::from_str(&now).unwrap();
    assert_eq!(now["data"]["a"], "2");
}

#[test]
fn body_over_3_mib_is_413() {
    let cp = ControlPlane::start();
    let mut big = configmap("big");
    big["data"]["a"] = json!("x".repeat(3 * 1024 * 1024 + 512 * 1024));
    let big_bytes = serde_json::to_vec(&big).unwrap();
    rejected(
        &cp,
        &[ALL_CONFIGMAPS],
        Bad::new(
            "body over 3 MiB",
            "POST",
            CONFIGMAPS,
            413,
            "RequestEntityTooLarge",
        )
        .raw(JSON, big_bytes.clone())
        .message(&["too large"])
        .early_response(),
    );

    // The same through kubectl (HTTP/2).
    let before = snapshot(&cp, ALL_CONFIGMAPS);
    let file = cp.dir.path().join("big.json");
    std::fs::write(&file, &big_bytes).unwrap();
    let out = cp.kubectl(&["create", "-f", file.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("RequestEntityTooLarge"),
        "kubectl: {stderr}"
    );
    assert_eq!(before, snapshot(&cp, ALL_CONFIGMAPS));
}

#[test]
fn unparsable_label_and_unsupported_field_selectors_are_400() {
    let cp = ControlPlane::start();
    create_ok(&cp, CONFIGMAPS, configmap("keep-me"));
    let mut cases = Vec::new();
    for (what, query) in [
        ("label selector `a in b`", "labelSelector=a%20in%20b"),
        ("label selector `a=(`", "labelSelector=a%3D%28"),
    ] {
        cases.push((
            format!("{what} (list)"),
            "GET",
            format!("{CONFIGMAPS}?{query}"),
        ));
        cases.push((
            format!("{what} (watch)"),
            "GET",
            format!("{CONFIGMAPS}?watch=true&timeoutSeconds=5&{query}"),
        ));
        // Above all, a bad selector must not turn into "delete everything".
        cases.push((
            format!("{what} (deletecollection)"),
            "DELETE",
            format!("{CONFIGMAPS}?{query}"),
        ));
    }
    let mut bad: Vec<Bad> = cases
        .iter()
        .map(|(what, method, path)| {
            Bad::new(what, method, path, 400, "BadRequest").message(&["unable to parse"])
        })
        .collect();
    let field_selector = format!("{CONFIGMAPS}?fieldSelector=spec.colour%3Dblue");
    bad.push(
        Bad::new(
            "unsupported field selector (list)",
            "GET",
            &field_selector,
            400,
            "BadRequest",
        )
        .message(&["spec.colour"]),
    );
    bad.push(
        Bad::new(
            "unsupported field selector (deletecollection)",
            "DELETE",
            &field_selector,
            400,
            "BadRequest",
        )
        .message(&["spec.colour"]),
    );
    corpus(&cp, &[ALL_CONFIGMAPS], bad);
}

#[test]
fn missing_or_wrong_token_is_401() {
    let cp = ControlPlane::start();
    create_ok(&cp, CONFIGMAPS, configmap("existing"));
    let before = snapshot(&cp, ALL_CONFIGMAPS);
    let body = serde_json::to_vec(&configmap("sneaky")).unwrap();
    for (what, token) in [
        ("no token", None),
        ("wrong token", Some("not-the-admin-token")),
    ] {
        let (code, text) = curl_with(
            cp.url(),
            &cp.ca_file(),
            token,
            "GET",
            CONFIGMAPS,
            JSON,
            None,
        );
        let bad = Bad::new(what, "GET", CONFIGMAPS, 401, "Unauthorized");
        check_status(&bad, code, &text);
        // The server answers before reading the body: HTTP/1.1 for curl.
        let (code, text) = curl_with_args(
            &["--http1.1"],
            cp.url(),
            &cp.ca_file(),
            token,
            "POST",
            CONFIGMAPS,
            JSON,
            Some(&body),
        );
        let bad = Bad::new(what, "POST", CONFIGMAPS, 401, "Unauthorized");
        check_status(&bad, code, &text);
    }
    assert_eq!(before, snapshot(&cp, ALL_CONFIGMAPS));
}

#[test]
fn failing_or_unsupported_patches_change_nothing() {
    let cp = ControlPlane::start();
    create_ok(&cp, CONFIGMAPS, configmap("p"));
    let path = "/api/v1/namespaces/default/configmaps/p";
    let patch = json!([
        {"op": "test", "path": "/data/a", "value": "2"},
        {"op": "replace", "path": "/data/a", "value": "3"},
    ]);
    corpus(
        &cp,
        &[ALL_CONFIGMAPS],
        vec![
            Bad::new(
                "JSON patch with a failing test op",
                "PATCH",
                path,
                422,
                "Invalid",
            )
            .raw(
                "application/json-patch+json",
                serde_json::to_vec(&patch).unwrap(),
            )
            .message(&["test"]),
            Bad::new(
                "PATCH with an unsupported content type",
                "PATCH",
                path,
                415,
                "UnsupportedMediaType",
            )
            .raw("text/plain", r#"{"data": {"a": "9"}}"#)
            .message(&["text/plain"])
            .early_response(),
        ],
    );
    let (_, now) = cp.curl("GET", path, JSON, None);
    let now: Value = serde_json::from_str(&now).unwrap();
    assert_eq!(now["data"]["a"], "1");
}

#[test]
fn default_namespace_cannot_be_deleted() {
    let cp = ControlPlane::start();
    create_ok(&cp, CONFIGMAPS, configmap("lives-in-default"));
    rejected(
        &cp,
        &[NAMESPACES, ALL_CONFIGMAPS],
        Bad::new(
            "delete the default namespace",
            "DELETE",
            "/api/v1/namespaces/default",
            403,
            "Forbidden",
        )
        .message(&["default"]),
    );
    let (code, ns) = cp.curl("GET", "/api/v1/namespaces/default", JSON, None);
    assert_eq!(code, 200);
    let ns: Value = serde_json::from_str(&ns).unwrap();
    assert!(ns["metadata"].get("deletionTimestamp").is_none(), "{ns}");
    assert_eq!(ns["status"]["phase"], "Active");
}

#[test]
fn kubectl_apply_of_an_invalid_service_fails_and_stores_nothing() {
    let cp = ControlPlane::start();
    let cases = [
        // Caught by the node port allocator.
        (
            "nodePort 29999",
            "spec:\n  type: NodePort\n  selector: {app: web}\n  ports:\n  - name: http\n    port: 80\n    nodePort: 29999\n",
            "spec.ports[0].nodePort",
        ),
        // Caught by validation.
        (
            "port 70000",
            "spec:\n  selector: {app: web}\n  ports:\n  - name: http\n    port: 70000\n",
            "spec.ports[0].port",
        ),
    ];
    for (what, spec, field) in cases {
        let manifest = format!("apiVersion: v1\nkind: Service\nmetadata:\n  name: bad-svc\n{spec}");
        let before = snapshot(&cp, ALL_SERVICES);
        let out = cp.kubectl_stdin(&["apply", "-f", "-"], Some(&manifest));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{what}: kubectl apply should fail; stdout: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(
            stderr.contains(field),
            "{what}: kubectl's error should name {field}: {stderr}"
        );
        assert!(
            stderr.contains("bad-svc"),
            "{what}: kubectl's error should name the object: {stderr}"
        );
        assert_eq!(
            before,
            snapshot(&cp, ALL_SERVICES),
            "{what}: nothing stored"
        );
        let get = cp.kubectl(&["get", "service", "bad-svc"]);
        assert!(!get.status.success(), "{what}: bad-svc must not exist");
    }
}
