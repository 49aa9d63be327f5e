//! Configuration: kube-proxy's KubeProxyConfiguration YAML (the fields that apply),
//! overridden by command-line flags.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use ipnet::Ipv4Net;
use serde_yaml::Value;

use crate::model::NodePortAddressesConfig;

/// Which datapath programs the kernel. Userspace and eBPF modes come later.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
#[non_exhaustive]
pub enum Mode {
    #[default]
    Nftables,
    Iptables,
}

impl Mode {
    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "nftables" | "" => Some(Mode::Nftables),
            "iptables" => Some(Mode::Iptables),
            _ => None,
        }
    }
}

/// Default minSyncPeriod. kube-proxy's is 1 s, which delays a lone change by up to a
/// second. Ferry syncs as soon as the previous sync is older than this, and a partial
/// sync of one service costs a few milliseconds, so 10 ms keeps a single change well
/// under 50 ms while still coalescing bursts into at most 100 syncs a second.
pub const DEFAULT_MIN_SYNC_PERIOD: Duration = Duration::from_millis(10);
/// Default syncPeriod (full resync), as kube-proxy.
pub const DEFAULT_SYNC_PERIOD: Duration = Duration::from_secs(30);

/// The effective configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ProxyConfig {
    pub mode: Mode,
    pub cluster_cidrs: Vec<Ipv4Net>,
    pub node_port_addresses: NodePortAddressesConfig,
    pub masquerade_all: bool,
    pub min_sync_period: Duration,
    pub sync_period: Duration,
    /// None disables the server.
    pub healthz_bind_address: Option<SocketAddr>,
    pub metrics_bind_address: Option<SocketAddr>,
    pub hostname_override: Option<String>,
    pub kubeconfig: Option<String>,
    pub conntrack: ConntrackConfig,
}

/// conntrack sysctls kube-proxy sets (only those given are applied).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ConntrackConfig {
    pub max_per_core: Option<u32>,
    pub min: Option<u32>,
    pub tcp_established_timeout: Option<Duration>,
    pub tcp_close_wait_timeout: Option<Duration>,
    pub udp_timeout: Option<Duration>,
    pub udp_stream_timeout: Option<Duration>,
    pub tcp_be_liberal: Option<bool>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            mode: Mode::Nftables,
            cluster_cidrs: Vec::new(),
            node_port_addresses: NodePortAddressesConfig::Primary,
            masquerade_all: false,
            min_sync_period: DEFAULT_MIN_SYNC_PERIOD,
            sync_period: DEFAULT_SYNC_PERIOD,
            healthz_bind_address: Some("0.0.0.0:10256".parse().unwrap()),
            metrics_bind_address: Some("127.0.0.1:10249".parse().unwrap()),
            hostname_override: None,
            kubeconfig: None,
            conntrack: ConntrackConfig::default(),
        }
    }
}

/// Parses a Go duration ("1s", "500ms", "1m30s", "0").
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let mut total = 0f64;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return None;
        }
        let n: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let mult = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += n * mult;
    }
    Some(Duration::from_secs_f64(total))
}

/// Parses a comma-separated list of IPv4 CIDRs (IPv6 entries are ignored: the ip
/// table only; dual-stack comes later).
pub fn parse_cidrs(field: &str, s: &str) -> Result<Vec<Ipv4Net>> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if part.parse::<ipnet::Ipv6Net>().is_ok() {
            continue;
        }
        out.push(
            part.parse::<Ipv4Net>()
                .map_err(|e| anyhow!("{field}: invalid CIDR {part:?}: {e}"))?
                .trunc(),
        );
    }
    Ok(out)
}

/// nodePortAddresses: "primary", "all", or CIDRs.
pub fn parse_node_port_addresses(field: &str, items: &[String]) -> Result<NodePortAddressesConfig> {
    let items: Vec<&str> = items
        .iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .collect();
    if items.is_empty() || items == ["primary"] {
        return Ok(NodePortAddressesConfig::Primary);
    }
    if items == ["all"] || items.contains(&"0.0.0.0/0") {
        return Ok(NodePortAddressesConfig::All);
    }
    if items.contains(&"primary") {
        bail!("{field}: \"primary\" cannot be combined with CIDRs");
    }
    let cidrs = parse_cidrs(field, &items.join(","))?;
    if cidrs.is_empty() {
        return Ok(NodePortAddressesConfig::Primary);
    }
    Ok(NodePortAddressesConfig::Cidrs(cidrs))
}

fn as_str(field: &str, v: &Value) -> Result<String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Null => Ok(String::new()),
        Value::Number(n) => Ok(n.to_string()),
        _ => bail!("{field}: expected a string"),
    }
}

fn as_bool(field: &str, v: &Value) -> Result<bool> {
    v.as_bool()
        .ok_or_else(|| anyhow!("{field}: expected true or false"))
}

fn as_dur(field: &str, v: &Value) -> Result<Duration> {
    let s = as_str(field, v)?;
    parse_duration(&s).ok_or_else(|| anyhow!("{field}: invalid duration {s:?}"))
}

fn as_u32(field: &str, v: &Value) -> Result<u32> {
    v.as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| anyhow!("{field}: expected a non-negative integer"))
}

/// Known fields that do not apply to ferry: accepted with a notice.
const IGNORED: &[&str] = &[
    "bindAddress",
    "bindAddressHardFail",
    "configSyncPeriod",
    "detectLocalMode",
    "detectLocal",
    "enableProfiling",
    "featureGates",
    "ipvs",
    "logging",
    "oomScoreAdj",
    "portRange",
    "showHiddenMetricsForVersion",
    "winkernel",
    "windowsRunAsService",
    "linux",
];

/// Parses a KubeProxyConfiguration document on top of `base`. Returns the config
/// and warnings (unknown or ignored fields). Invalid values are errors naming the field.
pub fn parse_file(text: &str, mut cfg: ProxyConfig) -> Result<(ProxyConfig, Vec<String>)> {
    let doc: Value = serde_yaml::from_str(text).map_err(|e| anyhow!("config file: {e}"))?;
    let Value::Mapping(map) = doc else {
        bail!("config file: expected a KubeProxyConfiguration mapping");
    };
    let mut warnings = Vec::new();
    let mut min_sync: Option<Duration> = None;
    let mut sync: Option<Duration> = None;
    for (k, v) in &map {
        let key = k.as_str().unwrap_or_default();
        match key {
            "apiVersion" => {
                let s = as_str(key, v)?;
                if s != "kubeproxy.config.k8s.io/v1alpha1" {
                    bail!("apiVersion: unsupported {s:?} (want kubeproxy.config.k8s.io/v1alpha1)");
                }
            }
            "kind" => {
                let s = as_str(key, v)?;
                if s != "KubeProxyConfiguration" {
                    bail!("kind: unsupported {s:?} (want KubeProxyConfiguration)");
                }
            }
            "mode" => {
                let s = as_str(key, v)?;
                cfg.mode = Mode::parse(&s).ok_or_else(|| {
                    anyhow!("mode: unsupported {s:?} (want nftables or iptables)")
                })?;
            }
            "clusterCIDR" => cfg.cluster_cidrs = parse_cidrs(key, &as_str(key, v)?)?,
            "nodePortAddresses" => {
                let items: Vec<String> = match v {
                    Value::Sequence(seq) => {
                        seq.iter().map(|i| as_str(key, i)).collect::<Result<_>>()?
                    }
                    Value::Null => Vec::new(),
                    _ => bail!("nodePortAddresses: expected a list"),
                };
                cfg.node_port_addresses = parse_node_port_addresses(key, &items)?;
            }
            "healthzBindAddress" => {
                cfg.healthz_bind_address = ferry_status::bind_address(key, &as_str(key, v)?)?
            }
            "metricsBindAddress" => {
                cfg.metrics_bind_address = ferry_status::bind_address(key, &as_str(key, v)?)?
            }
            "hostnameOverride" => {
                let s = as_str(key, v)?;
                cfg.hostname_override = if s.trim().is_empty() {
                    None
                } else {
                    Some(s.trim().to_string())
                };
            }
            "clientConnection" => {
                if let Value::Mapping(m) = v {
                    for (ck, cv) in m {
                        let ck = ck.as_str().unwrap_or_default();
                        if ck == "kubeconfig" {
                            let s = as_str("clientConnection.kubeconfig", cv)?;
                            if !s.is_empty() {
                                cfg.kubeconfig = Some(s);
                            }
                        } else {
                            warnings.push(format!("clientConnection.{ck}: ignored"));
                        }
                    }
                }
            }
            "iptables" | "nftables" => {
                let Value::Mapping(m) = v else {
                    bail!("{key}: expected a mapping")
                };
                // Only the section of the selected mode counts; resolved below.
                for (sk, sv) in m {
                    let sk = sk.as_str().unwrap_or_default();
                    let f = format!("{key}.{sk}");
                    let applies = (key == "iptables") == (cfg.mode == Mode::Iptables)
                        || !map.contains_key("mode");
                    match sk {
                        "minSyncPeriod" => {
                            let d = as_dur(&f, sv)?;
                            if applies {
                                min_sync = Some(d);
                            }
                        }
                        "syncPeriod" => {
                            let d = as_dur(&f, sv)?;
                            if d.is_zero() {
                                bail!("{f}: must be greater than 0");
                            }
                            if applies {
                                sync = Some(d);
                            }
                        }
                        "masqueradeAll" => {
                            if as_bool(&f, sv)? {
                                cfg.masquerade_all = true;
                            }
                        }
                        "masqueradeBit" => {
                            let b = sv
                                .as_u64()
                                .ok_or_else(|| anyhow!("{f}: expected an integer"))?;
                            if b != 14 {
                                warnings.push(format!("{f}: ferry always uses bit 14 (0x4000)"));
                            }
                        }
                        "localhostNodePorts" => warnings.push(format!(
                            "{f}: ignored (NodePorts on localhost are not served)"
                        )),
                        _ => warnings.push(format!("{f}: unknown field")),
                    }
                }
            }
            "conntrack" => {
                let Value::Mapping(m) = v else {
                    bail!("conntrack: expected a mapping")
                };
                for (sk, sv) in m {
                    let sk = sk.as_str().unwrap_or_default();
                    let f = format!("conntrack.{sk}");
                    if sv.is_null() {
                        continue;
                    }
                    let c = &mut cfg.conntrack;
                    match sk {
                        "maxPerCore" => c.max_per_core = Some(as_u32(&f, sv)?),
                        "min" => c.min = Some(as_u32(&f, sv)?),
                        "tcpEstablishedTimeout" => {
                            c.tcp_established_timeout = Some(as_dur(&f, sv)?)
                        }
                        "tcpCloseWaitTimeout" => c.tcp_close_wait_timeout = Some(as_dur(&f, sv)?),
                        "udpTimeout" => c.udp_timeout = Some(as_dur(&f, sv)?),
                        "udpStreamTimeout" => c.udp_stream_timeout = Some(as_dur(&f, sv)?),
                        "tcpBeLiberal" => c.tcp_be_liberal = Some(as_bool(&f, sv)?),
                        _ => warnings.push(format!("{f}: unknown field")),
                    }
                }
            }
            k if IGNORED.contains(&k) => warnings.push(format!("{k}: ignored by ferry")),
            k => warnings.push(format!("{k}: unknown field")),
        }
    }
    if let Some(d) = min_sync {
        cfg.min_sync_period = d;
    }
    if let Some(d) = sync {
        cfg.sync_period = d;
    }
    Ok((cfg, warnings))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1s"), Some(Duration::from_secs(1)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration("abc"), None);
        assert_eq!(parse_duration("10"), None);
        assert_eq!(parse_duration(""), None);
    }

    #[test]
    fn full_file() {
        let text = r#"
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clusterCIDR: 10.244.0.0/16,fd00::/48
nodePortAddresses: ["192.168.0.0/16"]
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: ""
hostnameOverride: node-x
clientConnection:
  kubeconfig: /etc/kube/config
  qps: 5
iptables:
  minSyncPeriod: 100ms
  syncPeriod: 1m
  masqueradeAll: true
nftables:
  minSyncPeriod: 5s
conntrack:
  udpTimeout: 30s
  maxPerCore: 32768
ipvs:
  scheduler: rr
frobnicate: true
"#;
        let (c, w) = parse_file(text, ProxyConfig::default()).unwrap();
        assert_eq!(c.mode, Mode::Iptables);
        assert_eq!(
            c.cluster_cidrs,
            vec!["10.244.0.0/16".parse::<Ipv4Net>().unwrap()]
        );
        assert_eq!(
            c.node_port_addresses,
            NodePortAddressesConfig::Cidrs(vec!["192.168.0.0/16".parse().unwrap()])
        );
        assert_eq!(
            c.healthz_bind_address,
            Some("127.0.0.1:10256".parse().unwrap())
        );
        assert_eq!(c.metrics_bind_address, None);
        assert_eq!(c.hostname_override.as_deref(), Some("node-x"));
        assert_eq!(c.kubeconfig.as_deref(), Some("/etc/kube/config"));
        assert_eq!(
            c.min_sync_period,
            Duration::from_millis(100),
            "the iptables section applies in iptables mode"
        );
        assert_eq!(c.sync_period, Duration::from_secs(60));
        assert!(c.masquerade_all);
        assert_eq!(c.conntrack.udp_timeout, Some(Duration::from_secs(30)));
        assert_eq!(c.conntrack.max_per_core, Some(32768));
        assert!(w.iter().any(|w| w.starts_with("frobnicate")), "{w:?}");
        assert!(w.iter().any(|w| w.starts_with("ipvs")), "{w:?}");
        assert!(
            w.iter().any(|w| w.starts_with("clientConnection.qps")),
            "{w:?}"
        );
    }

    #[test]
    fn defaults() {
        let (c, w) = parse_file("kind: KubeProxyConfiguration\n", ProxyConfig::default()).unwrap();
        assert!(w.is_empty());
        assert_eq!(c, ProxyConfig::default());
        assert_eq!(c.min_sync_period, DEFAULT_MIN_SYNC_PERIOD);
    }

    #[test]
    fn invalid_values_name_the_field() {
        let cases = [
            ("mode: ipvs", "mode"),
            ("clusterCIDR: 10.0.0.0/33", "clusterCIDR"),
            (
                "nodePortAddresses: [primary, 10.0.0.0/8]",
                "nodePortAddresses",
            ),
            ("healthzBindAddress: nowhere", "healthzBindAddress"),
            ("iptables: {minSyncPeriod: soon}", "iptables.minSyncPeriod"),
            ("nftables: {syncPeriod: 0s}", "nftables.syncPeriod"),
            ("conntrack: {udpTimeout: forever}", "conntrack.udpTimeout"),
            ("conntrack: {maxPerCore: -1}", "conntrack.maxPerCore"),
            ("apiVersion: v1", "apiVersion"),
            ("iptables: {masqueradeAll: maybe}", "iptables.masqueradeAll"),
        ];
        for (text, field) in cases {
            let e = parse_file(text, ProxyConfig::default())
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(field), "{text}: {e}");
        }
    }

    #[test]
    fn node_port_addresses() {
        let p = |v: &[&str]| {
            parse_node_port_addresses("f", &v.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        };
        assert_eq!(p(&[]).unwrap(), NodePortAddressesConfig::Primary);
        assert_eq!(p(&["primary"]).unwrap(), NodePortAddressesConfig::Primary);
        assert_eq!(p(&["all"]).unwrap(), NodePortAddressesConfig::All);
        assert_eq!(p(&["0.0.0.0/0"]).unwrap(), NodePortAddressesConfig::All);
        assert!(matches!(
            p(&["10.0.0.0/8"]).unwrap(),
            NodePortAddressesConfig::Cidrs(_)
        ));
    }
}
