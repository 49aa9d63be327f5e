//! Container lifecycle hooks: preStop, run the way the kubelet runs it —
//! before SIGTERM, within the pod's termination grace period — so a pod can
//! keep serving until every proxy has stopped sending it new connections.

use std::time::Duration;

use k8s_openapi::api::core::v1::Container;

use crate::probe::{self, ProbeAction};

/// The kubelet's minimum time from SIGTERM to SIGKILL when a preStop hook
/// used up (most of) the grace period.
pub const MIN_GRACE_AFTER_PRE_STOP: Duration = Duration::from_secs(2);

/// What a preStop hook does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PreStop {
    /// An exec or httpGet handler, bounded by the grace period.
    Run(ProbeAction),
    /// The `sleep` action: waits, bounded by the grace period.
    Sleep(Duration),
}

/// The container's preStop hook, if it has one.
pub fn pre_stop(container: &Container) -> Result<Option<PreStop>, String> {
    let Some(hook) = container
        .lifecycle
        .as_ref()
        .and_then(|l| l.pre_stop.as_ref())
    else {
        return Ok(None);
    };
    if let Some(e) = &hook.exec {
        return Ok(Some(PreStop::Run(probe::exec_action(e)?)));
    }
    if let Some(h) = &hook.http_get {
        return Ok(Some(PreStop::Run(probe::http_action(h, container)?)));
    }
    if let Some(s) = &hook.sleep {
        let seconds = u64::try_from(s.seconds)
            .map_err(|_| format!("sleep seconds must not be negative: {}", s.seconds))?;
        return Ok(Some(PreStop::Sleep(Duration::from_secs(seconds))));
    }
    if hook.tcp_socket.is_some() {
        return Err("tcpSocket is not supported as a lifecycle handler".into());
    }
    Err("preStop hook has no handler (exec, httpGet or sleep)".into())
}

/// The time SIGTERM gets before SIGKILL once a preStop hook took `hook_took`
/// of the grace period (the kubelet's accounting).
pub fn grace_after_pre_stop(grace: Duration, hook_took: Duration) -> Duration {
    grace
        .saturating_sub(hook_took)
        .max(MIN_GRACE_AFTER_PRE_STOP)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn container(lifecycle: serde_json::Value) -> Container {
        serde_json::from_value(json!({"name": "c", "lifecycle": lifecycle,
            "ports": [{"name": "http", "containerPort": 8080}]}))
        .unwrap()
    }

    #[test]
    fn handlers() {
        assert_eq!(pre_stop(&container(json!({}))), Ok(None));
        assert_eq!(
            pre_stop(&container(
                json!({"preStop": {"exec": {"command": ["sh", "-c", "sleep 1"]}}})
            )),
            Ok(Some(PreStop::Run(ProbeAction::Exec {
                command: vec!["sh".into(), "-c".into(), "sleep 1".into()]
            })))
        );
        assert_eq!(
            pre_stop(&container(
                json!({"preStop": {"httpGet": {"port": "http", "path": "drain"}}})
            )),
            Ok(Some(PreStop::Run(ProbeAction::Http {
                host: None,
                port: 8080,
                path: "/drain".into(),
                https: false,
                headers: vec![],
            })))
        );
        assert_eq!(
            pre_stop(&container(json!({"preStop": {"sleep": {"seconds": 5}}}))),
            Ok(Some(PreStop::Sleep(Duration::from_secs(5))))
        );
        for bad in [
            json!({"preStop": {"sleep": {"seconds": -1}}}),
            json!({"preStop": {"tcpSocket": {"port": 80}}}),
            json!({"preStop": {"exec": {"command": []}}}),
            json!({"preStop": {}}),
        ] {
            assert!(pre_stop(&container(bad.clone())).is_err(), "{bad}");
        }
    }

    #[test]
    fn grace_left_for_sigterm() {
        let s = Duration::from_secs;
        assert_eq!(grace_after_pre_stop(s(30), s(5)), s(25));
        assert_eq!(grace_after_pre_stop(s(10), s(9)), s(2));
        assert_eq!(grace_after_pre_stop(s(3), s(30)), s(2));
    }
}
