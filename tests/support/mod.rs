//! Shared pieces of the end-to-end tests: a real `ferry controlplane` process
//! on a loopback port (or on an address inside a network namespace) with its
//! own data directory, removed on drop; and (`cluster`) a whole cluster made
//! with `ferry cluster up`.
#![allow(dead_code)] // each test binary uses its own subset

pub mod cluster;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn ferry_bin() -> &'static str {
    env!("CARGO_BIN_EXE_ferry")
}

/// A free loopback port (the small race with other binders is acceptable here).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running control plane; killed (and its directory removed) on drop.
pub struct ControlPlane {
    pub dir: tempfile::TempDir,
    pub port: u16,
    /// The address it listens on and clients dial.
    pub host: String,
    /// The network namespace it runs in (`ip netns exec`), when not the caller's.
    pub netns: Option<String>,
    extra_args: Vec<String>,
    child: Option<Child>,
}

impl ControlPlane {
    pub fn start() -> ControlPlane {
        Self::start_with(&[])
    }

    pub fn start_with(extra_args: &[&str]) -> ControlPlane {
        let mut cp = ControlPlane {
            dir: tempfile::tempdir().expect("temp dir"),
            port: free_port(),
            host: "127.0.0.1".into(),
            netns: None,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            child: None,
        };
        cp.spawn();
        cp
    }

    /// Runs the control plane inside network namespace `netns`, listening on
    /// `ip:6443` (an address of that namespace). kubectl runs there too.
    pub fn start_in_netns(netns: &str, ip: &str, extra_args: &[&str]) -> ControlPlane {
        let mut cp = ControlPlane {
            dir: tempfile::tempdir().expect("temp dir"),
            port: 6443,
            host: ip.to_string(),
            netns: Some(netns.to_string()),
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            child: None,
        };
        cp.spawn();
        cp
    }

    /// A command for `prog` in the control plane's namespace.
    fn command(&self, prog: &str) -> Command {
        match &self.netns {
            None => Command::new(prog),
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, prog]);
                c
            }
        }
    }

    /// The server accepts TCP connections (checked from its namespace).
    fn accepts(&self) -> bool {
        let addr = format!("{}:{}", self.host, self.port);
        let connect = move || {
            Ok(
                std::net::TcpStream::connect_timeout(&addr.parse()?, Duration::from_millis(500))
                    .is_ok(),
            )
        };
        match &self.netns {
            None => connect().unwrap_or(false),
            Some(ns) => ferry_testkit::run_in_netns(ns, connect).unwrap_or(false),
        }
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("admin.kubeconfig")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("controlplane.log")).unwrap();
        let _ = std::fs::remove_file(self.kubeconfig());
        let child = self
            .command(ferry_bin())
            .arg("controlplane")
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--listen")
            .arg(format!("{}:{}", self.host, self.port))
            .arg("--kubeconfig-out")
            .arg(self.kubeconfig())
            .args(&self.extra_args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn ferry controlplane");
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.kubeconfig().exists() && self.accepts() {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("controlplane exited early ({status}): {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("controlplane not ready in 20 s: {}", self.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("controlplane.log")).unwrap_or_default()
    }

    /// kill -9: no chance to flush anything that was not already durable.
    pub fn kill_hard(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn restart(&mut self) {
        self.kill_hard();
        self.spawn();
    }

    /// Runs the installed kubectl against this control plane.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_stdin(args, None)
    }

    pub fn kubectl_stdin(&self, args: &[&str], stdin: Option<&str>) -> Output {
        use std::io::Write;
        let mut child = self
            .command("kubectl")
            .env("KUBECONFIG", self.kubeconfig())
            .env("HOME", self.dir.path())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl is installed");
        if let Some(input) = stdin {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .unwrap();
        }
        drop(child.stdin.take());
        child.wait_with_output().unwrap()
    }

    /// kubectl that must succeed; returns stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// A kube-rs client for this control plane.
    pub async fn client(&self) -> kube::Client {
        let kubeconfig = kube::config::Kubeconfig::read_from(self.kubeconfig()).unwrap();
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .unwrap();
        kube::Client::try_from(config).unwrap()
    }

    /// The admin bearer token and base URL, for raw HTTP requests.
    pub fn token(&self) -> String {
        let text = std::fs::read_to_string(self.kubeconfig()).unwrap();
        text.lines()
            .find_map(|l| l.trim().strip_prefix("token: "))
            .unwrap()
            .to_string()
    }

    pub fn url(&self) -> String {
        format!("https://{}:{}", self.host, self.port)
    }

    pub fn ca_file(&self) -> PathBuf {
        self.data_dir().join("pki/ca.crt")
    }

    /// `curl` over HTTP/1.1. curl 7.88 (Debian 12) fails an HTTP/2 upload
    /// that the server answers before reading the whole body (a 401, 413 or
    /// 415) and ends with RST_STREAM(NO_ERROR), which RFC 9113 §8.1 allows and
    /// Go clients such as kubectl accept; over HTTP/1.1 curl gets the response.
    pub fn curl_http1(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: Option<&[u8]>,
    ) -> (u16, String) {
        curl_with_args(
            &["--http1.1"],
            self.url(),
            &self.ca_file(),
            Some(&self.token()),
            method,
            path,
            content_type,
            body,
        )
    }

    /// A raw HTTPS request with curl (a client that does nothing clever).
    /// Returns (status code, body).
    pub fn curl(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: Option<&[u8]>,
    ) -> (u16, String) {
        curl_with(
            self.url(),
            &self.ca_file(),
            Some(&self.token()),
            method,
            path,
            content_type,
            body,
        )
    }
}

pub fn curl_with(
    base: String,
    ca: &Path,
    token: Option<&str>,
    method: &str,
    path: &str,
    content_type: &str,
    body: Option<&[u8]>,
) -> (u16, String) {
    curl_with_args(&[], base, ca, token, method, path, content_type, body)
}

/// `curl_with` with extra curl arguments (such as `--http1.1`). When curl
/// itself fails (code 0), the returned body is curl's error message.
#[allow(clippy::too_many_arguments)]
pub fn curl_with_args(
    extra_args: &[&str],
    base: String,
    ca: &Path,
    token: Option<&str>,
    method: &str,
    path: &str,
    content_type: &str,
    body: Option<&[u8]>,
) -> (u16, String) {
    use std::io::Write;
    let mut cmd = Command::new("curl");
    cmd.args(extra_args)
        .args([
            "-sS",
            "--max-time",
            "20",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            "-X",
            method,
            "--cacert",
        ])
        .arg(ca)
        .args(["-H", &format!("Content-Type: {content_type}")]);
    if let Some(t) = token {
        cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    if body.is_some() {
        cmd.args(["--data-binary", "@-"]);
    }
    let mut child = cmd
        .arg(format!("{base}{path}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("curl is installed");
    if let Some(b) = body {
        child.stdin.take().unwrap().write_all(b).unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    match code.trim().parse().unwrap_or(0) {
        0 => (0, String::from_utf8_lossy(&out.stderr).to_string()),
        code => (code, body.to_string()),
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.kill_hard();
    }
}
