//! What `ferry cluster up` made, recorded before it is made, so `down` can
//! remove it all even after a crash.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

const FILE: &str = "cluster.json";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: String,
    pub netns: String,
    pub address: Ipv4Addr,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ClusterState {
    pub dir: PathBuf,
    pub fabric_netns: String,
    /// Every namespace, in creation order.
    pub netns: Vec<String>,
    pub nodes: Vec<NodeRecord>,
    /// (what, pid) of every process started.
    pub pids: Vec<(String, u32)>,
    pub admin_kubeconfig: PathBuf,
}

impl ClusterState {
    pub fn new(dir: &Path, name: &str) -> ClusterState {
        ClusterState {
            dir: dir.to_path_buf(),
            fabric_netns: format!("{name}-fabric"),
            netns: Vec::new(),
            nodes: Vec::new(),
            pids: Vec::new(),
            admin_kubeconfig: dir.join("admin.kubeconfig"),
        }
    }

    pub fn exists(dir: &Path) -> bool {
        dir.join(FILE).exists()
    }

    pub fn load(dir: &Path) -> Result<ClusterState> {
        let path = dir.join(FILE);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{} is not a cluster state file", path.display()))
    }

    pub fn save(&self) -> Result<()> {
        let path = self.dir.join(FILE);
        let tmp = self.dir.join(format!("{FILE}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))
    }

    pub fn record_netns(&mut self, name: &str) -> Result<()> {
        if !self.netns.iter().any(|n| n == name) {
            self.netns.push(name.to_string());
        }
        self.save()
    }

    pub fn record_pid(&mut self, what: &str, pid: u32) -> Result<()> {
        self.pids.push((what.to_string(), pid));
        self.save()
    }
}
