//! Traffic through changes, on a whole cluster (`ferry cluster up`) driven
//! with kubectl: a pod whose readiness probe starts failing stops getting
//! requests, and a rolling update under a steady request stream loses none.
//! The app is examples/rollout/whoami.yaml: every answer names its pod.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use support::cluster::Cluster;

/// The whoami Service's NodePort on node 1, as the client outside the cluster reaches it.
const SERVICE: &str = "198.18.0.11:30081";
const POD_PORT: u16 = 8080;

fn deploy_whoami(c: &Cluster) {
    c.deploy(
        ("whoami-code", "examples/rollout/whoami.py"),
        "examples/rollout/whoami.yaml",
        &["deploy/whoami"],
    );
}

/// One request of a load run: when it was sent (from the run's start) and
/// the answer's body ("<pod> <pod IP> <version>") or what went wrong.
#[derive(Debug)]
struct Request {
    sent: Duration,
    answer: Result<String, String>,
}

impl Request {
    fn pod(&self) -> Option<&str> {
        self.answer.as_ref().ok()?.split_whitespace().next()
    }
    fn version(&self) -> Option<&str> {
        self.answer.as_ref().ok()?.split_whitespace().nth(2)
    }
}

/// GET / on the service from the client namespace, one request (a new
/// connection) every `interval`: at most `count` of them, ending sooner once
/// `done` says so. Returns the requests in order.
fn steady_load(
    c: &Cluster,
    interval: Duration,
    count: u32,
    done: impl Fn(&[Request]) -> bool + Send + 'static,
) -> JoinHandle<Vec<Request>> {
    let client = c.netns("client");
    std::thread::spawn(move || {
        ferry_testkit::run_in_netns(&client, move || {
            let start = Instant::now();
            let mut requests = Vec::new();
            for n in 0..count {
                if done(&requests) {
                    break;
                }
                let due = start + interval * n;
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
                let sent = start.elapsed();
                let answer = match ferry_testkit::http_get(SERVICE, "/", Duration::from_secs(2)) {
                    Ok((200, body)) => Ok(body.trim().to_string()),
                    Ok((code, body)) => Err(format!("HTTP {code}: {}", body.trim())),
                    Err(e) => Err(e.to_string()),
                };
                requests.push(Request { sent, answer });
            }
            Ok(requests)
        })
        .expect("the load ran in the client namespace")
    })
}

/// Waits until every pod of `pods` has answered through the service.
fn wait_for_answers_from(c: &Cluster, pods: &[String]) {
    let answered_by_all = |pods: &[String], requests: &[Request]| {
        pods.iter()
            .all(|pod| requests.iter().any(|r| r.pod() == Some(pod.as_str())))
    };
    let wanted = pods.to_vec();
    let requests = steady_load(c, Duration::from_millis(50), 600, move |requests| {
        answered_by_all(&wanted, requests)
    })
    .join()
    .unwrap();
    assert!(
        answered_by_all(pods, &requests),
        "not every pod of {pods:?} answered: {:?}",
        requests.iter().rev().take(20).collect::<Vec<_>>()
    );
}

fn failures(requests: &[Request]) -> Vec<&Request> {
    requests.iter().filter(|r| r.answer.is_err()).collect()
}

#[test]
fn a_pod_failing_its_readiness_probe_stops_getting_requests_within_2s() {
    let Some(c) = Cluster::up(3) else { return };
    deploy_whoami(&c);
    let pods = c.pods("app=whoami");
    assert_eq!(pods.len(), 3, "{pods:?}");
    let names: Vec<String> = pods.iter().map(|p| p.0.clone()).collect();
    wait_for_answers_from(&c, &names);

    // Load from 1 s before the flip to 6 s after it, 20 requests a second.
    let load = steady_load(&c, Duration::from_millis(50), 140, |_| false);
    let load_started = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let (victim, victim_node, victim_ip) = pods[0].clone();
    let pod_addr = format!("{victim_ip}:{POD_PORT}");
    // From the victim's node, straight to the pod (not through the service).
    let flipped = ferry_testkit::run_in_netns(&victim_node, move || {
        let before = Instant::now();
        let (code, _) = ferry_testkit::http_get(&pod_addr, "/unready", Duration::from_secs(2))?;
        assert_eq!(code, 200);
        Ok(before)
    })
    .unwrap();
    let flip_at = flipped - load_started;
    // When the API shows the change (polled with kubectl, for the report).
    let seen_after = |what: &str, kubectl_get: &[&str], want: &str| {
        c.wait_for(what, Duration::from_secs(10), || {
            c.kubectl_ok(kubectl_get).trim() == want
        });
        flipped.elapsed()
    };
    let unready_in_api = seen_after(
        "the pod to turn unready",
        &[
            "get",
            &format!("pod/{victim}"),
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
        ],
        "False",
    );
    let endpoint_not_ready = seen_after(
        "the victim's endpoint to be not ready",
        &[
            "get",
            "endpointslices",
            "-l",
            "kubernetes.io/service-name=whoami",
            "-o",
            &format!("jsonpath={{.items[*].endpoints[?(@.targetRef.name==\"{victim}\")].conditions.ready}}"),
        ],
        "false",
    );
    let requests = load.join().unwrap();

    let after_flip = |r: &&Request| r.sent >= flip_at;
    let last_from_victim = requests
        .iter()
        .filter(after_flip)
        .filter(|r| r.pod() == Some(victim.as_str()))
        .map(|r| r.sent - flip_at)
        .max();
    let late: Vec<&Request> = requests
        .iter()
        .filter(|r| r.sent >= flip_at + Duration::from_secs(2))
        .collect();
    println!(
        "readiness flip of {victim}: Ready=False seen in the API after {unready_in_api:?}, \
         its endpoint not ready after {endpoint_not_ready:?} (both as polled with kubectl); \
         last request it answered was sent {last_from_victim:?} after the flip; \
         {} requests, {} after the flip, {} from 2 s after it",
        requests.len(),
        requests.iter().filter(after_flip).count(),
        late.len()
    );
    assert!(
        requests
            .iter()
            .any(|r| r.sent < flip_at && r.pod() == Some(victim.as_str())),
        "the victim answered before the flip"
    );
    assert!(
        failures(&requests).is_empty(),
        "failed requests: {:?}",
        failures(&requests)
    );
    assert!(
        !late.is_empty() && late.iter().all(|r| r.pod() != Some(victim.as_str())),
        "from 2 s after the flip on, {victim} answers nothing: {late:?}"
    );
    for other in names.iter().filter(|n| **n != victim) {
        assert!(
            late.iter().any(|r| r.pod() == Some(other.as_str())),
            "{other} keeps answering: {late:?}"
        );
    }
}

#[test]
fn a_rolling_update_under_a_steady_request_stream_fails_no_request() {
    let Some(c) = Cluster::up(3) else { return };
    deploy_whoami(&c);
    let old_pods: Vec<String> = c.pods("app=whoami").into_iter().map(|p| p.0).collect();
    wait_for_answers_from(&c, &old_pods);

    // 20 requests a second: at most 2,400 (2 minutes), stopped 2 s after the rollout.
    let stop = Arc::new(AtomicBool::new(false));
    let stop_load = stop.clone();
    let load = steady_load(&c, Duration::from_millis(50), 2400, move |_| {
        stop_load.load(Ordering::Relaxed)
    });
    let load_started = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    c.kubectl_ok(&["set", "env", "deploy/whoami", "VERSION=2"]);
    let rollout_started = load_started.elapsed();
    c.kubectl_ok(&["rollout", "status", "deploy/whoami", "--timeout=120s"]);
    let rollout_done = load_started.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let requests = load.join().unwrap();

    // The old pods finish their preStop sleep and go.
    let mut new_pods = vec![];
    c.wait_for("only new pods left", Duration::from_secs(60), || {
        new_pods = c.pods("app=whoami").into_iter().map(|p| p.0).collect();
        new_pods.iter().all(|p| !old_pods.contains(p))
    });
    let answered_by = |version: &str| {
        requests
            .iter()
            .filter(|r| r.version() == Some(version))
            .count()
    };
    println!(
        "rolling update of 3 replicas took {:?} (kubectl set env -> rollout status); \
         requests sent {}, failed {}, answered by version 1: {}, by version 2: {}",
        rollout_done - rollout_started,
        requests.len(),
        failures(&requests).len(),
        answered_by("1"),
        answered_by("2"),
    );
    assert!(
        failures(&requests).is_empty(),
        "failed requests: {:?}",
        failures(&requests)
    );
    assert!(
        requests.last().unwrap().sent > rollout_done,
        "the load ran past the rollout"
    );
    assert_eq!(new_pods.len(), 3, "{new_pods:?}");
    // After the rollout every answer comes from a new pod (and the stream
    // before it was really served by the old ones).
    let after: Vec<&Request> = requests.iter().filter(|r| r.sent > rollout_done).collect();
    assert!(
        after.iter().all(|r| r.version() == Some("2")
            && r.pod().is_some_and(|p| new_pods.iter().any(|n| n == p))),
        "answers after the rollout: {after:?}"
    );
    assert!(
        answered_by("1") > 0,
        "the old pods served before the update"
    );
}
