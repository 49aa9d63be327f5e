//! A loopback port in the caller's namespace forwarded to an address inside
//! another network namespace: how the user's kubectl reaches the API server
//! in the fabric namespace without any interface of the root namespace changing.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

#[derive(Debug, Clone, clap::Args)]
pub struct ForwardArgs {
    /// The network namespace to connect from (a /var/run/netns path).
    #[arg(long)]
    pub netns: PathBuf,
    #[arg(long)]
    pub listen: SocketAddr,
    #[arg(long)]
    pub to: SocketAddr,
    /// Where to write the port actually bound (for `--listen 127.0.0.1:0`).
    #[arg(long)]
    pub port_file: Option<PathBuf>,
}

/// Connects to `to` from a socket created inside `netns` (a short-lived
/// thread enters the namespace; the socket stays there).
fn connect_in(netns: &Path, to: SocketAddr) -> Result<std::net::TcpStream> {
    let netns = netns.to_path_buf();
    std::thread::spawn(move || -> Result<std::net::TcpStream> {
        ferry_overlay::netns::enter(&netns)?;
        let stream = std::net::TcpStream::connect_timeout(&to, std::time::Duration::from_secs(5))
            .with_context(|| format!("connecting to {to}"))?;
        stream.set_nonblocking(true)?;
        Ok(stream)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("forwarder thread panicked"))?
}

pub async fn run(args: ForwardArgs) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    if let Some(file) = &args.port_file {
        // Written only once bound, so the port can never be someone else's.
        let tmp = file.with_extension("tmp");
        std::fs::write(&tmp, listener.local_addr()?.port().to_string())?;
        std::fs::rename(&tmp, file)?;
    }
    loop {
        let (mut client, _) = listener.accept().await?;
        let (netns, to) = (args.netns.clone(), args.to);
        tokio::spawn(async move {
            let upstream = match tokio::task::spawn_blocking(move || connect_in(&netns, to)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return tracing::warn!(error = %e, "forward failed"),
                Err(e) => return tracing::warn!(error = %e, "forward failed"),
            };
            let Ok(mut upstream) = tokio::net::TcpStream::from_std(upstream) else {
                return;
            };
            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        });
    }
}
