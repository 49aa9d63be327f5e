//! `ferry overlay`'s /healthz and /metrics: the reconcile loop's state and the
//! pod fast path's packet counters (read from its pinned map at each scrape).

use std::fmt::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use ferry_ebpf::pod_fastpath::{FastPath, COUNTERS};

#[derive(Debug, Default, Clone)]
struct Loop {
    last_ok: Option<Instant>,
    last_ok_unix: f64,
    peers: usize,
    reconciles: u64,
    failures: u64,
    entry_errors: u64,
}

/// What the reconcile loop reports, shared with the HTTP handler.
#[derive(Debug)]
pub struct Status {
    /// /healthz fails when no reconcile succeeded for this long.
    stale_after: Duration,
    fastpath: Option<FastPath>,
    state: Mutex<Loop>,
}

impl Status {
    pub fn new(stale_after: Duration, fastpath: Option<FastPath>) -> Status {
        Status {
            stale_after,
            fastpath,
            state: Mutex::default(),
        }
    }

    /// A reconcile ran: `errors` single entries failed (the rest applied).
    pub fn reconciled(&self, peers: usize, errors: usize) {
        let mut s = self.state.lock().unwrap();
        s.reconciles += 1;
        s.peers = peers;
        s.entry_errors += errors as u64;
        s.last_ok = Some(Instant::now());
        s.last_ok_unix = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
    }

    /// A reconcile failed as a whole (netlink, the VXLAN device).
    pub fn failed(&self) {
        let mut s = self.state.lock().unwrap();
        s.reconciles += 1;
        s.failures += 1;
    }

    /// (status, body) for /healthz.
    pub fn healthz(&self) -> (u16, String) {
        let s = self.state.lock().unwrap();
        match s.last_ok.map(|t| t.elapsed()) {
            Some(age) if age <= self.stale_after => (200, "ok\n".into()),
            Some(age) => (
                503,
                format!("last successful reconcile {:.0} s ago\n", age.as_secs_f64()),
            ),
            None => (503, "no successful reconcile yet\n".into()),
        }
    }

    /// Prometheus text for /metrics.
    pub fn metrics(&self) -> String {
        let s = self.state.lock().unwrap().clone();
        let counters = self.fastpath.as_ref().map(|fp| fp.counters());
        let counters = match counters {
            Some(Ok(c)) => Some(c),
            Some(Err(e)) => {
                tracing::warn!("metrics: {e}");
                None
            }
            None => None,
        };
        render(&s, counters.as_ref().map(|c| &c[..]))
    }

    /// /metrics, and /healthz beside it (as kube-proxy's metrics port).
    pub fn metrics_handler(self: Arc<Status>) -> ferry_status::Handler {
        Arc::new(move |path| match path {
            "/metrics" => (200, ferry_status::PROMETHEUS_TEXT, self.metrics()),
            "/healthz" => self.healthz_response(),
            _ => ferry_status::not_found(),
        })
    }

    /// /healthz alone, for probes.
    pub fn healthz_handler(self: Arc<Status>) -> ferry_status::Handler {
        Arc::new(move |path| match path {
            "/healthz" => self.healthz_response(),
            _ => ferry_status::not_found(),
        })
    }

    fn healthz_response(&self) -> (u16, &'static str, String) {
        let (code, body) = self.healthz();
        (code, "text/plain", body)
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// The exposition (pure): loop state and, when the fast path is installed,
/// its counters in [`COUNTERS`] order.
fn render(s: &Loop, fastpath: Option<&[u64]>) -> String {
    let mut out = String::new();
    family(
        &mut out,
        "ferry_overlay_peers",
        "gauge",
        "Nodes this node has routes to.",
    );
    let _ = writeln!(out, "ferry_overlay_peers {}", s.peers);
    family(
        &mut out,
        "ferry_overlay_reconciles_total",
        "counter",
        "Reconciles of routes, neighbours and FDB.",
    );
    let _ = writeln!(out, "ferry_overlay_reconciles_total {}", s.reconciles);
    family(
        &mut out,
        "ferry_overlay_reconcile_failures_total",
        "counter",
        "Reconciles that failed as a whole.",
    );
    let _ = writeln!(out, "ferry_overlay_reconcile_failures_total {}", s.failures);
    family(
        &mut out,
        "ferry_overlay_reconcile_entry_errors_total",
        "counter",
        "Single routes, neighbours or FDB entries that failed to apply.",
    );
    let _ = writeln!(
        out,
        "ferry_overlay_reconcile_entry_errors_total {}",
        s.entry_errors
    );
    family(
        &mut out,
        "ferry_overlay_last_reconcile_timestamp_seconds",
        "gauge",
        "Unix time of the last successful reconcile.",
    );
    let _ = writeln!(
        out,
        "ferry_overlay_last_reconcile_timestamp_seconds {:.3}",
        s.last_ok_unix
    );
    family(
        &mut out,
        "ferry_overlay_fastpath_installed",
        "gauge",
        "1 when the pod fast path (eBPF) is installed.",
    );
    let _ = writeln!(
        out,
        "ferry_overlay_fastpath_installed {}",
        u8::from(fastpath.is_some())
    );
    if let Some(values) = fastpath {
        family(&mut out, "ferry_overlay_fastpath_packets_total", "counter", "TCP/UDP packets the pod fast path handled, by program and action (to_stack: left to the node's stack).");
        for ((program, action), n) in COUNTERS.iter().zip(values) {
            let _ = writeln!(
                out,
                "ferry_overlay_fastpath_packets_total{{program=\"{program}\",action=\"{action}\"}} {n}"
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_loop_state_and_fast_path_counters() {
        let s = Loop {
            peers: 2,
            reconciles: 5,
            failures: 1,
            entry_errors: 3,
            last_ok_unix: 1700000000.5,
            ..Default::default()
        };
        let text = render(&s, Some(&[1, 2, 3, 4, 5, 6, 7]));
        assert!(text.contains("# TYPE ferry_overlay_peers gauge\nferry_overlay_peers 2\n"));
        assert!(text.contains("ferry_overlay_reconcile_failures_total 1\n"));
        assert!(text.contains("ferry_overlay_reconcile_entry_errors_total 3\n"));
        assert!(text.contains("ferry_overlay_last_reconcile_timestamp_seconds 1700000000.500\n"));
        assert!(text.contains("ferry_overlay_fastpath_installed 1\n"));
        assert!(text.contains(
            "ferry_overlay_fastpath_packets_total{program=\"from_pod\",action=\"encapsulated\"} 2\n"
        ));
        assert!(text.contains(
            "ferry_overlay_fastpath_packets_total{program=\"to_pod\",action=\"to_stack\"} 7\n"
        ));
        let off = render(&s, None);
        assert!(off.contains("ferry_overlay_fastpath_installed 0\n"));
        assert!(!off.contains("fastpath_packets_total"));
    }

    #[test]
    fn healthz_follows_the_last_successful_reconcile() {
        let st = Status::new(Duration::from_secs(30), None);
        assert_eq!(st.healthz().0, 503);
        st.reconciled(1, 0);
        assert_eq!(st.healthz(), (200, "ok\n".into()));
        st.failed();
        assert_eq!(st.healthz().0, 200, "one failure within the window");
        let stale = Status::new(Duration::ZERO, None);
        stale.reconciled(1, 0);
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(stale.healthz().0, 503);
    }
}
