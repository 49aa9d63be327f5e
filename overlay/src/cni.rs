//! `ferry cni`: a CNI plugin (spec 1.1, also 0.3.x / 0.4.0 results): ADD, DEL,
//! CHECK, VERSION, STATUS and GC. Network config on stdin, `CNI_*` in the
//! environment, result JSON on stdout, CNI error JSON (with its code) on failure.
//!
//! Minimal config: `{"cniVersion":"1.0.0","name":"ferry","type":"ferry"}`.
//! Optional fields: `subnetFile` (default /run/ferry/subnet.env, written by
//! `ferry overlay`), `dataDir` (IPAM store, default /var/lib/ferry/ipam),
//! `bridge` (default cni0), `mtu` (default FLANNEL_MTU).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::ipam::{IpamError, DEFAULT_DATA_DIR};
use crate::podnet::{self, PodAddress, PodNetError, PodNetwork, PodNetworkConfig};
use crate::subnet::{SubnetEnv, DEFAULT_SUBNET_FILE};

pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// CNI well-known error codes.
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE_FAILURE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    /// First plugin-specific code.
    pub const PLUGIN: u32 = 100;
    pub const IPAM_EXHAUSTED: u32 = 101;
}

/// A CNI error result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> CniError {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }
    fn details(mut self, d: impl Into<String>) -> CniError {
        self.details = d.into();
        self
    }
    pub fn to_json(&self, cni_version: &str) -> Value {
        let mut v = json!({"cniVersion": cni_version, "code": self.code, "msg": self.msg});
        if !self.details.is_empty() {
            v["details"] = json!(self.details);
        }
        v
    }
}

impl std::fmt::Display for CniError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CNI error {}: {}", self.code, self.msg)?;
        if !self.details.is_empty() {
            write!(f, " ({})", self.details)?;
        }
        Ok(())
    }
}

fn from_anyhow(e: anyhow::Error) -> CniError {
    let details = format!("{e:#}");
    for cause in e.chain() {
        if let Some(p) = cause.downcast_ref::<PodNetError>() {
            let code = match p {
                PodNetError::UnknownContainer { .. } => code::UNKNOWN_CONTAINER,
                PodNetError::InvalidIfname(_) | PodNetError::InvalidContainerId(_) => {
                    code::INVALID_ENV
                }
            };
            return CniError::new(code, p.to_string());
        }
        if let Some(i) = cause.downcast_ref::<IpamError>() {
            let code = match i {
                IpamError::Exhausted(_) => code::IPAM_EXHAUSTED,
                IpamError::Io { .. } => code::IO_FAILURE,
            };
            return CniError::new(code, i.to_string()).details(details);
        }
    }
    CniError::new(code::PLUGIN, e.to_string()).details(details)
}

/// The parsed network configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    pub plugin_type: String,
    pub subnet_file: PathBuf,
    pub data_dir: PathBuf,
    pub bridge: String,
    pub mtu: Option<u32>,
    pub prev_result: Option<Value>,
    /// GC: `cni.dev/valid-attachments` (container id, ifname).
    pub valid_attachments: Option<Vec<(String, String)>>,
}

fn invalid(field: &str, why: &str) -> CniError {
    CniError::new(
        code::INVALID_CONFIG,
        format!("invalid network config: field \"{field}\" {why}"),
    )
}

fn opt_str<'a>(v: &'a Value, field: &str) -> Result<Option<&'a str>, CniError> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(invalid(field, "must be a string")),
    }
}

/// Version ordering for "x.y.z".
fn version_at_least(v: &str, min: &str) -> bool {
    let parse = |s: &str| -> Vec<u32> { s.split('.').map(|p| p.parse().unwrap_or(0)).collect() };
    parse(v) >= parse(min)
}

/// Parses and validates the network configuration; errors name the field.
pub fn parse_netconf(bytes: &[u8]) -> Result<NetConf, CniError> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| {
        CniError::new(code::DECODE_FAILURE, "network config is not valid JSON")
            .details(e.to_string())
    })?;
    if !v.is_object() {
        return Err(CniError::new(
            code::DECODE_FAILURE,
            "network config must be a JSON object",
        ));
    }
    let cni_version = opt_str(&v, "cniVersion")?
        .ok_or_else(|| invalid("cniVersion", "is missing"))?
        .to_string();
    if !SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("incompatible CNI version {cni_version:?} in field \"cniVersion\""),
        )
        .details(format!("supported: {}", SUPPORTED_VERSIONS.join(", "))));
    }
    let name = opt_str(&v, "name")?
        .ok_or_else(|| invalid("name", "is missing"))?
        .to_string();
    let name_ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if !name_ok {
        return Err(invalid("name", "must match ^[a-zA-Z0-9][a-zA-Z0-9_.-]*$"));
    }
    let plugin_type = opt_str(&v, "type")?.unwrap_or("ferry").to_string();
    let subnet_file = opt_str(&v, "subnetFile")?
        .unwrap_or(DEFAULT_SUBNET_FILE)
        .into();
    let data_dir = opt_str(&v, "dataDir")?.unwrap_or(DEFAULT_DATA_DIR).into();
    let bridge = opt_str(&v, "bridge")?
        .unwrap_or(podnet::DEFAULT_BRIDGE)
        .to_string();
    if podnet::validate_ifname(&bridge).is_err() {
        return Err(invalid("bridge", "is not a valid interface name"));
    }
    let mtu = match v.get("mtu") {
        None | Some(Value::Null) => None,
        Some(m) => Some(
            m.as_u64()
                .filter(|m| (576..=65535).contains(m))
                .ok_or_else(|| invalid("mtu", "must be an integer from 576 to 65535"))?
                as u32,
        ),
    };
    let prev_result = v.get("prevResult").filter(|p| !p.is_null()).cloned();
    if let Some(p) = &prev_result {
        if !p.is_object() {
            return Err(invalid("prevResult", "must be an object"));
        }
    }
    let valid_attachments = match v.get("cni.dev/valid-attachments") {
        None | Some(Value::Null) => None,
        Some(Value::Array(items)) => {
            let mut out = Vec::new();
            for it in items {
                let id = it.get("containerID").and_then(Value::as_str);
                let ifn = it.get("ifname").and_then(Value::as_str);
                match (id, ifn) {
                    (Some(i), Some(f)) => out.push((i.to_string(), f.to_string())),
                    _ => {
                        return Err(invalid(
                            "cni.dev/valid-attachments",
                            "entries need string containerID and ifname",
                        ))
                    }
                }
            }
            Some(out)
        }
        Some(_) => return Err(invalid("cni.dev/valid-attachments", "must be an array")),
    };
    Ok(NetConf {
        cni_version,
        name,
        plugin_type,
        subnet_file,
        data_dir,
        bridge,
        mtu,
        prev_result,
        valid_attachments,
    })
}

/// The CNI_* environment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CniEnv {
    pub command: Option<String>,
    pub container_id: Option<String>,
    pub netns: Option<String>,
    pub ifname: Option<String>,
    pub args: Option<String>,
    pub path: Option<String>,
}

impl CniEnv {
    pub fn from_env() -> CniEnv {
        let get = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        CniEnv {
            command: get("CNI_COMMAND"),
            container_id: get("CNI_CONTAINERID"),
            netns: get("CNI_NETNS"),
            ifname: get("CNI_IFNAME"),
            args: get("CNI_ARGS"),
            path: get("CNI_PATH"),
        }
    }

    fn need<'a>(v: &'a Option<String>, var: &str) -> Result<&'a str, CniError> {
        v.as_deref().ok_or_else(|| {
            CniError::new(
                code::INVALID_ENV,
                format!("environment variable {var} is required"),
            )
        })
    }
}

/// The result JSON for an attachment, in the requested version's format.
pub fn result_json(version: &str, a: &PodAddress, netns: &str) -> Value {
    let mac = |m: Option<crate::node::Mac>| m.map(|m| m.to_string()).unwrap_or_default();
    let mut ip = json!({
        "address": a.address.to_string(),
        "gateway": a.gateway.to_string(),
        "interface": 2,
    });
    if !version_at_least(version, "1.0.0") {
        ip["version"] = json!("4");
    }
    json!({
        "cniVersion": version,
        "interfaces": [
            {"name": a.bridge, "mac": mac(a.bridge_mac)},
            {"name": a.host_veth, "mac": mac(a.host_veth_mac)},
            {"name": a.ifname, "mac": mac(a.pod_mac), "sandbox": netns},
        ],
        "ips": [ip],
        "routes": [{"dst": "0.0.0.0/0", "gw": a.gateway.to_string()}],
        "dns": {},
    })
}

fn pod_network(conf: &NetConf, require_subnet: bool) -> Result<PodNetwork, CniError> {
    let env = match SubnetEnv::read(&conf.subnet_file) {
        Ok(e) => e,
        Err(e) if require_subnet => {
            return Err(CniError::new(
                code::TRY_AGAIN_LATER,
                format!(
                    "the overlay has not written {} yet (is `ferry overlay` running?)",
                    conf.subnet_file.display()
                ),
            )
            .details(format!("{e:#}")))
        }
        // DEL / GC without the file: the store works without the subnet.
        Err(_) => SubnetEnv {
            network: "0.0.0.0/0".parse().expect("valid"),
            subnet: "0.0.0.0/30".parse().expect("valid"),
            mtu: 1500,
            ipmasq: false,
            fastpath: None,
        },
    };
    let env = SubnetEnv {
        mtu: conf.mtu.unwrap_or(env.mtu),
        ..env
    };
    Ok(PodNetwork::new(PodNetworkConfig {
        bridge: conf.bridge.clone(),
        env,
        ipam_dir: conf.data_dir.join(&conf.name),
    }))
}

/// Handles one invocation. Ok(Some(json)) is printed on stdout; Ok(None) prints nothing.
pub fn handle(env: &CniEnv, stdin: &[u8]) -> Result<Option<Value>, CniError> {
    let command = CniEnv::need(&env.command, "CNI_COMMAND")?;
    if command == "VERSION" {
        let asked = serde_json::from_slice::<Value>(stdin)
            .ok()
            .and_then(|v| {
                v.get("cniVersion")
                    .and_then(Value::as_str)
                    .map(String::from)
            })
            .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
            .unwrap_or_else(|| "1.1.0".to_string());
        return Ok(Some(json!({
            "cniVersion": asked,
            "supportedVersions": SUPPORTED_VERSIONS,
        })));
    }
    let conf = parse_netconf(stdin)?;
    match command {
        "ADD" => {
            let id = CniEnv::need(&env.container_id, "CNI_CONTAINERID")?;
            let netns = CniEnv::need(&env.netns, "CNI_NETNS")?;
            let ifname = CniEnv::need(&env.ifname, "CNI_IFNAME")?;
            let pn = pod_network(&conf, true)?;
            let a = pn.add(Path::new(netns), id, ifname).map_err(from_anyhow)?;
            Ok(Some(result_json(&conf.cni_version, &a, netns)))
        }
        "DEL" => {
            let id = CniEnv::need(&env.container_id, "CNI_CONTAINERID")?;
            let ifname = CniEnv::need(&env.ifname, "CNI_IFNAME")?;
            let pn = pod_network(&conf, false)?;
            pn.del(env.netns.as_deref().map(Path::new), id, ifname)
                .map_err(from_anyhow)?;
            Ok(None)
        }
        "CHECK" => {
            if !version_at_least(&conf.cni_version, "0.4.0") {
                return Err(CniError::new(
                    code::INCOMPATIBLE_VERSION,
                    format!(
                        "CHECK needs cniVersion 0.4.0 or later, config has {:?}",
                        conf.cni_version
                    ),
                ));
            }
            let id = CniEnv::need(&env.container_id, "CNI_CONTAINERID")?;
            let netns = CniEnv::need(&env.netns, "CNI_NETNS")?;
            let ifname = CniEnv::need(&env.ifname, "CNI_IFNAME")?;
            let pn = pod_network(&conf, true)?;
            let a = pn
                .check(Path::new(netns), id, ifname)
                .map_err(from_anyhow)?;
            if let Some(prev) = &conf.prev_result {
                let want = a.address.to_string();
                let listed = prev
                    .get("ips")
                    .and_then(Value::as_array)
                    .is_some_and(|ips| {
                        ips.iter()
                            .any(|i| i.get("address").and_then(Value::as_str) == Some(&want))
                    });
                if !listed {
                    return Err(CniError::new(
                        code::PLUGIN,
                        format!("prevResult.ips does not list the pod's address {want}"),
                    ));
                }
            }
            Ok(None)
        }
        "STATUS" => {
            pod_network(&conf, true).map_err(|e| CniError {
                code: code::NOT_AVAILABLE,
                ..e
            })?;
            Ok(None)
        }
        "GC" => {
            let Some(valid) = &conf.valid_attachments else {
                return Ok(None);
            };
            let pn = pod_network(&conf, false)?;
            let allocs = pn.ipam().allocations().map_err(|e| from_anyhow(e.into()))?;
            let keep: BTreeMap<(&str, &str), ()> = valid
                .iter()
                .map(|(i, f)| ((i.as_str(), f.as_str()), ()))
                .collect();
            for a in allocs {
                if !keep.contains_key(&(a.container_id.as_str(), a.ifname.as_str())) {
                    let _ = pn.del(None, &a.container_id, &a.ifname);
                }
            }
            Ok(None)
        }
        other => Err(CniError::new(
            code::INVALID_ENV,
            format!("CNI_COMMAND {other:?} is not one of ADD, DEL, CHECK, VERSION, STATUS, GC"),
        )),
    }
}

/// The plugin entry point (`ferry cni`): returns the process exit code.
pub fn cni_main() -> i32 {
    let env = CniEnv::from_env();
    let mut stdin = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut stdin) {
        let err = CniError::new(code::IO_FAILURE, format!("reading stdin: {e}"));
        println!("{}", err.to_json("1.1.0"));
        return 1;
    }
    let version = serde_json::from_slice::<Value>(&stdin)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(Value::as_str)
                .map(String::from)
        })
        .unwrap_or_else(|| "1.1.0".into());
    match handle(&env, &stdin) {
        Ok(Some(v)) => {
            println!("{v}");
            0
        }
        Ok(None) => 0,
        Err(e) => {
            tracing::warn!("{e}");
            println!("{}", e.to_json(&version));
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(cmd: &str) -> CniEnv {
        CniEnv {
            command: Some(cmd.into()),
            container_id: Some("c1".into()),
            netns: Some("/nonexistent/netns".into()),
            ifname: Some("eth0".into()),
            ..Default::default()
        }
    }

    #[test]
    fn minimal_config_parses_with_defaults() {
        let c = parse_netconf(br#"{"cniVersion":"1.0.0","name":"ferry","type":"ferry"}"#).unwrap();
        assert_eq!(c.subnet_file, PathBuf::from("/run/ferry/subnet.env"));
        assert_eq!(c.bridge, "cni0");
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/ferry/ipam"));
    }

    #[test]
    fn errors_name_the_field_and_use_cni_codes() {
        let cases: &[(&[u8], u32, &str)] = &[
            (b"{nope", code::DECODE_FAILURE, "JSON"),
            (br#"{"name":"x"}"#, code::INVALID_CONFIG, "\"cniVersion\""),
            (
                br#"{"cniVersion":1,"name":"x"}"#,
                code::INVALID_CONFIG,
                "\"cniVersion\"",
            ),
            (
                br#"{"cniVersion":"9.9.9","name":"x"}"#,
                code::INCOMPATIBLE_VERSION,
                "\"cniVersion\"",
            ),
            (
                br#"{"cniVersion":"1.0.0"}"#,
                code::INVALID_CONFIG,
                "\"name\"",
            ),
            (
                br#"{"cniVersion":"1.0.0","name":"-bad"}"#,
                code::INVALID_CONFIG,
                "\"name\"",
            ),
            (
                br#"{"cniVersion":"1.0.0","name":"n","subnetFile":5}"#,
                code::INVALID_CONFIG,
                "\"subnetFile\"",
            ),
            (
                br#"{"cniVersion":"1.0.0","name":"n","mtu":"big"}"#,
                code::INVALID_CONFIG,
                "\"mtu\"",
            ),
            (
                br#"{"cniVersion":"1.0.0","name":"n","bridge":"a/b"}"#,
                code::INVALID_CONFIG,
                "\"bridge\"",
            ),
            (
                br#"{"cniVersion":"1.0.0","name":"n","prevResult":3}"#,
                code::INVALID_CONFIG,
                "\"prevResult\"",
            ),
        ];
        for (input, want_code, field) in cases {
            let e = parse_netconf(input).unwrap_err();
            assert_eq!(
                e.code,
                *want_code,
                "{}: {e}",
                String::from_utf8_lossy(input)
            );
            assert!(e.msg.contains(field) || e.details.contains(field), "{e}");
            let j = e.to_json("1.0.0");
            assert_eq!(j["code"], json!(want_code));
            assert!(j["msg"].is_string());
        }
    }

    #[test]
    fn version_command() {
        let v = handle(&env("VERSION"), br#"{"cniVersion":"0.4.0"}"#)
            .unwrap()
            .unwrap();
        assert_eq!(v["cniVersion"], "0.4.0");
        assert!(v["supportedVersions"]
            .as_array()
            .unwrap()
            .contains(&json!("1.0.0")));
        let v = handle(&env("VERSION"), b"").unwrap().unwrap();
        assert_eq!(v["cniVersion"], "1.1.0");
    }

    #[test]
    fn env_errors() {
        let e = handle(&CniEnv::default(), b"{}").unwrap_err();
        assert_eq!(e.code, code::INVALID_ENV);
        assert!(e.msg.contains("CNI_COMMAND"));
        let mut ev = env("ADD");
        ev.container_id = None;
        let conf = br#"{"cniVersion":"1.0.0","name":"n"}"#;
        let e = handle(&ev, conf).unwrap_err();
        assert!(e.msg.contains("CNI_CONTAINERID"), "{e}");
        let e = handle(&env("FROB"), conf).unwrap_err();
        assert_eq!(e.code, code::INVALID_ENV);
    }

    #[test]
    fn add_without_subnet_file_says_try_again_later() {
        let dir = tempfile::tempdir().unwrap();
        let conf = format!(
            r#"{{"cniVersion":"1.0.0","name":"n","subnetFile":"{}/none.env","dataDir":"{}"}}"#,
            dir.path().display(),
            dir.path().display()
        );
        let e = handle(&env("ADD"), conf.as_bytes()).unwrap_err();
        assert_eq!(e.code, code::TRY_AGAIN_LATER, "{e}");
        assert!(e.msg.contains("none.env"));
    }

    #[test]
    fn check_needs_040_and_unknown_container_is_code_3() {
        let e = handle(&env("CHECK"), br#"{"cniVersion":"0.3.1","name":"n"}"#).unwrap_err();
        assert_eq!(e.code, code::INCOMPATIBLE_VERSION);
        let dir = tempfile::tempdir().unwrap();
        let sf = dir.path().join("subnet.env");
        std::fs::write(
            &sf,
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
        )
        .unwrap();
        let conf = format!(
            r#"{{"cniVersion":"1.0.0","name":"n","subnetFile":"{}","dataDir":"{}"}}"#,
            sf.display(),
            dir.path().display()
        );
        let e = handle(&env("CHECK"), conf.as_bytes()).unwrap_err();
        assert_eq!(e.code, code::UNKNOWN_CONTAINER, "{e}");
    }

    #[test]
    fn result_formats() {
        let a = PodAddress {
            address: "10.244.1.5/24".parse().unwrap(),
            gateway: "10.244.1.1".parse().unwrap(),
            mtu: 1450,
            bridge: "cni0".into(),
            bridge_mac: Some("02:00:00:00:00:01".parse().unwrap()),
            host_veth: "veth01234567".into(),
            host_veth_mac: None,
            ifname: "eth0".into(),
            pod_mac: None,
        };
        let v = result_json("1.0.0", &a, "/var/run/netns/p");
        assert_eq!(v["ips"][0]["address"], "10.244.1.5/24");
        assert_eq!(v["ips"][0]["interface"], 2);
        assert!(v["ips"][0].get("version").is_none());
        assert_eq!(v["interfaces"][2]["sandbox"], "/var/run/netns/p");
        let v = result_json("0.3.1", &a, "/p");
        assert_eq!(v["ips"][0]["version"], "4");
        assert!(version_at_least("1.1.0", "0.4.0"));
        assert!(!version_at_least("0.3.1", "0.4.0"));
    }
}
