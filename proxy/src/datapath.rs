//! The interface every datapath (nftables, iptables, and later userspace and eBPF)
//! implements, plus the small command runner the netfilter modes share.

use std::io::Write;
use std::process::{Command, Stdio};

use anyhow::{bail, Context};

use crate::model::{ModelDiff, ProxyModel};

/// A reconciler that makes one datapath match a [`ProxyModel`].
pub trait Datapath: Send {
    /// Short name ("nftables", "iptables", ...), used in logs and metrics.
    fn name(&self) -> &'static str;
    /// Programs the whole model, removing anything stale (first sync, periodic
    /// resync, node-wide changes, recovery after a failed partial sync).
    fn sync_full(&mut self, model: &ProxyModel) -> anyhow::Result<()>;
    /// Applies only the service ports in `diff` (the model after them is `new`).
    /// Implementations fall back to a full sync when they must.
    fn apply_diff(&mut self, new: &ProxyModel, diff: &ModelDiff) -> anyhow::Result<()>;
    /// Removes everything this datapath ever created.
    fn cleanup(&mut self) -> anyhow::Result<()>;
}

/// Runs the netfilter tools, optionally inside a named network namespace
/// (`ip netns exec NS ...`), which is how the kernel tests drive a node namespace.
#[derive(Debug, Clone, Default)]
pub struct Runner {
    pub netns: Option<String>,
}

impl Runner {
    pub fn host() -> Self {
        Runner { netns: None }
    }
    pub fn in_netns(ns: &str) -> Self {
        Runner {
            netns: Some(ns.to_string()),
        }
    }
    /// A command for `prog` in this runner's namespace.
    pub fn command(&self, prog: &str) -> Command {
        match &self.netns {
            None => Command::new(prog),
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, prog]);
                c
            }
        }
    }
    /// Runs `prog args` and returns stdout; fails with stderr on a non-zero exit.
    pub fn run(&self, prog: &str, args: &[&str]) -> anyhow::Result<String> {
        let out = self
            .command(prog)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {prog}"))?;
        if !out.status.success() {
            bail!(
                "{prog} {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
    /// Runs `prog args` feeding `input` on stdin.
    pub fn run_stdin(&self, prog: &str, args: &[&str], input: &str) -> anyhow::Result<String> {
        let mut child = self
            .command(prog)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {prog}"))?;
        let mut stdin = child.stdin.take().expect("piped stdin");
        // Write from a thread so a large input cannot deadlock against full pipes.
        let data = input.as_bytes().to_vec();
        let writer = std::thread::spawn(move || stdin.write_all(&data));
        let out = child.wait_with_output()?;
        let _ = writer.join();
        if !out.status.success() {
            bail!(
                "{prog} {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
    /// True when `prog args` exits 0 (output discarded).
    pub fn succeeds(&self, prog: &str, args: &[&str]) -> bool {
        self.command(prog)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }
}
