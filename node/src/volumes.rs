//! Pod volumes on the host: ConfigMap and Secret volumes (and projected
//! sources of them) written as files under the pod's directory, emptyDir
//! directories, hostPath; and the bind mounts a container gets for its
//! volumeMounts (subPath and subPathExpr supported).

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use k8s_openapi::api::core::v1::{Container, KeyToPath, Pod, Volume};

use crate::runtime::BindMount;

/// The contents of the ConfigMaps and Secrets the pod refers to (by name).
#[derive(Clone, Debug, Default)]
pub struct VolumeSources {
    pub config_maps: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    pub secrets: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VolumeError {
    #[error("volume {volume:?}: configmap \"{name}\" not found")]
    ConfigMapNotFound { volume: String, name: String },
    #[error("volume {volume:?}: secret \"{name}\" not found")]
    SecretNotFound { volume: String, name: String },
    #[error("volume {volume:?}: key {key:?} not found in {kind} \"{name}\"")]
    KeyNotFound {
        volume: String,
        kind: &'static str,
        name: String,
        key: String,
    },
    #[error("volume {0:?}: this volume type is not supported by ferry node")]
    Unsupported(String),
    #[error("volumeMount {0:?} refers to no volume of the pod")]
    NoSuchVolume(String),
    #[error("invalid path {0:?}: must be relative and must not contain '..'")]
    BadPath(String),
    #[error("{0}")]
    Io(String),
}

fn io(e: std::io::Error, what: &Path) -> VolumeError {
    VolumeError::Io(format!("{}: {e}", what.display()))
}

/// A relative path with no `..` (for items[].path and subPath).
pub fn safe_relative(p: &str) -> Result<PathBuf, VolumeError> {
    let path = Path::new(p);
    if p.is_empty()
        || path
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(VolumeError::BadPath(p.into()));
    }
    Ok(path.to_path_buf())
}

/// Files of a volume: relative path → (bytes, mode).
pub type Files = BTreeMap<PathBuf, (Vec<u8>, u32)>;

/// One key/value source (a ConfigMap or Secret) projected into a volume.
struct Source<'a> {
    volume: &'a str,
    kind: &'static str,
    name: &'a str,
    items: Option<&'a Vec<KeyToPath>>,
    default_mode: u32,
    optional: bool,
}

impl Source<'_> {
    /// Adds the source's files to `out`; a missing source is an error unless optional.
    fn project(
        &self,
        data: Option<&BTreeMap<String, Vec<u8>>>,
        out: &mut Files,
    ) -> Result<(), VolumeError> {
        let Some(data) = data else {
            if self.optional {
                return Ok(());
            }
            return Err(match self.kind {
                "ConfigMap" => VolumeError::ConfigMapNotFound {
                    volume: self.volume.into(),
                    name: self.name.into(),
                },
                _ => VolumeError::SecretNotFound {
                    volume: self.volume.into(),
                    name: self.name.into(),
                },
            });
        };
        match self.items {
            None => {
                for (k, v) in data {
                    out.insert(safe_relative(k)?, (v.clone(), self.default_mode));
                }
            }
            Some(items) => {
                for it in items {
                    match data.get(&it.key) {
                        Some(v) => {
                            let mode = it.mode.map(|m| m as u32).unwrap_or(self.default_mode);
                            out.insert(safe_relative(&it.path)?, (v.clone(), mode));
                        }
                        None if self.optional => {}
                        None => {
                            return Err(VolumeError::KeyNotFound {
                                volume: self.volume.into(),
                                kind: self.kind,
                                name: self.name.into(),
                                key: it.key.clone(),
                            })
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// The files of a ConfigMap/Secret/projected volume; None for other types.
pub fn volume_files(v: &Volume, src: &VolumeSources) -> Option<Result<Files, VolumeError>> {
    let mut out = Files::new();
    let mode = |m: Option<i32>| m.map(|m| m as u32).unwrap_or(0o644);
    let r = if let Some(cm) = &v.config_map {
        Source {
            volume: &v.name,
            kind: "ConfigMap",
            name: &cm.name,
            items: cm.items.as_ref(),
            default_mode: mode(cm.default_mode),
            optional: cm.optional == Some(true),
        }
        .project(src.config_maps.get(&cm.name), &mut out)
    } else if let Some(s) = &v.secret {
        let name = s.secret_name.clone().unwrap_or_default();
        Source {
            volume: &v.name,
            kind: "Secret",
            name: &name,
            items: s.items.as_ref(),
            default_mode: mode(s.default_mode),
            optional: s.optional == Some(true),
        }
        .project(src.secrets.get(&name), &mut out)
    } else if let Some(p) = &v.projected {
        let default_mode = mode(p.default_mode);
        p.sources.iter().flatten().try_for_each(|s| {
            if let Some(cm) = &s.config_map {
                Source {
                    volume: &v.name,
                    kind: "ConfigMap",
                    name: &cm.name,
                    items: cm.items.as_ref(),
                    default_mode,
                    optional: cm.optional == Some(true),
                }
                .project(src.config_maps.get(&cm.name), &mut out)
            } else if let Some(sec) = &s.secret {
                Source {
                    volume: &v.name,
                    kind: "Secret",
                    name: &sec.name,
                    items: sec.items.as_ref(),
                    default_mode,
                    optional: sec.optional == Some(true),
                }
                .project(src.secrets.get(&sec.name), &mut out)
            } else {
                Err(VolumeError::Unsupported(v.name.clone()))
            }
        })
    } else {
        return None;
    };
    Some(r.map(|_| out))
}

/// Writes `files` into `dir` (each through a temp file and rename, so a
/// directory mount sees whole files) and removes files no longer wanted.
pub fn write_files(
    dir: &Path,
    files: &BTreeMap<PathBuf, (Vec<u8>, u32)>,
) -> Result<bool, VolumeError> {
    std::fs::create_dir_all(dir).map_err(|e| io(e, dir))?;
    let mut changed = false;
    for (rel, (data, mode)) in files {
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io(e, parent))?;
        }
        let same = std::fs::read(&path).is_ok_and(|old| old == *data)
            && std::fs::metadata(&path).is_ok_and(|m| m.permissions().mode() & 0o7777 == *mode);
        if same {
            continue;
        }
        let tmp = path.with_file_name(format!(
            ".{}.tmp",
            path.file_name().and_then(|n| n.to_str()).unwrap_or("f")
        ));
        std::fs::write(&tmp, data).map_err(|e| io(e, &tmp))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(*mode))
            .map_err(|e| io(e, &tmp))?;
        std::fs::rename(&tmp, &path).map_err(|e| io(e, &path))?;
        changed = true;
    }
    let wanted: BTreeSet<&PathBuf> = files.keys().collect();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let rel = PathBuf::from(e.file_name());
        if e.file_type().is_ok_and(|t| t.is_file()) && !wanted.contains(&rel) {
            let _ = std::fs::remove_file(e.path());
            changed = true;
        }
    }
    Ok(changed)
}

/// Makes every volume of the pod exist on the host; returns each volume's
/// host path. Only volumes some container mounts need to be supported.
pub fn materialize(
    pod: &Pod,
    pod_dir: &Path,
    src: &VolumeSources,
) -> Result<BTreeMap<String, PathBuf>, VolumeError> {
    let Some(spec) = &pod.spec else {
        return Ok(BTreeMap::new());
    };
    let mounted: BTreeSet<&str> = spec
        .containers
        .iter()
        .flat_map(|c| c.volume_mounts.iter().flatten())
        .map(|m| m.name.as_str())
        .collect();
    let mut out = BTreeMap::new();
    for v in spec.volumes.iter().flatten() {
        let dir = pod_dir.join("volumes").join(&v.name);
        if let Some(files) = volume_files(v, src) {
            write_files(&dir, &files?)?;
            out.insert(v.name.clone(), dir);
        } else if v.empty_dir.is_some() {
            std::fs::create_dir_all(&dir).map_err(|e| io(e, &dir))?;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))
                .map_err(|e| io(e, &dir))?;
            out.insert(v.name.clone(), dir);
        } else if let Some(h) = &v.host_path {
            let p = PathBuf::from(&h.path);
            match h.type_.as_deref().unwrap_or("") {
                "DirectoryOrCreate" => std::fs::create_dir_all(&p).map_err(|e| io(e, &p))?,
                "FileOrCreate" if !p.exists() => {
                    std::fs::File::create(&p).map_err(|e| io(e, &p))?;
                }
                "" => {}
                "Directory" if !p.is_dir() => {
                    return Err(VolumeError::Io(format!(
                        "hostPath {} is not a directory",
                        h.path
                    )))
                }
                "File" if !p.is_file() => {
                    return Err(VolumeError::Io(format!(
                        "hostPath {} is not a file",
                        h.path
                    )))
                }
                _ if !p.exists() => {
                    return Err(VolumeError::Io(format!(
                        "hostPath {} does not exist",
                        h.path
                    )))
                }
                _ => {}
            }
            out.insert(v.name.clone(), p);
        } else if mounted.contains(v.name.as_str()) {
            return Err(VolumeError::Unsupported(v.name.clone()));
        }
    }
    Ok(out)
}

/// The bind mounts for a container's volumeMounts. ConfigMap, Secret and
/// projected volumes are read-only, as in Kubernetes.
pub fn mounts_for(
    pod: &Pod,
    container: &Container,
    volumes: &BTreeMap<String, PathBuf>,
    env: &[(String, String)],
) -> Result<Vec<BindMount>, VolumeError> {
    let vars: BTreeMap<String, String> = env.iter().cloned().collect();
    let spec_vols: Vec<&Volume> = pod
        .spec
        .iter()
        .flat_map(|s| s.volumes.iter().flatten())
        .collect();
    let mut out = Vec::new();
    for m in container.volume_mounts.iter().flatten() {
        let base = volumes
            .get(&m.name)
            .ok_or_else(|| VolumeError::NoSuchVolume(m.name.clone()))?;
        let sub = match (&m.sub_path, &m.sub_path_expr) {
            (Some(s), _) if !s.is_empty() => Some(s.clone()),
            (_, Some(e)) if !e.is_empty() => Some(crate::env::expand(e, &vars)),
            _ => None,
        };
        let source = match sub {
            Some(s) => {
                let p = base.join(safe_relative(&s)?);
                if !p.exists() {
                    std::fs::create_dir_all(&p).map_err(|e| io(e, &p))?;
                }
                p
            }
            None => base.clone(),
        };
        let v = spec_vols.iter().find(|v| v.name == m.name);
        let always_ro = v
            .is_some_and(|v| v.config_map.is_some() || v.secret.is_some() || v.projected.is_some());
        out.push(BindMount {
            source,
            target: PathBuf::from(&m.mount_path),
            read_only: m.read_only == Some(true) || always_ro,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    fn sources() -> VolumeSources {
        let mut s = VolumeSources::default();
        s.config_maps.insert(
            "nginx".into(),
            [
                ("default.conf".to_string(), b"server {}".to_vec()),
                ("extra".to_string(), b"x".to_vec()),
            ]
            .into(),
        );
        s
    }

    #[test]
    fn config_map_volume_with_items_and_subpath() {
        let d = tempfile::tempdir().unwrap();
        let p = pod(json!({
            "metadata": {"name": "p"},
            "spec": {
                "containers": [{"name": "c", "volumeMounts": [
                    {"name": "conf", "mountPath": "/etc/nginx/conf.d/default.conf", "subPath": "default.conf"},
                    {"name": "all", "mountPath": "/etc/all"},
                    {"name": "scratch", "mountPath": "/tmp/s", "subPathExpr": "$(POD)"}]}],
                "volumes": [
                    {"name": "conf", "configMap": {"name": "nginx", "items": [{"key": "default.conf", "path": "default.conf", "mode": 0o600}]}},
                    {"name": "all", "configMap": {"name": "nginx"}},
                    {"name": "scratch", "emptyDir": {}},
                    {"name": "unused", "nfs": {"server": "x", "path": "/"}}]
            }
        }));
        let vols = materialize(&p, d.path(), &sources()).unwrap();
        let conf = d.path().join("volumes/conf");
        assert_eq!(
            std::fs::read(conf.join("default.conf")).unwrap(),
            b"server {}"
        );
        assert!(!conf.join("extra").exists());
        assert_eq!(
            std::fs::metadata(conf.join("default.conf"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
        assert!(d.path().join("volumes/all/extra").exists());
        let c = &p.spec.as_ref().unwrap().containers[0];
        let m = mounts_for(&p, c, &vols, &[("POD".into(), "p".into())]).unwrap();
        assert_eq!(m[0].source, conf.join("default.conf"));
        assert_eq!(m[0].target, PathBuf::from("/etc/nginx/conf.d/default.conf"));
        assert!(m[0].read_only);
        assert_eq!(m[2].source, d.path().join("volumes/scratch/p"));
        assert!(!m[2].read_only);
        assert!(m[2].source.is_dir());
        // A changed ConfigMap rewrites files; removed keys go.
        let mut s2 = sources();
        s2.config_maps.get_mut("nginx").unwrap().remove("extra");
        materialize(&p, d.path(), &s2).unwrap();
        assert!(!d.path().join("volumes/all/extra").exists());
    }

    #[test]
    fn errors() {
        let d = tempfile::tempdir().unwrap();
        let missing = pod(
            json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c"}],
            "volumes": [{"name": "v", "configMap": {"name": "gone"}}]}}),
        );
        assert_eq!(
            materialize(&missing, d.path(), &sources())
                .unwrap_err()
                .to_string(),
            "volume \"v\": configmap \"gone\" not found"
        );
        let optional = pod(
            json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c"}],
            "volumes": [{"name": "v", "configMap": {"name": "gone", "optional": true}}]}}),
        );
        assert!(materialize(&optional, d.path(), &sources()).is_ok());
        let badkey = pod(
            json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c"}],
            "volumes": [{"name": "v", "configMap": {"name": "nginx", "items": [{"key": "nope", "path": "x"}]}}]}}),
        );
        assert!(matches!(
            materialize(&badkey, d.path(), &sources()),
            Err(VolumeError::KeyNotFound { .. })
        ));
        let unsupported = pod(json!({"metadata": {"name": "p"}, "spec": {
            "containers": [{"name": "c", "volumeMounts": [{"name": "v", "mountPath": "/x"}]}],
            "volumes": [{"name": "v", "nfs": {"server": "s", "path": "/"}}]}}));
        assert_eq!(
            materialize(&unsupported, d.path(), &sources()).unwrap_err(),
            VolumeError::Unsupported("v".into())
        );
        assert!(safe_relative("../etc").is_err());
        assert!(safe_relative("/etc").is_err());
        assert!(safe_relative("a/b").is_ok());
        let p = pod(
            json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "volumeMounts": [{"name": "x", "mountPath": "/x"}]}]}}),
        );
        let c = &p.spec.as_ref().unwrap().containers[0];
        assert_eq!(
            mounts_for(&p, c, &BTreeMap::new(), &[]).unwrap_err(),
            VolumeError::NoSuchVolume("x".into())
        );
    }
}
