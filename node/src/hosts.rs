//! The kubelet-managed /etc/hosts of a pod on the pod network: localhost, the
//! pod's hostname at the pod's address, and `spec.hostAliases`. Without it a
//! program that resolves its own hostname (Python's http.server does, at
//! bind) waits for DNS timeouts: the node's resolver is not reachable from
//! the pod's network namespace.

use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::HostAlias;

use crate::runtime::BindMount;

pub const ETC_HOSTS: &str = "/etc/hosts";

/// The file's content, in the kubelet's layout.
pub fn hosts_file(pod_ip: &str, hostname: &str, aliases: &[HostAlias]) -> String {
    let mut out = String::from(
        "# Kubernetes-managed hosts file.\n\
         127.0.0.1\tlocalhost\n\
         ::1\tlocalhost ip6-localhost ip6-loopback\n\
         fe00::0\tip6-localnet\n\
         fe00::0\tip6-mcastprefix\n\
         fe00::1\tip6-allnodes\n\
         fe00::2\tip6-allrouters\n",
    );
    out.push_str(&format!("{pod_ip}\t{hostname}\n"));
    let aliases: Vec<String> = aliases
        .iter()
        .filter(|a| !a.ip.is_empty())
        .filter_map(|a| {
            let names = a.hostnames.as_ref().filter(|h| !h.is_empty())?;
            Some(format!("{}\t{}\n", a.ip, names.join("\t")))
        })
        .collect();
    if !aliases.is_empty() {
        out.push_str("\n# Entries added by HostAliases.\n");
        out.extend(aliases);
    }
    out
}

/// Writes the pod's hosts file into `pod_dir` (when its content changed) and
/// returns the mount that shows it at /etc/hosts, unless the container mounts
/// something there itself.
pub fn hosts_mount(
    pod_dir: &Path,
    content: &str,
    container_mounts: &[BindMount],
) -> std::io::Result<Option<BindMount>> {
    if container_mounts
        .iter()
        .any(|m| m.target == Path::new(ETC_HOSTS))
    {
        return Ok(None);
    }
    let source: PathBuf = pod_dir.join("etc-hosts");
    if std::fs::read_to_string(&source).ok().as_deref() != Some(content) {
        std::fs::create_dir_all(pod_dir)?;
        std::fs::write(&source, content)?;
    }
    Ok(Some(BindMount {
        source,
        target: ETC_HOSTS.into(),
        read_only: false,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn own_name_and_aliases() {
        let aliases: Vec<HostAlias> = serde_json::from_value(json!([
            {"ip": "10.1.2.3", "hostnames": ["foo.local", "bar.local"]},
            {"ip": "10.1.2.4"},
        ]))
        .unwrap();
        let text = hosts_file("10.244.1.5", "web-0", &aliases);
        assert!(text.starts_with("# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n"));
        assert!(text.contains("\n10.244.1.5\tweb-0\n"), "{text}");
        assert!(
            text.ends_with("# Entries added by HostAliases.\n10.1.2.3\tfoo.local\tbar.local\n"),
            "{text}"
        );
        assert!(!hosts_file("10.244.1.5", "web-0", &[]).contains("HostAliases"));
    }

    #[test]
    fn written_once_and_not_over_a_container_mount() {
        let dir = tempfile::tempdir().unwrap();
        let m = hosts_mount(dir.path(), "a\n", &[]).unwrap().unwrap();
        assert_eq!(m.target, Path::new(ETC_HOSTS));
        assert_eq!(std::fs::read_to_string(&m.source).unwrap(), "a\n");
        let own = BindMount {
            source: "/x".into(),
            target: ETC_HOSTS.into(),
            read_only: true,
        };
        assert_eq!(hosts_mount(dir.path(), "b\n", &[own]).unwrap(), None);
    }
}
