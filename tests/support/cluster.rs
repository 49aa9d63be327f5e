//! A whole cluster made for one test with `ferry cluster up`, driven with
//! kubectl like a user would; `ferry cluster down` on drop, even on panic.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// A running cluster; `ferry cluster down` on drop.
pub struct Cluster {
    /// Prefix of its namespaces and node names.
    pub name: String,
    pub state: tempfile::TempDir,
    pub kubeconfig: PathBuf,
}

impl Cluster {
    /// A cluster of `nodes` nodes, or None when not root (see `require_root`).
    pub fn up(nodes: u8) -> Option<Cluster> {
        static CLUSTERS: AtomicUsize = AtomicUsize::new(0);
        if !ferry_testkit::require_root() {
            return None;
        }
        // Unique per test process, and per test within one (cargo test runs them as threads).
        let name = format!(
            "fe{}{}",
            std::process::id() % 100_000,
            char::from(b'a' + (CLUSTERS.fetch_add(1, Ordering::Relaxed) % 26) as u8)
        );
        let state = tempfile::tempdir().unwrap();
        let out = Command::new(super::ferry_bin())
            .args([
                "cluster",
                "up",
                "--nodes",
                &nodes.to_string(),
                "--name",
                &name,
                "--state-dir",
            ])
            .arg(state.path())
            .output()
            .unwrap();
        let mut cluster = Cluster {
            name,
            state,
            kubeconfig: PathBuf::new(),
        };
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "cluster up failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        cluster.kubeconfig = PathBuf::from(stdout.lines().last().unwrap().trim());
        Some(cluster)
    }

    pub fn kubectl(&self, args: &[&str]) -> Output {
        Command::new("kubectl")
            .env("KUBECONFIG", &self.kubeconfig)
            .env("HOME", self.state.path())
            .args(args)
            .output()
            .unwrap()
    }

    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// The network namespace of a part of the cluster: `client`, `fabric`,
    /// `node-N` (node namespaces are named like their nodes).
    pub fn netns(&self, what: &str) -> String {
        format!("{}-{what}", self.name)
    }

    /// An HTTP GET from the client namespace outside the cluster.
    pub fn visit(&self, url: &str) -> Option<String> {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.netns("client"),
                "curl",
                "-s",
                "--max-time",
                "3",
                url,
            ])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    pub fn wait_for(&self, what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if check() {
                return;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        panic!("timed out after {limit:?}: {what}");
    }

    /// (name, node, pod IP) of the pods matching `selector`.
    pub fn pods(&self, selector: &str) -> Vec<(String, String, String)> {
        let out = self.kubectl_ok(&[
            "get", "pods", "-l", selector, "-o",
            "jsonpath={range .items[*]}{.metadata.name} {.spec.nodeName} {.status.podIP}{\"\\n\"}{end}",
        ]);
        out.lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                Some((
                    f.next()?.to_string(),
                    f.next().unwrap_or("").to_string(),
                    f.next().unwrap_or("").to_string(),
                ))
            })
            .collect()
    }

    /// Deploys an app of `examples/`: the ConfigMap `config_map.0` holding its
    /// code (`config_map.1`, a path in this repository), then `manifest`;
    /// waits for `deployments` (`deploy/<name>`) to roll out.
    pub fn deploy(&self, config_map: (&str, &str), manifest: &str, deployments: &[&str]) {
        let root = env!("CARGO_MANIFEST_DIR");
        let (name, file) = config_map;
        let key = file.rsplit('/').next().unwrap();
        self.kubectl_ok(&[
            "create",
            "configmap",
            name,
            &format!("--from-file={key}={root}/{file}"),
        ]);
        self.kubectl_ok(&["apply", "-f", &format!("{root}/{manifest}")]);
        let mut rollout = vec!["rollout", "status"];
        rollout.extend(deployments);
        rollout.push("--timeout=180s");
        self.kubectl_ok(&rollout);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(super::ferry_bin())
            .args(["cluster", "down", "--state-dir"])
            .arg(self.state.path())
            .output();
    }
}
