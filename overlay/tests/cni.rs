//! The CNI plugin as a runtime calls it: this test binary re-executes itself
//! as the plugin (`cni_child` calls `ferry_overlay::cni_main()` with CNI_*
//! in the environment and the config on stdin), inside a node namespace.
//! Needs root.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use ferry_overlay::subnet::SubnetEnv;
use ferry_testkit::{require_root, Netns};
use serde_json::{json, Value};

/// Not a test of its own: the plugin process when FERRY_CNI_CHILD is set.
#[test]
fn cni_child() {
    if std::env::var_os("FERRY_CNI_CHILD").is_some() {
        let code = ferry_overlay::cni_main();
        let _ = std::io::stdout().flush();
        std::process::exit(code);
    }
}

struct Plugin {
    node: String,
    conf: Value,
}

struct Out {
    code: i32,
    json: Option<Value>,
}

impl Plugin {
    fn call(&self, cmd: &str, id: &str, netns: Option<&Path>, conf: &Value) -> Out {
        let exe = std::env::current_exe().unwrap();
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.node])
            .arg(exe)
            .args([
                "--exact",
                "cni_child",
                "--quiet",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("FERRY_CNI_CHILD", "1")
            .env("CNI_COMMAND", cmd)
            .env("CNI_CONTAINERID", id)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", "/opt/cni/bin")
            .env_remove("CNI_NETNS")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(p) = netns {
            c.env("CNI_NETNS", p);
        }
        let mut child = c.spawn().unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(conf.to_string().as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        // libtest prints its header before the plugin runs; the plugin's output is one JSON line.
        let json = stdout
            .lines()
            .rfind(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).unwrap());
        Out {
            code: out.status.code().unwrap_or(-1),
            json,
        }
    }

    fn ok(&self, cmd: &str, id: &str, netns: Option<&Path>) -> Option<Value> {
        let o = self.call(cmd, id, netns, &self.conf);
        assert_eq!(o.code, 0, "{cmd} {id}: {:?}", o.json);
        o.json
    }
}

fn path(ns: &Netns) -> PathBuf {
    PathBuf::from(format!("/var/run/netns/{}", ns.name()))
}

#[test]
fn cni_add_check_del_as_a_runtime_calls_them() {
    if !require_root() {
        return;
    }
    let node = Netns::new("cni").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let subnet_file = dir.path().join("subnet.env");
    // A /29: usable pod addresses .2 ..= .6 (.1 is the gateway on cni0).
    SubnetEnv {
        network: "10.244.0.0/16".parse().unwrap(),
        subnet: "10.244.5.0/29".parse().unwrap(),
        mtu: 1450,
        ipmasq: true,
        fastpath: None,
    }
    .write(&subnet_file)
    .unwrap();
    let plugin = Plugin {
        node: node.name().to_string(),
        conf: json!({
            "cniVersion": "1.0.0", "name": "ferry", "type": "ferry",
            "subnetFile": subnet_file, "dataDir": dir.path().join("ipam"),
        }),
    };

    let v = plugin.ok("VERSION", "", None).unwrap();
    assert!(v["supportedVersions"]
        .as_array()
        .unwrap()
        .contains(&json!("1.0.0")));

    let pods: Vec<Netns> = (0..6)
        .map(|i| Netns::new(&format!("c{i}")).unwrap())
        .collect();
    let ids: Vec<String> = (0..6).map(|i| format!("container{i}")).collect();
    let mut results = Vec::new();
    for i in 0..5 {
        let r = plugin.ok("ADD", &ids[i], Some(&path(&pods[i]))).unwrap();
        assert_eq!(r["cniVersion"], "1.0.0");
        assert_eq!(r["ips"][0]["address"], format!("10.244.5.{}/29", i + 2));
        assert_eq!(r["ips"][0]["gateway"], "10.244.5.1");
        assert_eq!(r["interfaces"][2]["name"], "eth0");
        // The gateway's MAC stays what the first pod learnt as pods join cni0.
        if let Some(first) = results.first() {
            let first: &Value = first;
            assert_eq!(r["interfaces"][0]["mac"], first["interfaces"][0]["mac"]);
        }
        assert_eq!(
            r["interfaces"][2]["sandbox"],
            path(&pods[i]).display().to_string()
        );
        let a = pods[i].ip(&["-4", "addr", "show", "eth0"]).unwrap();
        assert!(
            a.contains(&format!("inet 10.244.5.{}/29", i + 2)) && a.contains("mtu 1450"),
            "{a}"
        );
        results.push(r);
    }
    // Pods on the same node talk over cni0.
    let _s = pods[1].serve_tcp("0.0.0.0:8080", "c1").unwrap();
    let got = pods[0]
        .run(|| {
            Ok(ferry_testkit::tcp_request(
                "10.244.5.3:8080",
                std::time::Duration::from_secs(3),
            )?)
        })
        .unwrap();
    assert_eq!(got, "c1 10.244.5.2");

    // CHECK with prevResult, as a runtime sends it.
    let mut conf = plugin.conf.clone();
    conf["prevResult"] = results[0].clone();
    let o = plugin.call("CHECK", &ids[0], Some(&path(&pods[0])), &conf);
    assert_eq!(o.code, 0, "{:?}", o.json);

    // Range full: a clear CNI error.
    let o = plugin.call("ADD", &ids[5], Some(&path(&pods[5])), &plugin.conf);
    assert_eq!(o.code, 1);
    let e = o.json.unwrap();
    assert_eq!(e["code"], 101, "{e}");
    assert!(
        e["msg"].as_str().unwrap().contains("no free address"),
        "{e}"
    );

    // DEL, and DEL again: both succeed; CHECK then reports an unknown container.
    assert!(plugin.ok("DEL", &ids[1], Some(&path(&pods[1]))).is_none());
    assert!(plugin.ok("DEL", &ids[1], Some(&path(&pods[1]))).is_none());
    assert!(
        pods[1].ip(&["link", "show", "eth0"]).is_err(),
        "eth0 left in the pod"
    );
    let o = plugin.call("CHECK", &ids[1], Some(&path(&pods[1])), &plugin.conf);
    assert_eq!((o.code, o.json.unwrap()["code"].clone()), (1, json!(3)));

    // The freed address is reused only now.
    let r = plugin.ok("ADD", &ids[5], Some(&path(&pods[5]))).unwrap();
    assert_eq!(r["ips"][0]["address"], "10.244.5.3/29");

    // DEL after the pod's namespace is gone still succeeds and frees the address.
    let gone = path(&pods[2]);
    let mut pods = pods;
    drop(pods.remove(2));
    assert!(!gone.exists());
    assert!(plugin.ok("DEL", &ids[2], Some(&gone)).is_none());
    assert!(plugin.ok("DEL", &ids[2], None).is_none());

    // Everything deleted: no address allocated, no veth left on the node.
    for (i, id) in ids.iter().enumerate() {
        plugin.ok("DEL", id, None);
        let _ = i;
    }
    let left: Vec<_> = std::fs::read_dir(dir.path().join("ipam/ferry"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.parse::<std::net::Ipv4Addr>().is_ok())
        .collect();
    assert!(left.is_empty(), "leaked allocations {left:?}");
    let links = node.ip(&["link"]).unwrap();
    assert!(!links.contains("veth"), "{links}");

    // A malformed config: CNI error naming the field.
    let mut bad = plugin.conf.clone();
    bad["mtu"] = json!("large");
    let o = plugin.call("ADD", "x", Some(&path(&pods[0])), &bad);
    let e = o.json.unwrap();
    assert_eq!((o.code, e["code"].clone()), (1, json!(7)));
    assert!(e["msg"].as_str().unwrap().contains("\"mtu\""), "{e}");
}
