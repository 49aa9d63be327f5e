//! The Node object this agent registers: addresses, capacity/allocatable,
//! nodeInfo, daemon endpoints and conditions.

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use crate::status::time;

pub const KUBELET_VERSION: &str = "v1.32.0-ferry";
pub const RUNTIME_VERSION: &str = "ferry://0.1";
pub const MAX_PODS: u32 = 110;

/// What the host reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostFacts {
    pub cpus: u32,
    pub memory_bytes: u64,
    pub os_image: String,
    pub kernel_version: String,
    pub machine_id: String,
    pub boot_id: String,
    pub arch: String,
}

/// MemTotal (kB) from /proc/meminfo's text, in bytes.
pub fn parse_meminfo(text: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix("MemTotal:")?;
        let mut parts = rest.split_whitespace();
        let n: u64 = parts.next()?.parse().ok()?;
        match parts.next() {
            Some("kB") | None => Some(n * 1024),
            _ => None,
        }
    })
}

/// PRETTY_NAME from /etc/os-release's text.
pub fn parse_os_release(text: &str) -> Option<String> {
    text.lines().find_map(|l| {
        l.strip_prefix("PRETTY_NAME=")
            .map(|v| v.trim().trim_matches('"').to_string())
    })
}

/// Parses a Kubernetes memory quantity ("512Mi", "1G", "1073741824").
pub fn parse_memory(q: &str) -> Option<u64> {
    let q = q.trim();
    let (num, mult): (&str, u64) = [
        ("Ki", 1u64 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("k", 1000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
    ]
    .iter()
    .find_map(|(s, m)| q.strip_suffix(s).map(|n| (n, *m)))
    .unwrap_or((q, 1));
    num.parse::<u64>().ok()?.checked_mul(mult)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

impl HostFacts {
    pub fn detect() -> HostFacts {
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1);
        let memory_bytes = parse_meminfo(&read("/proc/meminfo")).unwrap_or(0);
        let os_image = parse_os_release(&read("/etc/os-release")).unwrap_or_else(|| "Linux".into());
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            other => other,
        }
        .to_string();
        HostFacts {
            cpus,
            memory_bytes,
            os_image,
            kernel_version: read("/proc/sys/kernel/osrelease"),
            machine_id: read("/etc/machine-id"),
            boot_id: read("/proc/sys/kernel/random/boot_id"),
            arch,
        }
    }
}

/// The node's identity and overrides.
#[derive(Clone, Debug)]
pub struct NodeIdentity {
    pub name: String,
    pub address: String,
    pub hostname: String,
    pub logs_port: u16,
    pub cpu: Option<String>,
    pub memory: Option<String>,
}

pub fn labels(id: &NodeIdentity, facts: &HostFacts) -> Value {
    json!({
        "kubernetes.io/hostname": id.name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": facts.arch,
        "beta.kubernetes.io/os": "linux",
        "beta.kubernetes.io/arch": facts.arch,
    })
}

pub fn capacity(id: &NodeIdentity, facts: &HostFacts) -> Value {
    let cpu = id.cpu.clone().unwrap_or_else(|| facts.cpus.to_string());
    let memory = id
        .memory
        .clone()
        .unwrap_or_else(|| format!("{}Ki", facts.memory_bytes / 1024));
    json!({
        "cpu": cpu,
        "memory": memory,
        "pods": MAX_PODS.to_string(),
        "ephemeral-storage": "0",
    })
}

pub fn node_conditions(now: DateTime<Utc>, since: DateTime<Utc>) -> Value {
    let c = |kind: &str, status: &str, reason: &str, message: &str| {
        json!({
            "type": kind, "status": status, "reason": reason, "message": message,
            "lastHeartbeatTime": time(now), "lastTransitionTime": time(since),
        })
    };
    json!([
        c(
            "MemoryPressure",
            "False",
            "KubeletHasSufficientMemory",
            "kubelet has sufficient memory available"
        ),
        c(
            "DiskPressure",
            "False",
            "KubeletHasNoDiskPressure",
            "kubelet has no disk pressure"
        ),
        c(
            "PIDPressure",
            "False",
            "KubeletHasSufficientPID",
            "kubelet has sufficient PID available"
        ),
        c(
            "Ready",
            "True",
            "KubeletReady",
            "ferry node agent is posting ready status"
        ),
    ])
}

/// The status subresource this agent writes.
pub fn node_status(
    id: &NodeIdentity,
    facts: &HostFacts,
    now: DateTime<Utc>,
    since: DateTime<Utc>,
) -> Value {
    let cap = capacity(id, facts);
    json!({
        "addresses": [
            {"type": "InternalIP", "address": id.address},
            {"type": "Hostname", "address": id.hostname},
        ],
        "capacity": cap,
        "allocatable": cap,
        "conditions": node_conditions(now, since),
        "daemonEndpoints": {"kubeletEndpoint": {"Port": id.logs_port}},
        "nodeInfo": {
            "machineID": facts.machine_id,
            "systemUUID": facts.machine_id,
            "bootID": facts.boot_id,
            "kernelVersion": facts.kernel_version,
            "osImage": facts.os_image,
            "containerRuntimeVersion": RUNTIME_VERSION,
            "kubeletVersion": KUBELET_VERSION,
            "kubeProxyVersion": "",
            "operatingSystem": "linux",
            "architecture": facts.arch,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> HostFacts {
        HostFacts {
            cpus: 4,
            memory_bytes: 8 << 30,
            os_image: "Debian GNU/Linux 12 (bookworm)".into(),
            kernel_version: "6.1.0".into(),
            machine_id: "m".into(),
            boot_id: "b".into(),
            arch: "amd64".into(),
        }
    }

    fn id() -> NodeIdentity {
        NodeIdentity {
            name: "n1".into(),
            address: "192.168.0.2".into(),
            hostname: "n1".into(),
            logs_port: 10250,
            cpu: None,
            memory: None,
        }
    }

    #[test]
    fn parses_host_files() {
        assert_eq!(
            parse_meminfo("MemTotal:       16318792 kB\nMemFree: 1 kB\n"),
            Some(16318792 * 1024)
        );
        assert_eq!(parse_meminfo("nothing"), None);
        assert_eq!(
            parse_os_release("NAME=x\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n").as_deref(),
            Some("Debian GNU/Linux 12 (bookworm)")
        );
        assert_eq!(parse_memory("512Mi"), Some(512 << 20));
        assert_eq!(parse_memory("2G"), Some(2_000_000_000));
        assert_eq!(parse_memory("77"), Some(77));
        assert_eq!(parse_memory("x"), None);
    }

    #[test]
    fn status_fields() {
        let now = DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        let s = node_status(&id(), &facts(), now, now);
        assert_eq!(
            s["addresses"][0],
            json!({"type": "InternalIP", "address": "192.168.0.2"})
        );
        assert_eq!(s["capacity"]["cpu"], "4");
        assert_eq!(s["capacity"]["memory"], format!("{}Ki", 8u64 << 20));
        assert_eq!(s["allocatable"]["pods"], "110");
        assert_eq!(s["daemonEndpoints"]["kubeletEndpoint"]["Port"], 10250);
        assert_eq!(s["nodeInfo"]["kubeletVersion"], KUBELET_VERSION);
        assert_eq!(s["nodeInfo"]["containerRuntimeVersion"], "ferry://0.1");
        let ready = s["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Ready")
            .unwrap();
        assert_eq!(ready["status"], "True");
        let mut o = id();
        o.cpu = Some("2".into());
        o.memory = Some("1Gi".into());
        let s = node_status(&o, &facts(), now, now);
        assert_eq!(
            (
                s["capacity"]["cpu"].as_str(),
                s["capacity"]["memory"].as_str()
            ),
            (Some("2"), Some("1Gi"))
        );
    }
}
