//! `ferry`: one binary, one subcommand per component (like k3s).

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "Kubernetes service proxy, pod network and a small control plane"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Kubernetes-compatible API server with an embedded store.
    Controlplane(ferry_controlplane::ControlPlaneArgs),
    /// Service proxy (kube-proxy replacement): nftables or iptables mode.
    Proxy(ferry_proxy::ProxyArgs),
    /// Pod network: flannel-compatible VXLAN / host-gw overlay.
    Overlay(ferry_overlay::OverlayArgs),
    /// CNI plugin: CNI_* from the environment, network config on stdin, result on stdout.
    Cni,
    /// Node agent: registers its Node and runs the pods bound to it as processes.
    Node(ferry_node::NodeArgs),
    /// Benchmarks: control plane, rule programming, datapath, overlay; a report in --out.
    Bench(ferry_bench::BenchArgs),
    /// A whole multi-node cluster on this machine, nodes as network namespaces.
    Cluster {
        #[command(subcommand)]
        command: ferry_cluster::ClusterCommand,
    },
}

fn main() -> anyhow::Result<()> {
    // A container runtime runs CNI plugins with no arguments, by file name
    // (/opt/cni/bin/ferry): answer as the plugin then.
    if std::env::args().len() == 1 && std::env::var_os("CNI_COMMAND").is_some() {
        std::process::exit(ferry_overlay::cni_main());
    }
    let cli = Cli::parse();
    // The bench prints its own progress; the libraries it drives stay quiet.
    let default_level = match cli.command {
        Command::Bench(_) => "warn",
        _ => "info",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_level.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Runtime::new()?;
    match cli.command {
        Command::Controlplane(args) => runtime.block_on(ferry_controlplane::run(args)),
        Command::Proxy(args) => runtime.block_on(ferry_proxy::run(args)),
        Command::Overlay(args) => runtime.block_on(ferry_overlay::run(args)),
        Command::Cni => std::process::exit(ferry_overlay::cni_main()),
        Command::Node(args) => runtime.block_on(ferry_node::run(args)),
        Command::Bench(args) => runtime.block_on(ferry_bench::run(args)),
        Command::Cluster { command } => runtime.block_on(ferry_cluster::run(command)),
    }
}
