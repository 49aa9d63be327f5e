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
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new()?;
    match cli.command {
        Command::Controlplane(args) => runtime.block_on(ferry_controlplane::run(args)),
        Command::Proxy(args) => runtime.block_on(ferry_proxy::run(args)),
    }
}
