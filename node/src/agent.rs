//! The agent: Node registration and heartbeats (Lease every 10 s, Ready
//! condition every minute), the pod watch that feeds one worker per pod,
//! adoption of pods a previous agent left running, and the logs server.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use chrono::Utc;
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, Client};
use serde_json::json;
use tokio::sync::mpsc;

use crate::backoff::BackoffPolicy;
use crate::logs::{self, LogRegistry};
use crate::nodeinfo::{self, HostFacts, NodeIdentity};
use crate::pod::{self, Ctx, Msg, PodNetSource, PodWorker};
use crate::state::PodRecord;
use crate::status::micro_time;

/// `ferry node`: the node agent.
#[derive(clap::Args, Debug, Clone)]
pub struct NodeArgs {
    /// Kubeconfig for the API server (default: $KUBECONFIG, in-cluster, ~/.kube/config).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// This node's name (default: the hostname).
    #[arg(long)]
    pub node_name: Option<String>,
    /// The node's InternalIP (default: the local address that routes to the API server).
    #[arg(long)]
    pub address: Option<IpAddr>,
    /// Pod records, volumes and container logs.
    #[arg(long, default_value = "/var/lib/ferry/node")]
    pub data_dir: PathBuf,
    /// Port of the container-logs server (reported as the kubelet endpoint).
    #[arg(long, default_value_t = 10250)]
    pub logs_port: u16,
    /// CPU capacity to report instead of the host's CPU count (e.g. "2", "1500m").
    #[arg(long)]
    pub cpu: Option<String>,
    /// Memory capacity to report instead of the host's MemTotal (e.g. "4Gi").
    #[arg(long)]
    pub memory: Option<String>,
    /// The overlay's subnet file (FLANNEL_SUBNET etc.), written by `ferry overlay`.
    #[arg(long, default_value = "/run/ferry/subnet.env")]
    pub subnet_file: PathBuf,
    /// IPAM store for pod addresses (default: <data-dir>/ipam/ferry).
    #[arg(long)]
    pub ipam_dir: Option<PathBuf>,
    /// Rotate a container's log file beyond this many bytes.
    #[arg(long, default_value_t = 4 << 20)]
    pub log_max_bytes: u64,
    /// First crash-backoff delay in milliseconds (doubles up to 5 minutes).
    #[arg(long, default_value_t = 10_000, hide = true)]
    pub crash_backoff_ms: u64,
}

impl NodeArgs {
    /// Arguments with the defaults, for embedding the agent.
    pub fn new(
        kubeconfig: PathBuf,
        node_name: &str,
        address: IpAddr,
        data_dir: PathBuf,
    ) -> NodeArgs {
        NodeArgs {
            kubeconfig: Some(kubeconfig),
            node_name: Some(node_name.into()),
            address: Some(address),
            data_dir,
            logs_port: 10250,
            cpu: None,
            memory: None,
            subnet_file: "/run/ferry/subnet.env".into(),
            ipam_dir: None,
            log_max_bytes: 4 << 20,
            crash_backoff_ms: 10_000,
        }
    }
}

async fn client(args: &NodeArgs) -> Result<(Client, kube::Config)> {
    let config = match &args.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?
        }
        None => kube::Config::infer()
            .await
            .context("no --kubeconfig given and none inferred")?,
    };
    Ok((Client::try_from(config.clone())?, config))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// The local address used to reach `url`'s host (no packet is sent).
fn route_source(url: &http_uri::Uri) -> Option<IpAddr> {
    let host = url.host()?.trim_matches(|c| c == '[' || c == ']');
    let port = url.port_u16().unwrap_or(443);
    let target: SocketAddr = std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
        .ok()?
        .next()?;
    let bind: SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .ok()?;
    let s = std::net::UdpSocket::bind(bind).ok()?;
    s.connect(target).ok()?;
    Some(s.local_addr().ok()?.ip())
}

mod http_uri {
    pub use hyper::Uri;
}

/// Creates or updates this node's Node object and its status.
async fn register(
    client: &Client,
    id: &NodeIdentity,
    facts: &HostFacts,
    since: chrono::DateTime<Utc>,
) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let labels = nodeinfo::labels(id, facts);
    if nodes.get_opt(&id.name).await?.is_none() {
        let node: Node = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": id.name, "labels": labels},
            "spec": {},
        }))?;
        match nodes.create(&PostParams::default(), &node).await {
            Ok(_) => tracing::info!(node = %id.name, "registered node"),
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e).context("creating the Node"),
        }
    } else {
        nodes
            .patch(
                &id.name,
                &PatchParams::default(),
                &Patch::Merge(&json!({"metadata": {"labels": labels}})),
            )
            .await
            .context("labelling the Node")?;
    }
    update_status(client, id, facts, since).await
}

async fn update_status(
    client: &Client,
    id: &NodeIdentity,
    facts: &HostFacts,
    since: chrono::DateTime<Utc>,
) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let status = nodeinfo::node_status(id, facts, Utc::now(), since);
    nodes
        .patch_status(
            &id.name,
            &PatchParams::default(),
            &Patch::Merge(&json!({"status": status})),
        )
        .await
        .context("writing the Node status")?;
    Ok(())
}

/// Renews `kube-node-lease/<node>` (creating it when missing).
async fn renew_lease(client: &Client, node: &str, node_uid: Option<String>) -> Result<()> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let now = micro_time(Utc::now());
    let spec = json!({"holderIdentity": node, "leaseDurationSeconds": 40, "renewTime": now});
    if leases.get_opt(node).await?.is_some() {
        leases
            .patch(
                node,
                &PatchParams::default(),
                &Patch::Merge(&json!({"spec": spec})),
            )
            .await?;
        return Ok(());
    }
    let mut meta = json!({"name": node, "namespace": "kube-node-lease"});
    if let Some(uid) = node_uid {
        meta["ownerReferences"] =
            json!([{"apiVersion": "v1", "kind": "Node", "name": node, "uid": uid}]);
    }
    let lease: Lease = serde_json::from_value(json!({"metadata": meta, "spec": spec}))?;
    match leases.create(&PostParams::default(), &lease).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn heartbeats(
    client: Client,
    id: NodeIdentity,
    facts: HostFacts,
    since: chrono::DateTime<Utc>,
) {
    let nodes: Api<Node> = Api::all(client.clone());
    let mut last_status = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    loop {
        tick.tick().await;
        let uid = match nodes.get_opt(&id.name).await {
            Ok(Some(n)) => n.metadata.uid,
            Ok(None) => {
                // Someone deleted the Node: register again.
                if let Err(e) = register(&client, &id, &facts, since).await {
                    tracing::warn!("re-registering the node: {e:#}");
                }
                continue;
            }
            Err(e) => {
                tracing::warn!("reading the Node: {e}");
                continue;
            }
        };
        if let Err(e) = renew_lease(&client, &id.name, uid).await {
            tracing::warn!("renewing the node lease: {e:#}");
        }
        if last_status.elapsed() >= Duration::from_secs(60) {
            last_status = tokio::time::Instant::now();
            if let Err(e) = update_status(&client, &id, &facts, since).await {
                tracing::warn!("{e:#}");
            }
        }
    }
}

/// Routes watch events to pod workers (one per pod uid).
struct Dispatcher {
    ctx: Arc<Ctx>,
    workers: HashMap<String, mpsc::UnboundedSender<Msg>>,
    /// Records left by a previous agent, claimed by the first listing.
    records: Option<HashMap<String, PodRecord>>,
    seen: HashSet<String>,
}

impl Dispatcher {
    fn apply(&mut self, pod: Pod) {
        let Some(uid) = pod.metadata.uid.clone() else {
            return;
        };
        self.seen.insert(uid.clone());
        if let Some(tx) = self.workers.get(&uid) {
            if !tx.is_closed() {
                let _ = tx.send(Msg::Update(Box::new(pod)));
                return;
            }
            self.workers.remove(&uid);
            if pod.metadata.deletion_timestamp.is_some() {
                return;
            }
        }
        let record = self
            .records
            .as_mut()
            .and_then(|r| r.remove(&uid))
            .or_else(|| {
                // A record on disk for this uid (e.g. the first listing was missed).
                PodRecord::load(&crate::state::pod_dir(&self.ctx.data_dir, &uid))
            });
        let tx = PodWorker::spawn(self.ctx.clone(), pod, record);
        self.workers.insert(uid, tx);
    }

    fn delete(&mut self, pod: &Pod) {
        if let Some(uid) = &pod.metadata.uid {
            if let Some(tx) = self.workers.remove(uid) {
                let _ = tx.send(Msg::Gone);
            }
        }
    }

    /// After a (re)list: pods not listed are gone; unclaimed records are orphans.
    fn init_done(&mut self) {
        let gone: Vec<String> = self
            .workers
            .keys()
            .filter(|u| !self.seen.contains(*u))
            .cloned()
            .collect();
        for uid in gone {
            if let Some(tx) = self.workers.remove(&uid) {
                let _ = tx.send(Msg::Gone);
            }
        }
        if let Some(records) = self.records.take() {
            for (_, r) in records {
                tokio::spawn(pod::cleanup_orphan(self.ctx.clone(), r));
            }
        }
    }
}

/// Runs the agent until SIGINT or SIGTERM. Pods keep running when the agent
/// stops; the next agent adopts them.
pub async fn run(args: NodeArgs) -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let stop = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
    };
    run_until(args, stop).await
}

/// Runs the agent until `shutdown` completes.
pub async fn run_until(
    args: NodeArgs,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let (client, config) = client(&args).await?;
    let node_name = args
        .node_name
        .clone()
        .unwrap_or_else(hostname)
        .to_lowercase();
    let address = match args.address {
        Some(a) => a,
        None => route_source(&config.cluster_url)
            .context("could not work out the node address; pass --address")?,
    };
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating {}", args.data_dir.display()))?;
    let facts = HostFacts::detect();
    let id = NodeIdentity {
        name: node_name.clone(),
        address: address.to_string(),
        hostname: node_name.clone(),
        logs_port: args.logs_port,
        cpu: args.cpu.clone(),
        memory: args.memory.clone(),
    };
    let since = Utc::now();
    // Register, retrying while the API server is not there yet.
    let mut delay = Duration::from_millis(500);
    loop {
        match register(&client, &id, &facts, since).await {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!("registering node {node_name}: {e:#}; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }
    let registry = LogRegistry::default();
    let listen = SocketAddr::new(
        if address.is_ipv4() {
            IpAddr::from([0, 0, 0, 0])
        } else {
            IpAddr::from([0u16; 8])
        },
        args.logs_port,
    );
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the logs server on {listen}"))?;
    tracing::info!(%listen, "serving container logs");
    let logs_task = tokio::spawn(logs::serve_on(listener, registry.clone()));
    let hb_task = tokio::spawn(heartbeats(client.clone(), id.clone(), facts.clone(), since));

    let ctx = Arc::new(Ctx {
        client: client.clone(),
        node_name: node_name.clone(),
        host_ip: address.to_string(),
        data_dir: args.data_dir.clone(),
        podnet: PodNetSource::new(
            args.subnet_file.clone(),
            args.ipam_dir
                .clone()
                .unwrap_or_else(|| args.data_dir.join("ipam").join("ferry")),
        ),
        backoff: BackoffPolicy {
            base: Duration::from_millis(args.crash_backoff_ms.max(1)),
            ..BackoffPolicy::default()
        },
        logs: registry,
        log_max_bytes: args.log_max_bytes,
    });
    let records: HashMap<String, PodRecord> = PodRecord::load_all(&args.data_dir)
        .into_iter()
        .map(|r| (r.uid.clone(), r))
        .collect();
    if !records.is_empty() {
        tracing::info!(
            count = records.len(),
            "found pods recorded by a previous agent"
        );
    }
    let mut d = Dispatcher {
        ctx,
        workers: HashMap::new(),
        records: Some(records),
        seen: HashSet::new(),
    };
    let pods: Api<Pod> = Api::all(client.clone());
    let cfg = watcher::Config::default().fields(&format!("spec.nodeName={node_name}"));
    let mut stream = Box::pin(kube::runtime::WatchStreamExt::default_backoff(watcher(
        pods, cfg,
    )));
    tracing::info!(node = %node_name, %address, "node agent running");
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            ev = stream.next() => match ev {
                None => break,
                Some(Err(e)) => tracing::warn!("pod watch: {e}"),
                Some(Ok(watcher::Event::Init)) => d.seen.clear(),
                Some(Ok(watcher::Event::InitApply(p))) | Some(Ok(watcher::Event::Apply(p))) => d.apply(p),
                Some(Ok(watcher::Event::Delete(p))) => d.delete(&p),
                Some(Ok(watcher::Event::InitDone)) => d.init_done(),
            }
        }
    }
    tracing::info!("node agent stopping; pods keep running and are adopted by the next agent");
    logs_task.abort();
    hb_task.abort();
    Ok(())
}
