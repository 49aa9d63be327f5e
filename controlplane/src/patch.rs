//! The PATCH engine: JSON merge patch (RFC 7386), JSON patch (RFC 6902) and
//! Kubernetes strategic merge patch.
//!
//! Strategic merge patch mirrors k8s.io/apimachinery's `strategicpatch` as
//! kube-apiserver runs it (parallel delete lists merged, unmatched nulls
//! ignored). `kubectl apply` computes its three-way patch from the Go structs
//! compiled into it and relies on the server applying it the same way, list
//! ordering included. The Go struct tags that drive the merge
//! (`patchStrategy` / `patchMergeKey`) are restated in [`LIST_FIELDS`]; every
//! list not named there is replaced atomically, as kube does for untagged lists.

use std::fmt;

use serde_json::{Map, Number, Value};

type Object = Map<String, Value>;

/// The three patch flavours of the Kubernetes API, chosen by Content-Type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchType {
    /// `application/merge-patch+json` (RFC 7386).
    Merge,
    /// `application/json-patch+json` (RFC 6902).
    Json,
    /// `application/strategic-merge-patch+json`.
    Strategic,
}

impl PatchType {
    /// Maps a request Content-Type to a patch type; parameters such as
    /// `; charset=utf-8` are ignored.
    pub fn from_content_type(content_type: &str) -> Option<PatchType> {
        let media_type = content_type.split(';').next().unwrap_or_default().trim();
        match media_type.to_ascii_lowercase().as_str() {
            "application/merge-patch+json" => Some(PatchType::Merge),
            "application/json-patch+json" => Some(PatchType::Json),
            "application/strategic-merge-patch+json" => Some(PatchType::Strategic),
            _ => None,
        }
    }
}

impl fmt::Display for PatchType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PatchType::Merge => "merge",
            PatchType::Json => "json",
            PatchType::Strategic => "strategic merge",
        })
    }
}

/// Why a patch could not be applied. Every variant names where the problem is:
/// the operation index and JSON pointer for JSON patch, the field path for
/// strategic merge patch. All of them are the client's fault.
#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    #[error("{patch_type} patch must be a JSON object, got {found}")]
    PatchNotObject {
        patch_type: PatchType,
        found: &'static str,
    },
    #[error("json patch must be a JSON array of operations, got {found}")]
    PatchNotArray { found: &'static str },
    #[error("strategic merge patch target must be a JSON object, got {found}")]
    TargetNotObject { found: &'static str },
    /// A JSON patch operation too malformed to name its op and path.
    #[error("json patch op {index}: {reason}")]
    MalformedOperation { index: usize, reason: String },
    /// `index` counts operations from zero.
    #[error("json patch op {index} ({op} {path}): {reason}")]
    OperationFailed {
        index: usize,
        op: String,
        path: String,
        reason: JsonPatchFailure,
    },
    /// `path` is the field path in the object, e.g. `spec.containers[1].ports`
    /// (list indices are those of the patch).
    #[error("strategic merge patch at {path}: {reason}")]
    StrategicMerge {
        path: String,
        reason: StrategicMergeFailure,
    },
}

/// What went wrong in one JSON patch operation.
#[derive(Debug, thiserror::Error)]
pub enum JsonPatchFailure {
    #[error("unknown operation (expected add, remove, replace, move, copy or test)")]
    UnknownOp,
    #[error("missing {0:?} field")]
    MissingField(&'static str),
    #[error("invalid JSON pointer {pointer:?}: {problem}")]
    InvalidPointer {
        pointer: String,
        problem: &'static str,
    },
    #[error("path not found")]
    PathNotFound,
    #[error("{token:?} is not a valid array index")]
    InvalidIndex { token: String },
    #[error("array index {index} is out of range (array length {len})")]
    IndexOutOfRange { index: usize, len: usize },
    #[error("cannot descend into a {0} value")]
    NotAContainer(&'static str),
    #[error("cannot remove the whole document")]
    RemoveRoot,
    #[error("cannot move {from} into one of its own children")]
    MoveIntoChild { from: String },
    #[error("from {from}: {reason}")]
    InvalidFrom {
        from: String,
        reason: Box<JsonPatchFailure>,
    },
    #[error("test failed: expected {expected}, found {actual}")]
    TestFailed { expected: String, actual: String },
}

/// What went wrong while applying a strategic merge patch.
#[derive(Debug, thiserror::Error)]
pub enum StrategicMergeFailure {
    #[error("unknown patch directive {0:?}")]
    UnknownDirective(String),
    #[error("invalid $patch value {0} (expected \"replace\", \"merge\" or \"delete\")")]
    InvalidPatchDirective(String),
    #[error("directive {0:?} does not name a field")]
    DirectiveWithoutField(String),
    #[error("the value of {0} must be a list")]
    DirectiveNotList(String),
    #[error("field {0:?} is set by the patch but missing from $retainKeys")]
    NotInRetainKeys(String),
    #[error("list element has no merge key {0:?}")]
    MissingMergeKey(String),
    #[error("list of objects cannot be merged: the schema gives this field no merge key")]
    NoMergeKey,
    #[error("list elements mix different JSON types")]
    MixedElementTypes,
    #[error("lists of lists cannot be merged")]
    NestedList,
    #[error("not a list, so $setElementOrder cannot order it")]
    NotAList,
    #[error("the patch list is not in the order given by $setElementOrder")]
    OrderMismatch,
    #[error("$deleteFromPrimitiveList applies only to lists of primitive values")]
    NotAPrimitiveList,
}

/// Applies `patch` of `patch_type` to `target`, an object of Kubernetes `kind`
/// (the kind selects the strategic merge schema). `target` is never modified;
/// on error nothing is applied.
pub fn apply_patch(
    kind: &str,
    target: &Value,
    patch_type: PatchType,
    patch: &Value,
) -> Result<Value, PatchError> {
    match patch_type {
        PatchType::Merge => {
            if !patch.is_object() {
                return Err(PatchError::PatchNotObject {
                    patch_type,
                    found: json_type_name(patch),
                });
            }
            let mut patched = target.clone();
            json_merge_patch(&mut patched, patch);
            Ok(patched)
        }
        PatchType::Json => json_patch(target, patch),
        PatchType::Strategic => strategic_merge_patch(kind, target, patch),
    }
}

fn json_type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

// ---------------------------------------------------------------------------
// JSON merge patch (RFC 7386)
// ---------------------------------------------------------------------------

/// Applies an RFC 7386 merge patch in place: objects merge recursively, `null`
/// removes a key, anything else (arrays included) replaces the target.
pub fn json_merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch_fields) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Object::new());
    }
    if let Value::Object(target_fields) = target {
        for (key, value) in patch_fields {
            if value.is_null() {
                target_fields.shift_remove(key);
            } else {
                let slot = target_fields.entry(key.as_str()).or_insert(Value::Null);
                json_merge_patch(slot, value);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// JSON patch (RFC 6902)
// ---------------------------------------------------------------------------

/// Applies an RFC 6902 JSON patch. The operations run against a copy, so
/// either all of them apply or the error is returned and nothing changes.
pub fn json_patch(target: &Value, ops: &Value) -> Result<Value, PatchError> {
    let Value::Array(operations) = ops else {
        return Err(PatchError::PatchNotArray {
            found: json_type_name(ops),
        });
    };
    let mut document = target.clone();
    for (index, operation) in operations.iter().enumerate() {
        apply_operation(&mut document, index, operation)?;
    }
    Ok(document)
}

fn apply_operation(
    document: &mut Value,
    index: usize,
    operation: &Value,
) -> Result<(), PatchError> {
    let malformed = |reason: String| PatchError::MalformedOperation { index, reason };
    let Value::Object(fields) = operation else {
        return Err(malformed(format!(
            "operation must be a JSON object, got {}",
            json_type_name(operation)
        )));
    };
    let op = string_field(fields, "op")
        .ok_or_else(|| malformed("missing string field \"op\"".to_string()))?;
    let path = string_field(fields, "path")
        .ok_or_else(|| malformed(format!("{op}: missing string field \"path\"")))?;
    run_operation(document, op, path, fields).map_err(|reason| PatchError::OperationFailed {
        index,
        op: op.to_string(),
        path: path.to_string(),
        reason,
    })
}

fn string_field<'a>(fields: &'a Object, name: &str) -> Option<&'a str> {
    fields.get(name).and_then(Value::as_str)
}

fn run_operation(
    document: &mut Value,
    op: &str,
    path: &str,
    fields: &Object,
) -> Result<(), JsonPatchFailure> {
    let value = || {
        fields
            .get("value")
            .cloned()
            .ok_or(JsonPatchFailure::MissingField("value"))
    };
    let from = || string_field(fields, "from").ok_or(JsonPatchFailure::MissingField("from"));
    let target = parse_pointer(path)?;
    match op {
        "add" => add_value(document, &target, value()?),
        "remove" => remove_value(document, &target).map(drop),
        "replace" => {
            *lookup_mut(document, &target)? = value()?;
            Ok(())
        }
        "move" => move_value(document, from()?, &target),
        "copy" => copy_value(document, from()?, &target),
        "test" => test_value(document, &target, &value()?),
        _ => Err(JsonPatchFailure::UnknownOp),
    }
}

/// Splits a JSON pointer into unescaped reference tokens (`~1` is `/`, `~0` is `~`).
fn parse_pointer(pointer: &str) -> Result<Vec<String>, JsonPatchFailure> {
    let invalid = |problem| JsonPatchFailure::InvalidPointer {
        pointer: pointer.to_string(),
        problem,
    };
    if pointer.is_empty() {
        return Ok(Vec::new());
    }
    let Some(tokens) = pointer.strip_prefix('/') else {
        return Err(invalid("must be empty or start with '/'"));
    };
    tokens
        .split('/')
        .map(|token| {
            unescape_token(token).ok_or_else(|| invalid("'~' must be followed by '0' or '1'"))
        })
        .collect()
}

fn unescape_token(token: &str) -> Option<String> {
    let mut unescaped = String::with_capacity(token.len());
    let mut chars = token.chars();
    while let Some(c) = chars.next() {
        if c != '~' {
            unescaped.push(c);
            continue;
        }
        match chars.next() {
            Some('0') => unescaped.push('~'),
            Some('1') => unescaped.push('/'),
            _ => return None,
        }
    }
    Some(unescaped)
}

/// Parses an array index token: decimal digits without leading zeros.
fn parse_index(token: &str) -> Result<usize, JsonPatchFailure> {
    let well_formed =
        token.bytes().all(|b| b.is_ascii_digit()) && (token == "0" || !token.starts_with('0'));
    match token.parse() {
        Ok(index) if well_formed => Ok(index),
        _ => Err(JsonPatchFailure::InvalidIndex {
            token: token.to_string(),
        }),
    }
}

fn existing_index(token: &str, len: usize) -> Result<usize, JsonPatchFailure> {
    let index = parse_index(token)?;
    if index < len {
        Ok(index)
    } else {
        Err(JsonPatchFailure::IndexOutOfRange { index, len })
    }
}

fn lookup<'a>(document: &'a Value, tokens: &[String]) -> Result<&'a Value, JsonPatchFailure> {
    tokens.iter().try_fold(document, |node, token| match node {
        Value::Object(fields) => fields.get(token).ok_or(JsonPatchFailure::PathNotFound),
        Value::Array(items) => Ok(&items[existing_index(token, items.len())?]),
        scalar => Err(JsonPatchFailure::NotAContainer(json_type_name(scalar))),
    })
}

fn lookup_mut<'a>(
    document: &'a mut Value,
    tokens: &[String],
) -> Result<&'a mut Value, JsonPatchFailure> {
    tokens.iter().try_fold(document, |node, token| match node {
        Value::Object(fields) => fields.get_mut(token).ok_or(JsonPatchFailure::PathNotFound),
        Value::Array(items) => {
            let index = existing_index(token, items.len())?;
            Ok(&mut items[index])
        }
        scalar => Err(JsonPatchFailure::NotAContainer(json_type_name(scalar))),
    })
}

fn add_value(
    document: &mut Value,
    tokens: &[String],
    value: Value,
) -> Result<(), JsonPatchFailure> {
    let Some((last, parent)) = tokens.split_last() else {
        *document = value;
        return Ok(());
    };
    match lookup_mut(document, parent)? {
        Value::Object(fields) => {
            fields.insert(last.clone(), value);
            Ok(())
        }
        Value::Array(items) => {
            let index = if last == "-" {
                items.len()
            } else {
                parse_index(last)?
            };
            if index > items.len() {
                return Err(JsonPatchFailure::IndexOutOfRange {
                    index,
                    len: items.len(),
                });
            }
            items.insert(index, value);
            Ok(())
        }
        scalar => Err(JsonPatchFailure::NotAContainer(json_type_name(scalar))),
    }
}

fn remove_value(document: &mut Value, tokens: &[String]) -> Result<Value, JsonPatchFailure> {
    let Some((last, parent)) = tokens.split_last() else {
        return Err(JsonPatchFailure::RemoveRoot);
    };
    match lookup_mut(document, parent)? {
        Value::Object(fields) => fields
            .shift_remove(last)
            .ok_or(JsonPatchFailure::PathNotFound),
        Value::Array(items) => {
            let index = existing_index(last, items.len())?;
            Ok(items.remove(index))
        }
        scalar => Err(JsonPatchFailure::NotAContainer(json_type_name(scalar))),
    }
}

/// Attributes a failure to the operation's `from` pointer.
fn blame_from(from: &str, reason: JsonPatchFailure) -> JsonPatchFailure {
    JsonPatchFailure::InvalidFrom {
        from: from.to_string(),
        reason: Box::new(reason),
    }
}

fn move_value(document: &mut Value, from: &str, target: &[String]) -> Result<(), JsonPatchFailure> {
    let source = parse_pointer(from).map_err(|reason| blame_from(from, reason))?;
    if source.as_slice() == target {
        // Moving a value onto itself changes nothing, but the value must exist.
        return lookup(document, &source)
            .map(drop)
            .map_err(|reason| blame_from(from, reason));
    }
    if target.starts_with(&source) {
        return Err(JsonPatchFailure::MoveIntoChild {
            from: from.to_string(),
        });
    }
    let value = remove_value(document, &source).map_err(|reason| blame_from(from, reason))?;
    add_value(document, target, value)
}

fn copy_value(document: &mut Value, from: &str, target: &[String]) -> Result<(), JsonPatchFailure> {
    let value = parse_pointer(from)
        .and_then(|source| lookup(document, &source).cloned())
        .map_err(|reason| blame_from(from, reason))?;
    add_value(document, target, value)
}

fn test_value(
    document: &Value,
    target: &[String],
    expected: &Value,
) -> Result<(), JsonPatchFailure> {
    let actual = lookup(document, target)?;
    if json_equal(actual, expected) {
        Ok(())
    } else {
        Err(JsonPatchFailure::TestFailed {
            expected: expected.to_string(),
            actual: actual.to_string(),
        })
    }
}

/// JSON equality as RFC 6902 `test` defines it: numbers compare by value
/// (`1` equals `1.0`), objects ignore member order.
fn json_equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => numbers_equal(x, y),
        (Value::Array(xs), Value::Array(ys)) => {
            xs.len() == ys.len() && xs.iter().zip(ys).all(|(x, y)| json_equal(x, y))
        }
        (Value::Object(xs), Value::Object(ys)) => {
            xs.len() == ys.len()
                && xs
                    .iter()
                    .all(|(key, x)| ys.get(key).is_some_and(|y| json_equal(x, y)))
        }
        _ => a == b,
    }
}

fn numbers_equal(x: &Number, y: &Number) -> bool {
    if let (Some(x), Some(y)) = (x.as_i64(), y.as_i64()) {
        return x == y;
    }
    if let (Some(x), Some(y)) = (x.as_u64(), y.as_u64()) {
        return x == y;
    }
    x.as_f64() == y.as_f64()
}

// ---------------------------------------------------------------------------
// Strategic merge patch: schema
// ---------------------------------------------------------------------------

/// How a list field is patched, from its Go struct tags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ListStrategy {
    /// No `patchStrategy`: the patch value replaces the list.
    Atomic,
    /// `patchStrategy:"merge" patchMergeKey:"<key>"`: objects matched by key.
    MergeByKey(&'static str),
    /// `patchStrategy:"merge"` on a list of primitives: set union.
    MergePrimitive,
}

impl ListStrategy {
    fn merge_key(self) -> Option<&'static str> {
        match self {
            ListStrategy::MergeByKey(key) => Some(key),
            ListStrategy::Atomic | ListStrategy::MergePrimitive => None,
        }
    }
}

/// The Kubernetes API structs that own merge-strategy lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ApiStruct {
    ObjectMeta,
    PodSpec,
    /// Container, and EphemeralContainer which shares its list fields.
    Container,
    PodStatus,
    NodeSpec,
    NodeStatus,
    ServiceSpec,
    /// Any status whose only tagged list is `conditions` keyed by `type`.
    ConditionsStatus,
    ServiceAccount,
}

/// Go struct tags (k8s.io/api, as compiled into kubectl v1.32) of every list
/// field with a patch strategy in the supported kinds. `retainKeys` in a
/// strategy only matters to the client computing the patch, so it is omitted.
const LIST_FIELDS: &[(ApiStruct, &str, ListStrategy)] = {
    use ApiStruct::*;
    use ListStrategy::*;
    &[
        (ObjectMeta, "finalizers", MergePrimitive),
        (ObjectMeta, "ownerReferences", MergeByKey("uid")),
        (PodSpec, "volumes", MergeByKey("name")),
        (PodSpec, "initContainers", MergeByKey("name")),
        (PodSpec, "containers", MergeByKey("name")),
        (PodSpec, "ephemeralContainers", MergeByKey("name")),
        (PodSpec, "imagePullSecrets", MergeByKey("name")),
        (PodSpec, "hostAliases", MergeByKey("ip")),
        (
            PodSpec,
            "topologySpreadConstraints",
            MergeByKey("topologyKey"),
        ),
        (PodSpec, "resourceClaims", MergeByKey("name")),
        (PodSpec, "schedulingGates", MergeByKey("name")),
        (Container, "ports", MergeByKey("containerPort")),
        (Container, "env", MergeByKey("name")),
        (Container, "volumeMounts", MergeByKey("mountPath")),
        (Container, "volumeDevices", MergeByKey("devicePath")),
        (PodStatus, "conditions", MergeByKey("type")),
        (PodStatus, "podIPs", MergeByKey("ip")),
        (PodStatus, "hostIPs", MergeByKey("ip")),
        (PodStatus, "resourceClaimStatuses", MergeByKey("name")),
        (NodeSpec, "podCIDRs", MergePrimitive),
        (NodeStatus, "conditions", MergeByKey("type")),
        (NodeStatus, "addresses", MergeByKey("type")),
        (ServiceSpec, "ports", MergeByKey("port")),
        (ConditionsStatus, "conditions", MergeByKey("type")),
        (ServiceAccount, "secrets", MergeByKey("name")),
    ]
};

/// Kinds whose `status` is a [`ApiStruct::ConditionsStatus`].
const KINDS_WITH_CONDITIONS_STATUS: &[&str] = &[
    "Namespace",
    "Service",
    "Deployment",
    "ReplicaSet",
    "DaemonSet",
    "StatefulSet",
    "ReplicationController",
    "Job",
];

const CONTAINER_LISTS: &[&str] = &["containers", "initContainers", "ephemeralContainers"];

/// The strategy of the list at `path` (field names from the object root, list
/// indices skipped) in an object of `kind`.
fn list_strategy(kind: &str, path: &[&str]) -> ListStrategy {
    let Some((field, owner_path)) = path.split_last() else {
        return ListStrategy::Atomic;
    };
    struct_at(kind, owner_path)
        .and_then(|owner| {
            LIST_FIELDS
                .iter()
                .find(|(struct_, name, _)| *struct_ == owner && name == field)
        })
        .map_or(ListStrategy::Atomic, |(_, _, strategy)| *strategy)
}

/// Which tagged API struct sits at `path` in an object of `kind`, if any.
fn struct_at(kind: &str, path: &[&str]) -> Option<ApiStruct> {
    if path == ["metadata"] {
        return Some(ApiStruct::ObjectMeta);
    }
    if let Some(in_template) = pod_template_path(kind).and_then(|prefix| path.strip_prefix(prefix))
    {
        if let Some(found) = pod_template_struct(in_template) {
            return Some(found);
        }
    }
    match (kind, path) {
        ("Pod", ["status"]) => Some(ApiStruct::PodStatus),
        ("Node", ["spec"]) => Some(ApiStruct::NodeSpec),
        ("Node", ["status"]) => Some(ApiStruct::NodeStatus),
        ("Service", ["spec"]) => Some(ApiStruct::ServiceSpec),
        ("CronJob", ["spec", "jobTemplate", "metadata"]) => Some(ApiStruct::ObjectMeta),
        ("ServiceAccount", []) => Some(ApiStruct::ServiceAccount),
        (_, ["status"]) if KINDS_WITH_CONDITIONS_STATUS.contains(&kind) => {
            Some(ApiStruct::ConditionsStatus)
        }
        _ => None,
    }
}

/// Where the pod template (metadata + PodSpec) lives in `kind`; a Pod is its
/// own template.
fn pod_template_path(kind: &str) -> Option<&'static [&'static str]> {
    match kind {
        "Pod" => Some(&[]),
        "Deployment"
        | "ReplicaSet"
        | "DaemonSet"
        | "StatefulSet"
        | "ReplicationController"
        | "Job" => Some(&["spec", "template"]),
        "CronJob" => Some(&["spec", "jobTemplate", "spec", "template"]),
        "PodTemplate" => Some(&["template"]),
        _ => None,
    }
}

fn pod_template_struct(path: &[&str]) -> Option<ApiStruct> {
    match path {
        ["metadata"] => Some(ApiStruct::ObjectMeta),
        ["spec"] => Some(ApiStruct::PodSpec),
        ["spec", list] if CONTAINER_LISTS.contains(list) => Some(ApiStruct::Container),
        _ => None,
    }
}

// ---------------------------------------------------------------------------
// Strategic merge patch: merging
// ---------------------------------------------------------------------------

const PATCH_DIRECTIVE: &str = "$patch";
const RETAIN_KEYS: &str = "$retainKeys";
const SET_ELEMENT_ORDER: &str = "$setElementOrder/";
const DELETE_FROM_PRIMITIVE_LIST: &str = "$deleteFromPrimitiveList/";

/// Applies a Kubernetes strategic merge patch to `target`, an object of `kind`.
/// Kinds without tagged lists still merge maps; all their lists are atomic.
pub fn strategic_merge_patch(
    kind: &str,
    target: &Value,
    patch: &Value,
) -> Result<Value, PatchError> {
    let Value::Object(patch_fields) = patch else {
        return Err(PatchError::PatchNotObject {
            patch_type: PatchType::Strategic,
            found: json_type_name(patch),
        });
    };
    let Value::Object(target_fields) = target else {
        return Err(PatchError::TargetNotObject {
            found: json_type_name(target),
        });
    };
    let mut patched = target_fields.clone();
    StrategicMerger { kind }.merge_map(&FieldPath::default(), &mut patched, patch_fields)?;
    Ok(Value::Object(patched))
}

/// Where in the object a merge is happening: drives the schema lookup and
/// names the spot in errors.
#[derive(Debug, Clone, Default)]
struct FieldPath {
    segments: Vec<Segment>,
}

#[derive(Debug, Clone)]
enum Segment {
    Field(String),
    Index(usize),
}

impl FieldPath {
    fn field(&self, name: &str) -> FieldPath {
        self.with(Segment::Field(name.to_string()))
    }

    fn index(&self, index: usize) -> FieldPath {
        self.with(Segment::Index(index))
    }

    fn with(&self, segment: Segment) -> FieldPath {
        let mut segments = self.segments.clone();
        segments.push(segment);
        FieldPath { segments }
    }

    /// The schema path: field names only, because list elements share a schema.
    fn field_names(&self) -> Vec<&str> {
        self.segments
            .iter()
            .filter_map(|segment| match segment {
                Segment::Field(name) => Some(name.as_str()),
                Segment::Index(_) => None,
            })
            .collect()
    }

    fn error(&self, reason: StrategicMergeFailure) -> PatchError {
        PatchError::StrategicMerge {
            path: self.to_string(),
            reason,
        }
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.segments.is_empty() {
            return f.write_str("<root>");
        }
        for (position, segment) in self.segments.iter().enumerate() {
            match segment {
                Segment::Field(name) if is_plain_field_name(name) => {
                    if position > 0 {
                        f.write_str(".")?;
                    }
                    f.write_str(name)?;
                }
                // Keys such as annotation names or directives contain dots and slashes.
                Segment::Field(name) => write!(f, "[{name:?}]")?,
                Segment::Index(index) => write!(f, "[{index}]")?,
            }
        }
        Ok(())
    }
}

fn is_plain_field_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A `$patch` directive value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Directive {
    Replace,
    Merge,
    Delete,
}

fn patch_directive(path: &FieldPath, fields: &Object) -> Result<Option<Directive>, PatchError> {
    let Some(value) = fields.get(PATCH_DIRECTIVE) else {
        return Ok(None);
    };
    match value.as_str() {
        Some("replace") => Ok(Some(Directive::Replace)),
        Some("merge") => Ok(Some(Directive::Merge)),
        Some("delete") => Ok(Some(Directive::Delete)),
        _ => Err(path.error(StrategicMergeFailure::InvalidPatchDirective(
            value.to_string(),
        ))),
    }
}

/// The JSON type of list elements, which decides how a merge list merges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ElementKind {
    Object,
    /// Strings, numbers, booleans or nulls (one of them per list).
    Primitive(&'static str),
}

fn element_kind(
    path: &FieldPath,
    original: &[Value],
    patch: &[Value],
) -> Result<ElementKind, PatchError> {
    let mut kinds = original.iter().chain(patch).map(|item| match item {
        Value::Array(_) => Err(path.error(StrategicMergeFailure::NestedList)),
        Value::Object(_) => Ok(ElementKind::Object),
        primitive => Ok(ElementKind::Primitive(json_type_name(primitive))),
    });
    let first = kinds.next().unwrap_or(Ok(ElementKind::Primitive("null")))?;
    for kind in kinds {
        if kind? != first {
            return Err(path.error(StrategicMergeFailure::MixedElementTypes));
        }
    }
    Ok(first)
}

/// What identifies a list element for matching and ordering: its merge key
/// value for keyed lists, the element itself otherwise.
fn identity<'v>(
    path: &FieldPath,
    item: &'v Value,
    key: Option<&str>,
) -> Result<&'v Value, PatchError> {
    match key {
        None => Ok(item),
        Some(key) => item.get(key).ok_or_else(|| missing_merge_key(path, key)),
    }
}

fn merge_key_value<'v>(
    path: &FieldPath,
    fields: &'v Object,
    key: &str,
) -> Result<&'v Value, PatchError> {
    fields.get(key).ok_or_else(|| missing_merge_key(path, key))
}

fn missing_merge_key(path: &FieldPath, key: &str) -> PatchError {
    path.error(StrategicMergeFailure::MissingMergeKey(key.to_string()))
}

fn identities(
    path: &FieldPath,
    items: &[Value],
    key: Option<&str>,
) -> Result<Vec<Value>, PatchError> {
    items
        .iter()
        .map(|item| identity(path, item, key).cloned())
        .collect()
}

/// A merged list element with its position in the patch (or
/// `$setElementOrder`) list and in the live list.
struct RankedItem {
    patch_rank: Option<usize>,
    server_rank: Option<usize>,
    item: Value,
}

/// Orders a merged list the way kube does: elements named by the patch follow
/// `patch_order`, server-only elements keep their live order, and a
/// server-only element goes before a patch element only if both exist in the
/// live list and it came first there. (So an element new to the list lands
/// ahead of the server-only elements after it, unless `$setElementOrder` says
/// otherwise.)
fn order_merged_list(
    path: &FieldPath,
    merged: Vec<Value>,
    patch_order: &[Value],
    server_order: &[Value],
    key: Option<&str>,
) -> Result<Vec<Value>, PatchError> {
    let mut from_patch = Vec::new();
    let mut server_only = Vec::new();
    for item in merged {
        let id = identity(path, &item, key)?;
        let ranked = RankedItem {
            patch_rank: patch_order.iter().position(|other| other == id),
            server_rank: server_order.iter().position(|other| other == id),
            item,
        };
        if ranked.patch_rank.is_some() {
            from_patch.push(ranked);
        } else {
            server_only.push(ranked);
        }
    }
    from_patch.sort_by_key(|ranked| ranked.patch_rank);
    server_only.sort_by_key(|ranked| ranked.server_rank.unwrap_or(usize::MAX));

    let mut ordered = Vec::with_capacity(from_patch.len() + server_only.len());
    let mut server_only = server_only.into_iter().peekable();
    for patch_item in from_patch {
        while let Some(server_item) =
            server_only.next_if(|server_item| precedes_in_live_list(server_item, &patch_item))
        {
            ordered.push(server_item.item);
        }
        ordered.push(patch_item.item);
    }
    ordered.extend(server_only.map(|ranked| ranked.item));
    Ok(ordered)
}

/// kube's tie-break between a server-only element and a patch element: the
/// server-only one goes first only if both are in the live list, it earlier.
fn precedes_in_live_list(server_item: &RankedItem, patch_item: &RankedItem) -> bool {
    matches!(
        (server_item.server_rank, patch_item.server_rank),
        (Some(server), Some(patch)) if server < patch
    )
}

/// Applies a strategic merge patch for one object kind.
struct StrategicMerger<'k> {
    kind: &'k str,
}

impl StrategicMerger<'_> {
    fn list_strategy(&self, path: &FieldPath) -> ListStrategy {
        list_strategy(self.kind, &path.field_names())
    }

    /// Merges `patch` into the map `target` at `path`.
    fn merge_map(
        &self,
        path: &FieldPath,
        target: &mut Object,
        patch: &Object,
    ) -> Result<(), PatchError> {
        match patch_directive(path, patch)? {
            Some(Directive::Delete) => {
                target.clear();
                return Ok(());
            }
            // The map becomes exactly the patch, directives inside it resolved.
            Some(Directive::Replace) => target.clear(),
            // kube rejects an explicit `$patch: merge`; it names the default, so
            // it is accepted here (in list elements too).
            Some(Directive::Merge) | None => {}
        }
        reject_unknown_directives(path, patch)?;
        apply_retain_keys(path, target, patch)?;
        let ordered_fields = self.apply_element_orders(path, target, patch)?;
        for (key, value) in patch {
            if let Some(field) = key.strip_prefix(DELETE_FROM_PRIMITIVE_LIST) {
                delete_from_primitive_list(&path.field(key), target, field, value)?;
            } else if !key.starts_with('$') && !ordered_fields.contains(&key.as_str()) {
                self.merge_field(path, target, key, value)?;
            }
        }
        Ok(())
    }

    fn merge_field(
        &self,
        path: &FieldPath,
        target: &mut Object,
        key: &str,
        value: &Value,
    ) -> Result<(), PatchError> {
        let field_path = path.field(key);
        if value.is_null() {
            target.shift_remove(key);
            return Ok(());
        }
        match (target.get_mut(key), value) {
            (Some(Value::Object(existing)), Value::Object(patch)) => {
                self.merge_map(&field_path, existing, patch)
            }
            (Some(Value::Array(existing)), Value::Array(patch)) => {
                let merged = self.merge_list(&field_path, std::mem::take(existing), patch)?;
                *existing = merged;
                Ok(())
            }
            // Absent, or of another JSON type: the patch value wins.
            _ => {
                match self.fresh_value(&field_path, value)? {
                    Some(fresh) => target.insert(key.to_string(), fresh),
                    None => target.shift_remove(key),
                };
                Ok(())
            }
        }
    }

    /// A patch value with nothing to merge into: nulls dropped and directives
    /// resolved against an empty original, so none end up stored. `None` means
    /// the value deletes itself (`$patch: delete`).
    fn fresh_value(&self, path: &FieldPath, value: &Value) -> Result<Option<Value>, PatchError> {
        match value {
            Value::Object(fields) => Ok(self.fresh_map(path, fields)?.map(Value::Object)),
            Value::Array(items) => Ok(Some(Value::Array(self.merge_list(
                path,
                Vec::new(),
                items,
            )?))),
            primitive => Ok(Some(primitive.clone())),
        }
    }

    fn fresh_map(&self, path: &FieldPath, fields: &Object) -> Result<Option<Object>, PatchError> {
        if patch_directive(path, fields)? == Some(Directive::Delete) {
            return Ok(None);
        }
        let mut fresh = Object::new();
        self.merge_map(path, &mut fresh, fields)?;
        Ok(Some(fresh))
    }

    fn merge_list(
        &self,
        path: &FieldPath,
        original: Vec<Value>,
        patch: &[Value],
    ) -> Result<Vec<Value>, PatchError> {
        match self.list_strategy(path) {
            ListStrategy::Atomic => self.fresh_items(path, patch),
            strategy => self.merge_with_merge_strategy(path, original, patch, strategy.merge_key()),
        }
    }

    fn fresh_items(&self, path: &FieldPath, items: &[Value]) -> Result<Vec<Value>, PatchError> {
        let mut fresh = Vec::with_capacity(items.len());
        for (index, item) in items.iter().enumerate() {
            fresh.extend(self.fresh_value(&path.index(index), item)?);
        }
        Ok(fresh)
    }

    /// Merges a list whose field has `patchStrategy:"merge"`.
    fn merge_with_merge_strategy(
        &self,
        path: &FieldPath,
        original: Vec<Value>,
        patch: &[Value],
        merge_key: Option<&str>,
    ) -> Result<Vec<Value>, PatchError> {
        if original.is_empty() && patch.is_empty() {
            return Ok(original);
        }
        match (element_kind(path, &original, patch)?, merge_key) {
            (ElementKind::Object, Some(key)) => self.merge_keyed_list(path, original, patch, key),
            (ElementKind::Object, None) => Err(path.error(StrategicMergeFailure::NoMergeKey)),
            (ElementKind::Primitive(_), _) => merge_primitive_list(path, original, patch),
        }
    }

    /// Merges a list of objects matched by `key`: `$patch: delete` elements
    /// remove their match, a `$patch: replace` element makes the list exactly
    /// the other patch elements, and every other element merges into its match
    /// or is added.
    fn merge_keyed_list(
        &self,
        path: &FieldPath,
        original: Vec<Value>,
        patch: &[Value],
        key: &str,
    ) -> Result<Vec<Value>, PatchError> {
        let mut live = original;
        let mut updates = Vec::new();
        let mut replace = false;
        for (index, item) in patch.iter().enumerate() {
            let item_path = path.index(index);
            let Value::Object(fields) = item else {
                return Err(item_path.error(StrategicMergeFailure::MixedElementTypes));
            };
            match patch_directive(&item_path, fields)? {
                Some(Directive::Delete) => {
                    let id = merge_key_value(&item_path, fields, key)?;
                    live.retain(|existing| existing.get(key) != Some(id));
                }
                Some(Directive::Replace) => replace = true,
                Some(Directive::Merge) | None => updates.push((item_path, fields)),
            }
        }
        if replace {
            live.clear();
        }

        let server_order = identities(path, &live, Some(key))?;
        let mut patch_order = Vec::with_capacity(updates.len());
        for (item_path, fields) in updates {
            let id = merge_key_value(&item_path, fields, key)?;
            patch_order.push(id.clone());
            let matching = live.iter_mut().find_map(|existing| match existing {
                Value::Object(existing) if existing.get(key) == Some(id) => Some(existing),
                _ => None,
            });
            match matching {
                Some(existing) => self.merge_map(&item_path, existing, fields)?,
                None => live.extend(self.fresh_map(&item_path, fields)?.map(Value::Object)),
            }
        }
        order_merged_list(path, live, &patch_order, &server_order, Some(key))
    }

    /// Handles every `$setElementOrder/<field>` of a map: merges the field's
    /// patch list (if any) and orders the result. Returns the fields done.
    fn apply_element_orders<'p>(
        &self,
        path: &FieldPath,
        target: &mut Object,
        patch: &'p Object,
    ) -> Result<Vec<&'p str>, PatchError> {
        let mut ordered_fields = Vec::new();
        for (key, order) in patch {
            let Some(field) = key.strip_prefix(SET_ELEMENT_ORDER) else {
                continue;
            };
            let Value::Array(order) = order else {
                return Err(path
                    .field(key)
                    .error(StrategicMergeFailure::DirectiveNotList(key.clone())));
            };
            let field_path = path.field(field);
            let merge_key = self.list_strategy(&field_path).merge_key();
            let patch_list = match patch.get(field) {
                None => None,
                Some(Value::Array(items)) => Some(items.as_slice()),
                Some(_) => return Err(field_path.error(StrategicMergeFailure::NotAList)),
            };
            let live = match target.get_mut(field) {
                None | Some(Value::Null) => None,
                Some(Value::Array(items)) => Some(std::mem::take(items)),
                Some(_) => return Err(field_path.error(StrategicMergeFailure::NotAList)),
            };
            if let Some(items) = patch_list {
                validate_element_order(&field_path, items, order, merge_key)?;
            }
            let server_order = match (&live, patch_list) {
                (Some(items), Some(patch_items)) => {
                    element_order_server_order(&field_path, items, patch_items, merge_key)?
                }
                (Some(items), None) => identities(&field_path, items, merge_key)?,
                (None, _) => Vec::new(),
            };
            let merged = match (live, patch_list) {
                (Some(items), Some(patch_items)) => {
                    self.merge_list(&field_path, items, patch_items)?
                }
                (Some(items), None) => items,
                (None, Some(patch_items)) => {
                    self.merge_list(&field_path, Vec::new(), patch_items)?
                }
                (None, None) => continue,
            };
            let patch_order = identities(&path.field(key), order, merge_key)?;
            let ordered =
                order_merged_list(&field_path, merged, &patch_order, &server_order, merge_key)?;
            target.insert(field.to_string(), Value::Array(ordered));
            ordered_fields.push(field);
        }
        Ok(ordered_fields)
    }
}

/// The live order kube compares server-only elements against when it applies
/// `$setElementOrder` after merging a keyed list. kube reads it from the live
/// slice after the merge has written into the same Go backing array: deletions
/// shifted the survivors left, and the first new elements were appended into
/// the slots the deletions freed. So a new element inherits a live position
/// when the patch also deletes one. (This does not depend on slice capacity;
/// for primitive lists it would, so they use the plain live order.)
fn element_order_server_order(
    path: &FieldPath,
    live: &[Value],
    patch_items: &[Value],
    key: Option<&str>,
) -> Result<Vec<Value>, PatchError> {
    let mut order = identities(path, live, key)?;
    let Some(key) = key.filter(|_| patch_items.iter().all(Value::is_object)) else {
        return Ok(order);
    };
    let deleted: Vec<&Value> = patch_items
        .iter()
        .filter(|item| directive_name(item) == Some("delete"))
        .filter_map(|item| item.get(key))
        .collect();
    order.retain(|id| !deleted.contains(&id));
    if patch_items
        .iter()
        .any(|item| directive_name(item) == Some("replace"))
    {
        // The list became the patch elements: nothing was appended to the live slice.
        return Ok(order);
    }
    let freed_slots = live.len() - order.len();
    let updated_ids = patch_items
        .iter()
        .filter(|item| matches!(directive_name(item), None | Some("merge")))
        .filter_map(|item| item.get(key));
    let mut appended = Vec::new();
    for id in updated_ids {
        if !order.contains(id) && !appended.contains(id) {
            appended.push(id.clone());
        }
    }
    order.extend(appended.into_iter().take(freed_slots));
    Ok(order)
}

/// The `$patch` value of a list element, if it has one.
fn directive_name(item: &Value) -> Option<&str> {
    item.get(PATCH_DIRECTIVE).and_then(Value::as_str)
}

/// Merges a list of primitives as a set; order as for every merge list.
fn merge_primitive_list(
    path: &FieldPath,
    original: Vec<Value>,
    patch: &[Value],
) -> Result<Vec<Value>, PatchError> {
    let mut merged: Vec<Value> = Vec::with_capacity(original.len() + patch.len());
    for item in original.iter().chain(patch) {
        if !merged.contains(item) {
            merged.push(item.clone());
        }
    }
    order_merged_list(path, merged, patch, &original, None)
}

fn reject_unknown_directives(path: &FieldPath, patch: &Object) -> Result<(), PatchError> {
    for key in patch.keys().filter(|key| key.starts_with('$')) {
        let named_field = key
            .strip_prefix(SET_ELEMENT_ORDER)
            .or_else(|| key.strip_prefix(DELETE_FROM_PRIMITIVE_LIST));
        match named_field {
            Some("") => {
                return Err(path.error(StrategicMergeFailure::DirectiveWithoutField(key.clone())));
            }
            Some(_) => {}
            None if key == PATCH_DIRECTIVE || key == RETAIN_KEYS => {}
            None => return Err(path.error(StrategicMergeFailure::UnknownDirective(key.clone()))),
        }
    }
    Ok(())
}

/// `$retainKeys`: drop every key of `target` not in the list. Every key the
/// patch sets must be in the list too.
fn apply_retain_keys(
    path: &FieldPath,
    target: &mut Object,
    patch: &Object,
) -> Result<(), PatchError> {
    let Some(retain) = patch.get(RETAIN_KEYS) else {
        return Ok(());
    };
    let directive_path = path.field(RETAIN_KEYS);
    let Value::Array(names) = retain else {
        return Err(
            directive_path.error(StrategicMergeFailure::DirectiveNotList(
                RETAIN_KEYS.to_string(),
            )),
        );
    };
    let retained = |key: &str| names.iter().any(|name| name.as_str() == Some(key));
    let unlisted = patch
        .iter()
        .find(|(key, value)| !value.is_null() && !key.starts_with('$') && !retained(key));
    if let Some((key, _)) = unlisted {
        return Err(directive_path.error(StrategicMergeFailure::NotInRetainKeys(key.clone())));
    }
    target.retain(|key, _| retained(key));
    Ok(())
}

/// `$deleteFromPrimitiveList/<field>`: removes the listed values from the
/// primitive list `field`, if the target has it.
fn delete_from_primitive_list(
    directive_path: &FieldPath,
    target: &mut Object,
    field: &str,
    to_delete: &Value,
) -> Result<(), PatchError> {
    let Value::Array(to_delete) = to_delete else {
        return Err(
            directive_path.error(StrategicMergeFailure::DirectiveNotList(format!(
                "{DELETE_FROM_PRIMITIVE_LIST}{field}"
            ))),
        );
    };
    let Some(Value::Array(items)) = target.get_mut(field) else {
        return Ok(());
    };
    if items
        .iter()
        .chain(to_delete)
        .any(|v| v.is_object() || v.is_array())
    {
        return Err(directive_path.error(StrategicMergeFailure::NotAPrimitiveList));
    }
    items.retain(|item| !to_delete.contains(item));
    Ok(())
}

/// Checks that the patch list's elements appear in `$setElementOrder` in the
/// same relative order (kube's rule; deletions and directive elements are
/// skipped).
fn validate_element_order(
    path: &FieldPath,
    patch_items: &[Value],
    order: &[Value],
    key: Option<&str>,
) -> Result<(), PatchError> {
    let is_deletion = |item: &&Value| key.is_some() && directive_name(item) == Some("delete");
    if order.is_empty() {
        return Ok(());
    }
    let candidates: Vec<&Value> = patch_items
        .iter()
        .filter(|item| !is_deletion(item))
        .collect();
    let (mut next_patch, mut next_order) = (0, 0);
    while next_patch < candidates.len() && next_order < order.len() {
        let item = candidates[next_patch];
        if item.get(PATCH_DIRECTIVE).is_some() {
            next_patch += 1;
            continue;
        }
        if identity(path, item, key)? == identity(path, &order[next_order], key)? {
            next_patch += 1;
        }
        next_order += 1;
    }
    if next_patch < candidates.len() {
        return Err(path.error(StrategicMergeFailure::OrderMismatch));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn smp(kind: &str, target: Value, patch: Value) -> Value {
        strategic_merge_patch(kind, &target, &patch).expect("strategic merge patch applies")
    }

    fn smp_error(kind: &str, target: Value, patch: Value) -> String {
        strategic_merge_patch(kind, &target, &patch)
            .expect_err("strategic merge patch must fail")
            .to_string()
    }

    fn jp(target: Value, ops: Value) -> Value {
        json_patch(&target, &ops).expect("json patch applies")
    }

    fn jp_error(target: Value, ops: Value) -> String {
        json_patch(&target, &ops)
            .expect_err("json patch must fail")
            .to_string()
    }

    fn names(list: &Value) -> Vec<&str> {
        list.as_array()
            .expect("a list")
            .iter()
            .map(|item| item["name"].as_str().expect("a name"))
            .collect()
    }

    // --- content types -----------------------------------------------------

    #[test]
    fn content_types_map_to_patch_types() {
        assert_eq!(
            PatchType::from_content_type("application/merge-patch+json"),
            Some(PatchType::Merge)
        );
        assert_eq!(
            PatchType::from_content_type("application/json-patch+json; charset=utf-8"),
            Some(PatchType::Json)
        );
        assert_eq!(
            PatchType::from_content_type(" Application/Strategic-Merge-Patch+JSON "),
            Some(PatchType::Strategic)
        );
        assert_eq!(PatchType::from_content_type("application/json"), None);
        assert_eq!(
            PatchType::from_content_type("application/apply-patch+yaml"),
            None
        );
    }

    // --- JSON merge patch ---------------------------------------------------

    #[test]
    fn merge_patch_deletes_nulls_and_merges_nested_maps() {
        let target = json!({
            "metadata": {"labels": {"app": "web", "tier": "front"}, "name": "x"},
            "spec": {"replicas": 1, "selector": {"app": "web"}},
        });
        let patch = json!({
            "metadata": {"labels": {"tier": null, "env": "prod"}},
            "spec": {"replicas": 3, "paused": {"a": 1, "b": null}},
        });
        let patched = apply_patch("Deployment", &target, PatchType::Merge, &patch).unwrap();
        assert_eq!(
            patched,
            json!({
                "metadata": {"labels": {"app": "web", "env": "prod"}, "name": "x"},
                "spec": {"replicas": 3, "selector": {"app": "web"}, "paused": {"a": 1}},
            })
        );
    }

    #[test]
    fn merge_patch_replaces_lists_and_non_objects() {
        let mut target = json!({"list": [1, 2, 3], "scalar": "x"});
        json_merge_patch(
            &mut target,
            &json!({"list": [4], "scalar": {"now": "object"}}),
        );
        assert_eq!(target, json!({"list": [4], "scalar": {"now": "object"}}));

        let mut whole = json!({"a": 1});
        json_merge_patch(&mut whole, &json!(["replaced"]));
        assert_eq!(whole, json!(["replaced"]));
    }

    #[test]
    fn merge_patch_must_be_an_object() {
        let error = apply_patch("Pod", &json!({}), PatchType::Merge, &json!([1])).unwrap_err();
        assert_eq!(
            error.to_string(),
            "merge patch must be a JSON object, got array"
        );
    }

    // --- JSON patch ---------------------------------------------------------

    #[test]
    fn json_patch_add_inserts_appends_and_replaces_root() {
        let patched = jp(
            json!({"spec": {"list": [1, 3]}}),
            json!([
                {"op": "add", "path": "/spec/list/1", "value": 2},
                {"op": "add", "path": "/spec/list/-", "value": 4},
                {"op": "add", "path": "/spec/new", "value": {"a": null}},
                {"op": "add", "path": "/spec/list/0", "value": 0},
            ]),
        );
        assert_eq!(
            patched,
            json!({"spec": {"list": [0, 1, 2, 3, 4], "new": {"a": null}}})
        );

        let root = jp(
            json!({"a": 1}),
            json!([{"op": "add", "path": "", "value": [true]}]),
        );
        assert_eq!(root, json!([true]));
    }

    #[test]
    fn json_patch_remove_and_replace() {
        let patched = jp(
            json!({"a": {"b": 1, "c": 2}, "list": ["x", "y", "z"]}),
            json!([
                {"op": "remove", "path": "/a/b"},
                {"op": "remove", "path": "/list/1"},
                {"op": "replace", "path": "/a/c", "value": "two"},
                {"op": "replace", "path": "/list/0", "value": "X"},
            ]),
        );
        assert_eq!(patched, json!({"a": {"c": "two"}, "list": ["X", "z"]}));
    }

    #[test]
    fn json_patch_replace_requires_existing_path() {
        let error = jp_error(
            json!({"spec": {}}),
            json!([
                {"op": "test", "path": "/spec", "value": {}},
                {"op": "add", "path": "/spec/bar", "value": 1},
                {"op": "replace", "path": "/spec/foo", "value": 1},
            ]),
        );
        assert_eq!(error, "json patch op 2 (replace /spec/foo): path not found");
    }

    #[test]
    fn json_patch_move_and_copy() {
        let patched = jp(
            json!({"a": {"x": 1}, "b": {}, "list": [1, 2, 3]}),
            json!([
                {"op": "move", "from": "/a/x", "path": "/b/y"},
                {"op": "copy", "from": "/b", "path": "/c"},
                {"op": "move", "from": "/list/0", "path": "/list/-"},
                {"op": "move", "from": "/c", "path": "/c"},
            ]),
        );
        assert_eq!(
            patched,
            json!({"a": {}, "b": {"y": 1}, "list": [2, 3, 1], "c": {"y": 1}})
        );
    }

    #[test]
    fn json_patch_move_errors_name_the_from_path() {
        let missing = jp_error(
            json!({"a": {}}),
            json!([{"op": "move", "from": "/a/x", "path": "/b"}]),
        );
        assert_eq!(
            missing,
            "json patch op 0 (move /b): from /a/x: path not found"
        );

        let into_child = jp_error(
            json!({"a": {"b": {}}}),
            json!([{"op": "move", "from": "/a", "path": "/a/b/c"}]),
        );
        assert_eq!(
            into_child,
            "json patch op 0 (move /a/b/c): cannot move /a into one of its own children"
        );

        let no_from = jp_error(json!({}), json!([{"op": "copy", "path": "/b"}]));
        assert_eq!(no_from, "json patch op 0 (copy /b): missing \"from\" field");
    }

    #[test]
    fn json_patch_test_op_passes_and_fails() {
        let doc = json!({"spec": {"replicas": 3, "tags": ["a"], "meta": {"x": 1, "y": 2}}});
        let passed = jp(
            doc.clone(),
            json!([
                {"op": "test", "path": "/spec/replicas", "value": 3.0},
                {"op": "test", "path": "/spec/meta", "value": {"y": 2, "x": 1}},
                {"op": "test", "path": "/spec/tags", "value": ["a"]},
            ]),
        );
        assert_eq!(passed, doc);

        let failed = jp_error(
            doc,
            json!([
                {"op": "replace", "path": "/spec/replicas", "value": 5},
                {"op": "test", "path": "/spec/replicas", "value": 3},
            ]),
        );
        assert_eq!(
            failed,
            "json patch op 1 (test /spec/replicas): test failed: expected 3, found 5"
        );
    }

    #[test]
    fn json_patch_pointer_escapes() {
        let patched = jp(
            json!({"metadata": {"annotations": {"example.com/a~b": "old"}}}),
            json!([
                {"op": "replace", "path": "/metadata/annotations/example.com~1a~0b", "value": "new"},
                {"op": "add", "path": "/metadata/annotations/~01", "value": "tilde-one"},
            ]),
        );
        assert_eq!(
            patched,
            json!({"metadata": {"annotations": {"example.com/a~b": "new", "~1": "tilde-one"}}})
        );
    }

    #[test]
    fn json_patch_rejects_bad_pointers() {
        let no_slash = jp_error(json!({}), json!([{"op": "add", "path": "a", "value": 1}]));
        assert_eq!(
            no_slash,
            "json patch op 0 (add a): invalid JSON pointer \"a\": must be empty or start with '/'"
        );
        let bad_escape = jp_error(json!({}), json!([{"op": "remove", "path": "/a~2"}]));
        assert_eq!(
            bad_escape,
            "json patch op 0 (remove /a~2): invalid JSON pointer \"/a~2\": '~' must be followed by '0' or '1'"
        );
        let through_scalar = jp_error(
            json!({"a": 1}),
            json!([{"op": "add", "path": "/a/b", "value": 1}]),
        );
        assert_eq!(
            through_scalar,
            "json patch op 0 (add /a/b): cannot descend into a number value"
        );
        let missing_parent = jp_error(
            json!({}),
            json!([{"op": "add", "path": "/a/b", "value": 1}]),
        );
        assert_eq!(missing_parent, "json patch op 0 (add /a/b): path not found");
    }

    #[test]
    fn json_patch_array_index_errors() {
        let doc = json!({"list": [1, 2]});
        let past_end = jp_error(
            doc.clone(),
            json!([{"op": "add", "path": "/list/3", "value": 9}]),
        );
        assert_eq!(
            past_end,
            "json patch op 0 (add /list/3): array index 3 is out of range (array length 2)"
        );
        let remove_end = jp_error(doc.clone(), json!([{"op": "remove", "path": "/list/2"}]));
        assert_eq!(
            remove_end,
            "json patch op 0 (remove /list/2): array index 2 is out of range (array length 2)"
        );
        let leading_zero = jp_error(
            doc.clone(),
            json!([{"op": "replace", "path": "/list/01", "value": 0}]),
        );
        assert_eq!(
            leading_zero,
            "json patch op 0 (replace /list/01): \"01\" is not a valid array index"
        );
        let dash = jp_error(doc, json!([{"op": "remove", "path": "/list/-"}]));
        assert_eq!(
            dash,
            "json patch op 0 (remove /list/-): \"-\" is not a valid array index"
        );
    }

    #[test]
    fn json_patch_is_atomic() {
        let target = json!({"a": 1, "list": [1]});
        let ops = json!([
            {"op": "add", "path": "/b", "value": 2},
            {"op": "remove", "path": "/a"},
            {"op": "remove", "path": "/list/5"},
        ]);
        let error = apply_patch("ConfigMap", &target, PatchType::Json, &ops).unwrap_err();
        assert!(matches!(
            error,
            PatchError::OperationFailed { index: 2, .. }
        ));
        assert_eq!(target, json!({"a": 1, "list": [1]}));
    }

    #[test]
    fn json_patch_rejects_malformed_operations() {
        assert_eq!(
            jp_error(json!({}), json!({"op": "add"})),
            "json patch must be a JSON array of operations, got object"
        );
        assert_eq!(
            jp_error(json!({}), json!(["add"])),
            "json patch op 0: operation must be a JSON object, got string"
        );
        assert_eq!(
            jp_error(json!({}), json!([{"path": "/a"}])),
            "json patch op 0: missing string field \"op\""
        );
        assert_eq!(
            jp_error(json!({}), json!([{"op": "add", "value": 1}])),
            "json patch op 0: add: missing string field \"path\""
        );
        assert_eq!(
            jp_error(json!({}), json!([{"op": "add", "path": "/a"}])),
            "json patch op 0 (add /a): missing \"value\" field"
        );
        assert_eq!(
            jp_error(json!({}), json!([{"op": "increment", "path": "/a"}])),
            "json patch op 0 (increment /a): unknown operation (expected add, remove, replace, move, copy or test)"
        );
        assert_eq!(
            jp_error(json!({"a": 1}), json!([{"op": "remove", "path": ""}])),
            "json patch op 0 (remove ): cannot remove the whole document"
        );
    }

    // --- strategic merge patch: schema --------------------------------------

    #[test]
    fn schema_covers_the_tagged_lists() {
        use ListStrategy::*;
        let cases: &[(&str, &[&str], ListStrategy)] = &[
            ("Pod", &["metadata", "finalizers"], MergePrimitive),
            (
                "Service",
                &["metadata", "ownerReferences"],
                MergeByKey("uid"),
            ),
            ("Pod", &["spec", "containers"], MergeByKey("name")),
            (
                "Pod",
                &["spec", "initContainers", "env"],
                MergeByKey("name"),
            ),
            (
                "Pod",
                &["spec", "ephemeralContainers", "volumeMounts"],
                MergeByKey("mountPath"),
            ),
            ("Pod", &["spec", "containers", "envFrom"], Atomic),
            ("Pod", &["spec", "tolerations"], Atomic),
            ("Pod", &["status", "conditions"], MergeByKey("type")),
            ("Pod", &["status", "containerStatuses"], Atomic),
            (
                "Deployment",
                &["spec", "template", "spec", "containers", "ports"],
                MergeByKey("containerPort"),
            ),
            (
                "Deployment",
                &["spec", "template", "metadata", "finalizers"],
                MergePrimitive,
            ),
            (
                "DaemonSet",
                &["spec", "template", "spec", "volumes"],
                MergeByKey("name"),
            ),
            ("ReplicaSet", &["status", "conditions"], MergeByKey("type")),
            (
                "CronJob",
                &[
                    "spec",
                    "jobTemplate",
                    "spec",
                    "template",
                    "spec",
                    "hostAliases",
                ],
                MergeByKey("ip"),
            ),
            ("Deployment", &["spec", "containers"], Atomic),
            ("Service", &["spec", "ports"], MergeByKey("port")),
            ("Node", &["spec", "taints"], Atomic),
            ("Node", &["spec", "podCIDRs"], MergePrimitive),
            ("Node", &["status", "addresses"], MergeByKey("type")),
            ("Namespace", &["status", "conditions"], MergeByKey("type")),
            ("Namespace", &["spec", "finalizers"], Atomic),
            ("Endpoints", &["subsets"], Atomic),
            ("EndpointSlice", &["endpoints"], Atomic),
            ("EndpointSlice", &["ports"], Atomic),
            ("ConfigMap", &["status", "conditions"], Atomic),
        ];
        for (kind, path, expected) in cases {
            assert_eq!(list_strategy(kind, path), *expected, "{kind} {path:?}");
        }
    }

    // --- strategic merge patch: maps ----------------------------------------

    #[test]
    fn smp_removes_labels_with_null_and_merges_maps() {
        let patched = smp(
            "ConfigMap",
            json!({"metadata": {"name": "c", "labels": {"a": "1", "b": "2"}}, "data": {"k": "v"}}),
            json!({"metadata": {"labels": {"a": null, "c": "3"}}, "data": {"k2": "v2"}, "absent": null}),
        );
        assert_eq!(
            patched,
            json!({"metadata": {"name": "c", "labels": {"b": "2", "c": "3"}}, "data": {"k": "v", "k2": "v2"}})
        );
    }

    #[test]
    fn smp_patch_directive_in_maps() {
        let target = json!({"data": {"a": "1", "b": "2"}, "binaryData": {"x": "eA=="}});
        let replaced = smp(
            "ConfigMap",
            target.clone(),
            json!({"data": {"$patch": "replace", "c": "3", "gone": null}}),
        );
        assert_eq!(replaced["data"], json!({"c": "3"}));

        let deleted = smp(
            "ConfigMap",
            target.clone(),
            json!({"binaryData": {"$patch": "delete"}}),
        );
        assert_eq!(deleted["binaryData"], json!({}));

        let merged = smp(
            "ConfigMap",
            target,
            json!({"data": {"$patch": "merge", "c": "3"}}),
        );
        assert_eq!(merged["data"], json!({"a": "1", "b": "2", "c": "3"}));
    }

    #[test]
    fn smp_new_values_drop_nulls_and_directives() {
        let patched = smp(
            "Pod",
            json!({"spec": {"nodeName": "n1"}}),
            json!({"spec": {
                "securityContext": {"runAsUser": 1000, "fsGroup": null},
                "affinity": {"$patch": "delete"},
                "containers": [{"name": "a", "env": [{"name": "X", "value": null}]}],
            }}),
        );
        assert_eq!(
            patched,
            json!({"spec": {
                "nodeName": "n1",
                "securityContext": {"runAsUser": 1000},
                "containers": [{"name": "a", "env": [{"name": "X"}]}],
            }})
        );
    }

    #[test]
    fn smp_value_of_another_type_replaces() {
        let patched = smp(
            "ConfigMap",
            json!({"data": {"a": "1"}}),
            json!({"data": ["x"]}),
        );
        assert_eq!(patched, json!({"data": ["x"]}));
    }

    #[test]
    fn smp_retain_keys_clears_unlisted_fields() {
        let target = json!({"spec": {"strategy": {
            "type": "RollingUpdate",
            "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"},
        }}});
        let patched = smp(
            "Deployment",
            target.clone(),
            json!({"spec": {"strategy": {"$retainKeys": ["type"], "type": "Recreate"}}}),
        );
        assert_eq!(patched, json!({"spec": {"strategy": {"type": "Recreate"}}}));

        let error = smp_error(
            "Deployment",
            target,
            json!({"spec": {"strategy": {"$retainKeys": ["type"], "rollingUpdate": {}}}}),
        );
        assert_eq!(
            error,
            "strategic merge patch at spec.strategy[\"$retainKeys\"]: field \"rollingUpdate\" is set by the patch but missing from $retainKeys"
        );
    }

    #[test]
    fn smp_rejects_unknown_directives() {
        let error = smp_error(
            "Deployment",
            json!({"spec": {"template": {"spec": {}}}}),
            json!({"spec": {"template": {"spec": {"$frobnicate": true}}}}),
        );
        assert_eq!(
            error,
            "strategic merge patch at spec.template.spec: unknown patch directive \"$frobnicate\""
        );

        let bad_value = smp_error(
            "ConfigMap",
            json!({}),
            json!({"data": {"$patch": "explode"}}),
        );
        assert_eq!(
            bad_value,
            "strategic merge patch at data: invalid $patch value \"explode\" (expected \"replace\", \"merge\" or \"delete\")"
        );
    }

    #[test]
    fn smp_requires_object_patch_and_target() {
        assert_eq!(
            smp_error("Pod", json!({}), json!([])),
            "strategic merge patch must be a JSON object, got array"
        );
        assert_eq!(
            smp_error("Pod", json!("x"), json!({})),
            "strategic merge patch target must be a JSON object, got string"
        );
    }

    // --- strategic merge patch: lists ---------------------------------------

    fn deployment(containers: Value) -> Value {
        json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"app": "web"}},
                "template": {
                    "metadata": {"labels": {"app": "web"}},
                    "spec": {"containers": containers, "restartPolicy": "Always"},
                },
            },
        })
    }

    #[test]
    fn smp_changing_one_container_image_keeps_the_others() {
        let target = deployment(json!([
            {"name": "app", "image": "app:1", "imagePullPolicy": "IfNotPresent"},
            {"name": "sidecar", "image": "proxy:1"},
        ]));
        let patched = smp(
            "Deployment",
            target.clone(),
            json!({"spec": {"template": {"spec": {"containers": [{"name": "app", "image": "app:2"}]}}}}),
        );
        let mut expected = target;
        expected["spec"]["template"]["spec"]["containers"][0]["image"] = json!("app:2");
        assert_eq!(patched, expected);
    }

    #[test]
    fn smp_container_ports_merge_by_container_port() {
        let target = deployment(json!([{
            "name": "app",
            "ports": [{"containerPort": 80, "protocol": "TCP"}, {"containerPort": 443, "protocol": "TCP"}],
        }]));
        let patched = smp(
            "Deployment",
            target,
            json!({"spec": {"template": {"spec": {"containers": [{
                "name": "app",
                "ports": [{"containerPort": 443, "name": "https"}, {"containerPort": 9090, "name": "metrics"}],
            }]}}}}),
        );
        // Elements named by the patch come first in patch order, as in kube.
        assert_eq!(
            patched["spec"]["template"]["spec"]["containers"][0]["ports"],
            json!([
                {"containerPort": 80, "protocol": "TCP"},
                {"containerPort": 443, "protocol": "TCP", "name": "https"},
                {"containerPort": 9090, "name": "metrics"},
            ])
        );
    }

    #[test]
    fn smp_new_element_without_element_order_goes_first_like_kube() {
        let target = deployment(json!([{"name": "a"}, {"name": "b"}]));
        let patched = smp(
            "Deployment",
            target,
            json!({"spec": {"template": {"spec": {"containers": [{"name": "c", "image": "c:1"}]}}}}),
        );
        assert_eq!(
            names(&patched["spec"]["template"]["spec"]["containers"]),
            ["c", "a", "b"]
        );
    }

    #[test]
    fn smp_server_only_elements_interleave_by_live_order() {
        let target = deployment(json!([{"name": "app", "env": [
            {"name": "A", "value": "1"},
            {"name": "B", "value": "2"},
            {"name": "C", "value": "3"},
        ]}]));
        let patched = smp(
            "Deployment",
            target,
            json!({"spec": {"template": {"spec": {"containers": [{"name": "app", "env": [
                {"name": "D", "value": "4"},
                {"name": "A", "value": "x"},
            ]}]}}}}),
        );
        assert_eq!(
            names(&patched["spec"]["template"]["spec"]["containers"][0]["env"]),
            ["D", "A", "B", "C"]
        );
    }

    #[test]
    fn smp_empty_patch_list_leaves_a_merge_list_alone() {
        let target = json!({"spec": {
            "volumes": [{"name": "v", "emptyDir": {}}],
            "tolerations": [{"key": "a", "operator": "Exists"}],
        }});
        let patched = smp(
            "Pod",
            target,
            json!({"spec": {"volumes": [], "tolerations": []}}),
        );
        assert_eq!(
            patched["spec"]["volumes"],
            json!([{"name": "v", "emptyDir": {}}])
        );
        assert_eq!(patched["spec"]["tolerations"], json!([]));
    }

    #[test]
    fn smp_retain_keys_switches_a_volume_source() {
        // kubectl apply after changing a volume from emptyDir to hostPath.
        let target = json!({"spec": {"volumes": [
            {"name": "cache", "emptyDir": {}},
            {"name": "data", "emptyDir": {"medium": "Memory"}},
        ]}});
        let patched = smp(
            "Pod",
            target,
            json!({"spec": {
                "$setElementOrder/volumes": [{"name": "cache"}, {"name": "data"}],
                "volumes": [{
                    "$retainKeys": ["hostPath", "name"],
                    "hostPath": {"path": "/data"},
                    "name": "data",
                }],
            }}),
        );
        assert_eq!(
            patched["spec"]["volumes"],
            json!([{"name": "cache", "emptyDir": {}}, {"name": "data", "hostPath": {"path": "/data"}}])
        );
    }

    #[test]
    fn smp_set_element_order_with_deleted_container() {
        let target = deployment(json!([
            {"name": "init-proxy", "image": "p:1"},
            {"name": "app", "image": "app:1"},
            {"name": "logger", "image": "l:1"},
        ]));
        let patched = smp(
            "Deployment",
            target,
            json!({"spec": {"template": {"spec": {
                "$setElementOrder/containers": [{"name": "app"}, {"name": "init-proxy"}],
                "containers": [{"$patch": "delete", "name": "logger"}],
            }}}}),
        );
        assert_eq!(
            patched["spec"]["template"]["spec"]["containers"],
            json!([{"name": "app", "image": "app:1"}, {"name": "init-proxy", "image": "p:1"}])
        );
    }

    #[test]
    fn smp_set_element_order_keeps_server_only_elements_in_place() {
        // "injected" exists only on the server (e.g. added by a webhook).
        let target = deployment(json!([{"name": "a"}, {"name": "injected"}, {"name": "b"}]));
        let patched = smp(
            "Deployment",
            target,
            json!({"spec": {"template": {"spec": {
                "$setElementOrder/containers": [{"name": "a"}, {"name": "b"}, {"name": "c"}],
                "containers": [{"name": "c"}],
            }}}}),
        );
        assert_eq!(
            names(&patched["spec"]["template"]["spec"]["containers"]),
            ["a", "injected", "b", "c"]
        );
    }

    #[test]
    fn smp_set_element_order_with_rename_places_elements_like_kube() {
        // F and G exist only on the server. D is deleted and A added in the same
        // patch; kube then ranks A at D's old live position, so F precedes it.
        let env = |names: &[&str]| -> Value {
            names
                .iter()
                .map(|name| json!({"name": name, "value": "live"}))
                .collect()
        };
        let target = deployment(json!([{"name": "app", "env": env(&["E", "F", "B", "G", "D"])}]));
        let patched = smp(
            "Deployment",
            target,
            json!({"spec": {"template": {"spec": {"containers": [{
                "name": "app",
                "$setElementOrder/env": [{"name": "E"}, {"name": "A"}, {"name": "B"}, {"name": "G"}],
                "env": [
                    {"name": "E", "value": "new"},
                    {"name": "A", "value": "new"},
                    {"name": "B", "value": "new"},
                    {"$patch": "delete", "name": "D"},
                ],
            }]}}}}),
        );
        assert_eq!(
            names(&patched["spec"]["template"]["spec"]["containers"][0]["env"]),
            ["E", "F", "A", "B", "G"]
        );
    }

    #[test]
    fn smp_set_element_order_must_match_the_patch_list() {
        let error = smp_error(
            "Deployment",
            deployment(json!([{"name": "a"}, {"name": "b"}])),
            json!({"spec": {"template": {"spec": {
                "$setElementOrder/containers": [{"name": "a"}, {"name": "b"}],
                "containers": [{"name": "b"}, {"name": "a"}],
            }}}}),
        );
        assert_eq!(
            error,
            "strategic merge patch at spec.template.spec.containers: the patch list is not in the order given by $setElementOrder"
        );
    }

    #[test]
    fn smp_list_replace_directive() {
        let target = deployment(json!([{"name": "a", "image": "a:1"}, {"name": "b"}]));
        let patched = smp(
            "Deployment",
            target,
            json!({"spec": {"template": {"spec": {"containers": [
                {"$patch": "replace"},
                {"name": "z", "image": "z:1"},
            ]}}}}),
        );
        assert_eq!(
            patched["spec"]["template"]["spec"]["containers"],
            json!([{"name": "z", "image": "z:1"}])
        );
    }

    #[test]
    fn smp_finalizers_merge_and_delete_from_primitive_list() {
        let target =
            json!({"metadata": {"name": "p", "finalizers": ["a.io/x", "b.io/y", "c.io/z"]}});
        let merged = smp(
            "Pod",
            target.clone(),
            json!({"metadata": {"finalizers": ["b.io/y", "d.io/w"]}}),
        );
        assert_eq!(
            merged["metadata"]["finalizers"],
            json!(["a.io/x", "b.io/y", "d.io/w", "c.io/z"])
        );

        let deleted = smp(
            "Pod",
            target.clone(),
            json!({"metadata": {"$deleteFromPrimitiveList/finalizers": ["b.io/y", "not-there"]}}),
        );
        assert_eq!(
            deleted["metadata"]["finalizers"],
            json!(["a.io/x", "c.io/z"])
        );

        // What kubectl apply sends when a finalizer is swapped for another.
        let applied = smp(
            "Pod",
            target,
            json!({"metadata": {
                "$deleteFromPrimitiveList/finalizers": ["a.io/x"],
                "$setElementOrder/finalizers": ["d.io/w", "b.io/y", "c.io/z"],
                "finalizers": ["d.io/w"],
            }}),
        );
        assert_eq!(
            applied["metadata"]["finalizers"],
            json!(["d.io/w", "b.io/y", "c.io/z"])
        );
    }

    #[test]
    fn smp_delete_from_primitive_list_rejects_objects() {
        let error = smp_error(
            "Pod",
            json!({"metadata": {"finalizers": ["a"]}}),
            json!({"metadata": {"$deleteFromPrimitiveList/finalizers": [{"a": 1}]}}),
        );
        assert_eq!(
            error,
            "strategic merge patch at metadata[\"$deleteFromPrimitiveList/finalizers\"]: $deleteFromPrimitiveList applies only to lists of primitive values"
        );
    }

    #[test]
    fn smp_list_without_merge_key_is_replaced() {
        let target = json!({"spec": {
            "tolerations": [{"key": "a", "operator": "Exists"}, {"key": "b", "operator": "Exists"}],
            "containers": [{"name": "app", "args": ["--a", "--b"]}],
        }});
        let patched = smp(
            "Pod",
            target,
            json!({"spec": {
                "tolerations": [{"key": "c", "operator": "Exists"}],
                "containers": [{"name": "app", "args": ["--c"]}],
            }}),
        );
        assert_eq!(
            patched["spec"]["tolerations"],
            json!([{"key": "c", "operator": "Exists"}])
        );
        assert_eq!(patched["spec"]["containers"][0]["args"], json!(["--c"]));
    }

    #[test]
    fn smp_service_ports_merge_by_port() {
        let target = json!({"spec": {
            "type": "ClusterIP",
            "ports": [
                {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"},
                {"name": "https", "port": 443, "targetPort": 8443, "protocol": "TCP"},
            ],
        }});
        let patched = smp(
            "Service",
            target,
            json!({"spec": {
                "$setElementOrder/ports": [{"port": 80}, {"port": 443}],
                "ports": [{"port": 80, "targetPort": 9090}],
            }}),
        );
        assert_eq!(
            patched["spec"]["ports"],
            json!([
                {"name": "http", "port": 80, "targetPort": 9090, "protocol": "TCP"},
                {"name": "https", "port": 443, "targetPort": 8443, "protocol": "TCP"},
            ])
        );
    }

    #[test]
    fn smp_status_conditions_merge_by_type() {
        let target = json!({"status": {
            "conditions": [
                {"type": "Ready", "status": "False"},
                {"type": "MemoryPressure", "status": "False"},
            ],
            "addresses": [{"type": "InternalIP", "address": "10.0.0.1"}],
        }});
        let patched = smp(
            "Node",
            target,
            json!({"status": {
                "$setElementOrder/conditions": [{"type": "Ready"}, {"type": "MemoryPressure"}],
                "conditions": [{"type": "Ready", "status": "True"}],
                "addresses": [{"type": "Hostname", "address": "node-1"}],
            }}),
        );
        assert_eq!(
            patched["status"]["conditions"],
            json!([{"type": "Ready", "status": "True"}, {"type": "MemoryPressure", "status": "False"}])
        );
        assert_eq!(
            patched["status"]["addresses"],
            json!([
                {"type": "Hostname", "address": "node-1"},
                {"type": "InternalIP", "address": "10.0.0.1"},
            ])
        );
    }

    #[test]
    fn smp_missing_merge_key_names_the_element() {
        let error = smp_error(
            "Deployment",
            deployment(json!([{"name": "a"}])),
            json!({"spec": {"template": {"spec": {"containers": [{"name": "a"}, {"image": "x"}]}}}}),
        );
        assert_eq!(
            error,
            "strategic merge patch at spec.template.spec.containers[1]: list element has no merge key \"name\""
        );
    }

    #[test]
    fn smp_rejects_mixed_and_nested_lists() {
        let mixed = smp_error(
            "Pod",
            json!({"metadata": {"finalizers": ["a"]}}),
            json!({"metadata": {"finalizers": [1]}}),
        );
        assert_eq!(
            mixed,
            "strategic merge patch at metadata.finalizers: list elements mix different JSON types"
        );
        let no_key = smp_error(
            "Pod",
            json!({"metadata": {"finalizers": ["a"]}}),
            json!({"metadata": {"finalizers": [["b"]]}}),
        );
        assert_eq!(
            no_key,
            "strategic merge patch at metadata.finalizers: lists of lists cannot be merged"
        );
    }

    /// The patch `kubectl apply` (client-side, v1.32) sends after the applied
    /// manifest changed `replicas` 2 -> 3 and the app container's LOG_LEVEL.
    #[test]
    fn smp_applies_a_kubectl_apply_patch() {
        let config = |replicas: u64, log_level: &str| {
            json!({
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"annotations": {}, "name": "web", "namespace": "default"},
                "spec": {
                    "replicas": replicas,
                    "selector": {"matchLabels": {"app": "web"}},
                    "template": {
                        "metadata": {"labels": {"app": "web"}},
                        "spec": {"containers": [
                            {"name": "app", "image": "example/app:1.0", "env": [
                                {"name": "LOG_LEVEL", "value": log_level},
                                {"name": "MODE", "value": "prod"},
                            ]},
                            {"name": "sidecar", "image": "example/proxy:2.1"},
                        ]},
                    },
                },
            })
            .to_string()
                + "\n"
        };
        let old_applied = config(2, "info");
        let new_applied = config(3, "debug");
        let live = json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {
                "name": "web",
                "namespace": "default",
                "uid": "0b6f5c8e-1a7e-4a57-9c4e-5d1f0e0c2a11",
                "resourceVersion": "4107",
                "generation": 1,
                "labels": {"app": "web"},
                "annotations": {
                    "deployment.kubernetes.io/revision": "1",
                    "kubectl.kubernetes.io/last-applied-configuration": old_applied,
                },
            },
            "spec": {
                "replicas": 2,
                "revisionHistoryLimit": 10,
                "selector": {"matchLabels": {"app": "web"}},
                "strategy": {
                    "type": "RollingUpdate",
                    "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"},
                },
                "template": {
                    "metadata": {"labels": {"app": "web"}},
                    "spec": {
                        "containers": [
                            {
                                "name": "app",
                                "image": "example/app:1.0",
                                "env": [
                                    {"name": "LOG_LEVEL", "value": "info"},
                                    {"name": "INJECTED", "value": "by-webhook"},
                                    {"name": "MODE", "value": "prod"},
                                ],
                                "imagePullPolicy": "IfNotPresent",
                                "resources": {},
                                "terminationMessagePath": "/dev/termination-log",
                                "terminationMessagePolicy": "File",
                            },
                            {
                                "name": "sidecar",
                                "image": "example/proxy:2.1",
                                "imagePullPolicy": "IfNotPresent",
                                "resources": {},
                            },
                        ],
                        "dnsPolicy": "ClusterFirst",
                        "restartPolicy": "Always",
                        "schedulerName": "default-scheduler",
                        "terminationGracePeriodSeconds": 30,
                    },
                },
            },
            "status": {"observedGeneration": 1, "replicas": 2, "readyReplicas": 2},
        });
        // Go marshals map keys sorted, so directives precede their lists.
        let patch = json!({
            "metadata": {"annotations": {
                "kubectl.kubernetes.io/last-applied-configuration": new_applied,
            }},
            "spec": {
                "replicas": 3,
                "template": {"spec": {
                    "$setElementOrder/containers": [{"name": "app"}, {"name": "sidecar"}],
                    "containers": [{
                        "$setElementOrder/env": [{"name": "LOG_LEVEL"}, {"name": "MODE"}],
                        "env": [{"name": "LOG_LEVEL", "value": "debug"}],
                        "name": "app",
                    }],
                }},
            },
        });
        let patched = apply_patch("Deployment", &live, PatchType::Strategic, &patch).unwrap();

        let mut expected = live.clone();
        expected["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"] =
            json!(new_applied);
        expected["spec"]["replicas"] = json!(3);
        expected["spec"]["template"]["spec"]["containers"][0]["env"][0]["value"] = json!("debug");
        assert_eq!(patched, expected);
        assert_eq!(
            serde_json::to_string(&patched).unwrap(),
            serde_json::to_string(&expected).unwrap(),
            "field order is preserved too"
        );
    }
}
