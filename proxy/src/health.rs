//! /healthz and /livez (kube-proxy's semantics) and the healthCheckNodePort servers.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use ferry_status::{spawn_server, Handler};
use tokio::task::JoinHandle;

use crate::model::HealthCheck;

#[derive(Debug)]
struct Inner {
    last_updated: Option<SystemTime>,
    oldest_pending: Option<SystemTime>,
    node_eligible: bool,
    health_checks: BTreeMap<u16, HealthCheck>,
}

/// Shared proxy health, updated by the sync loop.
#[derive(Debug)]
pub struct HealthState {
    timeout: Duration,
    inner: Mutex<Inner>,
}

fn rfc3339(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

impl HealthState {
    /// `timeout`: how long a queued change may wait before the proxy is unhealthy
    /// (kube-proxy uses 2 × syncPeriod).
    pub fn new(timeout: Duration) -> Self {
        HealthState {
            timeout,
            inner: Mutex::new(Inner {
                last_updated: None,
                oldest_pending: None,
                node_eligible: true,
                health_checks: BTreeMap::new(),
            }),
        }
    }
    /// A change was queued (kept only if it is the oldest unprocessed one).
    pub fn queued(&self) {
        let mut i = self.inner.lock().unwrap();
        if i.oldest_pending.is_none() {
            i.oldest_pending = Some(SystemTime::now());
        }
    }
    /// A sync succeeded: everything queued so far is programmed.
    pub fn updated(&self) {
        let mut i = self.inner.lock().unwrap();
        i.last_updated = Some(SystemTime::now());
        i.oldest_pending = None;
    }
    pub fn set_node_eligible(&self, eligible: bool) {
        self.inner.lock().unwrap().node_eligible = eligible;
    }
    pub fn set_health_checks(&self, hc: BTreeMap<u16, HealthCheck>) {
        self.inner.lock().unwrap().health_checks = hc;
    }
    pub fn health_check_ports(&self) -> BTreeSet<u16> {
        self.inner
            .lock()
            .unwrap()
            .health_checks
            .keys()
            .copied()
            .collect()
    }
    /// Healthy once synced, unless a queued change has waited longer than the timeout.
    pub fn is_healthy_at(&self, now: SystemTime) -> bool {
        let i = self.inner.lock().unwrap();
        if i.last_updated.is_none() {
            return false;
        }
        match i.oldest_pending {
            None => true,
            Some(q) => now.duration_since(q).unwrap_or_default() < self.timeout,
        }
    }
    /// (status, JSON) for /healthz (`livez` = false) or /livez (`livez` = true).
    /// /healthz also fails when the node is being deleted; /livez does not.
    pub fn healthz(&self, livez: bool) -> (u16, String) {
        let now = SystemTime::now();
        let healthy = self.is_healthy_at(now);
        let i = self.inner.lock().unwrap();
        let ok = healthy && (livez || i.node_eligible);
        let body = serde_json::json!({
            "lastUpdated": i.last_updated.map(rfc3339).unwrap_or_default(),
            "currentTime": rfc3339(now),
            "nodeEligible": i.node_eligible,
        });
        (if ok { 200 } else { 503 }, body.to_string())
    }
    /// (status, JSON) for a healthCheckNodePort.
    pub fn service_health(&self, port: u16) -> (u16, String) {
        let healthy = self.is_healthy_at(SystemTime::now());
        let i = self.inner.lock().unwrap();
        let (ns, name, n) = match i.health_checks.get(&port) {
            Some(h) => (h.namespace.clone(), h.name.clone(), h.local_endpoints),
            None => (String::new(), String::new(), 0),
        };
        let body = serde_json::json!({
            "service": {"namespace": ns, "name": name},
            "localEndpoints": n,
            "serviceProxyHealthy": healthy,
        });
        (if n > 0 && healthy { 200 } else { 503 }, body.to_string())
    }
}

/// The /healthz + /livez handler.
pub fn healthz_handler(state: Arc<HealthState>) -> Handler {
    Arc::new(move |path| match path {
        "/healthz" => {
            let (s, b) = state.healthz(false);
            (s, "application/json", b)
        }
        "/livez" => {
            let (s, b) = state.healthz(true);
            (s, "application/json", b)
        }
        _ => ferry_status::not_found(),
    })
}

/// One server per healthCheckNodePort, started and stopped as services change.
#[derive(Default)]
pub struct HealthCheckServers {
    running: BTreeMap<u16, JoinHandle<()>>,
}

impl HealthCheckServers {
    /// Makes the running servers match `state`'s ports (binding 0.0.0.0:port).
    pub async fn reconcile(&mut self, state: &Arc<HealthState>) {
        let want = state.health_check_ports();
        let stale: Vec<u16> = self
            .running
            .keys()
            .copied()
            .filter(|p| !want.contains(p))
            .collect();
        for p in stale {
            if let Some(h) = self.running.remove(&p) {
                h.abort();
            }
        }
        for p in want {
            if self.running.contains_key(&p) {
                continue;
            }
            let st = state.clone();
            let handler: Handler = Arc::new(move |_| {
                let (s, b) = st.service_health(p);
                (s, "application/json", b)
            });
            match spawn_server(SocketAddr::from(([0, 0, 0, 0], p)), handler).await {
                Ok(h) => {
                    self.running.insert(p, h);
                }
                Err(e) => tracing::warn!("healthCheckNodePort {p}: {e}"),
            }
        }
    }
}

impl Drop for HealthCheckServers {
    fn drop(&mut self) {
        for h in self.running.values() {
            h.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthz_semantics() {
        let s = HealthState::new(Duration::from_secs(60));
        assert_eq!(s.healthz(false).0, 503, "not synced yet");
        s.updated();
        let (code, body) = s.healthz(false);
        assert_eq!(code, 200);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert!(v["lastUpdated"].as_str().unwrap().ends_with('Z'));
        assert!(v["currentTime"].is_string());
        assert_eq!(v["nodeEligible"], true);
        s.queued();
        assert!(s.is_healthy_at(SystemTime::now()));
        assert!(
            !s.is_healthy_at(SystemTime::now() + Duration::from_secs(61)),
            "stale queued change"
        );
        s.updated();
        s.set_node_eligible(false);
        assert_eq!(s.healthz(false).0, 503);
        assert_eq!(s.healthz(true).0, 200, "livez ignores node eligibility");
    }

    #[test]
    fn service_health() {
        let s = HealthState::new(Duration::from_secs(60));
        s.updated();
        s.set_health_checks(
            [
                (
                    32000,
                    HealthCheck {
                        namespace: "ns".into(),
                        name: "lb".into(),
                        local_endpoints: 2,
                    },
                ),
                (
                    32001,
                    HealthCheck {
                        namespace: "ns".into(),
                        name: "none".into(),
                        local_endpoints: 0,
                    },
                ),
            ]
            .into(),
        );
        let (c, b) = s.service_health(32000);
        assert_eq!(c, 200);
        let v: serde_json::Value = serde_json::from_str(&b).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"service": {"namespace": "ns", "name": "lb"}, "localEndpoints": 2, "serviceProxyHealthy": true})
        );
        assert_eq!(s.service_health(32001).0, 503);
    }

    #[tokio::test]
    async fn servers_answer_over_http() {
        use ferry_status::serve;
        use tokio::net::TcpListener;
        let s = Arc::new(HealthState::new(Duration::from_secs(60)));
        s.updated();
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let h = tokio::spawn(serve(l, healthz_handler(s.clone())));
        let body = tokio::task::spawn_blocking(move || {
            use std::io::{Read, Write};
            let mut c = std::net::TcpStream::connect(addr).unwrap();
            c.write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .unwrap();
            let mut out = String::new();
            c.read_to_string(&mut out).unwrap();
            out
        })
        .await
        .unwrap();
        assert!(body.starts_with("HTTP/1.1 200"), "{body}");
        assert!(body.contains("\"nodeEligible\":true"), "{body}");
        h.abort();
    }
}
