//! `ferry cluster up|down|kubeconfig`: a whole multi-node cluster on one
//! machine, without Docker.
//!
//! Layout: a fabric namespace holds the underlay bridge (198.18.0.0/24, the
//! range reserved for network testing) and the control plane; each node is a
//! namespace with `eth0` on that bridge, running `ferry node`; `ferry proxy`
//! and `ferry overlay` run on every node as hostNetwork DaemonSet pods from
//! deploy/, as on a real cluster. The user's kubectl reaches the API through a
//! loopback forwarder, so the root namespace's interfaces are never changed.
//! Everything made is recorded in the state directory first, so `down` can
//! remove it even after a crash.

mod forward;
mod state;
mod topology;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub use forward::ForwardArgs;
use state::{ClusterState, NodeRecord};

/// The underlay: fabric bridge address and the first node address.
const FABRIC_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const PREFIX: u8 = 24;
const API_PORT: u16 = 6443;
/// The outside client's address is 198.18.0.(10 + this).
const CLIENT_INDEX: u8 = 90;
const PROXY_MANIFEST: &str = include_str!("../../deploy/ferry-proxy.yaml");
const OVERLAY_MANIFEST: &str = include_str!("../../deploy/ferry-overlay.yaml");

#[derive(Debug, clap::Subcommand)]
pub enum ClusterCommand {
    /// Builds the cluster and prints the admin kubeconfig's path last.
    Up(UpArgs),
    /// Removes every namespace, process, rule and file `up` made.
    Down(StateArgs),
    /// Prints the admin kubeconfig's path.
    Kubeconfig(StateArgs),
    /// (internal) Forwards a loopback port to the API server in the fabric namespace.
    #[command(hide = true)]
    Forward(ForwardArgs),
}

#[derive(Debug, Clone, clap::Args)]
pub struct StateArgs {
    /// Where the cluster records what it made.
    #[arg(long, default_value = "/var/lib/ferry/cluster")]
    pub state_dir: PathBuf,
}

#[derive(Debug, Clone, clap::Args)]
pub struct UpArgs {
    #[command(flatten)]
    pub state: StateArgs,
    /// Number of nodes.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=60))]
    pub nodes: u8,
    /// Service proxy mode on every node.
    #[arg(long, default_value = "nftables", value_parser = ["nftables", "iptables"])]
    pub proxy_mode: String,
    /// Pod network backend.
    #[arg(long, default_value = "vxlan", value_parser = ["vxlan", "host-gw"])]
    pub backend: String,
    /// Prefix of the namespaces made (ferry-fabric, ferry-node-1, …).
    #[arg(long, default_value = "ferry")]
    pub name: String,
    /// Loopback port for the admin kubeconfig (0 picks a free one).
    #[arg(long, default_value_t = 0)]
    pub api_port: u16,
}

pub async fn run(command: ClusterCommand) -> Result<()> {
    match command {
        ClusterCommand::Up(args) => up(args).await,
        ClusterCommand::Down(args) => down(&args.state_dir),
        ClusterCommand::Kubeconfig(args) => {
            let state = ClusterState::load(&args.state_dir)?;
            println!("{}", state.admin_kubeconfig.display());
            Ok(())
        }
        ClusterCommand::Forward(args) => forward::run(args).await,
    }
}

fn ferry_binary() -> Result<PathBuf> {
    std::env::current_exe().context("finding the ferry binary")
}

fn node_address(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, 10 + i)
}

/// Waits until `check` holds, or fails after `limit` with `what`.
async fn wait_until(
    what: &str,
    limit: Duration,
    mut check: impl AsyncFnMut() -> bool,
) -> Result<()> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if check().await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("timed out after {limit:?} waiting for {what}")
}

async fn up(args: UpArgs) -> Result<()> {
    let dir = &args.state.state_dir;
    if ClusterState::exists(dir) {
        bail!(
            "a cluster is already up (state in {}); run `ferry cluster down` first",
            dir.display()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    let mut state = ClusterState::new(&dir, &args.name);
    state.save()?;
    let result = build(&args, &mut state).await;
    if let Err(e) = &result {
        eprintln!(
            "cluster up failed: {e:#}\nrun `ferry cluster down --state-dir {}` to clean up",
            dir.display()
        );
    }
    result
}

async fn build(args: &UpArgs, state: &mut ClusterState) -> Result<()> {
    let ferry = ferry_binary()?;
    println!(
        "fabric: namespace {} with bridge {FABRIC_IP}/{PREFIX}",
        state.fabric_netns
    );
    state.record_netns(&state.fabric_netns.clone())?;
    topology::create_fabric(&state.fabric_netns, FABRIC_IP, PREFIX).await?;
    for i in 1..=args.nodes {
        let node = NodeRecord {
            name: format!("{}-node-{i}", args.name),
            netns: format!("{}-node-{i}", args.name),
            address: node_address(i),
        };
        state.record_netns(&node.netns)?;
        topology::create_node(
            &state.fabric_netns,
            &node.netns,
            i,
            node.address,
            PREFIX,
            FABRIC_IP,
        )
        .await?;
        println!(
            "node {}: namespace {} at {}",
            node.name, node.netns, node.address
        );
        state.nodes.push(node);
        state.save()?;
    }

    // A host outside the cluster on the same underlay, to reach NodePorts from.
    let client_ns = format!("{}-client", args.name);
    state.record_netns(&client_ns)?;
    topology::create_node(
        &state.fabric_netns,
        &client_ns,
        CLIENT_INDEX,
        node_address(CLIENT_INDEX),
        PREFIX,
        FABRIC_IP,
    )
    .await?;
    println!(
        "client: namespace {client_ns} at {} (outside the cluster)",
        node_address(CLIENT_INDEX)
    );

    let api = SocketAddr::from((FABRIC_IP, API_PORT));
    let cp_dir = state.dir.join("controlplane");
    let node_kubeconfig = state.dir.join("node.kubeconfig");
    let pid = topology::spawn_in(
        &state.fabric_netns,
        &ferry,
        &[
            "controlplane".into(),
            "--data-dir".into(),
            cp_dir.display().to_string(),
            "--listen".into(),
            api.to_string(),
            "--kubeconfig-out".into(),
            node_kubeconfig.display().to_string(),
            "--pod-eviction-timeout".into(),
            "30".into(),
        ],
        &state.dir.join("controlplane.log"),
    )?;
    state.record_pid("controlplane", pid)?;
    let kc = node_kubeconfig.clone();
    wait_until("the control plane", Duration::from_secs(60), async || {
        kc.exists()
    })
    .await
    .with_context(|| {
        format!(
            "control plane log:\n{}",
            log_tail(&state.dir.join("controlplane.log"))
        )
    })?;

    // The forwarder binds (port 0: any free one) and then says which port, so
    // two clusters on one machine can never end up sharing one.
    let fabric_path = topology::netns_path(&state.fabric_netns);
    let port_file = state.dir.join("forward.port");
    let pid = topology::spawn_in_root(
        &ferry,
        &[
            "cluster".into(),
            "forward".into(),
            "--netns".into(),
            fabric_path.display().to_string(),
            "--listen".into(),
            format!("127.0.0.1:{}", args.api_port),
            "--to".into(),
            api.to_string(),
            "--port-file".into(),
            port_file.display().to_string(),
        ],
        &state.dir.join("forward.log"),
    )?;
    state.record_pid("forward", pid)?;
    let pf = port_file.clone();
    wait_until("the API forwarder", Duration::from_secs(10), async || {
        pf.exists()
    })
    .await?;
    let port: u16 = std::fs::read_to_string(&port_file)?
        .trim()
        .parse()
        .context("reading forward.port")?;
    let admin = std::fs::read_to_string(&node_kubeconfig)?.replace(
        &format!("https://{api}"),
        &format!("https://127.0.0.1:{port}"),
    );
    state.admin_kubeconfig = state.dir.join("admin.kubeconfig");
    std::fs::write(&state.admin_kubeconfig, admin)?;
    state.save()?;

    for node in state.nodes.clone() {
        let node_dir = state.dir.join("nodes").join(&node.name);
        std::fs::create_dir_all(&node_dir)?;
        let pid = topology::spawn_in(
            &node.netns,
            &ferry,
            &[
                "node".into(),
                "--kubeconfig".into(),
                node_kubeconfig.display().to_string(),
                "--node-name".into(),
                node.name.clone(),
                "--address".into(),
                node.address.to_string(),
                "--data-dir".into(),
                node_dir.join("agent").display().to_string(),
                "--subnet-file".into(),
                node_dir.join("subnet.env").display().to_string(),
            ],
            &node_dir.join("node.log"),
        )?;
        state.record_pid(&format!("node {}", node.name), pid)?;
    }

    let client = client(&state.admin_kubeconfig).await?;
    let nodes: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(client.clone());
    let want = state.nodes.len();
    wait_until(
        "every node to register",
        Duration::from_secs(60),
        async || {
            nodes
                .list(&Default::default())
                .await
                .map(|l| l.items.len() >= want)
                .unwrap_or(false)
        },
    )
    .await?;
    let vars = [
        ("${FERRY}", ferry.display().to_string()),
        ("${KUBECONFIG}", node_kubeconfig.display().to_string()),
        ("${PROXY_MODE}", args.proxy_mode.clone()),
        ("${BACKEND}", args.backend.clone()),
        (
            "${NODE_STATE}",
            state.dir.join("nodes").display().to_string(),
        ),
    ];
    for manifest in [OVERLAY_MANIFEST, PROXY_MANIFEST] {
        apply_daemonset(&client, &render(manifest, &vars)).await?;
    }
    println!(
        "ferry overlay and ferry proxy ({}) deployed as DaemonSets in kube-system",
        args.proxy_mode
    );
    let daemonsets: kube::Api<k8s_openapi::api::apps::v1::DaemonSet> =
        kube::Api::namespaced(client, "kube-system");
    wait_until(
        "the overlay and proxy pods to be ready on every node",
        Duration::from_secs(120),
        async || {
            let Ok(list) = daemonsets.list(&Default::default()).await else {
                return false;
            };
            list.items.len() == 2
                && list.items.iter().all(|d| {
                    d.status.as_ref().is_some_and(|s| {
                        s.desired_number_scheduled as usize == want
                            && s.number_ready as usize == want
                    })
                })
        },
    )
    .await?;
    println!("cluster is up: {want} nodes");
    println!("{}", state.admin_kubeconfig.display());
    Ok(())
}

/// The last lines of a log, for error messages.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

fn render(manifest: &str, vars: &[(&str, String)]) -> String {
    vars.iter()
        .fold(manifest.to_string(), |text, (k, v)| text.replace(k, v))
}

async fn client(kubeconfig: &Path) -> Result<kube::Client> {
    let config = kube::config::Kubeconfig::read_from(kubeconfig)?;
    let config = kube::Config::from_custom_kubeconfig(config, &Default::default()).await?;
    Ok(kube::Client::try_from(config)?)
}

async fn apply_daemonset(client: &kube::Client, manifest: &str) -> Result<()> {
    let ds: k8s_openapi::api::apps::v1::DaemonSet =
        serde_yaml::from_str(manifest).context("parsing a deploy/ manifest")?;
    let api: kube::Api<k8s_openapi::api::apps::v1::DaemonSet> =
        kube::Api::namespaced(client.clone(), "kube-system");
    match api.create(&Default::default(), &ds).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The network namespaces of the cluster's pods.
fn pod_namespaces(state: &ClusterState) -> Vec<PathBuf> {
    let list = || -> Result<Vec<String>> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let client = client(&state.admin_kubeconfig).await?;
            let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::all(client);
            let list = tokio::time::timeout(Duration::from_secs(5), pods.list(&Default::default()))
                .await??;
            Ok(list
                .items
                .into_iter()
                .filter_map(|p| p.metadata.uid)
                .collect())
        })
    };
    let uids = std::thread::scope(|s| s.spawn(list).join())
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    uids.iter()
        .map(|uid| topology::netns_path(&ferry_node::runtime::netns_name(uid)))
        .filter(|p| p.exists())
        .collect()
}

/// Stops every process and removes every namespace and file `up` recorded.
pub fn down(dir: &Path) -> Result<()> {
    let state = match ClusterState::load(dir) {
        Ok(s) => s,
        Err(_) if !dir.exists() => {
            println!("no cluster state in {}: nothing to do", dir.display());
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    // Pod namespaces are the node agents' (named after pod uids): learn them
    // from the API while it still answers, and from the agents' records.
    let pod_netns = pod_namespaces(&state);
    for path in &pod_netns {
        topology::kill_processes_in_path(path);
        ferry_node::runtime::remove_netns(path);
    }
    // Then the processes started here, then the namespaces themselves.
    for (what, pid) in &state.pids {
        topology::stop(*pid);
        println!("stopped {what} (pid {pid})");
    }
    for netns in state.netns.iter().rev() {
        let killed = topology::kill_processes_in(netns);
        if killed > 0 {
            println!("stopped {killed} process(es) left in {netns}");
        }
        topology::remove_netns(netns);
        println!("removed namespace {netns}");
    }
    // The overlays' pod fast paths are pinned in bpffs, outside the state directory.
    for node in &state.nodes {
        let subnet_file = state.dir.join("nodes").join(&node.name).join("subnet.env");
        let pins = ferry_overlay::reconciler::default_fastpath_dir(&subnet_file);
        if pins.exists() {
            std::fs::remove_dir_all(&pins)
                .with_context(|| format!("removing {}", pins.display()))?;
            println!("removed {}", pins.display());
        }
    }
    std::fs::remove_dir_all(&state.dir)
        .with_context(|| format!("removing {}", state.dir.display()))?;
    println!("cluster down: nothing left in {}", dir.display());
    Ok(())
}
