//! iptables mode: `iptables-restore --noflush`, one atomic restore per sync, with
//! ferry's own FERRY-* chains. Full restores write every chain; partial restores
//! rewrite the small node-wide chains plus only the changed service chains.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use crate::datapath::{Datapath, Runner};
use crate::model::{
    short_hash, Endpoint, ModelDiff, NodePortAddresses, ProxyModel, ServicePort, ServicePortName,
    TrafficPolicy,
};

pub const SERVICES: &str = "FERRY-SERVICES";
pub const NODEPORTS: &str = "FERRY-NODEPORTS";
pub const POSTROUTING: &str = "FERRY-POSTROUTING";
pub const MARK_MASQ: &str = "FERRY-MARK-MASQ";
pub const MARK_DROP: &str = "FERRY-MARK-DROP";
pub const MARK_NONLOCAL: &str = "FERRY-MARK-NONLOCAL";
pub const FIREWALL: &str = "FERRY-FIREWALL";
pub const MASQ_MARK: &str = "0x4000";
pub const DROP_MARK: &str = "0x8000";

const NAT_BASE: [&str; 6] = [
    SERVICES,
    NODEPORTS,
    POSTROUTING,
    MARK_MASQ,
    MARK_DROP,
    MARK_NONLOCAL,
];

/// Jump rules from the built-in chains: (table, chain, rule args).
const JUMPS: [(&str, &str, &str); 6] = [
    (
        "nat",
        "PREROUTING",
        "-m comment --comment ferry-service-portals -j FERRY-SERVICES",
    ),
    (
        "nat",
        "OUTPUT",
        "-m comment --comment ferry-service-portals -j FERRY-SERVICES",
    ),
    (
        "nat",
        "POSTROUTING",
        "-m comment --comment ferry-postrouting -j FERRY-POSTROUTING",
    ),
    (
        "filter",
        "INPUT",
        "-m conntrack --ctstate NEW -m comment --comment ferry-firewall -j FERRY-FIREWALL",
    ),
    (
        "filter",
        "FORWARD",
        "-m conntrack --ctstate NEW -m comment --comment ferry-firewall -j FERRY-FIREWALL",
    ),
    (
        "filter",
        "OUTPUT",
        "-m conntrack --ctstate NEW -m comment --comment ferry-firewall -j FERRY-FIREWALL",
    ),
];

/// Rules rendered for one service port.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceRules {
    /// Lines for FERRY-SERVICES (ClusterIP, externalIPs, LoadBalancer IPs).
    pub services: Vec<String>,
    /// Lines for FERRY-NODEPORTS.
    pub nodeports: Vec<String>,
    /// Lines for the filter table's FERRY-FIREWALL (rejects and drops).
    pub firewall: Vec<String>,
    /// This port's own nat chains → rules.
    pub chains: BTreeMap<String, Vec<String>>,
}

fn svc_hash(n: &ServicePortName) -> String {
    short_hash(&format!(
        "{}/{}:{}/{}",
        n.namespace, n.name, n.port, n.protocol
    ))
}

/// Address matches for NodePorts.
fn node_port_matches(model: &ProxyModel) -> Vec<String> {
    match &model.node_port_addresses {
        NodePortAddresses::All => vec!["-m addrtype --dst-type LOCAL ! -d 127.0.0.0/8".into()],
        NodePortAddresses::Ips(ips) => ips.iter().map(|ip| format!("-d {ip}/32")).collect(),
        NodePortAddresses::Cidrs(c) => c
            .iter()
            .map(|c| format!("-d {c} -m addrtype --dst-type LOCAL"))
            .collect(),
    }
}

fn reject(proto: &str) -> &'static str {
    if proto == "tcp" {
        "-j REJECT --reject-with tcp-reset"
    } else {
        "-j REJECT"
    }
}

/// Renders one service port.
pub fn render_service(model: &ProxyModel, sp: &ServicePort) -> ServiceRules {
    let mut r = ServiceRules::default();
    let h = svc_hash(&sp.name);
    let proto = sp.name.protocol.as_str();
    let name = sp.name.to_string();
    let svc = format!("FERRY-SVC-{h}");
    let svl = format!("FERRY-SVL-{h}");
    let ext = format!("FERRY-EXT-{h}");
    let pm = format!("-p {proto} -m {proto}");
    let cip_masq = if model.masquerade_all {
        Some(format!(
            "-A {{chain}} -m comment --comment \"{name} cluster IP\" -j {MARK_MASQ}"
        ))
    } else if !model.cluster_cidrs.is_empty() {
        Some(format!(
            "-A {{chain}} -d {}/32 {pm} --dport {} -m comment --comment \"{name} cluster IP\" -j {MARK_NONLOCAL}",
            sp.cluster_ip, sp.port
        ))
    } else {
        None
    };

    let dispatch = |r: &mut ServiceRules, chain: &str, eps: &[Endpoint]| {
        let mut rules = Vec::new();
        if let Some(m) = &cip_masq {
            rules.push(m.replace("{chain}", chain));
        }
        let seps: Vec<String> = eps
            .iter()
            .map(|e| {
                format!(
                    "FERRY-SEP-{}",
                    short_hash(&format!("{name}/{proto}/{}:{}", e.ip, e.port))
                )
            })
            .collect();
        if let Some(t) = sp.affinity_timeout {
            for (e, sep) in eps.iter().zip(&seps) {
                rules.push(format!(
                    "-A {chain} -m comment --comment \"{name} -> {e}\" -m recent --name {sep} --mask 255.255.255.255 --rsource --rcheck --seconds {t} --reap -j {sep}"
                ));
            }
        }
        let n = eps.len();
        for (i, (e, sep)) in eps.iter().zip(&seps).enumerate() {
            if i + 1 < n {
                let p = 1.0 / (n - i) as f64;
                rules.push(format!(
                    "-A {chain} -m comment --comment \"{name} -> {e}\" -m statistic --mode random --probability {p:.10} -j {sep}"
                ));
            } else {
                rules.push(format!(
                    "-A {chain} -m comment --comment \"{name} -> {e}\" -j {sep}"
                ));
            }
            let mut sep_rules = vec![format!(
                "-A {sep} -s {}/32 -m comment --comment \"{name}\" -j {MARK_MASQ}",
                e.ip
            )];
            if sp.affinity_timeout.is_some() {
                sep_rules.push(format!(
                    "-A {sep} {pm} -m comment --comment \"{name}\" -m recent --name {sep} --mask 255.255.255.255 --rsource --set -j DNAT --to-destination {e}"
                ));
            } else {
                sep_rules.push(format!(
                    "-A {sep} {pm} -m comment --comment \"{name}\" -j DNAT --to-destination {e}"
                ));
            }
            r.chains.insert(sep.clone(), sep_rules);
        }
        r.chains.insert(chain.to_string(), rules);
    };

    if !sp.cluster_endpoints.is_empty() {
        dispatch(&mut r, &svc, &sp.cluster_endpoints);
    }
    let uses_local = sp.internal_policy == TrafficPolicy::Local
        || (sp.has_external() && sp.external_policy == TrafficPolicy::Local);
    if uses_local && !sp.local_endpoints.is_empty() {
        dispatch(&mut r, &svl, &sp.local_endpoints);
    }

    // ClusterIP.
    let cip_match = format!("-d {}/32 {pm} --dport {}", sp.cluster_ip, sp.port);
    let internal_target = match sp.internal_policy {
        TrafficPolicy::Cluster => &svc,
        TrafficPolicy::Local => &svl,
    };
    if !sp.internal_endpoints().is_empty() {
        r.services.push(format!("-A {SERVICES} {cip_match} -m comment --comment \"{name} cluster IP\" -j {internal_target}"));
    } else {
        let verdict = if sp.cluster_endpoints.is_empty() {
            reject(proto)
        } else {
            "-j DROP"
        };
        r.firewall.push(format!("-A {FIREWALL} {cip_match} -m comment --comment \"{name} has no usable endpoints\" {verdict}"));
    }

    // External traffic.
    if sp.has_external() {
        let usable = !sp.cluster_endpoints.is_empty();
        if usable {
            let mut rules = Vec::new();
            match sp.external_policy {
                TrafficPolicy::Cluster => {
                    rules.push(format!("-A {ext} -m comment --comment \"masquerade traffic for {name} external destinations\" -j {MARK_MASQ}"));
                    rules.push(format!("-A {ext} -j {svc}"));
                }
                TrafficPolicy::Local => {
                    for c in &model.cluster_cidrs {
                        rules.push(format!("-A {ext} -s {c} -m comment --comment \"pod traffic for {name} external destinations\" -j {svc}"));
                    }
                    rules.push(format!("-A {ext} -m addrtype --src-type LOCAL -m comment --comment \"masquerade LOCAL traffic for {name} external destinations\" -j {MARK_MASQ}"));
                    rules.push(format!("-A {ext} -m addrtype --src-type LOCAL -m comment --comment \"route LOCAL traffic for {name} external destinations\" -j {svc}"));
                    if sp.local_endpoints.is_empty() {
                        rules.push(format!("-A {ext} -m comment --comment \"{name} has no local endpoints\" -j {MARK_DROP}"));
                    } else {
                        rules.push(format!("-A {ext} -j {svl}"));
                    }
                }
            }
            r.chains.insert(ext.clone(), rules);
        }
        let ips: BTreeSet<_> = sp
            .external_ips
            .iter()
            .chain(&sp.load_balancer_ips)
            .collect();
        for ip in ips {
            let m = format!("-d {ip}/32 {pm} --dport {}", sp.port);
            if usable {
                r.services.push(format!(
                    "-A {SERVICES} {m} -m comment --comment \"{name} external IP\" -j {ext}"
                ));
            } else {
                r.firewall.push(format!(
                    "-A {FIREWALL} {m} -m comment --comment \"{name} has no endpoints\" {}",
                    reject(proto)
                ));
            }
        }
        if let Some(np) = sp.node_port {
            if usable {
                r.nodeports.push(format!("-A {NODEPORTS} {pm} --dport {np} -m comment --comment \"{name} node port\" -j {ext}"));
            } else {
                for m in node_port_matches(model) {
                    r.firewall.push(format!(
                        "-A {FIREWALL} {m} {pm} --dport {np} -m comment --comment \"{name} has no endpoints\" {}",
                        reject(proto)
                    ));
                }
            }
        }
    }
    r
}

pub fn render_services(model: &ProxyModel) -> BTreeMap<ServicePortName, ServiceRules> {
    model
        .services
        .iter()
        .map(|(k, sp)| (k.clone(), render_service(model, sp)))
        .collect()
}

/// An iptables-restore input. `write` selects the service ports whose chains are
/// written (None = all); `delete` lists chains to remove. Node-wide chains are
/// always rewritten whole.
pub fn render_restore(
    model: &ProxyModel,
    rendered: &BTreeMap<ServicePortName, ServiceRules>,
    write: Option<&BTreeSet<ServicePortName>>,
    delete: &BTreeSet<String>,
) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "*filter");
    let _ = writeln!(out, ":{FIREWALL} - [0:0]");
    let _ = writeln!(out, "-A {FIREWALL} -m mark --mark {DROP_MARK}/{DROP_MARK} -m comment --comment \"ferry drop mark\" -j DROP");
    for r in rendered.values() {
        for l in &r.firewall {
            let _ = writeln!(out, "{l}");
        }
    }
    let _ = writeln!(out, "COMMIT");
    let _ = writeln!(out, "*nat");
    for c in NAT_BASE {
        let _ = writeln!(out, ":{c} - [0:0]");
    }
    let mut chains: BTreeMap<&String, &Vec<String>> = BTreeMap::new();
    for (k, r) in rendered {
        if write.is_none_or(|w| w.contains(k)) {
            chains.extend(r.chains.iter());
        }
    }
    for c in chains.keys() {
        let _ = writeln!(out, ":{c} - [0:0]");
    }
    for c in delete {
        if !chains.contains_key(c) {
            let _ = writeln!(out, ":{c} - [0:0]");
        }
    }
    let _ = writeln!(out, "-A {MARK_MASQ} -j MARK --or-mark {MASQ_MARK}");
    let _ = writeln!(out, "-A {MARK_DROP} -j MARK --or-mark {DROP_MARK}");
    for c in &model.cluster_cidrs {
        let _ = writeln!(out, "-A {MARK_NONLOCAL} -s {c} -j RETURN");
    }
    let _ = writeln!(out, "-A {MARK_NONLOCAL} -j {MARK_MASQ}");
    let _ = writeln!(
        out,
        "-A {POSTROUTING} -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN"
    );
    let _ = writeln!(out, "-A {POSTROUTING} -j MARK --xor-mark {MASQ_MARK}");
    let _ = writeln!(out, "-A {POSTROUTING} -m comment --comment \"ferry service traffic requiring SNAT\" -j MASQUERADE --random-fully");
    for r in rendered.values() {
        for l in &r.services {
            let _ = writeln!(out, "{l}");
        }
    }
    for m in node_port_matches(model) {
        let _ = writeln!(
            out,
            "-A {SERVICES} {m} -m comment --comment \"ferry service nodeports\" -j {NODEPORTS}"
        );
    }
    for r in rendered.values() {
        for l in &r.nodeports {
            let _ = writeln!(out, "{l}");
        }
    }
    for rules in chains.values() {
        for l in rules.iter() {
            let _ = writeln!(out, "{l}");
        }
    }
    for c in delete {
        let _ = writeln!(out, "-X {c}");
    }
    let _ = writeln!(out, "COMMIT");
    out
}

/// FERRY-* chains present in `iptables-save` output of one table.
pub fn parse_chains(save: &str) -> BTreeSet<String> {
    save.lines()
        .filter_map(|l| l.strip_prefix(':'))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| c.starts_with("FERRY-"))
        .map(String::from)
        .collect()
}

/// The iptables datapath.
pub struct IptablesDatapath {
    runner: Runner,
    /// "iptables" (whatever the system default is, iptables-nft on Debian) or "iptables-legacy".
    binary: String,
    programmed: BTreeMap<ServicePortName, ServiceRules>,
    needs_full: bool,
    pub last_restore: String,
}

impl IptablesDatapath {
    pub fn new(runner: Runner) -> Self {
        Self::with_binary(runner, "iptables")
    }
    pub fn with_binary(runner: Runner, binary: &str) -> Self {
        IptablesDatapath {
            runner,
            binary: binary.to_string(),
            programmed: BTreeMap::new(),
            needs_full: true,
            last_restore: String::new(),
        }
    }

    fn restore(&mut self, input: String) -> anyhow::Result<()> {
        let res = self.runner.run_stdin(
            &format!("{}-restore", self.binary),
            &["-w", "--noflush"],
            &input,
        );
        self.last_restore = input;
        res.map(|_| ())
    }

    fn existing(&self) -> anyhow::Result<BTreeSet<String>> {
        let save = format!("{}-save", self.binary);
        let nat = self.runner.run(&save, &["-t", "nat"])?;
        Ok(parse_chains(&nat))
    }

    fn ensure_jumps(&self) -> anyhow::Result<()> {
        for (table, chain, rule) in JUMPS {
            let args: Vec<&str> = rule.split(' ').collect();
            let mut check = vec!["-w", "-t", table, "-C", chain];
            check.extend(&args);
            if !self.runner.succeeds(&self.binary, &check) {
                let mut ins = vec!["-w", "-t", table, "-I", chain];
                ins.extend(&args);
                self.runner.run(&self.binary, &ins)?;
            }
        }
        Ok(())
    }

    /// Removes every FERRY-* chain and jump with this binary. Returns whether
    /// anything was found.
    pub fn remove(runner: &Runner, binary: &str) -> anyhow::Result<bool> {
        let save = format!("{binary}-save");
        if !runner.succeeds(&save, &["-t", "nat"]) {
            return Ok(false); // binary not installed or table unavailable
        }
        let mut found = false;
        for (table, chain, rule) in JUMPS {
            let args: Vec<&str> = rule.split(' ').collect();
            let mut del = vec!["-w", "-t", table, "-D", chain];
            del.extend(&args);
            for _ in 0..10 {
                if !runner.succeeds(binary, &del) {
                    break;
                }
                found = true;
            }
        }
        let mut input = String::new();
        for table in ["filter", "nat"] {
            let chains = parse_chains(&runner.run(&save, &["-t", table]).unwrap_or_default());
            if chains.is_empty() {
                continue;
            }
            found = true;
            let _ = writeln!(input, "*{table}");
            for c in &chains {
                let _ = writeln!(input, ":{c} - [0:0]");
            }
            for c in &chains {
                let _ = writeln!(input, "-X {c}");
            }
            let _ = writeln!(input, "COMMIT");
        }
        if !input.is_empty() {
            runner.run_stdin(&format!("{binary}-restore"), &["-w", "--noflush"], &input)?;
        }
        Ok(found)
    }
}

impl Datapath for IptablesDatapath {
    fn name(&self) -> &'static str {
        "iptables"
    }

    fn sync_full(&mut self, model: &ProxyModel) -> anyhow::Result<()> {
        let rendered = render_services(model);
        let desired: BTreeSet<String> = rendered
            .values()
            .flat_map(|r| r.chains.keys().cloned())
            .chain(NAT_BASE.iter().map(|s| s.to_string()))
            .collect();
        let stale: BTreeSet<String> = self
            .existing()?
            .into_iter()
            .filter(|c| !desired.contains(c))
            .collect();
        let input = render_restore(model, &rendered, None, &stale);
        if let Err(e) = self.restore(input).and_then(|_| self.ensure_jumps()) {
            self.needs_full = true;
            return Err(e);
        }
        self.programmed = rendered;
        self.needs_full = false;
        Ok(())
    }

    fn apply_diff(&mut self, new: &ProxyModel, diff: &ModelDiff) -> anyhow::Result<()> {
        if self.needs_full || diff.globals_changed {
            return self.sync_full(new);
        }
        let mut rendered = self.programmed.clone();
        let mut write = BTreeSet::new();
        let mut delete = BTreeSet::new();
        for k in diff.changes.keys() {
            let old_chains: BTreeSet<String> = self
                .programmed
                .get(k)
                .map(|r| r.chains.keys().cloned().collect())
                .unwrap_or_default();
            match new.services.get(k) {
                Some(sp) => {
                    let r = render_service(new, sp);
                    for c in old_chains {
                        if !r.chains.contains_key(&c) {
                            delete.insert(c);
                        }
                    }
                    rendered.insert(k.clone(), r);
                    write.insert(k.clone());
                }
                None => {
                    delete.extend(old_chains);
                    rendered.remove(k);
                }
            }
        }
        // A chain another port still owns (never expected: names hash the port) stays.
        let owned: BTreeSet<&String> = rendered.values().flat_map(|r| r.chains.keys()).collect();
        delete.retain(|c| !owned.contains(c));
        let input = render_restore(new, &rendered, Some(&write), &delete);
        if let Err(e) = self.restore(input) {
            self.needs_full = true;
            return Err(e);
        }
        self.programmed = rendered;
        Ok(())
    }

    fn cleanup(&mut self) -> anyhow::Result<()> {
        Self::remove(&self.runner, &self.binary)?;
        self.programmed.clear();
        self.needs_full = true;
        Ok(())
    }
}
