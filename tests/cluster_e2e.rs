//! A whole cluster on one machine (`ferry cluster up`), driven with kubectl
//! like a user would: the seed demo (nginx -> app -> redis), scaling,
//! scheduling by labels and taints, and a node going away.

mod support;

use std::process::Command;
use std::time::Duration;

use support::cluster::Cluster;

fn visit_count(answer: &str) -> Option<u64> {
    answer
        .split("visited ")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn deploy_demo(c: &Cluster) {
    c.deploy(
        ("app-code", "examples/demo/app.py"),
        "examples/demo/three-tier.yaml",
        &["deploy/redis", "deploy/app", "deploy/nginx"],
    );
}

#[test]
fn demo_scaling_scheduling_and_cleanup() {
    let Some(c) = Cluster::up(3) else { return };
    deploy_demo(&c);
    let svc = c.kubectl_ok(&["get", "svc"]);
    assert!(
        svc.starts_with("NAME") && svc.contains("CLUSTER-IP") && svc.contains("80:30080/TCP"),
        "{svc}"
    );
    let pods = c.kubectl_ok(&["get", "pods", "-o", "wide"]);
    assert!(
        pods.lines().next().unwrap().contains("IP") && pods.contains("NODE"),
        "{pods}"
    );

    // The counter goes up, through the NodePort of any node.
    let node_ip = "198.18.0.11";
    let url = format!("http://{node_ip}:30080/");
    c.wait_for("the NodePort to answer", Duration::from_secs(30), || {
        c.visit(&url).is_some_and(|a| a.starts_with("Hello World"))
    });
    let first = visit_count(&c.visit(&url).unwrap()).unwrap();
    let second = visit_count(&c.visit("http://198.18.0.13:30080/").unwrap()).unwrap();
    assert!(second > first, "{first} then {second}");

    // Scale the app to 3: answers come from 3 pod IPs on different nodes.
    c.kubectl_ok(&["scale", "deploy/app", "--replicas=3"]);
    c.kubectl_ok(&["rollout", "status", "deploy/app", "--timeout=120s"]);
    let app_pods = c.pods("app=app");
    let nodes: std::collections::HashSet<_> = app_pods.iter().map(|p| p.1.clone()).collect();
    assert_eq!(nodes.len(), 3, "spread over the nodes: {app_pods:?}");
    let mut servers = std::collections::HashSet::new();
    for _ in 0..60 {
        if let Some(a) = c.visit(&url) {
            servers.extend(a.split_whitespace().nth(3).map(str::to_string));
        }
        if servers.len() == 3 {
            break;
        }
    }
    assert_eq!(servers.len(), 3, "answers from {servers:?}");

    // Label a node and give redis a nodeSelector: redis moves there.
    let target = format!("{}-node-2", c.name);
    c.kubectl_ok(&["label", "node", &target, "storage=ssd"]);
    c.kubectl_ok(&[
        "patch",
        "deploy",
        "redis",
        "-p",
        r#"{"spec":{"template":{"spec":{"nodeSelector":{"storage":"ssd"}}}}}"#,
    ]);
    c.kubectl_ok(&["rollout", "status", "deploy/redis", "--timeout=120s"]);
    c.wait_for(
        "redis on the labelled node",
        Duration::from_secs(60),
        || {
            let pods = c.pods("app=redis");
            pods.len() == 1 && pods[0].1 == target
        },
    );

    // Taint a node NoSchedule: new pods avoid it; untainted, it is used again.
    let tainted = format!("{}-node-3", c.name);
    c.kubectl_ok(&["taint", "node", &tainted, "dedicated=db:NoSchedule"]);
    c.kubectl_ok(&["scale", "deploy/app", "--replicas=6"]);
    c.kubectl_ok(&["rollout", "status", "deploy/app", "--timeout=120s"]);
    let on_tainted = c.pods("app=app").iter().filter(|p| p.1 == tainted).count();
    assert_eq!(on_tainted, 1, "only the pod that was already there");
    c.kubectl_ok(&["taint", "node", &tainted, "dedicated=db:NoSchedule-"]);
    c.kubectl_ok(&["scale", "deploy/app", "--replicas=9"]);
    c.kubectl_ok(&["rollout", "status", "deploy/app", "--timeout=120s"]);
    assert!(c.pods("app=app").iter().filter(|p| p.1 == tainted).count() > 1);

    // delete -f removes everything, the node's rules included.
    c.kubectl_ok(&[
        "delete",
        "-f",
        &format!(
            "{}/examples/demo/three-tier.yaml",
            env!("CARGO_MANIFEST_DIR")
        ),
        "--wait=true",
    ]);
    c.wait_for("the demo's pods to go", Duration::from_secs(60), || {
        c.pods("app in (app,nginx,redis)").is_empty()
    });
    let rules = Command::new("ip")
        .args([
            "netns",
            "exec",
            &c.netns("node-1"),
            "nft",
            "list",
            "table",
            "ip",
            "ferry",
        ])
        .output()
        .unwrap();
    let rules = String::from_utf8_lossy(&rules.stdout);
    assert!(
        !rules.contains("default/nginx") && !rules.contains("10.96.100.20"),
        "{rules}"
    );
    assert!(c.visit(&url).is_none(), "the NodePort is gone");
}

#[test]
fn cluster_down_leaves_nothing_behind() {
    let Some(c) = Cluster::up(2) else { return };
    deploy_demo(&c);
    let out = Command::new(support::ferry_bin())
        .args(["cluster", "down", "--state-dir"])
        .arg(c.state.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let namespaces = String::from_utf8(
        Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(
        !namespaces.contains(&format!("{}-", c.name)),
        "{namespaces}"
    );
    assert!(!c.state.path().join("cluster.json").exists());
    let ps = String::from_utf8(
        Command::new("ps")
            .args(["-eo", "args"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(
        !ps.contains(&c.state.path().display().to_string()),
        "a process of the cluster survived:\n{ps}"
    );
}

#[test]
fn a_dead_node_agent_makes_its_node_not_ready_and_its_pods_move() {
    let Some(c) = Cluster::up(3) else { return };
    deploy_demo(&c);
    c.kubectl_ok(&["scale", "deploy/app", "--replicas=3"]);
    c.kubectl_ok(&["rollout", "status", "deploy/app", "--timeout=120s"]);
    let victim = format!("{}-node-3", c.name);
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(c.state.path().join("cluster.json")).unwrap(),
    )
    .unwrap();
    let pid = state["pids"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p[0] == format!("node {victim}"))
        .and_then(|p| p[1].as_u64())
        .expect("the agent's pid is recorded");
    Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();

    c.wait_for("the node to turn NotReady", Duration::from_secs(90), || {
        c.kubectl_ok(&["get", "node", &victim]).contains("NotReady")
    });
    c.wait_for(
        "the app's pods to be replaced on the other nodes",
        Duration::from_secs(150),
        || {
            let running: Vec<_> = c
                .pods("app=app")
                .into_iter()
                .filter(|p| p.1 != victim)
                .collect();
            let ready = c.kubectl_ok(&[
                "get",
                "deploy",
                "app",
                "-o",
                "jsonpath={.status.readyReplicas}",
            ]);
            running.len() >= 3 && ready.trim().parse::<usize>().unwrap_or(0) >= 3
        },
    );
    // The service kept answering through a live node.
    for _ in 0..5 {
        let answer = c
            .visit("http://198.18.0.11:30080/")
            .expect("the service answers");
        assert!(answer.starts_with("Hello World"), "{answer}");
    }
}
