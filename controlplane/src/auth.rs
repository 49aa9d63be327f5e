//! Who is calling, and may they do this.
//!
//! Authentication and authorization are two traits, as in kube-apiserver, so
//! per-node credentials (a token or client certificate per node) and a node or
//! RBAC authorizer can be added without touching request handling.

use std::collections::HashMap;
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserInfo {
    pub name: String,
    pub groups: Vec<String>,
}

/// What a request wants to do, in Kubernetes' authorization vocabulary.
#[derive(Debug, Clone)]
pub struct RequestAttributes<'a> {
    pub verb: &'a str,
    pub group: &'a str,
    pub resource: &'a str,
    pub subresource: Option<&'a str>,
    pub namespace: Option<&'a str>,
    pub name: Option<&'a str>,
    /// For non-resource URLs such as /version or /openapi/v3.
    pub path: &'a str,
}

pub trait Authenticator: Send + Sync {
    /// The user a bearer token belongs to, or None when it is not valid.
    fn authenticate(&self, bearer_token: &str) -> Option<UserInfo>;
}

pub trait Authorizer: Send + Sync {
    /// Ok to allow; Err with the reason to deny.
    fn authorize(&self, user: &UserInfo, attrs: &RequestAttributes<'_>) -> Result<(), String>;
}

/// kube-apiserver's static token file: `token,user,uid,"group1,group2"` per line.
pub struct StaticTokens {
    tokens: HashMap<String, UserInfo>,
}

impl StaticTokens {
    pub fn load(path: &Path) -> anyhow::Result<StaticTokens> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading token file {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| anyhow::anyhow!("token file {}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> anyhow::Result<StaticTokens> {
        let mut tokens = HashMap::new();
        for (n, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let mut fields = line.splitn(4, ',');
            let (Some(token), Some(user)) = (fields.next(), fields.next()) else {
                anyhow::bail!("line {}: expected token,user,uid[,\"groups\"]", n + 1);
            };
            let _uid = fields.next();
            let groups = fields
                .next()
                .map(|g| {
                    g.trim_matches('"')
                        .split(',')
                        .map(|s| s.trim().to_string())
                        .filter(|s| !s.is_empty())
                        .collect()
                })
                .unwrap_or_default();
            if token.len() < 16 {
                anyhow::bail!(
                    "line {}: token is too short (at least 16 characters)",
                    n + 1
                );
            }
            tokens.insert(
                token.to_string(),
                UserInfo {
                    name: user.to_string(),
                    groups,
                },
            );
        }
        Ok(StaticTokens { tokens })
    }
}

impl Authenticator for StaticTokens {
    fn authenticate(&self, bearer_token: &str) -> Option<UserInfo> {
        self.tokens.get(bearer_token).cloned()
    }
}

/// Allows every authenticated user everything (the admin-only stage; RBAC comes later).
pub struct AllowAuthenticated;

impl Authorizer for AllowAuthenticated {
    fn authorize(&self, _user: &UserInfo, _attrs: &RequestAttributes<'_>) -> Result<(), String> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_token_file_and_rejects_unknown_tokens() {
        let t =
            StaticTokens::parse("0123456789abcdef0123,admin,admin,\"system:masters\"\n").unwrap();
        let user = t.authenticate("0123456789abcdef0123").unwrap();
        assert_eq!(user.name, "admin");
        assert_eq!(user.groups, vec!["system:masters"]);
        assert!(t.authenticate("nope").is_none());
        assert!(StaticTokens::parse("short,admin,admin").is_err());
    }
}
