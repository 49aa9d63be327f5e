//! End to end through the product path: `ferry controlplane` (in process) in
//! the fabric namespace, `ferry overlay`'s `run()` in each node namespace,
//! Nodes created through the API. Checks the published annotations, pod
//! traffic, and that deleting / re-creating a Node moves entries within 1 s
//! through the watch. Needs root.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use common::*;
use ferry_overlay::node::{Backend, ANN_BACKEND_DATA, ANN_BACKEND_TYPE, ANN_PUBLIC_IP};
use ferry_testkit::{http_get, require_root, tcp_request, wait_for, Netns};
use k8s_openapi::api::core::v1::Node;
use kube::api::{DeleteParams, PostParams};
use kube::Api;

#[derive(Parser)]
struct Cp {
    #[command(flatten)]
    args: ferry_controlplane::ControlPlaneArgs,
}

#[derive(Parser)]
struct Ov {
    #[command(flatten)]
    args: ferry_overlay::OverlayArgs,
}

/// Runs `fut` on a current-thread runtime on a thread inside `ns` until the guard drops.
struct Task {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Task {
    fn spawn<F>(ns: &Netns, make: impl FnOnce() -> F + Send + 'static) -> Task
    where
        F: std::future::Future<Output = anyhow::Result<()>>,
    {
        let path = netns_path(ns);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let handle = std::thread::spawn(move || {
            ferry_overlay::netns::enter(&path).unwrap();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                tokio::select! {
                    r = make() => if let Err(e) = r { eprintln!("task failed: {e:#}") },
                    _ = rx => {}
                }
            });
        });
        Task {
            stop: Some(tx),
            handle: Some(handle),
        }
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        let _ = self.stop.take().map(|s| s.send(()));
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn node_json(name: &str, cidr: &str) -> Node {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name},
        "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
    }))
    .unwrap()
}

/// Runs an API call from inside the fabric namespace.
fn api<R: Send + 'static>(
    fabric: &Netns,
    kubeconfig: PathBuf,
    f: impl FnOnce(
            Api<Node>,
        )
            -> std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<R>> + Send>>
        + Send
        + 'static,
) -> anyhow::Result<R> {
    fabric.run(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let kc = kube::config::Kubeconfig::read_from(&kubeconfig)?;
            let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
            let client = kube::Client::try_from(cfg)?;
            f(Api::all(client)).await
        })
    })
}

#[test]
fn overlay_run_against_ferry_controlplane() {
    if !require_root() {
        return;
    }
    let c = Cluster::topology(2, Backend::Vxlan).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("admin.kubeconfig");
    let cp_args = Cp::try_parse_from([
        "cp",
        "--data-dir",
        &dir.path().join("data").display().to_string(),
        "--listen",
        &format!("{FABRIC_IP}:6443"),
        "--kubeconfig-out",
        &kubeconfig.display().to_string(),
        "--advertise-address",
        FABRIC_IP,
        "--tls-san",
        FABRIC_IP,
    ])
    .unwrap()
    .args;
    let _cp = Task::spawn(&c.fabric, move || ferry_controlplane::run(cp_args));
    wait_for(Duration::from_secs(30), || {
        kubeconfig.exists().then_some(())
    })
    .expect("control plane wrote its kubeconfig");
    std::thread::sleep(Duration::from_millis(300));

    for (i, n) in c.nodes.iter().enumerate() {
        let (name, cidr) = (n.name.clone(), format!("10.244.{}.0/24", i + 1));
        api(&c.fabric, kubeconfig.clone(), move |api| {
            Box::pin(async move {
                api.create(&PostParams::default(), &node_json(&name, &cidr))
                    .await?;
                Ok(())
            })
        })
        .unwrap();
    }
    let mut agents = Vec::new();
    for n in &c.nodes {
        let args = Ov::try_parse_from([
            "ov",
            "--kubeconfig",
            &kubeconfig.display().to_string(),
            "--node-name",
            &n.name,
            "--iface",
            "eth0",
            "--subnet-file",
            &n.dir.path().join("subnet.env").display().to_string(),
            "--resync-seconds",
            "1",
        ])
        .unwrap()
        .args;
        agents.push(Task::spawn(&n.ns, move || ferry_overlay::run(args)));
    }
    // Both nodes publish flannel's annotations and get routes to each other.
    let route_to =
        |n: &TestNode, cidr: &str| n.ns.ip(&["route"]).unwrap_or_default().contains(cidr);
    wait_for(Duration::from_secs(20), || {
        (route_to(&c.nodes[0], "10.244.2.0/24 via 10.244.2.0 dev flannel.1")
            && route_to(&c.nodes[1], "10.244.1.0/24 via 10.244.1.0 dev flannel.1"))
        .then_some(())
    })
    .expect("routes between the nodes");
    let nodes = api(&c.fabric, kubeconfig.clone(), |api| {
        Box::pin(async move { Ok(api.list(&Default::default()).await?.items) })
    })
    .unwrap();
    for n in &nodes {
        let ann = n.metadata.annotations.clone().unwrap_or_default();
        assert_eq!(ann.get(ANN_BACKEND_TYPE).map(String::as_str), Some("vxlan"));
        assert!(ann
            .get(ANN_PUBLIC_IP)
            .is_some_and(|ip| ip.starts_with("198.18.0.")));
        let data: serde_json::Value = serde_json::from_str(&ann[ANN_BACKEND_DATA]).unwrap();
        assert_eq!(data["VNI"], 1);
    }

    // Pods (the pod API, using the subnet.env `run` wrote).
    let pod = |node: &TestNode, tag: &str| {
        let env =
            ferry_overlay::subnet::SubnetEnv::read(&node.dir.path().join("subnet.env")).unwrap();
        let pn = ferry_overlay::PodNetwork::new(ferry_overlay::PodNetworkConfig {
            bridge: "cni0".into(),
            env,
            ipam_dir: node.dir.path().join("ipam"),
        });
        let ns = Netns::new(tag).unwrap();
        let p = netns_path(&ns);
        let a = node.ns.run(move || pn.add(&p, "c1", "eth0")).unwrap();
        (ns, a.address.addr())
    };
    let (p1, ip1) = pod(&c.nodes[0], "p1");
    let (p2, ip2) = pod(&c.nodes[1], "p2");
    let _s = p2.serve_tcp("0.0.0.0:8080", "p2").unwrap();
    let dst = format!("{ip2}:8080");
    let got = p1
        .run(move || Ok(tcp_request(&dst, Duration::from_secs(3))?))
        .unwrap();
    assert_eq!(got, format!("p2 {ip1}"));

    // /healthz (on the node's address, as a probe asks) and /metrics: the pod
    // packets took the fast path, VXLAN in eBPF.
    let (code, health) = c.nodes[0]
        .ns
        .run(|| {
            Ok(http_get(
                "198.18.0.1:10263",
                "/healthz",
                Duration::from_secs(3),
            )?)
        })
        .unwrap();
    assert_eq!((code, health.as_str()), (200, "ok\n"));
    let (code, metrics) = c.nodes[0]
        .ns
        .run(|| {
            Ok(http_get(
                "127.0.0.1:10262",
                "/metrics",
                Duration::from_secs(3),
            )?)
        })
        .unwrap();
    assert_eq!(code, 200);
    assert!(metrics.contains("ferry_overlay_peers 1\n"), "{metrics}");
    let encapsulated = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix(
                "ferry_overlay_fastpath_packets_total{program=\"from_pod\",action=\"encapsulated\"} ",
            )
        })
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no encapsulated counter in {metrics}"));
    assert!(encapsulated > 0, "{metrics}");

    // flannel.1 deleted on node-1: its agent re-creates it at the next resync
    // (with the fast path on it) and publishes the new VtepMAC; node-2 follows.
    let vtep_mac = || {
        c.nodes[0]
            .ns
            .exec(&["cat", "/sys/class/net/flannel.1/address"])
            .map(|m| m.trim().to_string())
            .ok()
    };
    let old_mac = vtep_mac().unwrap();
    c.nodes[0].ns.ip(&["link", "del", "flannel.1"]).unwrap();
    wait_for(Duration::from_secs(10), || {
        let mac = vtep_mac().filter(|m| *m != old_mac)?;
        let neigh = c.nodes[1]
            .ns
            .ip(&["neigh", "show", "dev", "flannel.1"])
            .ok()?;
        neigh.contains(&mac).then_some(())
    })
    .expect("node-2 learns node-1's new VtepMAC");
    let filters = c.nodes[0]
        .ns
        .exec(&["tc", "filter", "show", "dev", "flannel.1", "ingress"])
        .unwrap();
    assert!(filters.contains("to_pod"), "{filters}");
    let dst = format!("{ip2}:8080");
    let got = p1
        .run(move || Ok(tcp_request(&dst, Duration::from_secs(3))?))
        .unwrap();
    assert_eq!(got, format!("p2 {ip1}"));

    // Delete node-2 through the API: node-1's entries go within 1 s (watch included).
    let t = Instant::now();
    api(&c.fabric, kubeconfig.clone(), |api| {
        Box::pin(async move {
            api.delete("node-2", &DeleteParams::default()).await?;
            Ok(())
        })
    })
    .unwrap();
    wait_for(Duration::from_secs(1), || {
        (!route_to(&c.nodes[0], "10.244.2.0/24")).then_some(())
    })
    .unwrap_or_else(|| panic!("route to node-2 still there after {:?}", t.elapsed()));
    eprintln!("node deletion reached node-1's routes in {:?}", t.elapsed());

    // Re-create it: the route is back within 1 s of node-2's annotations landing.
    api(&c.fabric, kubeconfig.clone(), |api| {
        Box::pin(async move {
            api.create(
                &PostParams::default(),
                &node_json("node-2", "10.244.2.0/24"),
            )
            .await?;
            Ok(())
        })
    })
    .unwrap();
    wait_for(Duration::from_secs(15), || {
        route_to(&c.nodes[0], "10.244.2.0/24 via 10.244.2.0").then_some(())
    })
    .expect("route to re-created node-2");
    drop(agents);
}
