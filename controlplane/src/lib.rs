//! Ferry's control plane: a Kubernetes-compatible API server over an embedded,
//! watchable store.
//!
//! Layers, outside in: `api` (HTTP, TLS, auth, encoding) → `registry` (object
//! semantics per type) → `cache` (in-memory objects and change fan-out) →
//! `store` (the durable revisioned key-value store behind a trait).

pub mod allocator;
pub mod api;
pub mod auth;
pub mod cache;
pub mod controllers;
pub mod defaults;
pub mod nodeipam;
pub mod patch;
pub mod pki;
pub mod printers;
pub mod protobuf;
pub mod registry;
pub mod resources;
pub mod schema;
pub mod selector;
pub mod services;
pub mod store;
pub mod validation;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;

/// `ferry controlplane` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ControlPlaneArgs {
    /// Where the database, certificates and tokens live.
    #[arg(long, default_value = "/var/lib/ferry/controlplane")]
    pub data_dir: PathBuf,
    /// Address and port to serve HTTPS on.
    #[arg(long, default_value = "127.0.0.1:6443")]
    pub listen: SocketAddr,
    /// Where to write the admin kubeconfig (default: DATA_DIR/admin.kubeconfig).
    #[arg(long)]
    pub kubeconfig_out: Option<PathBuf>,
    /// Address clients use to reach this server (default: the listen address,
    /// or 127.0.0.1 when listening on all addresses).
    #[arg(long)]
    pub advertise_address: Option<IpAddr>,
    /// Extra IP subject alternative names for the serving certificate.
    #[arg(long = "tls-san")]
    pub tls_sans: Vec<IpAddr>,
    /// Range ClusterIPs are allocated from.
    #[arg(long, default_value = "10.96.0.0/12")]
    pub service_cidr: ipnet::Ipv4Net,
    /// Range node ports are allocated from, as FIRST-LAST.
    #[arg(long, default_value = "30000-32767", value_parser = parse_port_range)]
    pub service_node_port_range: (u16, u16),
    /// Range pod CIDRs of nodes are carved from.
    #[arg(long, default_value = "10.244.0.0/16")]
    pub cluster_cidr: ipnet::IpNet,
    /// Prefix length of each node's pod CIDR.
    #[arg(long, default_value_t = 24)]
    pub node_cidr_mask_size: u8,
    /// A node silent this long (seconds) becomes NotReady and is tainted unreachable.
    #[arg(long, default_value_t = 40)]
    pub node_monitor_grace_period: i64,
    /// Pods on an unreachable node are evicted this long (seconds) after it was marked.
    #[arg(long, default_value_t = 300)]
    pub pod_eviction_timeout: i64,
    /// How many recent changes the watch cache keeps for resuming watches.
    #[arg(long, default_value_t = 10_000)]
    pub watch_cache_size: usize,
}

fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("expected FIRST-LAST, got {s:?}"))?;
    let first: u16 = a
        .trim()
        .parse()
        .map_err(|_| format!("{a:?} is not a port number"))?;
    let last: u16 = b
        .trim()
        .parse()
        .map_err(|_| format!("{b:?} is not a port number"))?;
    if first == 0 || first > last {
        return Err(format!(
            "{s:?} is not a range of ports (1-65535, FIRST <= LAST)"
        ));
    }
    Ok((first, last))
}

impl ControlPlaneArgs {
    fn advertise(&self) -> IpAddr {
        self.advertise_address
            .unwrap_or(if self.listen.ip().is_unspecified() {
                IpAddr::V4(Ipv4Addr::LOCALHOST)
            } else {
                self.listen.ip()
            })
    }
}

fn tls_config(creds: &pki::Credentials) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    let certs =
        rustls_pemfile::certs(&mut creds.cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
    let key = rustls_pemfile::private_key(&mut creds.key_pem.as_bytes())?
        .context("no private key in PEM")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Runs the API server until the process is stopped.
pub async fn run(args: ControlPlaneArgs) -> anyhow::Result<()> {
    let node_cidrs = nodeipam::NodeCidrAllocator::new(args.cluster_cidr, args.node_cidr_mask_size)
        .map_err(|e| anyhow::anyhow!("--cluster-cidr/--node-cidr-mask-size: {e}"))?;
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating data dir {}", args.data_dir.display()))?;
    let store = store::SqliteStore::open(&args.data_dir.join("state.db"))
        .with_context(|| format!("opening the store in {}", args.data_dir.display()))?;
    let cache = cache::Cache::start(Arc::new(store), args.watch_cache_size).await?;
    let (first_port, last_port) = args.service_node_port_range;
    let services = services::ServiceAllocations::new(
        allocator::IpAllocator::new(args.service_cidr),
        allocator::PortAllocator::new(first_port, last_port),
    );
    let registry = Arc::new(registry::Registry::new(cache, services));
    let advertise = args.advertise();
    registry
        .bootstrap(Some((advertise, args.listen.port())))
        .await?;
    tokio::spawn(registry.clone().finalize_namespaces());
    let lifecycle = controllers::node_lifecycle::LifecycleConfig {
        grace: chrono::Duration::seconds(args.node_monitor_grace_period),
        eviction_timeout: chrono::Duration::seconds(args.pod_eviction_timeout),
    };
    controllers::start(registry.clone(), node_cidrs, lifecycle);

    let mut sans = vec![
        advertise,
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        registry_first_ip(&args),
    ];
    if !args.listen.ip().is_unspecified() {
        sans.push(args.listen.ip());
    }
    sans.extend(&args.tls_sans);
    sans.sort();
    sans.dedup();
    let dns = vec![
        "localhost".to_string(),
        "kubernetes".into(),
        "kubernetes.default".into(),
        "kubernetes.default.svc".into(),
    ];
    let creds = pki::ensure(&args.data_dir, &sans, &dns)?;
    let tls = tls_config(&creds)?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let server_url = format!("https://{}", SocketAddr::new(advertise, args.listen.port()));
    let kubeconfig_path = args
        .kubeconfig_out
        .clone()
        .unwrap_or_else(|| args.data_dir.join("admin.kubeconfig"));
    std::fs::write(
        &kubeconfig_path,
        pki::kubeconfig(&server_url, &creds.ca_pem, &creds.admin_token),
    )
    .with_context(|| format!("writing kubeconfig {}", kubeconfig_path.display()))?;
    let server = Arc::new(api::ApiServer {
        registry,
        authenticator: Arc::new(auth::StaticTokens::load(&creds.tokens_file)?),
        authorizer: Arc::new(auth::AllowAuthenticated),
        advertise: SocketAddr::new(advertise, args.listen.port()).to_string(),
    });
    tracing::info!(listen = %args.listen, kubeconfig = %kubeconfig_path.display(), "ferry controlplane serving");
    server.serve(listener, tls).await;
    Ok(())
}

/// The `kubernetes` service's address, which in-cluster clients dial.
fn registry_first_ip(args: &ControlPlaneArgs) -> IpAddr {
    IpAddr::V4(allocator::IpAllocator::new(args.service_cidr).first_usable())
}
