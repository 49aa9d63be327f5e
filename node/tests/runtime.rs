//! Root tests of the process runner: a container process in a fresh network
//! namespace (made here, removed on drop) with a private mount namespace.

use std::path::Path;
use std::time::{Duration, Instant};

use ferry_node::runtime::{self, BindMount, SpawnSpec};

struct NsGuard(std::path::PathBuf);

impl Drop for NsGuard {
    fn drop(&mut self) {
        runtime::remove_netns(&self.0);
    }
}

#[tokio::test]
async fn process_in_pod_namespaces() {
    if !ferry_testkit::require_root() {
        return;
    }
    let name = runtime::netns_name(&format!("runtime-test-{}", std::process::id()));
    let ns = NsGuard(runtime::create_netns(&name).unwrap());
    assert!(runtime::is_netns_file(&ns.0));
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("file.txt"), "mounted\n").unwrap();
    let target = dir.path().join("target");
    let log = dir.path().join("log/0.log");
    let spec = SpawnSpec {
        program: "/bin/sh".into(),
        argv: vec![
            "sh".into(),
            "-c".into(),
            "ip link set lo up; cat file.txt; hostname; exec python3 -m http.server 8080 --bind 127.0.0.1".into(),
        ],
        env: vec![("PATH".into(), ferry_node::env::DEFAULT_PATH.into())],
        cwd: Some(target.clone()),
        netns: Some(ns.0.clone()),
        mounts: vec![BindMount { source: src.clone(), target: target.clone(), read_only: true }],
        hostname: Some("podhost".into()),
        log_path: log.clone(),
    };
    let mut started = runtime::spawn(&spec).unwrap();
    let pid = started.pid;
    // The process is in the pod's namespace and serves there.
    let deadline = Instant::now() + Duration::from_secs(20);
    let ok = loop {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &name, "python3", "-c",
                "import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:8080/file.txt',timeout=2).read().decode())"])
            .output()
            .unwrap();
        if out.status.success() {
            break String::from_utf8_lossy(&out.stdout).into_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no answer in the pod namespace: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(ok, "mounted\n\n");
    // Not reachable from this (the test's) namespace, and the mount is private.
    assert!(
        std::net::TcpStream::connect_timeout(
            &"127.0.0.1:8080".parse().unwrap(),
            Duration::from_millis(300)
        )
        .is_err()
            || !Path::new(&format!("/proc/{pid}")).exists()
    );
    assert!(!target.join("file.txt").exists());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.starts_with("mounted\npodhost\n"), "{text}");
    // Graceful stop.
    runtime::signal_group(pid, libc_sigterm());
    let st = tokio::time::timeout(Duration::from_secs(10), started.child.wait())
        .await
        .unwrap()
        .unwrap();
    let (code, _) = runtime::exit_code(&st);
    assert!(code == 143 || code == 0 || code == 1, "{code}");
}

fn libc_sigterm() -> i32 {
    15
}
