//! `ferry bench`: measures ferry against the machine's own limits and writes a
//! report under `--out` (default `results/`): `SUITE.json` (records {path, mode,
//! metric, unit, median, min, max, runs, ratio_to_direct, tool}), `SUITE.md` and
//! charts (`SUITE.svg`, `SUITE.png`).
//!
//! Suites: `controlplane` (list / watch fan-out / writes / RSS at 10,000 services
//! and 100,000 endpoints), `programming` (full sync and change-to-live of the
//! nftables and iptables modes), `datapath` (direct vs ClusterIP vs NodePort:
//! throughput, latency, connection rate, UDP rate), `overlay` (pod → pod across
//! nodes over VXLAN and host-gw vs the underlay between the nodes, same figures).
//! Everything runs between
//! network namespaces the bench makes and removes; every loop is bounded.

pub mod chart;
pub mod cluster;
pub mod controlplane;
pub mod datapath;
pub mod loadgen;
pub mod overlay;
pub mod programming;
pub mod report;
pub mod stats;
pub mod topology;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;

/// Which suite(s) to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Suite {
    Controlplane,
    Programming,
    Datapath,
    Overlay,
    All,
}

impl Suite {
    fn name(self) -> &'static str {
        match self {
            Suite::Controlplane => "controlplane",
            Suite::Programming => "programming",
            Suite::Datapath => "datapath",
            Suite::Overlay => "overlay",
            Suite::All => "all",
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Suite to run: controlplane, programming, datapath, overlay or all.
    #[arg(value_enum)]
    pub suite: Suite,
    /// Shrink counts and durations (a smoke run of a minute or two).
    #[arg(long)]
    pub quick: bool,
    /// Directory for SUITE.json, SUITE.md and the charts.
    #[arg(long, default_value = "results")]
    pub out: PathBuf,
    /// The ferry binary to run the control plane and proxy with (default: this
    /// executable when it is `ferry`, else `ferry` beside it).
    #[arg(long)]
    pub ferry_bin: Option<PathBuf>,
}

/// What every suite needs.
pub struct Ctx {
    pub ferry: PathBuf,
    pub quick: bool,
    pub out: PathBuf,
}

pub async fn run(args: BenchArgs) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    anyhow::ensure!(
        unsafe { libc::geteuid() } == 0,
        "ferry bench needs root (network namespaces, netfilter)"
    );
    // kube-rs leaves the choice of rustls crypto provider to the binary.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ctx = Ctx {
        ferry: cluster::ferry_bin(args.ferry_bin.as_deref())?,
        quick: args.quick,
        out: args.out.clone(),
    };
    let suites: Vec<Suite> = match args.suite {
        Suite::All => vec![
            Suite::Controlplane,
            Suite::Programming,
            Suite::Datapath,
            Suite::Overlay,
        ],
        s => vec![s],
    };
    let env = report::environment();
    cluster::progress(format!(
        "ferry bench {}{}: ferry binary {}, results in {}",
        args.suite.name(),
        if ctx.quick { " --quick" } else { "" },
        ctx.ferry.display(),
        ctx.out.display()
    ));
    let mut failed = Vec::new();
    for s in suites {
        let t = Instant::now();
        cluster::progress(format!("== suite {} ==", s.name()));
        let r = match s {
            Suite::Controlplane => controlplane::run(&ctx).await,
            Suite::Programming => programming::run(&ctx).await,
            Suite::Datapath => datapath::run(&ctx).await,
            Suite::Overlay => overlay::run(&ctx).await,
            Suite::All => unreachable!(),
        };
        match r {
            Ok(rep) => {
                let files = rep.write(&ctx.out, &env)?;
                println!("\n{}", rep.markdown_table());
                for n in &rep.notes {
                    println!("- {n}");
                }
                cluster::progress(format!(
                    "suite {} done in {:.0} s; wrote {}",
                    s.name(),
                    t.elapsed().as_secs_f64(),
                    files
                        .iter()
                        .map(|f| f.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            Err(e) => {
                cluster::progress(format!("suite {} FAILED: {e:#}", s.name()));
                failed.push(format!("{}: {e:#}", s.name()));
            }
        }
    }
    if !failed.is_empty() {
        anyhow::bail!("suites failed: {}", failed.join("; "));
    }
    Ok(())
}
