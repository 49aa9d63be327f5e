//! First-start credentials: a CA, a serving certificate for the listen
//! address, an admin token, and a kubeconfig that kubectl and the other ferry
//! components use.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use base64::Engine;
use rand::Rng;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose, SanType};

pub struct Credentials {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub tokens_file: PathBuf,
    pub admin_token: String,
}

fn ca_params() -> anyhow::Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, "ferry-ca");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(contents.as_bytes())?;
    Ok(())
}

/// Loads the CA and token from `dir`, creating them on first start, and issues
/// a fresh serving certificate for `sans` (so a changed address just works).
pub fn ensure(dir: &Path, sans: &[IpAddr], dns_names: &[String]) -> anyhow::Result<Credentials> {
    let pki = dir.join("pki");
    std::fs::create_dir_all(&pki).with_context(|| format!("creating {}", pki.display()))?;
    let (ca_key_path, ca_cert_path) = (pki.join("ca.key"), pki.join("ca.crt"));
    let ca_key = if ca_key_path.exists() {
        KeyPair::from_pem(&std::fs::read_to_string(&ca_key_path)?).context("parsing pki/ca.key")?
    } else {
        let key = KeyPair::generate()?;
        write_private(&ca_key_path, &key.serialize_pem())?;
        key
    };
    // Re-signing the same parameters with the same key yields an issuer that
    // the stored CA certificate verifies.
    let ca_cert = ca_params()?.self_signed(&ca_key)?;
    if !ca_cert_path.exists() {
        std::fs::write(&ca_cert_path, ca_cert.pem())?;
    }
    let ca_pem = std::fs::read_to_string(&ca_cert_path)?;

    let mut params = CertificateParams::new(dns_names.to_vec())?;
    params
        .distinguished_name
        .push(DnType::CommonName, "ferry-apiserver");
    params
        .subject_alt_names
        .extend(sans.iter().map(|ip| SanType::IpAddress(*ip)));
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca_cert, &ca_key)?;
    let key_pem = key.serialize_pem();
    write_private(&pki.join("apiserver.key"), &key_pem)?;
    std::fs::write(pki.join("apiserver.crt"), cert.pem())?;

    let tokens_file = dir.join("tokens.csv");
    if !tokens_file.exists() {
        let token: String = rand::rng()
            .sample_iter(rand::distr::Alphanumeric)
            .take(40)
            .map(char::from)
            .collect();
        write_private(
            &tokens_file,
            &format!("{token},admin,admin,\"system:masters\"\n"),
        )?;
    }
    let admin_token = std::fs::read_to_string(&tokens_file)?
        .lines()
        .find_map(|l| {
            let mut f = l.split(',');
            let token = f.next()?;
            (f.next()? == "admin").then(|| token.to_string())
        })
        .context("tokens.csv has no admin token")?;
    Ok(Credentials {
        ca_pem,
        cert_pem: cert.pem(),
        key_pem,
        tokens_file,
        admin_token,
    })
}

/// A kubeconfig for the admin user.
pub fn kubeconfig(server: &str, ca_pem: &str, token: &str) -> String {
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: ferry
  cluster:
    server: {server}
    certificate-authority-data: {ca}
users:
- name: admin
  user:
    token: {token}
contexts:
- name: ferry
  context:
    cluster: ferry
    user: admin
    namespace: default
current-context: ferry
"
    )
}
