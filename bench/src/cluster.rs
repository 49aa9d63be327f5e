//! Pieces every suite uses: a tokio runtime whose threads live in a bench
//! namespace, a `ferry controlplane` / `ferry proxy` process started in a namespace,
//! kube-rs clients, generated Services and EndpointSlices, and process RSS.

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry_testkit::{ChildGuard, Netns};
use futures::{stream, StreamExt};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, PostParams};
use serde_json::json;

/// Progress lines, prefixed with the time since the bench started.
pub fn progress(msg: impl AsRef<str>) {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let t = START.get_or_init(Instant::now).elapsed().as_secs_f64();
    println!("[{t:7.1}s] {}", msg.as_ref());
}

/// A multi-threaded tokio runtime whose threads have entered a network namespace,
/// so every socket its tasks open belongs to that namespace.
pub struct NsRuntime {
    rt: Option<tokio::runtime::Runtime>,
    ok: Arc<AtomicBool>,
}

impl NsRuntime {
    pub fn new(ns: &str, threads: usize) -> Result<NsRuntime> {
        let path = format!("/var/run/netns/{ns}");
        let f = Arc::new(File::open(&path).with_context(|| format!("opening {path}"))?);
        let ok = Arc::new(AtomicBool::new(true));
        let (f2, ok2) = (f.clone(), ok.clone());
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .max_blocking_threads(8)
            .thread_name("bench-ns")
            .enable_all()
            .on_thread_start(move || {
                // SAFETY: setns on a valid namespace fd changes only this thread.
                if unsafe { libc::setns(f2.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    ok2.store(false, Ordering::SeqCst);
                }
            })
            .build()?;
        Ok(NsRuntime { rt: Some(rt), ok })
    }

    /// Runs a future on the namespace's threads and awaits it from anywhere.
    pub async fn run<F, T>(&self, fut: F) -> Result<T>
    where
        F: std::future::Future<Output = Result<T>> + Send + 'static,
        T: Send + 'static,
    {
        let h = self.rt.as_ref().expect("runtime").spawn(fut);
        let r = h.await.context("task in namespace runtime panicked")?;
        if !self.ok.load(Ordering::SeqCst) {
            bail!("a runtime thread could not enter its namespace");
        }
        r
    }
}

impl Drop for NsRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// `ferry` itself: this executable when it is `ferry`, else `ferry` beside it.
pub fn ferry_bin(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    let me = std::env::current_exe()?;
    if me.file_name().is_some_and(|n| n == "ferry") {
        return Ok(me);
    }
    let sibling = me.with_file_name("ferry");
    if sibling.exists() {
        return Ok(sibling);
    }
    bail!("cannot find the ferry binary (build it with `cargo build --release --bin ferry`, or pass --ferry-bin)")
}

/// Resident and peak resident memory of a process, in MiB (VmRSS, VmHWM).
pub fn rss_mib(pid: u32) -> Option<(f64, f64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |k: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// A `ferry controlplane` process inside a namespace, with its data in a temp dir.
pub struct ControlPlane {
    pub dir: tempfile::TempDir,
    pub addr: String,
    pub child: ChildGuard,
}

impl ControlPlane {
    /// Starts `ferry controlplane --listen IP:6443` inside `ns` and waits until it answers.
    pub fn start(ferry: &Path, ns: &Netns, ip: &str) -> Result<ControlPlane> {
        let dir = tempfile::Builder::new()
            .prefix("ferry-bench-cp-")
            .tempdir()?;
        let addr = format!("{ip}:6443");
        let log = File::create(dir.path().join("controlplane.log"))?;
        let child = ns
            .command(ferry.to_str().context("ferry path")?)
            .arg("controlplane")
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--listen")
            .arg(&addr)
            .arg("--kubeconfig-out")
            .arg(dir.path().join("admin.kubeconfig"))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("spawning ferry controlplane")?;
        let mut cp = ControlPlane {
            dir,
            addr: addr.clone(),
            child: ChildGuard::new(child),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = cp.child.child_mut().try_wait()? {
                bail!("controlplane exited ({st}): {}", cp.log());
            }
            let a = addr.clone();
            let up = cp.kubeconfig().exists()
                && ns
                    .run(move || {
                        Ok(std::net::TcpStream::connect_timeout(
                            &a.parse()?,
                            Duration::from_millis(200),
                        )
                        .is_ok())
                    })
                    .unwrap_or(false);
            if up {
                return Ok(cp);
            }
            if Instant::now() > deadline {
                bail!("controlplane not ready in 30 s: {}", cp.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("admin.kubeconfig")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("controlplane.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A kube-rs client. Call it inside the namespace runtime: the client's
    /// background worker and its connections live where it is created.
    pub async fn client(kubeconfig: PathBuf) -> Result<kube::Client> {
        let kc = kube::config::Kubeconfig::read_from(&kubeconfig)?;
        let mut cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
        cfg.read_timeout = Some(Duration::from_secs(120));
        Ok(kube::Client::try_from(cfg)?)
    }
}

/// `ferry proxy` flags for a mode label: a mode, or `iptables-legacy` /
/// `iptables-nft` for iptables mode with that implementation.
pub fn proxy_mode_args(label: &str) -> Vec<&str> {
    match label.strip_prefix("iptables-") {
        Some(backend) => vec!["--mode", "iptables", "--iptables-backend", backend],
        None => vec!["--mode", label],
    }
}

/// A `ferry proxy` in a node namespace.
pub struct Proxy {
    pub child: ChildGuard,
    pub started: Instant,
    pub log: PathBuf,
}

impl Proxy {
    pub fn start(
        ferry: &Path,
        node: &Netns,
        mode: &str,
        kubeconfig: &Path,
        node_name: &str,
        cluster_cidr: &str,
        log: &Path,
    ) -> Result<Proxy> {
        let logf = File::create(log)?;
        let started = Instant::now();
        let child = node
            .command(ferry.to_str().context("ferry path")?)
            .arg("proxy")
            .args(proxy_mode_args(mode))
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(["--node-name", node_name, "--cluster-cidr", cluster_cidr])
            .args(["--metrics-bind-address", "127.0.0.1:10249"])
            .args(["--healthz-bind-address", ""])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .context("spawning ferry proxy")?;
        Ok(Proxy {
            child: ChildGuard::new(child),
            started,
            log: log.to_path_buf(),
        })
    }

    pub fn exited(&mut self) -> Option<String> {
        match self.child.child_mut().try_wait() {
            Ok(Some(st)) => Some(format!(
                "proxy exited ({st}): {}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            )),
            _ => None,
        }
    }
}

/// Removes every rule any ferry mode made in the namespace (`ferry proxy --cleanup`).
pub fn proxy_cleanup(ferry: &Path, node: &Netns) -> Result<()> {
    let out = node
        .command(ferry.to_str().context("ferry path")?)
        .args(["proxy", "--cleanup"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        bail!(
            "ferry proxy --cleanup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Runs a command in a namespace, returning (success, stdout).
pub fn ns_output(ns: &str, argv: &[&str]) -> (bool, String) {
    match Command::new("ip")
        .args(["netns", "exec", ns])
        .args(argv)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
    {
        Ok(o) => (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
        ),
        Err(_) => (false, String::new()),
    }
}

/// The namespace all generated objects go to.
pub const BENCH_NS: &str = "bench";

/// A ClusterIP service `svc-I` with one TCP port named http (80 → 8080).
pub fn gen_service(i: usize) -> Service {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": format!("svc-{i}"), "namespace": BENCH_NS, "labels": {"app": format!("app-{}", i % 100)}},
        "spec": {"type": "ClusterIP", "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
                 "selector": {"app": format!("app-{i}")}},
    }))
    .expect("valid service")
}

/// Endpoint `j` of service `i`: unique addresses in 10.128.0.0/10.
pub fn endpoint_ip(i: usize, j: usize) -> Ipv4Addr {
    let n = u32::from(Ipv4Addr::new(10, 128, 0, 0)) + (i as u32) * 16 + j as u32;
    Ipv4Addr::from(n)
}

pub fn endpoints_json(ips: &[Ipv4Addr], node: &str) -> serde_json::Value {
    json!(ips
        .iter()
        .map(|ip| json!({"addresses": [ip.to_string()], "conditions": {"ready": true, "serving": true, "terminating": false}, "nodeName": node}))
        .collect::<Vec<_>>())
}

/// The EndpointSlice `svc-I-abcde` of service `svc-I`, with `n` ready endpoints.
pub fn gen_slice(i: usize, n: usize, node: &str) -> EndpointSlice {
    let ips: Vec<Ipv4Addr> = (0..n).map(|j| endpoint_ip(i, j)).collect();
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("svc-{i}-abcde"), "namespace": BENCH_NS,
                     "labels": {"kubernetes.io/service-name": format!("svc-{i}"), "endpointslice.kubernetes.io/managed-by": "ferry-bench"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints_json(&ips, node),
    }))
    .expect("valid slice")
}

/// Creates the bench namespace (if missing).
pub async fn ensure_namespace(client: &kube::Client) -> Result<()> {
    let api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let ns = serde_json::from_value(json!({"metadata": {"name": BENCH_NS}}))?;
    match api.create(&PostParams::default(), &ns).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Creates services `range` and their slices with `concurrency` requests in
/// flight. Returns (objects created, seconds taken) and the ClusterIP of each service.
pub async fn load_services(
    client: kube::Client,
    range: std::ops::Range<usize>,
    endpoints: usize,
    concurrency: usize,
    label: &'static str,
) -> Result<(usize, f64, Vec<(usize, String)>)> {
    let start = Instant::now();
    let total = range.len() * 2;
    let svcs: Api<Service> = Api::namespaced(client.clone(), BENCH_NS);
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), BENCH_NS);
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let last_print = Arc::new(std::sync::Mutex::new(Instant::now()));
    let results: Vec<Result<(usize, String)>> = stream::iter(range.clone())
        .map(|i| {
            let (svcs, slices, done, last_print) = (
                svcs.clone(),
                slices.clone(),
                done.clone(),
                last_print.clone(),
            );
            async move {
                let pp = PostParams::default();
                let created = svcs
                    .create(&pp, &gen_service(i))
                    .await
                    .with_context(|| format!("creating svc-{i}"))?;
                slices
                    .create(&pp, &gen_slice(i, endpoints, "bench-node-b"))
                    .await
                    .with_context(|| format!("creating slice of svc-{i}"))?;
                let n = done.fetch_add(2, Ordering::Relaxed) + 2;
                let mut lp = last_print.lock().unwrap();
                if lp.elapsed() > Duration::from_secs(3) {
                    *lp = Instant::now();
                    progress(format!("{label}: created {n}/{total} objects"));
                }
                let ip = created.spec.and_then(|s| s.cluster_ip).unwrap_or_default();
                Ok((i, ip))
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let mut ips = Vec::with_capacity(results.len());
    for r in results {
        ips.push(r?);
    }
    ips.sort();
    Ok((total, start.elapsed().as_secs_f64(), ips))
}

impl NsRuntime {
    /// Spawns a background task on the namespace's threads (stopped with the runtime).
    pub fn spawn<F>(&self, fut: F)
    where
        F: std::future::Future<Output = Result<()>> + Send + 'static,
    {
        self.rt.as_ref().expect("runtime").spawn(async move {
            if let Err(e) = fut.await {
                eprintln!("bench task: {e:#}");
            }
        });
    }
}
