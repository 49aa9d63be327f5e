//! Root tests of the node agent against a real `ferry controlplane`, all
//! inside a test-made network namespace ("the node", with a veth interface
//! holding its address and the pod bridge the pod network makes there).
//! Pods get their own namespaces (removed by the agent, and by the guard
//! below if a test fails). Nothing touches the root namespace's interfaces.
//!
//! The control plane binary is `target/debug/ferry` (`cargo build --bin ferry`);
//! without it the test is skipped loudly (and fails when CI=true).

use std::future::Future;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_node::runtime;
use ferry_testkit::Netns;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Event, Node, Pod};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Client};
use serde_json::{json, Value};

const NODE_IP: &str = "10.99.0.2";
const NODE: &str = "node-a";

fn ferry_bin() -> Option<PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let p = target.join("debug/ferry");
    p.exists().then_some(p)
}

/// The control plane, in the node's namespace; killed on drop.
struct ControlPlane {
    child: Child,
    dir: tempfile::TempDir,
}

impl ControlPlane {
    /// Starts it; tries again once if it exits early (e.g. the binary was being rebuilt).
    fn start(ns: &Netns, bin: &Path) -> ControlPlane {
        match Self::try_start(ns, bin) {
            Ok(cp) => cp,
            Err(why) => {
                eprintln!("control plane did not start ({why}); trying again");
                std::thread::sleep(Duration::from_secs(3));
                Self::try_start(ns, bin)
                    .unwrap_or_else(|why| panic!("control plane did not start: {why}"))
            }
        }
    }

    fn try_start(ns: &Netns, bin: &Path) -> Result<ControlPlane, String> {
        let dir = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(dir.path().join("controlplane.log")).unwrap();
        let child = ns
            .command(bin.to_str().unwrap())
            .arg("controlplane")
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--listen")
            .arg(format!("{NODE_IP}:6443"))
            .arg("--kubeconfig-out")
            .arg(dir.path().join("admin.kubeconfig"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| e.to_string())?;
        let mut cp = ControlPlane { child, dir };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !cp.kubeconfig().exists() {
            if let Ok(Some(st)) = cp.child.try_wait() {
                return Err(format!("exited with {st}: {}", cp.log()));
            }
            if Instant::now() > deadline {
                return Err(format!("not ready in 60 s: {}", cp.log()));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(cp)
    }
    fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("admin.kubeconfig")
    }
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("controlplane.log")).unwrap_or_default()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A node agent on its own thread and runtime inside the node namespace;
/// stopping it drops every task it had (its processes keep running).
struct Agent {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Agent {
    fn start(ns: &Netns, args: ferry_node::NodeArgs) -> Agent {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let thread = ns.spawn_thread(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(ferry_node::run_until(args, async {
                let _ = rx.await;
            }))?;
            rt.shutdown_timeout(Duration::from_secs(2));
            Ok(())
        });
        let thread = std::thread::spawn(move || {
            if let Ok(Err(e)) = thread.join() {
                eprintln!("agent failed: {e:#}");
            }
        });
        Agent {
            stop: Some(tx),
            thread: Some(thread),
        }
    }
    fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Removes the pod namespaces (and kills their processes) of every pod a test made.
#[derive(Clone, Default)]
struct PodNsGuard(Arc<Mutex<Vec<String>>>);

impl Drop for PodNsGuard {
    fn drop(&mut self) {
        if Arc::strong_count(&self.0) > 1 {
            return;
        }
        for uid in self.0.lock().unwrap().iter() {
            let name = runtime::netns_name(uid);
            if let Ok(out) = Command::new("ip").args(["netns", "pids", &name]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    if let Ok(pid) = pid.parse::<u32>() {
                        runtime::signal_pid(pid, libc_sigkill());
                    }
                }
            }
            runtime::remove_netns(&Path::new(runtime::NETNS_DIR).join(name));
        }
    }
}

fn libc_sigkill() -> i32 {
    9
}

/// Polls pod `name` until `pred` holds (None: the pod is absent); returns its last JSON.
async fn wait_pod(
    api: &Api<Pod>,
    name: &str,
    what: &str,
    limit: Duration,
    pred: impl Fn(Option<&Value>) -> bool,
) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let p = pod_json(api, name).await;
        if pred(p.as_ref()) {
            return p.unwrap_or(Value::Null);
        }
        if Instant::now() >= deadline {
            let events: Api<Event> = Api::namespaced(api.clone().into_client(), "default");
            let evs: Vec<String> = events
                .list(&ListParams::default())
                .await
                .map(|l| l.items)
                .unwrap_or_default()
                .into_iter()
                .filter(|e| e.involved_object.name.as_deref() == Some(name))
                .map(|e| {
                    format!(
                        "{} {}: {}",
                        e.type_.unwrap_or_default(),
                        e.reason.unwrap_or_default(),
                        e.message.unwrap_or_default()
                    )
                })
                .collect();
            panic!(
                "timed out waiting for {what}; last: {}\nevents:\n{}",
                p.map(|p| p["status"].to_string()).unwrap_or_default(),
                evs.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_until<F: Future<Output = bool>>(
    what: &str,
    limit: Duration,
    mut f: impl FnMut() -> F,
) {
    let deadline = Instant::now() + limit;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn client(kubeconfig: &Path) -> Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let kc = kube::config::Kubeconfig::read_from(kubeconfig).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .unwrap();
    Client::try_from(config).unwrap()
}

async fn pod_json(api: &Api<Pod>, name: &str) -> Option<Value> {
    api.get_opt(name)
        .await
        .ok()
        .flatten()
        .map(|p| serde_json::to_value(p).unwrap())
}

fn condition(p: &Value, kind: &str) -> String {
    p.pointer("/status/conditions")
        .and_then(Value::as_array)
        .and_then(|cs| cs.iter().find(|c| c["type"] == kind))
        .and_then(|c| c["status"].as_str())
        .unwrap_or("")
        .to_string()
}

fn cstatus(p: &Value) -> Value {
    p.pointer("/status/containerStatuses/0")
        .cloned()
        .unwrap_or(Value::Null)
}

async fn create_pod(api: &Api<Pod>, guard: &PodNsGuard, spec: Value) -> String {
    let mut v = spec;
    v["apiVersion"] = json!("v1");
    v["kind"] = json!("Pod");
    v["spec"]["nodeName"] = json!(NODE);
    for c in v["spec"]["containers"].as_array_mut().unwrap() {
        if c.get("image").is_none() {
            c["image"] = json!("none");
        }
    }
    let pod: Pod = serde_json::from_value(v).unwrap();
    let created = api.create(&PostParams::default(), &pod).await.unwrap();
    let uid = created.metadata.uid.clone().unwrap();
    guard.0.lock().unwrap().push(uid.clone());
    uid
}

async fn http(addr: &str, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .ok()?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.ok()?;
        let text = String::from_utf8_lossy(&out).into_owned();
        let code = text.split_whitespace().nth(1)?.parse().ok()?;
        Some((
            code,
            text.split_once("\r\n\r\n")
                .map(|x| x.1.to_string())
                .unwrap_or_default(),
        ))
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .ok()
        .flatten()
}

fn subnet_env() -> &'static str {
    "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n"
}

fn phase(p: Option<&Value>) -> &str {
    p.and_then(|p| p.pointer("/status/phase"))
        .and_then(Value::as_str)
        .unwrap_or("")
}

fn cond(p: Option<&Value>, kind: &str) -> String {
    p.map(|p| condition(p, kind)).unwrap_or_default()
}

fn cs(p: Option<&Value>) -> Value {
    p.map(cstatus).unwrap_or(Value::Null)
}

const T: Duration = Duration::from_secs(30);

#[test]
fn node_agent_runs_pods_end_to_end() {
    if !ferry_testkit::require_root() {
        return;
    }
    let Some(bin) = ferry_bin() else {
        let msg = "NODE AGENT TEST SKIPPED: target/debug/ferry missing (cargo build --bin ferry)";
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{msg}, and CI=true"
        );
        eprintln!("\n!!! {msg}\n");
        return;
    };
    let ns = Netns::new("node").unwrap();
    // The node's "uplink": one end of a veth pair whose both ends stay in the namespace.
    ns.ip(&[
        "link",
        "add",
        "uplink",
        "type",
        "veth",
        "peer",
        "name",
        "uplink-peer",
    ])
    .unwrap();
    ns.add_addr("uplink", &format!("{NODE_IP}/24")).unwrap();
    ns.link_up("uplink").unwrap();
    ns.link_up("uplink-peer").unwrap();
    let cp = ControlPlane::start(&ns, &bin);
    let work = tempfile::tempdir().unwrap();
    let data_dir = work.path().join("node");
    let subnet_file = work.path().join("subnet.env");
    let www = work.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    let flags = work.path().join("flags");
    std::fs::create_dir_all(&flags).unwrap();
    let mut args = ferry_node::NodeArgs::new(
        cp.kubeconfig(),
        NODE,
        NODE_IP.parse::<IpAddr>().unwrap(),
        data_dir.clone(),
    );
    args.subnet_file = subnet_file.clone();
    args.crash_backoff_ms = 1000;
    // Declared before the agents, so it runs after they stopped.
    let guard = PodNsGuard::default();
    let guard2 = guard.clone();
    let mut agent = Agent::start(&ns, args.clone());

    let kubeconfig = cp.kubeconfig();
    let result = ferry_testkit::run_in_netns(ns.name(), move || {
        let guard = guard2;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let out = rt.block_on(async {
            let c = client(&kubeconfig).await;
            let nodes: Api<Node> = Api::all(c.clone());
            let pods: Api<Pod> = Api::namespaced(c.clone(), "default");
            let cms: Api<ConfigMap> = Api::namespaced(c.clone(), "default");
            let leases: Api<Lease> = Api::namespaced(c.clone(), "kube-node-lease");

            // Registration: addresses, capacity, nodeInfo, endpoint, Ready, lease.
            wait_until("node registration", T, || {
                let nodes = nodes.clone();
                async move {
                    nodes.get_opt(NODE).await.ok().flatten().is_some_and(|n| {
                        condition(&serde_json::to_value(&n).unwrap(), "Ready") == "True"
                    })
                }
            })
            .await;
            let node = serde_json::to_value(nodes.get(NODE).await.unwrap()).unwrap();
            assert_eq!(node["status"]["addresses"][0], json!({"type": "InternalIP", "address": NODE_IP}));
            assert_eq!(node["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"], 10250);
            assert_eq!(node["status"]["nodeInfo"]["kubeletVersion"], "v1.32.0-ferry");
            assert_eq!(node["status"]["nodeInfo"]["containerRuntimeVersion"], "ferry://0.1");
            assert_eq!(node["status"]["allocatable"]["pods"], "110");
            wait_until("node lease", T, || {
                let leases = leases.clone();
                async move { leases.get_opt(NODE).await.ok().flatten().is_some() }
            })
            .await;
            let lease = leases.get(NODE).await.unwrap();
            assert_eq!(lease.spec.as_ref().unwrap().holder_identity.as_deref(), Some(NODE));
            assert_eq!(lease.spec.as_ref().unwrap().lease_duration_seconds, Some(40));

            // No pod network yet: a hostNetwork pod runs, a pod-network pod waits with a reason.
            create_pod(&pods, &guard, json!({"metadata": {"name": "hostnet"}, "spec": {"hostNetwork": true,
                "containers": [{"name": "c", "image": "none", "command": ["sh", "-c", "echo host $(hostname); exec sleep 600"]}]}})).await;
            let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "web-cfg"},
                "data": {"index.html": "hello from configmap\n", "greeting": "hi"}})).unwrap();
            cms.create(&PostParams::default(), &cm).await.unwrap();
            create_pod(&pods, &guard, json!({"metadata": {"name": "web"}, "spec": {
                "terminationGracePeriodSeconds": 5,
                "volumes": [{"name": "www", "configMap": {"name": "web-cfg"}}],
                "containers": [{"name": "web", "image": "python", "workingDir": "/",
                    "command": ["sh", "-c"],
                    "args": ["echo greeting=$GREETING ip=$MY_IP name=$(MY_NAME) self=`getent hosts web`; exec python3 -m http.server 8080 --bind 0.0.0.0 --directory $(DIR)"],
                    "env": [
                        {"name": "GREETING", "valueFrom": {"configMapKeyRef": {"name": "web-cfg", "key": "greeting"}}},
                        {"name": "MY_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                        {"name": "MY_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        {"name": "DIR", "value": www.to_str().unwrap()}],
                    "ports": [{"name": "http", "containerPort": 8080}],
                    "volumeMounts": [{"name": "www", "mountPath": www.to_str().unwrap()}],
                    "readinessProbe": {"httpGet": {"port": "http", "path": "/index.html"}, "periodSeconds": 1},
                    "livenessProbe": {"tcpSocket": {"port": 8080}, "initialDelaySeconds": 10, "periodSeconds": 1, "failureThreshold": 3}}]}})).await;
            let p = wait_pod(&pods, "hostnet", "hostNetwork pod running", T, |p| {
                phase(p) == "Running" && cond(p, "Ready") == "True"
            })
            .await;
            assert_eq!(p["status"]["podIP"], NODE_IP);
            assert_eq!(p["status"]["hostIP"], NODE_IP);
            let p = wait_pod(&pods, "web", "web waits for the network", T, |p| {
                p.and_then(|p| p.pointer("/status/message")).and_then(Value::as_str).is_some_and(|m| m.contains("network is not ready"))
            })
            .await;
            assert_eq!(p["status"]["phase"], "Pending");
            assert_eq!(cstatus(&p)["state"]["waiting"]["reason"], "ContainerCreating");
            assert_eq!(condition(&p, "PodReadyToStartContainers"), "False");

            // The network appears: web starts in its own namespace and becomes ready.
            std::fs::write(&subnet_file, subnet_env()).unwrap();
            let p = wait_pod(&pods, "web", "web ready", T, |p| cond(p, "Ready") == "True").await;
            let ip = p["status"]["podIP"].as_str().unwrap().to_string();
            assert!(ip.starts_with("10.244.7."), "{ip}");
            assert_eq!(p["status"]["podIPs"], json!([{"ip": ip}]));
            assert_eq!(p["status"]["phase"], "Running");
            assert_eq!(condition(&p, "ContainersReady"), "True");
            let st = cstatus(&p);
            assert_eq!(st["ready"], true);
            assert_eq!(st["started"], true);
            assert_eq!(st["restartCount"], 0);
            assert_eq!(st["image"], "python");
            assert_eq!(st["imageID"], "");
            let web_id = st["containerID"].as_str().unwrap().to_string();
            assert!(web_id.starts_with("ferry://"), "{web_id}");
            assert!(st["state"]["running"]["startedAt"].is_string());
            let (code, body) = http(&format!("{ip}:8080"), "/index.html").await.expect("pod answers");
            assert_eq!((code, body.as_str()), (200, "hello from configmap\n"));
            // The ConfigMap is mounted only in the pod's mount namespace.
            assert!(!www.join("index.html").exists());
            // Logs over the kubelet port.
            let (code, body) = http(&format!("{NODE_IP}:10250"), "/containerLogs/default/web/web?tailLines=50").await.unwrap();
            assert_eq!(code, 200);
            assert!(body.contains(&format!("greeting=hi ip={ip} name=web")), "{body}");
            // The pod's own name resolves from its managed /etc/hosts, without DNS.
            assert!(body.contains(&format!("self={ip} ")), "{body}");
            assert_eq!(http(&format!("{NODE_IP}:10250"), "/healthz").await.unwrap().0, 200);

            // Crash loop with backoff (base 1 s here), exit code kept.
            create_pod(&pods, &guard, json!({"metadata": {"name": "crash"}, "spec": {
                "containers": [{"name": "c", "command": ["sh", "-c", "echo run; exit 3"]}]}})).await;
            let t0 = Instant::now();
            let p = wait_pod(&pods, "crash", "crash loop", T, |p| {
                cs(p)["restartCount"].as_i64().unwrap_or(0) >= 2 && cs(p)["state"]["waiting"]["reason"] == "CrashLoopBackOff"
            })
            .await;
            assert!(t0.elapsed() >= Duration::from_secs(3), "backoff 1 s then 2 s: {:?}", t0.elapsed());
            assert_eq!(cstatus(&p)["lastState"]["terminated"]["exitCode"], 3);
            assert_eq!(cstatus(&p)["lastState"]["terminated"]["reason"], "Error");
            assert_eq!(p["status"]["phase"], "Running");
            let (_, body) = http(&format!("{NODE_IP}:10250"), "/containerLogs/default/crash/c?previous=true").await.unwrap();
            assert_eq!(body, "run\n");

            // Bad input: no command; a missing program; a missing ConfigMap key. Others keep running.
            create_pod(&pods, &guard, json!({"metadata": {"name": "nocmd"}, "spec": {"containers": [{"name": "c", "image": "x"}]}})).await;
            create_pod(&pods, &guard, json!({"metadata": {"name": "noprog"}, "spec": {"restartPolicy": "Never",
                "containers": [{"name": "c", "command": ["/no/such/program"]}]}})).await;
            create_pod(&pods, &guard, json!({"metadata": {"name": "nokey"}, "spec": {"containers": [{"name": "c", "command": ["sleep", "60"],
                "env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "web-cfg", "key": "absent"}}}]}]}})).await;
            let p = wait_pod(&pods, "nocmd", "nocmd config error", T, |p| {
                cs(p)["state"]["waiting"]["reason"] == "CreateContainerConfigError"
            })
            .await;
            assert!(cstatus(&p)["state"]["waiting"]["message"].as_str().unwrap().contains("no command"));
            let p = wait_pod(&pods, "noprog", "noprog failed", T, |p| phase(p) == "Failed").await;
            assert_eq!(cstatus(&p)["state"]["terminated"]["reason"], "StartError");
            assert_eq!(cstatus(&p)["state"]["terminated"]["exitCode"], 128);
            let p = wait_pod(&pods, "nokey", "nokey config error", T, |p| {
                cs(p)["state"]["waiting"]["reason"] == "CreateContainerConfigError"
            })
            .await;
            assert!(cstatus(&p)["state"]["waiting"]["message"].as_str().unwrap().contains("couldn't find key absent"));
            let events: Api<Event> = Api::namespaced(c.clone(), "default");
            let evs = events.list(&ListParams::default()).await.unwrap();
            let has = |pod: &str, reason: &str| {
                evs.items.iter().any(|e| e.involved_object.name.as_deref() == Some(pod) && e.reason.as_deref() == Some(reason))
            };
            assert!(has("nocmd", "Failed") && has("noprog", "Failed") && has("crash", "BackOff"));
            assert_eq!(cond(pod_json(&pods, "web").await.as_ref(), "Ready"), "True");

            // Run-to-completion pods.
            create_pod(&pods, &guard, json!({"metadata": {"name": "once"}, "spec": {"restartPolicy": "Never",
                "containers": [{"name": "c", "command": ["true"]}]}})).await;
            create_pod(&pods, &guard, json!({"metadata": {"name": "retry"}, "spec": {"restartPolicy": "OnFailure",
                "containers": [{"name": "c", "command": ["sh", "-c", "test -f \"$FLAGS/retry-ok\""],
                    "env": [{"name": "FLAGS", "value": flags.to_str().unwrap()}]}]}})).await;
            wait_pod(&pods, "once", "once succeeded", T, |p| {
                phase(p) == "Succeeded" && cs(p)["state"]["terminated"]["reason"] == "Completed"
            })
            .await;
            wait_pod(&pods, "retry", "retry restarting", T, |p| cs(p)["restartCount"].as_i64().unwrap_or(0) >= 1).await;
            std::fs::write(flags.join("retry-ok"), "").unwrap();
            wait_pod(&pods, "retry", "retry succeeded", T, |p| phase(p) == "Succeeded").await;

            // Exec readiness follows a flag file; exec liveness failure restarts.
            create_pod(&pods, &guard, json!({"metadata": {"name": "probed"}, "spec": {
                "terminationGracePeriodSeconds": 1,
                "containers": [{"name": "c", "command": ["sleep", "600"],
                    "readinessProbe": {"exec": {"command": ["test", "-f", flags.join("ready").to_str().unwrap()]}, "periodSeconds": 1},
                    "livenessProbe": {"exec": {"command": ["test", "!", "-f", flags.join("sick").to_str().unwrap()]}, "periodSeconds": 1, "failureThreshold": 2}}]}})).await;
            wait_pod(&pods, "probed", "probed running, not ready", T, |p| {
                phase(p) == "Running" && cs(p)["state"]["running"].is_object() && cond(p, "Ready") == "False"
            })
            .await;
            std::fs::write(flags.join("ready"), "").unwrap();
            wait_pod(&pods, "probed", "probed ready", T, |p| cond(p, "Ready") == "True").await;
            std::fs::remove_file(flags.join("ready")).unwrap();
            wait_pod(&pods, "probed", "probed unready", T, |p| cond(p, "Ready") == "False").await;
            std::fs::write(flags.join("sick"), "").unwrap();
            wait_pod(&pods, "probed", "liveness restart", T, |p| cs(p)["restartCount"].as_i64().unwrap_or(0) >= 1).await;
            std::fs::remove_file(flags.join("sick")).unwrap();

            // preStop hooks run before SIGTERM, in every container at once: exec (with the
            // container's environment), sleep, and a failing httpGet that is reported and
            // does not hold the stop up.
            let order = flags.join("graceful");
            let traps = |name: &str| format!("trap 'echo {name}-term >> $LOG; exit 0' TERM; while true; do sleep 0.1; done");
            create_pod(&pods, &guard, json!({"metadata": {"name": "graceful"}, "spec": {"terminationGracePeriodSeconds": 10,
                "containers": [
                    {"name": "exec", "command": ["sh", "-c", traps("exec")], "env": [{"name": "LOG", "value": order}],
                     "lifecycle": {"preStop": {"exec": {"command": ["sh", "-c", "echo exec-hook >> $LOG"]}}}},
                    {"name": "sleep", "command": ["sh", "-c", traps("sleep")], "env": [{"name": "LOG", "value": order}],
                     "lifecycle": {"preStop": {"sleep": {"seconds": 2}}}},
                    {"name": "broken", "command": ["sh", "-c", traps("broken")], "env": [{"name": "LOG", "value": order}],
                     "lifecycle": {"preStop": {"httpGet": {"port": 1, "path": "/drain"}}}}]}})).await;
            wait_pod(&pods, "graceful", "graceful running", T, |p| cond(p, "Ready") == "True").await;
            let t0 = Instant::now();
            pods.delete("graceful", &DeleteParams::default()).await.unwrap();
            wait_pod(&pods, "graceful", "graceful removed", T, |p| p.is_none()).await;
            let stopped_after = t0.elapsed();
            let lines = std::fs::read_to_string(&order).unwrap();
            let lines: Vec<&str> = lines.lines().collect();
            assert_eq!(lines.last(), Some(&"sleep-term"), "the sleep hook holds SIGTERM back: {lines:?}");
            let at = |l: &str| lines.iter().position(|x| *x == l).unwrap_or_else(|| panic!("{l} missing: {lines:?}"));
            assert!(at("exec-hook") < at("exec-term"), "{lines:?}");
            assert!(at("broken-term") < at("sleep-term"), "{lines:?}");
            assert!(stopped_after >= Duration::from_secs(2), "removed after {stopped_after:?}");
            let evs = events.list(&ListParams::default()).await.unwrap();
            let hook_failed = evs.items.iter().find(|e| {
                e.involved_object.name.as_deref() == Some("graceful") && e.reason.as_deref() == Some("FailedPreStopHook")
            });
            let hook_failed = hook_failed.expect("a FailedPreStopHook event for the httpGet hook");
            assert_eq!(hook_failed.involved_object.field_path.as_deref(), Some("spec.containers{broken}"));

            // Graceful stop: TERM ignored → SIGKILL after the grace period, then the pod is removed.
            create_pod(&pods, &guard, json!({"metadata": {"name": "stubborn"}, "spec": {"terminationGracePeriodSeconds": 2,
                "containers": [{"name": "c", "command": ["sh", "-c", "trap '' TERM; while true; do sleep 0.2; done"]}]}})).await;
            wait_pod(&pods, "stubborn", "stubborn running", T, |p| phase(p) == "Running").await;
            let t0 = Instant::now();
            pods.delete("stubborn", &DeleteParams::default()).await.unwrap();
            wait_pod(&pods, "stubborn", "stubborn removed", T, |p| p.is_none()).await;
            assert!(t0.elapsed() >= Duration::from_millis(1800), "removed after {:?}", t0.elapsed());
            (ip, web_id)
        });
        Ok(out)
    });
    let (ip, web_id) = match result {
        Ok(v) => v,
        Err(e) => panic!("{e:#}\ncontrol plane log:\n{}", cp.log()),
    };

    // Adoption: a new agent keeps web's process (same pid, no restart).
    agent.stop();
    let pid: u32 = web_id.trim_start_matches("ferry://").parse().unwrap();
    let ticks = runtime::proc_stat(pid).unwrap().1;
    let _agent2 = Agent::start(&ns, args.clone());
    let kubeconfig = cp.kubeconfig();
    let data_dir2 = data_dir.clone();
    ferry_testkit::run_in_netns(ns.name(), move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        rt.block_on(async {
            let c = client(&kubeconfig).await;
            let pods: Api<Pod> = Api::namespaced(c.clone(), "default");
            tokio::time::sleep(Duration::from_secs(4)).await;
            let p = wait_pod(&pods, "web", "web ready after adoption", T, |p| {
                cond(p, "Ready") == "True"
            })
            .await;
            assert_eq!(cstatus(&p)["containerID"], web_id, "adopted, not restarted");
            assert_eq!(cstatus(&p)["restartCount"], 0);
            assert!(runtime::is_alive(pid, ticks));
            assert_eq!(
                http(&format!("{ip}:8080"), "/index.html").await.unwrap().0,
                200
            );
            let (_, body) = http(
                &format!("{NODE_IP}:10250"),
                "/containerLogs/default/web/web",
            )
            .await
            .unwrap();
            assert!(body.contains("greeting=hi"), "{body}");

            // Deleting every pod stops them and removes their namespaces, addresses and files.
            let list = pods.list(&ListParams::default()).await.unwrap();
            let uids: Vec<String> = list
                .items
                .iter()
                .filter_map(|p| p.metadata.uid.clone())
                .collect();
            for p in &list.items {
                let _ = pods
                    .delete(
                        p.metadata.name.as_deref().unwrap(),
                        &DeleteParams::default(),
                    )
                    .await;
            }
            wait_until("all pods removed", Duration::from_secs(40), || {
                let pods = pods.clone();
                async move {
                    pods.list(&ListParams::default())
                        .await
                        .is_ok_and(|l| l.items.is_empty())
                }
            })
            .await;
            assert!(!runtime::is_alive(pid, ticks), "web's process is gone");
            let uids2 = uids.clone();
            let dd = data_dir2.clone();
            wait_until(
                "pod namespaces and files removed",
                Duration::from_secs(10),
                move || {
                    let left = uids2.iter().any(|u| {
                        Path::new(runtime::NETNS_DIR)
                            .join(runtime::netns_name(u))
                            .exists()
                            || dd.join("pods").join(u).exists()
                    });
                    async move { !left }
                },
            )
            .await;
            let leftover: Vec<String> = std::fs::read_dir(data_dir2.join("ipam/ferry"))
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("10."))
                .collect();
            assert!(
                leftover.is_empty(),
                "addresses still allocated: {leftover:?}"
            );
        });
        Ok(())
    })
    .unwrap_or_else(|e| panic!("{e:#}\ncontrol plane log:\n{}", cp.log()));
    drop(guard);
}
