//! Pod status from what the runner knows: phase, conditions (with stable
//! lastTransitionTime), containerStatuses, and the restart decision.

use chrono::{DateTime, SecondsFormat, Utc};
use k8s_openapi::api::core::v1::Pod;
use serde_json::{json, Map, Value};

/// Kubernetes' Time format: RFC 3339, seconds, `Z`.
pub fn time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// MicroTime: RFC 3339 with microseconds.
pub fn micro_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestartPolicy {
    Always,
    OnFailure,
    Never,
}

impl RestartPolicy {
    pub fn of(pod: &Pod) -> RestartPolicy {
        match pod.spec.as_ref().and_then(|s| s.restart_policy.as_deref()) {
            Some("OnFailure") => RestartPolicy::OnFailure,
            Some("Never") => RestartPolicy::Never,
            _ => RestartPolicy::Always,
        }
    }

    /// Whether a container that exited with `exit_code` is started again.
    pub fn restarts(self, exit_code: i32) -> bool {
        match self {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => exit_code != 0,
            RestartPolicy::Never => false,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Termination {
    pub exit_code: i32,
    pub signal: Option<i32>,
    pub reason: String,
    pub message: Option<String>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: DateTime<Utc>,
    pub container_id: Option<String>,
}

impl Termination {
    /// The kubelet's reason for an exit code: Completed for 0, else Error.
    pub fn reason_for(exit_code: i32) -> &'static str {
        if exit_code == 0 {
            "Completed"
        } else {
            "Error"
        }
    }

    fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("exitCode".into(), json!(self.exit_code));
        if let Some(s) = self.signal {
            m.insert("signal".into(), json!(s));
        }
        m.insert("reason".into(), json!(self.reason));
        if let Some(msg) = &self.message {
            m.insert("message".into(), json!(msg));
        }
        if let Some(t) = self.started_at {
            m.insert("startedAt".into(), json!(time(t)));
        }
        m.insert("finishedAt".into(), json!(time(self.finished_at)));
        if let Some(id) = &self.container_id {
            m.insert("containerID".into(), json!(id));
        }
        json!({ "terminated": m })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    Waiting {
        reason: String,
        message: Option<String>,
    },
    Running {
        started_at: DateTime<Utc>,
        pid: u32,
    },
    Terminated(Termination),
}

impl State {
    pub fn waiting(reason: &str, message: Option<String>) -> State {
        State::Waiting {
            reason: reason.into(),
            message,
        }
    }

    fn to_json(&self) -> Value {
        match self {
            State::Waiting { reason, message } => {
                let mut m = Map::new();
                m.insert("reason".into(), json!(reason));
                if let Some(msg) = message {
                    m.insert("message".into(), json!(msg));
                }
                json!({ "waiting": m })
            }
            State::Running { started_at, .. } => {
                json!({"running": {"startedAt": time(*started_at)}})
            }
            State::Terminated(t) => t.to_json(),
        }
    }
}

/// One container as the runner sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerView {
    pub name: String,
    pub image: String,
    pub state: State,
    pub last_termination: Option<Termination>,
    pub restart_count: i32,
    /// Running and its readiness probe (if any) passes.
    pub ready: bool,
    /// Running and its startup probe (if any) passed.
    pub started: bool,
    /// The container has run at least once (or is running).
    pub ever_ran: bool,
    /// It will not be started again (exited under its restart policy, or the pod is stopping).
    pub finished: bool,
}

impl ContainerView {
    pub fn container_id(&self) -> Option<String> {
        match &self.state {
            State::Running { pid, .. } => Some(format!("ferry://{pid}")),
            State::Terminated(t) => t.container_id.clone(),
            State::Waiting { .. } => self
                .last_termination
                .as_ref()
                .and_then(|t| t.container_id.clone()),
        }
    }

    fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("name".into(), json!(self.name));
        m.insert("state".into(), self.state.to_json());
        m.insert(
            "lastState".into(),
            self.last_termination
                .as_ref()
                .map_or(json!({}), Termination::to_json),
        );
        m.insert("ready".into(), json!(self.ready));
        m.insert("restartCount".into(), json!(self.restart_count));
        m.insert("image".into(), json!(self.image));
        m.insert("imageID".into(), json!(""));
        if let Some(id) = self.container_id() {
            m.insert("containerID".into(), json!(id));
        }
        m.insert("started".into(), json!(self.started));
        Value::Object(m)
    }
}

/// The pod as the runner sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodView {
    pub host_ip: String,
    pub pod_ip: Option<String>,
    pub start_time: Option<DateTime<Utc>>,
    pub restart_policy: RestartPolicy,
    /// The network namespace and the pod's address are set up.
    pub sandbox_ready: bool,
    pub containers: Vec<ContainerView>,
    /// Pod-level reason and message (e.g. the network is not ready).
    pub reason: Option<String>,
    pub message: Option<String>,
}

/// The phase, as the kubelet computes it.
pub fn phase(view: &PodView) -> &'static str {
    let (mut running, mut waiting, mut stopped, mut failed, mut succeeded) = (0, 0, 0, 0, 0);
    for c in &view.containers {
        match &c.state {
            State::Running { .. } => running += 1,
            State::Terminated(t) => {
                stopped += 1;
                if t.exit_code == 0 {
                    succeeded += 1
                } else {
                    failed += 1
                }
            }
            State::Waiting { .. } => match &c.last_termination {
                Some(t) => {
                    stopped += 1;
                    if t.exit_code == 0 {
                        succeeded += 1
                    } else {
                        failed += 1
                    }
                }
                None => waiting += 1,
            },
        }
    }
    let all_finished = view.containers.iter().all(|c| c.finished);
    if waiting > 0 || view.containers.is_empty() {
        return "Pending";
    }
    if running > 0 {
        return "Running";
    }
    if stopped > 0 && all_finished {
        if failed > 0 {
            return "Failed";
        }
        if succeeded == stopped {
            return "Succeeded";
        }
    }
    match view.restart_policy {
        RestartPolicy::Always => "Running",
        RestartPolicy::OnFailure if failed > 0 => "Running",
        RestartPolicy::OnFailure | RestartPolicy::Never => {
            if failed > 0 {
                "Failed"
            } else {
                "Succeeded"
            }
        }
    }
}

/// Guaranteed / Burstable / BestEffort from the containers' requests and limits.
pub fn qos_class(pod: &Pod) -> &'static str {
    let Some(spec) = &pod.spec else {
        return "BestEffort";
    };
    let mut any = false;
    let mut guaranteed = true;
    for c in &spec.containers {
        let r = c.resources.as_ref();
        let req = r.and_then(|r| r.requests.clone()).unwrap_or_default();
        let lim = r.and_then(|r| r.limits.clone()).unwrap_or_default();
        if !req.is_empty() || !lim.is_empty() {
            any = true;
        }
        for res in ["cpu", "memory"] {
            match (req.get(res), lim.get(res)) {
                (_, None) => guaranteed = false,
                (Some(a), Some(b)) if a != b => guaranteed = false,
                _ => {}
            }
        }
    }
    if !any {
        "BestEffort"
    } else if guaranteed {
        "Guaranteed"
    } else {
        "Burstable"
    }
}

fn condition(
    prev: &[Value],
    kind: &str,
    ok: bool,
    reason: Option<&str>,
    now: DateTime<Utc>,
) -> Value {
    let status = if ok { "True" } else { "False" };
    let old = prev.iter().find(|c| c["type"] == kind);
    let transition = old
        .filter(|c| c["status"] == status)
        .and_then(|c| c.get("lastTransitionTime").cloned())
        .filter(|t| !t.is_null())
        .unwrap_or_else(|| json!(time(now)));
    let mut m = Map::new();
    m.insert("type".into(), json!(kind));
    m.insert("status".into(), json!(status));
    m.insert("lastProbeTime".into(), Value::Null);
    m.insert("lastTransitionTime".into(), transition);
    if let Some(r) = reason {
        m.insert("reason".into(), json!(r));
    }
    Value::Object(m)
}

/// The status object to write, given the previous one (for transition times
/// and the scheduler's PodScheduled condition).
pub fn pod_status(pod: &Pod, view: &PodView, now: DateTime<Utc>) -> Value {
    let prev_status = pod
        .status
        .as_ref()
        .and_then(|s| serde_json::to_value(s).ok())
        .unwrap_or(Value::Null);
    let prev: Vec<Value> = prev_status
        .get("conditions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut phase = phase(view);
    // A terminal phase is final.
    if let Some(p @ ("Succeeded" | "Failed")) = prev_status.get("phase").and_then(Value::as_str) {
        phase = if p == "Succeeded" {
            "Succeeded"
        } else {
            "Failed"
        };
    }
    let all_ready = !view.containers.is_empty() && view.containers.iter().all(|c| c.ready);
    let not_ready_reason = if phase == "Succeeded" || phase == "Failed" {
        Some("PodCompleted")
    } else if all_ready {
        None
    } else {
        Some("ContainersNotReady")
    };
    let scheduled = prev
        .iter()
        .find(|c| c["type"] == "PodScheduled")
        .cloned()
        .unwrap_or_else(|| condition(&prev, "PodScheduled", true, None, now));
    let conditions = vec![
        condition(
            &prev,
            "PodReadyToStartContainers",
            view.sandbox_ready,
            None,
            now,
        ),
        condition(&prev, "Initialized", true, None, now),
        condition(&prev, "Ready", all_ready, not_ready_reason, now),
        condition(&prev, "ContainersReady", all_ready, not_ready_reason, now),
        scheduled,
    ];
    let mut m = Map::new();
    m.insert("phase".into(), json!(phase));
    m.insert("conditions".into(), Value::Array(conditions));
    if let Some(r) = &view.reason {
        m.insert("reason".into(), json!(r));
    }
    if let Some(msg) = &view.message {
        m.insert("message".into(), json!(msg));
    }
    m.insert("hostIP".into(), json!(view.host_ip));
    m.insert("hostIPs".into(), json!([{"ip": view.host_ip}]));
    if let Some(ip) = &view.pod_ip {
        m.insert("podIP".into(), json!(ip));
        m.insert("podIPs".into(), json!([{"ip": ip}]));
    }
    if let Some(t) = view.start_time {
        m.insert("startTime".into(), json!(time(t)));
    }
    m.insert(
        "containerStatuses".into(),
        Value::Array(view.containers.iter().map(ContainerView::to_json).collect()),
    );
    m.insert("qosClass".into(), json!(qos_class(pod)));
    Value::Object(m)
}

/// Whether two status objects differ in anything but heartbeat-like noise.
pub fn status_changed(old: &Value, new: &Value) -> bool {
    old != new
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + s, 0).unwrap()
    }

    fn term(code: i32) -> Termination {
        Termination {
            exit_code: code,
            signal: None,
            reason: Termination::reason_for(code).into(),
            message: None,
            started_at: Some(t(0)),
            finished_at: t(5),
            container_id: Some("ferry://42".into()),
        }
    }

    fn cv(state: State, last: Option<Termination>, finished: bool) -> ContainerView {
        let running = matches!(state, State::Running { .. });
        ContainerView {
            name: "c".into(),
            image: "busybox".into(),
            ever_ran: running || last.is_some() || matches!(state, State::Terminated(_)),
            state,
            last_termination: last,
            restart_count: 0,
            ready: running,
            started: running,
            finished,
        }
    }

    fn view(policy: RestartPolicy, containers: Vec<ContainerView>) -> PodView {
        PodView {
            host_ip: "192.168.0.2".into(),
            pod_ip: Some("10.244.1.9".into()),
            start_time: Some(t(0)),
            restart_policy: policy,
            sandbox_ready: true,
            containers,
            reason: None,
            message: None,
        }
    }

    fn running() -> State {
        State::Running {
            started_at: t(1),
            pid: 42,
        }
    }

    #[test]
    fn restart_policies() {
        assert!(RestartPolicy::Always.restarts(0));
        assert!(RestartPolicy::OnFailure.restarts(1));
        assert!(!RestartPolicy::OnFailure.restarts(0));
        assert!(!RestartPolicy::Never.restarts(1));
    }

    #[test]
    fn phases() {
        use RestartPolicy::*;
        let creating = State::waiting("ContainerCreating", None);
        assert_eq!(
            phase(&view(Always, vec![cv(creating.clone(), None, false)])),
            "Pending"
        );
        assert_eq!(
            phase(&view(
                Always,
                vec![cv(running(), None, false), cv(creating, None, false)]
            )),
            "Pending"
        );
        assert_eq!(
            phase(&view(Always, vec![cv(running(), None, false)])),
            "Running"
        );
        let backoff = State::waiting("CrashLoopBackOff", None);
        assert_eq!(
            phase(&view(
                Always,
                vec![cv(backoff.clone(), Some(term(1)), false)]
            )),
            "Running"
        );
        assert_eq!(
            phase(&view(OnFailure, vec![cv(backoff, Some(term(1)), false)])),
            "Running"
        );
        assert_eq!(
            phase(&view(
                Never,
                vec![cv(State::Terminated(term(0)), None, true)]
            )),
            "Succeeded"
        );
        assert_eq!(
            phase(&view(
                OnFailure,
                vec![cv(State::Terminated(term(0)), None, true)]
            )),
            "Succeeded"
        );
        assert_eq!(
            phase(&view(
                Never,
                vec![cv(State::Terminated(term(2)), None, true)]
            )),
            "Failed"
        );
        assert_eq!(
            phase(&view(
                Never,
                vec![
                    cv(State::Terminated(term(0)), None, true),
                    cv(running(), None, false)
                ]
            )),
            "Running"
        );
        assert_eq!(phase(&view(Always, vec![])), "Pending");
    }

    #[test]
    fn status_json_and_transition_times() {
        let mut pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "c", "image": "busybox"}]},
            "status": {"phase": "Pending", "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": "2023-01-01T00:00:00Z"},
                {"type": "Ready", "status": "False", "lastTransitionTime": "2023-01-01T00:00:01Z"}]}
        }))
        .unwrap();
        let mut c = cv(running(), Some(term(137)), false);
        c.restart_count = 3;
        let v = view(RestartPolicy::Always, vec![c]);
        let s = pod_status(&pod, &v, t(100));
        assert_eq!(s["phase"], "Running");
        assert_eq!(s["podIP"], "10.244.1.9");
        assert_eq!(s["podIPs"], json!([{"ip": "10.244.1.9"}]));
        assert_eq!(s["hostIP"], "192.168.0.2");
        assert_eq!(s["startTime"], time(t(0)));
        assert_eq!(s["qosClass"], "BestEffort");
        let cs = &s["containerStatuses"][0];
        assert_eq!(cs["restartCount"], 3);
        assert_eq!(cs["containerID"], "ferry://42");
        assert_eq!(cs["imageID"], "");
        assert_eq!(cs["state"]["running"]["startedAt"], time(t(1)));
        assert_eq!(cs["lastState"]["terminated"]["exitCode"], 137);
        assert_eq!(cs["lastState"]["terminated"]["reason"], "Error");
        let cond = |s: &Value, k: &str| {
            s["conditions"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["type"] == k)
                .unwrap()
                .clone()
        };
        assert_eq!(cond(&s, "Ready")["status"], "True");
        assert_eq!(cond(&s, "Ready")["lastTransitionTime"], time(t(100)));
        assert_eq!(
            cond(&s, "PodScheduled")["lastTransitionTime"],
            "2023-01-01T00:00:00Z"
        );
        // Unchanged status keeps its transition time.
        pod.status = Some(serde_json::from_value(s.clone()).unwrap());
        let s2 = pod_status(&pod, &v, t(200));
        assert_eq!(cond(&s2, "Ready")["lastTransitionTime"], time(t(100)));
        assert!(!status_changed(&s, &s2));
        // Not ready: reason ContainersNotReady, new transition time.
        let mut v3 = v.clone();
        v3.containers[0].ready = false;
        let s3 = pod_status(&pod, &v3, t(300));
        assert_eq!(cond(&s3, "Ready")["status"], "False");
        assert_eq!(cond(&s3, "Ready")["reason"], "ContainersNotReady");
        assert_eq!(
            cond(&s3, "ContainersReady")["lastTransitionTime"],
            time(t(300))
        );
    }

    #[test]
    fn terminal_phase_sticks_and_waiting_json() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p"}, "spec": {"containers": [{"name": "c"}]},
            "status": {"phase": "Succeeded"}
        }))
        .unwrap();
        let c = cv(
            State::waiting("CrashLoopBackOff", Some("back-off 10s".into())),
            None,
            false,
        );
        let s = pod_status(&pod, &view(RestartPolicy::Always, vec![c]), t(1));
        assert_eq!(s["phase"], "Succeeded");
        let w = &s["containerStatuses"][0]["state"]["waiting"];
        assert_eq!(w["reason"], "CrashLoopBackOff");
        assert_eq!(w["message"], "back-off 10s");
        assert_eq!(s["containerStatuses"][0]["lastState"], json!({}));
    }

    #[test]
    fn qos() {
        let p = |c: Value| -> Pod {
            serde_json::from_value(json!({"metadata": {}, "spec": {"containers": [c]}})).unwrap()
        };
        assert_eq!(qos_class(&p(json!({"name": "c"}))), "BestEffort");
        assert_eq!(
            qos_class(&p(
                json!({"name": "c", "resources": {"requests": {"cpu": "1"}}})
            )),
            "Burstable"
        );
        assert_eq!(
            qos_class(&p(
                json!({"name": "c", "resources": {"limits": {"cpu": "1", "memory": "1Gi"}, "requests": {"cpu": "1", "memory": "1Gi"}}})
            )),
            "Guaranteed"
        );
    }
}
