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

    // Endpoint choice: `statistic` rules DNAT straight to the endpoint. Only
    // affinity needs a chain per endpoint (FERRY-SEP-*) to record the client with
    // `recent --set`; without one a service costs one chain and one rule per
    // endpoint, a third of kube-proxy's rules, which is what keeps 10,000
    // services within iptables-restore's reach.
    let dispatch = |r: &mut ServiceRules, chain: &str, eps: &[Endpoint]| {
        let mut rules = Vec::new();
        if let Some(m) = &cip_masq {
            rules.push(m.replace("{chain}", chain));
        }
        // Hairpin: a local endpoint calling its own service is masqueraded, so
        // the reply comes back through this node.
        for e in eps.iter().filter(|e| e.local) {
            rules.push(format!("-A {chain} -s {}/32 -j {MARK_MASQ}", e.ip));
        }
        let n = eps.len();
        let pick = |i: usize| {
            if i + 1 < n {
                format!(
                    " -m statistic --mode random --probability {:.10}",
                    1.0 / (n - i) as f64
                )
            } else {
                String::new()
            }
        };
        match sp.affinity_timeout {
            None => {
                for (i, e) in eps.iter().enumerate() {
                    rules.push(format!(
                        "-A {chain} {pm}{} -j DNAT --to-destination {e}",
                        pick(i)
                    ));
                }
            }
            Some(t) => {
                let seps: Vec<String> = eps
                    .iter()
                    .map(|e| {
                        format!(
                            "FERRY-SEP-{}",
                            short_hash(&format!("{name}/{proto}/{}:{}", e.ip, e.port))
                        )
                    })
                    .collect();
                for (e, sep) in eps.iter().zip(&seps) {
                    rules.push(format!(
                        "-A {chain} -m comment --comment \"{name} -> {e}\" -m recent --name {sep} --mask 255.255.255.255 --rsource --rcheck --seconds {t} --reap -j {sep}"
                    ));
                }
                for (i, (e, sep)) in eps.iter().zip(&seps).enumerate() {
                    rules.push(format!(
                        "-A {chain} -m comment --comment \"{name} -> {e}\"{} -j {sep}",
                        pick(i)
                    ));
                    r.chains.insert(
                        sep.clone(),
                        vec![format!(
                            "-A {sep} {pm} -m comment --comment \"{name}\" -m recent --name {sep} --mask 255.255.255.255 --rsource --set -j DNAT --to-destination {e}"
                        )],
                    );
                }
            }
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
/// written (None = all, node-wide chains included); `delete` lists chains to
/// remove. A partial restore rewrites the node-wide chains (FERRY-SERVICES,
/// FERRY-NODEPORTS, FERRY-FIREWALL, …) only when `nodewide` says their lines
/// changed: an endpoint change then touches one service chain.
pub fn render_restore(
    model: &ProxyModel,
    rendered: &BTreeMap<ServicePortName, ServiceRules>,
    write: Option<&BTreeSet<ServicePortName>>,
    nodewide: bool,
    delete: &BTreeSet<String>,
) -> String {
    let nodewide = nodewide || write.is_none();
    let mut out = String::new();
    if nodewide {
        let _ = writeln!(out, "*filter");
        let _ = writeln!(out, ":{FIREWALL} - [0:0]");
        let _ = writeln!(out, "-A {FIREWALL} -m mark --mark {DROP_MARK}/{DROP_MARK} -m comment --comment \"ferry drop mark\" -j DROP");
        for l in rendered.values().flat_map(|r| &r.firewall) {
            let _ = writeln!(out, "{l}");
        }
        let _ = writeln!(out, "COMMIT");
    }
    let _ = writeln!(out, "*nat");
    let mut chains: BTreeMap<&String, &Vec<String>> = BTreeMap::new();
    for (k, r) in rendered {
        if write.is_none_or(|w| w.contains(k)) {
            chains.extend(r.chains.iter());
        }
    }
    if nodewide {
        for c in NAT_BASE {
            let _ = writeln!(out, ":{c} - [0:0]");
        }
    }
    for c in chains
        .keys()
        .copied()
        .chain(delete.iter().filter(|c| !chains.contains_key(c)))
    {
        let _ = writeln!(out, ":{c} - [0:0]");
    }
    if nodewide {
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
        for l in rendered.values().flat_map(|r| &r.services) {
            let _ = writeln!(out, "{l}");
        }
        for m in node_port_matches(model) {
            let _ = writeln!(
                out,
                "-A {SERVICES} {m} -m comment --comment \"ferry service nodeports\" -j {NODEPORTS}"
            );
        }
        for l in rendered.values().flat_map(|r| &r.nodeports) {
            let _ = writeln!(out, "{l}");
        }
    }
    for l in chains.values().copied().flatten() {
        let _ = writeln!(out, "{l}");
    }
    for c in delete {
        let _ = writeln!(out, "-X {c}");
    }
    let _ = writeln!(out, "COMMIT");
    out
}

/// The restore input for the service ports in `diff`, updating `rendered` (what is
/// programmed, per port) to the new rules.
pub fn partial_restore(
    rendered: &mut BTreeMap<ServicePortName, ServiceRules>,
    new: &ProxyModel,
    diff: &ModelDiff,
) -> String {
    let mut write = BTreeSet::new();
    let mut delete = BTreeSet::new();
    let mut nodewide = false;
    for k in diff.changes.keys() {
        let old = rendered.remove(k).unwrap_or_default();
        let new_rules = new.services.get(k).map(|sp| render_service(new, sp));
        let new_ref = new_rules.as_ref();
        // Chain names hash the port's name: no other port owns these.
        delete.extend(
            old.chains
                .keys()
                .filter(|c| new_ref.is_none_or(|r| !r.chains.contains_key(*c)))
                .cloned(),
        );
        nodewide |= new_ref.is_none_or(|r| {
            r.services != old.services || r.nodeports != old.nodeports || r.firewall != old.firewall
        });
        if let Some(r) = new_rules {
            rendered.insert(k.clone(), r);
            write.insert(k.clone());
        }
    }
    render_restore(new, rendered, Some(&write), nodewide, &delete)
}

/// What `iptables-save` shows of ferry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Saved {
    /// FERRY-* chains of the nat table.
    pub nat_chains: BTreeSet<String>,
    /// Jumps from built-in chains ([`JUMPS`]) not yet present: (table, chain, rule).
    pub missing_jumps: Vec<(&'static str, &'static str, &'static str)>,
}

/// Reads `iptables-save` output of all tables.
pub fn parse_save(save: &str) -> Saved {
    let mut table = "";
    let mut nat_chains = BTreeSet::new();
    let mut present = BTreeSet::new();
    for l in save.lines() {
        if let Some(t) = l.strip_prefix('*') {
            table = t.trim();
        } else if table == "nat" && l.starts_with(":FERRY-") {
            nat_chains.extend(parse_chains(l));
        } else if l.starts_with("-A ") {
            for (i, (t, chain, rule)) in JUMPS.iter().enumerate() {
                let (tag, target) = jump_signature(rule);
                if *t == table
                    && l.starts_with(&format!("-A {chain} "))
                    && l.contains(tag)
                    && l.ends_with(target)
                {
                    present.insert(i);
                }
            }
        }
    }
    Saved {
        nat_chains,
        missing_jumps: JUMPS
            .iter()
            .enumerate()
            .filter(|(i, _)| !present.contains(i))
            .map(|(_, j)| *j)
            .collect(),
    }
}

/// The comment tag and the `-j TARGET` ending that identify a jump rule.
fn jump_signature(rule: &'static str) -> (&'static str, &'static str) {
    let tag = rule
        .split("--comment ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .unwrap_or(rule);
    let target = rule.rsplit_once(" -j ").map_or(rule, |(_, t)| t);
    (tag, target)
}

/// Inserts the missing jump rules into a restore input (in their table's section,
/// before its COMMIT).
pub fn add_jumps(input: &mut String, jumps: &[(&str, &str, &str)]) {
    for (table, chain, rule) in jumps {
        let header = format!("*{table}\n");
        let section = match input.find(&header) {
            Some(at) => at,
            None => {
                input.push_str(&header);
                input.push_str("COMMIT\n");
                input.len() - header.len() - "COMMIT\n".len()
            }
        };
        let commit = section + input[section..].find("COMMIT\n").unwrap_or(0);
        input.insert_str(commit, &format!("-I {chain} {rule}\n"));
    }
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

/// Which iptables implementation programs the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum IptablesBackend {
    /// The one already holding more rules, as the iptables-wrapper of kube-proxy's
    /// image decides (nft when neither holds any: Debian's default).
    #[default]
    Auto,
    /// iptables-nft: rules become nf_tables objects, changed incrementally.
    Nft,
    /// iptables-legacy: x_tables; each restore replaces a table's whole blob,
    /// which is several times faster for big rulesets.
    Legacy,
}

impl IptablesBackend {
    /// The command prefix: `iptables-nft` or `iptables-legacy`.
    pub fn binary(self, runner: &Runner) -> &'static str {
        match self {
            IptablesBackend::Nft => "iptables-nft",
            IptablesBackend::Legacy => "iptables-legacy",
            IptablesBackend::Auto => {
                let rules = |bin: &str| {
                    runner
                        .run(&format!("{bin}-save"), &[])
                        .map_or(0, |s| s.lines().filter(|l| l.starts_with("-A")).count())
                };
                if rules("iptables-legacy") > rules("iptables-nft") {
                    "iptables-legacy"
                } else {
                    "iptables-nft"
                }
            }
        }
    }
}

/// The iptables datapath.
pub struct IptablesDatapath {
    runner: Runner,
    /// "iptables-nft", "iptables-legacy", or "iptables" (the system's default).
    binary: String,
    programmed: BTreeMap<ServicePortName, ServiceRules>,
    needs_full: bool,
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
        }
    }

    fn restore(&self, input: &str) -> anyhow::Result<()> {
        self.runner
            .run_stdin(
                &format!("{}-restore", self.binary),
                &["-w", "--noflush"],
                input,
            )
            .map(|_| ())
    }

    /// One `iptables-save` of every table: with iptables-legacy each command
    /// reads a whole table, so checking the jumps one `-C` at a time costs more
    /// than the restore itself at 10,000 services.
    fn saved(&self) -> anyhow::Result<Saved> {
        let save = self.runner.run(&format!("{}-save", self.binary), &[])?;
        Ok(parse_save(&save))
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
        let saved = self.saved()?;
        let stale: BTreeSet<String> = saved
            .nat_chains
            .into_iter()
            .filter(|c| !desired.contains(c))
            .collect();
        let mut input = render_restore(model, &rendered, None, true, &stale);
        add_jumps(&mut input, &saved.missing_jumps);
        if let Err(e) = self.restore(&input) {
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
        // Updated in place: if the restore fails, the next sync is a full one.
        let input = partial_restore(&mut self.programmed, new, diff);
        if let Err(e) = self.restore(&input) {
            self.needs_full = true;
            return Err(e);
        }
        Ok(())
    }

    fn cleanup(&mut self) -> anyhow::Result<()> {
        Self::remove(&self.runner, &self.binary)?;
        self.programmed.clear();
        self.needs_full = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAVE: &str = "# Generated by iptables-save
*filter
:INPUT ACCEPT [0:0]
:FERRY-FIREWALL - [0:0]
-A INPUT -m conntrack --ctstate NEW -m comment --comment ferry-firewall -j FERRY-FIREWALL
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:FERRY-SERVICES - [0:0]
:FERRY-SVC-AAAA - [0:0]
-A PREROUTING -m comment --comment ferry-service-portals -j FERRY-SERVICES
-A OUTPUT -m comment --comment \"other\" -j FERRY-SERVICES
COMMIT
";

    #[test]
    fn save_tells_chains_and_missing_jumps() {
        let s = parse_save(SAVE);
        assert_eq!(
            s.nat_chains,
            ["FERRY-SERVICES", "FERRY-SVC-AAAA"]
                .map(String::from)
                .into()
        );
        let missing: Vec<(&str, &str)> = s.missing_jumps.iter().map(|(t, c, _)| (*t, *c)).collect();
        assert_eq!(
            missing,
            [
                ("nat", "OUTPUT"),
                ("nat", "POSTROUTING"),
                ("filter", "FORWARD"),
                ("filter", "OUTPUT")
            ]
        );
    }

    #[test]
    fn jumps_go_into_their_tables_section() {
        let mut input =
            "*filter\n:FERRY-FIREWALL - [0:0]\nCOMMIT\n*nat\n:FERRY-SERVICES - [0:0]\nCOMMIT\n"
                .to_string();
        add_jumps(&mut input, &parse_save("").missing_jumps);
        let nat = &input[input.find("*nat").unwrap()..];
        let filter = &input[..input.find("*nat").unwrap()];
        assert_eq!(nat.matches("-I ").count(), 3, "{input}");
        assert_eq!(filter.matches("-I ").count(), 3, "{input}");
        assert!(nat.contains(
            "-I PREROUTING -m comment --comment ferry-service-portals -j FERRY-SERVICES"
        ));
        assert!(input.ends_with("COMMIT\n"));
        // Applied once, the jumps are found again.
        let again = parse_save(&input.replace("-I ", "-A "));
        assert!(again.missing_jumps.is_empty(), "{again:?}");
    }
}
