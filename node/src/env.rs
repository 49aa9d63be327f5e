//! A container's environment and command line, from its spec: `env` (plain
//! values, `valueFrom` configMapKeyRef / secretKeyRef / fieldRef /
//! resourceFieldRef), `envFrom`, and `$(VAR)` expansion in values, command
//! and args, as the kubelet does it.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, Pod};

/// The default PATH of a container that sets none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What the environment is resolved against.
#[derive(Clone, Debug, Default)]
pub struct EnvContext {
    /// ConfigMaps of the pod's namespace by name (data only; binaryData is ignored).
    pub config_maps: BTreeMap<String, BTreeMap<String, String>>,
    /// Secrets of the pod's namespace by name (decoded data).
    pub secrets: BTreeMap<String, BTreeMap<String, String>>,
    pub pod_ip: Option<String>,
    pub host_ip: Option<String>,
    pub node_name: String,
}

/// Why a container cannot be started with its configuration (the kubelet's
/// CreateContainerConfigError).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("configmap \"{0}\" not found")]
    ConfigMapNotFound(String),
    #[error("couldn't find key {key} in ConfigMap {namespace}/{name}")]
    ConfigMapKeyNotFound {
        namespace: String,
        name: String,
        key: String,
    },
    #[error("secret \"{0}\" not found")]
    SecretNotFound(String),
    #[error("couldn't find key {key} in Secret {namespace}/{name}")]
    SecretKeyNotFound {
        namespace: String,
        name: String,
        key: String,
    },
    #[error("unsupported fieldRef {0:?} in env var {1}")]
    UnsupportedField(String, String),
    #[error("env var {0} has a valueFrom with no source")]
    EmptyValueFrom(String),
    #[error(
        "container {0} has no command: ferry runs no images, so command (or args) is required"
    )]
    NoCommand(String),
    #[error("{0}")]
    Other(String),
}

/// ConfigMap names the container's env, envFrom and the pod's volumes refer to.
pub fn referenced_config_maps(pod: &Pod, container: &Container) -> Vec<String> {
    let mut names = Vec::new();
    for e in container.env.iter().flatten() {
        if let Some(r) = e
            .value_from
            .as_ref()
            .and_then(|v| v.config_map_key_ref.as_ref())
        {
            names.push(r.name.clone());
        }
    }
    for f in container.env_from.iter().flatten() {
        if let Some(r) = &f.config_map_ref {
            names.push(r.name.clone());
        }
    }
    for v in pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()) {
        if let Some(cm) = &v.config_map {
            names.push(cm.name.clone());
        }
        for src in v.projected.iter().flat_map(|p| p.sources.iter().flatten()) {
            if let Some(cm) = &src.config_map {
                names.push(cm.name.clone());
            }
        }
    }
    names.sort();
    names.dedup();
    names
}

/// Secret names the container's env, envFrom and the pod's volumes refer to.
pub fn referenced_secrets(pod: &Pod, container: &Container) -> Vec<String> {
    let mut names = Vec::new();
    for e in container.env.iter().flatten() {
        if let Some(r) = e
            .value_from
            .as_ref()
            .and_then(|v| v.secret_key_ref.as_ref())
        {
            names.push(r.name.clone());
        }
    }
    for f in container.env_from.iter().flatten() {
        if let Some(r) = &f.secret_ref {
            names.push(r.name.clone());
        }
    }
    for v in pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()) {
        if let Some(s) = v.secret.as_ref().and_then(|s| s.secret_name.clone()) {
            names.push(s);
        }
    }
    names.sort();
    names.dedup();
    names
}

/// Expands `$(NAME)` from `vars`; `$$` escapes a `$`; unknown references stay as written.
pub fn expand(input: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(') {
            match inner.find(')') {
                Some(end) => {
                    let name = &inner[..end];
                    match vars.get(name) {
                        Some(v) => out.push_str(v),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &inner[end + 1..];
                }
                None => {
                    out.push_str("$(");
                    rest = inner;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

fn field_value(pod: &Pod, path: &str, ctx: &EnvContext, var: &str) -> Result<String, ConfigError> {
    let meta = &pod.metadata;
    let lookup = |m: &Option<BTreeMap<String, String>>, key: &str| {
        m.as_ref()
            .and_then(|m| m.get(key).cloned())
            .unwrap_or_default()
    };
    let bracket = |prefix: &str| {
        path.strip_prefix(prefix)
            .and_then(|r| r.strip_suffix("']"))
            .map(str::to_string)
    };
    Ok(match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "spec.nodeName" => pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_else(|| ctx.node_name.clone()),
        "spec.serviceAccountName" => pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into()),
        "status.podIP" | "status.podIPs" => ctx.pod_ip.clone().unwrap_or_default(),
        "status.hostIP" | "status.hostIPs" => ctx.host_ip.clone().unwrap_or_default(),
        _ => {
            if let Some(k) = bracket("metadata.labels['") {
                lookup(&meta.labels, &k)
            } else if let Some(k) = bracket("metadata.annotations['") {
                lookup(&meta.annotations, &k)
            } else {
                return Err(ConfigError::UnsupportedField(path.into(), var.into()));
            }
        }
    })
}

fn resource_value(container: &Container, resource: &str) -> String {
    let res = container.resources.as_ref();
    let (kind, name) = resource.split_once('.').unwrap_or(("limits", resource));
    let map = match kind {
        "requests" => res.and_then(|r| r.requests.as_ref()),
        _ => res.and_then(|r| r.limits.as_ref()),
    };
    let q = map.and_then(|m| m.get(name)).map(|q| q.0.clone());
    match (name, q) {
        (_, Some(q)) => q,
        ("cpu", None) => "0".into(),
        _ => "0".into(),
    }
}

/// The container's environment in order (later entries win), without the
/// defaults [`process_env`] adds.
pub fn resolve_env(
    pod: &Pod,
    container: &Container,
    ctx: &EnvContext,
) -> Result<Vec<(String, String)>, ConfigError> {
    let ns = pod
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let mut out: Vec<(String, String)> = Vec::new();
    let mut vars: BTreeMap<String, String> = BTreeMap::new();
    let set = |out: &mut Vec<(String, String)>,
               vars: &mut BTreeMap<String, String>,
               k: String,
               v: String| {
        vars.insert(k.clone(), v.clone());
        out.retain(|(name, _)| *name != k);
        out.push((k, v));
    };
    for f in container.env_from.iter().flatten() {
        let prefix = f.prefix.clone().unwrap_or_default();
        if let Some(r) = &f.config_map_ref {
            match ctx.config_maps.get(&r.name) {
                Some(data) => {
                    for (k, v) in data {
                        set(&mut out, &mut vars, format!("{prefix}{k}"), v.clone());
                    }
                }
                None if r.optional == Some(true) => {}
                None => return Err(ConfigError::ConfigMapNotFound(r.name.clone())),
            }
        }
        if let Some(r) = &f.secret_ref {
            match ctx.secrets.get(&r.name) {
                Some(data) => {
                    for (k, v) in data {
                        set(&mut out, &mut vars, format!("{prefix}{k}"), v.clone());
                    }
                }
                None if r.optional == Some(true) => {}
                None => return Err(ConfigError::SecretNotFound(r.name.clone())),
            }
        }
    }
    for e in container.env.iter().flatten() {
        let value = match &e.value_from {
            None => expand(e.value.as_deref().unwrap_or(""), &vars),
            Some(src) => {
                if let Some(r) = &src.config_map_key_ref {
                    let optional = r.optional == Some(true);
                    match ctx.config_maps.get(&r.name) {
                        None if optional => continue,
                        None => return Err(ConfigError::ConfigMapNotFound(r.name.clone())),
                        Some(data) => match data.get(&r.key) {
                            Some(v) => v.clone(),
                            None if optional => continue,
                            None => {
                                return Err(ConfigError::ConfigMapKeyNotFound {
                                    namespace: ns.clone(),
                                    name: r.name.clone(),
                                    key: r.key.clone(),
                                })
                            }
                        },
                    }
                } else if let Some(r) = &src.secret_key_ref {
                    let optional = r.optional == Some(true);
                    match ctx.secrets.get(&r.name) {
                        None if optional => continue,
                        None => return Err(ConfigError::SecretNotFound(r.name.clone())),
                        Some(data) => match data.get(&r.key) {
                            Some(v) => v.clone(),
                            None if optional => continue,
                            None => {
                                return Err(ConfigError::SecretKeyNotFound {
                                    namespace: ns.clone(),
                                    name: r.name.clone(),
                                    key: r.key.clone(),
                                })
                            }
                        },
                    }
                } else if let Some(r) = &src.field_ref {
                    field_value(pod, &r.field_path, ctx, &e.name)?
                } else if let Some(r) = &src.resource_field_ref {
                    resource_value(container, &r.resource)
                } else {
                    return Err(ConfigError::EmptyValueFrom(e.name.clone()));
                }
            }
        };
        set(&mut out, &mut vars, e.name.clone(), value);
    }
    Ok(out)
}

/// The full process environment: PATH, HOSTNAME and HOME defaults, then the
/// container's own variables.
pub fn process_env(pod_name: &str, env: &[(String, String)]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = vec![
        ("PATH".into(), DEFAULT_PATH.into()),
        ("HOSTNAME".into(), pod_name.into()),
        ("HOME".into(), "/root".into()),
    ];
    for (k, v) in env {
        out.retain(|(name, _)| name != k);
        out.push((k.clone(), v.clone()));
    }
    out
}

/// argv: command then args, both `$(VAR)`-expanded. With no command the args
/// are the command line (an image with no entrypoint); with neither, an error.
pub fn argv(container: &Container, env: &[(String, String)]) -> Result<Vec<String>, ConfigError> {
    let vars: BTreeMap<String, String> = env.iter().cloned().collect();
    let argv: Vec<String> = container
        .command
        .iter()
        .flatten()
        .chain(container.args.iter().flatten())
        .map(|a| expand(a, &vars))
        .collect();
    if argv.first().is_none_or(|a| a.is_empty()) {
        return Err(ConfigError::NoCommand(container.name.clone()));
    }
    Ok(argv)
}

/// Resolves `prog` as execvp would with the container's PATH: a name with a
/// '/' is taken as is (relative to `cwd`); otherwise the first executable
/// regular file on PATH.
pub fn find_program(
    prog: &str,
    path_var: &str,
    cwd: &std::path::Path,
) -> Result<std::path::PathBuf, String> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &std::path::Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if prog.contains('/') {
        let p = cwd.join(prog);
        if executable(&p) {
            return Ok(p);
        }
        return Err(format!("exec: {prog:?}: no such executable file"));
    }
    for dir in path_var.split(':').filter(|d| !d.is_empty()) {
        let p = std::path::Path::new(dir).join(prog);
        if executable(&p) {
            return Ok(p);
        }
    }
    Err(format!(
        "exec: {prog:?}: executable file not found in $PATH"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(containers: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "web-1", "namespace": "shop", "uid": "u-1",
                         "labels": {"app": "web"}, "annotations": {"a/b": "c"}},
            "spec": {"nodeName": "n1", "containers": containers},
        }))
        .unwrap()
    }

    fn ctx() -> EnvContext {
        let mut c = EnvContext {
            pod_ip: Some("10.244.1.5".into()),
            host_ip: Some("192.168.0.2".into()),
            node_name: "n1".into(),
            ..Default::default()
        };
        c.config_maps.insert(
            "cfg".into(),
            [
                ("port".to_string(), "8080".to_string()),
                ("mode".into(), "fast".into()),
            ]
            .into(),
        );
        c.secrets.insert(
            "s".into(),
            [("pw".to_string(), "hunter2".to_string())].into(),
        );
        c
    }

    #[test]
    fn expansion_rules() {
        let vars: BTreeMap<String, String> = [("A".to_string(), "1".to_string())].into();
        assert_eq!(expand("x$(A)y", &vars), "x1y");
        assert_eq!(expand("$$(A)", &vars), "$(A)");
        assert_eq!(expand("$(B)", &vars), "$(B)");
        assert_eq!(expand("$A $(", &vars), "$A $(");
        assert_eq!(expand("cost $$5", &vars), "cost $5");
    }

    #[test]
    fn env_sources_and_order() {
        let p = pod(json!([{
            "name": "c",
            "command": ["sh", "-c", "echo $(GREETING) $$(X)"],
            "args": ["--port=$(PORT)"],
            "envFrom": [{"configMapRef": {"name": "cfg"}, "prefix": "CFG_"}],
            "env": [
                {"name": "PORT", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "port"}}},
                {"name": "GREETING", "value": "hi-$(PORT)"},
                {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                {"name": "NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
                {"name": "PW", "valueFrom": {"secretKeyRef": {"name": "s", "key": "pw"}}},
                {"name": "OPT", "valueFrom": {"configMapKeyRef": {"name": "nope", "key": "k", "optional": true}}},
                {"name": "CFG_mode", "value": "slow"},
            ],
        }]));
        let c = &p.spec.as_ref().unwrap().containers[0];
        let env = resolve_env(&p, c, &ctx()).unwrap();
        let m: BTreeMap<_, _> = env.iter().cloned().collect();
        assert_eq!(m["PORT"], "8080");
        assert_eq!(m["GREETING"], "hi-8080");
        assert_eq!(m["IP"], "10.244.1.5");
        assert_eq!(m["NAME"], "web-1");
        assert_eq!(m["APP"], "web");
        assert_eq!(m["PW"], "hunter2");
        assert_eq!(m["CFG_port"], "8080");
        assert_eq!(m["CFG_mode"], "slow");
        assert!(!m.contains_key("OPT"));
        assert_eq!(env.last().unwrap().0, "CFG_mode");
        let argv = argv(c, &env).unwrap();
        assert_eq!(argv, ["sh", "-c", "echo hi-8080 $(X)", "--port=8080"]);
        let full = process_env("web-1", &env);
        assert!(full.contains(&("PATH".into(), DEFAULT_PATH.into())));
        assert!(full.contains(&("HOSTNAME".into(), "web-1".into())));
    }

    #[test]
    fn missing_sources_are_config_errors() {
        let p = pod(json!([{"name": "c", "command": ["x"], "env": [
            {"name": "K", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "absent"}}}]}]));
        let c = &p.spec.as_ref().unwrap().containers[0];
        let e = resolve_env(&p, c, &ctx()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "couldn't find key absent in ConfigMap shop/cfg"
        );
        let p = pod(json!([{"name": "c", "command": ["x"], "env": [
            {"name": "K", "valueFrom": {"configMapKeyRef": {"name": "gone", "key": "k"}}}]}]));
        let c = &p.spec.as_ref().unwrap().containers[0];
        assert_eq!(
            resolve_env(&p, c, &ctx()).unwrap_err(),
            ConfigError::ConfigMapNotFound("gone".into())
        );
        let p = pod(json!([{"name": "c", "command": ["x"], "env": [
            {"name": "K", "valueFrom": {"fieldRef": {"fieldPath": "spec.bogus"}}}]}]));
        let c = &p.spec.as_ref().unwrap().containers[0];
        assert!(matches!(
            resolve_env(&p, c, &ctx()),
            Err(ConfigError::UnsupportedField(..))
        ));
    }

    #[test]
    fn argv_needs_a_command() {
        let p = pod(
            json!([{"name": "c"}, {"name": "d", "args": ["sleep", "1"]}, {"name": "e", "command": [""]}]),
        );
        let cs = &p.spec.as_ref().unwrap().containers;
        assert_eq!(
            argv(&cs[0], &[]).unwrap_err(),
            ConfigError::NoCommand("c".into())
        );
        assert_eq!(argv(&cs[1], &[]).unwrap(), ["sleep", "1"]);
        assert!(argv(&cs[2], &[]).is_err());
    }

    #[test]
    fn referenced_objects() {
        let p: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "c", "envFrom": [{"configMapRef": {"name": "b"}}],
                     "env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "a", "key": "k"}}}]}],
                     "volumes": [{"name": "v", "configMap": {"name": "b"}}, {"name": "s", "secret": {"secretName": "sec"}}]}
        }))
        .unwrap();
        let c = &p.spec.as_ref().unwrap().containers[0];
        assert_eq!(referenced_config_maps(&p, c), ["a", "b"]);
        assert_eq!(referenced_secrets(&p, c), ["sec"]);
    }

    #[test]
    fn program_lookup() {
        let cwd = std::path::Path::new("/");
        assert!(find_program("sh", DEFAULT_PATH, cwd).is_ok());
        let e = find_program("no-such-prog-ferry", DEFAULT_PATH, cwd).unwrap_err();
        assert!(e.contains("executable file not found in $PATH"), "{e}");
        assert!(find_program("/bin/sh", "", cwd).is_ok());
        assert!(find_program("./nope", "", cwd).is_err());
    }
}
