//! kube-apiserver's object validation (pkg/apis/*/validation and
//! apimachinery's util/validation): the checks that turn a well-formed but
//! meaningless object into a 422 with one `FieldError` per problem, using
//! kube's field paths and message wording so clients see familiar errors.
//!
//! Objects arrive defaulted and already decoded-checked against the Go types,
//! so JSON types are right; a missing field that defaulting would fill is
//! treated as "not set" rather than as an error.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Display;
use std::net::IpAddr;

use serde_json::{Map, Value};

/// One invalid field, as a `metav1.StatusCause`.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldError {
    /// Path of the field, e.g. `spec.ports[1].port`.
    pub field: String,
    pub reason: FieldReason,
    /// kube's error body without the field, e.g. `Required value`.
    pub message: String,
}

/// apimachinery's `field.ErrorType`s that this module produces.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldReason {
    Required,
    Invalid,
    Duplicate,
    NotSupported,
    Forbidden,
    TooLong,
    TooMany,
}

impl FieldReason {
    /// The `StatusCause.type` kube reports for this reason.
    pub fn as_cause_type(&self) -> &'static str {
        match self {
            FieldReason::Required => "FieldValueRequired",
            FieldReason::Invalid => "FieldValueInvalid",
            FieldReason::Duplicate => "FieldValueDuplicate",
            FieldReason::NotSupported => "FieldValueNotSupported",
            FieldReason::Forbidden => "FieldValueForbidden",
            FieldReason::TooLong => "FieldValueTooLong",
            FieldReason::TooMany => "FieldValueTooMany",
        }
    }
}

/// Validates `obj` of `kind`: a create when `old` is `None`, else an update.
pub fn validate(kind: &str, obj: &Value, old: Option<&Value>) -> Vec<FieldError> {
    let mut errs = Errors::default();
    validate_object_meta(&mut errs, field(obj, "metadata"), name_rule(kind));
    match kind {
        "Namespace" => validate_namespace(&mut errs, obj),
        "Service" => validate_service(&mut errs, obj, old),
        "Endpoints" => validate_endpoints(&mut errs, obj),
        "Pod" => validate_pod(&mut errs, obj, old),
        "Node" => validate_node(&mut errs, obj, old),
        "ConfigMap" => validate_config_map(&mut errs, obj, old),
        "Event" => validate_event(&mut errs, obj),
        "EndpointSlice" => validate_endpoint_slice(&mut errs, obj, old),
        "Deployment" | "ReplicaSet" | "DaemonSet" => validate_workload(&mut errs, kind, obj, old),
        "Lease" => validate_lease(&mut errs, obj),
        _ => {}
    }
    errs.0
}

// ---------------------------------------------------------------------------
// Name and value formats (apimachinery util/validation)
// ---------------------------------------------------------------------------

const DNS1123_LABEL_MAX: usize = 63;
const DNS1123_SUBDOMAIN_MAX: usize = 253;
const QUALIFIED_NAME_MAX: usize = 63;
const LABEL_VALUE_MAX: usize = 63;
const PORT_NAME_MAX: usize = 15;
const PORT_RANGE: &str = "must be between 1 and 65535, inclusive";
const NON_NEGATIVE: &str = "must be greater than or equal to 0";
const IMMUTABLE: &str = "field is immutable";
const VALID_IP: &str = "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)";
const VALID_CIDR: &str = "must be a valid CIDR value, (e.g. 10.9.8.0/24 or 2001:db8::/64)";
const PROTOCOLS: &[&str] = &["SCTP", "TCP", "UDP"];
const TAINT_EFFECTS: &[&str] = &["NoSchedule", "PreferNoSchedule", "NoExecute"];

/// DNS-1123 subdomain: `example.com`, at most 253 characters.
pub fn is_dns1123_subdomain(s: &str) -> Result<(), String> {
    first(dns1123_subdomain_errors(s))
}

/// DNS-1123 label: `my-name`, at most 63 characters.
pub fn is_dns1123_label(s: &str) -> Result<(), String> {
    first(dns1123_label_errors(s))
}

/// DNS-1035 label: like a DNS-1123 label but starting with a letter.
pub fn is_dns1035_label(s: &str) -> Result<(), String> {
    first(dns1035_label_errors(s))
}

/// Label keys and similar: `[prefix/]name`, prefix a DNS subdomain.
pub fn is_qualified_name(s: &str) -> Result<(), String> {
    first(qualified_name_errors(s))
}

/// Label values: empty or a short alphanumeric-edged name.
pub fn is_label_value(s: &str) -> Result<(), String> {
    first(label_value_errors(s))
}

fn first(errors: Vec<String>) -> Result<(), String> {
    errors.into_iter().next().map_or(Ok(()), Err)
}

/// kube's `RegexError`: the message, examples, and the regex.
fn regex_error(msg: &str, regex: &str, examples: &[&str]) -> String {
    let examples: String = examples
        .iter()
        .map(|e| format!("'{e}', "))
        .collect::<Vec<_>>()
        .join(" or ");
    if examples.is_empty() {
        format!("{msg} (regex used for validation is '{regex}')")
    } else {
        format!("{msg} (e.g. {examples}regex used for validation is '{regex}')")
    }
}

fn max_len_error(max: usize) -> String {
    format!("must be no more than {max} characters")
}

fn is_lower_alnum(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

/// `[a-z0-9]([-a-z0-9]*[a-z0-9])?`
fn matches_dns_label(s: &str) -> bool {
    s.starts_with(is_lower_alnum)
        && s.ends_with(is_lower_alnum)
        && s.chars().all(|c| is_lower_alnum(c) || c == '-')
}

/// `[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?`
fn matches_qualified_part(s: &str) -> bool {
    let alnum = |c: char| c.is_ascii_alphanumeric();
    s.starts_with(alnum)
        && s.ends_with(alnum)
        && s.chars().all(|c| alnum(c) || matches!(c, '-' | '_' | '.'))
}

fn dns1123_label_errors(s: &str) -> Vec<String> {
    let mut errors = Vec::new();
    if s.len() > DNS1123_LABEL_MAX {
        errors.push(max_len_error(DNS1123_LABEL_MAX));
    }
    if !matches_dns_label(s) {
        errors.push(regex_error(
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character",
            "[a-z0-9]([-a-z0-9]*[a-z0-9])?",
            &["my-name", "123-abc"],
        ));
    }
    errors
}

fn dns1123_subdomain_errors(s: &str) -> Vec<String> {
    let mut errors = Vec::new();
    if s.len() > DNS1123_SUBDOMAIN_MAX {
        errors.push(max_len_error(DNS1123_SUBDOMAIN_MAX));
    }
    if !s.split('.').all(matches_dns_label) {
        errors.push(regex_error(
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character",
            "[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*",
            &["example.com"],
        ));
    }
    errors
}

fn dns1035_label_errors(s: &str) -> Vec<String> {
    let mut errors = Vec::new();
    if s.len() > DNS1123_LABEL_MAX {
        errors.push(max_len_error(DNS1123_LABEL_MAX));
    }
    if !(matches_dns_label(s) && s.starts_with(|c: char| c.is_ascii_lowercase())) {
        errors.push(regex_error(
            "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character",
            "[a-z]([-a-z0-9]*[a-z0-9])?",
            &["my-name", "abc-123"],
        ));
    }
    errors
}

const QUALIFIED_NAME_MSG: &str = "must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character";
const QUALIFIED_NAME_REGEX: &str = "([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]";
const QUALIFIED_NAME_EXAMPLES: &[&str] = &["MyName", "my.name", "123-abc"];

fn qualified_name_errors(s: &str) -> Vec<String> {
    let mut errors = Vec::new();
    let parts: Vec<&str> = s.split('/').collect();
    let name = match parts.as_slice() {
        [name] => name,
        [prefix, name] => {
            if prefix.is_empty() {
                errors.push("prefix part must be non-empty".to_string());
            } else {
                let prefixed = dns1123_subdomain_errors(prefix).into_iter();
                errors.extend(prefixed.map(|m| format!("prefix part {m}")));
            }
            name
        }
        _ => {
            let shape = regex_error(
                QUALIFIED_NAME_MSG,
                QUALIFIED_NAME_REGEX,
                QUALIFIED_NAME_EXAMPLES,
            );
            return vec![format!(
                "a qualified name {shape} with an optional DNS subdomain prefix and '/' (e.g. 'example.com/MyName')"
            )];
        }
    };
    if name.is_empty() {
        errors.push("name part must be non-empty".to_string());
    } else if name.len() > QUALIFIED_NAME_MAX {
        errors.push(format!("name part {}", max_len_error(QUALIFIED_NAME_MAX)));
    }
    if !matches_qualified_part(name) {
        let shape = regex_error(
            QUALIFIED_NAME_MSG,
            QUALIFIED_NAME_REGEX,
            QUALIFIED_NAME_EXAMPLES,
        );
        errors.push(format!("name part {shape}"));
    }
    errors
}

fn label_value_errors(s: &str) -> Vec<String> {
    let mut errors = Vec::new();
    if s.len() > LABEL_VALUE_MAX {
        errors.push(max_len_error(LABEL_VALUE_MAX));
    }
    if !s.is_empty() && !matches_qualified_part(s) {
        errors.push(regex_error(
            "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character",
            "(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?",
            &["MyValue", "my_value", "12345"],
        ));
    }
    errors
}

/// IANA_SVC_NAME, used for named ports.
fn port_name_errors(s: &str) -> Vec<String> {
    let mut errors = Vec::new();
    if s.len() > PORT_NAME_MAX {
        errors.push(max_len_error(PORT_NAME_MAX));
    }
    if s.is_empty() || !s.chars().all(|c| is_lower_alnum(c) || c == '-') {
        errors
            .push("must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)".into());
    }
    if !s.chars().any(|c| c.is_ascii_lowercase()) {
        errors.push("must contain at least one letter (a-z)".into());
    }
    if s.contains("--") {
        errors.push("must not contain consecutive hyphens".into());
    }
    if s.starts_with('-') || s.ends_with('-') {
        errors.push("must not begin or end with a hyphen".into());
    }
    errors
}

/// Why `.` and `..`-prefixed names are refused: they would escape directories
/// when projected as files (config keys, env var files).
fn dot_prefix_errors(s: &str) -> Vec<String> {
    match s {
        "." => vec!["must not be '.'".into()],
        ".." => vec!["must not be '..'".into()],
        _ if s.starts_with("..") => vec!["must not start with '..'".into()],
        _ => Vec::new(),
    }
}

fn config_key_errors(s: &str) -> Vec<String> {
    let mut errors = Vec::new();
    if s.len() > DNS1123_SUBDOMAIN_MAX {
        errors.push(max_len_error(DNS1123_SUBDOMAIN_MAX));
    }
    if s.is_empty()
        || !s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        errors.push(regex_error(
            "a valid config key must consist of alphanumeric characters, '-', '_' or '.'",
            "[-._a-zA-Z0-9]+",
            &["key.name", "KEY_NAME", "key-name"],
        ));
    }
    errors.extend(dot_prefix_errors(s));
    errors
}

fn env_var_name_errors(s: &str) -> Vec<String> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    let mut errors = Vec::new();
    if !(s.chars().all(allowed) && s.starts_with(|c: char| allowed(c) && !c.is_ascii_digit())) {
        errors.push(regex_error(
            "a valid environment variable name must consist of alphabetic characters, digits, '_', '-', or '.', and must not start with a digit",
            "[-._a-zA-Z][-._a-zA-Z0-9]*",
            &["my.env-name", "MY_ENV.NAME", "MyEnvName1"],
        ));
    }
    errors.extend(dot_prefix_errors(s));
    errors
}

/// Names that only have to be usable as one URL path segment.
fn path_segment_errors(s: &str) -> Vec<String> {
    let mut errors = Vec::new();
    match s {
        "." => errors.push("may not be '.'".to_string()),
        ".." => errors.push("may not be '..'".to_string()),
        _ => {}
    }
    for bad in ["/", "%"] {
        if s.contains(bad) {
            errors.push(format!("may not contain '{bad}'"));
        }
    }
    errors
}

fn percent_errors(s: &str) -> Vec<String> {
    match s.strip_suffix('%') {
        Some(digits) if !digits.is_empty() && digits.chars().all(|c| c.is_ascii_digit()) => {
            Vec::new()
        }
        _ => vec![regex_error(
            "a valid percent string must be a numeric string followed by an ending '%'",
            "[0-9]+%",
            &["1%", "93%"],
        )],
    }
}

/// Parses `a.b.c.d/n` or `v6::/n`; host bits may be set, as in Go's ParseCIDR.
fn parse_cidr(s: &str) -> Option<IpAddr> {
    let (addr, bits) = s.split_once('/')?;
    let ip: IpAddr = addr.parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let digits_only =
        !bits.is_empty() && bits.len() <= 3 && bits.chars().all(|c| c.is_ascii_digit());
    (digits_only && bits.parse::<u32>().ok()? <= max).then_some(ip)
}

/// Addresses that can never be a real endpoint (kube's ValidateNonSpecialIP).
fn special_ip_errors(ip: IpAddr) -> Vec<String> {
    let mut errors = Vec::new();
    if ip.is_unspecified() {
        errors.push(format!("may not be unspecified ({ip})"));
    }
    if ip.is_loopback() {
        errors.push("may not be in the loopback range (127.0.0.0/8, ::1/128)".into());
    }
    let (link_local, link_local_multicast) = match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            (v4.is_link_local(), o[0] == 224 && o[1] == 0 && o[2] == 0)
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            (s[0] & 0xffc0 == 0xfe80, s[0] & 0xff0f == 0xff02)
        }
    };
    if link_local {
        errors.push("may not be in the link-local range (169.254.0.0/16, fe80::/10)".into());
    }
    if link_local_multicast {
        errors
            .push("may not be in the link-local multicast range (224.0.0.0/24, ff02::/10)".into());
    }
    errors
}

// ---------------------------------------------------------------------------
// Error collection and rendering (apimachinery field/errors.go)
// ---------------------------------------------------------------------------

#[derive(Default)]
struct Errors(Vec<FieldError>);

impl Errors {
    fn push(&mut self, field: impl Into<String>, reason: FieldReason, message: String) {
        let field = field.into();
        self.0.push(FieldError {
            field,
            reason,
            message,
        });
    }

    fn required(&mut self, field: impl Into<String>, detail: &str) {
        self.push(
            field,
            FieldReason::Required,
            with_detail("Required value".into(), detail),
        );
    }

    /// `shown` is the bad value already rendered the way Go's `%v`/`%q` would.
    fn invalid(&mut self, field: impl Into<String>, shown: impl Display, detail: &str) {
        let body = format!("Invalid value: {shown}");
        self.push(field, FieldReason::Invalid, with_detail(body, detail));
    }

    /// One Invalid per message, as kube emits for multi-message format checks.
    fn invalid_each(&mut self, field: &str, shown: &str, messages: Vec<String>) {
        for message in messages {
            self.invalid(field, shown, &message);
        }
    }

    /// kube's NotFound; reported as Invalid because FieldReason has no NotFound.
    fn not_found(&mut self, field: impl Into<String>, shown: impl Display) {
        self.push(field, FieldReason::Invalid, format!("Not found: {shown}"));
    }

    fn duplicate(&mut self, field: impl Into<String>, shown: impl Display) {
        self.push(
            field,
            FieldReason::Duplicate,
            format!("Duplicate value: {shown}"),
        );
    }

    fn not_supported(&mut self, field: impl Into<String>, shown: impl Display, supported: &[&str]) {
        let values: Vec<String> = supported.iter().map(|v| quote(v)).collect();
        let message = format!(
            "Unsupported value: {shown}: supported values: {}",
            values.join(", ")
        );
        self.push(field, FieldReason::NotSupported, message);
    }

    fn forbidden(&mut self, field: impl Into<String>, detail: &str) {
        self.push(
            field,
            FieldReason::Forbidden,
            with_detail("Forbidden".into(), detail),
        );
    }

    fn too_long(&mut self, field: impl Into<String>, max_bytes: usize) {
        let message = format!("Too long: must have at most {max_bytes} bytes");
        self.push(field, FieldReason::TooLong, message);
    }

    fn too_many(&mut self, field: impl Into<String>, actual: usize, max: usize) {
        let message = format!("Too many: {actual}: must have at most {max} items");
        self.push(field, FieldReason::TooMany, message);
    }

    /// Checks a string enum field that defaulting normally fills.
    fn one_of(&mut self, field: impl Into<String>, value: Option<&str>, supported: &[&str]) {
        if let Some(v) = value.filter(|v| !supported.contains(v)) {
            self.not_supported(field, quote(v), supported);
        }
    }

    fn non_negative(&mut self, field: impl Into<String>, value: Option<i64>) {
        if let Some(n) = value.filter(|n| *n < 0) {
            self.invalid(field, n, NON_NEGATIVE);
        }
    }

    fn port_number(&mut self, field: impl Into<String>, port: i64) {
        if !(1..=65535).contains(&port) {
            self.invalid(field, port, PORT_RANGE);
        }
    }

    fn protocol(&mut self, field: impl Into<String>, protocol: Option<&str>) {
        match protocol {
            Some("") => self.required(field, ""),
            other => self.one_of(field, other, PROTOCOLS),
        }
    }

    /// An int-or-string port: a number, or an IANA service name.
    fn port_number_or_name(&mut self, field: &str, port: Option<&Value>) {
        match port {
            Some(Value::String(name)) => {
                self.invalid_each(field, &quote(name), port_name_errors(name))
            }
            Some(n) => self.port_number(field, n.as_i64().unwrap_or(0)),
            None => {}
        }
    }

    fn labels(&mut self, field: &str, labels: &Value) {
        for (key, value) in entries(labels) {
            self.invalid_each(field, &quote(key), qualified_name_errors(key));
            let value = value.as_str().unwrap_or("");
            self.invalid_each(field, &quote(value), label_value_errors(value));
        }
    }
}

fn with_detail(body: String, detail: &str) -> String {
    if detail.is_empty() {
        body
    } else {
        format!("{body}: {detail}")
    }
}

/// Go's `%q` for the strings kube quotes in messages.
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A JSON value shown as kube would show the Go value: strings quoted,
/// numbers bare, structures as compact JSON.
fn show(v: &Value) -> String {
    match v {
        Value::String(s) => quote(s),
        Value::Null => "null".into(),
        other => other.to_string(),
    }
}

/// Go's `%#v` of a `map[string]string`, as in the selector mismatch message.
fn show_string_map(v: &Value) -> String {
    let Some(map) = v.as_object() else {
        return "map[string]string(nil)".into();
    };
    let sorted: BTreeMap<&String, &Value> = map.iter().collect();
    let pairs: Vec<String> = sorted
        .iter()
        .map(|(k, v)| format!("{}:{}", quote(k), quote(v.as_str().unwrap_or(""))))
        .collect();
    format!("map[string]string{{{}}}", pairs.join(", "))
}

// ---------------------------------------------------------------------------
// JSON access and field paths
// ---------------------------------------------------------------------------

static NULL: Value = Value::Null;

fn field<'a>(v: &'a Value, key: &str) -> &'a Value {
    v.get(key).unwrap_or(&NULL)
}

fn text<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

fn int(v: &Value, key: &str) -> Option<i64> {
    v.get(key).and_then(Value::as_i64)
}

fn list<'a>(v: &'a Value, key: &str) -> &'a [Value] {
    v.get(key)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

fn entries(v: &Value) -> impl Iterator<Item = (&String, &Value)> {
    v.as_object().into_iter().flat_map(Map::iter)
}

/// Present and not JSON null.
fn is_set(v: &Value, key: &str) -> bool {
    v.get(key).is_some_and(|x| !x.is_null())
}

fn at(parent: &str, child: &str) -> String {
    if parent.is_empty() {
        child.to_string()
    } else {
        format!("{parent}.{child}")
    }
}

fn index(parent: &str, i: usize) -> String {
    format!("{parent}[{i}]")
}

// ---------------------------------------------------------------------------
// ObjectMeta
// ---------------------------------------------------------------------------

const ANNOTATIONS_MAX_BYTES: usize = 256 * 1024;

#[derive(Clone, Copy)]
enum NameRule {
    Subdomain,
    Label,
    Dns1035,
    PathSegment,
}

fn name_rule(kind: &str) -> NameRule {
    match kind {
        "Namespace" => NameRule::Label,
        "Service" => NameRule::Dns1035,
        "Endpoints" | "Pod" | "Node" | "ConfigMap" | "Event" | "EndpointSlice" | "Deployment"
        | "ReplicaSet" | "DaemonSet" | "Lease" => NameRule::Subdomain,
        // Other kinds (RBAC roles, Scale, ...) only need a usable URL segment.
        _ => NameRule::PathSegment,
    }
}

fn name_errors(rule: NameRule, name: &str) -> Vec<String> {
    match rule {
        NameRule::Subdomain => dns1123_subdomain_errors(name),
        NameRule::Label => dns1123_label_errors(name),
        NameRule::Dns1035 => dns1035_label_errors(name),
        NameRule::PathSegment => path_segment_errors(name),
    }
}

fn validate_object_meta(errs: &mut Errors, meta: &Value, rule: NameRule) {
    if let Some(prefix) = text(meta, "generateName").filter(|p| !p.is_empty()) {
        // The random suffix follows the prefix, so a trailing '-' is fine.
        let masked = match prefix.strip_suffix('-') {
            Some(rest) if !rest.is_empty() => format!("{rest}a"),
            _ => prefix.to_string(),
        };
        errs.invalid_each(
            "metadata.generateName",
            &quote(prefix),
            name_errors(rule, &masked),
        );
    }
    match text(meta, "name").unwrap_or("") {
        "" => errs.required("metadata.name", "name or generateName is required"),
        name => errs.invalid_each("metadata.name", &quote(name), name_errors(rule, name)),
    }
    errs.non_negative("metadata.generation", int(meta, "generation"));
    validate_labels_and_annotations(errs, meta, "metadata");
    for finalizer in list(meta, "finalizers").iter().filter_map(Value::as_str) {
        errs.invalid_each(
            "metadata.finalizers",
            &quote(finalizer),
            qualified_name_errors(finalizer),
        );
    }
    validate_owner_references(errs, list(meta, "ownerReferences"));
}

fn validate_labels_and_annotations(errs: &mut Errors, meta: &Value, path: &str) {
    errs.labels(&at(path, "labels"), field(meta, "labels"));
    let annotations_path = at(path, "annotations");
    let mut total = 0;
    for (key, value) in entries(field(meta, "annotations")) {
        // Annotation keys are qualified names, except that case is free.
        errs.invalid_each(
            &annotations_path,
            &quote(key),
            qualified_name_errors(&key.to_lowercase()),
        );
        total += key.len() + value.as_str().map_or(0, str::len);
    }
    if total > ANNOTATIONS_MAX_BYTES {
        errs.too_long(annotations_path, ANNOTATIONS_MAX_BYTES);
    }
}

fn validate_owner_references(errs: &mut Errors, refs: &[Value]) {
    let path = "metadata.ownerReferences";
    for reference in refs {
        for (key, what) in [
            ("apiVersion", "version"),
            ("kind", "kind"),
            ("name", "name"),
            ("uid", "uid"),
        ] {
            let value = text(reference, key).unwrap_or("");
            if value.is_empty() {
                errs.invalid(
                    at(path, key),
                    quote(value),
                    &format!("{what} must not be empty"),
                );
            }
        }
    }
    let controllers = refs
        .iter()
        .filter(|r| field(r, "controller") == &Value::Bool(true));
    let names: Vec<String> = controllers
        .map(|r| {
            format!(
                "{}/{}",
                text(r, "kind").unwrap_or(""),
                text(r, "name").unwrap_or("")
            )
        })
        .collect();
    if names.len() > 1 {
        errs.invalid(
            path,
            show(&Value::Array(refs.to_vec())),
            &format!(
                "Only one reference can have Controller set to true. Found \"true\" in references for {}",
                names.join(" and ")
            ),
        );
    }
}

// ---------------------------------------------------------------------------
// Namespace, ConfigMap, Event, Lease
// ---------------------------------------------------------------------------

fn validate_namespace(errs: &mut Errors, ns: &Value) {
    let spec = field(ns, "spec");
    for finalizer in list(spec, "finalizers").iter().filter_map(Value::as_str) {
        errs.invalid_each(
            "spec.finalizers",
            &quote(finalizer),
            qualified_name_errors(finalizer),
        );
    }
}

const CONFIG_MAP_MAX_BYTES: usize = 1024 * 1024;

fn validate_config_map(errs: &mut Errors, cm: &Value, old: Option<&Value>) {
    if let Some(old) = old.filter(|o| field(o, "immutable") == &Value::Bool(true)) {
        validate_immutable_config_map_update(errs, cm, old);
    }
    let data = field(cm, "data");
    let binary = field(cm, "binaryData");
    let mut total = 0;
    for (key, value) in entries(data) {
        let path = format!("data[{key}]");
        errs.invalid_each(&path, &quote(key), config_key_errors(key));
        if binary.get(key).is_some() {
            errs.invalid(&path, quote(key), "duplicate of key present in binaryData");
        }
        total += value.as_str().map_or(0, str::len);
    }
    for (key, value) in entries(binary) {
        let path = format!("binaryData[{key}]");
        errs.invalid_each(&path, &quote(key), config_key_errors(key));
        if data.get(key).is_some() {
            errs.invalid(&path, quote(key), "duplicate of key present in data");
        }
        total += value.as_str().map_or(0, base64_decoded_len);
    }
    if total > CONFIG_MAP_MAX_BYTES {
        // kube reports whole-object size against the empty path, shown "[]".
        errs.too_long("[]", CONFIG_MAP_MAX_BYTES);
    }
}

/// A ConfigMap marked immutable keeps its data, and stays immutable.
fn validate_immutable_config_map_update(errs: &mut Errors, cm: &Value, old: &Value) {
    let detail = "field is immutable when `immutable` is set";
    if field(cm, "immutable") != &Value::Bool(true) {
        errs.forbidden("immutable", detail);
    }
    for key in ["data", "binaryData"] {
        if field(cm, key) != field(old, key) {
            errs.forbidden(key, detail);
        }
    }
}

/// Bytes that a base64 string decodes to (binaryData travels as base64).
fn base64_decoded_len(encoded: &str) -> usize {
    let padding = encoded.bytes().rev().take_while(|b| *b == b'=').count();
    (encoded.len() / 4 * 3).saturating_sub(padding)
}

fn validate_event(errs: &mut Errors, event: &Value) {
    let Some(involved) = event.get("involvedObject").filter(|v| !v.is_null()) else {
        errs.required("involvedObject", "");
        return;
    };
    let involved_ns = text(involved, "namespace").unwrap_or("");
    let event_ns = event
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or("");
    if !involved_ns.is_empty() && involved_ns != event_ns {
        errs.invalid(
            "involvedObject.namespace",
            quote(involved_ns),
            "does not match event.namespace",
        );
    }
}

fn validate_lease(errs: &mut Errors, lease: &Value) {
    let spec = field(lease, "spec");
    if let Some(n) = int(spec, "leaseDurationSeconds").filter(|n| *n <= 0) {
        errs.invalid("spec.leaseDurationSeconds", n, "must be greater than 0");
    }
    errs.non_negative("spec.leaseTransitions", int(spec, "leaseTransitions"));
}

// ---------------------------------------------------------------------------
// Service
// ---------------------------------------------------------------------------

const SERVICE_TYPES: &[&str] = &["ClusterIP", "ExternalName", "LoadBalancer", "NodePort"];
const MAX_AFFINITY_SECONDS: i64 = 86400;

fn validate_service(errs: &mut Errors, svc: &Value, old: Option<&Value>) {
    let spec = field(svc, "spec");
    let ty = text(spec, "type").unwrap_or("ClusterIP");
    let cluster_ip = text(spec, "clusterIP").unwrap_or("");
    let ports = list(spec, "ports");
    if ports.is_empty() && cluster_ip != "None" && ty != "ExternalName" {
        errs.required("spec.ports", "");
    }
    if ty == "ExternalName" {
        validate_external_name(errs, spec, old);
    }
    validate_service_ports(errs, ports);
    errs.labels("spec.selector", field(spec, "selector"));
    validate_session_affinity(errs, spec);
    validate_external_ips(errs, spec);
    errs.one_of("spec.type", Some(ty), SERVICE_TYPES);
    validate_node_ports(errs, ports, ty);
    validate_traffic_policies(errs, spec, ty);
    validate_cluster_ips(errs, spec, ty);
    if let Some(old) = old {
        validate_cluster_ip_unchanged(errs, spec, field(old, "spec"));
    }
}

fn validate_external_name(errs: &mut Errors, spec: &Value, old: Option<&Value>) {
    match text(spec, "externalName").unwrap_or("") {
        "" => errs.required("spec.externalName", ""),
        name => {
            // A trailing dot (fully qualified) is allowed.
            let bare = name.strip_suffix('.').unwrap_or(name);
            errs.invalid_each(
                "spec.externalName",
                &quote(name),
                dns1123_subdomain_errors(bare),
            );
        }
    }
    // An IP left over from the old type is dropped on the way to ExternalName.
    let old_ip = old
        .and_then(|o| o.pointer("/spec/clusterIP"))
        .and_then(Value::as_str);
    let ip = text(spec, "clusterIP").unwrap_or("");
    if !ip.is_empty() && Some(ip) != old_ip {
        errs.forbidden(
            "spec.clusterIPs",
            "may not be set for ExternalName services",
        );
    }
}

fn validate_service_ports(errs: &mut Errors, ports: &[Value]) {
    let names_required = ports.len() > 1;
    let mut names = HashSet::new();
    for (i, port) in ports.iter().enumerate() {
        let path = format!("spec.ports[{i}]");
        match text(port, "name").unwrap_or("") {
            "" if names_required => errs.required(at(&path, "name"), ""),
            "" => {}
            name => {
                errs.invalid_each(&at(&path, "name"), &quote(name), dns1123_label_errors(name));
                if !names.insert(name) {
                    errs.duplicate(at(&path, "name"), quote(name));
                }
            }
        }
        errs.port_number(at(&path, "port"), int(port, "port").unwrap_or(0));
        errs.protocol(at(&path, "protocol"), text(port, "protocol"));
        errs.port_number_or_name(&at(&path, "targetPort"), port.get("targetPort"));
        if let Some(node_port) = int(port, "nodePort").filter(|n| *n != 0) {
            errs.port_number(at(&path, "nodePort"), node_port);
        }
    }
}

fn validate_session_affinity(errs: &mut Errors, spec: &Value) {
    let affinity = text(spec, "sessionAffinity");
    errs.one_of("spec.sessionAffinity", affinity, &["ClientIP", "None"]);
    let config = field(spec, "sessionAffinityConfig");
    match affinity {
        Some("ClientIP") => validate_client_ip_config(errs, config),
        Some("None") if !config.is_null() => errs.invalid(
            "spec.sessionAffinityConfig",
            show(config),
            "must not be set when session affinity is None",
        ),
        _ => {}
    }
}

fn validate_client_ip_config(errs: &mut Errors, config: &Value) {
    let detail = "when session affinity type is ClientIP";
    if config.is_null() {
        return errs.required("spec.sessionAffinityConfig", detail);
    }
    let client_ip = field(config, "clientIP");
    if client_ip.is_null() {
        return errs.required("spec.sessionAffinityConfig.clientIP", detail);
    }
    let path = "spec.sessionAffinityConfig.clientIP.timeoutSeconds";
    match int(client_ip, "timeoutSeconds") {
        None => errs.required(path, detail),
        Some(t) if !(1..=MAX_AFFINITY_SECONDS).contains(&t) => errs.invalid(
            path,
            t,
            &format!("must be greater than 0 and less than {MAX_AFFINITY_SECONDS}"),
        ),
        Some(_) => {}
    }
}

fn validate_external_ips(errs: &mut Errors, spec: &Value) {
    for (i, ip) in list(spec, "externalIPs").iter().enumerate() {
        let ip = ip.as_str().unwrap_or("");
        validate_non_special_ip(errs, &index("spec.externalIPs", i), ip);
    }
}

/// A routable unicast address: parses, and is not loopback/link-local/unspecified.
fn validate_non_special_ip(errs: &mut Errors, path: &str, ip: &str) {
    match ip.parse::<IpAddr>() {
        Ok(addr) => errs.invalid_each(path, &quote(ip), special_ip_errors(addr)),
        Err(_) => errs.invalid(path, quote(ip), VALID_IP),
    }
}

fn validate_node_ports(errs: &mut Errors, ports: &[Value], ty: &str) {
    let node_ports = ports.iter().enumerate().filter_map(|(i, p)| {
        let n = int(p, "nodePort").filter(|n| *n != 0)?;
        Some((i, n, text(p, "protocol").unwrap_or("TCP")))
    });
    let mut seen_node_ports = HashSet::new();
    for (i, node_port, protocol) in node_ports {
        let path = format!("spec.ports[{i}].nodePort");
        if ty == "ClusterIP" {
            errs.forbidden(&path, "may not be used when `type` is 'ClusterIP'");
        } else if !seen_node_ports.insert((node_port, protocol)) {
            errs.duplicate(&path, node_port);
        }
    }
    let mut seen_ports = HashSet::new();
    for (i, port) in ports.iter().enumerate() {
        let key = format!(
            "{}/{}",
            text(port, "protocol").unwrap_or("TCP"),
            int(port, "port").unwrap_or(0)
        );
        if !seen_ports.insert(key.clone()) {
            errs.duplicate(index("spec.ports", i), quote(&key));
        }
    }
}

fn validate_traffic_policies(errs: &mut Errors, spec: &Value, ty: &str) {
    let external = text(spec, "externalTrafficPolicy").filter(|p| !p.is_empty());
    let has_external_ips = !list(spec, "externalIPs").is_empty();
    let externally_accessible =
        matches!(ty, "NodePort" | "LoadBalancer") || (ty == "ClusterIP" && has_external_ips);
    if externally_accessible {
        errs.one_of(
            "spec.externalTrafficPolicy",
            external,
            &["Cluster", "Local"],
        );
    } else if let Some(policy) = external.filter(|p| *p != "Cluster") {
        // "Cluster" is tolerated: it is what an old NodePort type leaves behind.
        errs.invalid(
            "spec.externalTrafficPolicy",
            quote(policy),
            "may only be set for externally-accessible services",
        );
    }
    let internal = text(spec, "internalTrafficPolicy");
    errs.one_of(
        "spec.internalTrafficPolicy",
        internal,
        &["Cluster", "Local"],
    );
}

fn validate_cluster_ips(errs: &mut Errors, spec: &Value, ty: &str) {
    if ty == "ExternalName" {
        return;
    }
    let primary = text(spec, "clusterIP").unwrap_or("");
    validate_cluster_ip(errs, "spec.clusterIPs[0]", primary);
    for (i, ip) in list(spec, "clusterIPs").iter().enumerate() {
        let ip = ip.as_str().unwrap_or("");
        if i == 0 && !primary.is_empty() && ip != primary {
            errs.invalid("spec.clusterIPs[0]", quote(ip), "must match `clusterIP`");
        } else if i > 0 || primary.is_empty() {
            validate_cluster_ip(errs, &index("spec.clusterIPs", i), ip);
        }
    }
}

fn validate_cluster_ip(errs: &mut Errors, path: &str, ip: &str) {
    if ip.is_empty() || ip == "None" {
        return;
    }
    match ip.parse::<IpAddr>() {
        Err(_) => errs.invalid(path, quote(ip), VALID_IP),
        // Ferry's service network is IPv4 (ipFamilies defaults to [IPv4]).
        Ok(IpAddr::V6(_)) => errs.invalid(
            path,
            quote(ip),
            "expected an IPv4 value as indicated by `ipFamilies[0]`",
        ),
        Ok(IpAddr::V4(_)) => {}
    }
}

/// clusterIP is immutable once set, except across ExternalName transitions.
/// An empty new value means "keep the old one" (the allocator carries it over).
fn validate_cluster_ip_unchanged(errs: &mut Errors, spec: &Value, old_spec: &Value) {
    let external = |s: &Value| text(s, "type") == Some("ExternalName");
    if external(spec) || external(old_spec) {
        return;
    }
    let old_ip = text(old_spec, "clusterIP").unwrap_or("");
    let new_ip = text(spec, "clusterIP").unwrap_or("");
    if !old_ip.is_empty() && !new_ip.is_empty() && new_ip != old_ip {
        errs.invalid("spec.clusterIP", quote(new_ip), IMMUTABLE);
    }
    let old_ips = list(old_spec, "clusterIPs");
    for (i, (new, old)) in list(spec, "clusterIPs").iter().zip(old_ips).enumerate() {
        if new != old {
            errs.invalid(
                index("spec.clusterIPs", i),
                show(new),
                "may not change once set",
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Endpoints and EndpointSlice
// ---------------------------------------------------------------------------

fn validate_endpoints(errs: &mut Errors, endpoints: &Value) {
    for (i, subset) in list(endpoints, "subsets").iter().enumerate() {
        let path = index("subsets", i);
        let addresses = list(subset, "addresses");
        let not_ready = list(subset, "notReadyAddresses");
        if addresses.is_empty() && not_ready.is_empty() {
            errs.required(&path, "must specify `addresses` or `notReadyAddresses`");
        }
        for (key, group) in [("addresses", addresses), ("notReadyAddresses", not_ready)] {
            for (j, address) in group.iter().enumerate() {
                validate_endpoint_address(errs, &index(&at(&path, key), j), address);
            }
        }
        let ports = list(subset, "ports");
        for (j, port) in ports.iter().enumerate() {
            validate_endpoint_port(errs, &index(&at(&path, "ports"), j), port, ports.len() > 1);
        }
    }
}

fn validate_endpoint_address(errs: &mut Errors, path: &str, address: &Value) {
    validate_non_special_ip(errs, &at(path, "ip"), text(address, "ip").unwrap_or(""));
    if let Some(hostname) = text(address, "hostname").filter(|h| !h.is_empty()) {
        errs.invalid_each(
            &at(path, "hostname"),
            &quote(hostname),
            dns1123_label_errors(hostname),
        );
    }
    if let Some(node) = text(address, "nodeName") {
        errs.invalid_each(
            &at(path, "nodeName"),
            &quote(node),
            dns1123_subdomain_errors(node),
        );
    }
}

fn validate_endpoint_port(errs: &mut Errors, path: &str, port: &Value, name_required: bool) {
    match text(port, "name").unwrap_or("") {
        "" if name_required => errs.required(at(path, "name"), ""),
        "" => {}
        name => errs.invalid_each(&at(path, "name"), &quote(name), dns1123_label_errors(name)),
    }
    errs.port_number(at(path, "port"), int(port, "port").unwrap_or(0));
    errs.protocol(at(path, "protocol"), text(port, "protocol"));
}

const ADDRESS_TYPES: &[&str] = &["FQDN", "IPv4", "IPv6"];
const MAX_SLICE_ENDPOINTS: usize = 1000;
const MAX_ENDPOINT_ADDRESSES: usize = 100;

fn validate_endpoint_slice(errs: &mut Errors, slice: &Value, old: Option<&Value>) {
    let address_type = text(slice, "addressType").unwrap_or("");
    if address_type.is_empty() {
        errs.required("addressType", "");
    } else {
        errs.one_of("addressType", Some(address_type), ADDRESS_TYPES);
    }
    validate_slice_endpoints(errs, list(slice, "endpoints"), address_type);
    validate_slice_ports(errs, list(slice, "ports"));
    if let Some(old_type) = old.and_then(|o| text(o, "addressType")) {
        if old_type != address_type {
            errs.invalid("addressType", quote(address_type), IMMUTABLE);
        }
    }
}

fn validate_slice_endpoints(errs: &mut Errors, endpoints: &[Value], address_type: &str) {
    if endpoints.len() > MAX_SLICE_ENDPOINTS {
        return errs.too_many("endpoints", endpoints.len(), MAX_SLICE_ENDPOINTS);
    }
    for (i, endpoint) in endpoints.iter().enumerate() {
        let path = index("endpoints", i);
        let addresses_path = at(&path, "addresses");
        let addresses = list(endpoint, "addresses");
        if addresses.is_empty() {
            errs.required(&addresses_path, "must contain at least 1 address");
        } else if addresses.len() > MAX_ENDPOINT_ADDRESSES {
            errs.too_many(&addresses_path, addresses.len(), MAX_ENDPOINT_ADDRESSES);
        }
        for (j, address) in addresses.iter().enumerate() {
            let address = address.as_str().unwrap_or("");
            validate_slice_address(errs, &index(&addresses_path, j), address, address_type);
        }
        if let Some(hostname) = text(endpoint, "hostname") {
            errs.invalid_each(
                &at(&path, "hostname"),
                &quote(hostname),
                dns1123_label_errors(hostname),
            );
        }
        if let Some(node) = text(endpoint, "nodeName") {
            errs.invalid_each(
                &at(&path, "nodeName"),
                &quote(node),
                dns1123_subdomain_errors(node),
            );
        }
    }
}

fn validate_slice_address(errs: &mut Errors, path: &str, address: &str, address_type: &str) {
    let parsed = address.parse::<IpAddr>().ok();
    match address_type {
        "IPv4" | "IPv6" => {
            let family_ok = match parsed {
                Some(IpAddr::V4(_)) => address_type == "IPv4",
                Some(IpAddr::V6(_)) => address_type == "IPv6",
                None => false,
            };
            match parsed.filter(|_| family_ok) {
                Some(ip) => errs.invalid_each(path, &quote(address), special_ip_errors(ip)),
                None => errs.invalid(
                    path,
                    quote(address),
                    &format!("must be a valid {address_type} address"),
                ),
            }
        }
        "FQDN" => validate_fqdn(errs, path, address),
        // Unknown types were reported on addressType; their addresses are opaque.
        _ => {}
    }
}

fn validate_fqdn(errs: &mut Errors, path: &str, name: &str) {
    if name.is_empty() {
        return errs.required(path, "");
    }
    let bare = name.strip_suffix('.').unwrap_or(name);
    errs.invalid_each(path, &quote(name), dns1123_subdomain_errors(bare));
    if !bare.contains('.') {
        errs.invalid(
            path,
            quote(name),
            "should be a domain with at least two segments separated by dots",
        );
    }
}

fn validate_slice_ports(errs: &mut Errors, ports: &[Value]) {
    let mut names = HashSet::new();
    for (i, port) in ports.iter().enumerate() {
        let path = index("ports", i);
        let name = text(port, "name").unwrap_or("");
        if !name.is_empty() {
            errs.invalid_each(&at(&path, "name"), &quote(name), dns1123_label_errors(name));
        }
        if !names.insert(name) {
            errs.duplicate(at(&path, "name"), quote(name));
        }
        errs.protocol(at(&path, "protocol"), text(port, "protocol"));
        // A slice port without a number means "all ports".
        if let Some(n) = int(port, "port") {
            errs.port_number(at(&path, "port"), n);
        }
    }
}

// ---------------------------------------------------------------------------
// Node
// ---------------------------------------------------------------------------

fn validate_node(errs: &mut Errors, node: &Value, old: Option<&Value>) {
    let spec = field(node, "spec");
    validate_taints(errs, list(spec, "taints"));
    if let Some(cidr) = text(spec, "podCIDR").filter(|c| !c.is_empty()) {
        if parse_cidr(cidr).is_none() {
            errs.invalid("spec.podCIDR", quote(cidr), VALID_CIDR);
        }
    }
    validate_pod_cidrs(errs, list(spec, "podCIDRs"));
    if let Some(old_spec) = old.map(|o| field(o, "spec")) {
        validate_node_spec_update(errs, spec, old_spec);
    }
}

fn validate_pod_cidrs(errs: &mut Errors, cidrs: &[Value]) {
    let mut families = Vec::new();
    for (i, cidr) in cidrs.iter().enumerate() {
        let cidr = cidr.as_str().unwrap_or("");
        match parse_cidr(cidr) {
            Some(ip) => families.push(ip.is_ipv4()),
            None => errs.invalid(index("spec.podCIDRs", i), quote(cidr), VALID_CIDR),
        }
    }
    // More than one CIDR is only for dual-stack: one per family.
    let dual_stack = families.len() == 2 && families[0] != families[1];
    if cidrs.len() > 1 && families.len() == cidrs.len() && !dual_stack {
        errs.invalid(
            "spec.podCIDRs",
            show(&Value::Array(cidrs.to_vec())),
            "may specify no more than one CIDR for each IP family",
        );
    }
}

/// podCIDRs and providerID may be set once, never changed.
fn validate_node_spec_update(errs: &mut Errors, spec: &Value, old_spec: &Value) {
    let old_cidrs = list(old_spec, "podCIDRs");
    if !old_cidrs.is_empty() && list(spec, "podCIDRs") != old_cidrs {
        errs.forbidden(
            "spec.podCIDRs",
            "node updates may not change podCIDR except from \"\" to valid",
        );
    }
    let old_provider = text(old_spec, "providerID").unwrap_or("");
    if !old_provider.is_empty() && text(spec, "providerID").unwrap_or("") != old_provider {
        errs.forbidden(
            "spec.providerID",
            "node updates may not change providerID except from \"\" to valid",
        );
    }
}

fn validate_taints(errs: &mut Errors, taints: &[Value]) {
    let mut seen = HashSet::new();
    for (i, taint) in taints.iter().enumerate() {
        let path = index("spec.taints", i);
        let key = text(taint, "key").unwrap_or("");
        errs.invalid_each(&at(&path, "key"), &quote(key), qualified_name_errors(key));
        let value = text(taint, "value").unwrap_or("");
        let value_errors = label_value_errors(value);
        if !value_errors.is_empty() {
            errs.invalid(at(&path, "value"), quote(value), &value_errors.join(";"));
        }
        let effect = text(taint, "effect").unwrap_or("");
        if effect.is_empty() {
            errs.required(at(&path, "effect"), "");
        } else {
            errs.one_of(at(&path, "effect"), Some(effect), TAINT_EFFECTS);
        }
        if !seen.insert((key, effect)) {
            let shown = show(taint);
            errs.push(
                &path,
                FieldReason::Duplicate,
                format!("Duplicate value: {shown}: taints must be unique by key and effect pair"),
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Pod and pod templates
// ---------------------------------------------------------------------------

const RESTART_POLICIES: &[&str] = &["Always", "OnFailure", "Never"];
const MAX_INT32: i64 = i32::MAX as i64;

fn validate_pod(errs: &mut Errors, pod: &Value, old: Option<&Value>) {
    let spec = field(pod, "spec");
    validate_pod_spec(errs, spec, "spec");
    if let Some(old) = old {
        validate_pod_spec_update(errs, spec, field(old, "spec"));
    }
}

fn validate_pod_spec(errs: &mut Errors, spec: &Value, path: &str) {
    let volumes = validate_volumes(errs, list(spec, "volumes"), &at(path, "volumes"));
    let host_network = field(spec, "hostNetwork") == &Value::Bool(true);
    let containers = list(spec, "containers");
    if containers.is_empty() {
        errs.required(at(path, "containers"), "");
    }
    // Names are unique across regular and init containers.
    let mut names = HashSet::new();
    for key in ["containers", "initContainers"] {
        let list_path = at(path, key);
        for (i, container) in list(spec, key).iter().enumerate() {
            let container_path = index(&list_path, i);
            let pod = PodContext {
                volumes: &volumes,
                host_network,
            };
            validate_container(errs, container, &container_path, &pod, &mut names);
        }
    }
    errs.one_of(
        at(path, "restartPolicy"),
        text(spec, "restartPolicy"),
        RESTART_POLICIES,
    );
    let dns_policies = ["ClusterFirstWithHostNet", "ClusterFirst", "Default", "None"];
    errs.one_of(
        at(path, "dnsPolicy"),
        text(spec, "dnsPolicy"),
        &dns_policies,
    );
    errs.labels(&at(path, "nodeSelector"), field(spec, "nodeSelector"));
    for key in ["serviceAccountName", "nodeName"] {
        if let Some(name) = text(spec, key).filter(|n| !n.is_empty()) {
            errs.invalid_each(&at(path, key), &quote(name), dns1123_subdomain_errors(name));
        }
    }
    for key in ["hostname", "subdomain"] {
        if let Some(name) = text(spec, key).filter(|n| !n.is_empty()) {
            errs.invalid_each(&at(path, key), &quote(name), dns1123_label_errors(name));
        }
    }
    if let Some(n) = int(spec, "activeDeadlineSeconds").filter(|n| !(1..=MAX_INT32).contains(n)) {
        let range = format!("must be between 1 and {MAX_INT32}, inclusive");
        errs.invalid(at(path, "activeDeadlineSeconds"), n, &range);
    }
    let grace = int(spec, "terminationGracePeriodSeconds");
    errs.non_negative(at(path, "terminationGracePeriodSeconds"), grace);
    validate_tolerations(errs, list(spec, "tolerations"), &at(path, "tolerations"));
}

/// What container checks need to know about the pod around them.
struct PodContext<'a> {
    volumes: &'a HashSet<String>,
    host_network: bool,
}

/// Returns the names of the declared volumes, for volumeMount checks.
fn validate_volumes(errs: &mut Errors, volumes: &[Value], path: &str) -> HashSet<String> {
    let mut names = HashSet::new();
    for (i, volume) in volumes.iter().enumerate() {
        let volume_path = index(path, i);
        let name_path = at(&volume_path, "name");
        match text(volume, "name").unwrap_or("") {
            "" => errs.required(&name_path, ""),
            name => {
                errs.invalid_each(&name_path, &quote(name), dns1123_label_errors(name));
                if !names.insert(name.to_string()) {
                    errs.duplicate(&name_path, quote(name));
                }
            }
        }
        // Every key but `name` is a volume source; only one may be given.
        let sources = entries(volume).filter(|(k, v)| *k != "name" && !v.is_null());
        for (source, _) in sources.skip(1) {
            errs.forbidden(
                at(&volume_path, source),
                "may not specify more than 1 volume type",
            );
        }
    }
    names
}

fn validate_container(
    errs: &mut Errors,
    container: &Value,
    path: &str,
    pod: &PodContext,
    names: &mut HashSet<String>,
) {
    let name_path = at(path, "name");
    match text(container, "name").unwrap_or("") {
        "" => errs.required(&name_path, ""),
        name => {
            errs.invalid_each(&name_path, &quote(name), dns1123_label_errors(name));
            if !names.insert(name.to_string()) {
                errs.duplicate(&name_path, quote(name));
            }
        }
    }
    match text(container, "image").unwrap_or("") {
        "" => errs.required(at(path, "image"), ""),
        image if image.trim() != image => errs.invalid(
            at(path, "image"),
            quote(image),
            "must not have leading or trailing whitespace",
        ),
        _ => {}
    }
    validate_container_ports(
        errs,
        list(container, "ports"),
        &at(path, "ports"),
        pod.host_network,
    );
    validate_env(errs, list(container, "env"), &at(path, "env"));
    validate_volume_mounts(
        errs,
        list(container, "volumeMounts"),
        &at(path, "volumeMounts"),
        pod.volumes,
    );
    for (key, kind) in [
        ("livenessProbe", ProbeKind::NeedsSingleSuccess),
        ("readinessProbe", ProbeKind::Readiness),
        ("startupProbe", ProbeKind::NeedsSingleSuccess),
    ] {
        if let Some(probe) = container.get(key).filter(|p| !p.is_null()) {
            validate_probe(errs, probe, &at(path, key), kind);
        }
    }
    let pull = text(container, "imagePullPolicy");
    errs.one_of(
        at(path, "imagePullPolicy"),
        pull,
        &["Always", "IfNotPresent", "Never"],
    );
    let message_policy = text(container, "terminationMessagePolicy");
    errs.one_of(
        at(path, "terminationMessagePolicy"),
        message_policy,
        &["File", "FallbackToLogsOnError"],
    );
}

fn validate_container_ports(errs: &mut Errors, ports: &[Value], path: &str, host_network: bool) {
    let mut names = HashSet::new();
    for (i, port) in ports.iter().enumerate() {
        let port_path = index(path, i);
        if let Some(name) = text(port, "name").filter(|n| !n.is_empty()) {
            let name_errors = port_name_errors(name);
            if !name_errors.is_empty() {
                errs.invalid_each(&at(&port_path, "name"), &quote(name), name_errors);
            } else if !names.insert(name) {
                errs.duplicate(at(&port_path, "name"), quote(name));
            }
        }
        let container_port = int(port, "containerPort").unwrap_or(0);
        if container_port == 0 {
            errs.required(at(&port_path, "containerPort"), "");
        } else {
            errs.port_number(at(&port_path, "containerPort"), container_port);
        }
        if let Some(host_port) = int(port, "hostPort").filter(|n| *n != 0) {
            errs.port_number(at(&port_path, "hostPort"), host_port);
            if host_network && host_port != container_port {
                errs.invalid(
                    at(&port_path, "hostPort"),
                    host_port,
                    "must match `containerPort` when `hostNetwork` is true",
                );
            }
        }
        errs.protocol(at(&port_path, "protocol"), text(port, "protocol"));
    }
}

fn validate_env(errs: &mut Errors, env: &[Value], path: &str) {
    for (i, var) in env.iter().enumerate() {
        let name_path = at(&index(path, i), "name");
        match text(var, "name").unwrap_or("") {
            "" => errs.required(&name_path, ""),
            name => errs.invalid_each(&name_path, &quote(name), env_var_name_errors(name)),
        }
    }
}

fn validate_volume_mounts(
    errs: &mut Errors,
    mounts: &[Value],
    path: &str,
    volumes: &HashSet<String>,
) {
    let mut mount_points = HashSet::new();
    for (i, mount) in mounts.iter().enumerate() {
        let mount_path = index(path, i);
        match text(mount, "name").unwrap_or("") {
            "" => errs.required(at(&mount_path, "name"), ""),
            name if !volumes.contains(name) => errs.not_found(at(&mount_path, "name"), quote(name)),
            _ => {}
        }
        match text(mount, "mountPath").unwrap_or("") {
            "" => errs.required(at(&mount_path, "mountPath"), ""),
            point if !mount_points.insert(point) => {
                errs.invalid(at(&mount_path, "mountPath"), quote(point), "must be unique")
            }
            _ => {}
        }
        if let Some(sub_path) = text(mount, "subPath").filter(|s| !s.is_empty()) {
            validate_local_descending_path(errs, &at(&mount_path, "subPath"), sub_path);
        }
    }
}

/// subPath must stay inside the volume.
fn validate_local_descending_path(errs: &mut Errors, path: &str, target: &str) {
    if target.starts_with('/') {
        errs.invalid(path, quote(target), "must be a relative path");
    }
    if target.split(['/', '\\']).any(|part| part == "..") {
        errs.invalid(path, quote(target), "must not contain '..'");
    }
}

#[derive(Clone, Copy, PartialEq)]
enum ProbeKind {
    /// Liveness and startup probes: successThreshold must be 1.
    NeedsSingleSuccess,
    Readiness,
}

const PROBE_HANDLERS: &[&str] = &["exec", "httpGet", "tcpSocket", "grpc"];
const PROBE_COUNTERS: &[&str] = &[
    "initialDelaySeconds",
    "timeoutSeconds",
    "periodSeconds",
    "successThreshold",
    "failureThreshold",
];

fn validate_probe(errs: &mut Errors, probe: &Value, path: &str, kind: ProbeKind) {
    let mut handlers = PROBE_HANDLERS.iter().filter(|h| is_set(probe, h));
    match handlers.next() {
        None => errs.required(path, "must specify a handler type"),
        Some(handler) => {
            validate_probe_handler(errs, handler, field(probe, handler), &at(path, handler))
        }
    }
    for extra in handlers {
        errs.forbidden(at(path, extra), "may not specify more than 1 handler type");
    }
    for counter in PROBE_COUNTERS {
        errs.non_negative(at(path, counter), int(probe, counter));
    }
    if let Some(n) = int(probe, "terminationGracePeriodSeconds").filter(|n| *n <= 0) {
        errs.invalid(
            at(path, "terminationGracePeriodSeconds"),
            n,
            "must be greater than 0",
        );
    }
    let success = int(probe, "successThreshold");
    if kind == ProbeKind::NeedsSingleSuccess && success.is_some_and(|n| n != 1) {
        errs.invalid(
            at(path, "successThreshold"),
            success.unwrap_or(0),
            "must be 1",
        );
    }
}

fn validate_probe_handler(errs: &mut Errors, handler: &str, spec: &Value, path: &str) {
    match handler {
        "exec" if list(spec, "command").is_empty() => errs.required(at(path, "command"), ""),
        "httpGet" => {
            errs.port_number_or_name(&at(path, "port"), spec.get("port"));
            errs.one_of(at(path, "scheme"), text(spec, "scheme"), &["HTTP", "HTTPS"]);
        }
        "tcpSocket" => errs.port_number_or_name(&at(path, "port"), spec.get("port")),
        "grpc" => errs.port_number(at(path, "port"), int(spec, "port").unwrap_or(0)),
        _ => {}
    }
}

fn validate_tolerations(errs: &mut Errors, tolerations: &[Value], path: &str) {
    for (i, toleration) in tolerations.iter().enumerate() {
        let item = index(path, i);
        let key = text(toleration, "key").unwrap_or("");
        let operator = text(toleration, "operator").unwrap_or("");
        let effect = text(toleration, "effect").unwrap_or("");
        if !key.is_empty() {
            errs.invalid_each(&at(&item, "key"), &quote(key), qualified_name_errors(key));
        } else if operator != "Exists" {
            // An empty key only makes sense as "tolerate everything".
            errs.invalid(
                at(&item, "operator"),
                quote(operator),
                "operator must be Exists when `key` is empty, which means \"match all values and all keys\"",
            );
        }
        if is_set(toleration, "tolerationSeconds") && effect != "NoExecute" {
            errs.invalid(
                at(&item, "effect"),
                quote(effect),
                "effect must be 'NoExecute' when `tolerationSeconds` is set",
            );
        }
        let value = text(toleration, "value").unwrap_or("");
        match operator {
            "" | "Equal" => {
                let value_errors = label_value_errors(value);
                if !value_errors.is_empty() {
                    errs.invalid(at(&item, "operator"), quote(value), &value_errors.join(";"));
                }
            }
            "Exists" if !value.is_empty() => errs.invalid(
                at(&item, "operator"),
                show(toleration),
                "value must be empty when `operator` is 'Exists'",
            ),
            "Exists" => {}
            other => errs.not_supported(at(&item, "operator"), quote(other), &["Equal", "Exists"]),
        }
        if !effect.is_empty() {
            errs.one_of(at(&item, "effect"), Some(effect), TAINT_EFFECTS);
        }
    }
}

const POD_UPDATE_FORBIDDEN: &str = "pod updates may not change fields other than `spec.containers[*].image`,`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to existing tolerations),`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)";

/// A running pod's spec is fixed except for images, a shrinking deadline and
/// added tolerations.
fn validate_pod_spec_update(errs: &mut Errors, spec: &Value, old_spec: &Value) {
    validate_active_deadline_update(errs, spec, old_spec);
    validate_only_added_tolerations(
        errs,
        list(spec, "tolerations"),
        list(old_spec, "tolerations"),
    );
    if &without_mutable_pod_fields(spec, old_spec) != old_spec {
        errs.forbidden("spec", POD_UPDATE_FORBIDDEN);
    }
}

fn validate_active_deadline_update(errs: &mut Errors, spec: &Value, old_spec: &Value) {
    let path = "spec.activeDeadlineSeconds";
    let Some(old) = int(old_spec, "activeDeadlineSeconds") else {
        return;
    };
    match int(spec, "activeDeadlineSeconds") {
        None => errs.invalid(
            path,
            "null",
            "must not update from a positive integer to nil value",
        ),
        Some(new) if new > old => {
            errs.invalid(path, new, "must be less than or equal to previous value")
        }
        Some(_) => {}
    }
}

fn validate_only_added_tolerations(errs: &mut Errors, new: &[Value], old: &[Value]) {
    let without_seconds = |t: &Value| {
        let mut t = t.clone();
        t.as_object_mut().map(|m| m.remove("tolerationSeconds"));
        t
    };
    let new_stripped: Vec<Value> = new.iter().map(without_seconds).collect();
    if old
        .iter()
        .any(|o| !new_stripped.contains(&without_seconds(o)))
    {
        errs.forbidden(
            "spec.tolerations",
            "existing toleration can not be modified except its tolerationSeconds",
        );
    }
}

/// `spec` with every field that may change copied from `old_spec`, so any
/// remaining difference is a forbidden change.
fn without_mutable_pod_fields(spec: &Value, old_spec: &Value) -> Value {
    let mut munged = spec.clone();
    for key in ["containers", "initContainers"] {
        let old_images: Vec<Value> = list(old_spec, key)
            .iter()
            .map(|c| field(c, "image").clone())
            .collect();
        let containers = munged.get_mut(key).and_then(Value::as_array_mut);
        for (container, image) in containers.into_iter().flatten().zip(old_images) {
            if let Some(c) = container.as_object_mut() {
                c.insert("image".into(), image);
            }
        }
    }
    let old_grace = int(old_spec, "terminationGracePeriodSeconds");
    let new_grace = int(spec, "terminationGracePeriodSeconds");
    let grace_reset = old_grace.is_some_and(|g| g < 0) && new_grace == Some(1);
    let mut mutable = vec!["activeDeadlineSeconds", "tolerations"];
    if grace_reset {
        mutable.push("terminationGracePeriodSeconds");
    }
    if let Some(m) = munged.as_object_mut() {
        for key in mutable {
            match old_spec.get(key) {
                Some(old) => m.insert(key.into(), old.clone()),
                None => m.remove(key),
            };
        }
    }
    munged
}

// ---------------------------------------------------------------------------
// Deployment, ReplicaSet, DaemonSet
// ---------------------------------------------------------------------------

fn validate_workload(errs: &mut Errors, kind: &str, obj: &Value, old: Option<&Value>) {
    let spec = field(obj, "spec");
    let daemon_set = kind == "DaemonSet";
    if !daemon_set {
        errs.non_negative("spec.replicas", int(spec, "replicas"));
    }
    let selector = field(spec, "selector");
    if selector.is_null() {
        errs.required("spec.selector", "");
    } else {
        validate_label_selector(errs, selector, "spec.selector");
        if selector_is_empty(selector) {
            let owner = if daemon_set {
                "daemonset"
            } else {
                "deployment"
            };
            errs.invalid(
                "spec.selector",
                show(selector),
                &format!("empty selector is invalid for {owner}"),
            );
        }
    }
    validate_template(
        errs,
        spec,
        selector,
        if daemon_set {
            "DaemonSet"
        } else {
            "ReplicaSet"
        },
    );
    match kind {
        "Deployment" => validate_deployment_strategy(errs, field(spec, "strategy")),
        "DaemonSet" => validate_daemon_set_strategy(errs, field(spec, "updateStrategy")),
        _ => {}
    }
    let min_ready = int(spec, "minReadySeconds");
    errs.non_negative("spec.minReadySeconds", min_ready);
    errs.non_negative(
        "spec.revisionHistoryLimit",
        int(spec, "revisionHistoryLimit"),
    );
    if let Some(deadline) = int(spec, "progressDeadlineSeconds") {
        errs.non_negative("spec.progressDeadlineSeconds", Some(deadline));
        if deadline <= min_ready.unwrap_or(0) {
            errs.invalid(
                "spec.progressDeadlineSeconds",
                deadline,
                "must be greater than minReadySeconds",
            );
        }
    }
    if let Some(old_selector) = old.and_then(|o| o.pointer("/spec/selector")) {
        if old_selector != selector {
            errs.invalid("spec.selector", show(selector), IMMUTABLE);
        }
    }
}

/// The pod template: its labels must be selected, and its pods must keep
/// running (restartPolicy Always, no deadline).
fn validate_template(errs: &mut Errors, spec: &Value, selector: &Value, owner: &str) {
    let template = field(spec, "template");
    let labels = template.pointer("/metadata/labels").unwrap_or(&NULL);
    let selector_usable = !selector.is_null() && !selector_is_empty(selector);
    if selector_usable && !selector_matches(selector, labels) {
        errs.invalid(
            "spec.template.metadata.labels",
            show_string_map(labels),
            "`selector` does not match template `labels`",
        );
    }
    validate_labels_and_annotations(errs, field(template, "metadata"), "spec.template.metadata");
    let pod_spec = field(template, "spec");
    validate_pod_spec(errs, pod_spec, "spec.template.spec");
    if let Some(policy) = text(pod_spec, "restartPolicy").filter(|p| *p != "Always") {
        errs.not_supported(
            "spec.template.spec.restartPolicy",
            quote(policy),
            &["Always"],
        );
    }
    if let Some(deadline) = int(pod_spec, "activeDeadlineSeconds") {
        errs.invalid(
            "spec.template.spec.activeDeadlineSeconds",
            deadline,
            &format!("activeDeadlineSeconds in {owner} is not Supported"),
        );
    }
}

fn selector_is_empty(selector: &Value) -> bool {
    let labels = field(selector, "matchLabels")
        .as_object()
        .is_none_or(Map::is_empty);
    labels && list(selector, "matchExpressions").is_empty()
}

fn validate_label_selector(errs: &mut Errors, selector: &Value, path: &str) {
    errs.labels(&at(path, "matchLabels"), field(selector, "matchLabels"));
    for (i, requirement) in list(selector, "matchExpressions").iter().enumerate() {
        let item = index(&at(path, "matchExpressions"), i);
        let values = list(requirement, "values");
        match text(requirement, "operator").unwrap_or("") {
            "In" | "NotIn" if values.is_empty() => errs.required(
                at(&item, "values"),
                "must be specified when `operator` is 'In' or 'NotIn'",
            ),
            "Exists" | "DoesNotExist" if !values.is_empty() => errs.forbidden(
                at(&item, "values"),
                "may not be specified when `operator` is 'Exists' or 'DoesNotExist'",
            ),
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            other => errs.invalid(
                at(&item, "operator"),
                quote(other),
                "not a valid selector operator",
            ),
        }
        let key = text(requirement, "key").unwrap_or("");
        errs.invalid_each(&at(&item, "key"), &quote(key), qualified_name_errors(key));
        for (j, value) in values.iter().enumerate() {
            let value = value.as_str().unwrap_or("");
            errs.invalid_each(
                &index(&at(&item, "values"), j),
                &quote(value),
                label_value_errors(value),
            );
        }
    }
}

/// Whether a metav1.LabelSelector selects an object with `labels`.
fn selector_matches(selector: &Value, labels: &Value) -> bool {
    let label = |key: &str| labels.get(key).and_then(Value::as_str);
    let match_labels = entries(field(selector, "matchLabels")).all(|(k, v)| label(k) == v.as_str());
    let expressions = list(selector, "matchExpressions")
        .iter()
        .all(|requirement| {
            let value = label(text(requirement, "key").unwrap_or(""));
            let listed = |v: &str| {
                list(requirement, "values")
                    .iter()
                    .any(|x| x.as_str() == Some(v))
            };
            match text(requirement, "operator").unwrap_or("") {
                "In" => value.is_some_and(listed),
                "NotIn" => !value.is_some_and(listed),
                "Exists" => value.is_some(),
                "DoesNotExist" => value.is_none(),
                _ => false,
            }
        });
    match_labels && expressions
}

fn validate_deployment_strategy(errs: &mut Errors, strategy: &Value) {
    let rolling = field(strategy, "rollingUpdate");
    match text(strategy, "type").unwrap_or("") {
        "Recreate" if !rolling.is_null() => errs.forbidden(
            "spec.strategy.rollingUpdate",
            "may not be specified when strategy `type` is 'Recreate'",
        ),
        "Recreate" => {}
        "RollingUpdate" if rolling.is_null() => errs.required(
            "spec.strategy.rollingUpdate",
            "this should be defaulted and never be nil",
        ),
        "RollingUpdate" => {
            let path = "spec.strategy.rollingUpdate";
            let (surge, unavailable) = validate_surge_and_unavailable(errs, rolling, path);
            if surge == 0 && unavailable == 0 {
                errs.invalid(
                    at(path, "maxUnavailable"),
                    show(field(rolling, "maxUnavailable")),
                    "may not be 0 when `maxSurge` is 0",
                );
            }
        }
        other => errs.not_supported(
            "spec.strategy",
            quote(other),
            &["Recreate", "RollingUpdate"],
        ),
    }
}

fn validate_daemon_set_strategy(errs: &mut Errors, strategy: &Value) {
    let rolling = field(strategy, "rollingUpdate");
    let path = "spec.updateStrategy.rollingUpdate";
    match text(strategy, "type").unwrap_or("") {
        "OnDelete" => {}
        "RollingUpdate" if rolling.is_null() => errs.required(path, ""),
        "RollingUpdate" => {
            // A DaemonSet rolls either by surging or by taking pods down, not both.
            match validate_surge_and_unavailable(errs, rolling, path) {
                (0, 0) => {
                    errs.required(at(path, "maxUnavailable"), "cannot be 0 when maxSurge is 0")
                }
                (surge, unavailable) if surge != 0 && unavailable != 0 => errs.invalid(
                    at(path, "maxSurge"),
                    show(field(rolling, "maxSurge")),
                    "may not be set when maxUnavailable is non-zero",
                ),
                _ => {}
            }
        }
        other => errs.not_supported(
            "spec.updateStrategy",
            quote(other),
            &["RollingUpdate", "OnDelete"],
        ),
    }
}

/// Checks maxSurge and maxUnavailable; returns their numeric parts.
fn validate_surge_and_unavailable(errs: &mut Errors, rolling: &Value, path: &str) -> (i64, i64) {
    let surge = validate_int_or_percent(errs, rolling.get("maxSurge"), &at(path, "maxSurge"));
    let unavailable_path = at(path, "maxUnavailable");
    let unavailable_value = rolling.get("maxUnavailable");
    let unavailable = validate_int_or_percent(errs, unavailable_value, &unavailable_path);
    if let Some(Value::String(percent)) = unavailable_value {
        if percent_errors(percent).is_empty() && unavailable > 100 {
            errs.invalid(
                &unavailable_path,
                quote(percent),
                "must not be greater than 100%",
            );
        }
    }
    (surge, unavailable)
}

/// An IntOrString that must be a non-negative count or "N%"; returns N.
fn validate_int_or_percent(errs: &mut Errors, value: Option<&Value>, path: &str) -> i64 {
    match value {
        Some(Value::String(s)) => {
            let percent_errs = percent_errors(s);
            let number = if percent_errs.is_empty() {
                s.trim_end_matches('%').parse().unwrap_or(i64::MAX)
            } else {
                s.parse().unwrap_or(0)
            };
            errs.invalid_each(path, &quote(s), percent_errs);
            number
        }
        Some(n) => {
            let n = n.as_i64().unwrap_or(0);
            errs.non_negative(path, Some(n));
            n
        }
        None => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn errors(kind: &str, obj: Value) -> Vec<FieldError> {
        validate(kind, &obj, None)
    }

    /// The (field, reason) pairs, for compact assertions.
    fn found(kind: &str, obj: Value) -> Vec<(String, FieldReason)> {
        errors(kind, obj)
            .into_iter()
            .map(|e| (e.field, e.reason))
            .collect()
    }

    fn has(list: &[(String, FieldReason)], field: &str, reason: FieldReason) -> bool {
        list.iter().any(|(f, r)| f == field && *r == reason)
    }

    fn meta(name: &str) -> Value {
        json!({"name": name, "namespace": "default"})
    }

    fn service(spec: Value) -> Value {
        json!({"metadata": meta("web"), "spec": spec})
    }

    fn port(n: i64) -> Value {
        json!({"port": n, "protocol": "TCP", "targetPort": n})
    }

    fn pod_spec() -> Value {
        json!({"containers": [{"name": "app", "image": "nginx"}], "restartPolicy": "Always"})
    }

    fn pod(spec: Value) -> Value {
        json!({"metadata": meta("p"), "spec": spec})
    }

    fn deployment(spec_patch: Value) -> Value {
        let mut spec = json!({
            "replicas": 1,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}}, "spec": pod_spec()},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}},
        });
        for (k, v) in spec_patch.as_object().unwrap() {
            spec[k] = v.clone();
        }
        json!({"metadata": meta("web"), "spec": spec})
    }

    #[test]
    fn cause_types_match_kube() {
        let table = [
            (FieldReason::Required, "FieldValueRequired"),
            (FieldReason::Invalid, "FieldValueInvalid"),
            (FieldReason::Duplicate, "FieldValueDuplicate"),
            (FieldReason::NotSupported, "FieldValueNotSupported"),
            (FieldReason::Forbidden, "FieldValueForbidden"),
            (FieldReason::TooLong, "FieldValueTooLong"),
            (FieldReason::TooMany, "FieldValueTooMany"),
        ];
        for (reason, cause) in table {
            assert_eq!(reason.as_cause_type(), cause);
        }
    }

    #[test]
    fn name_formats() {
        assert!(is_dns1123_subdomain("example.com").is_ok());
        assert!(is_dns1123_subdomain("a".repeat(254).as_str()).is_err());
        assert_eq!(
            is_dns1123_subdomain("Bad_Name").unwrap_err(),
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
        );
        assert!(is_dns1123_label("my-name").is_ok());
        assert!(is_dns1123_label("a.b").is_err());
        assert_eq!(
            is_dns1123_label("-x").unwrap_err(),
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
        );
        assert!(is_dns1035_label("abc-1").is_ok());
        assert!(is_dns1035_label("1abc").is_err());
        assert_eq!(
            is_dns1123_label(&"a".repeat(64)).unwrap_err(),
            "must be no more than 63 characters"
        );
    }

    #[test]
    fn qualified_names_and_label_values() {
        for ok in ["app", "example.com/App_1", "a.b-c"] {
            assert!(is_qualified_name(ok).is_ok(), "{ok}");
        }
        assert_eq!(
            is_qualified_name("/x").unwrap_err(),
            "prefix part must be non-empty"
        );
        assert!(is_qualified_name("a/b/c")
            .unwrap_err()
            .starts_with("a qualified name must consist"));
        assert!(is_qualified_name("Bad_/x")
            .unwrap_err()
            .starts_with("prefix part a lowercase RFC 1123"));
        assert!(is_qualified_name("-x")
            .unwrap_err()
            .starts_with("name part must consist"));
        assert!(is_label_value("").is_ok());
        assert!(is_label_value("v1.2_x").is_ok());
        assert!(is_label_value("bad value").is_err());
        assert_eq!(
            is_label_value(&"a".repeat(64)).unwrap_err(),
            "must be no more than 63 characters"
        );
    }

    #[test]
    fn name_is_required() {
        let errs = errors("ConfigMap", json!({"metadata": {"namespace": "default"}}));
        assert_eq!(errs[0].field, "metadata.name");
        assert_eq!(errs[0].reason, FieldReason::Required);
        assert_eq!(
            errs[0].message,
            "Required value: name or generateName is required"
        );
    }

    #[test]
    fn name_rules_depend_on_kind() {
        let table = [
            ("ConfigMap", "a.b", true),
            ("ConfigMap", "Bad_Name", false),
            ("Namespace", "a.b", false),
            ("Namespace", "ok-ns", true),
            ("Service", "1web", false),
            ("Service", "web-1", true),
            ("ClusterRole", "system:aggregate-to-admin", true),
            ("ClusterRole", "a/b", false),
        ];
        for (kind, name, ok) in table {
            let obj = json!({"metadata": {"name": name}, "spec": {"type": "ExternalName", "externalName": "x.example.com"}});
            let name_errors = found(kind, obj)
                .into_iter()
                .filter(|(f, _)| f == "metadata.name")
                .count();
            assert_eq!(name_errors == 0, ok, "{kind} {name}");
        }
    }

    #[test]
    fn invalid_name_message_quotes_the_value() {
        let errs = errors("ConfigMap", json!({"metadata": {"name": "Bad_Name"}}));
        assert_eq!(errs[0].field, "metadata.name");
        assert!(errs[0]
            .message
            .starts_with("Invalid value: \"Bad_Name\": a lowercase RFC 1123 subdomain"));
    }

    #[test]
    fn labels_and_annotations() {
        let m = json!({"name": "x", "labels": {"bad key!": "ok", "k": "bad value"}, "annotations": {"Example.com/Key": "v", "a b": "c"}});
        let f = found("ConfigMap", json!({"metadata": m}));
        assert_eq!(f.iter().filter(|(f, _)| f == "metadata.labels").count(), 2);
        assert_eq!(
            f.iter()
                .filter(|(f, _)| f == "metadata.annotations")
                .count(),
            1
        );
    }

    #[test]
    fn annotations_total_size_is_limited() {
        let big = "x".repeat(ANNOTATIONS_MAX_BYTES);
        let errs = errors(
            "ConfigMap",
            json!({"metadata": {"name": "x", "annotations": {"k": big}}}),
        );
        assert_eq!(errs[0].field, "metadata.annotations");
        assert_eq!(errs[0].reason, FieldReason::TooLong);
        assert_eq!(errs[0].message, "Too long: must have at most 262144 bytes");
    }

    #[test]
    fn service_ports_required_unless_headless_or_external_name() {
        assert!(has(
            &found("Service", service(json!({"type": "ClusterIP"}))),
            "spec.ports",
            FieldReason::Required
        ));
        assert!(found(
            "Service",
            service(json!({"type": "ClusterIP", "clusterIP": "None"}))
        )
        .is_empty());
        assert!(found(
            "Service",
            service(json!({"type": "ExternalName", "externalName": "db.example.com"}))
        )
        .is_empty());
    }

    #[test]
    fn service_port_range() {
        let errs = errors(
            "Service",
            service(json!({"type": "ClusterIP", "ports": [port(0)]})),
        );
        let e = errs
            .iter()
            .find(|e| e.field == "spec.ports[0].port")
            .unwrap();
        assert_eq!(
            e.message,
            "Invalid value: 0: must be between 1 and 65535, inclusive"
        );
    }

    #[test]
    fn service_protocol_must_be_supported() {
        let spec = json!({"type": "ClusterIP", "ports": [{"port": 80, "protocol": "XYZ", "targetPort": 80}]});
        let errs = errors("Service", service(spec));
        let e = errs
            .iter()
            .find(|e| e.field == "spec.ports[0].protocol")
            .unwrap();
        assert_eq!(e.reason, FieldReason::NotSupported);
        assert_eq!(
            e.message,
            "Unsupported value: \"XYZ\": supported values: \"SCTP\", \"TCP\", \"UDP\""
        );
    }

    #[test]
    fn service_duplicate_port_and_protocol() {
        let mut second = port(80);
        second["name"] = json!("b");
        let mut first = port(80);
        first["name"] = json!("a");
        let errs = errors(
            "Service",
            service(json!({"type": "ClusterIP", "ports": [first, second]})),
        );
        let e = errs.iter().find(|e| e.field == "spec.ports[1]").unwrap();
        assert_eq!(e.reason, FieldReason::Duplicate);
        assert_eq!(e.message, "Duplicate value: \"TCP/80\"");
    }

    #[test]
    fn service_port_names() {
        let mut named = port(81);
        named["name"] = json!("http");
        let mut same = port(82);
        same["name"] = json!("http");
        let f = found(
            "Service",
            service(json!({"type": "ClusterIP", "ports": [port(80), named, same]})),
        );
        assert!(has(&f, "spec.ports[0].name", FieldReason::Required));
        assert!(has(&f, "spec.ports[2].name", FieldReason::Duplicate));
        let mut bad = port(80);
        bad["name"] = json!("Bad_Name");
        let f = found(
            "Service",
            service(json!({"type": "ClusterIP", "ports": [bad]})),
        );
        assert!(has(&f, "spec.ports[0].name", FieldReason::Invalid));
    }

    #[test]
    fn service_target_port_number_or_name() {
        let table = [
            (json!(8080), true),
            (json!(0), false),
            (json!(70000), false),
            (json!("http"), true),
            (json!("8080"), false),
            (json!("a--b"), false),
            (json!("-web"), false),
            (json!("much-too-long-name"), false),
        ];
        for (target, ok) in table {
            let p = json!({"port": 80, "protocol": "TCP", "targetPort": target});
            let f = found(
                "Service",
                service(json!({"type": "ClusterIP", "ports": [p]})),
            );
            assert_eq!(
                !has(&f, "spec.ports[0].targetPort", FieldReason::Invalid),
                ok,
                "{target}"
            );
        }
    }

    #[test]
    fn node_port_forbidden_for_cluster_ip() {
        let mut p = port(80);
        p["nodePort"] = json!(30080);
        let errs = errors(
            "Service",
            service(json!({"type": "ClusterIP", "ports": [p.clone()]})),
        );
        let e = errs
            .iter()
            .find(|e| e.field == "spec.ports[0].nodePort")
            .unwrap();
        assert_eq!(e.reason, FieldReason::Forbidden);
        assert_eq!(
            e.message,
            "Forbidden: may not be used when `type` is 'ClusterIP'"
        );
        let spec = json!({"type": "NodePort", "externalTrafficPolicy": "Cluster", "ports": [p]});
        assert!(found("Service", service(spec)).is_empty());
        let mut out_of_range = port(80);
        out_of_range["nodePort"] = json!(70000);
        let spec = json!({"type": "NodePort", "ports": [out_of_range]});
        assert!(has(
            &found("Service", service(spec)),
            "spec.ports[0].nodePort",
            FieldReason::Invalid
        ));
    }

    #[test]
    fn service_type_must_be_supported() {
        let f = found(
            "Service",
            service(json!({"type": "Magic", "ports": [port(80)]})),
        );
        assert!(has(&f, "spec.type", FieldReason::NotSupported));
    }

    #[test]
    fn service_cluster_ip_format() {
        let table = [
            ("10.0.0.10", true),
            ("None", true),
            ("", true),
            ("bogus", false),
            ("fd00::1", false),
        ];
        for (ip, ok) in table {
            let f = found(
                "Service",
                service(json!({"type": "ClusterIP", "clusterIP": ip, "ports": [port(80)]})),
            );
            assert_eq!(f.is_empty(), ok, "{ip}");
        }
    }

    #[test]
    fn service_external_ips() {
        let spec = json!({"type": "ClusterIP", "ports": [port(80)], "externalIPs": ["1.2.3.4", "nope", "127.0.0.1"], "externalTrafficPolicy": "Cluster"});
        let f = found("Service", service(spec));
        assert!(!has(&f, "spec.externalIPs[0]", FieldReason::Invalid));
        assert!(has(&f, "spec.externalIPs[1]", FieldReason::Invalid));
        assert!(has(&f, "spec.externalIPs[2]", FieldReason::Invalid));
    }

    #[test]
    fn session_affinity() {
        let f = found(
            "Service",
            service(json!({"type": "ClusterIP", "ports": [port(80)], "sessionAffinity": "Sticky"})),
        );
        assert!(has(&f, "spec.sessionAffinity", FieldReason::NotSupported));
        let spec = json!({"type": "ClusterIP", "ports": [port(80)], "sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 86401}}});
        let errs = errors("Service", service(spec));
        let e = errs
            .iter()
            .find(|e| e.field == "spec.sessionAffinityConfig.clientIP.timeoutSeconds")
            .unwrap();
        assert_eq!(
            e.message,
            "Invalid value: 86401: must be greater than 0 and less than 86400"
        );
    }

    #[test]
    fn traffic_policies() {
        let spec =
            json!({"type": "ClusterIP", "ports": [port(80)], "externalTrafficPolicy": "Local"});
        assert!(has(
            &found("Service", service(spec)),
            "spec.externalTrafficPolicy",
            FieldReason::Invalid
        ));
        let spec =
            json!({"type": "NodePort", "ports": [port(80)], "externalTrafficPolicy": "Weird"});
        assert!(has(
            &found("Service", service(spec)),
            "spec.externalTrafficPolicy",
            FieldReason::NotSupported
        ));
        let spec =
            json!({"type": "ClusterIP", "ports": [port(80)], "internalTrafficPolicy": "Weird"});
        assert!(has(
            &found("Service", service(spec)),
            "spec.internalTrafficPolicy",
            FieldReason::NotSupported
        ));
    }

    #[test]
    fn external_name_is_required_and_a_subdomain() {
        let f = found("Service", service(json!({"type": "ExternalName"})));
        assert!(has(&f, "spec.externalName", FieldReason::Required));
        let f = found(
            "Service",
            service(json!({"type": "ExternalName", "externalName": "Bad_Host"})),
        );
        assert!(has(&f, "spec.externalName", FieldReason::Invalid));
        let f = found(
            "Service",
            service(json!({"type": "ExternalName", "externalName": "db.example.com."})),
        );
        assert!(f.is_empty());
    }

    #[test]
    fn service_selector_labels() {
        let spec =
            json!({"type": "ClusterIP", "ports": [port(80)], "selector": {"app": "bad value"}});
        assert!(has(
            &found("Service", service(spec)),
            "spec.selector",
            FieldReason::Invalid
        ));
    }

    #[test]
    fn cluster_ip_is_immutable_except_via_external_name() {
        let old =
            service(json!({"type": "ClusterIP", "clusterIP": "10.0.0.5", "ports": [port(80)]}));
        let changed =
            service(json!({"type": "ClusterIP", "clusterIP": "10.0.0.6", "ports": [port(80)]}));
        let errs = validate("Service", &changed, Some(&old));
        let e = errs.iter().find(|e| e.field == "spec.clusterIP").unwrap();
        assert_eq!(e.message, "Invalid value: \"10.0.0.6\": field is immutable");
        let omitted = service(json!({"type": "ClusterIP", "ports": [port(80)]}));
        assert!(validate("Service", &omitted, Some(&old)).is_empty());
        let to_external = service(json!({"type": "ExternalName", "externalName": "x.example.com"}));
        assert!(validate("Service", &to_external, Some(&old)).is_empty());
        let back =
            service(json!({"type": "ClusterIP", "clusterIP": "10.0.0.9", "ports": [port(80)]}));
        assert!(validate("Service", &back, Some(&to_external)).is_empty());
    }

    #[test]
    fn pod_needs_containers_with_names_and_images() {
        let f = found("Pod", pod(json!({"containers": []})));
        assert!(has(&f, "spec.containers", FieldReason::Required));
        let spec = json!({"containers": [{"name": "Bad_Name"}, {"name": "a", "image": "x"}],
            "initContainers": [{"name": "a", "image": "x"}]});
        let f = found("Pod", pod(spec));
        assert!(has(&f, "spec.containers[0].name", FieldReason::Invalid));
        assert!(has(&f, "spec.containers[0].image", FieldReason::Required));
        assert!(has(
            &f,
            "spec.initContainers[0].name",
            FieldReason::Duplicate
        ));
    }

    #[test]
    fn container_ports() {
        let ports = json!([
            {"containerPort": 0, "protocol": "TCP"},
            {"containerPort": 80, "hostPort": 70000, "protocol": "TCP", "name": "http"},
            {"containerPort": 81, "protocol": "ICMP", "name": "http"},
            {"containerPort": 82, "protocol": "TCP", "name": "Bad"},
        ]);
        let f = found(
            "Pod",
            pod(json!({"containers": [{"name": "a", "image": "x", "ports": ports}]})),
        );
        let p = "spec.containers[0].ports";
        assert!(has(
            &f,
            &format!("{p}[0].containerPort"),
            FieldReason::Required
        ));
        assert!(has(&f, &format!("{p}[1].hostPort"), FieldReason::Invalid));
        assert!(has(
            &f,
            &format!("{p}[2].protocol"),
            FieldReason::NotSupported
        ));
        assert!(has(&f, &format!("{p}[2].name"), FieldReason::Duplicate));
        assert!(has(&f, &format!("{p}[3].name"), FieldReason::Invalid));
    }

    #[test]
    fn env_names() {
        let env = json!([{"name": ""}, {"name": "1ABC"}, {"name": "MY_VAR.x-1"}, {"name": ".."}]);
        let f = found(
            "Pod",
            pod(json!({"containers": [{"name": "a", "image": "x", "env": env}]})),
        );
        assert!(has(
            &f,
            "spec.containers[0].env[0].name",
            FieldReason::Required
        ));
        assert!(has(
            &f,
            "spec.containers[0].env[1].name",
            FieldReason::Invalid
        ));
        assert!(!has(
            &f,
            "spec.containers[0].env[2].name",
            FieldReason::Invalid
        ));
        assert!(has(
            &f,
            "spec.containers[0].env[3].name",
            FieldReason::Invalid
        ));
    }

    #[test]
    fn restart_policy_must_be_supported() {
        let mut spec = pod_spec();
        spec["restartPolicy"] = json!("Sometimes");
        let errs = errors("Pod", pod(spec));
        let e = errs
            .iter()
            .find(|e| e.field == "spec.restartPolicy")
            .unwrap();
        assert_eq!(e.message, "Unsupported value: \"Sometimes\": supported values: \"Always\", \"OnFailure\", \"Never\"");
    }

    #[test]
    fn probes_need_exactly_one_handler() {
        let probe_with = |probe: Value| {
            found(
                "Pod",
                pod(json!({"containers": [{"name": "a", "image": "x", "livenessProbe": probe}]})),
            )
        };
        let p = "spec.containers[0].livenessProbe";
        assert!(has(
            &probe_with(json!({"periodSeconds": 10})),
            p,
            FieldReason::Required
        ));
        let both = probe_with(json!({"httpGet": {"port": 80}, "tcpSocket": {"port": 80}}));
        assert!(has(
            &both,
            &format!("{p}.tcpSocket"),
            FieldReason::Forbidden
        ));
        let negative =
            probe_with(json!({"exec": {"command": ["true"]}, "initialDelaySeconds": -1}));
        assert!(has(
            &negative,
            &format!("{p}.initialDelaySeconds"),
            FieldReason::Invalid
        ));
        let threshold = probe_with(json!({"tcpSocket": {"port": "http"}, "successThreshold": 2}));
        assert!(has(
            &threshold,
            &format!("{p}.successThreshold"),
            FieldReason::Invalid
        ));
        assert!(probe_with(json!({"grpc": {"port": 9000}})).is_empty());
    }

    #[test]
    fn volumes_and_mounts() {
        let spec = json!({
            "volumes": [{"name": "data", "emptyDir": {}}, {"name": "data", "emptyDir": {}}, {"name": "Bad", "emptyDir": {}, "hostPath": {"path": "/"}}],
            "containers": [{"name": "a", "image": "x", "volumeMounts": [
                {"name": "missing", "mountPath": "/m"}, {"name": "data"}, {"name": "data", "mountPath": "/m"}]}],
        });
        let errs = errors("Pod", pod(spec));
        let f: Vec<(String, FieldReason)> = errs
            .iter()
            .map(|e| (e.field.clone(), e.reason.clone()))
            .collect();
        assert!(has(&f, "spec.volumes[1].name", FieldReason::Duplicate));
        assert!(has(&f, "spec.volumes[2].name", FieldReason::Invalid));
        assert!(has(&f, "spec.volumes[2].hostPath", FieldReason::Forbidden));
        let missing = errs
            .iter()
            .find(|e| e.field == "spec.containers[0].volumeMounts[0].name")
            .unwrap();
        assert_eq!(missing.message, "Not found: \"missing\"");
        assert!(has(
            &f,
            "spec.containers[0].volumeMounts[1].mountPath",
            FieldReason::Required
        ));
        assert!(has(
            &f,
            "spec.containers[0].volumeMounts[2].mountPath",
            FieldReason::Invalid
        ));
    }

    #[test]
    fn node_selector_and_tolerations() {
        let mut spec = pod_spec();
        spec["nodeSelector"] = json!({"disk": "bad value"});
        spec["tolerations"] = json!([
            {"key": "k", "operator": "Sometimes"},
            {"key": "k", "operator": "Exists", "effect": "Never"},
            {"operator": "Equal", "value": "v"},
            {"key": "k", "operator": "Equal", "value": "v", "effect": "NoSchedule", "tolerationSeconds": 5},
            {"operator": "Exists"},
        ]);
        let f = found("Pod", pod(spec));
        assert!(has(&f, "spec.nodeSelector", FieldReason::Invalid));
        assert!(has(
            &f,
            "spec.tolerations[0].operator",
            FieldReason::NotSupported
        ));
        assert!(has(
            &f,
            "spec.tolerations[1].effect",
            FieldReason::NotSupported
        ));
        assert!(has(
            &f,
            "spec.tolerations[2].operator",
            FieldReason::Invalid
        ));
        assert!(has(&f, "spec.tolerations[3].effect", FieldReason::Invalid));
        assert!(!f
            .iter()
            .any(|(field, _)| field.starts_with("spec.tolerations[4]")));
    }

    #[test]
    fn grace_period_and_deadline() {
        let mut spec = pod_spec();
        spec["terminationGracePeriodSeconds"] = json!(-1);
        spec["activeDeadlineSeconds"] = json!(0);
        let f = found("Pod", pod(spec));
        assert!(has(
            &f,
            "spec.terminationGracePeriodSeconds",
            FieldReason::Invalid
        ));
        assert!(has(&f, "spec.activeDeadlineSeconds", FieldReason::Invalid));
    }

    #[test]
    fn pod_update_allows_image_deadline_and_added_tolerations() {
        let old = pod(
            json!({"containers": [{"name": "a", "image": "nginx:1"}], "activeDeadlineSeconds": 100,
            "tolerations": [{"key": "k", "operator": "Exists"}]}),
        );
        let new = pod(
            json!({"containers": [{"name": "a", "image": "nginx:2"}], "activeDeadlineSeconds": 50,
            "tolerations": [{"key": "k", "operator": "Exists"}, {"key": "j", "operator": "Exists"}]}),
        );
        assert!(validate("Pod", &new, Some(&old)).is_empty());
    }

    #[test]
    fn pod_update_rejects_other_changes() {
        let old = pod(pod_spec());
        let mut spec = pod_spec();
        spec["containers"][0]["ports"] = json!([{"containerPort": 80, "protocol": "TCP"}]);
        let errs = validate("Pod", &pod(spec), Some(&old));
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].field, "spec");
        assert_eq!(errs[0].reason, FieldReason::Forbidden);
        assert!(errs[0].message.starts_with(
            "Forbidden: pod updates may not change fields other than `spec.containers[*].image`"
        ));
        let old = pod(
            json!({"containers": [{"name": "a", "image": "x"}], "tolerations": [{"key": "k", "operator": "Exists"}], "activeDeadlineSeconds": 10}),
        );
        let new =
            pod(json!({"containers": [{"name": "a", "image": "x"}], "activeDeadlineSeconds": 20}));
        let f: Vec<String> = validate("Pod", &new, Some(&old))
            .into_iter()
            .map(|e| e.field)
            .collect();
        assert_eq!(f, vec!["spec.activeDeadlineSeconds", "spec.tolerations"]);
    }

    #[test]
    fn workload_selector_required_and_non_empty() {
        let f = found("Deployment", deployment(json!({"selector": null})));
        assert!(has(&f, "spec.selector", FieldReason::Required));
        let f = found("ReplicaSet", deployment(json!({"selector": {}})));
        assert!(has(&f, "spec.selector", FieldReason::Invalid));
    }

    #[test]
    fn selector_must_match_template_labels() {
        let errs = errors(
            "Deployment",
            deployment(json!({"selector": {"matchLabels": {"app": "api"}}})),
        );
        let e = errs
            .iter()
            .find(|e| e.field == "spec.template.metadata.labels")
            .unwrap();
        assert_eq!(e.message, "Invalid value: map[string]string{\"app\":\"web\"}: `selector` does not match template `labels`");
        let expr = json!({"matchExpressions": [{"key": "app", "operator": "In", "values": ["web", "api"]}]});
        assert!(found("Deployment", deployment(json!({"selector": expr}))).is_empty());
    }

    #[test]
    fn selector_expressions_are_validated() {
        let expr = json!({"matchExpressions": [
            {"key": "app", "operator": "In"},
            {"key": "app", "operator": "Exists", "values": ["x"]},
            {"key": "app", "operator": "Near"}]});
        let f = found("ReplicaSet", deployment(json!({"selector": expr})));
        assert!(has(
            &f,
            "spec.selector.matchExpressions[0].values",
            FieldReason::Required
        ));
        assert!(has(
            &f,
            "spec.selector.matchExpressions[1].values",
            FieldReason::Forbidden
        ));
        assert!(has(
            &f,
            "spec.selector.matchExpressions[2].operator",
            FieldReason::Invalid
        ));
    }

    #[test]
    fn workload_counts_are_non_negative() {
        let f = found(
            "Deployment",
            deployment(json!({"replicas": -1, "minReadySeconds": -1, "revisionHistoryLimit": -1})),
        );
        for field in [
            "spec.replicas",
            "spec.minReadySeconds",
            "spec.revisionHistoryLimit",
        ] {
            assert!(has(&f, field, FieldReason::Invalid), "{field}");
        }
    }

    #[test]
    fn template_restart_policy_must_be_always() {
        let mut d = deployment(json!({}));
        d["spec"]["template"]["spec"]["restartPolicy"] = json!("Never");
        let errs = errors("Deployment", d);
        let e = errs
            .iter()
            .find(|e| e.field == "spec.template.spec.restartPolicy")
            .unwrap();
        assert_eq!(e.reason, FieldReason::NotSupported);
        assert_eq!(
            e.message,
            "Unsupported value: \"Never\": supported values: \"Always\""
        );
    }

    #[test]
    fn template_pod_spec_uses_template_prefix() {
        let mut d = deployment(json!({}));
        d["spec"]["template"]["spec"]["containers"] = json!([]);
        assert!(has(
            &found("DaemonSet", d),
            "spec.template.spec.containers",
            FieldReason::Required
        ));
    }

    #[test]
    fn deployment_strategy() {
        let table = [
            (json!({"type": "Recreate"}), None),
            (
                json!({"type": "BlueGreen"}),
                Some(("spec.strategy", FieldReason::NotSupported)),
            ),
            (
                json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": "0%"}}),
                Some((
                    "spec.strategy.rollingUpdate.maxUnavailable",
                    FieldReason::Invalid,
                )),
            ),
            (
                json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "ten", "maxUnavailable": 1}}),
                Some(("spec.strategy.rollingUpdate.maxSurge", FieldReason::Invalid)),
            ),
            (
                json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": -1, "maxUnavailable": 1}}),
                Some(("spec.strategy.rollingUpdate.maxSurge", FieldReason::Invalid)),
            ),
            (
                json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": "150%"}}),
                Some((
                    "spec.strategy.rollingUpdate.maxUnavailable",
                    FieldReason::Invalid,
                )),
            ),
        ];
        for (strategy, expected) in table {
            let f = found("Deployment", deployment(json!({"strategy": strategy})));
            match expected {
                None => assert!(f.is_empty(), "{strategy}: {f:?}"),
                Some((field, reason)) => assert!(has(&f, field, reason), "{strategy}: {f:?}"),
            }
        }
        let zero =
            json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 0}});
        let errs = errors("Deployment", deployment(json!({"strategy": zero})));
        assert_eq!(
            errs[0].message,
            "Invalid value: 0: may not be 0 when `maxSurge` is 0"
        );
    }

    #[test]
    fn daemon_set_update_strategy() {
        let daemon_set = |strategy: Value| {
            let mut d = deployment(json!({"updateStrategy": strategy}));
            let spec = d["spec"].as_object_mut().unwrap();
            spec.remove("replicas");
            spec.remove("strategy");
            found("DaemonSet", d)
        };
        assert!(daemon_set(json!({"type": "OnDelete"})).is_empty());
        let rolling =
            json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}});
        assert!(daemon_set(rolling).is_empty());
        assert!(has(
            &daemon_set(json!({"type": "Replace"})),
            "spec.updateStrategy",
            FieldReason::NotSupported
        ));
        let both =
            json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 1}});
        assert!(has(
            &daemon_set(both),
            "spec.updateStrategy.rollingUpdate.maxSurge",
            FieldReason::Invalid
        ));
    }

    #[test]
    fn workload_selector_is_immutable() {
        let old = deployment(json!({}));
        let mut new = deployment(json!({"selector": {"matchLabels": {"app": "web", "tier": "x"}}}));
        new["spec"]["template"]["metadata"]["labels"]["tier"] = json!("x");
        let errs = validate("ReplicaSet", &new, Some(&old));
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].field, "spec.selector");
        assert!(errs[0].message.ends_with(": field is immutable"));
    }

    #[test]
    fn config_map_keys_and_size() {
        let cm = json!({"metadata": {"name": "c"}, "data": {"ok.key": "v", "bad key": "v", "..": "v", "dup": "v"},
            "binaryData": {"dup": "AAAA"}});
        let f = found("ConfigMap", cm);
        assert!(has(&f, "data[bad key]", FieldReason::Invalid));
        assert!(has(&f, "data[..]", FieldReason::Invalid));
        assert!(has(&f, "data[dup]", FieldReason::Invalid));
        assert!(has(&f, "binaryData[dup]", FieldReason::Invalid));
        assert!(!f.iter().any(|(field, _)| field == "data[ok.key]"));
        let big =
            json!({"metadata": {"name": "c"}, "data": {"a": "x".repeat(CONFIG_MAP_MAX_BYTES + 1)}});
        assert!(has(&found("ConfigMap", big), "[]", FieldReason::TooLong));
    }

    #[test]
    fn immutable_config_map_keeps_its_data() {
        let old = json!({"metadata": {"name": "c"}, "immutable": true, "data": {"a": "1"}});
        let same = old.clone();
        assert!(validate("ConfigMap", &same, Some(&old)).is_empty());
        let changed = json!({"metadata": {"name": "c"}, "data": {"a": "2"}});
        let fields: Vec<String> = validate("ConfigMap", &changed, Some(&old))
            .into_iter()
            .map(|e| e.field)
            .collect();
        assert_eq!(fields, vec!["immutable", "data"]);
        let mutable_old = json!({"metadata": {"name": "c"}, "data": {"a": "1"}});
        assert!(validate("ConfigMap", &changed, Some(&mutable_old)).is_empty());
    }

    #[test]
    fn endpoints_addresses_and_ports() {
        let ep = json!({"metadata": meta("web"), "subsets": [
            {"addresses": [{"ip": "10.1.2.3"}, {"ip": "127.0.0.1"}, {"ip": "169.254.1.1"}, {"ip": "x"}],
             "ports": [{"port": 0, "protocol": "TCP", "name": "a"}, {"port": 80, "protocol": "XYZ"}]},
            {"ports": [{"port": 80, "protocol": "TCP"}]}]});
        let f = found("Endpoints", ep);
        assert!(!has(&f, "subsets[0].addresses[0].ip", FieldReason::Invalid));
        for i in 1..=3 {
            assert!(
                has(
                    &f,
                    &format!("subsets[0].addresses[{i}].ip"),
                    FieldReason::Invalid
                ),
                "{i}"
            );
        }
        assert!(has(&f, "subsets[0].ports[0].port", FieldReason::Invalid));
        assert!(has(
            &f,
            "subsets[0].ports[1].protocol",
            FieldReason::NotSupported
        ));
        assert!(has(&f, "subsets[0].ports[1].name", FieldReason::Required));
        assert!(has(&f, "subsets[1]", FieldReason::Required));
    }

    #[test]
    fn endpoint_slice_rules() {
        let slice = json!({"metadata": meta("web-abc"), "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.0.0.1"]}, {"addresses": []}, {"addresses": ["fd00::1"]}],
            "ports": [{"name": "http", "port": 80, "protocol": "TCP"}, {"name": "http", "port": 0, "protocol": "TCP"}]});
        let f = found("EndpointSlice", slice);
        assert!(has(&f, "endpoints[1].addresses", FieldReason::Required));
        assert!(has(&f, "endpoints[2].addresses[0]", FieldReason::Invalid));
        assert!(has(&f, "ports[1].name", FieldReason::Duplicate));
        assert!(has(&f, "ports[1].port", FieldReason::Invalid));
        let bad_type = json!({"metadata": meta("s"), "addressType": "IPX", "endpoints": []});
        assert!(has(
            &found("EndpointSlice", bad_type),
            "addressType",
            FieldReason::NotSupported
        ));
        let fqdn = json!({"metadata": meta("s"), "addressType": "FQDN", "endpoints": [{"addresses": ["db.example.com", "Bad_"]}]});
        let f = found("EndpointSlice", fqdn);
        assert!(!has(&f, "endpoints[0].addresses[0]", FieldReason::Invalid));
        assert!(has(&f, "endpoints[0].addresses[1]", FieldReason::Invalid));
    }

    #[test]
    fn endpoint_slice_limits() {
        let many_addresses: Vec<String> = (0..101)
            .map(|i| format!("10.0.{}.{}", i / 250, i % 250 + 1))
            .collect();
        let slice = json!({"metadata": meta("s"), "addressType": "IPv4", "endpoints": [{"addresses": many_addresses}]});
        assert!(has(
            &found("EndpointSlice", slice),
            "endpoints[0].addresses",
            FieldReason::TooMany
        ));
        let endpoints: Vec<Value> = (0..1001)
            .map(|_| json!({"addresses": ["10.0.0.1"]}))
            .collect();
        let slice = json!({"metadata": meta("s"), "addressType": "IPv4", "endpoints": endpoints});
        let errs = errors("EndpointSlice", slice);
        assert_eq!(errs[0].field, "endpoints");
        assert_eq!(
            errs[0].message,
            "Too many: 1001: must have at most 1000 items"
        );
    }

    #[test]
    fn node_cidrs_and_taints() {
        let node = json!({"metadata": {"name": "n1"}, "spec": {
            "podCIDR": "10.244.0.0/33", "podCIDRs": ["10.244.0.0/24", "nope"],
            "taints": [{"key": "bad key", "effect": "NoSchedule"}, {"key": "k"}, {"key": "k", "effect": "Sometimes"},
                       {"key": "d", "effect": "NoExecute"}, {"key": "d", "effect": "NoExecute", "value": "x"}]}});
        let f = found("Node", node);
        assert!(has(&f, "spec.podCIDR", FieldReason::Invalid));
        assert!(has(&f, "spec.podCIDRs[1]", FieldReason::Invalid));
        assert!(has(&f, "spec.taints[0].key", FieldReason::Invalid));
        assert!(has(&f, "spec.taints[1].effect", FieldReason::Required));
        assert!(has(&f, "spec.taints[2].effect", FieldReason::NotSupported));
        assert!(has(&f, "spec.taints[4]", FieldReason::Duplicate));
        let ok = json!({"metadata": {"name": "n1"}, "spec": {"podCIDRs": ["10.244.0.0/24", "fd00::/64"]}});
        assert!(found("Node", ok).is_empty());
        let same_family = json!({"metadata": {"name": "n1"}, "spec": {"podCIDRs": ["10.244.0.0/24", "10.245.0.0/24"]}});
        assert!(has(
            &found("Node", same_family),
            "spec.podCIDRs",
            FieldReason::Invalid
        ));
    }

    #[test]
    fn lease_durations() {
        let lease = json!({"metadata": meta("l"), "spec": {"leaseDurationSeconds": 0, "leaseTransitions": -1}});
        let f = found("Lease", lease);
        assert!(has(&f, "spec.leaseDurationSeconds", FieldReason::Invalid));
        assert!(has(&f, "spec.leaseTransitions", FieldReason::Invalid));
        let ok = json!({"metadata": meta("l"), "spec": {"leaseDurationSeconds": 15, "leaseTransitions": 0}});
        assert!(found("Lease", ok).is_empty());
    }

    #[test]
    fn event_needs_involved_object_in_its_namespace() {
        let f = found("Event", json!({"metadata": meta("e.1")}));
        assert!(has(&f, "involvedObject", FieldReason::Required));
        let other_ns = json!({"metadata": meta("e.1"), "involvedObject": {"kind": "Pod", "name": "p", "namespace": "kube-system"}});
        assert!(has(
            &found("Event", other_ns),
            "involvedObject.namespace",
            FieldReason::Invalid
        ));
        let ok = json!({"metadata": meta("e.1"), "involvedObject": {"kind": "Node", "name": "n1"}});
        assert!(found("Event", ok).is_empty());
    }

    #[test]
    fn scale_and_unknown_kinds_check_metadata_only() {
        let scale = json!({"metadata": {"name": "web"}, "spec": {"replicas": -5}});
        assert!(found("Scale", scale).is_empty());
        assert!(has(
            &found("Widget", json!({"metadata": {}})),
            "metadata.name",
            FieldReason::Required
        ));
    }

    #[test]
    fn valid_objects_pass() {
        let svc = service(
            json!({"type": "ClusterIP", "ports": [port(80)], "selector": {"app": "web"},
            "sessionAffinity": "None", "internalTrafficPolicy": "Cluster"}),
        );
        assert!(found("Service", svc).is_empty());
        assert!(found("Pod", pod(pod_spec())).is_empty());
        assert!(found("Deployment", deployment(json!({}))).is_empty());
        assert!(found(
            "Namespace",
            json!({"metadata": {"name": "team-a"}, "spec": {"finalizers": ["kubernetes"]}})
        )
        .is_empty());
    }
}
