//! Prometheus metrics with kube-proxy's names, so dashboards and alerts keep working.

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// Every metric the proxy exports.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub sync_duration: Histogram,
    pub sync_full_duration: Histogram,
    pub sync_partial_duration: Histogram,
    pub last_sync_timestamp: Gauge,
    pub last_queued_timestamp: Gauge,
    pub network_programming_duration: Histogram,
    pub endpoint_changes_pending: IntGauge,
    pub endpoint_changes_total: IntCounter,
    pub service_changes_pending: IntGauge,
    pub service_changes_total: IntCounter,
    pub sync_failures_total: IntCounter,
    pub invalid_objects_total: IntCounterVec,
}

fn sync_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(0.0001, 2.0, 18).unwrap()
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let h = |name: &str, help: &str, buckets: Vec<f64>| {
            let m = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)).unwrap();
            registry.register(Box::new(m.clone())).unwrap();
            m
        };
        let sync_duration = h(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
            sync_buckets(),
        );
        let sync_full_duration = h(
            "kubeproxy_sync_full_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for full resyncs",
            sync_buckets(),
        );
        let sync_partial_duration = h(
            "kubeproxy_sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for partial resyncs",
            sync_buckets(),
        );
        let network_programming_duration = h(
            "kubeproxy_network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0,
                60.0, 120.0, 300.0,
            ],
        );
        let g = |name: &str, help: &str| {
            let m = Gauge::new(name, help).unwrap();
            registry.register(Box::new(m.clone())).unwrap();
            m
        };
        let last_sync_timestamp = g(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
        );
        let last_queued_timestamp = g(
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued",
        );
        let ig = |name: &str, help: &str| {
            let m = IntGauge::new(name, help).unwrap();
            registry.register(Box::new(m.clone())).unwrap();
            m
        };
        let ic = |name: &str, help: &str| {
            let m = IntCounter::new(name, help).unwrap();
            registry.register(Box::new(m.clone())).unwrap();
            m
        };
        let endpoint_changes_pending = ig(
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
            "Pending proxy rules Endpoint changes",
        );
        let endpoint_changes_total = ic(
            "kubeproxy_sync_proxy_rules_endpoint_changes_total",
            "Cumulative proxy rules Endpoint changes",
        );
        let service_changes_pending = ig(
            "kubeproxy_sync_proxy_rules_service_changes_pending",
            "Pending proxy rules Service changes",
        );
        let service_changes_total = ic(
            "kubeproxy_sync_proxy_rules_service_changes_total",
            "Cumulative proxy rules Service changes",
        );
        let sync_failures_total = ic(
            "ferry_proxy_sync_failures_total",
            "Syncs of proxy rules that failed",
        );
        let invalid_objects_total = IntCounterVec::new(
            Opts::new(
                "ferry_proxy_invalid_objects_total",
                "Objects (or parts) skipped because they were invalid",
            ),
            &["kind"],
        )
        .unwrap();
        registry
            .register(Box::new(invalid_objects_total.clone()))
            .unwrap();
        Metrics {
            registry,
            sync_duration,
            sync_full_duration,
            sync_partial_duration,
            last_sync_timestamp,
            last_queued_timestamp,
            network_programming_duration,
            endpoint_changes_pending,
            endpoint_changes_total,
            service_changes_pending,
            service_changes_total,
            sync_failures_total,
            invalid_objects_total,
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .unwrap();
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_match_kube_proxy() {
        let m = super::Metrics::new();
        m.sync_duration.observe(0.01);
        m.invalid_objects_total
            .with_label_values(&["Service"])
            .inc();
        let text = m.render();
        for name in [
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket",
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "kubeproxy_network_programming_duration_seconds_bucket",
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
            "kubeproxy_sync_proxy_rules_endpoint_changes_total",
            "kubeproxy_sync_proxy_rules_service_changes_pending",
            "kubeproxy_sync_proxy_rules_service_changes_total",
            "kubeproxy_sync_full_proxy_rules_duration_seconds_bucket",
            "kubeproxy_sync_partial_proxy_rules_duration_seconds_bucket",
            "ferry_proxy_invalid_objects_total{kind=\"Service\"} 1",
        ] {
            assert!(text.contains(name), "missing {name}");
        }
    }
}
