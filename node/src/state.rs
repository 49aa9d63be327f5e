//! What the agent records per pod under `<data-dir>/pods/<uid>/state.json`,
//! so a restarted agent adopts the processes still running instead of
//! killing them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::status::Termination;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodRecord {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    /// The named network namespace (absent for hostNetwork pods).
    pub netns: Option<String>,
    pub pod_ip: Option<String>,
    /// Whether the pod network gave this pod its address (to release it).
    pub networked: bool,
    pub start_time: Option<DateTime<Utc>>,
    pub containers: BTreeMap<String, ContainerRecord>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerRecord {
    /// The running process, if any.
    pub pid: Option<u32>,
    pub start_ticks: Option<u64>,
    pub started_at: Option<DateTime<Utc>>,
    pub restart_count: i32,
    /// The log instance the current (or last) process writes.
    pub instance: i32,
    pub last_termination: Option<TerminationRecord>,
    /// Finished for good (its restart policy says no more).
    pub finished: bool,
    pub crashes: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TerminationRecord {
    pub exit_code: i32,
    pub signal: Option<i32>,
    pub reason: String,
    pub message: Option<String>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: DateTime<Utc>,
    pub container_id: Option<String>,
}

impl From<&Termination> for TerminationRecord {
    fn from(t: &Termination) -> Self {
        TerminationRecord {
            exit_code: t.exit_code,
            signal: t.signal,
            reason: t.reason.clone(),
            message: t.message.clone(),
            started_at: t.started_at,
            finished_at: t.finished_at,
            container_id: t.container_id.clone(),
        }
    }
}

impl From<&TerminationRecord> for Termination {
    fn from(t: &TerminationRecord) -> Self {
        Termination {
            exit_code: t.exit_code,
            signal: t.signal,
            reason: t.reason.clone(),
            message: t.message.clone(),
            started_at: t.started_at,
            finished_at: t.finished_at,
            container_id: t.container_id.clone(),
        }
    }
}

pub fn pods_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("pods")
}

pub fn pod_dir(data_dir: &Path, uid: &str) -> PathBuf {
    pods_dir(data_dir).join(uid)
}

impl PodRecord {
    /// Writes atomically (temp file and rename).
    pub fn save(&self, data_dir: &Path) -> std::io::Result<()> {
        let dir = pod_dir(data_dir, &self.uid);
        std::fs::create_dir_all(&dir)?;
        let tmp = dir.join("state.json.tmp");
        std::fs::write(
            &tmp,
            serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?,
        )?;
        std::fs::rename(tmp, dir.join("state.json"))
    }

    pub fn load(dir: &Path) -> Option<PodRecord> {
        let text = std::fs::read(dir.join("state.json")).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// Every record under the data directory (unreadable ones are skipped and logged).
    pub fn load_all(data_dir: &Path) -> Vec<PodRecord> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(pods_dir(data_dir))
            .into_iter()
            .flatten()
            .flatten()
        {
            match PodRecord::load(&e.path()) {
                Some(r) => out.push(r),
                None => {
                    tracing::warn!(dir = %e.path().display(), "pod directory without a readable state.json")
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let d = tempfile::tempdir().unwrap();
        let mut r = PodRecord {
            uid: "u1".into(),
            namespace: "default".into(),
            name: "web".into(),
            netns: Some("ferry-pod-1".into()),
            pod_ip: Some("10.244.1.2".into()),
            networked: true,
            start_time: Some(Utc::now()),
            containers: BTreeMap::new(),
        };
        r.containers.insert(
            "c".into(),
            ContainerRecord {
                pid: Some(42),
                start_ticks: Some(7),
                restart_count: 2,
                instance: 2,
                last_termination: Some(TerminationRecord {
                    exit_code: 1,
                    signal: None,
                    reason: "Error".into(),
                    message: None,
                    started_at: None,
                    finished_at: Utc::now(),
                    container_id: Some("ferry://41".into()),
                }),
                ..Default::default()
            },
        );
        r.save(d.path()).unwrap();
        assert_eq!(PodRecord::load_all(d.path()), vec![r.clone()]);
        std::fs::create_dir_all(pods_dir(d.path()).join("junk")).unwrap();
        assert_eq!(PodRecord::load_all(d.path()).len(), 1);
    }
}
