//! `ferry overlay`: leases this node's podCIDR, publishes its VTEP in the Node's
//! annotations, watches all Nodes and reconciles after every change and periodically.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use futures::StreamExt;
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Patch, PatchParams};
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::Api;

use crate::node::{self, Backend};
use crate::reconciler::{OverlayConfig, Reconciler};
use crate::status::Status;

/// Arguments of `ferry overlay`.
#[derive(clap::Args, Debug, Clone)]
pub struct OverlayArgs {
    /// kubeconfig file (default: $KUBECONFIG, ~/.kube/config or in-cluster).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// This node's name (default: $NODE_NAME, else the hostname).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// Underlay interface (default: the default route's interface).
    #[arg(long)]
    pub iface: Option<String>,
    /// Address to publish as public-ip (default: the underlay's first IPv4 address).
    #[arg(long)]
    pub public_ip: Option<Ipv4Addr>,
    /// Data-plane backend.
    #[arg(long, value_enum, default_value = "vxlan")]
    pub backend: Backend,
    /// Name of the VXLAN device.
    #[arg(long, default_value = "flannel.1")]
    pub vxlan_device: String,
    /// VXLAN network identifier.
    #[arg(long, default_value_t = 1)]
    pub vni: u32,
    /// VXLAN UDP port.
    #[arg(long, default_value_t = 8472)]
    pub vxlan_port: u16,
    /// VXLAN: plain routes to peers on the same L2 segment (flannel's DirectRouting).
    #[arg(long)]
    pub direct_routing: bool,
    /// The cluster's pod CIDR.
    #[arg(long, default_value = "10.244.0.0/16")]
    pub cluster_cidr: Ipv4Net,
    /// Where to write FLANNEL_NETWORK / FLANNEL_SUBNET / FLANNEL_MTU / FLANNEL_IPMASQ.
    #[arg(long, default_value = crate::subnet::DEFAULT_SUBNET_FILE)]
    pub subnet_file: PathBuf,
    /// Masquerade pod traffic leaving the cluster CIDR.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub ip_masq: bool,
    /// Pod MTU (default: underlay MTU − 50 for VXLAN, the underlay MTU for host-gw).
    #[arg(long)]
    pub mtu: Option<u32>,
    /// TX checksum offload on the VXLAN device (default: on from Linux 5.7, whose
    /// NAT no longer corrupts VXLAN checksums; off before, as flannel). Set false
    /// when the underlay NIC or a NAT on the way mishandles offloaded checksums.
    #[arg(long, action = clap::ArgAction::Set)]
    pub vxlan_tx_checksum_offload: Option<bool>,
    /// Cross-node pod-to-pod TCP/UDP skips the node's IP stack (eBPF programs
    /// on the pod veths and the underlay, which also do the VXLAN encapsulation).
    /// false: every packet takes the stack and flannel.1, as with flannel (and
    /// an installed fast path is removed).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub fast_path: bool,
    /// bpffs directory for the fast path's pinned programs and maps (default:
    /// /sys/fs/bpf/ferry/overlay, or one named after --subnet-file when that is not the default).
    #[arg(long)]
    pub fastpath_dir: Option<PathBuf>,
    /// Full reconcile period in seconds (also after every Node change).
    #[arg(long, default_value_t = 10)]
    pub resync_seconds: u64,
    /// Address of the /metrics endpoint (also /healthz; "" turns it off).
    #[arg(long, default_value = "127.0.0.1:10262")]
    pub metrics_bind_address: String,
    /// Address of the /healthz endpoint, for probes ("" turns it off).
    #[arg(long, default_value = "0.0.0.0:10263")]
    pub healthz_bind_address: String,
}

async fn client(args: &OverlayArgs) -> Result<kube::Client> {
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
    Ok(kube::Client::try_from(config)?)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Waits until this node exists and has a podCIDR, saying why while it waits.
async fn lease(api: &Api<Node>, name: &str) -> Result<Ipv4Net> {
    let mut last = String::new();
    loop {
        let why = match api.get_opt(name).await {
            Ok(Some(n)) => match node::pod_cidr(&n) {
                Ok(c) => return Ok(c),
                Err(e) => format!("Node {name}: {e} (waiting for the control plane's node IPAM)"),
            },
            Ok(None) => format!("Node {name} does not exist yet"),
            Err(e) => format!("cannot read Node {name}: {e}"),
        };
        if why != last {
            tracing::warn!("waiting for this node's subnet lease: {why}");
            last = why;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

async fn publish(api: &Api<Node>, name: &str, want: &BTreeMap<String, String>) -> Result<()> {
    let patch = serde_json::json!({"metadata": {"annotations": want}});
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .with_context(|| format!("patching Node {name}'s annotations"))?;
    Ok(())
}

/// Runs `ferry overlay` until SIGINT / SIGTERM. State in the kernel is left in
/// place on exit so that a restart does not interrupt traffic.
pub async fn run(args: OverlayArgs) -> Result<()> {
    let name = args.node_name.clone().unwrap_or_else(hostname);
    anyhow::ensure!(!name.is_empty(), "no --node-name and no hostname");
    let metrics_addr =
        ferry_status::bind_address("--metrics-bind-address", &args.metrics_bind_address)?;
    let healthz_addr =
        ferry_status::bind_address("--healthz-bind-address", &args.healthz_bind_address)?;
    let client = client(&args).await?;
    let api: Api<Node> = Api::all(client);
    let subnet = lease(&api, &name).await?;
    tracing::info!(node = %name, %subnet, "subnet leased from the Node's podCIDR");

    let mut cfg = OverlayConfig::new(&name, args.cluster_cidr, subnet);
    cfg.backend = args.backend;
    cfg.direct_routing = args.direct_routing;
    cfg.vxlan_device = args.vxlan_device.clone();
    cfg.vni = args.vni;
    cfg.vxlan_port = args.vxlan_port;
    cfg.iface = args.iface.clone();
    cfg.public_ip = args.public_ip;
    cfg.subnet_file = args.subnet_file.clone();
    cfg.ip_masq = args.ip_masq;
    cfg.mtu = args.mtu;
    cfg.fast_path = args.fast_path;
    cfg.fastpath_dir = args.fastpath_dir.clone();
    if let Some(on) = args.vxlan_tx_checksum_offload {
        cfg.vxlan_tx_checksum_offload = on;
    }
    let mut rec = Reconciler::new(cfg).await?;
    let resync = Duration::from_secs(args.resync_seconds.max(1));
    let status = Arc::new(Status::new(
        (3 * resync).max(Duration::from_secs(30)),
        rec.fastpath().cloned(),
    ));
    let mut servers = Vec::new();
    if let Some(addr) = metrics_addr {
        servers.push(ferry_status::spawn_server(addr, status.clone().metrics_handler()).await?);
    }
    if let Some(addr) = healthz_addr {
        servers.push(ferry_status::spawn_server(addr, status.clone().healthz_handler()).await?);
    }
    let mut published = publish(&api, &name, &rec.annotations())
        .await
        .map_err(|e| tracing::warn!("{e:#}"))
        .is_ok();

    let (store, writer) = reflector::store();
    let notify = Arc::new(tokio::sync::Notify::new());
    let n2 = notify.clone();
    let stream = watcher(api.clone(), watcher::Config::default())
        .default_backoff()
        .reflect(writer);
    tokio::spawn(async move {
        futures::pin_mut!(stream);
        while let Some(ev) = stream.next().await {
            if let Err(e) = ev {
                tracing::warn!("node watch: {e}");
            }
            n2.notify_one();
        }
    });
    store.wait_until_ready().await.context("node watch ended")?;

    let mut tick = tokio::time::interval(resync);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let nodes: Vec<Node> = store.state().iter().map(|n| (**n).clone()).collect();
        match rec.reconcile(&nodes).await {
            Ok(r) => {
                if !r.errors.is_empty() {
                    tracing::warn!(errors = r.errors.len(), "reconcile partly failed");
                }
                status.reconciled(r.peers.len(), r.errors.len());
            }
            Err(e) => {
                tracing::error!("reconcile: {e:#}");
                status.failed();
            }
        }
        if let Some(me) = nodes
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(name.as_str()))
        {
            // After the reconcile: a re-created flannel.1 has a new VtepMAC.
            let want_ann = rec.annotations();
            let have = me.metadata.annotations.clone().unwrap_or_default();
            if !published || want_ann.iter().any(|(k, v)| have.get(k) != Some(v)) {
                published = publish(&api, &name, &want_ann)
                    .await
                    .map_err(|e| tracing::warn!("{e:#}"))
                    .is_ok();
            }
            if let Ok(c) = node::pod_cidr(me) {
                if c != subnet {
                    tracing::error!(old = %subnet, new = %c, "this node's podCIDR changed; restart ferry overlay to use it");
                }
            }
        }
        tokio::select! {
            _ = notify.notified() => {
                // Coalesce bursts of events.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        }
    }
    tracing::info!("ferry overlay stopping; kernel state left in place");
    Ok(())
}
