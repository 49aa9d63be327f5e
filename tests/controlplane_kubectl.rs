//! The installed kubectl against `ferry controlplane`: the everyday flows.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::ControlPlane;

const MANIFEST: &str = include_str!("../examples/web.yaml");

fn header(table: &str) -> Vec<String> {
    table
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

#[test]
fn apply_get_edit_label_scale_delete() {
    let cp = ControlPlane::start();
    let manifest = cp.dir.path().join("web.yaml");
    std::fs::write(&manifest, MANIFEST).unwrap();
    let path = manifest.to_str().unwrap();

    let out = cp.kubectl_ok(&["apply", "-f", path]);
    assert!(out.contains("configmap/web-config created"), "{out}");
    assert!(out.contains("deployment.apps/web created"), "{out}");
    assert!(out.contains("service/web created"), "{out}");

    let svc = cp.kubectl_ok(&["get", "svc"]);
    assert_eq!(
        header(&svc),
        [
            "NAME",
            "TYPE",
            "CLUSTER-IP",
            "EXTERNAL-IP",
            "PORT(S)",
            "AGE"
        ]
    );
    let web_row = svc.lines().find(|l| l.starts_with("web ")).expect(&svc);
    assert!(
        web_row.contains("NodePort") && web_row.contains("80:3") && web_row.contains("/TCP"),
        "{web_row}"
    );
    assert!(
        svc.lines()
            .any(|l| l.starts_with("kubernetes ") && l.contains("10.96.0.1")),
        "{svc}"
    );

    let wide = cp.kubectl_ok(&["get", "deploy", "-o", "wide"]);
    assert_eq!(
        header(&wide),
        [
            "NAME",
            "READY",
            "UP-TO-DATE",
            "AVAILABLE",
            "AGE",
            "CONTAINERS",
            "IMAGES",
            "SELECTOR"
        ]
    );
    let yaml = cp.kubectl_ok(&["get", "svc", "web", "-o", "yaml"]);
    let svc_obj: serde_yaml::Value = serde_yaml::from_str(&yaml).unwrap();
    let node_port = svc_obj["spec"]["ports"][0]["nodePort"].as_u64().unwrap();
    assert!((30000..=32767).contains(&node_port));
    assert_eq!(
        svc_obj["spec"]["ports"][0]["targetPort"].as_str(),
        Some("http")
    );
    let json: serde_json::Value =
        serde_json::from_str(&cp.kubectl_ok(&["get", "cm", "web-config", "-o", "json"])).unwrap();
    assert_eq!(json["data"]["greeting"], "Hello from ferry");

    // Apply after an edit goes through the strategic-merge-patch path.
    let edited = MANIFEST
        .replace("replicas: 2", "replicas: 4")
        .replace("Hello from ferry", "Hello again");
    std::fs::write(&manifest, &edited).unwrap();
    let out = cp.kubectl_ok(&["apply", "-f", path]);
    assert!(
        out.contains("deployment.apps/web configured") && out.contains("service/web unchanged"),
        "{out}"
    );
    assert_eq!(
        cp.kubectl_ok(&["get", "deploy", "web", "-o", "jsonpath={.spec.replicas}"]),
        "4"
    );
    assert_eq!(
        cp.kubectl_ok(&[
            "get",
            "deploy",
            "web",
            "-o",
            "jsonpath={.metadata.generation}"
        ]),
        "2"
    );
    assert_eq!(
        cp.kubectl_ok(&["get", "cm", "web-config", "-o", "jsonpath={.data.greeting}"]),
        "Hello again"
    );
    // The node port survives the re-apply.
    let again: serde_yaml::Value =
        serde_yaml::from_str(&cp.kubectl_ok(&["get", "svc", "web", "-o", "yaml"])).unwrap();
    assert_eq!(
        again["spec"]["ports"][0]["nodePort"].as_u64(),
        Some(node_port)
    );

    cp.kubectl_ok(&["label", "svc", "web", "tier=front"]);
    cp.kubectl_ok(&["annotate", "svc", "web", "owner=ferry-team"]);
    let labelled = cp.kubectl_ok(&["get", "svc", "-l", "tier=front", "-o", "name"]);
    assert_eq!(labelled.trim(), "service/web");
    assert_eq!(
        cp.kubectl_ok(&[
            "get",
            "svc",
            "web",
            "-o",
            "jsonpath={.metadata.annotations.owner}"
        ]),
        "ferry-team"
    );
    assert_eq!(
        cp.kubectl_ok(&["get", "svc", "-l", "tier!=front", "-o", "name"])
            .trim(),
        "service/kubernetes"
    );

    let out = cp.kubectl_ok(&["scale", "deploy", "web", "--replicas=3"]);
    assert!(out.contains("scaled"), "{out}");
    assert_eq!(
        cp.kubectl_ok(&["get", "deploy", "web", "-o", "jsonpath={.spec.replicas}"]),
        "3"
    );

    let out = cp.kubectl_ok(&["delete", "-f", path]);
    assert!(out.contains("service \"web\" deleted"), "{out}");
    let left = cp.kubectl_ok(&["get", "svc,deploy,cm", "-o", "name"]);
    assert!(!left.contains("web"), "{left}");
    // The node port was released: a new service may take it.
    let reuse = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: again\nspec:\n  type: NodePort\n  ports:\n  - port: 80\n    nodePort: {node_port}\n"
    );
    let out = cp.kubectl_stdin(&["apply", "-f", "-"], Some(&reuse));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn namespaces_scope_objects_and_their_deletion_removes_them() {
    let cp = ControlPlane::start();
    cp.kubectl_ok(&["create", "namespace", "team-a"]);
    let ns = cp.kubectl_ok(&["get", "ns"]);
    assert_eq!(header(&ns), ["NAME", "STATUS", "AGE"]);
    assert!(
        ns.lines()
            .any(|l| l.starts_with("team-a ") && l.contains("Active")),
        "{ns}"
    );
    cp.kubectl_ok(&[
        "-n",
        "team-a",
        "create",
        "configmap",
        "settings",
        "--from-literal=a=1",
    ]);
    assert!(cp
        .kubectl_ok(&["get", "cm", "-o", "name"])
        .trim()
        .is_empty());
    assert_eq!(
        cp.kubectl_ok(&["-n", "team-a", "get", "cm", "-o", "name"])
            .trim(),
        "configmap/settings"
    );
    let all = cp.kubectl_ok(&["get", "cm", "-A"]);
    assert_eq!(header(&all)[0], "NAMESPACE");
    assert!(all.contains("team-a") && all.contains("settings"), "{all}");

    let out = cp.kubectl(&["delete", "ns", "default"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("may not be deleted"));

    cp.kubectl_ok(&["delete", "ns", "team-a", "--wait=true", "--timeout=20s"]);
    let out = cp.kubectl(&["-n", "team-a", "get", "cm", "settings"]);
    assert!(!out.status.success());
    assert!(!cp
        .kubectl_ok(&["get", "ns", "-o", "name"])
        .contains("team-a"));
}

#[test]
fn get_watch_receives_events() {
    let cp = ControlPlane::start();
    let mut watch = Command::new("kubectl")
        .env("KUBECONFIG", cp.kubeconfig())
        .env("HOME", cp.dir.path())
        .args(["get", "cm", "-w", "--request-timeout=30s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = watch.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Give the watch a moment to be established, then make a change.
    std::thread::sleep(Duration::from_millis(1500));
    let cm = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: watched\ndata:\n  k: v\n";
    let out = cp.kubectl_stdin(&["apply", "-f", "-"], Some(cm));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            if line.starts_with("watched ") {
                seen.push(line);
                break;
            }
            seen.push(line);
        }
    }
    let _ = watch.kill();
    let _ = watch.wait();
    assert!(
        seen.iter()
            .any(|l| l.starts_with("watched ") && l.contains(" 1 ")),
        "{seen:?}"
    );
}

const POD_AND_NODE: &str = "apiVersion: v1
kind: Node
metadata:
  name: node-a
  labels:
    node-role.kubernetes.io/worker: \"\"
status:
  conditions:
  - type: Ready
    status: \"True\"
  addresses:
  - type: InternalIP
    address: 192.0.2.10
---
apiVersion: v1
kind: Pod
metadata:
  name: runner
  finalizers: [\"ferry.dev/test\"]
spec:
  nodeName: node-a
  containers:
  - name: app
    image: app:1
    command: [\"sleep\", \"1000\"]
status:
  phase: Running
  podIP: 10.244.1.5
";

#[test]
fn pods_nodes_graceful_deletion_finalizers_and_deletecollection() {
    let cp = ControlPlane::start();
    let out = cp.kubectl_stdin(&["apply", "-f", "-"], Some(POD_AND_NODE));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Status given at creation is kept for pods and nodes (as kubelet registers them).
    let nodes = cp.kubectl_ok(&["get", "nodes"]);
    assert_eq!(
        header(&nodes),
        ["NAME", "STATUS", "ROLES", "AGE", "VERSION"]
    );
    assert!(
        nodes.contains("node-a") && nodes.contains("Ready") && nodes.contains("worker"),
        "{nodes}"
    );
    let pods = cp.kubectl_ok(&["get", "pods", "-o", "wide"]);
    let cols = header(&pods);
    assert_eq!(&cols[..5], ["NAME", "READY", "STATUS", "RESTARTS", "AGE"]);
    assert!(
        cols.contains(&"IP".to_string()) && cols.contains(&"NODE".to_string()),
        "{pods}"
    );
    assert!(
        pods.contains("10.244.1.5") && pods.contains("node-a"),
        "{pods}"
    );

    // A running pod is deleted gracefully: it stays, marked, until its node agent
    // (or a forced delete) removes it; the finalizer holds it after that too.
    cp.kubectl_ok(&["delete", "pod", "runner", "--wait=false"]);
    let marked = cp.kubectl_ok(&[
        "get",
        "pod",
        "runner",
        "-o",
        "jsonpath={.metadata.deletionTimestamp} {.metadata.deletionGracePeriodSeconds}",
    ]);
    assert!(marked.ends_with(" 30"), "{marked}");
    assert!(cp.kubectl_ok(&["get", "pods"]).contains("Terminating"));
    cp.kubectl_ok(&[
        "delete",
        "pod",
        "runner",
        "--grace-period=0",
        "--force",
        "--wait=false",
    ]);
    assert!(
        cp.kubectl(&["get", "pod", "runner"]).status.success(),
        "the finalizer keeps it"
    );
    cp.kubectl_ok(&[
        "patch",
        "pod",
        "runner",
        "--type=json",
        "-p",
        "[{\"op\":\"remove\",\"path\":\"/metadata/finalizers\"}]",
    ]);
    let gone = Instant::now() + Duration::from_secs(5);
    while cp.kubectl(&["get", "pod", "runner"]).status.success() {
        assert!(
            Instant::now() < gone,
            "pod still there after its last finalizer went"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // deletecollection with a label selector removes exactly the selected objects.
    for (name, team) in [("a", "red"), ("b", "red"), ("c", "blue")] {
        let cm = format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  labels:\n    team: {team}\n");
        assert!(cp
            .kubectl_stdin(&["apply", "-f", "-"], Some(&cm))
            .status
            .success());
    }
    let (code, body) = cp.curl(
        "DELETE",
        "/api/v1/namespaces/default/configmaps?labelSelector=team%3Dred",
        "application/json",
        None,
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        cp.kubectl_ok(&["get", "cm", "-o", "name"]).trim(),
        "configmap/c"
    );
}
