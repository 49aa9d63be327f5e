//! Ferry's service proxy: a kube-proxy replacement.
//!
//! Watchers ([`watch`]) fill caches; a pure core ([`model`]) turns them into the
//! desired state of this node; a [`Datapath`] (nftables, iptables; userspace and
//! eBPF later) reconciles the kernel to it, touching only what changed.

pub mod config;
pub mod conntrack;
pub mod datapath;
pub mod fixtures;
pub mod health;
pub mod iptables;
pub mod metrics;
pub mod model;
pub mod nft_netlink;
pub mod nftables;
pub mod watch;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;

pub use config::{Mode, ProxyConfig};
pub use datapath::{Datapath, Runner};
pub use model::{build, diff, ModelDiff, ProxyModel, ServicePort, ServicePortName};

/// `ferry proxy` flags. Flags override the config file.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ProxyArgs {
    /// Datapath: nftables (default) or iptables.
    #[arg(long, value_enum)]
    pub mode: Option<Mode>,
    /// kubeconfig file (default: in-cluster service account or $KUBECONFIG).
    #[arg(long)]
    pub kubeconfig: Option<String>,
    /// This node's name (default: hostnameOverride, else the hostname).
    #[arg(long)]
    pub node_name: Option<String>,
    /// A KubeProxyConfiguration YAML file (kubeproxy.config.k8s.io/v1alpha1).
    #[arg(long)]
    pub config: Option<String>,
    /// Pod CIDRs, comma-separated: traffic from outside them to a ClusterIP is masqueraded.
    #[arg(long)]
    pub cluster_cidr: Option<String>,
    /// Remove every rule ferry made (any mode) and exit.
    #[arg(long)]
    pub cleanup: bool,
    /// /healthz and /livez address (default 0.0.0.0:10256; empty disables).
    #[arg(long)]
    pub healthz_bind_address: Option<String>,
    /// /metrics address (default 127.0.0.1:10249; empty disables).
    #[arg(long)]
    pub metrics_bind_address: Option<String>,
    /// Masquerade all traffic sent to service IPs.
    #[arg(long)]
    pub masquerade_all: bool,
    /// Where NodePorts answer: "primary" (default), "all", or comma-separated CIDRs.
    #[arg(long)]
    pub node_port_addresses: Option<String>,
    /// Minimum time between syncs (Go duration, default 10ms).
    #[arg(long)]
    pub min_sync_period: Option<String>,
    /// Period of full resyncs (Go duration, default 30s).
    #[arg(long)]
    pub sync_period: Option<String>,
    /// iptables mode: which iptables programs the kernel.
    #[arg(long, value_enum, default_value_t)]
    pub iptables_backend: iptables::IptablesBackend,
}

/// Loads the file (if any) and applies flags; returns the config and warnings.
pub fn load_config(args: &ProxyArgs) -> anyhow::Result<(ProxyConfig, Vec<String>)> {
    let mut cfg = ProxyConfig::default();
    let mut warnings = Vec::new();
    if let Some(path) = &args.config {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading config file {path}"))?;
        let (c, w) =
            config::parse_file(&text, cfg).with_context(|| format!("config file {path}"))?;
        cfg = c;
        warnings = w;
    }
    if let Some(m) = args.mode {
        cfg.mode = m;
    }
    if let Some(k) = &args.kubeconfig {
        cfg.kubeconfig = Some(k.clone());
    }
    if let Some(c) = &args.cluster_cidr {
        cfg.cluster_cidrs = config::parse_cidrs("--cluster-cidr", c)?;
    }
    if let Some(a) = &args.healthz_bind_address {
        cfg.healthz_bind_address = ferry_status::bind_address("--healthz-bind-address", a)?;
    }
    if let Some(a) = &args.metrics_bind_address {
        cfg.metrics_bind_address = ferry_status::bind_address("--metrics-bind-address", a)?;
    }
    if args.masquerade_all {
        cfg.masquerade_all = true;
    }
    if let Some(n) = &args.node_port_addresses {
        let items: Vec<String> = n.split(',').map(String::from).collect();
        cfg.node_port_addresses =
            config::parse_node_port_addresses("--node-port-addresses", &items)?;
    }
    if let Some(d) = &args.min_sync_period {
        cfg.min_sync_period = config::parse_duration(d)
            .ok_or_else(|| anyhow::anyhow!("--min-sync-period: invalid duration {d:?}"))?;
    }
    if let Some(d) = &args.sync_period {
        cfg.sync_period = config::parse_duration(d)
            .filter(|d| !d.is_zero())
            .ok_or_else(|| anyhow::anyhow!("--sync-period: invalid duration {d:?}"))?;
    }
    Ok((cfg, warnings))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_lowercase())
        .unwrap_or_default()
}

/// Removes every object any ferry netfilter mode made. Returns what was found.
pub fn cleanup_all(runner: &Runner) -> Vec<&'static str> {
    let mut found = Vec::new();
    match nftables::NftablesDatapath::remove(runner) {
        Ok(true) => found.push("nftables"),
        Ok(false) => {}
        Err(e) => tracing::warn!("cleanup nftables: {e:#}"),
    }
    for bin in ["iptables-nft", "iptables-legacy"] {
        match iptables::IptablesDatapath::remove(runner, bin) {
            Ok(true) => found.push(bin),
            Ok(false) => {}
            Err(e) => tracing::warn!("cleanup {bin}: {e:#}"),
        }
    }
    found
}

/// Removes the leftovers of the modes other than `mode` (and, in iptables mode, of
/// the iptables implementation other than `iptables_binary`).
pub fn cleanup_other_modes(runner: &Runner, mode: Mode, iptables_binary: &str) {
    if mode != Mode::Nftables {
        if let Err(e) = nftables::NftablesDatapath::remove(runner) {
            tracing::warn!("removing nftables leftovers: {e:#}");
        }
    }
    for bin in ["iptables-nft", "iptables-legacy"] {
        if mode != Mode::Iptables || bin != iptables_binary {
            if let Err(e) = iptables::IptablesDatapath::remove(runner, bin) {
                tracing::warn!("removing {bin} leftovers: {e:#}");
            }
        }
    }
}

/// Makes the datapath for a mode (`iptables_binary`: see [`iptables::IptablesBackend`]).
pub fn new_datapath(mode: Mode, iptables_binary: &str, runner: Runner) -> Box<dyn Datapath> {
    match mode {
        Mode::Iptables => Box::new(iptables::IptablesDatapath::with_binary(
            runner,
            iptables_binary,
        )),
        _ => Box::new(nftables::NftablesDatapath::new(runner)),
    }
}

fn apply_conntrack_sysctls(c: &config::ConntrackConfig) {
    let set = |key: &str, v: String| {
        let path = format!("/proc/sys/net/netfilter/{key}");
        if let Err(e) = std::fs::write(&path, &v) {
            tracing::warn!("setting {path} = {v}: {e}");
        }
    };
    if let Some(d) = c.udp_timeout {
        set("nf_conntrack_udp_timeout", d.as_secs().to_string());
    }
    if let Some(d) = c.udp_stream_timeout {
        set("nf_conntrack_udp_timeout_stream", d.as_secs().to_string());
    }
    if let Some(d) = c.tcp_established_timeout {
        set(
            "nf_conntrack_tcp_timeout_established",
            d.as_secs().to_string(),
        );
    }
    if let Some(d) = c.tcp_close_wait_timeout {
        set(
            "nf_conntrack_tcp_timeout_close_wait",
            d.as_secs().to_string(),
        );
    }
    if let Some(b) = c.tcp_be_liberal {
        set("nf_conntrack_tcp_be_liberal", (b as u8).to_string());
    }
    let cores = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    if let Some(per) = c.max_per_core.filter(|p| *p > 0) {
        let max = (per * cores).max(c.min.unwrap_or(0));
        set("nf_conntrack_max", max.to_string());
    }
}

fn node_eligible(node: Option<&k8s_openapi::api::core::v1::Node>) -> bool {
    let Some(n) = node else { return true };
    if n.metadata.deletion_timestamp.is_some() {
        return false;
    }
    let tainted = n
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == "ToBeDeletedByClusterAutoscaler"));
    !tainted
}

/// Runs `ferry proxy` until SIGINT/SIGTERM. Programmed rules stay in place on exit,
/// so a restart keeps established and new connections working.
pub async fn run(args: ProxyArgs) -> anyhow::Result<()> {
    let (cfg, warnings) = load_config(&args)?;
    for w in &warnings {
        tracing::warn!("config: {w}");
    }
    let runner = Runner::host();
    if args.cleanup {
        let found = cleanup_all(&runner);
        tracing::info!("cleanup done; removed: {found:?}");
        return Ok(());
    }
    let node_name = args
        .node_name
        .clone()
        .or_else(|| cfg.hostname_override.clone())
        .unwrap_or_else(hostname);
    anyhow::ensure!(
        !node_name.is_empty(),
        "--node-name: cannot determine this node's name"
    );
    tracing::info!(mode = ?cfg.mode, node = %node_name, "starting ferry proxy");
    let iptables_binary = match cfg.mode {
        Mode::Iptables => args.iptables_backend.binary(&runner),
        _ => "",
    };
    if cfg.mode == Mode::Iptables {
        tracing::info!("iptables mode with {iptables_binary}");
    }
    cleanup_other_modes(&runner, cfg.mode, iptables_binary);
    apply_conntrack_sysctls(&cfg.conntrack);

    let kube_config = match &cfg.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {path}"))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await?
        }
        None => kube::Config::infer()
            .await
            .context("no kubeconfig given and none inferred")?,
    };
    let client = kube::Client::try_from(kube_config)?;

    let metrics = Arc::new(metrics::Metrics::new());
    let health = Arc::new(health::HealthState::new(cfg.sync_period * 2));
    let mut servers = Vec::new();
    if let Some(addr) = cfg.healthz_bind_address {
        servers
            .push(ferry_status::spawn_server(addr, health::healthz_handler(health.clone())).await?);
    }
    if let Some(addr) = cfg.metrics_bind_address {
        let m = metrics.clone();
        let handler: ferry_status::Handler = Arc::new(move |path| match path {
            "/metrics" => (200, ferry_status::PROMETHEUS_TEXT, m.render()),
            _ => ferry_status::not_found(),
        });
        servers.push(ferry_status::spawn_server(addr, handler).await?);
    }

    let signals = Arc::new(watch::WatchSignals::default());
    let caches = watch::start(client, &node_name, signals.clone());
    let model_cfg = model::ModelConfig {
        node_name: node_name.clone(),
        cluster_cidrs: cfg.cluster_cidrs.clone(),
        masquerade_all: cfg.masquerade_all,
        node_port_addresses: cfg.node_port_addresses.clone(),
    };
    let dp = new_datapath(cfg.mode, iptables_binary, runner.clone());
    let sync = SyncLoop {
        cfg: cfg.clone(),
        model_cfg,
        caches,
        signals,
        metrics,
        health,
        runner,
    };
    let result = tokio::select! {
        r = sync.run(dp) => r,
        _ = shutdown_signal() => {
            tracing::info!("shutting down; rules stay programmed");
            Ok(())
        }
    };
    for s in servers {
        s.abort();
    }
    result
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

struct SyncLoop {
    cfg: ProxyConfig,
    model_cfg: model::ModelConfig,
    caches: watch::Caches,
    signals: Arc<watch::WatchSignals>,
    metrics: Arc<metrics::Metrics>,
    health: Arc<health::HealthState>,
    runner: Runner,
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

impl SyncLoop {
    /// The model changes since the last sync: everything when `full`, else only
    /// the services the watchers marked.
    fn model_changes(&self, state: &mut model::ModelState, full: bool) -> ModelDiff {
        let dirty = std::mem::take(&mut *self.signals.dirty.lock().unwrap());
        let node = self.caches.node.state().into_iter().next();
        self.health
            .set_node_eligible(node_eligible(node.as_deref()));
        if full || dirty.all {
            let services = self.caches.services.state();
            let slices = self.caches.slices.state();
            let s: Vec<&k8s_openapi::api::core::v1::Service> =
                services.iter().map(|a| a.as_ref()).collect();
            let e: Vec<&k8s_openapi::api::discovery::v1::EndpointSlice> =
                slices.iter().map(|a| a.as_ref()).collect();
            return state.rebuild(&s, &e, node.as_deref());
        }
        let mut d = ModelDiff::default();
        for key in &dirty.services {
            let svc = self
                .caches
                .services
                .get(&kube::runtime::reflector::ObjectRef::new(&key.1).within(&key.0));
            let refs = self.signals.slice_index.lock().unwrap().slices_of(key);
            let slices: Vec<_> = refs
                .iter()
                .filter_map(|r| self.caches.slices.get(r))
                .collect();
            let slices: Vec<&k8s_openapi::api::discovery::v1::EndpointSlice> =
                slices.iter().map(|a| a.as_ref()).collect();
            d.merge(state.update(key, svc.as_deref(), &slices));
        }
        d
    }

    async fn run(self, mut dp: Box<dyn Datapath>) -> anyhow::Result<()> {
        let mut state = model::ModelState::new(self.model_cfg.clone(), None);
        // Nothing the kernel holds is trusted before a successful full sync; the
        // UDP conntrack table is reconciled by listing after each such recovery.
        let mut retry_full = true;
        let mut reconcile_conntrack = true;
        let mut last_sync_start: Option<Instant> = None;
        let mut last_full = Instant::now();
        let mut hc_servers = health::HealthCheckServers::default();
        let mut seen_warnings = std::collections::BTreeSet::new();
        let mut counted = (0i64, 0i64);
        loop {
            // Wait for a change, or for the periodic full resync.
            let until_full = self.cfg.sync_period.saturating_sub(last_full.elapsed());
            let woke = tokio::time::timeout(until_full, self.signals.notify.notified())
                .await
                .is_ok();
            let (svc_n, ep_n) = (
                self.signals.service_changes.load(Ordering::Relaxed),
                self.signals.endpoint_changes.load(Ordering::Relaxed),
            );
            self.metrics.service_changes_pending.set(svc_n - counted.0);
            self.metrics.endpoint_changes_pending.set(ep_n - counted.1);
            if woke {
                self.health.queued();
                self.metrics.last_queued_timestamp.set(unix_now());
            }
            if !self.signals.ready() {
                continue; // nothing is programmed before both caches listed once
            }
            // Coalesce: at most one sync per minSyncPeriod.
            if let Some(t) = last_sync_start {
                let since = t.elapsed();
                if since < self.cfg.min_sync_period {
                    tokio::time::sleep(self.cfg.min_sync_period - since).await;
                }
            }
            let (svc_n, ep_n) = (
                self.signals.service_changes.load(Ordering::Relaxed),
                self.signals.endpoint_changes.load(Ordering::Relaxed),
            );
            let triggers: Vec<SystemTime> =
                std::mem::take(&mut *self.signals.trigger_times.lock().unwrap());
            let start = Instant::now();
            last_sync_start = Some(start);
            let full = retry_full || last_full.elapsed() >= self.cfg.sync_period;
            let d = self.model_changes(&mut state, full);
            for w in &state.model.warnings {
                if seen_warnings.insert(w.clone()) {
                    tracing::warn!("skipping invalid object: {w}");
                    self.metrics
                        .invalid_objects_total
                        .with_label_values(&[&w.kind.to_string()])
                        .inc();
                }
            }
            seen_warnings.retain(|w| state.model.warnings.contains(w));

            let (res, dp_back, state_back, d) = tokio::task::spawn_blocking(move || {
                let r = if full {
                    dp.sync_full(&state.model)
                } else if d.is_empty() {
                    Ok(())
                } else {
                    dp.apply_diff(&state.model, &d)
                };
                (r, dp, state, d)
            })
            .await?;
            dp = dp_back;
            state = state_back;
            let elapsed = start.elapsed().as_secs_f64();
            match res {
                Ok(()) => {
                    retry_full = false;
                    self.metrics.sync_duration.observe(elapsed);
                    if full {
                        self.metrics.sync_full_duration.observe(elapsed);
                        last_full = Instant::now();
                    } else {
                        self.metrics.sync_partial_duration.observe(elapsed);
                    }
                    self.metrics.last_sync_timestamp.set(unix_now());
                    self.metrics
                        .service_changes_total
                        .inc_by((svc_n - counted.0).max(0) as u64);
                    self.metrics
                        .endpoint_changes_total
                        .inc_by((ep_n - counted.1).max(0) as u64);
                    counted = (svc_n, ep_n);
                    self.metrics.service_changes_pending.set(0);
                    self.metrics.endpoint_changes_pending.set(0);
                    let now = SystemTime::now();
                    for t in triggers {
                        if let Ok(lat) = now.duration_since(t) {
                            self.metrics
                                .network_programming_duration
                                .observe(lat.as_secs_f64());
                        }
                    }
                    self.health.updated();
                    if reconcile_conntrack {
                        let (runner, model) = (self.runner.clone(), state.model.clone());
                        let _ = tokio::task::spawn_blocking(move || {
                            conntrack::reconcile(&runner, &model)
                        })
                        .await;
                        reconcile_conntrack = false;
                    } else {
                        let stale = conntrack::stale_udp(&state.model, &d);
                        if !stale.is_empty() {
                            let runner = self.runner.clone();
                            let _ = tokio::task::spawn_blocking(move || {
                                conntrack::apply(&runner, &stale)
                            })
                            .await;
                        }
                    }
                    self.health
                        .set_health_checks(state.model.health_checks.clone());
                    hc_servers.reconcile(&self.health).await;
                    tracing::debug!(full, changes = d.len(), seconds = elapsed, "synced");
                }
                Err(e) => {
                    self.metrics.sync_failures_total.inc();
                    tracing::error!("sync failed (will retry with a full sync): {e:#}");
                    // The model is right; what the kernel holds is unknown: resync fully.
                    retry_full = true;
                    reconcile_conntrack = true;
                    self.signals.trigger_times.lock().unwrap().extend(triggers);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    self.signals.notify.notify_one();
                }
            }
        }
    }
}
