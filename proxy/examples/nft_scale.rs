//! Writes the nftables full-sync transaction for a synthetic cluster, to time
//! `nft -f` at scale in a scratch network namespace:
//!
//! ```text
//! cargo run -p ferry-proxy --example nft_scale -- 10000 10 /tmp/full.nft
//! ip netns add scratch && time ip netns exec scratch nft -f /tmp/full.nft
//! ```
//!
//! Arguments: services (ClusterIP, TCP port 80), endpoints per service, output file.

use ferry_proxy::fixtures::{ep, service, slice};
use ferry_proxy::model::{self, ModelConfig, NodePortAddressesConfig};
use ferry_proxy::nftables;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let services: u32 = args.get(1).map_or(Ok(10_000), |s| s.parse())?;
    let endpoints: u32 = args.get(2).map_or(Ok(10), |s| s.parse())?;
    let out = args.get(3).map_or("/tmp/ferry-full.nft", |s| s.as_str());
    const HTTP: &[(&str, u16, &str)] = &[("http", 80, "TCP")];
    let mut svcs = Vec::new();
    let mut slices = Vec::new();
    for i in 0..services {
        let name = format!("s{i}");
        let cip = format!("10.96.{}.{}", i / 256, i % 256);
        svcs.push(service("ns", &name, &cip, HTTP));
        let eps: Vec<_> = (0..endpoints)
            .map(|j| {
                let n = i * endpoints + j;
                let ip = format!("10.{}.{}.{}", 100 + n / 65536 % 256, n / 256 % 256, n % 256);
                ep(&ip, if j % 2 == 0 { "node-a" } else { "node-b" })
            })
            .collect();
        slices.push(slice("ns", &name, &format!("{name}-abc"), HTTP, &eps));
    }
    let config = ModelConfig {
        node_name: "node-a".into(),
        cluster_cidrs: vec!["10.0.0.0/8".parse()?],
        masquerade_all: false,
        node_port_addresses: NodePortAddressesConfig::Primary,
    };
    let node = ferry_proxy::fixtures::node("node-a", &["192.168.50.2"]);
    let m = model::build(&svcs, &slices, Some(&node), &config);
    let tx = nftables::render_full_transaction(&m, &nftables::Existing::default());
    std::fs::write(out, &tx)?;
    eprintln!(
        "{} service ports, {} lines → {out}",
        m.services.len(),
        tx.lines().count()
    );
    Ok(())
}
