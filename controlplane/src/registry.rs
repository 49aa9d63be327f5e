//! Object semantics, independent of HTTP: what create, update, patch and delete
//! do to an object of each type before it reaches the store (kube-apiserver's
//! "strategies" and registry).

use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use rand::Rng;
use serde_json::{json, Map, Value};
use tokio::sync::Notify;

use crate::api::status::{ApiError, ApiResult};
use crate::cache::{Cache, CachedObject};
use crate::patch::{self, PatchType};
use crate::resources::{self, ResourceInfo, Subresource};
use crate::schema;
use crate::selector::LabelSelector;
use crate::services::{Claimed, ServiceAllocations};
use crate::store::{Revision, StoreError};
use crate::{defaults, validation};

/// Namespaces that exist from the start and may not be deleted.
pub const SYSTEM_NAMESPACES: &[&str] =
    &["default", "kube-system", "kube-public", "kube-node-lease"];
/// Tries of a patch that lost a race with another writer. Every lost race means
/// another write committed, so the writers as a whole always progress; like
/// kube-apiserver's GuaranteedUpdate a patch without a resourceVersion retries
/// until it lands — bounded here only against a pathological hot spot (64
/// writers on one object lose 5 races in a row routinely).
const PATCH_RETRIES: usize = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FieldValidation {
    Ignore,
    #[default]
    Warn,
    Strict,
}

impl FieldValidation {
    pub fn parse(s: &str) -> ApiResult<FieldValidation> {
        match s {
            "" | "Warn" => Ok(FieldValidation::Warn),
            "Ignore" => Ok(FieldValidation::Ignore),
            "Strict" => Ok(FieldValidation::Strict),
            other => Err(ApiError::bad_request(format!(
                "fieldValidation must be one of Ignore, Warn, Strict, got {other:?}"
            ))),
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct WriteOptions {
    pub dry_run: bool,
    pub field_validation: FieldValidation,
}

/// A PATCH request's body and how to apply it.
#[derive(Debug, Clone, Copy)]
pub struct PatchRequest<'a> {
    pub patch_type: PatchType,
    pub body: &'a Value,
}

/// The outcome of a write: the object as stored, and warnings for the client.
#[derive(Debug)]
pub struct Written {
    pub stored: Stored,
    pub created: bool,
    pub warnings: Vec<String>,
}

/// The object a write produced: as the cache holds it (already encoded, so a
/// response needs no re-encoding), or one that was not stored (dry run, no-op,
/// a subresource view).
#[derive(Debug)]
pub enum Stored {
    Committed(Arc<CachedObject>),
    Unstored(Value),
}

impl Written {
    pub fn object(&self) -> Value {
        match &self.stored {
            Stored::Committed(o) => o.value(),
            Stored::Unstored(v) => v.clone(),
        }
    }

    pub fn json(&self) -> Bytes {
        match &self.stored {
            Stored::Committed(o) => o.json.clone(),
            Stored::Unstored(v) => {
                Bytes::from(serde_json::to_vec(v).expect("a Value always serializes"))
            }
        }
    }
}

#[derive(Debug, Default, Clone)]
pub struct DeleteOptions {
    pub grace_period_seconds: Option<i64>,
    pub precondition_uid: Option<String>,
    pub precondition_resource_version: Option<String>,
    pub dry_run: bool,
}

pub struct Registry {
    cache: Arc<Cache>,
    services: ServiceAllocations,
    namespace_work: Arc<Notify>,
}

pub fn now_rfc3339() -> String {
    format_time(Utc::now())
}

pub fn format_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn meta(obj: &Value) -> &Value {
    obj.get("metadata").unwrap_or(&Value::Null)
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    meta(obj).get(field).and_then(Value::as_str)
}

fn meta_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    obj["metadata"]
        .as_object_mut()
        .expect("metadata is an object")
}

fn finalizers(obj: &Value) -> usize {
    meta(obj)
        .get("finalizers")
        .and_then(Value::as_array)
        .map_or(0, Vec::len)
}

fn random_suffix() -> String {
    // kube's alphabet: no vowels (no words) and no look-alike characters.
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    (0..5)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

fn encode(obj: &Value) -> Bytes {
    let mut stored = obj.clone();
    // The revision is the store's; it is stamped on again when served.
    if let Some(m) = stored.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("resourceVersion");
    }
    Bytes::from(serde_json::to_vec(&stored).expect("a Value always serializes"))
}

/// Everything but metadata and status: what `generation` counts changes of.
fn spec_part(obj: &Value) -> Map<String, Value> {
    obj.as_object()
        .map(|m| {
            m.iter()
                .filter(|(k, _)| !matches!(k.as_str(), "metadata" | "status"))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
        .unwrap_or_default()
}

fn selector_string(selector: &Value) -> String {
    selector
        .get("matchLabels")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}

/// The autoscaling/v1 Scale view of a workload.
pub fn scale_of(obj: &Value) -> Value {
    let m = meta(obj);
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": m.get("name"), "namespace": m.get("namespace"), "uid": m.get("uid"),
            "resourceVersion": m.get("resourceVersion"), "creationTimestamp": m.get("creationTimestamp"),
        },
        "spec": {"replicas": obj.pointer("/spec/replicas").cloned().unwrap_or(json!(1))},
        "status": {
            "replicas": obj.pointer("/status/replicas").cloned().unwrap_or(json!(0)),
            "selector": obj.pointer("/spec/selector").map(selector_string).unwrap_or_default(),
        },
    })
}

impl Registry {
    pub fn new(cache: Arc<Cache>, services: ServiceAllocations) -> Registry {
        for svc in cache
            .list(&resources::find_kind("Service").unwrap().key_prefix(), None)
            .0
        {
            services.restore(&svc.value());
        }
        Registry {
            cache,
            services,
            namespace_work: Arc::new(Notify::new()),
        }
    }

    pub fn cache(&self) -> &Arc<Cache> {
        &self.cache
    }

    pub fn get(
        &self,
        res: &'static ResourceInfo,
        ns: Option<&str>,
        name: &str,
    ) -> ApiResult<Arc<CachedObject>> {
        self.cache
            .get(&res.object_key(ns, name))
            .ok_or_else(|| ApiError::not_found(res, name))
    }

    async fn committed(&self, key: &str, revision: Revision) -> ApiResult<Value> {
        self.committed_object(key, revision)
            .await
            .map(|o| o.value())
    }

    /// The object at `key` once the cache reflects `revision` (read-your-writes).
    async fn committed_object(
        &self,
        key: &str,
        revision: Revision,
    ) -> ApiResult<Arc<CachedObject>> {
        if !self.cache.wait_for(revision).await {
            return Err(ApiError::timeout(
                "the write was stored but is not yet visible; retry the read",
            ));
        }
        match self.cache.get(key) {
            Some(obj) => Ok(obj),
            // Deleted again by a concurrent request since: report what was written.
            None => Err(ApiError::internal(format!(
                "{key} was deleted by a concurrent request"
            ))),
        }
    }

    /// Checks kind/apiVersion/namespace/name of a request body against its URL.
    fn check_identity(
        &self,
        res: &ResourceInfo,
        ns: Option<&str>,
        obj: &mut Value,
    ) -> ApiResult<()> {
        if !obj.is_object() {
            return Err(ApiError::bad_request(
                "the request body must be a JSON or YAML object",
            ));
        }
        let expected = res.api_version();
        match obj.get("apiVersion").and_then(Value::as_str) {
            None | Some("") => {
                obj["apiVersion"] = Value::String(expected.clone());
            }
            Some(v) if v != expected => {
                return Err(ApiError::bad_request(format!(
                    "the API version in the data ({v}) does not match the expected API version ({expected})"
                )))
            }
            _ => {}
        }
        match obj.get("kind").and_then(Value::as_str) {
            None | Some("") => {
                obj["kind"] = Value::String(res.kind.to_string());
            }
            Some(k) if k != res.kind => {
                return Err(ApiError::bad_request(format!(
                    "the kind in the data ({k}) does not match the expected kind ({}) for {}",
                    res.kind,
                    res.qualified_plural()
                )))
            }
            _ => {}
        }
        let m = meta_mut(obj);
        if res.namespaced {
            let ns = ns.unwrap_or("default");
            match m.get("namespace").and_then(Value::as_str) {
                None | Some("") => {
                    m.insert("namespace".into(), Value::String(ns.into()));
                }
                Some(given) if given != ns => {
                    return Err(ApiError::bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ))
                }
                _ => {}
            }
        } else {
            m.remove("namespace");
        }
        Ok(())
    }

    fn check_shape(
        &self,
        res: &ResourceInfo,
        obj: &Value,
        mode: FieldValidation,
    ) -> ApiResult<Vec<String>> {
        let unknown = schema::check(res.kind, obj).map_err(|e| {
            ApiError::bad_request(format!(
                "{} in version {:?} cannot be handled as a {}: {e}",
                res.kind, res.version, res.kind
            ))
        })?;
        let messages: Vec<String> = unknown
            .iter()
            .map(|f| format!("unknown field {f:?}"))
            .collect();
        match mode {
            FieldValidation::Strict if !messages.is_empty() => Err(ApiError::bad_request(format!(
                "strict decoding error: {}",
                messages.join(", ")
            ))),
            FieldValidation::Ignore => Ok(Vec::new()),
            _ => Ok(messages),
        }
    }

    fn check_namespace_open(&self, res: &ResourceInfo, ns: Option<&str>) -> ApiResult<()> {
        let (true, Some(ns)) = (res.namespaced, ns) else {
            return Ok(());
        };
        let ns_res = resources::find_kind("Namespace").unwrap();
        let Some(namespace) = self.cache.get(&ns_res.object_key(None, ns)) else {
            return Err(ApiError::not_found(ns_res, ns));
        };
        if namespace
            .value()
            .pointer("/metadata/deletionTimestamp")
            .is_some()
        {
            return Err(ApiError::forbidden(format!(
                "{} \"{}\" is forbidden: unable to create new content in namespace {ns} because it is being terminated",
                res.qualified_plural(),
                meta_str(&namespace.value(), "name").unwrap_or(ns)
            )));
        }
        Ok(())
    }

    fn validate(&self, res: &ResourceInfo, obj: &Value, old: Option<&Value>) -> ApiResult<()> {
        let errors = validation::validate(res.kind, obj, old);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ApiError::invalid(
                res,
                meta_str(obj, "name").unwrap_or(""),
                &errors,
            ))
        }
    }

    fn claim(
        &self,
        res: &ResourceInfo,
        obj: &mut Value,
        old: Option<&Value>,
    ) -> ApiResult<Option<Claimed>> {
        if res.kind != "Service" {
            return Ok(None);
        }
        self.services
            .claim(obj, old)
            .map(Some)
            .map_err(|errors| ApiError::invalid(res, meta_str(obj, "name").unwrap_or(""), &errors))
    }

    fn give_back(&self, claimed: Option<Claimed>) {
        if let Some(c) = claimed {
            self.services.give_back(c);
        }
    }

    pub async fn create(
        &self,
        res: &'static ResourceInfo,
        ns: Option<&str>,
        mut obj: Value,
        opts: WriteOptions,
    ) -> ApiResult<Written> {
        self.check_identity(res, ns, &mut obj)?;
        let warnings = self.check_shape(res, &obj, opts.field_validation)?;
        let m = meta_mut(&mut obj);
        if m.get("name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .is_empty()
        {
            if let Some(prefix) = m
                .get("generateName")
                .and_then(Value::as_str)
                .filter(|p| !p.is_empty())
            {
                let name = format!("{prefix}{}", random_suffix());
                m.insert("name".into(), Value::String(name));
            }
        }
        prepare_create(res, &mut obj);
        defaults::apply_defaults(res.kind, &mut obj);
        self.validate(res, &obj, None)?;
        let ns = meta_str(&obj, "namespace").map(str::to_string);
        self.check_namespace_open(res, ns.as_deref())?;
        let name = meta_str(&obj, "name").unwrap_or_default().to_string();
        let key = res.object_key(ns.as_deref(), &name);
        if self.cache.get(&key).is_some() {
            return Err(ApiError::already_exists(res, &name));
        }
        let claimed = self.claim(res, &mut obj, None)?;
        if opts.dry_run {
            self.give_back(claimed);
            return Ok(Written {
                stored: Stored::Unstored(obj),
                created: true,
                warnings,
            });
        }
        match self.cache.store().create(&key, encode(&obj)).await {
            Ok(rev) => Ok(Written {
                stored: Stored::Committed(self.committed_object(&key, rev).await?),
                created: true,
                warnings,
            }),
            Err(e) => {
                self.give_back(claimed);
                Err(store_error(res, &name, e))
            }
        }
    }

    /// PUT: replaces the object (or, for `sub`, only that part of it).
    pub async fn update(
        &self,
        res: &'static ResourceInfo,
        ns: Option<&str>,
        name: &str,
        mut obj: Value,
        sub: Option<Subresource>,
        opts: WriteOptions,
    ) -> ApiResult<Written> {
        let Some(current) = self.cache.get(&res.object_key(ns, name)) else {
            if sub.is_none() && allow_create_on_update(res) {
                return self.create(res, ns, obj, opts).await;
            }
            return Err(ApiError::not_found(res, name));
        };
        if sub == Some(Subresource::Scale) {
            let replicas = obj.pointer("/spec/replicas").cloned();
            if let Some(rv) = meta_str(&obj, "resourceVersion").filter(|rv| !rv.is_empty()) {
                if rv != current.revision.to_string() {
                    return Err(ApiError::stale(res, name));
                }
            }
            let mut target = current.value();
            target["spec"]["replicas"] = replicas.unwrap_or(json!(0));
            let written = self.replace(res, &current, target, None, opts).await?;
            return Ok(Written {
                stored: Stored::Unstored(scale_of(&written.object())),
                ..written
            });
        }
        self.check_identity(res, ns, &mut obj)?;
        if let Some(given) = meta_str(&obj, "name").filter(|n| *n != name) {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({given}) does not match the name on the URL ({name})"
            )));
        }
        if let Some(rv) = meta_str(&obj, "resourceVersion").filter(|rv| !rv.is_empty()) {
            if rv != current.revision.to_string() {
                return Err(ApiError::stale(res, name));
            }
        }
        self.replace(res, &current, obj, sub, opts).await
    }

    /// Writes `new` over `current` (compare-and-swap on its revision).
    async fn replace(
        &self,
        res: &'static ResourceInfo,
        current: &CachedObject,
        new: Value,
        sub: Option<Subresource>,
        opts: WriteOptions,
    ) -> ApiResult<Written> {
        let warnings = self.check_shape(res, &new, opts.field_validation)?;
        let old = current.value();
        let mut merged = prepare_update(res, &old, new, sub);
        defaults::apply_defaults(res.kind, &mut merged);
        let name = meta_str(&old, "name").unwrap_or_default().to_string();
        self.validate(res, &merged, Some(&old))?;
        let claimed = self.claim(res, &mut merged, Some(&old))?;
        if merged == old {
            self.give_back(claimed);
            return Ok(Written {
                stored: Stored::Unstored(old),
                created: false,
                warnings,
            });
        }
        if opts.dry_run {
            self.give_back(claimed);
            return Ok(Written {
                stored: Stored::Unstored(merged),
                created: false,
                warnings,
            });
        }
        // The last finalizer of an object being deleted is gone: delete it now.
        if ready_to_remove(res, &merged) {
            self.give_back(claimed);
            let object = self.remove(res, current, &old).await?;
            return Ok(Written {
                stored: Stored::Unstored(object),
                created: false,
                warnings,
            });
        }
        match self
            .cache
            .store()
            .update(&current.key, encode(&merged), current.revision)
            .await
        {
            Ok(rev) => {
                if res.kind == "Service" {
                    self.services.release_dropped(&old, &merged);
                }
                Ok(Written {
                    stored: Stored::Committed(self.committed_object(&current.key, rev).await?),
                    created: false,
                    warnings,
                })
            }
            Err(e) => {
                self.give_back(claimed);
                Err(store_error(res, &name, e))
            }
        }
    }

    pub async fn patch(
        &self,
        res: &'static ResourceInfo,
        ns: Option<&str>,
        name: &str,
        patch: PatchRequest<'_>,
        sub: Option<Subresource>,
        opts: WriteOptions,
    ) -> ApiResult<Written> {
        let PatchRequest {
            patch_type,
            body: patch_body,
        } = patch;
        let pinned = patch_body
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .is_some();
        let mut tries = 0;
        loop {
            let current = self.get(res, ns, name)?;
            let base = match sub {
                Some(Subresource::Scale) => scale_of(&current.value()),
                _ => current.value(),
            };
            let kind = if sub == Some(Subresource::Scale) {
                "Scale"
            } else {
                res.kind
            };
            let patched = patch::apply_patch(kind, &base, patch_type, patch_body)
                .map_err(|e| ApiError::invalid_patch(res, name, &e.to_string()))?;
            if let Some(rv) = meta_str(&patched, "resourceVersion") {
                if pinned && rv != current.revision.to_string() {
                    return Err(ApiError::stale(res, name));
                }
            }
            let result = match sub {
                Some(Subresource::Scale) => self.update(res, ns, name, patched, sub, opts).await,
                _ => self.replace(res, &current, patched, sub, opts).await,
            };
            match result {
                Err(e) if e.reason == "Conflict" && !pinned && tries < PATCH_RETRIES => {
                    tries += 1;
                    self.await_newer(res, ns, name, current.revision).await;
                }
                other => return other,
            }
        }
    }

    /// Waits (briefly) until the cache shows a version of the object newer than
    /// `seen`: the store has committed the write a patch lost to, and retrying
    /// before the cache has it would only lose again.
    async fn await_newer(
        &self,
        res: &'static ResourceInfo,
        ns: Option<&str>,
        name: &str,
        seen: Revision,
    ) {
        let key = res.object_key(ns, name);
        while self.cache.get(&key).map(|o| o.revision) == Some(seen) {
            if !self.cache.wait_for(self.cache.revision() + 1).await {
                return;
            }
        }
    }

    pub async fn delete(
        &self,
        res: &'static ResourceInfo,
        ns: Option<&str>,
        name: &str,
        opts: &DeleteOptions,
    ) -> ApiResult<Value> {
        let current = self.get(res, ns, name)?;
        let obj = current.value();
        if let Some(uid) = &opts.precondition_uid {
            if meta_str(&obj, "uid") != Some(uid.as_str()) {
                return Err(ApiError::conflict(
                    res,
                    name,
                    &format!(
                        "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                        meta_str(&obj, "uid").unwrap_or("")
                    ),
                ));
            }
        }
        if let Some(rv) = &opts.precondition_resource_version {
            if *rv != current.revision.to_string() {
                return Err(ApiError::conflict(
                    res,
                    name,
                    &format!("Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}", current.revision),
                ));
            }
        }
        if res.kind == "Namespace" && SYSTEM_NAMESPACES.contains(&name) {
            return Err(ApiError::forbidden(format!(
                "namespaces \"{name}\" is forbidden: this namespace may not be deleted"
            )));
        }
        let grace = grace_period(res, &obj, opts);
        let already_terminating = obj.pointer("/metadata/deletionTimestamp").is_some();
        let needs_wait = res.kind == "Namespace" || finalizers(&obj) > 0 || grace > 0;
        if opts.dry_run {
            return Ok(obj);
        }
        if !needs_wait {
            return self.remove(res, &current, &obj).await;
        }
        if already_terminating && !shortens_grace(&obj, grace) {
            return Ok(obj);
        }
        let mut marked = obj.clone();
        let m = meta_mut(&mut marked);
        let deadline = Utc::now() + chrono::Duration::seconds(grace.max(0));
        m.insert(
            "deletionTimestamp".into(),
            Value::String(format_time(deadline)),
        );
        m.insert(
            "deletionGracePeriodSeconds".into(),
            Value::from(grace.max(0)),
        );
        if res.kind == "Namespace" {
            marked["status"]["phase"] = json!("Terminating");
        }
        let rev = self
            .cache
            .store()
            .update(&current.key, encode(&marked), current.revision)
            .await
            .map_err(|e| store_error(res, name, e))?;
        let marked = self.committed(&current.key, rev).await;
        if res.kind == "Namespace" {
            // After the cache shows the mark, or the finalizer would not see it.
            self.namespace_work.notify_one();
        }
        marked
    }

    /// Removes the object from the store now.
    async fn remove(
        &self,
        res: &'static ResourceInfo,
        current: &CachedObject,
        obj: &Value,
    ) -> ApiResult<Value> {
        let name = meta_str(obj, "name").unwrap_or_default();
        self.cache
            .store()
            .delete(&current.key, Some(current.revision))
            .await
            .map_err(|e| store_error(res, name, e))?;
        if res.kind == "Service" {
            self.services.release(obj);
        }
        Ok(obj.clone())
    }

    /// Assigns a pending pod to a node (the pods/binding subresource's effect):
    /// sets spec.nodeName, which is otherwise immutable, and PodScheduled=True.
    pub async fn bind(&self, ns: &str, name: &str, node: &str) -> ApiResult<()> {
        let res = resources::find_kind("Pod").unwrap();
        let current = self.get(res, Some(ns), name)?;
        let mut pod = current.value();
        if let Some(assigned) = pod
            .pointer("/spec/nodeName")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
        {
            return Err(ApiError::conflict(
                res,
                name,
                &format!("pod {name} is already assigned to node \"{assigned}\""),
            ));
        }
        pod["spec"]["nodeName"] = json!(node);
        let mut conditions: Vec<Value> = pod
            .pointer("/status/conditions")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|c| c["type"] != "PodScheduled")
            .collect();
        conditions.push(
            json!({"type": "PodScheduled", "status": "True", "lastTransitionTime": now_rfc3339()}),
        );
        pod["status"]["conditions"] = json!(conditions);
        let rev = self
            .cache
            .store()
            .update(&current.key, encode(&pod), current.revision)
            .await
            .map_err(|e| store_error(res, name, e))?;
        self.committed(&current.key, rev).await.map(|_| ())
    }

    /// Lists objects of a type matching a label selector, for deletecollection
    /// and the namespace finalizer.
    pub fn select(
        &self,
        res: &'static ResourceInfo,
        ns: Option<&str>,
        selector: &LabelSelector,
    ) -> Vec<Arc<CachedObject>> {
        let (items, _) = self.cache.list(&res.scope_prefix(ns), None);
        items
            .into_iter()
            .filter(|o| selector.matches(&o.labels))
            .collect()
    }

    /// Creates the namespaces every cluster has, and the `kubernetes` service.
    pub async fn bootstrap(
        &self,
        apiserver: Option<(std::net::IpAddr, u16)>,
    ) -> anyhow::Result<()> {
        let ns_res = resources::find_kind("Namespace").unwrap();
        for ns in SYSTEM_NAMESPACES {
            if self.cache.get(&ns_res.object_key(None, ns)).is_none() {
                self.create(
                    ns_res,
                    None,
                    json!({"metadata": {"name": ns}}),
                    WriteOptions::default(),
                )
                .await?;
            }
        }
        let svc_res = resources::find_kind("Service").unwrap();
        if self
            .cache
            .get(&svc_res.object_key(Some("default"), "kubernetes"))
            .is_none()
        {
            let svc = json!({
                "metadata": {"name": "kubernetes", "namespace": "default",
                             "labels": {"component": "apiserver", "provider": "kubernetes"}},
                "spec": {"clusterIP": self.services.first_cluster_ip().to_string(),
                         "ports": [{"name": "https", "port": 443, "protocol": "TCP",
                                    "targetPort": apiserver.map_or(443, |(_, p)| p)}]},
            });
            self.create(svc_res, Some("default"), svc, WriteOptions::default())
                .await?;
        }
        // Like kube-apiserver, publish endpoints only for an address other hosts can
        // reach (loopback endpoints are invalid).
        if let Some((ip, port)) =
            apiserver.filter(|(ip, _)| !ip.is_unspecified() && !ip.is_loopback())
        {
            let ep_res = resources::find_kind("Endpoints").unwrap();
            let endpoints = json!({
                "metadata": {"name": "kubernetes", "namespace": "default"},
                "subsets": [{"addresses": [{"ip": ip.to_string()}],
                             "ports": [{"name": "https", "port": port, "protocol": "TCP"}]}],
            });
            self.update(
                ep_res,
                Some("default"),
                "kubernetes",
                endpoints,
                None,
                WriteOptions::default(),
            )
            .await?;
            let slice_res = resources::find_kind("EndpointSlice").unwrap();
            let slice = json!({
                "metadata": {"name": "kubernetes", "namespace": "default",
                             "labels": {"kubernetes.io/service-name": "kubernetes",
                                        "endpointslice.kubernetes.io/managed-by": "ferry-controlplane"}},
                "addressType": "IPv4",
                "endpoints": [{"addresses": [ip.to_string()], "conditions": {"ready": true}}],
                "ports": [{"name": "https", "port": port, "protocol": "TCP"}],
            });
            match self.get(slice_res, Some("default"), "kubernetes") {
                Ok(_) => {
                    self.update(
                        slice_res,
                        Some("default"),
                        "kubernetes",
                        slice,
                        None,
                        WriteOptions::default(),
                    )
                    .await?
                }
                Err(_) => {
                    self.create(slice_res, Some("default"), slice, WriteOptions::default())
                        .await?
                }
            };
        }
        Ok(())
    }

    /// Empties namespaces being deleted, then removes them (kube's namespace
    /// controller). Runs forever; also resumes work left by a crash.
    pub async fn finalize_namespaces(self: Arc<Self>) {
        let ns_res = resources::find_kind("Namespace").unwrap();
        loop {
            let terminating: Vec<Arc<CachedObject>> = self
                .cache
                .list(&ns_res.key_prefix(), None)
                .0
                .into_iter()
                .filter(|n| n.value().pointer("/metadata/deletionTimestamp").is_some())
                .collect();
            for ns in &terminating {
                let value = ns.value();
                let name = meta_str(&value, "name").unwrap_or_default().to_string();
                if let Err(e) = self.empty_namespace(ns, &name).await {
                    tracing::warn!(namespace = %name, error = %e, "namespace cleanup incomplete; will retry");
                }
            }
            if terminating.is_empty() {
                self.namespace_work.notified().await;
            } else {
                tokio::select! {
                    _ = self.namespace_work.notified() => {}
                    _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                }
            }
        }
    }

    async fn empty_namespace(&self, ns: &CachedObject, name: &str) -> ApiResult<()> {
        let everything = LabelSelector::parse("").expect("the empty selector parses");
        let mut remaining = 0;
        for res in resources::RESOURCES.iter().filter(|r| r.namespaced) {
            for obj in self.select(res, Some(name), &everything) {
                remaining += 1;
                let value = obj.value();
                let obj_name = meta_str(&value, "name").unwrap_or_default().to_string();
                match self
                    .delete(res, Some(name), &obj_name, &DeleteOptions::default())
                    .await
                {
                    Ok(_) => {}
                    Err(e) if e.code == 404 || e.code == 409 => {}
                    Err(e) => return Err(e),
                }
            }
        }
        if remaining == 0 {
            self.cache
                .store()
                .delete(&ns.key, Some(ns.revision))
                .await
                .map_err(|e| store_error(resources::find_kind("Namespace").unwrap(), name, e))?;
        }
        Ok(())
    }
}

/// Seconds to wait before an object marked for deletion is removed.
fn grace_period(res: &ResourceInfo, obj: &Value, opts: &DeleteOptions) -> i64 {
    if res.kind != "Pod" {
        return 0;
    }
    // A pod no node runs can go at once; a node agent must stop a running one.
    let scheduled = obj
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .is_some_and(|n| !n.is_empty());
    let finished = matches!(
        obj.pointer("/status/phase").and_then(Value::as_str),
        Some("Succeeded" | "Failed")
    );
    if !scheduled || finished {
        return 0;
    }
    opts.grace_period_seconds.unwrap_or_else(|| {
        obj.pointer("/spec/terminationGracePeriodSeconds")
            .and_then(Value::as_i64)
            .unwrap_or(30)
    })
}

fn shortens_grace(obj: &Value, grace: i64) -> bool {
    meta(obj)
        .get("deletionGracePeriodSeconds")
        .and_then(Value::as_i64)
        .is_some_and(|current| grace < current)
}

/// An object marked for deletion whose finalizers are all gone and whose
/// grace period is over (a running pod keeps its grace period until its node
/// agent, or a forced delete, sets it to 0; namespaces go through the
/// namespace finalizer).
fn ready_to_remove(res: &ResourceInfo, obj: &Value) -> bool {
    let grace_over = meta(obj)
        .get("deletionGracePeriodSeconds")
        .and_then(Value::as_i64)
        .is_none_or(|g| g == 0);
    res.kind != "Namespace"
        && obj.pointer("/metadata/deletionTimestamp").is_some()
        && finalizers(obj) == 0
        && grace_over
}

fn allow_create_on_update(res: &ResourceInfo) -> bool {
    matches!(res.kind, "Endpoints" | "Lease" | "Event")
}

fn store_error(res: &ResourceInfo, name: &str, e: StoreError) -> ApiError {
    match e {
        StoreError::AlreadyExists(_) => ApiError::already_exists(res, name),
        StoreError::NotFound(_) => ApiError::not_found(res, name),
        StoreError::Conflict { .. } => ApiError::stale(res, name),
        other => ApiError::internal(other),
    }
}

/// Server-managed fields of a new object.
fn prepare_create(res: &ResourceInfo, obj: &mut Value) {
    let m = meta_mut(obj);
    m.insert(
        "uid".into(),
        Value::String(uuid::Uuid::new_v4().to_string()),
    );
    m.insert("creationTimestamp".into(), Value::String(now_rfc3339()));
    for field in [
        "resourceVersion",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "selfLink",
        "managedFields",
    ] {
        m.remove(field);
    }
    if res.tracks_generation {
        m.insert("generation".into(), Value::from(1));
    } else {
        m.remove("generation");
    }
    match res.kind {
        // Status is the controllers' to write, not the creator's.
        "Deployment" | "ReplicaSet" | "DaemonSet" | "Service" => {
            obj["status"] = json!({});
        }
        "Namespace" => obj["status"] = json!({"phase": "Active"}),
        "Pod" if obj.pointer("/status/phase").is_none() => {
            obj["status"] = json!({"phase": "Pending"});
        }
        _ => {}
    }
}

/// The object an update stores: the client's version, with server-managed
/// metadata kept, and status or spec taken from the right side.
fn prepare_update(res: &ResourceInfo, old: &Value, new: Value, sub: Option<Subresource>) -> Value {
    let mut merged = match sub {
        Some(Subresource::Status) => {
            let mut merged = old.clone();
            merged["status"] = new.get("status").cloned().unwrap_or(json!({}));
            merged
        }
        _ => {
            let mut merged = new;
            if res.has_subresource(Subresource::Status) {
                match old.get("status") {
                    Some(status) => merged["status"] = status.clone(),
                    None => {
                        merged.as_object_mut().map(|m| m.remove("status"));
                    }
                }
            }
            merged
        }
    };
    let old_meta = meta(old).clone();
    let m = meta_mut(&mut merged);
    for field in [
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "namespace",
        "name",
        "generation",
    ] {
        match old_meta.get(field) {
            Some(v) => m.insert(field.into(), v.clone()),
            None => m.remove(field),
        };
    }
    m.remove("resourceVersion");
    m.remove("managedFields");
    if res.tracks_generation && spec_part(old) != spec_part(&merged) {
        let generation = old_meta
            .get("generation")
            .and_then(Value::as_i64)
            .unwrap_or(0)
            + 1;
        meta_mut(&mut merged).insert("generation".into(), Value::from(generation));
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_subresource_keeps_spec_and_main_update_keeps_status() {
        let res = resources::find_kind("Deployment").unwrap();
        let old = json!({"metadata": {"name": "d", "uid": "u", "generation": 1}, "spec": {"replicas": 1}, "status": {"replicas": 1}});
        let status_update =
            json!({"metadata": {"name": "d"}, "spec": {"replicas": 9}, "status": {"replicas": 2}});
        let merged = prepare_update(res, &old, status_update, Some(Subresource::Status));
        assert_eq!(
            (
                merged["spec"]["replicas"].as_i64(),
                merged["status"]["replicas"].as_i64()
            ),
            (Some(1), Some(2))
        );
        assert_eq!(merged["metadata"]["generation"], 1);
        let spec_update = json!({"metadata": {"name": "d", "uid": "forged"}, "spec": {"replicas": 3}, "status": {"replicas": 7}});
        let merged = prepare_update(res, &old, spec_update, None);
        assert_eq!(
            (
                merged["spec"]["replicas"].as_i64(),
                merged["status"]["replicas"].as_i64()
            ),
            (Some(3), Some(1))
        );
        assert_eq!(
            (
                merged["metadata"]["uid"].as_str(),
                merged["metadata"]["generation"].as_i64()
            ),
            (Some("u"), Some(2))
        );
    }

    #[test]
    fn scale_view() {
        let d = json!({"metadata": {"name": "d", "namespace": "ns"}, "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "a"}}}, "status": {"replicas": 2}});
        let s = scale_of(&d);
        assert_eq!(
            (
                s["spec"]["replicas"].as_i64(),
                s["status"]["selector"].as_str()
            ),
            (Some(3), Some("app=a"))
        );
    }

    #[test]
    fn running_pods_get_a_grace_period() {
        let res = resources::find_kind("Pod").unwrap();
        let pending = json!({"spec": {}});
        let running = json!({"spec": {"nodeName": "n1", "terminationGracePeriodSeconds": 5}});
        assert_eq!(grace_period(res, &pending, &DeleteOptions::default()), 0);
        assert_eq!(grace_period(res, &running, &DeleteOptions::default()), 5);
        let forced = DeleteOptions {
            grace_period_seconds: Some(0),
            ..Default::default()
        };
        assert_eq!(grace_period(res, &running, &forced), 0);
    }
}
