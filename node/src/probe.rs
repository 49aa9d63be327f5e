//! Readiness, liveness and startup probes: the spec with the kubelet's
//! defaults, result accounting (success/failure thresholds), and the httpGet
//! and tcpSocket checks (exec probes run through the process runner).

use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, ExecAction, HTTPGetAction, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProbeKind {
    Readiness,
    Liveness,
    Startup,
}

impl ProbeKind {
    pub fn name(self) -> &'static str {
        match self {
            ProbeKind::Readiness => "Readiness",
            ProbeKind::Liveness => "Liveness",
            ProbeKind::Startup => "Startup",
        }
    }
}

/// What a probe (or a lifecycle hook, see `lifecycle`) does against its container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeAction {
    Http {
        host: Option<String>,
        port: u16,
        path: String,
        https: bool,
        headers: Vec<(String, String)>,
    },
    Tcp {
        host: Option<String>,
        port: u16,
    },
    Exec {
        command: Vec<String>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeSpec {
    pub action: ProbeAction,
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

fn secs(v: Option<i32>, default: u64, min: u64) -> Duration {
    Duration::from_secs(v.map(|v| v.max(0) as u64).unwrap_or(default).max(min))
}

/// Resolves a probe port (a number or the name of a container port).
pub fn resolve_port(port: &IntOrString, container: &Container) -> Result<u16, String> {
    match port {
        IntOrString::Int(n) => u16::try_from(*n)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("invalid port {n}")),
        IntOrString::String(s) => {
            if let Ok(n) = s.parse::<u16>() {
                return Ok(n);
            }
            container
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(s.as_str()))
                .and_then(|p| u16::try_from(p.container_port).ok())
                .ok_or_else(|| {
                    format!(
                        "port {s:?} is not a named port of container {}",
                        container.name
                    )
                })
        }
    }
}

/// An httpGet handler (of a probe or a lifecycle hook).
pub fn http_action(h: &HTTPGetAction, container: &Container) -> Result<ProbeAction, String> {
    let https = h
        .scheme
        .as_deref()
        .is_some_and(|s| s.eq_ignore_ascii_case("HTTPS"));
    if https {
        return Err("httpGet over HTTPS is not supported".into());
    }
    let mut path = h.path.clone().unwrap_or_else(|| "/".into());
    if !path.starts_with('/') {
        path.insert(0, '/');
    }
    Ok(ProbeAction::Http {
        host: h.host.clone().filter(|s| !s.is_empty()),
        port: resolve_port(&h.port, container)?,
        path,
        https,
        headers: h
            .http_headers
            .iter()
            .flatten()
            .map(|x| (x.name.clone(), x.value.clone()))
            .collect(),
    })
}

/// An exec handler (of a probe or a lifecycle hook).
pub fn exec_action(e: &ExecAction) -> Result<ProbeAction, String> {
    let command = e.command.clone().unwrap_or_default();
    if command.is_empty() {
        return Err("exec handler has no command".into());
    }
    Ok(ProbeAction::Exec { command })
}

/// The probe with the kubelet's defaults (period 10 s, timeout 1 s, success 1,
/// failure 3). Liveness and startup probes need successThreshold 1.
pub fn probe_spec(
    kind: ProbeKind,
    probe: &Probe,
    container: &Container,
) -> Result<ProbeSpec, String> {
    let action = if let Some(h) = &probe.http_get {
        http_action(h, container)?
    } else if let Some(t) = &probe.tcp_socket {
        ProbeAction::Tcp {
            host: t.host.clone().filter(|s| !s.is_empty()),
            port: resolve_port(&t.port, container)?,
        }
    } else if let Some(e) = &probe.exec {
        exec_action(e)?
    } else if probe.grpc.is_some() {
        return Err("grpc probes are not supported".into());
    } else {
        return Err("probe has no handler (httpGet, tcpSocket or exec)".into());
    };
    let success_threshold = probe.success_threshold.unwrap_or(1).max(1) as u32;
    if kind != ProbeKind::Readiness && success_threshold != 1 {
        return Err(format!("{} probe successThreshold must be 1", kind.name()));
    }
    Ok(ProbeSpec {
        action,
        initial_delay: secs(probe.initial_delay_seconds, 0, 0),
        period: secs(probe.period_seconds, 10, 1),
        timeout: secs(probe.timeout_seconds, 1, 1),
        success_threshold,
        failure_threshold: probe.failure_threshold.unwrap_or(3).max(1) as u32,
    })
}

/// Consecutive results against the thresholds. Readiness starts failed,
/// liveness passed, startup failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeTracker {
    pub success_threshold: u32,
    pub failure_threshold: u32,
    pub successes: u32,
    pub failures: u32,
    pub passing: bool,
}

impl ProbeTracker {
    pub fn new(kind: ProbeKind, spec: &ProbeSpec) -> ProbeTracker {
        ProbeTracker {
            success_threshold: spec.success_threshold,
            failure_threshold: spec.failure_threshold,
            successes: 0,
            failures: 0,
            passing: kind == ProbeKind::Liveness,
        }
    }

    /// Records one result; returns the new verdict when it changed.
    pub fn record(&mut self, ok: bool) -> Option<bool> {
        if ok {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            if !self.passing && self.successes >= self.success_threshold {
                self.passing = true;
                return Some(true);
            }
        } else {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
            if self.passing && self.failures >= self.failure_threshold {
                self.passing = false;
                return Some(false);
            }
        }
        None
    }
}

/// One probe's outcome, with the kubelet's style of message on failure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeOutcome {
    pub ok: bool,
    pub message: String,
}

impl ProbeOutcome {
    pub fn ok() -> ProbeOutcome {
        ProbeOutcome {
            ok: true,
            message: String::new(),
        }
    }
    pub fn fail(message: impl Into<String>) -> ProbeOutcome {
        ProbeOutcome {
            ok: false,
            message: message.into(),
        }
    }
}

/// Parses the status code from an HTTP/1.x status line.
pub fn status_code(head: &[u8]) -> Option<u16> {
    let line = head.split(|b| *b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split_whitespace();
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    parts.next()?.parse().ok()
}

fn authority(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// An httpGet probe: 200 ≤ status < 400 passes (redirects are not followed).
pub async fn http_get(
    host: &str,
    port: u16,
    path: &str,
    headers: &[(String, String)],
    timeout: Duration,
) -> ProbeOutcome {
    let addr = authority(host, port);
    let url = format!("http://{addr}{path}");
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(&addr).await?;
        let mut req = format!("GET {path} HTTP/1.1\r\n");
        let has = |n: &str| headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(n));
        if !has("host") {
            req.push_str(&format!("Host: {addr}\r\n"));
        }
        if !has("user-agent") {
            req.push_str("User-Agent: kube-probe/1.32\r\n");
        }
        if !has("accept") {
            req.push_str("Accept: */*\r\n");
        }
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("Connection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await?;
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.contains(&b'\n') && head.len() < 8192 {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(status_code(&head))
    };
    match tokio::time::timeout(timeout, attempt).await {
        Err(_) => ProbeOutcome::fail(format!(
            "Get \"{url}\": context deadline exceeded (Client.Timeout exceeded while awaiting headers)"
        )),
        Ok(Err(e)) => ProbeOutcome::fail(format!("Get \"{url}\": {e}")),
        Ok(Ok(None)) => ProbeOutcome::fail(format!("Get \"{url}\": malformed HTTP response")),
        Ok(Ok(Some(code))) if (200..400).contains(&code) => ProbeOutcome::ok(),
        Ok(Ok(Some(code))) => ProbeOutcome::fail(format!("HTTP probe failed with statuscode: {code}")),
    }
}

/// A tcpSocket probe: the connection is accepted.
pub async fn tcp_connect(host: &str, port: u16, timeout: Duration) -> ProbeOutcome {
    let addr = authority(host, port);
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(&addr)).await {
        Ok(Ok(_)) => ProbeOutcome::ok(),
        Ok(Err(e)) => ProbeOutcome::fail(format!("dial tcp {addr}: {e}")),
        Err(_) => ProbeOutcome::fail(format!("dial tcp {addr}: i/o timeout")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn container() -> Container {
        serde_json::from_value(
            json!({"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}),
        )
        .unwrap()
    }

    fn probe(v: serde_json::Value) -> Probe {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn defaults_and_named_ports() {
        let s = probe_spec(
            ProbeKind::Readiness,
            &probe(json!({"httpGet": {"port": "http", "path": "healthz"}})),
            &container(),
        )
        .unwrap();
        assert_eq!(s.period, Duration::from_secs(10));
        assert_eq!(s.timeout, Duration::from_secs(1));
        assert_eq!((s.success_threshold, s.failure_threshold), (1, 3));
        assert_eq!(
            s.action,
            ProbeAction::Http {
                host: None,
                port: 8080,
                path: "/healthz".into(),
                https: false,
                headers: vec![]
            }
        );
        let s = probe_spec(
            ProbeKind::Liveness,
            &probe(json!({"tcpSocket": {"port": 6379}, "periodSeconds": 2, "initialDelaySeconds": 5, "failureThreshold": 1})),
            &container(),
        )
        .unwrap();
        assert_eq!(
            s.action,
            ProbeAction::Tcp {
                host: None,
                port: 6379
            }
        );
        assert_eq!(
            (
                s.period.as_secs(),
                s.initial_delay.as_secs(),
                s.failure_threshold
            ),
            (2, 5, 1)
        );
    }

    #[test]
    fn invalid_probes() {
        let c = container();
        assert!(probe_spec(ProbeKind::Readiness, &probe(json!({})), &c).is_err());
        assert!(probe_spec(
            ProbeKind::Readiness,
            &probe(json!({"httpGet": {"port": "nope"}})),
            &c
        )
        .is_err());
        assert!(probe_spec(
            ProbeKind::Readiness,
            &probe(json!({"tcpSocket": {"port": 0}})),
            &c
        )
        .is_err());
        assert!(probe_spec(
            ProbeKind::Readiness,
            &probe(json!({"exec": {"command": []}})),
            &c
        )
        .is_err());
        assert!(probe_spec(
            ProbeKind::Liveness,
            &probe(json!({"exec": {"command": ["true"]}, "successThreshold": 2})),
            &c
        )
        .is_err());
        assert!(probe_spec(
            ProbeKind::Readiness,
            &probe(json!({"exec": {"command": ["true"]}, "successThreshold": 2})),
            &c
        )
        .is_ok());
    }

    #[test]
    fn thresholds() {
        let c = container();
        let spec = probe_spec(
            ProbeKind::Readiness,
            &probe(
                json!({"exec": {"command": ["x"]}, "successThreshold": 2, "failureThreshold": 3}),
            ),
            &c,
        )
        .unwrap();
        let mut r = ProbeTracker::new(ProbeKind::Readiness, &spec);
        assert!(!r.passing);
        assert_eq!(r.record(true), None);
        assert_eq!(r.record(true), Some(true));
        assert_eq!(r.record(false), None);
        assert_eq!(r.record(false), None);
        assert_eq!(r.record(true), None, "a success resets the failure count");
        assert_eq!(r.record(false), None);
        assert_eq!(r.record(false), None);
        assert_eq!(r.record(false), Some(false));
        assert_eq!(r.record(false), None);
        let spec = probe_spec(
            ProbeKind::Liveness,
            &probe(json!({"exec": {"command": ["x"]}, "failureThreshold": 1})),
            &c,
        )
        .unwrap();
        let mut l = ProbeTracker::new(ProbeKind::Liveness, &spec);
        assert!(l.passing);
        assert_eq!(l.record(false), Some(false));
    }

    #[test]
    fn status_lines() {
        assert_eq!(status_code(b"HTTP/1.1 204 No Content\r\n"), Some(204));
        assert_eq!(status_code(b"HTTP/1.0 500 x\r\n"), Some(500));
        assert_eq!(status_code(b"SSH-2.0\r\n"), None);
        assert_eq!(status_code(b""), None);
    }

    #[tokio::test]
    async fn http_and_tcp_against_a_local_server() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            for code in [200u16, 503] {
                let (mut s, _) = l.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(format!("HTTP/1.1 {code} X\r\nContent-Length: 0\r\n\r\n").as_bytes())
                    .await;
            }
        });
        let t = Duration::from_secs(2);
        assert!(http_get("127.0.0.1", port, "/", &[], t).await.ok);
        let f = http_get("127.0.0.1", port, "/", &[], t).await;
        assert_eq!(f.message, "HTTP probe failed with statuscode: 503");
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let cport = closed.local_addr().unwrap().port();
        assert!(tcp_connect("127.0.0.1", cport, t).await.ok);
        drop(closed);
        assert!(!tcp_connect("127.0.0.1", cport, t).await.ok);
    }
}
