//! One task per pod bound to this node: sets up its sandbox (network
//! namespace and address), starts its containers, restarts them under the
//! restart policy with crash backoff, runs probes, writes the pod's status,
//! and on deletion stops the containers gracefully and removes the pod.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use ferry_overlay::PodNetwork;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret};
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::{Api, Client};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::backoff::{Backoff, BackoffPolicy};
use crate::env::{self, EnvContext};
use crate::events;
use crate::hosts;
use crate::lifecycle::{self, PreStop};
use crate::logs::{self, LogRegistry, PodLogs};
use crate::probe::{self, ProbeAction, ProbeKind, ProbeOutcome, ProbeSpec, ProbeTracker};
use crate::runtime::{self, SpawnSpec};
use crate::state::{self, ContainerRecord, PodRecord};
use crate::status::{self, ContainerView, PodView, RestartPolicy, State, Termination};
use crate::volumes::{self, VolumeSources};

/// How often ConfigMap and Secret volumes are brought up to date.
const VOLUME_REFRESH: Duration = Duration::from_secs(20);

/// The pod interface name inside the pod's namespace.
pub const POD_IFNAME: &str = "eth0";

/// Finds the pod network (the overlay's subnet file) when it is there.
pub struct PodNetSource {
    pub subnet_file: PathBuf,
    pub ipam_dir: PathBuf,
    cached: Mutex<Option<(std::time::SystemTime, Arc<PodNetwork>)>>,
}

impl PodNetSource {
    pub fn new(subnet_file: PathBuf, ipam_dir: PathBuf) -> PodNetSource {
        PodNetSource {
            subnet_file,
            ipam_dir,
            cached: Mutex::new(None),
        }
    }

    /// The pod network, re-read when the subnet file changed.
    pub fn get(&self) -> Result<Arc<PodNetwork>, String> {
        let mtime = std::fs::metadata(&self.subnet_file)
            .and_then(|m| m.modified())
            .map_err(|e| {
                format!(
                    "network is not ready: {}: {e} (is `ferry overlay` running on this node?)",
                    self.subnet_file.display()
                )
            })?;
        let mut c = self.cached.lock().unwrap();
        if let Some((t, n)) = &*c {
            if *t == mtime {
                return Ok(n.clone());
            }
        }
        let parent = self.ipam_dir.parent().unwrap_or(Path::new("/"));
        let network = self
            .ipam_dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("ferry");
        let n = PodNetwork::from_subnet_file(&self.subnet_file, parent, network)
            .map_err(|e| format!("network is not ready: {e:#}"))?;
        let n = Arc::new(n);
        *c = Some((mtime, n.clone()));
        Ok(n)
    }
}

/// What every pod worker shares.
pub struct Ctx {
    pub client: Client,
    pub node_name: String,
    pub host_ip: String,
    pub data_dir: PathBuf,
    pub podnet: PodNetSource,
    pub backoff: BackoffPolicy,
    pub logs: LogRegistry,
    pub log_max_bytes: u64,
}

#[derive(Debug)]
pub enum Msg {
    Update(Box<Pod>),
    /// The pod is gone from the API (force-deleted or no longer bound here).
    Gone,
    Exited {
        name: String,
        generation: u64,
        exit_code: i32,
        signal: Option<i32>,
        /// An adopted process that vanished: its exit code is unknown.
        unknown: bool,
    },
    Probe {
        name: String,
        generation: u64,
        kind: ProbeKind,
        outcome: ProbeOutcome,
    },
}

struct Probes {
    readiness: Option<(ProbeSpec, ProbeTracker)>,
    liveness: Option<(ProbeSpec, ProbeTracker)>,
    startup: Option<(ProbeSpec, ProbeTracker)>,
    tasks: Vec<tokio::task::AbortHandle>,
    last_event: Option<Instant>,
}

impl Probes {
    fn none() -> Probes {
        Probes {
            readiness: None,
            liveness: None,
            startup: None,
            tasks: vec![],
            last_event: None,
        }
    }
    fn stop(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }
}

struct ContainerRun {
    spec: Container,
    rec: ContainerRecord,
    state: State,
    /// Increments with every start; messages from older instances are ignored.
    generation: u64,
    backoff: Backoff,
    next_start: Option<Instant>,
    started: Option<Instant>,
    env: Vec<(String, String)>,
    probes: Probes,
    killing: bool,
    last_error: Option<String>,
}

impl ContainerRun {
    fn running_pid(&self) -> Option<u32> {
        match self.state {
            State::Running { pid, .. } => Some(pid),
            _ => None,
        }
    }
}

struct Sandbox {
    netns: Option<PathBuf>,
    pod_ip: String,
    networked: bool,
}

pub struct PodWorker {
    ctx: Arc<Ctx>,
    pod: Pod,
    uid: String,
    namespace: String,
    name: String,
    dir: PathBuf,
    tx: mpsc::UnboundedSender<Msg>,
    sandbox: Option<Sandbox>,
    sandbox_error: Option<String>,
    sandbox_retry: Option<Instant>,
    containers: Vec<ContainerRun>,
    start_time: DateTime<Utc>,
    last_status: Option<Value>,
    last_record: Option<PodRecord>,
    last_rotate: Instant,
    last_volume_refresh: Instant,
    torn_down: bool,
}

fn pod_key(pod: &Pod) -> (String, String, String) {
    (
        pod.metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        pod.metadata.name.clone().unwrap_or_default(),
        pod.metadata.uid.clone().unwrap_or_default(),
    )
}

fn host_network(pod: &Pod) -> bool {
    pod.spec.as_ref().and_then(|s| s.host_network) == Some(true)
}

fn field_path(c: &str) -> String {
    format!("spec.containers{{{c}}}")
}

fn grace_seconds(pod: &Pod) -> u64 {
    pod.metadata
        .deletion_grace_period_seconds
        .or_else(|| {
            pod.spec
                .as_ref()
                .and_then(|s| s.termination_grace_period_seconds)
        })
        .unwrap_or(30)
        .max(0) as u64
}

impl PodWorker {
    /// Starts the worker task; returns its mailbox.
    pub fn spawn(ctx: Arc<Ctx>, pod: Pod, record: Option<PodRecord>) -> mpsc::UnboundedSender<Msg> {
        let (tx, rx) = mpsc::unbounded_channel();
        let (namespace, name, uid) = pod_key(&pod);
        let dir = state::pod_dir(&ctx.data_dir, &uid);
        let containers = pod
            .spec
            .iter()
            .flat_map(|s| s.containers.iter())
            .map(|c| ContainerRun {
                spec: c.clone(),
                rec: ContainerRecord::default(),
                state: State::waiting("ContainerCreating", None),
                generation: 0,
                backoff: Backoff::default(),
                next_start: None,
                started: None,
                env: vec![],
                probes: Probes::none(),
                killing: false,
                last_error: None,
            })
            .collect();
        let start_time = record
            .as_ref()
            .and_then(|r| r.start_time)
            .or_else(|| {
                pod.status
                    .as_ref()
                    .and_then(|s| s.start_time.as_ref())
                    .and_then(|t| t.0.to_string().parse().ok())
            })
            .unwrap_or_else(Utc::now);
        let mut w = PodWorker {
            ctx,
            pod,
            uid,
            namespace,
            name,
            dir,
            tx: tx.clone(),
            sandbox: None,
            sandbox_error: None,
            sandbox_retry: None,
            containers,
            start_time,
            last_status: None,
            last_record: None,
            last_rotate: Instant::now(),
            last_volume_refresh: Instant::now(),
            torn_down: false,
        };
        if let Some(r) = record {
            w.adopt(r);
        }
        let has_init = w
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.init_containers.as_ref())
            .is_some_and(|v| !v.is_empty());
        if has_init {
            w.emit(
                "Warning",
                "InitContainersIgnored",
                "ferry node does not run init containers yet; starting the pod's containers without them",
                None,
            );
        }
        tokio::spawn(w.run(rx));
        tx
    }

    fn emit(&self, kind: &str, reason: &str, message: &str, container: Option<&str>) {
        let fp = container.map(field_path);
        events::emit(
            &self.ctx.client,
            &self.pod,
            &self.ctx.node_name,
            kind,
            reason,
            message,
            fp.as_deref(),
        );
    }

    /// Takes over what a previous agent left: live processes keep running.
    fn adopt(&mut self, r: PodRecord) {
        tracing::info!(pod = %format!("{}/{}", self.namespace, self.name), "adopting pod from a previous agent");
        let netns = r
            .netns
            .as_ref()
            .map(|n| Path::new(runtime::NETNS_DIR).join(n));
        let mut live_pid = None;
        for c in &mut self.containers {
            let Some(cr) = r.containers.get(&c.spec.name) else {
                continue;
            };
            c.rec = cr.clone();
            c.backoff.crashes = cr.crashes;
            if let Some(t) = &cr.last_termination {
                c.state = State::Terminated(t.into());
            }
            if cr.finished {
                if let Some(t) = &cr.last_termination {
                    c.state = State::Terminated(t.into());
                }
            }
            if let (Some(pid), Some(ticks)) = (cr.pid, cr.start_ticks) {
                if runtime::is_alive(pid, ticks) {
                    live_pid = Some(pid);
                    c.generation += 1;
                    c.started = Some(Instant::now());
                    c.state = State::Running {
                        started_at: cr.started_at.unwrap_or_else(Utc::now),
                        pid,
                    };
                    let tx = self.tx.clone();
                    let (name, generation) = (c.spec.name.clone(), c.generation);
                    tokio::spawn(async move {
                        while runtime::is_alive(pid, ticks) {
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                        let _ = tx.send(Msg::Exited {
                            name,
                            generation,
                            exit_code: 137,
                            signal: None,
                            unknown: true,
                        });
                    });
                } else {
                    c.generation += 1;
                    c.state = State::Running {
                        started_at: cr.started_at.unwrap_or_else(Utc::now),
                        pid,
                    };
                    let _ = self.tx.send(Msg::Exited {
                        name: c.spec.name.clone(),
                        generation: c.generation,
                        exit_code: 137,
                        signal: None,
                        unknown: true,
                    });
                }
            }
        }
        if host_network(&self.pod) {
            return;
        }
        // The sandbox: the named namespace, or the namespace of a live container.
        let path = match (&netns, live_pid) {
            (Some(p), _) if runtime::is_netns_file(p) => Some(p.clone()),
            (Some(_), Some(pid)) | (None, Some(pid)) => {
                runtime::name_netns_of(pid, &runtime::netns_name(&self.uid)).ok()
            }
            _ => None,
        };
        if let (Some(path), Some(ip)) = (path, r.pod_ip) {
            self.sandbox = Some(Sandbox {
                netns: Some(path),
                pod_ip: ip,
                networked: r.networked,
            });
        }
        // Start probes for the adopted running containers once the sandbox is known.
        for i in 0..self.containers.len() {
            if self.containers[i].running_pid().is_some() {
                self.setup_probes(i);
            }
        }
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Msg>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut gone = false;
        loop {
            tokio::select! {
                m = rx.recv() => match m {
                    None | Some(Msg::Gone) => gone = true,
                    Some(m) => self.handle(m),
                },
                _ = tick.tick() => {}
            }
            // Take whatever else is queued before acting.
            while let Ok(m) = rx.try_recv() {
                match m {
                    Msg::Gone => gone = true,
                    m => self.handle(m),
                }
            }
            if gone {
                let grace = grace_seconds(&self.pod).min(5);
                self.stop_all(Duration::from_secs(grace), &mut rx).await;
                self.teardown().await;
                self.remove_files();
                return;
            }
            if self.pod.metadata.deletion_timestamp.is_some() {
                self.terminate_and_delete(&mut rx).await;
                return;
            }
            self.sync().await;
        }
    }

    fn handle(&mut self, m: Msg) {
        match m {
            Msg::Update(p) => {
                if p.metadata.uid.as_deref() == Some(self.uid.as_str()) {
                    self.pod = *p;
                }
            }
            Msg::Gone => {}
            Msg::Exited {
                name,
                generation,
                exit_code,
                signal,
                unknown,
            } => self.on_exit(&name, generation, exit_code, signal, unknown),
            Msg::Probe {
                name,
                generation,
                kind,
                outcome,
            } => self.on_probe(&name, generation, kind, outcome),
        }
    }

    fn deleting(&self) -> bool {
        self.pod.metadata.deletion_timestamp.is_some()
    }

    fn on_exit(
        &mut self,
        name: &str,
        generation: u64,
        exit_code: i32,
        signal: Option<i32>,
        unknown: bool,
    ) {
        let policy = RestartPolicy::of(&self.pod);
        let deleting = self.deleting();
        let backoff_policy = self.ctx.backoff;
        let pod_desc = format!("{}_{}({})", self.name, self.namespace, self.uid);
        let Some(c) = self.containers.iter_mut().find(|c| c.spec.name == name) else {
            return;
        };
        if c.generation != generation {
            return;
        }
        let State::Running { started_at, pid } = c.state.clone() else {
            return;
        };
        // Whatever the main process left behind in its group goes too (not for
        // an adopted process that ended unseen: its group id may be reused).
        if !unknown {
            runtime::signal_group(pid, libc::SIGKILL);
        }
        c.probes.stop();
        c.killing = false;
        let t = Termination {
            exit_code,
            signal,
            reason: if unknown {
                "ContainerStatusUnknown".into()
            } else {
                Termination::reason_for(exit_code).into()
            },
            message: unknown.then(|| {
                "The process ended while no node agent was watching it; its exit code is unknown".into()
            }),
            started_at: Some(started_at),
            finished_at: Utc::now(),
            container_id: Some(format!("ferry://{pid}")),
        };
        let ran = c.started.map(|s| s.elapsed()).unwrap_or_default();
        c.rec.pid = None;
        c.rec.start_ticks = None;
        c.rec.last_termination = Some((&t).into());
        tracing::info!(pod = %pod_desc, container = name, exit_code, "container exited");
        if !deleting && policy.restarts(exit_code) {
            let delay = c.backoff.on_exit(&backoff_policy, ran);
            c.rec.crashes = c.backoff.crashes;
            c.next_start = Some(Instant::now() + delay);
            c.state = State::waiting(
                "CrashLoopBackOff",
                Some(format!(
                    "back-off {}s restarting failed container={name} pod={pod_desc}",
                    delay.as_secs()
                )),
            );
            let msg = format!("Back-off restarting failed container {name} in pod {pod_desc}");
            events::emit(
                &self.ctx.client,
                &self.pod,
                &self.ctx.node_name,
                "Warning",
                "BackOff",
                &msg,
                Some(&field_path(name)),
            );
        } else {
            c.rec.finished = true;
            c.state = State::Terminated(t);
        }
    }

    fn on_probe(&mut self, name: &str, generation: u64, kind: ProbeKind, outcome: ProbeOutcome) {
        let Some(i) = self.containers.iter().position(|c| c.spec.name == name) else {
            return;
        };
        let c = &mut self.containers[i];
        if c.generation != generation || c.running_pid().is_none() || c.killing {
            return;
        }
        let slot = match kind {
            ProbeKind::Readiness => &mut c.probes.readiness,
            ProbeKind::Liveness => &mut c.probes.liveness,
            ProbeKind::Startup => &mut c.probes.startup,
        };
        let Some((_, tracker)) = slot else { return };
        let changed = tracker.record(outcome.ok);
        let recent = c
            .probes
            .last_event
            .is_some_and(|t| t.elapsed() < Duration::from_secs(30));
        if !outcome.ok && (changed.is_some() || !recent) {
            c.probes.last_event = Some(Instant::now());
            let msg = format!("{} probe failed: {}", kind.name(), outcome.message);
            self.emit("Warning", "Unhealthy", &msg, Some(name));
        }
        match (kind, changed) {
            (ProbeKind::Liveness, Some(false)) | (ProbeKind::Startup, Some(false)) => {
                let why = if kind == ProbeKind::Liveness {
                    "liveness"
                } else {
                    "startup"
                };
                self.emit(
                    "Normal",
                    "Killing",
                    &format!("Container {name} failed {why} probe, will be restarted"),
                    Some(name),
                );
                self.kill_container(i, Duration::from_secs(grace_seconds(&self.pod)));
            }
            (ProbeKind::Startup, Some(true)) => {
                self.start_probe_tasks(i, &[ProbeKind::Readiness, ProbeKind::Liveness])
            }
            _ => {}
        }
    }

    /// Stops container `i` in the background (preStop hook, SIGTERM, SIGKILL
    /// once `grace` is over); the exit comes as a message.
    fn kill_container(&mut self, i: usize, grace: Duration) {
        let (Some(target), Some(start_ticks)) =
            (self.target(i), self.containers[i].rec.start_ticks)
        else {
            return;
        };
        let name = self.containers[i].spec.name.clone();
        let pre_stop = lifecycle::pre_stop(&self.containers[i].spec).unwrap_or_else(|e| {
            let message = format!("PreStopHook is invalid: {e}");
            self.emit("Warning", "FailedPreStopHook", &message, Some(&name));
            None
        });
        let c = &mut self.containers[i];
        c.killing = true;
        c.probes.stop();
        let (client, pod, node) = (
            self.ctx.client.clone(),
            self.pod.clone(),
            self.ctx.node_name.clone(),
        );
        tokio::spawn(target.stop(start_ticks, pre_stop, grace, move |why| {
            events::emit(
                &client,
                &pod,
                &node,
                "Warning",
                "FailedPreStopHook",
                &format!("PreStopHook failed: {why}"),
                Some(&field_path(&name)),
            );
        }));
    }

    fn setup_probes(&mut self, i: usize) {
        let c = &mut self.containers[i];
        c.probes.stop();
        c.probes = Probes::none();
        let spec = c.spec.clone();
        let mut errors = vec![];
        for (kind, p) in [
            (ProbeKind::Readiness, &spec.readiness_probe),
            (ProbeKind::Liveness, &spec.liveness_probe),
            (ProbeKind::Startup, &spec.startup_probe),
        ] {
            let Some(p) = p else { continue };
            match probe::probe_spec(kind, p, &spec) {
                Ok(s) => {
                    let t = ProbeTracker::new(kind, &s);
                    let slot = match kind {
                        ProbeKind::Readiness => &mut c.probes.readiness,
                        ProbeKind::Liveness => &mut c.probes.liveness,
                        ProbeKind::Startup => &mut c.probes.startup,
                    };
                    *slot = Some((s, t));
                }
                Err(e) => errors.push(format!("{} probe: {e}", kind.name())),
            }
        }
        for e in errors {
            self.emit("Warning", "Unhealthy", &e, Some(&spec.name));
        }
        if self.containers[i].probes.startup.is_some() {
            self.start_probe_tasks(i, &[ProbeKind::Startup]);
        } else {
            self.start_probe_tasks(i, &[ProbeKind::Readiness, ProbeKind::Liveness]);
        }
    }

    fn start_probe_tasks(&mut self, i: usize, kinds: &[ProbeKind]) {
        let Some(target) = self.target(i) else { return };
        let c = &mut self.containers[i];
        for kind in kinds {
            let slot = match kind {
                ProbeKind::Readiness => &c.probes.readiness,
                ProbeKind::Liveness => &c.probes.liveness,
                ProbeKind::Startup => &c.probes.startup,
            };
            let Some((spec, _)) = slot else { continue };
            let spec = spec.clone();
            let tx = self.tx.clone();
            let name = c.spec.name.clone();
            let generation = c.generation;
            let kind = *kind;
            let target = target.clone();
            let h = tokio::spawn(async move {
                tokio::time::sleep(spec.initial_delay).await;
                // One probe every period from the first on, as the kubelet's
                // ticker: the time a probe takes does not stretch the period.
                let mut every = tokio::time::interval(spec.period);
                every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    every.tick().await;
                    let outcome = target.run(&spec.action, spec.timeout).await;
                    let ok = outcome.ok;
                    if tx
                        .send(Msg::Probe {
                            name: name.clone(),
                            generation,
                            kind,
                            outcome,
                        })
                        .is_err()
                    {
                        return;
                    }
                    if kind == ProbeKind::Startup && ok {
                        return;
                    }
                }
            });
            c.probes.tasks.push(h.abort_handle());
        }
    }

    /// Where container `i`'s probes and hooks go, while it runs.
    fn target(&self, i: usize) -> Option<ContainerTarget> {
        let c = &self.containers[i];
        Some(ContainerTarget {
            ip: self
                .sandbox
                .as_ref()
                .map(|s| s.pod_ip.clone())
                .unwrap_or_else(|| self.ctx.host_ip.clone()),
            env: c.env.clone(),
            cwd: c.spec.working_dir.clone().map(PathBuf::from),
            netns: self.sandbox.as_ref().and_then(|s| s.netns.clone()),
            pid: c.running_pid()?,
        })
    }

    async fn setup_sandbox(&mut self) -> Result<(), String> {
        if host_network(&self.pod) {
            self.sandbox = Some(Sandbox {
                netns: None,
                pod_ip: self.ctx.host_ip.clone(),
                networked: false,
            });
            return Ok(());
        }
        let net = self.ctx.podnet.get()?;
        let name = runtime::netns_name(&self.uid);
        let path = tokio::task::spawn_blocking(move || runtime::create_netns(&name))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("creating the pod's network namespace: {e:#}"))?;
        let (p, uid) = (path.clone(), self.uid.clone());
        let addr = tokio::task::spawn_blocking(move || match net.check(&p, &uid, POD_IFNAME) {
            Ok(a) => Ok(a),
            Err(_) => net.add(&p, &uid, POD_IFNAME),
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("setting up the pod network: {e:#}"))?;
        self.sandbox = Some(Sandbox {
            netns: Some(path),
            pod_ip: addr.address.addr().to_string(),
            networked: true,
        });
        Ok(())
    }

    async fn teardown(&mut self) {
        if self.torn_down {
            return;
        }
        self.torn_down = true;
        let name = runtime::netns_name(&self.uid);
        let path = Path::new(runtime::NETNS_DIR).join(&name);
        let networked = self.sandbox.as_ref().is_some_and(|s| s.networked)
            || self.last_record.as_ref().is_some_and(|r| r.networked);
        let podnet = if networked {
            self.ctx.podnet.get().ok()
        } else {
            None
        };
        let uid = self.uid.clone();
        let hostnet = host_network(&self.pod);
        let _ = tokio::task::spawn_blocking(move || teardown_network(podnet, &uid, &path, hostnet))
            .await;
        self.sandbox = None;
    }

    /// ConfigMaps and Secrets the pod refers to (missing ones are absent).
    async fn fetch_sources(&self, c: &Container) -> Result<(EnvContext, VolumeSources), String> {
        let mut ctx = EnvContext {
            pod_ip: self.sandbox.as_ref().map(|s| s.pod_ip.clone()),
            host_ip: Some(self.ctx.host_ip.clone()),
            node_name: self.ctx.node_name.clone(),
            ..Default::default()
        };
        let mut vs = VolumeSources::default();
        let cms: Api<ConfigMap> = Api::namespaced(self.ctx.client.clone(), &self.namespace);
        for name in env::referenced_config_maps(&self.pod, c) {
            if let Some(cm) = cms
                .get_opt(&name)
                .await
                .map_err(|e| format!("reading configmap {name}: {e}"))?
            {
                let data = cm.data.unwrap_or_default();
                let mut bytes: BTreeMap<String, Vec<u8>> = data
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
                    .collect();
                for (k, v) in cm.binary_data.unwrap_or_default() {
                    bytes.insert(k, v.0);
                }
                ctx.config_maps
                    .insert(name.clone(), data.into_iter().collect());
                vs.config_maps.insert(name, bytes);
            }
        }
        let secrets: Api<Secret> = Api::namespaced(self.ctx.client.clone(), &self.namespace);
        for name in env::referenced_secrets(&self.pod, c) {
            if let Some(s) = secrets
                .get_opt(&name)
                .await
                .map_err(|e| format!("reading secret {name}: {e}"))?
            {
                let mut bytes: BTreeMap<String, Vec<u8>> = s
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.0))
                    .collect();
                for (k, v) in s.string_data.unwrap_or_default() {
                    bytes.insert(k, v.into_bytes());
                }
                ctx.secrets.insert(
                    name.clone(),
                    bytes
                        .iter()
                        .map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned()))
                        .collect(),
                );
                vs.secrets.insert(name, bytes);
            }
        }
        Ok((ctx, vs))
    }

    /// Starts container `i` (its time has come).
    async fn start_container(&mut self, i: usize) {
        let spec = self.containers[i].spec.clone();
        let name = spec.name.clone();
        let (ectx, vsrc) = match self.fetch_sources(&spec).await {
            Ok(x) => x,
            Err(e) => return self.config_error(i, "ContainerCreating", &e, "Failed"),
        };
        let env_vars = match env::resolve_env(&self.pod, &spec, &ectx) {
            Ok(e) => e,
            Err(e) => {
                return self.config_error(
                    i,
                    "CreateContainerConfigError",
                    &format!("Error: {e}"),
                    "Failed",
                )
            }
        };
        let full_env = env::process_env(&self.name, &env_vars);
        let argv = match env::argv(&spec, &full_env) {
            Ok(a) => a,
            Err(e) => {
                return self.config_error(
                    i,
                    "CreateContainerConfigError",
                    &format!("Error: {e}"),
                    "Failed",
                )
            }
        };
        let vols = match volumes::materialize(&self.pod, &self.dir, &vsrc) {
            Ok(v) => v,
            Err(e) => {
                return self.config_error(
                    i,
                    "ContainerCreating",
                    &format!("MountVolume.SetUp failed: {e}"),
                    "FailedMount",
                )
            }
        };
        let mut mounts = match volumes::mounts_for(&self.pod, &spec, &vols, &full_env) {
            Ok(m) => m,
            Err(e) => {
                return self.config_error(
                    i,
                    "CreateContainerConfigError",
                    &format!("Error: {e}"),
                    "Failed",
                )
            }
        };
        let hostnet = host_network(&self.pod);
        if let Some(sandbox) = self.sandbox.as_ref().filter(|_| !hostnet) {
            let aliases = self
                .pod
                .spec
                .as_ref()
                .and_then(|s| s.host_aliases.as_deref());
            let content =
                hosts::hosts_file(&sandbox.pod_ip, &self.name, aliases.unwrap_or_default());
            match hosts::hosts_mount(&self.dir, &content, &mounts) {
                Ok(m) => mounts.extend(m),
                Err(e) => {
                    return self.config_error(
                        i,
                        "ContainerCreating",
                        &format!("writing the pod's /etc/hosts: {e}"),
                        "FailedMount",
                    )
                }
            }
        }
        let cwd = spec
            .working_dir
            .clone()
            .filter(|w| !w.is_empty())
            .map(PathBuf::from);
        if let Some(w) = &cwd {
            if !w.is_absolute() {
                return self.config_error(
                    i,
                    "CreateContainerConfigError",
                    &format!("Error: workingDir {w:?} must be absolute"),
                    "Failed",
                );
            }
        }
        // From here on a failure is a failed start (StartError), counted as a restart.
        let c = &mut self.containers[i];
        c.last_error = None;
        if c.rec.last_termination.is_some() {
            c.rec.restart_count += 1;
        }
        c.rec.instance = c.rec.restart_count;
        let log_path = logs::log_path(&self.dir, &name, c.rec.instance);
        logs::prune(&self.dir, &name, c.rec.instance - 1);
        let _ = std::fs::remove_file(&log_path);
        let _ = std::fs::remove_file(log_path.with_extension("log.1"));
        let path_var = full_env
            .iter()
            .rev()
            .find(|(k, _)| k == "PATH")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        let result = env::find_program(
            &argv[0],
            &path_var,
            cwd.as_deref().unwrap_or(Path::new("/")),
        )
        .map_err(anyhow::Error::msg)
        .and_then(|program| {
            runtime::spawn(&SpawnSpec {
                program,
                argv: argv.clone(),
                env: full_env.clone(),
                cwd: cwd.clone(),
                netns: self.sandbox.as_ref().and_then(|s| s.netns.clone()),
                mounts,
                hostname: (!hostnet).then(|| self.name.clone()),
                log_path: log_path.clone(),
            })
        });
        let c = &mut self.containers[i];
        c.env = full_env;
        c.generation += 1;
        let now = Utc::now();
        match result {
            Ok(started) => {
                let pid = started.pid;
                c.rec.pid = Some(pid);
                c.rec.start_ticks = Some(started.start_ticks);
                c.rec.started_at = Some(now);
                c.started = Some(Instant::now());
                c.next_start = None;
                c.state = State::Running {
                    started_at: now,
                    pid,
                };
                let tx = self.tx.clone();
                let generation = c.generation;
                let cname = name.clone();
                let mut child = started.child;
                tokio::spawn(async move {
                    let (exit_code, signal) = match child.wait().await {
                        Ok(st) => runtime::exit_code(&st),
                        Err(_) => (255, None),
                    };
                    let _ = tx.send(Msg::Exited {
                        name: cname,
                        generation,
                        exit_code,
                        signal,
                        unknown: false,
                    });
                });
                self.emit(
                    "Normal",
                    "Started",
                    &format!("Started container {name} (pid {pid})"),
                    Some(&name),
                );
                self.setup_probes(i);
            }
            Err(e) => {
                let msg = format!("failed to start container {name:?}: {e:#}");
                let _ = std::fs::write(&log_path, format!("{msg}\n"));
                // Reported as a process that ran and failed at once: exit 128, StartError.
                c.state = State::Running {
                    started_at: now,
                    pid: 0,
                };
                c.started = Some(Instant::now());
                self.emit("Warning", "Failed", &format!("Error: {msg}"), Some(&name));
                let generation = self.containers[i].generation;
                self.on_exit(&name, generation, 128, None, false);
                let c = &mut self.containers[i];
                if let Some(t) = c.rec.last_termination.as_mut() {
                    t.reason = "StartError".into();
                    t.message = Some(msg.clone());
                    t.container_id = None;
                }
                if let State::Terminated(t) = &mut c.state {
                    t.reason = "StartError".into();
                    t.message = Some(msg);
                    t.container_id = None;
                }
            }
        }
    }

    /// Rewrites ConfigMap and Secret volumes with the objects' current data
    /// (directory mounts see the change; subPath mounts keep their file, as in Kubernetes).
    async fn refresh_volumes(&mut self) {
        let has = self
            .pod
            .spec
            .iter()
            .flat_map(|s| s.volumes.iter().flatten())
            .any(|v| v.config_map.is_some() || v.secret.is_some() || v.projected.is_some());
        let Some(first) = self.containers.first().map(|c| c.spec.clone()) else {
            return;
        };
        if !has || self.containers.iter().all(|c| c.running_pid().is_none()) {
            return;
        }
        match self.fetch_sources(&first).await {
            Ok((_, vsrc)) => {
                if let Err(e) = volumes::materialize(&self.pod, &self.dir, &vsrc) {
                    tracing::debug!(pod = %self.name, "refreshing volumes: {e}");
                }
            }
            Err(e) => tracing::debug!(pod = %self.name, "refreshing volumes: {e}"),
        }
    }

    fn config_error(&mut self, i: usize, reason: &str, message: &str, event_reason: &str) {
        let c = &mut self.containers[i];
        c.state = State::waiting(reason, Some(message.to_string()));
        c.next_start = Some(Instant::now() + Duration::from_secs(5));
        if c.last_error.as_deref() != Some(message) {
            c.last_error = Some(message.to_string());
            let name = c.spec.name.clone();
            self.emit("Warning", event_reason, message, Some(&name));
        }
    }

    fn view(&self) -> PodView {
        let containers = self
            .containers
            .iter()
            .map(|c| {
                let running = c.running_pid().is_some() && !c.killing;
                let started = running && c.probes.startup.as_ref().is_none_or(|(_, t)| t.passing);
                let ready = started && c.probes.readiness.as_ref().is_none_or(|(_, t)| t.passing);
                ContainerView {
                    name: c.spec.name.clone(),
                    image: c.spec.image.clone().unwrap_or_default(),
                    state: c.state.clone(),
                    last_termination: match &c.state {
                        State::Terminated(_) => None,
                        _ => c.rec.last_termination.as_ref().map(Termination::from),
                    },
                    restart_count: c.rec.restart_count,
                    ready,
                    started,
                    ever_ran: c.rec.last_termination.is_some() || c.running_pid().is_some(),
                    finished: c.rec.finished,
                }
            })
            .collect();
        PodView {
            host_ip: self.ctx.host_ip.clone(),
            pod_ip: self.sandbox.as_ref().map(|s| s.pod_ip.clone()),
            start_time: Some(self.start_time),
            restart_policy: RestartPolicy::of(&self.pod),
            sandbox_ready: self.sandbox.is_some(),
            containers,
            reason: None,
            message: self.sandbox_error.clone(),
        }
    }

    fn record(&self) -> PodRecord {
        PodRecord {
            uid: self.uid.clone(),
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            netns: self
                .sandbox
                .as_ref()
                .and_then(|s| s.netns.as_ref())
                .map(|_| runtime::netns_name(&self.uid)),
            pod_ip: self.sandbox.as_ref().map(|s| s.pod_ip.clone()),
            networked: self.sandbox.as_ref().is_some_and(|s| s.networked),
            start_time: Some(self.start_time),
            containers: self
                .containers
                .iter()
                .map(|c| (c.spec.name.clone(), c.rec.clone()))
                .collect(),
        }
    }

    fn publish_logs(&self) {
        self.ctx.logs.set(
            &self.namespace,
            &self.name,
            PodLogs {
                dir: self.dir.clone(),
                containers: self
                    .containers
                    .iter()
                    .map(|c| {
                        (
                            c.spec.name.clone(),
                            (c.rec.instance, c.running_pid().is_some_and(|p| p > 0)),
                        )
                    })
                    .collect(),
            },
        );
    }

    async fn write_status(&mut self) {
        let view = self.view();
        let mut status = status::pod_status(&self.pod, &view, Utc::now());
        if self.deleting() {
            // Keep the phase the API has while terminating (the kubelet does too).
            if let Some(p) = self.pod.status.as_ref().and_then(|s| s.phase.clone()) {
                if status["phase"] == "Pending" || status["phase"] == "Running" {
                    status["phase"] = json!(p);
                }
            }
        }
        if self.last_status.as_ref() == Some(&status) {
            return;
        }
        let api: Api<Pod> = Api::namespaced(self.ctx.client.clone(), &self.namespace);
        let mut patch = json!({"status": status});
        // A merge patch removes only what it sets to null.
        for k in ["message", "reason"] {
            if patch["status"].get(k).is_none() {
                patch["status"][k] = Value::Null;
            }
        }
        match api
            .patch_status(&self.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(p) => {
                if p.metadata.uid.as_deref() == Some(self.uid.as_str()) {
                    self.pod.status = p.status;
                }
                self.last_status = Some(status);
            }
            Err(e) => tracing::warn!(pod = %self.name, "writing pod status: {e}"),
        }
    }

    fn save_record(&mut self) {
        let r = self.record();
        if self.last_record.as_ref() != Some(&r) {
            if let Err(e) = r.save(&self.ctx.data_dir) {
                tracing::warn!(pod = %self.name, "saving pod record: {e}");
            }
            self.last_record = Some(r);
        }
    }

    async fn sync(&mut self) {
        let view = self.view();
        let terminal = matches!(status::phase(&view), "Succeeded" | "Failed")
            || matches!(
                self.pod.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            ) && self.containers.iter().all(|c| c.running_pid().is_none());
        if terminal {
            // Nothing more will run: release the address and namespace.
            if !self.torn_down {
                self.save_record();
                self.write_status().await;
                self.teardown().await;
            }
            self.publish_logs();
            self.write_status().await;
            return;
        }
        if self.sandbox.is_none() && self.sandbox_retry.is_none_or(|t| Instant::now() >= t) {
            match self.setup_sandbox().await {
                Ok(()) => {
                    self.sandbox_error = None;
                    self.torn_down = false;
                }
                Err(e) => {
                    if self.sandbox_error.as_deref() != Some(e.as_str()) {
                        self.emit(
                            "Warning",
                            "FailedCreatePodSandBox",
                            &format!("Failed to create pod sandbox: {e}"),
                            None,
                        );
                    }
                    self.sandbox_error = Some(e);
                    self.sandbox_retry = Some(Instant::now() + Duration::from_secs(2));
                }
            }
        }
        if self.sandbox.is_some() {
            for i in 0..self.containers.len() {
                let c = &self.containers[i];
                let due = c.running_pid().is_none()
                    && !c.rec.finished
                    && c.next_start.is_none_or(|t| Instant::now() >= t);
                if due {
                    self.start_container(i).await;
                }
            }
        }
        if self.last_volume_refresh.elapsed() >= VOLUME_REFRESH {
            self.last_volume_refresh = Instant::now();
            self.refresh_volumes().await;
        }
        if self.last_rotate.elapsed() >= Duration::from_secs(5) {
            self.last_rotate = Instant::now();
            for c in &self.containers {
                let p = logs::log_path(&self.dir, &c.spec.name, c.rec.instance);
                let _ = logs::rotate_if_needed(&p, self.ctx.log_max_bytes);
            }
        }
        self.save_record();
        self.publish_logs();
        self.write_status().await;
    }

    /// Stops every running container at once (preStop hooks, SIGTERM,
    /// SIGKILL once `grace` is over), waiting (bounded) for their exits.
    async fn stop_all(&mut self, grace: Duration, rx: &mut mpsc::UnboundedReceiver<Msg>) {
        let running: Vec<usize> = (0..self.containers.len())
            .filter(|&i| {
                let c = &self.containers[i];
                c.running_pid().is_some_and(|p| p > 0) && c.rec.start_ticks.is_some()
            })
            .collect();
        if running.is_empty() {
            return;
        }
        for c in &mut self.containers {
            c.probes.stop();
            c.next_start = None;
        }
        for i in running {
            let name = self.containers[i].spec.name.clone();
            self.emit(
                "Normal",
                "Killing",
                &format!("Stopping container {name}"),
                Some(&name),
            );
            // One already being restarted (a failed liveness probe) is on its way out.
            if !self.containers[i].killing {
                self.kill_container(i, grace);
            }
        }
        // The stop tasks SIGKILL at the latest MIN_GRACE_AFTER_PRE_STOP after
        // the grace period; a few seconds more for the exits to be reaped.
        let hard_deadline =
            Instant::now() + grace + lifecycle::MIN_GRACE_AFTER_PRE_STOP + Duration::from_secs(3);
        loop {
            let pending = self
                .containers
                .iter()
                .any(|c| c.running_pid().is_some_and(|p| p > 0));
            if !pending || Instant::now() >= hard_deadline {
                break;
            }
            tokio::select! {
                m = rx.recv() => if let Some(m @ Msg::Exited { .. }) = m { self.handle(m) },
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
        for c in &mut self.containers {
            c.rec.finished = true;
        }
    }

    async fn terminate_and_delete(&mut self, rx: &mut mpsc::UnboundedReceiver<Msg>) {
        let grace = Duration::from_secs(grace_seconds(&self.pod));
        tracing::info!(pod = %format!("{}/{}", self.namespace, self.name), grace = grace.as_secs(), "stopping pod");
        self.stop_all(grace, rx).await;
        self.publish_logs();
        self.write_status().await;
        self.teardown().await;
        let api: Api<Pod> = Api::namespaced(self.ctx.client.clone(), &self.namespace);
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(self.uid.clone()),
                resource_version: None,
            }),
            ..Default::default()
        };
        match api.delete(&self.name, &dp).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
            Err(e) => tracing::warn!(pod = %self.name, "deleting pod: {e}"),
        }
        self.remove_files();
    }

    fn remove_files(&self) {
        self.ctx.logs.remove(&self.namespace, &self.name, &self.dir);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Releases a pod's address and removes its network namespace.
pub fn teardown_network(
    podnet: Option<Arc<PodNetwork>>,
    uid: &str,
    netns: &Path,
    host_network: bool,
) {
    if host_network {
        return;
    }
    if let Some(net) = podnet {
        let ns = netns.exists().then_some(netns);
        if let Err(e) = net.del(ns, uid, POD_IFNAME) {
            tracing::warn!(uid, "releasing the pod's network: {e:#}");
        }
    }
    runtime::remove_netns(netns);
}

/// Cleans up after a pod recorded on disk that no longer exists in the API:
/// kills its processes, releases its network, removes its files.
pub async fn cleanup_orphan(ctx: Arc<Ctx>, r: PodRecord) {
    tracing::info!(pod = %format!("{}/{}", r.namespace, r.name), uid = %r.uid, "cleaning up a pod that no longer exists");
    for c in r.containers.values() {
        if let (Some(pid), Some(t)) = (c.pid, c.start_ticks) {
            if runtime::is_alive(pid, t) {
                runtime::signal_group(pid, libc::SIGKILL);
            }
        }
    }
    let podnet = if r.networked {
        ctx.podnet.get().ok()
    } else {
        None
    };
    let netns = Path::new(runtime::NETNS_DIR).join(runtime::netns_name(&r.uid));
    let uid = r.uid.clone();
    let hostnet = r.netns.is_none() && !r.networked;
    let _ =
        tokio::task::spawn_blocking(move || teardown_network(podnet, &uid, &netns, hostnet)).await;
    let _ = std::fs::remove_dir_all(state::pod_dir(&ctx.data_dir, &r.uid));
}

/// Where a running container's probes and hooks are aimed: its address,
/// environment, working directory, network namespace and main process (whose
/// mount namespace exec handlers join).
#[derive(Clone, Debug)]
struct ContainerTarget {
    ip: String,
    env: Vec<(String, String)>,
    cwd: Option<PathBuf>,
    netns: Option<PathBuf>,
    pid: u32,
}

impl ContainerTarget {
    /// Runs one probe or hook handler, bounded by `timeout`.
    async fn run(&self, action: &ProbeAction, timeout: Duration) -> ProbeOutcome {
        match action {
            ProbeAction::Http {
                host,
                port,
                path,
                headers,
                ..
            } => {
                probe::http_get(
                    host.as_deref().unwrap_or(&self.ip),
                    *port,
                    path,
                    headers,
                    timeout,
                )
                .await
            }
            ProbeAction::Tcp { host, port } => {
                probe::tcp_connect(host.as_deref().unwrap_or(&self.ip), *port, timeout).await
            }
            ProbeAction::Exec { command } => {
                match runtime::exec_in(
                    command,
                    &self.env,
                    self.cwd.as_deref(),
                    self.netns.as_deref(),
                    (self.pid > 0).then_some(self.pid),
                    timeout,
                )
                .await
                {
                    Ok((true, _)) => ProbeOutcome::ok(),
                    Ok((false, out)) => ProbeOutcome::fail(out.trim().to_string()),
                    Err(e) => ProbeOutcome::fail(format!("{e:#}")),
                }
            }
        }
    }

    /// Stops the container as the kubelet does: its preStop hook first
    /// (bounded by `grace`), then SIGTERM to its process group, then SIGKILL
    /// once the rest of the grace period has passed. The exit itself arrives
    /// as `Msg::Exited`; a failed hook is reported to `hook_failed`.
    async fn stop(
        self,
        start_ticks: u64,
        pre_stop: Option<PreStop>,
        grace: Duration,
        hook_failed: impl FnOnce(String),
    ) {
        let hook_started = Instant::now();
        let term_grace = match pre_stop {
            None => grace,
            Some(hook) => {
                let failure = match hook {
                    PreStop::Sleep(d) => {
                        tokio::time::sleep(d.min(grace)).await;
                        None
                    }
                    PreStop::Run(action) => {
                        let outcome = self.run(&action, grace).await;
                        (!outcome.ok).then_some(outcome.message)
                    }
                };
                if let Some(message) = failure {
                    hook_failed(message);
                }
                lifecycle::grace_after_pre_stop(grace, hook_started.elapsed())
            }
        };
        if !runtime::is_alive(self.pid, start_ticks) {
            return;
        }
        runtime::signal_group(self.pid, libc::SIGTERM);
        let deadline = Instant::now() + term_grace;
        while Instant::now() < deadline && runtime::is_alive(self.pid, start_ticks) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if runtime::is_alive(self.pid, start_ticks) {
            runtime::signal_group(self.pid, libc::SIGKILL);
        }
    }
}
